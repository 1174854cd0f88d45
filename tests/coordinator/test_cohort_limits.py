"""A cohort's time rules (issue 14.3) on a real store and registry: idle stop when either
party says idle (a lying student cannot keep the kernel), warnings a minute (here: the
configured window) before, the max session length. Timeouts are short, set per test; every
wait is on an event (the watch's check listener, the registry's lease listener), bounded."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import pytest
from solders.keypair import Keypair
from solders.pubkey import Pubkey

from jupyter_io.cohort_client import CohortClient
from jupyter_io.coordinator.cohort_limits import (
    MAX_LENGTH_REACHED,
    PARTY_PROVIDER,
    PARTY_USER,
    CohortLimits,
    SessionRules,
    idle_reason,
    last_activity,
)
from jupyter_io.coordinator.registry import Registry
from jupyter_io.coordinator.scheduler import OfferIndex
from jupyter_io.coordinator.store import LeaseRecord, OfferSpec, ProviderProfile, Store
from jupyter_io.coordinator_client import CoordinatorClient
from jupyter_io.signing import sign_usage
from jupyter_io.usage_acks import UsageAck

from .conftest import FakeProvider, Starter, gpu_offer

pytestmark = pytest.mark.timeout(60)
WAIT = 10.0
COHORT = "c_" + "A" * 16


def new_key() -> str:
    return str(Pubkey(secrets.token_bytes(32)))


@dataclass
class Rig:
    store: Store
    registry: Registry
    ended: dict[str, asyncio.Future[str]]
    checks: asyncio.Queue[str]

    async def active_lease(self, ago: float = 0.0) -> LeaseRecord:
        """A cohort lease, active since ``ago`` seconds."""
        provider = new_key()
        await self.store.upsert_provider(ProviderProfile(provider, "rig", "eu", None))
        await self.store.replace_offers(
            provider, [OfferSpec("Tesla T4", 16 << 30, 1, 1000, simulated=True, gpu_indices=(0,))]
        )
        lease = await self.store.create_lease(
            user_pubkey=new_key(), provider_pubkey=provider, gpu_model="Tesla T4",
            cohort_id=COHORT,
        )  # fmt: skip
        await self.store.activate_lease(
            lease.id, at=datetime.fromtimestamp(time.time() - ago, tz=timezone.utc)
        )
        active = await self.store.get_lease(lease.id)
        assert active is not None
        self.ended[lease.id] = asyncio.get_running_loop().create_future()
        return active

    async def next_check(self, lease_id: str) -> None:
        while await asyncio.wait_for(self.checks.get(), WAIT) != lease_id:
            pass


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'c.db'}")
    registry = Registry(store, OfferIndex(), coordinator=Keypair().pubkey())
    ended: dict[str, asyncio.Future[str]] = {}

    def gone(lease_id: str, reason: str) -> None:
        future = ended.get(lease_id)
        if future is not None and not future.done():
            future.set_result(reason)

    registry.lease_listeners.append(gone)
    try:
        yield Rig(store, registry, ended, asyncio.Queue())
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def watching(rig: Rig, rules: SessionRules, warning: float) -> AsyncIterator[CohortLimits]:
    async def lookup(cohort: str) -> SessionRules | None:
        return rules if cohort == COHORT else None

    limits = CohortLimits(rig.store, rig.registry, lookup, warning=warning)
    limits.checked.append(rig.checks.put_nowait)
    await limits.start()
    try:
        yield limits
    finally:
        await limits.stop()


async def test_idle_when_either_party_says_idle_a_lying_student_cannot_keep_it(rig: Rig) -> None:
    async with watching(rig, SessionRules(idle_timeout=0.8, max_session=None), 0.5) as limits:
        lease = await rig.active_lease()
        limits.watch(lease)
        await rig.next_check(lease.id)
        assert limits.view(lease.id) == {"warnings": [], "ends_at": None}  # nobody reported
        ran = time.time()
        limits.activity(lease.id, PARTY_PROVIDER, 0)  # the provider: it ran a cell just now

        async def student_claims_activity() -> None:
            tick = 0
            while True:  # the student's client keeps saying "busy"
                limits.activity(lease.id, PARTY_USER, 0)
                if tick % 2:  # the host reports on its interval: idle since that cell
                    limits.activity(lease.id, PARTY_PROVIDER, time.time() - ran)
                tick += 1
                await asyncio.sleep(0.05)

        liar = asyncio.create_task(student_claims_activity())
        try:
            reason = await asyncio.wait_for(rig.ended[lease.id], WAIT)
        finally:
            liar.cancel()
        assert reason == idle_reason(0.8)
        ended = await rig.store.get_lease(lease.id)
        assert ended is not None and ended.end_reason == idle_reason(0.8) and not ended.live
        assert limits.ended_idle == 1


async def test_a_cell_run_after_a_party_s_last_report_is_not_stopped_on_it(rig: Rig) -> None:
    """The student's last ack said idle 25 s of 30 (their acks come every 15 s); they run a
    cell right after it, which the provider reports: the kernel is busy, and the student's
    earlier word (idle since before that cell) no longer counts against it. Their next ack
    counts again."""
    async with watching(rig, SessionRules(idle_timeout=30, max_session=None), 10) as limits:
        lease = await rig.active_lease(ago=100)
        limits.watch(lease)
        await rig.next_check(lease.id)
        limits.activity(lease.id, PARTY_USER, 25)
        assert limits.view(lease.id)["warnings"][0]["kind"] == "idle"
        limits.activity(lease.id, PARTY_PROVIDER, 0)  # the cell the student just ran
        view = limits.view(lease.id)
        assert view["warnings"] == [] and view["ends_at"] == pytest.approx(time.time() + 30, 1)
        assert limits.idle_seconds(lease.id) == pytest.approx(0, abs=1)
        # A party's newer word counts again: the student says idle 29 s (a lie or a clock):
        # the provider's activity is older than that report, so the earliest counts.
        limits.activity(lease.id, PARTY_USER, 29)
        assert limits.view(lease.id)["ends_at"] == pytest.approx(time.time() + 1, abs=1)
        assert not rig.ended[lease.id].done()


def test_last_activity_is_the_latest_no_party_contradicts() -> None:
    # Both reports current: the earliest activity (either party's idle word suffices).
    assert last_activity({"u": 10, "p": 50}, {"u": 60, "p": 60}) == 10
    # The user last spoke at 40: activity the provider saw at 50 is after it.
    assert last_activity({"u": 10, "p": 50}, {"u": 40, "p": 60}) == 50
    # A liar's activity claim after the provider's last report stands until it reports.
    assert last_activity({"u": 70, "p": 5}, {"u": 70, "p": 60}) == 70
    assert last_activity({"u": 70, "p": 5}, {"u": 70, "p": 75}) == 5
    assert last_activity({"p": 12}, {"p": 40}) == 12


async def test_the_idle_warning_comes_first_and_activity_clears_it(rig: Rig) -> None:
    async with watching(rig, SessionRules(idle_timeout=30, max_session=None), 10) as limits:
        lease = await rig.active_lease(ago=100)
        limits.watch(lease)
        await rig.next_check(lease.id)
        limits.activity(lease.id, PARTY_USER, 25)  # idle 25 s: 5 s left, within the warning
        view = limits.view(lease.id)
        (warning,) = view["warnings"]
        assert warning["kind"] == "idle" and "run a cell to keep it" in warning["message"]
        assert view["ends_at"] == pytest.approx(warning["at"])
        limits.activity(lease.id, PARTY_USER, 0)  # the student ran a cell
        view = limits.view(lease.id)
        assert view["warnings"] == [] and view["ends_at"] == pytest.approx(warning["at"] + 25, 1)
        assert not rig.ended[lease.id].done()


async def test_a_session_ends_at_the_max_length_with_a_warning(rig: Rig) -> None:
    async with watching(rig, SessionRules(idle_timeout=None, max_session=1.0), 0.6) as limits:
        lease = await rig.active_lease()
        limits.watch(lease)
        await rig.next_check(lease.id)
        view = limits.view(lease.id)
        assert view["ends_at"] == pytest.approx(lease.active_at.timestamp() + 1.0)  # type: ignore[union-attr]
        reason = await asyncio.wait_for(rig.ended[lease.id], WAIT)
        assert reason == MAX_LENGTH_REACHED and limits.ended_max_length == 1


async def test_leases_of_no_cohort_are_not_watched(rig: Rig) -> None:
    async with watching(rig, SessionRules(idle_timeout=0.1, max_session=0.1), 0.05) as limits:
        lease = await rig.active_lease()
        limits.watch(replace(lease, cohort_id=None))
        limits.activity(lease.id, PARTY_PROVIDER, 100)
        assert limits.view(lease.id) == {"warnings": [], "ends_at": None}
        assert rig.checks.empty() and not rig.ended[lease.id].done()


async def test_through_the_coordinator_the_ack_warns_and_the_idle_kernel_stops(
    start_coordinator: Starter, providers: list[FakeProvider]
) -> None:
    server = await start_coordinator(cohort_warning_seconds=100.0)
    provider = FakeProvider(server.url, [gpu_offer("Tesla T4", count=1)])
    providers.append(provider)
    await provider.connect()
    assert server.registry is not None and server.store is not None
    await server.registry.wait_for(lambda: len(server.index) == 1, WAIT)
    instructor = CohortClient(server.url, Keypair(), timeout=WAIT)
    student = CoordinatorClient(server.url, Keypair(), timeout=WAIT)
    try:
        view = await instructor.create(
            name="lab", gpu_types=["T4"], max_price_lamports_per_hour=10**7,
            term_ends_at=time.time() + 86400,
        )  # fmt: skip
        await instructor.add_students(view.id, [str(student.keypair.pubkey())])  # type: ignore[union-attr]
        # Shorter than the API allows (60 s): set in the store, as a test may.
        await server.store.update_cohort(view.id, idle_timeout_seconds=2)
        grant = await student.request_lease("T4", cohort=view.id)
        assert server.cohort_scheduling is not None
        checked: asyncio.Queue[str] = asyncio.Queue()
        server.cohort_scheduling.limits.checked.append(checked.put_nowait)
        await provider.session(grant.lease, "active")
        assert await asyncio.wait_for(checked.get(), WAIT) == grant.lease  # watched now
        # The provider's signed report may carry idle_seconds (stored: the signature holds).
        fields = {"type": "usage", "lease": grant.lease, "seq": 1, "seconds": 0,
                  "gpu_utilisation": None, "at": time.time(), "idle_seconds": 0}  # fmt: skip
        await provider.send(sign_usage(provider.keypair, fields))
        await student.acknowledge_usage(UsageAck(grant.lease, 0, idle_seconds=0))
        info = await student.get_lease(grant.lease)
        assert [w["kind"] for w in info.warnings] == ["idle"] and info.ends_at is not None
        end = await provider.next_message("end")
        assert end["lease"] == grant.lease and end["reason"].startswith("idle for ")
        ended = await student.get_lease(grant.lease)
        assert ended.state == "ended" and ended.end_reason == end["reason"]
    finally:
        instructor.close()
        student.close()
