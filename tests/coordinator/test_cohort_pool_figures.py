"""The pool's figures on a class's dashboard are the allowances' exact on-chain state
(``docs/cohorts.md``, "The pool on the dashboard"): a real escrow coordinator with its
embedded ledger, an instructor who funds a student's allowance on it, a session funded from
it and settled, then the instructor's own revoke and approval of a stranger, each read back
through ``GET /api/v1/cohorts/{id}/dashboard`` and compared with what the test's own client
reads from the ledger.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from solders.keypair import Keypair
from solders.message import MessageV0
from spl.token.constants import TOKEN_PROGRAM_ID
from spl.token.instructions import approve_checked, revoke
from spl.token.models import ApproveCheckedParams, RevokeParams

from jupyter_io.cohorts import CohortSettings, new_cohort_id
from jupyter_io.coordinator.cohort_allowances import RUN_OUT_MIN_ELAPSED, ReadBudget
from jupyter_io.payments.cohort_pool import AllowanceTerms
from jupyter_io.payments.token_accounts import NATIVE_DECIMALS, NATIVE_MINT

from .conftest import Starter
from .test_billing import Api
from .test_cohort_funding import CAP, Cohort, _settled
from .test_cohort_funding import cohort as cohort  # the fixture

pytestmark = pytest.mark.timeout(90)


async def _board(api: Api, cohort_id: str) -> dict[str, Any]:
    code, board = await api("GET", f"/api/v1/cohorts/{cohort_id}/dashboard")
    assert code == 200, board
    return board


def _on_chain(state: Any, terms: AllowanceTerms) -> dict[str, Any]:
    return {
        "address": str(terms.allowance),
        "as_agreed": True,
        "problem": None,
        "amount_lamports": state.amount,
        "delegated_lamports": state.delegated_amount,
        "spendable_lamports": state.spendable,
    }


async def _instructor_sends(cohort: Cohort, *instructions: Any) -> None:
    blockhash = (await cohort.pool.client.get_latest_blockhash()).value.blockhash
    payer = cohort.instructor.pubkey()
    message = MessageV0.try_compile(payer, list(instructions), [], blockhash)
    await cohort.pool.submit(message, [cohort.instructor])


async def test_the_dashboard_shows_each_allowance_as_it_is_on_chain(
    cohort: Cohort, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, store, billing = cohort.server, cohort.server.store, cohort.server.billing
    assert store is not None and billing is not None
    unfunded = Keypair()
    await store.add_members(cohort.id, [str(unfunded.pubkey())])
    instructor = Api(server.url, cohort.instructor)
    student, terms = str(cohort.student.pubkey()), cohort.terms()
    # Count the coordinator's reads of the ledger, and make its calls small enough to see
    # the batching: 2 allowances + 2 delegates = 4 keys, 3 a call.
    reads: list[int] = []
    rpc = billing.pool.client
    real = rpc.get_multiple_accounts

    async def counted(keys: Any, *args: Any, **kwargs: Any) -> Any:
        reads.append(len(keys))
        return await real(keys, *args, **kwargs)

    monkeypatch.setattr(rpc, "get_multiple_accounts", counted)
    billing.pool.max_accounts_per_call = 3
    try:
        board, again = await asyncio.gather(
            _board(instructor, cohort.id), _board(instructor, cohort.id)
        )
        assert reads == [3, 1]  # two dashboards at once share one read, in two calls
        assert again["pool"] == board["pool"]
        await _board(instructor, cohort.id)
        assert reads == [3, 1]  # within the ttl: no read at all
        rows = {row["student"]: row for row in board["students"]}
        funded = await cohort.pool.allowance_state(terms)
        assert funded is not None and funded.amount == funded.spendable == CAP
        assert rows[student]["allowance"] == _on_chain(funded, terms)
        assert rows[str(unfunded.pubkey())]["allowance"] is None  # none on-chain
        pool = board["pool"]
        assert pool["allowance_lamports"] == CAP and pool["held_lamports"] == CAP
        assert pool["students_funded"] == 1 and pool["not_as_agreed"] == 0
        assert pool["reason"] is None and pool["spent_lamports_week"] == 0
        assert pool["projected_run_out"] is None  # nothing spent this week: no pace

        # A funded session, billed and settled: the remainder comes back to the allowance's
        # amount, not to what the delegate may still move (approve semantics).
        lease = await cohort.lease()
        await cohort.fund(lease)
        await cohort.provider.session(lease, "active")
        await cohort.provider.usage(lease, 1, 2)
        await cohort.provider.heartbeat()
        await asyncio.sleep(1.2)  # the lease runs a second: something is billed
        await cohort.api("DELETE", f"/api/v1/leases/{lease}")
        paid = await cohort.settle_as_provider(lease)
        assert (await _settled(server, lease)).amount_lamports == paid > 0
        reads.clear()
        server_reader = cohort.server.allowances
        assert server_reader is not None
        server_reader.ttl = 0.0  # read afresh from here on
        board = await _board(instructor, cohort.id)
        assert reads == [3]  # the funded student's delegate is verified: not read again
        after = await cohort.pool.allowance_state(terms)
        assert after is not None and after.spendable < CAP and after.amount > after.spendable
        rows = {row["student"]: row for row in board["students"]}
        assert rows[student]["allowance"] == _on_chain(after, terms)
        pool = board["pool"]
        assert pool["allowance_lamports"] == after.spendable
        assert pool["held_lamports"] == after.amount
        assert pool["spent_lamports_week"] == paid == pool["spent_lamports_term"]
        now = board["generated_at"]
        week_start = now - (now - 345_600) % 604_800  # Monday 00:00 UTC (1970-01-05)
        rate = paid / max(now - week_start, RUN_OUT_MIN_ELAPSED)
        assert pool["projected_run_out"] == pytest.approx(now + after.spendable / rate, rel=1e-4)

        # The instructor revokes: the student can spend nothing, though the lamports are there.
        await _instructor_sends(
            cohort,
            revoke(
                RevokeParams(
                    program_id=TOKEN_PROGRAM_ID,
                    account=terms.allowance,
                    owner=cohort.instructor.pubkey(),
                )
            ),
        )
        board = await _board(instructor, cohort.id)
        allowance = {row["student"]: row for row in board["students"]}[student]["allowance"]
        assert allowance["spendable_lamports"] == 0 and allowance["delegated_lamports"] == 0
        assert allowance["amount_lamports"] == after.amount and allowance["as_agreed"]
        assert board["pool"]["allowance_lamports"] == 0
        assert board["pool"]["projected_run_out"] <= time.time()

        # ... and approves a stranger: not as agreed, so nothing spendable, and it says why.
        stranger = Keypair().pubkey()
        await _instructor_sends(
            cohort,
            approve_checked(
                ApproveCheckedParams(
                    program_id=TOKEN_PROGRAM_ID,
                    source=terms.allowance,
                    mint=NATIVE_MINT,
                    delegate=stranger,
                    owner=cohort.instructor.pubkey(),
                    amount=1_000,
                    decimals=NATIVE_DECIMALS,
                )
            ),
        )
        board = await _board(instructor, cohort.id)
        allowance = {row["student"]: row for row in board["students"]}[student]["allowance"]
        assert not allowance["as_agreed"] and allowance["spendable_lamports"] == 0
        assert str(stranger) in allowance["problem"] and "delegate" in allowance["problem"]
        assert board["pool"]["not_as_agreed"] == 1 and board["pool"]["allowance_lamports"] == 0

        # All dashboards together read a budget of accounts a second: past it a class's last
        # read is served (its read_at says when), and with none the figures are null.
        server_reader.budget = ReadBudget(rate=0.001, burst=2)  # one read of 2 students
        reads.clear()
        fresh = await _board(instructor, cohort.id)
        stale = await _board(instructor, cohort.id)
        assert len(reads) == 1 and stale["pool"]["read_at"] == fresh["pool"]["read_at"]
        assert stale["students"] == fresh["students"]
        server_reader.forget(cohort.id)
        board = await _board(instructor, cohort.id)
        assert len(reads) == 1 and board["pool"]["allowance_lamports"] is None
        assert "allowances a second" in board["pool"]["reason"]
        assert all(row["allowance"] is None for row in board["students"])
    finally:
        instructor.close()


async def test_a_free_coordinator_reports_no_pool_and_says_why(start_coordinator: Starter) -> None:
    server = await start_coordinator()  # payments free
    assert server.store is not None
    instructor, student = Keypair(), Keypair()
    settings = CohortSettings(
        name="GPU 101",
        gpu_types=("RTX 4090",),
        max_price_lamports_per_hour=3_600_000,
        term_ends_at=time.time() + 86400,
    )
    record = await server.store.create_cohort(
        instructor=str(instructor.pubkey()), settings=settings, cohort_id=new_cohort_id()
    )
    await server.store.add_members(record.id, [str(student.pubkey())])
    api = Api(server.url, instructor)
    try:
        board = await _board(api, record.id)
    finally:
        api.close()
    assert board["students"][0]["allowance"] is None
    pool = board["pool"]
    assert pool["allowance_lamports"] is None and pool["projected_run_out"] is None
    assert "free" in pool["reason"]
