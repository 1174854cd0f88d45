"""The coordinator's store, on a real SQLite file and a real PostgreSQL server (``store_url``
runs every test on both): providers and offers, heartbeats, the lease life, capacity under
concurrent coordinators, provider loss, idempotent transitions, usage reports, restarts."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from solders.pubkey import Pubkey

from jupyter_io.coordinator.models import LeaseState, ProviderStatus
from jupyter_io.coordinator.store import (
    LeaseRecord,
    OfferSpec,
    ProviderProfile,
    Store,
    UsageReport,
    normalise_url,
)
from jupyter_io.errors import ConfigError, LeaseError

pytestmark = pytest.mark.timeout(90)

T0 = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=timezone.utc)
GIB = 1 << 30


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def new_key() -> str:
    return str(Pubkey(secrets.token_bytes(32)))


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    opened = await Store.open(store_url)
    try:
        yield opened
    finally:
        await opened.close()


async def add_provider(
    store: Store, *offers: OfferSpec, when: datetime = T0, region: str = "eu-west"
) -> str:
    pubkey = new_key()
    await store.upsert_provider(ProviderProfile(pubkey, "rig", region), at=when)
    await store.replace_offers(pubkey, offers or [OfferSpec("RTX 4090", 24 * GIB, 2, 900_000)])
    return pubkey


async def lease(store: Store, provider: str, gpu_model: str = "RTX 4090", **kw: Any) -> LeaseRecord:
    return await store.create_lease(
        user_pubkey=kw.pop("user_pubkey", None) or new_key(),
        provider_pubkey=provider,
        gpu_model=gpu_model,
        **kw,
    )


# ---- providers and offers -----------------------------------------------------------------


async def test_upsert_provider_registers_then_updates_keeping_history(store: Store) -> None:
    pubkey = new_key()
    first = await store.upsert_provider(
        ProviderProfile(pubkey, "Ada's rig", "eu-west", "wss://rig.example:8443"), at=T0
    )
    assert first.status is ProviderStatus.ONLINE
    assert (first.first_seen, first.last_heartbeat, first.online_since) == (T0, T0, T0)
    assert first.reachable_url == "wss://rig.example:8443"
    assert (first.sessions_ok, first.sessions_failed, first.online_seconds) == (0, 0, 0)

    again = await store.upsert_provider(
        ProviderProfile(pubkey, "Ada's rig 2", "us-east"), at=at(60)
    )
    assert again.display_name == "Ada's rig 2"
    assert again.region == "us-east"
    assert again.reachable_url is None  # now behind NAT: the relay it is
    assert again.first_seen == T0
    assert again.online_since == T0  # still the same online stretch
    assert again.last_heartbeat == at(60)
    assert again.online_seconds_total() == 60
    assert again == await store.get_provider(pubkey)
    assert (
        await store.upsert_providers([ProviderProfile(pubkey, "x"), ProviderProfile(pubkey)]) == 1
    )
    renamed = await store.get_provider(pubkey)
    assert renamed is not None and renamed.display_name == "" and renamed.first_seen == T0
    assert await store.get_provider(new_key()) is None


async def test_replace_offers_replaces_inventory_and_numbers_gpus(store: Store) -> None:
    pubkey = await add_provider(store)
    offers = await store.replace_offers(
        pubkey,
        [
            OfferSpec(
                "RTX 4090", 24 * GIB, 2, 900_000, driver_version="550.54", cuda_version="12.4"
            ),
            OfferSpec("A100", 80 * GIB, 1, 3_000_000_000, benchmark_tflops=150.5, max_kernels=1),
            OfferSpec("RTX 4090", 24 * GIB, 1, 800_000, simulated=True, gpu_indices=(7,)),
        ],
        at=at(5),
    )
    assert [offer.gpu_indices for offer in offers] == [(0, 1), (2,), (7,)]
    assert offers[1].price_lamports_per_hour == 3_000_000_000  # above 2**31: BigInteger
    assert offers[1].benchmark_tflops == 150.5
    assert offers[0].max_kernels == 2  # defaults to the GPU count
    assert offers[2].simulated and not offers[0].simulated
    assert offers[0].driver_version == "550.54" and offers[0].published_at == at(5)
    assert await store.provider_offers(pubkey) == offers

    replaced = await store.replace_offers(pubkey, [OfferSpec("H100", 80 * GIB, 4, 5_000_000)])
    assert [(o.gpu_model, o.count) for o in await store.provider_offers(pubkey)] == [("H100", 4)]
    assert replaced[0].gpu_indices == (0, 1, 2, 3)

    with pytest.raises(LookupError, match="upsert_provider"):
        await store.replace_offers(new_key(), [OfferSpec("H100", 80 * GIB, 1, 1)])
    with pytest.raises(ValueError, match="two offers"):
        await store.replace_offers(
            pubkey,
            [
                OfferSpec("H100", 80 * GIB, 1, 1, gpu_indices=(0,)),
                OfferSpec("A100", 80 * GIB, 1, 1, gpu_indices=(0,)),
            ],
        )


async def test_provider_saying_goodbye_goes_offline_keeping_its_leases(store: Store) -> None:
    provider = await add_provider(store, when=T0)
    running = await lease(store, provider, at=at(5))
    await store.record_heartbeats({provider: at(30)})
    assert await store.mark_provider_offline(provider, at=at(40))
    assert not await store.mark_provider_offline(provider, at=at(41))
    offline = await store.get_provider(provider)
    assert offline is not None and offline.status is ProviderStatus.OFFLINE
    assert (offline.last_heartbeat, offline.online_seconds, offline.online_since) == (
        at(40),
        40,
        None,
    )
    assert offline.times_lost == 0 and offline.heartbeats_missed == 0
    assert [lease.id for lease in await store.live_leases()] == [running.id]
    assert await store.load_live_offers() == []
    with pytest.raises(LeaseError, match="is offline"):
        await lease(store, provider)
    back = await store.upsert_provider(ProviderProfile(provider), at=at(100))
    assert back.online_since == at(100) and back.online_seconds_total() == 40


async def test_heartbeats_of_10k_providers_in_one_statement(store: Store) -> None:
    providers = [new_key() for _ in range(10_000)]
    assert await store.upsert_providers((ProviderProfile(p) for p in providers), at=T0) == 10_000
    batch = {p: at(1 + i / 1000) for i, p in enumerate(providers)}

    statements: list[tuple[str, bool]] = []

    def count(_conn: Any, _cursor: Any, sql: str, _params: Any, _ctx: Any, many: bool) -> None:
        statements.append((sql.strip().split()[0].upper(), many))

    sa.event.listen(store.engine.sync_engine, "before_cursor_execute", count)
    try:
        updated = await asyncio.wait_for(store.record_heartbeats(batch), timeout=30)
    finally:
        sa.event.remove(store.engine.sync_engine, "before_cursor_execute", count)

    assert updated == 10_000
    data_statements = [s for s in statements if s[0] not in ("BEGIN", "COMMIT")]
    assert data_statements == [("UPDATE", False)]  # one statement, not an executemany
    for i in (0, 4_321, 9_999):
        record = await store.get_provider(providers[i])
        assert record is not None and record.last_heartbeat == batch[providers[i]]


async def test_heartbeats_never_rewind_and_ignore_unknown_providers(store: Store) -> None:
    a, b = new_key(), new_key()
    await store.upsert_providers([ProviderProfile(a), ProviderProfile(b)], at=T0)
    assert await store.record_heartbeats({a: at(10), b: at(10), new_key(): at(10)}) == 2
    assert await store.record_heartbeats({a: at(5), b: at(20)}) == 1  # a's is late: ignored
    assert await store.record_heartbeats({}) == 0
    record_a, record_b = await store.get_provider(a), await store.get_provider(b)
    assert record_a is not None and record_a.last_heartbeat == at(10)
    assert record_b is not None and record_b.last_heartbeat == at(20)
    with pytest.raises(ValueError, match="naive"):
        await store.record_heartbeats({a: datetime(2026, 3, 1, 12, 0, 30)})


async def test_stale_providers_are_the_online_ones_that_went_quiet(store: Store) -> None:
    quiet, chatty, lost = new_key(), new_key(), new_key()
    await store.upsert_providers([ProviderProfile(k) for k in (quiet, chatty, lost)], at=T0)
    await store.record_heartbeats({chatty: at(30)})
    await store.mark_provider_lost(lost, at=at(30))
    assert await store.stale_providers(at(15)) == [quiet]


# ---- leases -------------------------------------------------------------------------------


async def test_lease_lifecycle_requested_active_ended_with_timestamps(store: Store) -> None:
    provider = await add_provider(store)
    user = new_key()
    created = await store.create_lease(
        user_pubkey=user,
        provider_pubkey=provider,
        gpu_model="RTX 4090",
        relay=True,
        token_expires_at=at(301),
        at=at(1),
    )
    assert created.state is LeaseState.REQUESTED and created.live
    assert created.requested_at == at(1)
    assert (created.active_at, created.ended_at, created.end_of_service) == (None, None, None)
    assert created.gpu_indices == (0,)
    assert created.price_lamports_per_hour == 900_000
    assert created.relay and created.token_expires_at == at(301)

    assert await store.activate_lease(created.id, at=at(3))
    assert await store.set_token_expiry(created.id, at(600))
    active = await store.get_lease(created.id)
    assert active is not None and active.state is LeaseState.ACTIVE
    assert active.active_at == at(3) and active.token_expires_at == at(600)
    assert [lease.id for lease in await store.live_leases()] == [created.id]

    assert await store.end_lease(created.id, "ended by the user", at=at(3603))
    ended = await store.get_lease(created.id)
    assert ended is not None and ended.state is LeaseState.ENDED and not ended.live
    assert (ended.requested_at, ended.active_at, ended.ended_at) == (at(1), at(3), at(3603))
    assert ended.end_of_service == at(3603)
    assert (ended.end_reason, ended.failure_reason) == ("ended by the user", None)
    assert active.end_reason is None
    assert await store.live_leases() == []
    assert await store.leases_for_user(user) == [ended]
    assert await store.leases_for_user(user, states=[LeaseState.ACTIVE]) == []
    record = await store.get_provider(provider)
    assert record is not None and (record.sessions_ok, record.sessions_failed) == (1, 0)


async def test_create_lease_allocates_free_gpus_and_refuses_when_full(store: Store) -> None:
    provider = await add_provider(store, OfferSpec("RTX 4090", 24 * GIB, 3, 900_000))
    first = await lease(store, provider, gpu_count=2)
    assert first.gpu_indices == (0, 1)
    second = await lease(store, provider)
    assert second.gpu_indices == (2,)
    with pytest.raises(LeaseError, match=r"all 3 RTX 4090 GPUs .* are leased"):
        await lease(store, provider)
    assert await store.end_lease(first.id, "ended by the user")
    assert (await lease(store, provider, gpu_count=2)).gpu_indices == (0, 1)  # freed again


async def test_create_lease_picks_the_cheapest_group_under_the_cap(store: Store) -> None:
    provider = await add_provider(
        store,
        OfferSpec("RTX 4090", 24 * GIB, 1, 2_000_000),
        OfferSpec("RTX 4090", 24 * GIB, 1, 1_000_000),
        OfferSpec("A100", 80 * GIB, 1, 3_000_000, max_kernels=1),
    )
    cheap = await lease(store, provider, max_price_lamports_per_hour=1_500_000)
    assert (cheap.gpu_indices, cheap.price_lamports_per_hour) == ((1,), 1_000_000)
    with pytest.raises(LeaseError, match=r"cost at least 2000000 lamports/hour, above your cap"):
        await lease(store, provider, max_price_lamports_per_hour=1_500_000)
    dear = await lease(store, provider)
    assert (dear.gpu_indices, dear.price_lamports_per_hour) == ((0,), 2_000_000)
    with pytest.raises(LeaseError, match="offers no H100"):
        await lease(store, provider, gpu_model="H100")
    with pytest.raises(LeaseError, match="not registered"):
        await lease(store, new_key())
    with pytest.raises(LeaseError, match="already taken"):
        await lease(store, provider, gpu_model="A100", lease_id=cheap.id)


async def test_max_kernels_caps_leases_on_a_group(store: Store) -> None:
    provider = await add_provider(store, OfferSpec("RTX 4090", 24 * GIB, 4, 1, max_kernels=2))
    await lease(store, provider)
    await lease(store, provider)
    with pytest.raises(LeaseError):
        await lease(store, provider)
    [live] = await store.load_live_offers()
    assert live.live_leases == 2 and live.leased_indices == {0, 1} and live.free_gpus == 0


async def test_two_coordinators_race_for_the_last_gpu(store_url: str) -> None:
    # Two stores, two engines, two connection pools: two coordinator processes sharing one
    # database. Eight requests for each provider's last free GPU: exactly one may win.
    first, second = await Store.open(store_url), await Store.open(store_url)
    try:
        for _ in range(5):
            provider = await add_provider(first)  # two GPUs
            taken = await lease(first, provider)
            attempts = [lease(store, provider) for _ in range(4) for store in (first, second)]
            results = await asyncio.wait_for(
                asyncio.gather(*attempts, return_exceptions=True), timeout=60
            )
            winners = [r for r in results if isinstance(r, LeaseRecord)]
            refused = [r for r in results if isinstance(r, LeaseError)]
            assert len(winners) == 1, results
            assert len(refused) == len(attempts) - 1, results
            assert winners[0].gpu_indices != taken.gpu_indices
            live = await second.live_leases(provider_pubkey=provider)
            assert sorted(lease.id for lease in live) == sorted([taken.id, winners[0].id])

        # The same two coordinators ending one lease together: it ends once, counted once.
        ended = await asyncio.gather(
            first.end_lease(taken.id, "ended by the user"),
            second.end_lease(taken.id, "ended by the user"),
        )
        assert sorted(ended) == [False, True]
        record = await first.get_provider(taken.provider_pubkey)
        assert record is not None and record.sessions_ok == 1
    finally:
        await first.close()
        await second.close()


async def test_mark_provider_lost_fails_its_leases_at_the_last_heartbeat(store: Store) -> None:
    provider = await add_provider(store, OfferSpec("RTX 4090", 24 * GIB, 3, 900_000))
    bystander = await add_provider(store)
    running = await lease(store, provider, at=at(1))
    await store.activate_lease(running.id, at=at(2))
    waiting = await lease(store, provider, at=at(3))
    done = await lease(store, provider, at=at(4))
    await store.activate_lease(done.id, at=at(5))
    await store.end_lease(done.id, "ended by the user", at=at(6))
    elsewhere = await lease(store, bystander, at=at(7))
    await store.record_heartbeats({provider: at(10), bystander: at(40)})

    failed = await store.mark_provider_lost(provider, at=at(40))

    assert sorted(lease.id for lease in failed) == sorted([running.id, waiting.id])
    for record in failed:
        assert record == await store.get_lease(record.id)
        assert record.state is LeaseState.FAILED
        assert record.end_of_service == at(10)  # billing stops at the last heartbeat
        assert record.ended_at == at(40)
        assert record.failure_reason is not None and provider in record.failure_reason
    assert (await store.get_lease(done.id)) == await store.get_lease(done.id)
    done_after = await store.get_lease(done.id)
    assert done_after is not None and done_after.state is LeaseState.ENDED
    assert [lease.id for lease in await store.live_leases()] == [elsewhere.id]

    lost = await store.get_provider(provider)
    assert lost is not None and lost.status is ProviderStatus.LOST
    assert (lost.sessions_ok, lost.sessions_failed) == (1, 2)
    assert (lost.heartbeats_missed, lost.times_lost) == (3, 1)
    assert lost.online_seconds == 10 and lost.online_since is None
    assert [o.provider.pubkey for o in await store.load_live_offers()] == [bystander]
    with pytest.raises(LeaseError, match="is lost"):
        await lease(store, provider)

    # Again: nothing more to fail, no counter counts twice.
    assert await store.mark_provider_lost(provider, at=at(50)) == []
    assert await store.get_provider(provider) == lost
    assert not await store.end_lease(running.id, "ended by the user")

    # Back within the grace period, or later: online again, history kept.
    back = await store.upsert_provider(ProviderProfile(provider, "rig", "eu-west"), at=at(100))
    assert back.status is ProviderStatus.ONLINE and back.online_since == at(100)
    assert (back.online_seconds, back.sessions_failed, back.times_lost) == (10, 2, 1)
    assert (await lease(store, provider)).gpu_indices == (0,)


async def test_transitions_are_conditional_and_idempotent(store: Store) -> None:
    provider = await add_provider(store)
    first = await lease(store, provider, at=at(1))
    assert await store.activate_lease(first.id, at=at(2))
    assert not await store.activate_lease(first.id, at=at(9))
    assert await store.end_lease(first.id, "ended by the user", at=at(20))
    assert not await store.end_lease(first.id, "ended by the user", at=at(30))
    assert not await store.fail_lease(first.id, "too late", at=at(31))
    assert not await store.activate_lease(first.id, at=at(32))
    assert not await store.set_token_expiry(first.id, at(99))
    record = await store.get_lease(first.id)
    assert record is not None and record.state is LeaseState.ENDED
    assert (record.active_at, record.ended_at, record.failure_reason) == (at(2), at(20), None)

    second = await lease(store, provider, at=at(40))
    assert await store.fail_lease(second.id, "kernel did not start", at=at(45))
    assert not await store.fail_lease(second.id, "again", at=at(46))
    assert not await store.activate_lease(second.id, at=at(47))
    failed = await store.get_lease(second.id)
    assert failed is not None and failed.state is LeaseState.FAILED
    assert failed.failure_reason == "kernel did not start"
    assert failed.end_of_service == failed.ended_at == at(45)

    third = await lease(store, provider, at=at(50))
    await store.activate_lease(third.id, at=at(51))
    assert await store.fail_lease(third.id, "kernel died", at=at(90), end_of_service=at(80))
    died = await store.get_lease(third.id)
    assert died is not None and (died.ended_at, died.end_of_service) == (at(90), at(80))

    counters = await store.get_provider(provider)
    assert counters is not None and (counters.sessions_ok, counters.sessions_failed) == (1, 2)
    assert not await store.activate_lease("no-such-lease")
    assert not await store.end_lease("no-such-lease", "x")
    assert not await store.fail_lease("no-such-lease", "x")
    assert await store.get_lease("no-such-lease") is None


async def test_usage_reports_are_stored_once(store: Store) -> None:
    provider = await add_provider(store)
    leased = await lease(store, provider)
    report = UsageReport(leased.id, 0, 60, "sig-0", at(60), gpu_utilisation=0.93)
    assert await store.add_usage_report(report)
    assert not await store.add_usage_report(report)  # delivered twice, stored once
    assert await store.add_usage_report(UsageReport(leased.id, 1, 45, "sig-1", at(105)))
    assert await store.usage_for_lease(leased.id) == 105
    stored = await store.usage_reports(leased.id)
    assert [(r.seq, r.seconds_delivered, r.signature) for r in stored] == [
        (0, 60, "sig-0"),
        (1, 45, "sig-1"),
    ]
    assert stored[0] == report and stored[0].received_at is not None
    assert stored[0].reported_at == at(60) and stored[0].gpu_utilisation == 0.93

    await store.end_lease(leased.id, "ended by the user")
    assert await store.add_usage_report(UsageReport(leased.id, 2, 5, "sig-2", at(110)))
    assert await store.usage_for_lease(leased.id) == 110
    assert await store.usage_for_lease("no-such-lease") == 0
    with pytest.raises(LookupError, match="unknown lease"):
        await store.add_usage_report(UsageReport("no-such-lease", 0, 1, "sig", at(1)))
    with pytest.raises(ValueError):
        UsageReport(leased.id, 3, -1, "sig", at(1))


async def test_load_live_offers_reports_each_groups_load(store: Store) -> None:
    busy = await add_provider(
        store,
        OfferSpec("RTX 4090", 24 * GIB, 2, 900_000),
        OfferSpec("A100", 80 * GIB, 1, 3_000_000),
        region="us-east",
    )
    idle = await add_provider(store, OfferSpec("H100", 80 * GIB, 8, 5_000_000))
    await lease(store, busy, "A100")
    ended = await lease(store, busy, "RTX 4090")
    await store.end_lease(ended.id, "ended by the user")

    offers = {(o.provider.pubkey, o.offer.gpu_model): o for o in await store.load_live_offers()}
    assert set(offers) == {(busy, "RTX 4090"), (busy, "A100"), (idle, "H100")}
    assert offers[busy, "A100"].free_gpus == 0
    assert offers[busy, "A100"].leased_indices == {2}
    assert offers[busy, "RTX 4090"].free_gpus == 2 and offers[busy, "RTX 4090"].live_leases == 0
    assert offers[idle, "H100"].free_gpus == 8
    assert offers[busy, "A100"].provider.region == "us-east"
    assert offers[busy, "A100"].provider.sessions_ok == 1


async def test_a_reopened_store_still_has_every_lease(store_url: str) -> None:
    store = await Store.open(store_url)
    try:
        provider = await add_provider(store, OfferSpec("RTX 4090", 24 * GIB, 4, 900_000))
        user = new_key()
        requested = await lease(store, provider, user_pubkey=user, at=at(1))
        active = await lease(store, provider, user_pubkey=user, at=at(2), relay=True)
        await store.activate_lease(active.id, at=at(3))
        ended = await lease(store, provider, user_pubkey=user, at=at(4))
        await store.end_lease(ended.id, "ended by the user", at=at(5))
        failed = await lease(store, provider, user_pubkey=user, at=at(6))
        await store.fail_lease(failed.id, "no GPU memory", at=at(7))
        await store.add_usage_report(UsageReport(active.id, 0, 30, "sig", at(33)))
        before = {lease.id: lease for lease in await store.leases_for_user(user)}
        provider_before = await store.get_provider(provider)
    finally:
        await store.close()  # the coordinator restarts

    reopened = await Store.open(store_url)
    try:
        after = {lease.id: lease for lease in await reopened.leases_for_user(user)}
        assert after == before and len(after) == 4
        assert [lease.id for lease in await reopened.live_leases()] == [requested.id, active.id]
        assert await reopened.usage_for_lease(active.id) == 30
        assert await reopened.get_provider(provider) == provider_before
        [live] = await reopened.load_live_offers()
        assert live.leased_indices == set(requested.gpu_indices + active.gpu_indices)
    finally:
        await reopened.close()


async def test_naive_datetimes_are_refused(store: Store) -> None:
    naive = datetime(2026, 3, 1, 12, 0)
    with pytest.raises(ValueError, match="naive"):
        await store.upsert_provider(ProviderProfile(new_key()), at=naive)
    with pytest.raises(ValueError, match="base58"):
        ProviderProfile("not a key")
    provider = await add_provider(store)
    other_zone = timezone(timedelta(hours=2))
    leased = await lease(store, provider, at=T0.astimezone(other_zone))
    assert leased.requested_at == T0 and leased.requested_at.tzinfo is timezone.utc


async def test_urls_users_type_become_async_urls(tmp_path: Path) -> None:
    assert normalise_url(tmp_path / "c.db").render_as_string() == (
        f"sqlite+aiosqlite:///{tmp_path / 'c.db'}"
    )
    assert normalise_url("sqlite:///c.db").drivername == "sqlite+aiosqlite"
    pg = normalise_url("postgresql://coord:secret@db.internal:5432/jupyter_io")
    assert (pg.drivername, pg.host, pg.database) == (
        "postgresql+asyncpg",
        "db.internal",
        "jupyter_io",
    )
    for wrong in ("sqlite://", "sqlite:///:memory:", "mysql://u@h/db", "not a url://"):
        with pytest.raises(ConfigError):
            normalise_url(wrong)
    store = await Store.open(tmp_path / "nested" / "dir" / "c.db")  # a plain path will do
    try:
        assert store.dialect == "sqlite"
        assert (tmp_path / "nested" / "dir" / "c.db").exists()
    finally:
        await store.close()
