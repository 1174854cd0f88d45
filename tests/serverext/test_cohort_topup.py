"""An instructor's top-up from Lab (``POST /jupyter-io/cohorts/{id}/topup``) against an escrow
coordinator and its embedded ledger: the students' allowances hold exactly what was added,
and every lamport that left the instructor's wallet is in them, in the delegate's rent or in
the fees; a wallet too poor moves nothing."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest
from solders.keypair import Keypair
from solders.pubkey import Pubkey

from jupyter_io.cohort_client import CohortClient
from jupyter_io.coordinator_client import CoordinatorClient
from jupyter_io.identity import load_keypair
from jupyter_io.payments.amounts import LAMPORTS_PER_SOL
from jupyter_io.payments.cohort_pool import AllowanceTerms, CohortPoolClient

from .conftest import Market, running_market


@pytest.fixture
async def market(tmp_path: Path) -> AsyncIterator[Market]:
    """An escrow coordinator on its embedded ledger, one provider host."""
    async with running_market(tmp_path, {"RTX 4090": "0.12"}, payments="escrow") as market:
        yield market


async def balances(ledger: CohortPoolClient, *keys: Pubkey) -> list[int]:
    return [await ledger.balance(key) for key in keys]


async def test_a_top_up_funds_each_allowance_exactly_and_a_poor_wallet_moves_nothing(
    fetch_json: Any, market: Market, user_keypair_path: Path
) -> None:
    instructor = load_keypair(user_keypair_path)
    students = [Keypair(), Keypair()]
    client = CohortClient(market.url, instructor, timeout=10)
    try:
        cohort = await client.create(
            name="CS229",
            gpu_types=["rtx4090"],
            max_price_lamports_per_hour=LAMPORTS_PER_SOL,
            term_ends_at=time.time() + 86400,
        )
        code = await client.create_code(cohort.id)
    finally:
        client.close()
    for student in students:
        joining = CohortClient(market.url, student, timeout=10)
        try:
            await joining.join(code.code)
        finally:
            joining.close()
    async with CoordinatorClient(market.url, timeout=10) as info:
        payments = await info.payments()
    assert payments.solana_url and payments.arbiter
    arbiter = Pubkey.from_string(payments.arbiter)
    terms = [AllowanceTerms(instructor.pubkey(), s.pubkey(), arbiter, cohort.id) for s in students]
    ledger = cast(CohortPoolClient, CohortPoolClient.connect(payments.solana_url))
    try:
        await ledger.airdrop(instructor.pubkey(), 2 * LAMPORTS_PER_SOL)
        accounts = [instructor.pubkey()] + [a for t in terms for a in (t.allowance, t.delegate)]
        before = await balances(ledger, *accounts)

        # One student: their allowance is created with 0.1 SOL, delegated in full.
        first = str(students[0].pubkey())
        status, body = await fetch_json(
            "jupyter-io", "cohorts", cohort.id, "topup", method="POST",
            body={"lamports": 100_000_000, "student": first},
        )  # fmt: skip
        assert status == 200, body
        assert (body["students"], body["lamports"]) == ([first], 100_000_000)
        fees = body["fee_lamports"]
        state = await ledger.allowance_state(terms[0])
        assert state is not None and state.amount == state.delegated_amount == 100_000_000
        assert await ledger.allowance_state(terms[1]) is None

        # Everyone: the first holds 0.15 SOL now, the second 0.05.
        status, body = await fetch_json(
            "jupyter-io", "cohorts", cohort.id, "topup", method="POST",
            body={"lamports": 50_000_000},
        )  # fmt: skip
        assert status == 200, body
        assert sorted(body["students"]) == sorted(str(s.pubkey()) for s in students)
        fees += body["fee_lamports"]
        amounts = []
        for t in terms:
            state = await ledger.allowance_state(t)
            assert state is not None and state.delegated_amount == state.amount
            amounts.append(state.amount)
        assert amounts == [150_000_000, 50_000_000]

        # Conservation: what left the wallet is in the allowances (tokens + rent), the
        # delegates' rent, and the fees of the transactions.
        after = await balances(ledger, *accounts)
        moved_in = sum(after[1:]) - sum(before[1:])
        assert fees > 0 and before[0] - after[0] == moved_in + fees

        # More than the wallet holds: 402, and not a lamport moves.
        status, body = await fetch_json(
            "jupyter-io", "cohorts", cohort.id, "topup", method="POST",
            body={"lamports": 50 * LAMPORTS_PER_SOL},
        )  # fmt: skip
        assert status == 402, body
        assert "fund it first" in body["message"]
        assert await balances(ledger, *accounts) == after
    finally:
        await ledger.close()

    # A student of the class cannot fund it (the coordinator refuses them its dashboard).
    status, body = await fetch_json(
        "jupyter-io", "cohorts", cohort.id, "topup", method="POST",
        body={"lamports": 1, "student": "11111111111111111111111111111111"},
    )  # fmt: skip
    assert status == 404, body  # not a student of the class
