"""The cohort tables through the store, on a real SQLite file and a real PostgreSQL database:
cohorts and roles, members (a removed student stays removed for codes, comes back by
roster), join codes (expiry, revocation, use limits, counted once), the week's GPU-seconds
measured from the leases, and leases recording their cohort."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from alembic import command
from solders.pubkey import Pubkey

from jupyter_io.cohorts import CohortSettings, new_cohort_id, new_join_code
from jupyter_io.coordinator.models import CohortState
from jupyter_io.coordinator.store import (
    CodeRefused,
    OfferSpec,
    ProviderProfile,
    Store,
    alembic_config,
    make_engine,
    migration_transaction,
    upgrade_database,
)
from jupyter_io.coordinator.store.cohorts import environment_sha256, gpu_seconds, lease_cost

pytestmark = pytest.mark.timeout(90)

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)  # a Monday
GIB = 1 << 30


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def new_key() -> str:
    return str(Pubkey(secrets.token_bytes(32)))


def settings(**changes: object) -> CohortSettings:
    values: dict[str, object] = {
        "name": "CS229",
        "gpu_types": ("T4",),
        "max_price_lamports_per_hour": 2_000_000,
        "term_ends_at": (T0 + timedelta(days=90)).timestamp(),
    }
    values.update(changes)
    return CohortSettings(**values)  # type: ignore[arg-type]


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    opened = await Store.open(store_url)
    try:
        yield opened
    finally:
        await opened.close()


async def test_cohorts_roles_and_settings(store: Store) -> None:
    teacher, helper, student, stranger = (new_key() for _ in range(4))
    cohort = await store.create_cohort(
        instructor=teacher,
        settings=settings(requirements="numpy==2.1\n"),
        cohort_id=new_cohort_id(),
        at=T0,
    )
    assert cohort.state is CohortState.ACTIVE and cohort.gpu_types == ("T4",)
    assert cohort.environment_sha256 == environment_sha256("numpy==2.1\n")
    assert await store.cohort_environment(cohort.environment_sha256 or "") == "numpy==2.1\n"
    assert await store.add_instructor(cohort.id, helper, at=at(1))
    assert not await store.add_instructor(cohort.id, helper, at=at(2))
    assert await store.add_members(cohort.id, [student, student], at=at(3)) == ([student], [])

    roles = {key: [(c.id, role) for c, role in await store.cohorts_of(key)] for key in
             (teacher, helper, student, stranger)}  # fmt: skip
    assert roles == {
        teacher: [(cohort.id, "instructor")],
        helper: [(cohort.id, "co_instructor")],
        student: [(cohort.id, "student")],
        stranger: [],
    }
    changed = await store.update_cohort(
        cohort.id, quota_gpu_seconds_per_week=7200, gpu_types=("T4", "A100"), requirements=None
    )
    assert changed is not None and changed.quota_gpu_seconds_per_week == 7200
    assert changed.gpu_types == ("T4", "A100") and changed.environment_sha256 is None
    assert await store.remove_instructor(cohort.id, helper)
    assert await store.cohorts_of(helper) == []

    code = await store.create_code(cohort.id, new_join_code(), expires_at=at(3600), at=T0)
    assert await store.end_cohort(cohort.id, at=at(10))
    assert not await store.end_cohort(cohort.id, at=at(11))
    ended = await store.get_cohort(cohort.id)
    assert ended is not None and ended.state is CohortState.ENDED and ended.ended_at == at(10)
    assert [c.revoked for c in await store.codes(cohort.id)] == [True]
    with pytest.raises(CodeRefused) as refused:
        await store.redeem_code(code.code, new_key(), at=at(20))
    assert refused.value.reason == "ended"


async def test_codes_expire_revoke_count_uses_and_removed_students_stay_out(store: Store) -> None:
    cohort = await store.create_cohort(
        instructor=new_key(), settings=settings(), cohort_id=new_cohort_id(), at=T0
    )
    once = await store.create_code(
        cohort.id, new_join_code(), expires_at=at(600), max_uses=1, at=T0
    )
    first, second = new_key(), new_key()
    joined, fresh = await store.redeem_code(once.code, first, at=at(1))
    assert joined.id == cohort.id and fresh
    # The same student again: a member already, no use counted, no refusal.
    assert (await store.redeem_code(once.code, first, at=at(2)))[1] is False
    with pytest.raises(CodeRefused) as used_up:
        await store.redeem_code(once.code, second, at=at(3))
    assert used_up.value.reason == "used_up"

    lasting = await store.create_code(cohort.id, new_join_code(), expires_at=at(600), at=T0)
    with pytest.raises(CodeRefused) as expired:
        await store.redeem_code(lasting.code, second, at=at(600))
    assert expired.value.reason == "expired" and "ask your instructor" in str(expired.value)
    assert await store.revoke_code(cohort.id, lasting.code)
    with pytest.raises(CodeRefused) as revoked:
        await store.redeem_code(lasting.code, second, at=at(5))
    assert revoked.value.reason == "revoked"
    with pytest.raises(CodeRefused) as unknown:
        await store.redeem_code("ABCDEFGHJK", second, at=at(5))
    assert unknown.value.reason == "unknown"

    # Removed: a code does not bring the student back; the instructor's roster does.
    open_code = await store.create_code(cohort.id, new_join_code(), expires_at=at(600), at=T0)
    assert await store.remove_member(cohort.id, first, at=at(6))
    assert not await store.is_member(cohort.id, first)
    with pytest.raises(CodeRefused) as removed:
        await store.redeem_code(open_code.code, first, at=at(7))
    assert removed.value.reason == "removed"
    assert await store.add_members(cohort.id, [first, second], at=at(8)) == ([first, second], [])
    assert await store.is_member(cohort.id, first)
    assert {m.student for m in await store.members(cohort.id)} == {first, second}
    assert len(await store.members(cohort.id, include_removed=True)) == 2
    assert await store.member_count(cohort.id) == 2


async def test_codes_with_one_use_left_admit_one_of_two_racing_students(store: Store) -> None:
    cohort = await store.create_cohort(
        instructor=new_key(), settings=settings(), cohort_id=new_cohort_id(), at=T0
    )
    code = await store.create_code(
        cohort.id, new_join_code(), expires_at=at(600), max_uses=1, at=T0
    )
    results = await asyncio.gather(
        *(store.redeem_code(code.code, new_key(), at=at(1)) for _ in range(4)),
        return_exceptions=True,
    )
    assert sum(1 for r in results if not isinstance(r, BaseException)) == 1
    assert all(isinstance(r, CodeRefused) for r in results if isinstance(r, BaseException))
    assert await store.member_count(cohort.id) == 1


async def test_week_usage_counts_gpu_seconds_of_the_cohort_leases_only(store: Store) -> None:
    provider = new_key()
    await store.upsert_provider(ProviderProfile(provider, "rig", "eu"), at=T0)
    await store.replace_offers(provider, [OfferSpec("T4", 16 * GIB, 4, 3_600_000)])
    cohort = await store.create_cohort(
        instructor=new_key(), settings=settings(), cohort_id=new_cohort_id(), at=T0
    )
    alice, bob = new_key(), new_key()
    # Alice: 2 GPUs from the previous week into this one; only this week's part counts.
    two = await store.create_lease(
        user_pubkey=alice, provider_pubkey=provider, gpu_model="T4", gpu_count=2,
        cohort_id=cohort.id, at=at(-11 * 3600),
    )  # fmt: skip
    assert two.cohort_id == cohort.id
    await store.activate_lease(two.id, at=at(-10 * 3600))  # Sunday 23:00
    await store.end_lease(two.id, "done", at=at(600))
    # Bob: one GPU, still running; a lease of his own (no cohort) is not counted.
    one = await store.create_lease(
        user_pubkey=bob, provider_pubkey=provider, gpu_model="T4", cohort_id=cohort.id, at=at(0)
    )
    await store.activate_lease(one.id, at=at(100))
    own = await store.create_lease(user_pubkey=bob, provider_pubkey=provider, gpu_model="T4")
    await store.activate_lease(own.id, at=at(0))
    assert own.cohort_id is None

    since = T0.replace(hour=0)  # Monday 00:00
    usage = await store.cohort_usage(cohort.id, since, now=at(1000))
    # Alice: from Monday 00:00 (9 h before T0) to T0+600, on 2 GPUs; Bob: 900 s on 1.
    assert usage == {alice: (9 * 3600 + 600) * 2, bob: 900}
    assert await store.cohort_usage(cohort.id, since, now=at(1000), student=bob) == {bob: 900}
    live = await store.cohort_live_leases(cohort.id)
    assert [lease.id for lease in live] == [one.id]
    (bob_lease,) = live
    assert gpu_seconds(bob_lease, since, at(1000)) == 900
    assert lease_cost(bob_lease, since, at(1000)) == 900_000  # 3.6M/GPU-hour for 900 s


async def test_reservations_are_stored_for_the_scheduler(store: Store) -> None:
    cohort = await store.create_cohort(
        instructor=new_key(), settings=settings(), cohort_id=new_cohort_id(), at=T0
    )
    lab = await store.add_reservation(
        cohort.id, gpu="T4", count=30, starts_at=at(3600), ends_at=at(3 * 3600)
    )
    assert [r.id for r in await store.reservations(cohort.id)] == [lab.id]
    assert await store.reservations(ending_after=at(4 * 3600)) == []
    with pytest.raises(ValueError, match="end after"):
        await store.add_reservation(cohort.id, gpu="T4", count=1, starts_at=at(5), ends_at=at(5))
    assert await store.delete_reservation(cohort.id, lab.id)
    assert not await store.delete_reservation(cohort.id, lab.id)


async def test_migration_0006_up_keeps_leases_and_down_removes_the_cohort_tables(
    store_url: str,
) -> None:
    await upgrade_database(store_url, "0005")
    provider = new_key()
    engine = make_engine(store_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                sa.text(
                    "INSERT INTO providers (pubkey, display_name, region, status, first_seen, "
                    "last_heartbeat, link_generation) VALUES (:p, 'rig', 'eu', 'online', :t, :t, 0)"
                ),
                {"p": provider, "t": T0.replace(tzinfo=None)},
            )
            await conn.execute(
                sa.text(
                    "INSERT INTO leases (id, user_pubkey, provider_pubkey, gpu_model, gpu_indices,"
                    " price_lamports_per_hour, state, requested_at, relay) VALUES ('old', :u, :p,"
                    " 'T4', '[0]', 5, 'requested', :t, false)"
                ),
                {"u": new_key(), "p": provider, "t": T0.replace(tzinfo=None)},
            )
    finally:
        await engine.dispose()

    store = await Store.open(store_url)  # 0005 -> head
    try:
        old = await store.get_lease("old")
        assert old is not None and old.cohort_id is None
        cohort = await store.create_cohort(
            instructor=new_key(), settings=settings(), cohort_id=new_cohort_id(), at=T0
        )
        assert await store.get_cohort(cohort.id) is not None
    finally:
        await store.close()

    await downgrade_database(store_url, "0005")
    engine = make_engine(store_url)
    try:
        async with engine.connect() as conn:
            tables, columns = await conn.run_sync(
                lambda sync: (
                    set(sa.inspect(sync).get_table_names()),
                    {c["name"] for c in sa.inspect(sync).get_columns("leases")},
                )
            )
            kept = (await conn.execute(sa.text("SELECT id FROM leases"))).scalars().all()
    finally:
        await engine.dispose()
    assert not {"cohorts", "cohort_members", "cohort_codes", "cohort_instructors",
                "cohort_reservations"} & tables  # fmt: skip
    assert "cohort_id" not in columns and list(kept) == ["old"]


async def downgrade_database(url: str, revision: str) -> None:
    engine = make_engine(url)
    try:
        async with migration_transaction(engine) as conn:
            await conn.run_sync(lambda sync: command.downgrade(alembic_config(sync), revision))
    finally:
        await engine.dispose()
