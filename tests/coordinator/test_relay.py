"""The relay between two real websocket peers on loopback: a client holding a lease token and
a provider answering the coordinator's dial. Bytes and text are copied both ways unchanged,
closes propagate with their code, both sides are authenticated before the upgrade, a
reconnecting client gets a new dial, a provider that never comes times out."""

from __future__ import annotations

import asyncio
import json
import os
from urllib.parse import urlsplit

import pytest
from solders.keypair import Keypair
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from jupyter_io.coordinator.relay import HANDSHAKE_BYTES
from jupyter_io.coordinator.server import CoordinatorServer
from jupyter_io.coordinator_client import CoordinatorClient, LeaseGrant
from jupyter_io.leases import LeaseClaims, issue_token
from jupyter_io.protocol import SUBPROTOCOL, FrameKind, encode_control
from jupyter_io.signing import sign_request

from ..raw_ws import RawConnection, flood, open_raw
from .conftest import WAIT, FakeProvider, Starter, gpu_offer

pytestmark = pytest.mark.timeout(60)


async def relayed_lease(
    server: CoordinatorServer, providers: list[FakeProvider], client: CoordinatorClient
) -> tuple[FakeProvider, LeaseGrant]:
    provider = FakeProvider(server.url, [gpu_offer(count=2)])  # no reachable URL: relayed
    providers.append(provider)
    await provider.connect()
    grant = await client.request_lease("RTX 4090")
    assert grant.relay and grant.provider == provider.pubkey
    return provider, grant


async def open_client(grant: LeaseGrant, **kw: object) -> ClientConnection:
    return await connect(
        grant.tunnel_url,
        additional_headers=grant.relay_headers(),
        compression=None,
        max_size=None,
        open_timeout=WAIT,
        **kw,  # type: ignore[arg-type]
    )


async def answer_dial(
    provider: FakeProvider, lease: str, **kw: object
) -> tuple[ClientConnection, str]:
    dial = await provider.next_message("dial")
    assert dial["lease"] == lease
    ws = await connect(
        dial["url"],
        additional_headers=provider.relay_headers(dial["url"]),
        compression=None,
        max_size=None,
        open_timeout=WAIT,
        **kw,  # type: ignore[arg-type]
    )
    return ws, dial["url"]


async def test_the_relay_copies_binary_and_text_both_ways_and_propagates_close_codes(
    coordinator: CoordinatorServer, providers: list[FakeProvider], user_client: CoordinatorClient
) -> None:
    provider, grant = await relayed_lease(coordinator, providers, user_client)
    client = await open_client(grant, subprotocols=[SUBPROTOCOL])
    # The client speaks first here, before the provider has even arrived: nothing is lost.
    early = os.urandom(1000)
    await client.send(early)
    side, url = await answer_dial(provider, grant.lease)
    assert url.startswith(coordinator.url.replace("http", "ws") + f"/relay/{grant.lease}?")
    assert "side=provider" in url and "conn=" in url
    assert client.subprotocol == SUBPROTOCOL
    assert await asyncio.wait_for(side.recv(), WAIT) == early
    # Large messages pass once the provider has welcomed the client (the tunnel's WELCOME).
    welcome = encode_control(FrameKind.WELCOME, {"session": "s"})
    await side.send(welcome)
    assert await asyncio.wait_for(client.recv(), WAIT) == welcome

    big_up, big_down = os.urandom(3 << 20), os.urandom(5 << 20)
    await client.send(big_up)
    await client.send("text stays text: ünïcode")
    assert await asyncio.wait_for(side.recv(), WAIT) == big_up
    assert await asyncio.wait_for(side.recv(), WAIT) == "text stays text: ünïcode"
    await side.send(big_down)
    assert await asyncio.wait_for(client.recv(), WAIT) == big_down

    # Many small messages both ways at once keep their order.
    count = 300
    up = [os.urandom(64) + i.to_bytes(4, "big") for i in range(count)]
    down = [os.urandom(64) + i.to_bytes(4, "big") for i in range(count)]

    async def pump(ws: ClientConnection, messages: list[bytes]) -> None:
        for message in messages:
            await ws.send(message)

    async def drain(ws: ClientConnection) -> list[bytes]:
        return [await ws.recv() for _ in range(count)]  # type: ignore[misc]

    _, _, got_down, got_up = await asyncio.wait_for(
        asyncio.gather(pump(client, up), pump(side, down), drain(client), drain(side)), WAIT
    )
    assert got_up == up and got_down == down

    await client.close(4010, "session ended")
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(side.recv(), WAIT)
    assert (side.close_code, side.close_reason) == (4010, "session ended")
    status = await user_client.status()
    assert status["relay_pairs"] == 1 and status["relay_connections"] == 0


async def test_a_reconnecting_client_gets_a_new_dial_and_the_provider_close_reaches_it(
    coordinator: CoordinatorServer, providers: list[FakeProvider], user_client: CoordinatorClient
) -> None:
    provider, grant = await relayed_lease(coordinator, providers, user_client)
    urls = []
    for attempt in range(2):
        client = await open_client(grant)
        side, url = await answer_dial(provider, grant.lease)
        urls.append(url)
        await side.send(b"hello %d" % attempt)
        assert await asyncio.wait_for(client.recv(), WAIT) == b"hello %d" % attempt
        await side.close(4004, "unknown session")
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(client.recv(), WAIT)
        assert client.close_code == 4004 and client.close_reason == "unknown session"
    assert urls[0] != urls[1]  # one dial, one connection number, per client connection


async def test_a_client_whose_provider_never_comes_is_closed_1013(
    start_coordinator: Starter, providers: list[FakeProvider]
) -> None:
    server = await start_coordinator(relay_pair_timeout=0.3)
    client_api = CoordinatorClient(server.url, Keypair(), timeout=WAIT)
    try:
        provider, grant = await relayed_lease(server, providers, client_api)
        client = await open_client(grant)
        await provider.next_message("dial")  # and ignore it
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(client.recv(), WAIT)
        assert client.close_code == 1013 and "did not connect" in (client.close_reason or "")
        # The dial can no longer be answered.
        dial_url = grant.tunnel_url.replace("side=client", "side=provider&conn=1")
        with pytest.raises(InvalidStatus) as late:
            await connect(dial_url, additional_headers=provider.relay_headers(dial_url))
        assert late.value.response.status_code == 404
    finally:
        client_api.close()


async def test_a_dial_waits_for_a_provider_that_is_reconnecting(
    coordinator: CoordinatorServer, providers: list[FakeProvider], user_client: CoordinatorClient
) -> None:
    provider, grant = await relayed_lease(coordinator, providers, user_client)
    registry = coordinator.registry
    assert registry is not None
    provider.drop()
    await registry.wait_for(lambda: not registry.provider(provider.pubkey).linked, WAIT)  # type: ignore[union-attr]
    client = await open_client(grant)  # the provider is away: the dial is queued
    back = FakeProvider(coordinator.url, [gpu_offer(count=2)], keypair=provider.keypair)
    providers.append(back)
    await back.connect(sessions=[grant.lease])
    side, _ = await answer_dial(back, grant.lease)
    await client.send(b"through")
    assert await asyncio.wait_for(side.recv(), WAIT) == b"through"


async def test_ending_the_lease_closes_its_relayed_connections(
    coordinator: CoordinatorServer, providers: list[FakeProvider], user_client: CoordinatorClient
) -> None:
    provider, grant = await relayed_lease(coordinator, providers, user_client)
    client = await open_client(grant)
    side, _ = await answer_dial(provider, grant.lease)
    await user_client.end_lease(grant.lease)
    for ws in (client, side):
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), WAIT)
        assert ws.close_code == 1000 and "ended by the user" in (ws.close_reason or "")
    with pytest.raises(InvalidStatus) as gone:
        await open_client(grant)
    assert gone.value.response.status_code == 410


async def test_the_client_side_needs_a_valid_token_for_this_lease(
    coordinator: CoordinatorServer, providers: list[FakeProvider], user_client: CoordinatorClient
) -> None:
    provider, grant = await relayed_lease(coordinator, providers, user_client)
    other = await user_client.request_lease("RTX 4090")
    assert coordinator.keypair is not None
    claims = LeaseClaims(
        lease_id=grant.lease,
        user=user_client.keypair.pubkey(),  # type: ignore[union-attr]
        provider=provider.keypair.pubkey(),
        gpu="RTX 4090",
        gpu_indices=(0,),
        price_lamports_per_hour=1,
        issued_at=grant.expires_at - 3600,
        expires_at=grant.expires_at,
        coordinator=Keypair().pubkey(),
        relay=True,
    )
    mallory = Keypair()
    forged = issue_token(
        mallory, LeaseClaims(**{**_fields(claims), "coordinator": mallory.pubkey()})
    )
    cases = {
        "": 401,  # no token
        forged: 401,  # signed by another coordinator
        other.token: 401,  # a real token, for another lease
        grant.token[:-3] + "abc": 401,  # altered
    }
    for token, status in cases.items():
        headers = {"X-JIO-Lease-Token": token} if token else {}
        with pytest.raises(InvalidStatus) as refused:
            await connect(grant.tunnel_url, additional_headers=headers, open_timeout=WAIT)
        assert refused.value.response.status_code == status, token
    unknown = grant.tunnel_url.replace(grant.lease, "no-such-lease")
    with pytest.raises(InvalidStatus) as missing:
        await connect(unknown, additional_headers=grant.relay_headers(), open_timeout=WAIT)
    assert missing.value.response.status_code == 404
    assert provider.messages.empty()  # no refused client made the provider dial


def _fields(claims: LeaseClaims) -> dict[str, object]:
    return {name: getattr(claims, name) for name in LeaseClaims.__slots__}  # type: ignore[attr-defined]


async def test_the_provider_side_must_be_signed_by_the_leases_provider(
    coordinator: CoordinatorServer, providers: list[FakeProvider], user_client: CoordinatorClient
) -> None:
    provider, grant = await relayed_lease(coordinator, providers, user_client)
    client = await open_client(grant)
    dial = await provider.next_message("dial")
    url = dial["url"]
    path = url[url.index("/relay/") :]
    refusals = {
        401: {},  # unsigned
        403: sign_request(Keypair(), "GET", path),  # someone else's key
    }
    for status, headers in refusals.items():
        with pytest.raises(InvalidStatus) as refused:
            await connect(url, additional_headers=headers, open_timeout=WAIT)
        assert refused.value.response.status_code == status
    wrong_conn = url.replace("conn=", "conn=9")
    with pytest.raises(InvalidStatus) as missing:
        await connect(wrong_conn, additional_headers=provider.relay_headers(wrong_conn))
    assert missing.value.response.status_code == 404
    # The real provider still gets through, and the refusals cost the client nothing.
    side = await connect(url, additional_headers=provider.relay_headers(url), open_timeout=WAIT)
    await side.send(b"ok")
    assert await asyncio.wait_for(client.recv(), WAIT) == b"ok"


async def test_a_side_whose_connection_drops_makes_the_relay_close_the_other_with_1001(
    coordinator: CoordinatorServer, providers: list[FakeProvider], user_client: CoordinatorClient
) -> None:
    provider, grant = await relayed_lease(coordinator, providers, user_client)
    client = await open_client(grant)
    side, _ = await answer_dial(provider, grant.lease)
    await client.send(b"before the cut")
    assert await asyncio.wait_for(side.recv(), WAIT) == b"before the cut"
    client.transport.abort()  # no close frame: a crash or a network cut
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(side.recv(), WAIT)
    assert side.close_code == 1001 and "went away" in (side.close_reason or "")
    registry = coordinator.registry
    assert registry is not None
    await registry.wait_for(lambda: coordinator.relay.active() == 0, WAIT)  # type: ignore[union-attr]


# -- before the tunnel handshake ----------------------------------------------------------


async def _raw_client(grant: LeaseGrant, source: str = "127.0.0.1") -> RawConnection:
    parts = urlsplit(grant.tunnel_url)
    return await open_raw(
        parts.hostname or "",
        parts.port or 0,
        f"{parts.path}?{parts.query}",
        source=source,
        headers=grant.relay_headers().items(),
        subprotocol=SUBPROTOCOL,
    )


async def test_before_welcome_the_relay_takes_only_small_frames_and_only_for_hello_timeout(
    start_coordinator: Starter, providers: list[FakeProvider]
) -> None:
    server = await start_coordinator(hello_timeout=0.5)
    api = CoordinatorClient(server.url, Keypair(), timeout=WAIT)
    try:
        provider, grant = await relayed_lease(server, providers, api)
        # A 64 MB frame instead of HELLO: refused from its header, nothing buffered.
        flooder = await _raw_client(grant)
        try:
            assert flooder.status == 101
            sent = await flood(flooder, 64 << 20)
            await flooder.wait_closed()
            assert flooder.close_code == 1009 and sent < 64 << 20
        finally:
            await flooder.close()
        await provider.next_message("dial")  # that connection's, gone already

        # Small frames, but more of them than a HELLO and a LAUNCH take, before WELCOME.
        client = await open_client(grant)
        side, _ = await answer_dial(provider, grant.lease)
        with pytest.raises(ConnectionClosed):
            for _ in range(HANDSHAKE_BYTES // 8000 + 2):
                await client.send(bytes(8000))
            await asyncio.wait_for(client.recv(), 5)
        assert client.close_code == 1008 and "bytes before" in (client.close_reason or "")

        # Paired, but the provider never welcomes the client: both closed at the deadline.
        client = await open_client(grant)
        side, _ = await answer_dial(provider, grant.lease)
        for ws in (client, side):
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
            assert ws.close_code == 1008 and "did not end within" in (ws.close_reason or "")
    finally:
        api.close()


async def test_relay_clients_in_their_handshake_are_capped_per_address_and_in_all(
    start_coordinator: Starter, providers: list[FakeProvider]
) -> None:
    server = await start_coordinator(max_unauthenticated_per_address=2, max_unauthenticated=3)
    api = CoordinatorClient(server.url, Keypair(), timeout=WAIT)
    raws: list[RawConnection] = []
    try:
        provider, grant = await relayed_lease(server, providers, api)
        client = await open_client(grant)
        raws.append(await _raw_client(grant))
        assert raws[-1].status == 101
        raws.append(await _raw_client(grant))  # a third one in its handshake from 127.0.0.1
        assert raws[-1].status == 503
        message = json.loads(raws[-1].body)["error"]["message"]
        assert "127.0.0.1" in message and "try again" in message
        raws.append(await _raw_client(grant, "127.0.0.2"))
        assert raws[-1].status == 101  # its address has room, and 3 in all are allowed
        raws.append(await _raw_client(grant, "127.0.0.3"))
        assert raws[-1].status == 503 and "3 websocket connections" in raws[-1].body.decode()

        # The first client's provider welcomes it: it no longer counts.
        side, _ = await answer_dial(provider, grant.lease)
        welcome = encode_control(FrameKind.WELCOME, {"session": "s"})
        await side.send(welcome)
        assert await asyncio.wait_for(client.recv(), WAIT) == welcome
        raws.append(await _raw_client(grant, "127.0.0.3"))
        assert raws[-1].status == 101
    finally:
        for raw in raws:
            await raw.close()
        api.close()
