"""Leases and offers through the REST API of a real coordinator (loopback HTTP, SQLite file),
with providers linked over real websockets: choosing by type, the price cap, capacity, signed
tokens, owner-only access, persisted lease life, renewal, the offers view and its CLI."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from solders.keypair import Keypair
from solders.pubkey import Pubkey
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from jupyter_io.coordinator.models import LeaseState
from jupyter_io.coordinator.offers import OffersCache, format_offers_table, offers_json
from jupyter_io.coordinator.scheduler import Offer, OfferIndex
from jupyter_io.coordinator.server import CoordinatorServer
from jupyter_io.coordinator_client import CoordinatorClient, CoordinatorError
from jupyter_io.errors import AuthError, LeaseError
from jupyter_io.leases import verify_token
from jupyter_io.signing import sign_request

from .conftest import GIB, WAIT, FakeProvider, gpu_offer

pytestmark = pytest.mark.timeout(60)

JUPYTER = str(Path(sys.executable).with_name("jupyter"))


async def link(
    server: CoordinatorServer,
    providers: list[FakeProvider],
    *offers: dict[str, object],
    **kw: object,
) -> FakeProvider:
    provider = FakeProvider(server.url, list(offers), **kw)  # type: ignore[arg-type]
    providers.append(provider)
    await provider.connect()
    return provider


async def test_a_lease_by_type_gets_the_provider_of_that_type_with_a_signed_token(
    coordinator: CoordinatorServer, providers: list[FakeProvider], user_client: CoordinatorClient
) -> None:
    rtx = await link(coordinator, providers, gpu_offer("RTX 4090", count=2, price=900_000))
    a100 = await link(
        coordinator,
        providers,
        gpu_offer("A100 80GB", price=3_000_000, vram_gb=80),
        reachable_url="ws://127.0.0.1:9/tunnel",
    )
    info = await user_client.info()
    assert info["version"] == 1 and info["relay"].startswith("ws://127.0.0.1:")

    grant = await user_client.request_lease("a100")
    assert grant.provider == a100.pubkey and grant.gpu == "A100 80GB"
    assert grant.gpu_indices == (0,) and grant.price_lamports_per_hour == 3_000_000
    assert not grant.relay and grant.tunnel_url == "ws://127.0.0.1:9/tunnel"
    claims = verify_token(
        grant.token,
        coordinator=Pubkey.from_string(info["coordinator"]),
        user=user_client.keypair.pubkey(),  # type: ignore[union-attr]
        provider=Pubkey.from_string(a100.pubkey),
        now=grant.expires_at - 1,
    )
    assert claims.lease_id == grant.lease and claims.gpu_indices == (0,)
    assert claims.price_lamports_per_hour == 3_000_000 and not claims.relay
    assert claims.expires_at == grant.expires_at

    relayed = await user_client.request_lease("rtx-4090")  # any spelling
    assert relayed.provider == rtx.pubkey and relayed.relay
    assert relayed.tunnel_url == f"{info['relay']}/{relayed.lease}?side=client"
    assert relayed.relay_headers() == {"X-JIO-Lease-Token": relayed.token}
    # A token names one user, one provider: nobody else can use it.
    with pytest.raises(AuthError, match="issued to user"):
        verify_token(
            relayed.token,
            coordinator=Pubkey.from_string(info["coordinator"]),
            user=Keypair().pubkey(),
            provider=Pubkey.from_string(rtx.pubkey),
            now=relayed.expires_at - 1,
        )


async def test_price_cap_and_unknown_types_are_409_no_offer_saying_what_to_change(
    coordinator: CoordinatorServer, providers: list[FakeProvider], user_client: CoordinatorClient
) -> None:
    await link(coordinator, providers, gpu_offer("RTX 4090", price=1_500_000_000))
    await link(coordinator, providers, gpu_offer("L40S", price=800_000_000, vram_gb=48))
    with pytest.raises(LeaseError) as too_dear:
        await user_client.request_lease("RTX 4090", max_price_lamports_per_hour=1_000_000_000)
    assert "cheapest available RTX 4090" in str(too_dear.value)
    assert "1.5 SOL/h" in str(too_dear.value) and "cap of 1 SOL/h" in str(too_dear.value)
    with pytest.raises(LeaseError) as unknown:
        await user_client.request_lease("H100")
    assert "GPU types on offer: L40S, RTX 4090" in str(unknown.value)
    # The raw answer is the contract's error shape.
    client = CoordinatorClient(coordinator.url, Keypair())
    try:
        with pytest.raises(LeaseError):
            await client.request_lease("H100")
    finally:
        client.close()
    assert len(await coordinator.store.live_leases()) == 0  # type: ignore[union-attr]


async def test_a_provider_at_capacity_is_not_chosen(
    coordinator: CoordinatorServer, providers: list[FakeProvider], user_client: CoordinatorClient
) -> None:
    cheap = await link(coordinator, providers, gpu_offer(count=1, price=500_000))
    dear = await link(coordinator, providers, gpu_offer(count=1, price=700_000))
    first = await user_client.request_lease("RTX 4090")
    second = await user_client.request_lease("RTX 4090")
    assert (first.provider, second.provider) == (cheap.pubkey, dear.pubkey)
    with pytest.raises(LeaseError, match="at capacity"):
        await user_client.request_lease("RTX 4090")
    # Ending a lease frees its GPU for the next request.
    await user_client.end_lease(first.lease)
    third = await user_client.request_lease("RTX 4090")
    assert third.provider == cheap.pubkey


async def test_max_kernels_caps_leases_on_a_group_whatever_gpus_are_free(
    coordinator: CoordinatorServer, providers: list[FakeProvider], user_client: CoordinatorClient
) -> None:
    await link(coordinator, providers, gpu_offer(count=4), max_kernels=1)
    await user_client.request_lease("RTX 4090")
    with pytest.raises(LeaseError, match="at capacity"):
        await user_client.request_lease("RTX 4090")


async def test_only_the_owner_can_see_or_end_a_lease_and_ending_is_idempotent(
    coordinator: CoordinatorServer, providers: list[FakeProvider], user_client: CoordinatorClient
) -> None:
    provider = await link(coordinator, providers, gpu_offer(count=1))
    grant = await user_client.request_lease("RTX 4090")
    other = CoordinatorClient(coordinator.url, Keypair(), timeout=WAIT)
    try:
        with pytest.raises(AuthError, match="another user"):
            await other.get_lease(grant.lease)
        with pytest.raises(AuthError, match="another user"):
            await other.end_lease(grant.lease)
        with pytest.raises(CoordinatorError) as missing:
            await other.get_lease("no-such-lease")
        assert missing.value.status == 404
    finally:
        other.close()
    assert (await user_client.get_lease(grant.lease)).state == "requested"

    ended = await user_client.end_lease(grant.lease)
    assert ended.state == "ended" and ended.ended_at is not None
    assert ended.end_of_service == ended.ended_at
    assert (ended.end_reason, ended.failure_reason) == ("ended by the user", None)
    end = await provider.next_message("end")
    assert end == {"type": "end", "lease": grant.lease, "reason": "ended by the user"}
    again = await user_client.end_lease(grant.lease)
    assert again == ended  # idempotent
    with pytest.raises(CoordinatorError) as gone:
        await user_client.renew_token(grant.lease)
    assert gone.value.status == 410


async def test_lease_life_is_persisted_with_timestamps(
    coordinator: CoordinatorServer, providers: list[FakeProvider], user_client: CoordinatorClient
) -> None:
    registry, store = coordinator.registry, coordinator.store
    assert registry is not None and store is not None
    provider = await link(coordinator, providers, gpu_offer(count=1, price=1_234))
    grant = await user_client.request_lease("RTX 4090")
    requested = await user_client.get_lease(grant.lease)
    assert requested.state == "requested" and requested.active_at is None
    assert requested.user == str(user_client.keypair.pubkey())  # type: ignore[union-attr]
    assert requested.tunnel_url == grant.tunnel_url
    assert requested.expires_at == pytest.approx(grant.expires_at, abs=1e-5)

    await provider.session(grant.lease, "active")
    await registry.wait_for(
        lambda: (
            registry.provider(provider.pubkey).leases[grant.lease].state  # type: ignore[union-attr]
            is LeaseState.ACTIVE
        ),
        WAIT,
    )
    active = await user_client.get_lease(grant.lease)
    assert active.state == "active" and active.active_at >= active.requested_at  # type: ignore[operator]

    renewed = await user_client.renew_token(grant.lease)
    assert renewed.lease == grant.lease and renewed.expires_at >= grant.expires_at
    assert renewed.token != grant.token

    ended = await user_client.end_lease(grant.lease)
    assert ended.state == "ended"
    assert ended.requested_at <= ended.active_at <= ended.ended_at  # type: ignore[operator]
    record = await store.get_lease(grant.lease)
    assert record is not None and record.price_lamports_per_hour == 1_234


async def test_bad_lease_requests_are_400(
    coordinator: CoordinatorServer, user_client: CoordinatorClient
) -> None:
    for body in ({"gpus": 0}, {"gpu": 5}, {"max_price_lamports_per_hour": 1.5}, {"colour": "red"}):
        with pytest.raises(CoordinatorError) as bad:
            await user_client._call("POST", "/api/v1/leases", body, sign=True)
        assert bad.value.status == 400 and bad.value.code == "bad_request"


async def test_an_unused_lease_ends_when_its_token_expires(
    start_coordinator: object, providers: list[FakeProvider]
) -> None:
    server = await start_coordinator(token_ttl=0.3)  # type: ignore[operator]
    provider = await link(server, providers, gpu_offer(count=1))
    client = CoordinatorClient(server.url, Keypair(), timeout=WAIT)
    try:
        grant = await client.request_lease("RTX 4090")
        end = await provider.next_message("end")
        assert end["lease"] == grant.lease and "expired" in end["reason"]
        lease = await client.get_lease(grant.lease)
        assert lease.state == "ended" and lease.end_reason == end["reason"]
        assert (await client.request_lease("RTX 4090")).provider == provider.pubkey
    finally:
        client.close()


# ---- offers ------------------------------------------------------------------------------


async def test_offers_are_aggregated_by_type_and_listed_per_provider(
    coordinator: CoordinatorServer, providers: list[FakeProvider], user_client: CoordinatorClient
) -> None:
    await link(
        coordinator, providers, gpu_offer("RTX 4090", count=2, price=900_000, benchmark=80.0)
    )
    await link(
        coordinator,
        providers,
        gpu_offer("RTX 4090", count=1, price=1_100_000),
        region="us-east",
    )
    await link(
        coordinator,
        providers,
        gpu_offer("A100", price=3_000_000, vram_gb=80, simulated=False),
        reachable_url="ws://10.1.1.1:8765/tunnel",
    )
    await user_client.request_lease("RTX 4090")
    body = await user_client.offers()
    types = {row["gpu"]: row for row in body["types"]}
    assert set(types) == {"rtx4090", "a100"}
    rtx = types["rtx4090"]
    assert rtx["display"] == "RTX 4090" and rtx["vram_bytes"] == 24 * GIB
    assert (rtx["available"], rtx["total"], rtx["offers"]) == (2, 3, 2)
    assert (rtx["price_min"], rtx["price_median"]) == (900_000, 1_000_000)
    assert rtx["regions"] == ["eu-west", "us-east"] and rtx["simulated"] is True
    assert rtx["benchmark_tflops"] == 80.0
    # Providers with no record yet: not measured, not 100 %.
    assert rtx["reliability"] is None
    assert all(p["reliability"] is None for p in body["providers"])
    assert types["a100"]["simulated"] is False
    rows = [
        (p["gpu"], p["free"], p["price_lamports_per_hour"], p["reachable"])
        for p in body["providers"]
    ]
    assert rows == [
        ("A100", 1, 3_000_000, True),
        ("RTX 4090", 1, 900_000, False),
        ("RTX 4090", 1, 1_100_000, False),
    ]
    table = format_offers_table(body)
    assert "RTX 4090 (simulated)" in table and "0.0009" in table and "0.001" in table
    assert "A100 " in table and "A100 (simulated)" not in table
    assert "not measured" in table and "100%" not in table


def test_the_offers_body_is_cached_for_its_ttl() -> None:
    index = OfferIndex()
    now = [100.0]
    cache = OffersCache(index, ttl=2.0, monotonic=lambda: now[0])
    empty = cache.body()
    assert json.loads(empty) == {"types": [], "providers": []}
    index.upsert(Offer("p" * 32, "RTX 4090", GIB, 1, 1, 5, "eu", simulated=True))
    now[0] += 1.9
    assert cache.body() is empty  # still within the ttl
    now[0] += 0.2
    assert json.loads(cache.body())["types"][0]["simulated"] is True
    assert offers_json(index)["providers"][0]["simulated"] is True
    assert "No GPUs on offer" in format_offers_table({"types": [], "providers": []})


async def test_jupyter_io_offers_prints_the_table_and_json(
    coordinator: CoordinatorServer, providers: list[FakeProvider]
) -> None:
    await link(coordinator, providers, gpu_offer("RTX 4090", count=2, price=900_000))

    async def run(*args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            JUPYTER, "io", "offers", "--coordinator", coordinator.url,
            *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        return out.decode()

    table, raw = await asyncio.gather(run(), run("--json"))
    assert "RTX 4090 (simulated)" in table and "2/2" in table
    assert json.loads(raw)["types"][0]["available"] == 2


async def test_error_answers_have_the_contracts_status_and_shape(
    coordinator: CoordinatorServer, providers: list[FakeProvider]
) -> None:
    await link(coordinator, providers, gpu_offer("RTX 4090", price=2_000_000))
    http = AsyncHTTPClient(force_instance=True)
    alice, bob = Keypair(), Keypair()

    async def call(who: Keypair, method: str, path: str, body: object = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        headers = sign_request(who, method, path, data or b"")
        request = HTTPRequest(
            coordinator.url + path, method, headers=headers, body=data,
            allow_nonstandard_methods=True,
        )  # fmt: skip
        response = await http.fetch(request, raise_error=False)
        return response.code, json.loads(response.body)

    try:
        code, body = await call(alice, "POST", "/api/v1/leases", {"gpu": "RTX 4090",
                                "max_price_lamports_per_hour": 1_000_000})  # fmt: skip
        assert code == 409 and body["error"]["code"] == "no_offer"
        assert "0.002 SOL/h" in body["error"]["message"]
        code, grant = await call(alice, "POST", "/api/v1/leases", {"gpu": "RTX 4090"})
        assert code == 201 and set(grant) == {
            "lease", "token", "state", "provider", "tunnel_url", "relay", "gpu", "gpu_indices",
            "price_lamports_per_hour", "expires_at", "escrow", "cohort",
        }  # fmt: skip
        assert grant["escrow"] == {"required": False}  # a free coordinator
        assert grant["cohort"] is None  # the user's own lease
        path = f"/api/v1/leases/{grant['lease']}"
        for method in ("GET", "DELETE"):
            code, body = await call(bob, method, path)
            assert code == 403 and body["error"]["code"] == "forbidden"
        code, body = await call(alice, "GET", "/api/v1/leases/unknown")
        assert code == 404 and body["error"]["code"] == "not_found"
        code, body = await call(alice, "POST", "/api/v1/leases", {"gpus": "two"})
        assert code == 400 and body["error"]["code"] == "bad_request"
        code, body = await call(alice, "GET", "/api/v1/nothing-here")
        assert code == 404 and "/api/v1/" in body["error"]["message"]
    finally:
        http.close()
