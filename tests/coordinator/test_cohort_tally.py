"""The term's spend of a cohort without reading every lease each time
(jupyter_io.coordinator.cohort_tally), on a real SQLite file and a real PostgreSQL database:
the sum always equals a full read of the cohort's leases, a finished lease's row is read
once, and a lease that finishes between the tally's two reads is counted once."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone

import pytest
from solders.pubkey import Pubkey

from jupyter_io.cohorts import CohortSettings, new_cohort_id
from jupyter_io.coordinator.cohort_tally import FinishedLeaseTally
from jupyter_io.coordinator.store import LeaseRecord, OfferSpec, ProviderProfile, Store
from jupyter_io.coordinator.store.cohorts import lease_cost

pytestmark = pytest.mark.timeout(90)

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)


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


async def full_read(store: Store, cohort_id: str, now: datetime) -> int:
    """What the dashboard summed before: every lease of the term, read again."""
    return sum(
        lease_cost(lease, T0, now) for lease in await store.cohort_leases_since(cohort_id, T0)
    )


async def test_the_tally_equals_a_full_read_and_reads_each_finished_lease_once(
    store: Store,
) -> None:
    provider = new_key()
    await store.upsert_provider(ProviderProfile(provider, "rig", "eu"), at=T0)
    await store.replace_offers(provider, [OfferSpec("T4", 16 << 30, 8, 3_600_000)])
    settings = CohortSettings(
        name="lab", gpu_types=("T4",), max_price_lamports_per_hour=10**7,
        term_ends_at=(T0 + timedelta(days=90)).timestamp(),
    )  # fmt: skip
    cohort = await store.create_cohort(
        instructor=new_key(), settings=settings, cohort_id=new_cohort_id(), at=T0
    )
    other = await store.create_cohort(
        instructor=new_key(), settings=settings, cohort_id=new_cohort_id(), at=T0
    )

    async def lease(start: float, gpus: int = 1, cohort_id: str = cohort.id) -> LeaseRecord:
        made = await store.create_lease(
            user_pubkey=new_key(), provider_pubkey=provider, gpu_model="T4", gpu_count=gpus,
            cohort_id=cohort_id, at=at(start - 5),
        )  # fmt: skip
        await store.activate_lease(made.id, at=at(start))
        return made

    ended = await lease(10, gpus=2)
    await store.end_lease(ended.id, "done", at=at(610))
    failed = await lease(20)
    await store.fail_lease(failed.id, "provider lost", at=at(100), end_of_service=at(50))
    running = await lease(30)
    await store.create_lease(user_pubkey=new_key(), provider_pubkey=provider, gpu_model="T4",
                             cohort_id=cohort.id, at=at(40))  # fmt: skip  # never started
    stranger = await lease(0, cohort_id=other.id)  # another class's: not counted
    await store.end_lease(stranger.id, "done", at=at(5000))

    tally = FinishedLeaseTally(store)
    now = at(1000)
    first = await tally.cost_since(cohort.id, T0, now)
    # 2 GPUs x 600 s + 30 s + 970 s running, at 1,000 lamports a GPU-second.
    assert first == await full_read(store, cohort.id, now) == (1200 + 30 + 970) * 1000
    assert tally.rows_read == 2  # the two finished leases
    # Nothing finished since: no row read again; the running lease's cost goes on.
    now = at(2000)
    assert await tally.cost_since(cohort.id, T0, now) == await full_read(store, cohort.id, now)
    assert tally.rows_read == 2
    # The running lease ends and a new one runs and ends: their two rows are read.
    await store.end_lease(running.id, "done", at=at(2100))
    late = await lease(2200, gpus=4)
    await store.end_lease(late.id, "done", at=at(2300))
    now = at(3000)
    assert await tally.cost_since(cohort.id, T0, now) == await full_read(store, cohort.id, now)
    assert tally.rows_read == 4


async def test_a_lease_that_finishes_between_the_two_reads_counts_once(store: Store) -> None:
    provider = new_key()
    await store.upsert_provider(ProviderProfile(provider, "rig", "eu"), at=T0)
    await store.replace_offers(provider, [OfferSpec("T4", 16 << 30, 8, 3_600_000)])
    settings = CohortSettings(
        name="lab", gpu_types=("T4",), max_price_lamports_per_hour=10**7,
        term_ends_at=(T0 + timedelta(days=90)).timestamp(),
    )  # fmt: skip
    cohort = await store.create_cohort(
        instructor=new_key(), settings=settings, cohort_id=new_cohort_id(), at=T0
    )
    running = await store.create_lease(
        user_pubkey=new_key(), provider_pubkey=provider, gpu_model="T4", cohort_id=cohort.id,
        at=at(0),
    )  # fmt: skip
    await store.activate_lease(running.id, at=at(10))
    live_leases = store.cohort_live_leases

    async def then_it_ends(cohort_id: str) -> list[LeaseRecord]:
        found = await live_leases(cohort_id)
        await store.end_lease(running.id, "done", at=at(400))  # after the live read
        return found

    store.cohort_live_leases = then_it_ends  # type: ignore[method-assign]
    now = at(1000)
    spent = await FinishedLeaseTally(store).cost_since(cohort.id, T0, now)
    assert spent == await full_read(store, cohort.id, now) == 390 * 1000


async def test_a_funded_lease_costs_what_its_settlement_paid_once_it_is_done(store: Store) -> None:
    """Billing counts fewer seconds than the lease was active when the provider reported
    fewer (or the user acknowledged fewer): the pool paid the settled amount, on-chain, and
    that is the term's spend. Until the settlement is done the observed cost stands, and is
    not kept: the done amount replaces it."""
    provider = new_key()
    await store.upsert_provider(ProviderProfile(provider, "rig", "eu"), at=T0)
    await store.replace_offers(provider, [OfferSpec("T4", 16 << 30, 8, 3_600_000)])
    settings = CohortSettings(
        name="lab", gpu_types=("T4",), max_price_lamports_per_hour=10**7,
        term_ends_at=(T0 + timedelta(days=90)).timestamp(),
    )  # fmt: skip
    cohort = await store.create_cohort(
        instructor=new_key(), settings=settings, cohort_id=new_cohort_id(), at=T0
    )
    made = await store.create_lease(
        user_pubkey=new_key(), provider_pubkey=provider, gpu_model="T4", cohort_id=cohort.id,
        at=at(0),
    )  # fmt: skip
    await store.record_escrow(
        made.id, address=new_key(), deposit_lamports=10**9, signature=None, at=at(1)
    )
    await store.activate_lease(made.id, at=at(10))
    await store.end_lease(made.id, "done", at=at(110))  # 100 s active: 100,000 observed
    assert await store.enqueue_settlements(at=at(110)) == [made.id]
    tally = FinishedLeaseTally(store)
    now = at(1000)
    assert await tally.cost_since(cohort.id, T0, now) == 100_000  # not settled yet
    claimed = await store.claim_settlement(made.id, "me", until=at(200), at=at(120))
    assert claimed
    await store.finish_settlement(made.id, signature="sig", amount_lamports=97_000, at=at(130))
    assert await tally.cost_since(cohort.id, T0, now) == 97_000  # 97 s billed and paid
    assert await tally.cost_since(cohort.id, T0, now) == 97_000
    assert tally.rows_read == 2  # read again once, then kept
