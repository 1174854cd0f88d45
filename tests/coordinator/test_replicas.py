"""Several real coordinators (replicas) on one real PostgreSQL behave as one marketplace:
each schedules on every provider whatever replica it is linked to (the change feed), a lease
made or ended through any replica reaches the provider's (capacity, ``end``), a relayed
client at one replica meets a provider linked at another (the outbox carries the dial, which
names the client's replica), and the feed loses no change committed out of order."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import cast

import pytest
import sqlalchemy as sa
from solders.keypair import Keypair
from websockets.asyncio.client import connect

from jupyter_io.coordinator.models import Provider, ProviderStatus
from jupyter_io.coordinator.registry import Registry
from jupyter_io.coordinator.replicas import ReplicaService
from jupyter_io.coordinator.scheduler import OfferIndex
from jupyter_io.coordinator.server import CoordinatorServer
from jupyter_io.coordinator.store import OfferSpec, ProviderProfile, Store
from jupyter_io.coordinator_client import CoordinatorClient

from .conftest import WAIT, FakeProvider, Starter, gpu_offer

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.parametrize("store_url", ["postgresql"], indirect=True),
]

#: Every replica-to-replica effect here must take less than this (the feed runs every 0.2 s).
SOON = 2.0
SECOND = timedelta(seconds=1)


async def replicas(
    start_coordinator: Starter, store_url: str, tmp_path: Path, count: int
) -> list[CoordinatorServer]:
    """``count`` replicas on one database and one keypair; the full reconcile that used to
    carry leases between coordinators is pushed out of every test's reach."""
    return [
        await start_coordinator(
            db=store_url, data_dir=str(tmp_path / "shared"), reconcile_interval=600.0
        )
        for _ in range(count)
    ]


def registry(server: CoordinatorServer) -> Registry:
    assert server.registry is not None
    return server.registry


async def test_a_provider_linked_at_one_replica_is_leased_through_another_within_a_second(
    store_url: str, start_coordinator: Starter, providers: list[FakeProvider], tmp_path: Path
) -> None:
    one, two = await replicas(start_coordinator, store_url, tmp_path, 2)
    provider = FakeProvider(one.url)
    providers.append(provider)
    await provider.connect()
    linked = time.monotonic()
    seen = registry(two)
    await seen.wait_for(lambda: seen.index.offers_of(provider.pubkey) != [], SOON)
    assert time.monotonic() - linked < 1.0
    state = seen.provider(provider.pubkey)
    assert state is not None and state.elsewhere and state.link is None

    async with CoordinatorClient(two.url, Keypair(), timeout=WAIT) as user:
        grant = await user.request_lease("RTX 4090")
        assert grant.provider == provider.pubkey
        status = await user._call("GET", "/api/v1/status")
    replica = status["replica"]
    assert two.replica is not None and one.replica is not None
    assert (replica["id"], replica["url"]) == (two.replica.id, two.url)
    assert (replica["providers_known"], replica["linked_here"]) == (1, 0)
    assert replica["last_seq"] > 0 and replica["view_lag_ms"] < 1000
    assert 0 <= replica["feed_p99_ms"] < 1000
    assert {r["id"] for r in replica["replicas"]} == {one.replica.id, two.replica.id}
    # One of them runs the leader jobs, and each says whether it is the one.
    async with CoordinatorClient(one.url, Keypair(), timeout=WAIT) as user:
        first = await user._call("GET", "/api/v1/status")
    leads = [first["leader_jobs"]["leader"], status["leader_jobs"]["leader"]]
    assert sorted(leads) == [False, True], leads


async def test_a_lease_made_at_one_replica_holds_the_gpu_at_the_provider_s_and_an_end_at_a_third_stops_it(  # noqa: E501
    store_url: str, start_coordinator: Starter, providers: list[FakeProvider], tmp_path: Path
) -> None:
    home, maker, ender = await replicas(start_coordinator, store_url, tmp_path, 3)
    provider = FakeProvider(home.url, [gpu_offer(count=1)])
    providers.append(provider)
    await provider.connect()
    await registry(maker).wait_for(
        lambda: registry(maker).provider(provider.pubkey) is not None, SOON
    )

    async with CoordinatorClient(maker.url, Keypair(), timeout=WAIT) as user:
        grant = await user.request_lease("RTX 4090")
        held = registry(home)
        await held.wait_for(
            lambda: [o.gpus_free for o in held.index.offers_of(provider.pubkey)] == [0],
            SOON,
        )
        state = held.provider(provider.pubkey)
        assert state is not None and grant.lease in state.leases

        async with CoordinatorClient(ender.url, user.keypair, timeout=WAIT) as same_user:
            await same_user.end_lease(grant.lease)
    end = await provider.next_message("end", timeout=SOON)
    assert end["lease"] == grant.lease
    await held.wait_for(
        lambda: [o.gpus_free for o in held.index.offers_of(provider.pubkey)] == [1], SOON
    )


async def test_a_relayed_client_at_one_replica_meets_its_provider_linked_at_another(
    store_url: str, start_coordinator: Starter, providers: list[FakeProvider], tmp_path: Path
) -> None:
    home, other = await replicas(start_coordinator, store_url, tmp_path, 2)
    provider = FakeProvider(home.url, [gpu_offer()])  # no reachable URL: relayed
    providers.append(provider)
    await provider.connect()
    await registry(other).wait_for(
        lambda: registry(other).provider(provider.pubkey) is not None, SOON
    )
    async with CoordinatorClient(other.url, Keypair(), timeout=WAIT) as user:
        grant = await user.request_lease("RTX 4090")
    assert grant.relay and grant.tunnel_url.startswith(other.url.replace("http", "ws", 1))

    async with connect(
        grant.tunnel_url, additional_headers=grant.relay_headers(), open_timeout=WAIT
    ) as client:
        # The dial reaches the provider through its own replica's link, and names the
        # replica holding the client.
        dial = await provider.next_message("dial", timeout=SOON)
        assert dial["lease"] == grant.lease
        assert dial["url"].startswith(other.url.replace("http", "ws", 1) + "/relay/")
        async with connect(
            dial["url"], additional_headers=provider.relay_headers(dial["url"]), open_timeout=WAIT
        ) as provider_side:
            await client.send(b"\x00hello")
            assert await asyncio.wait_for(provider_side.recv(), WAIT) == b"\x00hello"
    assert other.relay is not None and other.relay.stats.pairs == 1


async def test_the_feed_reads_again_a_change_committed_after_a_later_one(
    store_url: str,
) -> None:
    store = await Store.open(store_url)
    try:
        view = Registry(store, OfferIndex(), coordinator=Keypair().pubkey())
        clock = [0.0]
        feed = ReplicaService(
            store, view, url="http://r", hole_timeout=5.0, monotonic=lambda: clock[0]
        )
        early, late, rolled_back = (str(Keypair().pubkey()) for _ in range(3))
        providers = cast(sa.Table, Provider.__table__)

        def row(pubkey: str) -> dict[str, object]:
            now = sa.func.now()
            return {
                "pubkey": pubkey,
                "status": ProviderStatus.ONLINE.value,
                "first_seen": now,
                "last_heartbeat": now,
                "replica_id": "elsewhere",
            }

        async with store.engine.connect() as slow, store.engine.connect() as aborted:
            slow_tx = await slow.begin()
            await slow.execute(sa.insert(providers).values(row(early)))  # draws the lower number
            aborted_tx = await aborted.begin()
            await aborted.execute(sa.insert(providers).values(row(rolled_back)))
            async with store.engine.begin() as fast:
                await fast.execute(sa.insert(providers).values(row(late)))  # committed first
            await feed.poll()
            assert view.provider(late) is not None and view.provider(early) is None
            assert len(feed.holes) == 2  # early's and rolled_back's numbers
            await slow_tx.commit()
            await aborted_tx.rollback()

        clock[0] = 1.0
        await feed.poll()  # the hole filled: read again
        assert view.provider(early) is not None
        assert len(feed.holes) == 1  # the rolled-back number, never to fill
        clock[0] = 7.0
        await feed.poll()  # given up on after hole_timeout
        assert feed.holes == {}
    finally:
        await store.close()


async def test_every_write_a_scheduler_sees_feeds_the_feed_and_heartbeat_flushes_do_not(
    store_url: str,
) -> None:
    store = await Store.open(store_url)
    try:
        pubkey = str(Keypair().pubkey())
        feed = store.replicas

        async def named() -> list[str]:
            return [change.pubkey for change in await feed.changes_since(0)]

        await store.upsert_provider(ProviderProfile(pubkey), replica_id="r-1")
        await store.replace_offers(pubkey, [OfferSpec("RTX 4090", 1, 1, 100)])
        written = len(await named())
        assert written >= 2 and set(await named()) == {pubkey}
        for beat in range(1, 4):
            await store.record_heartbeats({pubkey: datetime.now(timezone.utc) + beat * SECOND})
        assert len(await named()) == written  # flushes never feed it
        await store.mark_provider_lost(pubkey)
        assert len(await named()) == written + 1
        record = await store.get_provider(pubkey)
        assert record is not None and record.replica_id is None  # lost: linked nowhere
    finally:
        await store.close()


async def test_a_heartbeat_flush_skips_a_row_a_lease_transaction_holds_and_writes_it_next_time(
    store_url: str,
) -> None:
    store = await Store.open(store_url)
    try:
        view = Registry(store, OfferIndex(), coordinator=Keypair().pubkey())
        held, free = (str(Keypair().pubkey()) for _ in range(2))
        t0 = datetime.now(timezone.utc).replace(microsecond=0)
        await store.upsert_providers([ProviderProfile(held), ProviderProfile(free)], at=t0)
        beat = (t0 + 5 * SECOND).timestamp()
        view._pending = {held: beat, free: beat}
        providers = cast(sa.Table, Provider.__table__)

        async def stored(pubkey: str) -> float:
            record = await store.get_provider(pubkey)
            assert record is not None
            return record.last_heartbeat.timestamp()

        async with store.engine.connect() as lease:
            transaction = await lease.begin()  # a lease transaction's provider row lock
            await lease.execute(
                sa.select(providers).where(providers.c.pubkey == held).with_for_update()
            )
            # Not behind the lock: the other row is written, the held one kept for later.
            assert await asyncio.wait_for(view.flush(), timeout=5) == 1
            assert view._pending == {held: beat}
            assert await stored(free) == pytest.approx(beat, abs=1e-5)
            await transaction.rollback()
        assert await stored(held) == pytest.approx(t0.timestamp())
        assert await asyncio.wait_for(view.flush(), timeout=5) == 1  # the next flush: delayed
        assert await stored(held) == pytest.approx(beat, abs=1e-5)
        assert view._pending == {}
        assert (view.stats.heartbeats_flushed, view.stats.heartbeats_deferred) == (2, 1)
    finally:
        await store.close()


async def test_the_feed_advances_while_lock_waiters_hold_every_pooled_connection(
    store_url: str,
) -> None:
    store = await Store.open(store_url, pool_size=2, max_overflow=0)
    other = await Store.open(store_url, migrate=False)
    waiters: list[asyncio.Task[None]] = []
    try:
        view = Registry(store, OfferIndex(), coordinator=Keypair().pubkey())
        feed = ReplicaService(store, view, url="http://r")
        locked, changed, newcomer = (str(Keypair().pubkey()) for _ in range(3))
        for pubkey in (locked, changed):
            await other.upsert_provider(ProviderProfile(pubkey), replica_id="r-other")
        await feed.poll()
        assert view.provider(changed) is not None
        providers = cast(sa.Table, Provider.__table__)
        lock = sa.select(providers).where(providers.c.pubkey == locked).with_for_update()

        async def wait_for_the_lock() -> None:
            async with store.engine.begin() as conn:
                await conn.execute(lock)

        async with other.engine.connect() as holder:
            transaction = await holder.begin()
            await holder.execute(lock)
            waiters = [asyncio.create_task(wait_for_the_lock()) for _ in range(2)]
            waiting = sa.text(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND datname = current_database()"
            )
            deadline = time.monotonic() + 10
            async with other.engine.connect() as probe:
                while (await probe.scalar(waiting)) < 2:
                    assert time.monotonic() < deadline, "the lock waiters never queued"
                    await asyncio.sleep(0.02)
            assert store.engine.sync_engine.pool.checkedout() == 2  # the main pool is spent

            await other.replace_offers(changed, [OfferSpec("RTX 4090", 1, 1, 100)])
            await other.upsert_provider(ProviderProfile(newcomer), replica_id="r-other")
            await other.replace_offers(newcomer, [OfferSpec("RTX 5090", 1, 1, 100)])
            # The old feed, on the main pool, waited here for a connection (30 s pool timeout).
            await asyncio.wait_for(feed.poll(), timeout=10)
            state = view.provider(changed)
            assert state is not None and [o.gpu_model for o in state.offers] == ["RTX 4090"]
            assert [o.gpu for o in view.index.offers_of(newcomer)] == ["RTX 5090"]
            await transaction.rollback()
        await asyncio.wait_for(asyncio.gather(*waiters), timeout=10)
    finally:
        for task in waiters:
            task.cancel()
        await other.close()
        await store.close()
