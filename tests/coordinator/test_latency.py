"""The coordinator's part in latency: the relay's ping, its own measured hop to a provider
behind NAT (``via relay``), the candidates a lease request would weigh, and the figures a
lease request may carry."""

from __future__ import annotations

import asyncio
import json
import os
from urllib.parse import urlsplit

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from jupyter_io.coordinator.server import CoordinatorServer
from jupyter_io.coordinator_client import CoordinatorClient
from jupyter_io.latency import Candidate, LatencyProber, PingFailed, ping
from jupyter_io.ping import PING_MAX_REPLY, build_ping_request, ping_target

from .conftest import WAIT, FakeProvider, Starter, gpu_offer

pytestmark = pytest.mark.timeout(60)


async def _raw(coordinator: CoordinatorServer, request: bytes) -> bytes:
    parts = urlsplit(coordinator.url)
    assert parts.hostname is not None and parts.port is not None
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(request)
        data = b""
        while True:  # to the end of a 32-byte body, or of the connection
            chunk = await asyncio.wait_for(reader.read(4096), WAIT)
            data += chunk
            if not chunk or len(data.partition(b"\r\n\r\n")[2]) >= 32:
                return data
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


async def test_the_relay_answers_a_ping_with_less_than_it_was_sent(
    coordinator: CoordinatorServer,
) -> None:
    assert coordinator.relay is not None
    relay_url = coordinator.relay.base_url
    nonce = os.urandom(16)
    request = build_ping_request(ping_target(relay_url), nonce)
    reply = await _raw(coordinator, request)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), reply
    assert body == nonce.hex().encode()
    assert len(reply) <= PING_MAX_REPLY < len(request)
    assert await ping(relay_url, timeout=WAIT) > 0
    bare = f"GET /relay/ping?n={nonce.hex()} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    assert await _raw(coordinator, bare) == b""  # too small to be worth a reply


async def test_the_relay_ping_is_rate_limited_per_address(start_coordinator: Starter) -> None:
    coordinator = await start_coordinator(ping_rate=0.1)
    assert coordinator.relay is not None
    answered = 0
    for _ in range(12):
        try:
            await ping(coordinator.relay.base_url, timeout=WAIT)
        except PingFailed:
            break
        answered += 1
    assert answered == 10  # the burst, then nothing for ten seconds


async def test_a_relayed_provider_is_measured_through_the_relay_plus_the_coordinators_hop(
    coordinator: CoordinatorServer, user_client: CoordinatorClient
) -> None:
    relayed = FakeProvider(coordinator.url, [gpu_offer(price=1_000_000)])
    direct = FakeProvider(
        coordinator.url,
        [gpu_offer(price=2_000_000)],
        reachable_url="ws://127.0.0.1:9/tunnel",  # nothing listens: refused at once
    )
    try:
        await relayed.connect()
        await direct.connect()
        registry = coordinator.registry
        assert registry is not None and coordinator.relay is not None
        # The coordinator pings each link (the provider's websocket answers the pong).
        for _ in range(int(WAIT / 0.05)):
            if registry.relay_hop_ms(relayed.pubkey) is not None:
                break
            await asyncio.sleep(0.05)
        hop = registry.relay_hop_ms(relayed.pubkey)
        assert hop is not None and 0 < hop < 1000
        rows = await user_client.candidates("RTX 4090")
        assert [r["provider"] for r in rows] == [relayed.pubkey, direct.pubkey]
        first, second = rows
        assert first["via_relay"] is True and first["probe_url"] == coordinator.relay.base_url
        assert isinstance(first["relay_hop_ms"], float)
        assert second["via_relay"] is False and second["probe_url"] == "ws://127.0.0.1:9/tunnel"
        offers = await user_client.offers()
        by_key = {p["provider"]: p for p in offers["providers"]}
        assert by_key[relayed.pubkey]["via_relay"] is True
        assert by_key[direct.pubkey]["probe_url"] == "ws://127.0.0.1:9/tunnel"

        measured = await LatencyProber(timeout=2.0).measure([Candidate.from_json(r) for r in rows])
        through = measured[relayed.pubkey]
        assert through.via_relay and through.relay_ms is not None and through.hop_ms is not None
        assert through.latency_ms == pytest.approx(through.relay_ms + through.hop_ms)
        assert measured[direct.pubkey].unreachable  # refused: unknown, not fast
    finally:
        await relayed.close()
        await direct.close()


async def test_bad_latency_fields_are_refused_with_what_to_send(
    coordinator: CoordinatorServer, user_client: CoordinatorClient
) -> None:
    http = AsyncHTTPClient(force_instance=True)
    try:
        for query, message in (
            ("limit=0", "'limit' must be between 1 and 16"),
            ("limit=17", "'limit' must be between 1 and 16"),
            ("gpus=x", "invalid literal"),
        ):
            response = await http.fetch(
                HTTPRequest(f"{coordinator.url}/api/v1/offers/candidates?{query}"),
                raise_error=False,
            )
            assert response.code == 400
            assert message in json.loads(response.body)["error"]["message"]
    finally:
        http.close()
    for kwargs, message in (
        ({"max_latency_ms": -1}, "'max_latency_ms' must be between 0 and 60000 ms"),
        ({"latency_ms": {"not-a-key": 5}}, "keys must be providers' base58 public keys"),
        ({"latency_ms": {"1" * 44: float("inf")}}, "between 0 and 60000 ms"),
        ({"latency_ms": {f"{i:A>44}": 1 for i in range(65)}}, "at most 64"),
    ):
        with pytest.raises(Exception, match=message.replace("(", r"\(").replace(")", r"\)")):
            await user_client.request_lease("RTX 4090", **kwargs)  # type: ignore[arg-type]
