"""The provider link over real websockets on loopback, against a coordinator on a real SQLite
file: hello verification, inventory into the store and the scheduler's index, batched
heartbeats, loss after missed intervals, reconnects that keep their sessions, session events
and signed usage reports."""

from __future__ import annotations

import asyncio
import json
from urllib.parse import urlsplit

import pytest
from solders.keypair import Keypair
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from jupyter_io.coordinator.models import LeaseState, ProviderStatus
from jupyter_io.coordinator.registry import Registry
from jupyter_io.coordinator.server import CoordinatorServer
from jupyter_io.coordinator.store import OfferSpec, ProviderProfile, Store
from jupyter_io.coordinator_client import CoordinatorClient
from jupyter_io.errors import ProtocolError
from jupyter_io.provider_link import (
    MAX_MESSAGE_SIZE,
    Challenge,
    Dial,
    End,
    ErrorMessage,
    Heartbeat,
    Hello,
    SessionEvent,
    Usage,
    Welcome,
    parse_message,
)

from ..raw_ws import flood, open_raw
from .conftest import GIB, WAIT, FakeProvider, LinkRefused, Starter, gpu_offer

pytestmark = pytest.mark.timeout(60)


def parts(server: CoordinatorServer) -> tuple[Registry, Store]:
    assert server.registry is not None and server.store is not None
    return server.registry, server.store


async def linked(server: CoordinatorServer, provider: FakeProvider, **kw: object) -> None:
    await provider.connect(**kw)  # type: ignore[arg-type]
    registry, _ = parts(server)
    await registry.wait_for(lambda: registry.provider(provider.pubkey) is not None, WAIT)


# ---- the handshake ---------------------------------------------------------------------------


async def test_bad_signature_is_refused_with_1008_before_anything_is_stored(
    coordinator: CoordinatorServer,
) -> None:
    registry, store = parts(coordinator)
    provider = FakeProvider(coordinator.url)
    with pytest.raises(LinkRefused) as refused:
        await provider.connect(sign_with=Keypair())  # signs as someone else
    assert refused.value.code == 1008
    assert refused.value.error is not None and refused.value.error["code"] == "auth"
    assert "does not prove ownership" in refused.value.error["message"]
    assert await store.get_provider(provider.pubkey) is None
    assert len(coordinator.index) == 0 and registry.linked_count() == 0


@pytest.mark.parametrize(
    ("inventory_change", "message"),
    [
        ({"offers": []}, "offers"),
        ({"offers": [gpu_offer(count=2) | {"gpu_indices": [0]}]}, "gpu_indices"),
        ({"reachable_url": "http://not-a-websocket"}, "reachable_url"),
        ({"offers": [gpu_offer("RTX 4090"), gpu_offer("rtx-4090", first_index=1)]}, "one GPU"),
        ({"offers": [gpu_offer("RTX 4090"), gpu_offer("A100", first_index=0)]}, "indices"),
    ],
)
async def test_malformed_inventory_is_refused_with_1002_and_nothing_stored(
    coordinator: CoordinatorServer, inventory_change: dict[str, object], message: str
) -> None:
    _, store = parts(coordinator)
    provider = FakeProvider(coordinator.url)
    provider.inventory.update(inventory_change)
    with pytest.raises(LinkRefused) as refused:
        await provider.connect()
    assert refused.value.code == 1002
    assert refused.value.error is not None and refused.value.error["code"] == "protocol"
    assert message in refused.value.error["message"]
    assert await store.get_provider(provider.pubkey) is None
    assert len(coordinator.index) == 0


async def test_first_message_must_be_a_hello_and_must_come_in_time(
    start_coordinator: Starter,
) -> None:
    server = await start_coordinator(hello_timeout=0.3)
    url = server.url.replace("http", "ws") + "/api/v1/providers/connect"
    async with connect(url) as ws:
        json.loads(await ws.recv())
        await ws.send(json.dumps({"type": "heartbeat", "load": 0.0, "sessions": []}))
        error = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
        assert error == {
            "type": "error",
            "code": "protocol",
            "message": "the first message must be a hello",
        }
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), WAIT)
        assert ws.close_code == 1002
    async with connect(url) as ws:
        json.loads(await ws.recv())  # the challenge, then silence
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), WAIT)
        assert ws.close_code == 1008 and ws.close_reason == "no hello in time"


async def test_before_its_hello_a_link_takes_small_frames_from_few_connections(
    start_coordinator: Starter, providers: list[FakeProvider]
) -> None:
    server = await start_coordinator(max_unauthenticated_per_address=1)
    provider = FakeProvider(server.url)
    providers.append(provider)
    await linked(server, provider)  # verified: it no longer counts
    url = urlsplit(provider.url)
    host, port = url.hostname or "", url.port or 0
    stranger = await open_raw(host, port, url.path)
    try:
        assert stranger.status == 101
        refused = await open_raw(host, port, url.path)  # a second stranger from 127.0.0.1
        await refused.close()
        assert refused.status == 503
        error = json.loads(refused.body)["error"]
        assert error["code"] == "busy" and "127.0.0.1" in error["message"]
        # Half a megabyte instead of a hello (a verified link may send up to 1 MiB): refused
        # from the frame's header.
        await flood(stranger, MAX_MESSAGE_SIZE // 2)
        await stranger.wait_closed()
        assert stranger.close_code == 1009
    finally:
        await stranger.close()


# ---- inventory ---------------------------------------------------------------------------------


async def test_inventory_goes_to_the_store_and_one_offer_per_group_to_the_index(
    coordinator: CoordinatorServer, providers: list[FakeProvider]
) -> None:
    _, store = parts(coordinator)
    provider = FakeProvider(
        coordinator.url,
        [
            gpu_offer("NVIDIA GeForce RTX 4090", count=2, price=900_000, benchmark=82.5),
            gpu_offer("A100 80GB", count=1, price=3_000_000, vram_gb=80, first_index=2),
        ],
        reachable_url="ws://10.0.0.7:8765/tunnel",
        region="us-east",
    )
    providers.append(provider)
    # A record from before: one lease failed on this provider, which counts against it.
    await store.upsert_provider(ProviderProfile(provider.pubkey, "old", "us-east"))
    await store.replace_offers(provider.pubkey, [OfferSpec("RTX 4090", 24 * GIB, 1, 1)])
    lease = await store.create_lease(
        user_pubkey=str(Keypair().pubkey()), provider_pubkey=provider.pubkey, gpu_model="RTX 4090"
    )
    await store.fail_lease(lease.id, "kernel died")

    await linked(coordinator, provider)

    record = await store.get_provider(provider.pubkey)
    assert record is not None and record.status is ProviderStatus.ONLINE
    assert (record.display_name, record.region) == ("test rig", "us-east")
    assert record.reachable_url == "ws://10.0.0.7:8765/tunnel"
    offers = await store.provider_offers(provider.pubkey)
    assert [(o.gpu_model, o.count, o.gpu_indices, o.simulated) for o in offers] == [
        ("NVIDIA GeForce RTX 4090", 2, (0, 1), True),
        ("A100 80GB", 1, (2,), True),
    ]
    indexed = coordinator.index.offers_of(provider.pubkey)
    assert [(o.gpu, o.gpus_total, o.gpus_free) for o in indexed] == [
        ("A100 80GB", 1, 1),
        ("NVIDIA GeForce RTX 4090", 2, 2),
    ]
    # Measured (30-day record): one session, lost, and no outage: 0 %.
    assert all(o.reliability_measured and o.reliability == 0.0 for o in indexed)
    assert indexed[0].reliability_detail is not None
    assert (indexed[0].reliability_detail["sessions"], indexed[0].reliability_detail["lost"]) == (
        1,
        1,
    )
    assert all(o.simulated and o.region == "us-east" for o in indexed)
    assert indexed[1].benchmark_tflops == 82.5
    assert indexed[0].reachable_url == "ws://10.0.0.7:8765/tunnel"


# ---- heartbeats ------------------------------------------------------------------------------


async def test_heartbeats_are_batched_into_one_store_write_per_flush(
    start_coordinator: Starter, providers: list[FakeProvider]
) -> None:
    server = await start_coordinator(flush_interval=3600.0)  # flushed by hand below
    registry, store = parts(server)
    first, second = FakeProvider(server.url), FakeProvider(server.url)
    providers += [first, second]
    await linked(server, first, heartbeats=False)
    await linked(server, second, heartbeats=False)
    before = {p.pubkey: (await store.get_provider(p.pubkey)).last_heartbeat for p in providers}  # type: ignore[union-attr]
    for _ in range(3):
        await first.heartbeat(load=0.5)
        await second.heartbeat()
    await registry.wait_for(lambda: registry.stats.heartbeats == 6, WAIT)

    assert await registry.flush() == 2  # one row per provider, one statement
    assert registry.stats.flushes == 1 and registry.stats.heartbeats_flushed == 2
    for provider in providers:
        stored = await store.get_provider(provider.pubkey)
        state = registry.provider(provider.pubkey)
        assert stored is not None and state is not None
        assert stored.last_heartbeat > before[provider.pubkey]
        assert stored.last_heartbeat.timestamp() == pytest.approx(state.last_beat, abs=1e-5)
    assert await registry.flush() == 0  # nothing new
    # The load a heartbeat reports reaches the scheduler's index.
    assert coordinator_load(server, first.pubkey) == 0.5


def coordinator_load(server: CoordinatorServer, pubkey: str) -> float:
    (offer,) = server.index.offers_of(pubkey)
    return offer.load


async def test_a_silent_provider_is_lost_its_leases_fail_at_its_last_heartbeat(
    start_coordinator: Starter, providers: list[FakeProvider]
) -> None:
    coordinator = await start_coordinator(heartbeat_interval=0.2)
    registry, store = parts(coordinator)
    provider = FakeProvider(coordinator.url, [gpu_offer(count=2)])
    providers.append(provider)
    await linked(coordinator, provider, heartbeats=False)
    user_client = CoordinatorClient(coordinator.url, Keypair(), timeout=WAIT)
    grant = await user_client.request_lease("RTX 4090")
    user_client.close()
    await provider.session(grant.lease, "active")
    await provider.heartbeat(sessions=[grant.lease])
    await registry.wait_for(lambda: registry.stats.heartbeats == 1, WAIT)
    state = registry.provider(provider.pubkey)
    assert state is not None
    last_beat = state.last_beat

    # Silence (the socket stays open): lost after 3 missed 0.2 s intervals.
    await registry.wait_for(lambda: registry.provider(provider.pubkey) is None, WAIT)
    lease = await store.get_lease(grant.lease)
    assert lease is not None and lease.state is LeaseState.FAILED
    assert lease.end_of_service is not None
    assert lease.end_of_service.timestamp() == pytest.approx(last_beat, abs=1e-5)
    assert "lost" in (lease.failure_reason or "")
    record = await store.get_provider(provider.pubkey)
    assert record is not None and record.status is ProviderStatus.LOST
    assert (record.times_lost, record.sessions_failed, record.heartbeats_missed) == (1, 1, 3)
    assert coordinator.index.offers_of(provider.pubkey) == []
    assert registry.stats.providers_lost == 1
    # The coordinator dropped the silent link; its provider may link again, less reliable.
    assert provider.ws is not None
    await asyncio.wait_for(provider.ws.wait_closed(), WAIT)
    assert provider.ws.close_code == 1001
    again = FakeProvider(coordinator.url, [gpu_offer(count=2)], keypair=provider.keypair)
    providers.append(again)
    await linked(coordinator, again, sessions=[grant.lease])
    end = await again.next_message("end")
    assert end["lease"] == grant.lease  # its lease failed: stop the session
    (offer,) = coordinator.index.offers_of(provider.pubkey)
    # Its record came back with it: the session it lost and the outage until it relinked.
    assert offer.reliability_measured and offer.reliability == 0.0
    assert offer.reliability_detail is not None and offer.reliability_detail["lost"] == 1
    assert offer.reliability_detail["uptime"] < 1.0
    assert offer.gpus_free == 2


async def test_a_provider_that_reconnects_in_time_keeps_the_leases_it_still_hosts(
    coordinator: CoordinatorServer, providers: list[FakeProvider], user_client: CoordinatorClient
) -> None:
    registry, store = parts(coordinator)
    provider = FakeProvider(coordinator.url, [gpu_offer(count=3)])
    providers.append(provider)
    await linked(coordinator, provider)
    kept = await user_client.request_lease("RTX 4090")
    gone = await user_client.request_lease("RTX 4090")
    waiting = await user_client.request_lease("RTX 4090")  # requested, never attached
    for lease in (kept, gone):
        await provider.session(lease.lease, "active")
    await registry.wait_for(
        lambda: all(
            lease.state is LeaseState.ACTIVE
            for lease in registry.provider(provider.pubkey).leases.values()  # type: ignore[union-attr]
            if lease.id != waiting.lease
        ),
        WAIT,
    )

    provider.drop()  # the network cut: no close frame
    await registry.wait_for(lambda: not registry.provider(provider.pubkey).linked, WAIT)  # type: ignore[union-attr]
    assert coordinator.index.offers_of(provider.pubkey) == []  # not schedulable while away
    back = FakeProvider(coordinator.url, [gpu_offer(count=3)], keypair=provider.keypair)
    providers.append(back)
    await linked(coordinator, back, sessions=[kept.lease, "a-lease-it-dreamt-of"])
    await registry.sweep()  # a sweep right after the reconnect loses nothing

    assert (await store.get_lease(kept.lease)).state is LeaseState.ACTIVE  # type: ignore[union-attr]
    assert (await store.get_lease(waiting.lease)).state is LeaseState.REQUESTED  # type: ignore[union-attr]
    failed = await store.get_lease(gone.lease)
    assert failed is not None and failed.state is LeaseState.FAILED
    assert "reconnected without the session" in (failed.failure_reason or "")
    end = await back.next_message("end")
    assert end["lease"] == "a-lease-it-dreamt-of"
    (offer,) = coordinator.index.offers_of(provider.pubkey)
    assert offer.gpus_free == 1  # kept + waiting hold two of three
    record = await store.get_provider(provider.pubkey)
    assert record is not None and record.times_lost == 0


async def test_a_newer_link_replaces_the_older_one(
    coordinator: CoordinatorServer, providers: list[FakeProvider]
) -> None:
    registry, _ = parts(coordinator)
    old = FakeProvider(coordinator.url)
    new = FakeProvider(coordinator.url, keypair=old.keypair)
    providers += [old, new]
    await linked(coordinator, old)
    await linked(coordinator, new)
    assert old.ws is not None
    await asyncio.wait_for(old.ws.wait_closed(), WAIT)
    assert old.ws.close_code == 1000 and "newer link" in (old.ws.close_reason or "")
    state = registry.provider(new.pubkey)
    assert state is not None and state.linked and registry.linked_count() == 1
    assert len(coordinator.index.offers_of(new.pubkey)) == 1


async def test_a_provider_saying_goodbye_without_leases_goes_offline(
    coordinator: CoordinatorServer, providers: list[FakeProvider]
) -> None:
    registry, store = parts(coordinator)
    provider = FakeProvider(coordinator.url)
    await linked(coordinator, provider)
    await provider.close(1001)
    await registry.wait_for(lambda: registry.stats.providers_offline == 1, WAIT)
    assert registry.provider(provider.pubkey) is None
    record = await store.get_provider(provider.pubkey)
    assert record is not None and record.status is ProviderStatus.OFFLINE
    assert record is not None and record.times_lost == 0
    assert len(coordinator.index) == 0


# ---- sessions and usage --------------------------------------------------------------------


async def test_session_messages_move_leases_to_active_then_ended(
    coordinator: CoordinatorServer, providers: list[FakeProvider], user_client: CoordinatorClient
) -> None:
    registry, store = parts(coordinator)
    provider = FakeProvider(coordinator.url, [gpu_offer(count=1)])
    providers.append(provider)
    await linked(coordinator, provider)
    grant = await user_client.request_lease("RTX 4090")
    (offer,) = coordinator.index.offers_of(provider.pubkey)
    assert offer.gpus_free == 0

    def state() -> LeaseState | None:
        tracked = registry.provider(provider.pubkey).leases.get(grant.lease)  # type: ignore[union-attr]
        return None if tracked is None else tracked.state

    await provider.session(grant.lease, "active")
    await registry.wait_for(lambda: state() is LeaseState.ACTIVE, WAIT)
    lease = await store.get_lease(grant.lease)
    assert lease is not None and lease.state is LeaseState.ACTIVE and lease.active_at is not None
    assert lease.active_at >= lease.requested_at

    await provider.session(grant.lease, "ended")
    await registry.wait_for(lambda: state() is None, WAIT)
    lease = await store.get_lease(grant.lease)
    assert lease is not None and lease.state is LeaseState.ENDED
    assert lease.end_reason == "the provider ended the session"
    assert lease.ended_at is not None and lease.ended_at == lease.end_of_service
    assert lease.ended_at >= lease.active_at  # type: ignore[operator]
    (offer,) = coordinator.index.offers_of(provider.pubkey)
    assert offer.gpus_free == 1
    record = await store.get_provider(provider.pubkey)
    assert record is not None and record.sessions_ok == 1

    # A session event for someone else's lease changes nothing.
    intruder = FakeProvider(coordinator.url, [gpu_offer("A100", vram_gb=80)])
    providers.append(intruder)
    await linked(coordinator, intruder, heartbeats=False)
    other = await user_client.request_lease("RTX 4090")
    assert other.provider == provider.pubkey
    await intruder.session(other.lease, "ended")
    await intruder.heartbeat(sessions=["marker"])  # handled after the session event
    await registry.wait_for(
        lambda: registry.provider(intruder.pubkey).sessions == {"marker"},  # type: ignore[union-attr]
        WAIT,
    )
    assert (await store.get_lease(other.lease)).state is LeaseState.REQUESTED  # type: ignore[union-attr]


async def test_messages_sent_just_before_a_goodbye_are_all_handled(
    coordinator: CoordinatorServer, providers: list[FakeProvider], user_client: CoordinatorClient
) -> None:
    # A provider shutting down sends its last usage reports and session ends, then closes at
    # once: none of them is lost (the lease ends, it does not fail as "provider lost").
    registry, store = parts(coordinator)
    provider = FakeProvider(coordinator.url, [gpu_offer(count=4)])
    providers.append(provider)
    await linked(coordinator, provider, heartbeats=False)
    grants = [await user_client.request_lease("RTX 4090") for _ in range(3)]
    for grant in grants:
        await provider.session(grant.lease, "active")
    await provider.heartbeat(sessions=["marker"])  # handled after the session events
    await registry.wait_for(
        lambda: registry.provider(provider.pubkey).sessions == {"marker"},  # type: ignore[union-attr]
        WAIT,
    )
    for seq, grant in enumerate(grants, 1):
        await provider.usage(grant.lease, seq, 7)
        await provider.session(grant.lease, "ended")
    await provider.close(1001)
    await registry.wait_for(lambda: registry.provider(provider.pubkey) is None, WAIT)
    for grant in grants:
        lease = await store.get_lease(grant.lease)
        assert lease is not None and lease.state is LeaseState.ENDED, lease
        assert await store.usage_for_lease(grant.lease) == 7


async def test_usage_reports_are_verified_stored_once_and_summed_as_a_total(
    coordinator: CoordinatorServer, providers: list[FakeProvider], user_client: CoordinatorClient
) -> None:
    registry, store = parts(coordinator)
    provider = FakeProvider(coordinator.url, [gpu_offer(count=2)])
    providers.append(provider)
    await linked(coordinator, provider)
    grant = await user_client.request_lease("RTX 4090")
    await provider.usage(grant.lease, 1, 10)
    await provider.usage(grant.lease, 2, 25)
    await provider.usage(grant.lease, 2, 25)  # delivered twice
    await provider.usage(grant.lease, 1, 10)  # late duplicate of an older one
    await provider.usage(grant.lease, 3, 40, sign_with=Keypair())  # forged
    await provider.usage("not-a-lease", 1, 10)  # a lease it does not host
    await registry.wait_for(lambda: registry.stats.usage_received == 6, WAIT)

    assert registry.stats.usage_stored == 2
    assert registry.stats.usage_refused == 2
    reports = await store.usage_reports(grant.lease)
    assert [(r.seq, r.seconds_delivered) for r in reports] == [(1, 10), (2, 15)]
    assert await store.usage_for_lease(grant.lease) == 25
    assert all(r.gpu_utilisation == 0.5 for r in reports)


# ---- messages ---------------------------------------------------------------------------------


def test_every_link_message_round_trips_through_its_json() -> None:
    hello = Hello.parse(
        {
            "type": "hello",
            "version": 1,
            "pubkey": str(Keypair().pubkey()),
            "signature": "x" * 88,
            "inventory": {
                "name": "rig",
                "region": "eu",
                "reachable_url": None,
                "max_kernels": 4,
                "offers": [gpu_offer()],
            },
            "sessions": ["b", "a"],
        }
    )
    messages = [
        Challenge(bytes(range(32)), str(Keypair().pubkey())),
        hello,
        Welcome(5.0, str(Keypair().pubkey())),
        ErrorMessage("auth", "no"),
        Heartbeat(0.25, frozenset({"a"})),
        Heartbeat(),
        SessionEvent("lease-1", "active", 1.5),
        Dial("lease-1", "ws://127.0.0.1/relay/lease-1?side=provider&conn=1"),
        End("lease-1", "ended by the user"),
    ]
    for message in messages:
        assert parse_message(message.to_json()) == message
    usage = Usage("lease-1", 3, 60, None, 2.0, "sig")
    assert parse_message(usage.to_json()) == usage


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        '{"type": "teleport"}',
        '{"type": "heartbeat", "load": 2}',
        '{"type": "heartbeat", "load": 0, "sessions": [""]}',
        '{"type": "session", "lease": "x", "state": "paused", "at": 1}',
        '{"type": "usage", "lease": "x", "seq": -1, "seconds": 1, "at": 1, "signature": "s"}',
        '{"type": "challenge", "version": 2, "nonce": "00", "coordinator": "k"}',
    ],
)
def test_malformed_link_messages_raise_protocol_error(text: str) -> None:
    with pytest.raises(ProtocolError):
        parse_message(text)
    with pytest.raises(ProtocolError):
        parse_message(text.encode())


async def test_the_link_answers_pings_takes_fragmented_text_and_refuses_binary(
    coordinator: CoordinatorServer, providers: list[FakeProvider]
) -> None:
    provider = FakeProvider(coordinator.url)
    providers.append(provider)
    await linked(coordinator, provider, heartbeats=False)
    assert provider.ws is not None
    pong = await provider.ws.ping()
    await asyncio.wait_for(pong, WAIT)  # the coordinator's websocket answers pings
    registry, _ = parts(coordinator)
    # A message sent in fragments arrives whole.
    await provider.ws.send(iter(['{"type": "heartbeat", "load": 0, ', '"sessions": ["frag"]}']))
    await registry.wait_for(
        lambda: registry.provider(provider.pubkey).sessions == {"frag"},  # type: ignore[union-attr]
        WAIT,
    )
    await provider.ws.send(b'{"type": "heartbeat"}')  # binary: the link speaks JSON text
    error = await provider.next_message("error")
    assert error["code"] == "protocol" and "binary" in error["message"]
    await asyncio.wait_for(provider.ws.wait_closed(), WAIT)
    assert provider.ws.close_code == 1002
