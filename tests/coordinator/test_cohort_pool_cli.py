"""``jupyter io cohort fund|reclaim`` as an instructor types them, against a real escrow
coordinator and its embedded ledger: allowances created for every current student, the cap
delegated, a second ``fund`` a no-op, ``reclaim`` of one student then of all returning every
unspent lamport to the instructor's wallet (``docs/payments-contract.md`` section 6)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from solders.keypair import Keypair

from jupyter_io.cohorts import CohortSettings, new_cohort_id
from jupyter_io.identity import write_keypair
from jupyter_io.payments.amounts import FEE_PER_SIGNATURE, LAMPORTS_PER_SOL
from jupyter_io.payments.cohort_pool import AllowanceTerms, CohortPoolClient

from .conftest import Starter
from .test_cohorts_cli import cohort

pytestmark = pytest.mark.timeout(120)


async def test_fund_and_reclaim_move_exactly_the_allowances(
    start_coordinator: Starter, tmp_path: Path
) -> None:
    server = await start_coordinator(payments="escrow")
    teacher, students = Keypair(), [Keypair() for _ in range(3)]
    teacher_file = write_keypair(teacher, tmp_path / "teacher.json")
    store = server.store
    assert store is not None and server.keypair is not None
    settings = CohortSettings(
        name="GPU 101", gpu_types=("T4",), max_price_lamports_per_hour=1_000_000,
        term_ends_at=time.time() + 86400,
    )  # fmt: skip
    cid = new_cohort_id()
    await store.create_cohort(instructor=str(teacher.pubkey()), settings=settings, cohort_id=cid)
    await store.add_members(cid, [str(s.pubkey()) for s in students])
    pool = CohortPoolClient.connect(server.solana_url)
    try:
        await pool.airdrop(teacher.pubkey(), LAMPORTS_PER_SOL)
        start = await pool.balance(teacher.pubkey())
        terms = [
            AllowanceTerms(teacher.pubkey(), s.pubkey(), server.keypair.pubkey(), cid)
            for s in students
        ]

        # No cap on the cohort and none given: an error naming the flag, nothing sent.
        _, _, err = await cohort("fund", cid, keypair=teacher_file, url=server.url, ok=False)
        assert "--cap" in err
        _, out, _ = await cohort(
            "fund", cid, "--cap", "0.05", "--json", keypair=teacher_file, url=server.url
        )
        rows = json.loads(out)["students"]
        assert {r["student"] for r in rows} == {str(s.pubkey()) for s in students}
        assert all(r["created"] and r["added_lamports"] == 50_000_000 for r in rows)
        for t in terms:
            state = await pool.allowance_state(t)
            assert state is not None and state.amount == state.delegated_amount == 50_000_000
        _, out, _ = await cohort("fund", cid, "--cap", "0.05", keypair=teacher_file, url=server.url)
        assert out.count("already at the cap") == 3
        funded = await pool.balance(teacher.pubkey())
        transactions = len({r["signature"] for r in rows})

        # A student's own key cannot fund or reclaim the instructor's allowances.
        other_file = write_keypair(students[0], tmp_path / "student.json")
        _, _, err = await cohort("reclaim", cid, keypair=other_file, url=server.url, ok=False)
        assert "only the instructors" in err or "creator" in err

        _, out, _ = await cohort(
            "reclaim", cid, "--student", str(students[0].pubkey()),
            keypair=teacher_file, url=server.url,
        )  # fmt: skip
        assert "closed 1 allowance(s)" in out
        assert await pool.allowance_state(terms[0]) is None
        assert await pool.allowance_state(terms[1]) is not None
        _, out, _ = await cohort("reclaim", cid, keypair=teacher_file, url=server.url)
        assert "closed 2 allowance(s)" in out
        end = await pool.balance(teacher.pubkey())
        # Everything came back but the fees and the delegates' one-time rent.
        delegate_rent = (await pool.client.get_minimum_balance_for_rent_exemption(355)).value
        fees = FEE_PER_SIGNATURE * (transactions + 2)
        assert start - end == fees + 3 * delegate_rent
        assert funded < end
    finally:
        await pool.close()
