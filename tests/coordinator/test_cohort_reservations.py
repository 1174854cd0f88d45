"""Reservations (issue 14.3): during a cohort's reservation window the scheduler keeps its
unused reserved GPUs from everyone else, and the cohort itself can still use them."""

from __future__ import annotations

import asyncio
import secrets
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from solders.keypair import Keypair
from solders.pubkey import Pubkey

from jupyter_io.cohort_client import CohortClient
from jupyter_io.cohorts import CohortSettings, new_cohort_id
from jupyter_io.coordinator.cohort_reservations import Reservations, parse_reservation
from jupyter_io.coordinator.scheduler import LeaseRequest, Offer, OfferIndex, schedule
from jupyter_io.coordinator.store import OfferSpec, ProviderProfile, Store
from jupyter_io.coordinator_client import CoordinatorClient
from jupyter_io.errors import AuthError, LeaseError

from .conftest import WAIT, FakeProvider, Starter, gpu_offer

GIB = 1 << 30


def _t4(provider: str, free: int) -> Offer:
    return Offer(provider, "Tesla T4", 16 * GIB, 4, free, 1000, "eu-west")


def test_held_gpus_are_taken_for_everyone_but_their_cohort() -> None:
    index = OfferIndex([_t4("p1", 2), _t4("p2", 1)])
    index.hold("c_class", "T4", 2)
    request = LeaseRequest(gpu="T4")
    assert schedule(index, request).gpu == "Tesla T4"  # 3 free, 2 held: one left for others
    index.reserve("p2", "T4", 1)
    with pytest.raises(LeaseError, match="reserved for a class"):
        schedule(index, request)
    assert schedule(index, request, cohort="c_class").provider == "p1"
    with pytest.raises(LeaseError, match="reserved for a class"):
        schedule(index, request, cohort="c_other")
    assert index.held("T4") == 2 and index.held("t4", "c_class") == 0
    index.hold("c_class", "T4", 0)  # the window closed
    assert schedule(index, request).provider == "p1"


def test_holds_leave_other_models_alone() -> None:
    a100 = Offer("p3", "A100", 80 * GIB, 1, 1, 5000, "eu-west")
    index = OfferIndex([_t4("p1", 1), a100])
    index.hold("c_class", "T4", 1)
    assert schedule(index, LeaseRequest()).gpu == "A100"  # no type named: the T4 is held
    assert schedule(index, LeaseRequest(), cohort="c_class").gpu == "Tesla T4"


async def test_the_holds_follow_the_window_and_the_cohorts_own_leases(tmp_path: Path) -> None:
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'r.db'}")
    try:
        now = time.time()
        cohort = new_cohort_id()
        settings = CohortSettings("lab", ("T4",), 10**6, now + 86400)
        await store.create_cohort(instructor=_key(), settings=settings, cohort_id=cohort)
        await store.add_reservation(
            cohort, gpu="T4", count=2, starts_at=_utc(now - 1), ends_at=_utc(now + 2.0)
        )
        index = OfferIndex([_t4("p1", 3)])
        changed: asyncio.Queue[None] = asyncio.Queue()
        reservations = Reservations(store, index, on_change=lambda: changed.put_nowait(None))
        await reservations.start()
        assert index.held("T4") == 2 and reservations.open_cohorts() == {cohort}
        await asyncio.wait_for(changed.get(), 5)
        # The class's own lease of a T4 uses one of its reserved GPUs: one stays held.
        provider = _key()
        await store.upsert_provider(ProviderProfile(provider, "rig", "eu", None))
        await store.replace_offers(
            provider, [OfferSpec("Tesla T4", 16 << 30, 1, 1000, simulated=True, gpu_indices=(0,))]
        )
        await store.create_lease(
            user_pubkey=_key(), provider_pubkey=provider, gpu_model="Tesla T4", cohort_id=cohort
        )
        await reservations.recount(cohort)
        assert index.held("T4") == 1
        await asyncio.wait_for(changed.get(), 5)
        # The window closes: the hold goes, on the boundary's timer.
        await asyncio.wait_for(changed.get(), 5)
        assert index.held("T4") == 0 and reservations.open_cohorts() == set()
        await reservations.stop()
    finally:
        await store.close()


def test_a_reservation_request_is_checked() -> None:
    now = 1_000_000.0
    good = {"gpu": "T4", "count": 30, "starts_at": now + 3600, "ends_at": now + 3 * 3600}
    assert parse_reservation(good, now=now).count == 30
    for bad, why in (
        ({**good, "count": 0}, "count"),
        ({**good, "gpu": ""}, "gpu"),
        ({**good, "ends_at": now + 1800}, "after"),
        ({**good, "ends_at": now + 30 * 3600}, "24 hours"),
        ({**good, "extra": 1}, "unknown"),
        ([], "body"),
    ):
        with pytest.raises(ValueError, match=why):
            parse_reservation(bad, now=now)


def _key() -> str:
    return str(Pubkey(secrets.token_bytes(32)))


def _utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=timezone.utc)


async def test_a_reserved_gpu_is_the_class_s_during_its_window(
    start_coordinator: Starter, providers: list[FakeProvider]
) -> None:
    server = await start_coordinator()
    provider = FakeProvider(server.url, [gpu_offer("Tesla T4", count=1)])
    providers.append(provider)
    await provider.connect()
    assert server.registry is not None
    await server.registry.wait_for(lambda: len(server.index) == 1, WAIT)
    instructor = CohortClient(server.url, Keypair(), timeout=WAIT)
    student = CoordinatorClient(server.url, Keypair(), timeout=WAIT)
    stranger = CoordinatorClient(server.url, Keypair(), timeout=WAIT)
    try:
        now = time.time()
        view = await instructor.create(
            name="lab", gpu_types=["T4"], max_price_lamports_per_hour=10**7,
            term_ends_at=now + 86400,
        )  # fmt: skip
        await instructor.add_students(view.id, [str(student.keypair.pubkey())])  # type: ignore[union-attr]
        path = f"/api/v1/cohorts/{view.id}/reservations"
        body = {"gpu": "T4", "count": 1, "starts_at": now - 60, "ends_at": now + 3600}
        with pytest.raises(AuthError, match="instructors"):
            await stranger._call("POST", path, body, sign=True)
        made = await instructor._call("POST", path, body, sign=True)
        assert made["count"] == 1 and made["id"].startswith("r_")
        listed = await instructor._call("GET", path, sign=True)
        assert [r["id"] for r in listed["reservations"]] == [made["id"]]
        # Anyone else finds the class's T4 taken; the class's student gets it.
        with pytest.raises(LeaseError, match="reserved for a class"):
            await stranger.request_lease("T4")
        grant = await student.request_lease("T4", cohort=view.id)
        assert grant.gpu == "Tesla T4"
        await student.end_lease(grant.lease)
        await instructor._call("DELETE", f"{path}/{made['id']}", sign=True)
        assert (await stranger.request_lease("T4")).gpu == "Tesla T4"  # released
    finally:
        for client in (instructor, student, stranger):
            client.close()


async def test_a_class_without_a_type_named_gets_its_own_reserved_gpu(
    start_coordinator: Starter, providers: list[FakeProvider]
) -> None:
    server = await start_coordinator()
    offers = [gpu_offer("Tesla T4", price=1000), gpu_offer("A100", price=9000, first_index=1)]
    provider = FakeProvider(server.url, offers)
    providers.append(provider)
    await provider.connect()
    assert server.registry is not None
    await server.registry.wait_for(lambda: len(server.index) == 2, WAIT)
    instructor = CohortClient(server.url, Keypair(), timeout=WAIT)
    student = CoordinatorClient(server.url, Keypair(), timeout=WAIT)
    try:
        now = time.time()
        view = await instructor.create(
            name="lab", gpu_types=["T4", "A100"], max_price_lamports_per_hour=10**7,
            term_ends_at=now + 86400,
        )  # fmt: skip
        await instructor.add_students(view.id, [str(student.keypair.pubkey())])  # type: ignore[union-attr]
        body = {"gpu": "T4", "count": 1, "starts_at": now - 60, "ends_at": now + 3600}
        await instructor._call("POST", f"/api/v1/cohorts/{view.id}/reservations", body, sign=True)
        # The cheapest covered type is the class's reserved T4, free for the class itself.
        assert (await student.request_lease(cohort=view.id)).gpu == "Tesla T4"
    finally:
        instructor.close()
        student.close()
