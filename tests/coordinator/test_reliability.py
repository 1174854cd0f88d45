"""Measured reliability (issue 16 part 4): a provider's 30-day record, over real websockets on
loopback against a coordinator on a real SQLite file, and the formula on its own."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from solders.keypair import Keypair
from traitlets.config import Config

from jupyter_io.coordinator.models import LeaseState
from jupyter_io.coordinator.offers import format_offers_table
from jupyter_io.coordinator.reliability import (
    PER_USER_SESSIONS,
    LinkSpan,
    SessionCounts,
    measure,
)
from jupyter_io.coordinator.server import CoordinatorServer
from jupyter_io.coordinator.store import OfferSpec, ProviderProfile, Store
from jupyter_io.coordinator_client import CoordinatorClient, CoordinatorError
from jupyter_io.errors import ConfigError, LeaseError
from jupyter_io.kernelspec import lease_kernel_json
from jupyter_io.serverext.preferences import Preferences, PreferencesError
from kernel_provisioner.provisioner import RemoteKernelProvisioner

from .conftest import WAIT, FakeProvider, Starter, gpu_offer

pytestmark = pytest.mark.timeout(60)

NOW = datetime(2026, 12, 6, 12, tzinfo=timezone.utc)


def _row(body: dict[str, object], pubkey: str) -> dict[str, object]:
    rows = body["providers"]
    assert isinstance(rows, list)
    (row,) = [r for r in rows if r["provider"] == pubkey]
    return row


async def _linked(server: CoordinatorServer, provider: FakeProvider, **kw: object) -> None:
    assert server.registry is not None
    await provider.connect(**kw)  # type: ignore[arg-type]
    registry = server.registry
    await registry.wait_for(lambda: registry.provider(provider.pubkey) is not None, WAIT)


async def test_lost_sessions_rank_below_completed_ones_and_a_minimum_skips_them(
    start_coordinator: Starter, providers: list[FakeProvider]
) -> None:
    server = await start_coordinator(heartbeat_interval=0.2, offers_cache_ttl=0.0)
    registry, store = server.registry, server.store
    assert registry is not None and store is not None
    user = CoordinatorClient(server.url, Keypair(), timeout=WAIT)
    try:
        # A cheap provider whose session is lost: its link goes silent mid-lease.
        flaky = FakeProvider(server.url, [gpu_offer(price=500_000)], region="eu-west")
        providers.append(flaky)
        await _linked(server, flaky)
        grant = await user.request_lease("RTX 4090")
        assert grant.provider == flaky.pubkey
        await flaky.session(grant.lease, "active")
        flaky.stop_heartbeats()
        await registry.wait_for(lambda: registry.provider(flaky.pubkey) is None, WAIT)
        lost = await store.get_lease(grant.lease)
        assert lost is not None and lost.state is LeaseState.FAILED

        # It links again with the same key: its record comes back with it, not a fresh 100 %.
        again = FakeProvider(
            server.url, [gpu_offer(price=500_000)], keypair=flaky.keypair, region="eu-west"
        )
        providers.append(again)
        await _linked(server, again)
        record = _row(await user.offers(), flaky.pubkey)["reliability"]
        assert isinstance(record, dict)
        assert (record["sessions"], record["lost"], record["score"]) == (1, 1, 0.0)
        assert record["uptime"] < 1.0  # silent from its last heartbeat until it relinked

        # A newcomer (a new key) has no record: "not measured", never 100 %.
        steady = FakeProvider(server.url, [gpu_offer(price=1_000_000)], region="us-east")
        providers.append(steady)
        await _linked(server, steady)
        body = await user.offers()
        assert _row(body, steady.pubkey)["reliability"] is None
        # Neither meets a minimum: one measured too low, one not measured at all.
        with pytest.raises(LeaseError, match="not measured"):
            await user.request_lease("RTX 4090", min_reliability=0.5)

        # The newcomer completes a session: now it is measured, at 100 %.
        done = await user.request_lease("RTX 4090", region="us-east")
        assert done.provider == steady.pubkey
        await steady.session(done.lease, "active")
        await steady.session(done.lease, "ended")

        def measured() -> bool:
            (offer,) = server.index.offers_of(steady.pubkey)
            return offer.reliability_measured

        await registry.wait_for(measured, WAIT)
        body = await user.offers()
        good = _row(body, steady.pubkey)["reliability"]
        bad = _row(body, flaky.pubkey)["reliability"]
        assert isinstance(good, dict) and isinstance(bad, dict)
        assert (good["sessions"], good["lost"], good["score"]) == (1, 0, 1.0)
        assert good["score"] > bad["score"]
        table = format_offers_table(body)
        assert "  50%" in table  # the type: the mean over its measured providers
        assert "100% (1 session, 0 lost" in table and "0% (1 session, 1 lost" in table

        # With a minimum the cheaper, flaky provider is skipped for the measured one.
        picked = await user.request_lease("RTX 4090", min_reliability=0.5)
        assert picked.provider == steady.pubkey
    finally:
        user.close()


async def test_leases_on_itself_do_not_count_towards_a_providers_record(store_url: str) -> None:
    store = await Store.open(store_url)
    try:
        provider = Keypair()
        pubkey = str(provider.pubkey())
        await store.upsert_provider(ProviderProfile(pubkey, "self-dealer"))
        await store.replace_offers(pubkey, [OfferSpec("RTX 4090", 24 << 30, 4, 1)])
        since = datetime.now(timezone.utc) - timedelta(days=30)
        for _ in range(3):  # the provider's own key leases, runs and ends sessions
            lease = await store.create_lease(
                user_pubkey=pubkey, provider_pubkey=pubkey, gpu_model="RTX 4090"
            )
            await store.activate_lease(lease.id)
            await store.end_lease(lease.id, "ended by the user")
        inputs = await store.reliability_inputs([pubkey], since=since)
        assert inputs[pubkey].sessions == {}  # only its link is on record
        record = inputs[pubkey]
        figure = measure(record.sessions, record.links, now=datetime.now(timezone.utc))
        assert figure is None  # still not measured

        other = str(Keypair().pubkey())
        lease = await store.create_lease(
            user_pubkey=other, provider_pubkey=pubkey, gpu_model="RTX 4090"
        )
        await store.end_lease(lease.id, "the lease token expired before the lease was used")
        inputs = await store.reliability_inputs([pubkey], since=since)
        assert inputs[pubkey].sessions == {}  # a lease whose kernel never ran is no session
    finally:
        await store.close()


async def test_the_store_records_outages_from_losses_not_goodbyes_within_the_window(
    store_url: str,
) -> None:
    day = timedelta(days=1)
    now = datetime.now(timezone.utc)
    t0 = now - 10 * day
    store = await Store.open(store_url)
    try:
        pubkey = str(Keypair().pubkey())
        profile = ProviderProfile(pubkey, "rig")
        await store.upsert_provider(profile, at=t0)
        await store.record_heartbeats({pubkey: t0 + day})
        assert await store.mark_provider_offline(pubkey, at=t0 + day)  # a goodbye: no outage
        await store.upsert_provider(profile, at=t0 + 2 * day)
        await store.record_heartbeats({pubkey: t0 + 3 * day})
        await store.mark_provider_lost(pubkey, at=t0 + 3 * day + timedelta(seconds=15))
        lost = await store.reliability_inputs([pubkey], since=now - 30 * day)
        assert lost[pubkey].lost_since == t0 + 3 * day  # an outage running now
        await store.upsert_provider(profile, at=t0 + 4 * day)  # back: the outage ends

        await store.replace_offers(pubkey, [OfferSpec("RTX 4090", 24 << 30, 1, 1)])
        old = await store.create_lease(
            user_pubkey=str(Keypair().pubkey()), provider_pubkey=pubkey, gpu_model="RTX 4090"
        )
        await store.fail_lease(old.id, "lost long ago", at=now - 31 * day)  # out of the window

        record = (await store.reliability_inputs([pubkey], since=now - 30 * day))[pubkey]
        assert record.sessions == {} and record.lost_since is None
        assert [(link.linked_at, link.closed_at, link.down_since) for link in record.links] == [
            (t0, t0 + day, None),
            (t0 + 2 * day, t0 + 3 * day, None),
            (t0 + 4 * day, None, t0 + 3 * day),
        ]
        figure = measure(record.sessions, record.links, now=now)
        assert figure is not None and figure.sessions == 0
        # Up 1 + 1 + 6 days, down 1 (the loss); the day offline after the goodbye is neither.
        assert figure.uptime == pytest.approx(8 / 9) and figure.score == pytest.approx(8 / 9)
        # Links closed before any window are pruned; the open and recent ones stay.
        assert await store.prune_provider_links(t0 + day + timedelta(seconds=1)) == 1
        # Linking again while online continues the open link (a reconnect adds no row), and
        # so does linking within a minute of a goodbye; many providers at once open one each.
        minute = timedelta(minutes=1)
        other = ProviderProfile(str(Keypair().pubkey()), "other")
        assert await store.upsert_providers([profile, other], at=now - 2 * minute) == 2
        await store.record_heartbeats({pubkey: now - minute})
        assert await store.mark_provider_offline(pubkey, at=now - minute)
        await store.upsert_provider(profile, at=now - minute + timedelta(seconds=30))
        both = await store.reliability_inputs([pubkey, other.pubkey], since=now - 30 * day)
        assert [(link.linked_at, link.closed_at) for link in both[pubkey].links] == [
            (t0 + 2 * day, t0 + 3 * day),
            (t0 + 4 * day, None),
        ]
        assert [link.linked_at for link in both[other.pubkey].links] == [now - 2 * minute]
    finally:
        await store.close()


def test_one_user_cannot_outvote_the_others() -> None:
    sessions = {
        "sockpuppet": SessionCounts(completed=50, lost=0),
        "someone": SessionCounts(completed=0, lost=1),
    }
    figure = measure(sessions, [], now=NOW)
    assert figure is not None and (figure.sessions, figure.lost) == (51, 1)
    # The 50 count as PER_USER_SESSIONS: 5 of 6, not 50 of 51.
    assert figure.score == pytest.approx(PER_USER_SESSIONS / (PER_USER_SESSIONS + 1))


def test_no_record_is_not_measured_and_outages_count_against_uptime() -> None:
    day = timedelta(days=1)
    assert measure({}, [], now=NOW) is None
    # Linked for 9 days with no session and no loss: nothing measured yet.
    assert measure({}, [LinkSpan(NOW - 9 * day, None, None)], now=NOW) is None
    # Lost for a day between two links of 4 days each: uptime 8/9, the score with it.
    links = [
        LinkSpan(NOW - 9 * day, NOW - 5 * day, None),
        LinkSpan(NOW - 4 * day, None, NOW - 5 * day),
    ]
    figure = measure({"u": SessionCounts(3, 0)}, links, now=NOW)
    assert figure is not None
    assert figure.uptime == pytest.approx(8 / 9) and figure.score == pytest.approx(8 / 9)
    assert figure.since == NOW - 9 * day
    # The window rolls: sessions and links older than 30 days are the store's to leave out,
    # and an outage that began before the window counts only from its start.
    old = [LinkSpan(NOW - 2 * day, None, NOW - 40 * day)]
    figure = measure({}, old, now=NOW)
    assert figure is not None and figure.uptime == pytest.approx(2 / 30)
    assert figure.since == NOW - timedelta(days=30)


def test_a_minimum_travels_from_lab_preferences_through_the_kernelspec_to_the_request() -> None:
    prefs = Preferences().updated({"min_reliability": 0.95})
    assert prefs.to_json()["min_reliability"] == 0.95 and prefs.stored()["min_reliability"] == 0.95
    assert Preferences().updated({"min_reliability": 0}).min_reliability is None  # 0: any
    with pytest.raises(PreferencesError, match=r"min_reliability must be a number in 0\.\.1"):
        Preferences().updated({"min_reliability": 95})
    spec = lease_kernel_json(
        "http://c:8700", "/k.json", "RTX 4090", min_reliability=prefs.min_reliability or 0
    )
    config = spec["metadata"]["kernel_provisioner"]["config"]
    assert config["min_reliability"] == 0.95
    prov = RemoteKernelProvisioner(config=Config({"RemoteKernelProvisioner": config}))
    assert prov.lease_terms.min_reliability == 0.95
    assert "reliability ≥ 95%" in prov.lease_terms.describe()
    with pytest.raises(ConfigError, match=r"min_reliability must lie in 0\.\.1"):
        RemoteKernelProvisioner(min_reliability=2.0)


@pytest.mark.parametrize("bad", [1.5, -0.1, "0.9", True])
async def test_a_bad_minimum_is_refused_with_what_to_send(
    coordinator: CoordinatorServer, user_client: CoordinatorClient, bad: object
) -> None:
    with pytest.raises(CoordinatorError, match=r"'min_reliability' must be a number in 0\.\.1"):
        await user_client._call(
            "POST", "/api/v1/leases", {"gpu": "RTX 4090", "min_reliability": bad}, sign=True
        )
