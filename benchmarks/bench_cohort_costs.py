"""What a cohort session costs on-chain against a plain one (docs/payments-contract.md 6).

Runs the embedded ledger (LiteSVM, behind its JSON-RPC, in a temporary directory) and, for
each transaction a plain and a cohort session sends, reads back from the ledger its fee,
compute units and serialized size: plain setup and settlement (first session of a triple and
a later one), an allowance's funding, a cohort session's funding (first: it creates the
escrow's multisig and the arbiter's wSOL account; later), its settlement and refund, and a
reclaim. Deterministic counts, not timings: prints a table; not a pass/fail test.

    python benchmarks/bench_cohort_costs.py
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

from solders.keypair import Keypair
from solders.signature import Signature

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jupyter_io.payments.cohort_pool import AllowanceTerms, CohortPoolClient
from tests.payments.conftest import Chain


async def _read(chain: Chain, signature: object) -> tuple[int, int, int]:
    resp = await chain.client.get_transaction(
        Signature.from_string(str(signature)),
        encoding="base64",
        max_supported_transaction_version=0,
    )
    assert resp.value is not None and resp.value.transaction.meta is not None
    tx = resp.value.transaction
    return tx.meta.fee, tx.meta.compute_units_consumed or 0, len(bytes(tx.transaction))  # type: ignore[union-attr, arg-type]


async def main() -> None:
    rows: list[tuple[str, tuple[int, int, int]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        chain = await Chain(Path(tmp) / "ledger.sqlite").start()
        try:
            pool = CohortPoolClient(chain.client)
            instructor, arbiter, provider, student, user = (Keypair() for _ in range(5))
            for key in (instructor, arbiter, provider, user):
                await chain.escrow.airdrop(key.pubkey(), 10**9)
            for lease in ("plain-1", "plain-2"):
                opened = await chain.escrow.open_escrow(
                    user, provider.pubkey(), arbiter.pubkey(), lease, 50_000_000
                )
                rows.append((f"plain setup ({lease})", await _read(chain, opened.signature)))
                settled = await chain.escrow.settle(
                    opened.terms, 1_000_000, arbiter=arbiter, provider=provider
                )
                rows.append((f"plain settlement ({lease})", await _read(chain, settled.signature)))
            terms = AllowanceTerms(instructor.pubkey(), student.pubkey(), arbiter.pubkey(), "c_x")
            funded = await pool.fund(instructor, await pool.plan_grants([(terms, 200_000_000)]))
            rows.append(("fund one new allowance", await _read(chain, funded[0].signature)))
            for lease in ("cohort-1", "cohort-2"):
                session = terms.session(provider.pubkey(), lease)
                plan = await pool.funding_plan(session, 50_000_000)
                signature = await pool.fund_session(plan, student=student, arbiter=arbiter)
                rows.append((f"cohort funding ({lease})", await _read(chain, signature)))
                closed = await pool.settle_cohort(
                    session, 1_000_000, arbiter=arbiter, provider=provider
                )
                rows.append((f"cohort settlement ({lease})", await _read(chain, closed)))
            session = terms.session(provider.pubkey(), "cohort-3")
            plan = await pool.funding_plan(session, 50_000_000)
            await pool.fund_session(plan, student=student, arbiter=arbiter)
            refunded = await pool.refund_cohort(session, 1_000, student=student, arbiter=arbiter)
            rows.append(("cohort refund", await _read(chain, refunded)))
            (reclaimed,) = await pool.reclaim(instructor, [terms])
            rows.append(("reclaim one allowance", await _read(chain, reclaimed.signature)))
            assert await chain.balance(student.pubkey()) == 0, "the student spent SOL"
        finally:
            await chain.stop()
    print(f"{'transaction':<32} {'fee':>8} {'CU':>8} {'bytes':>6}")
    for name, (fee, units, size) in rows:
        print(f"{name:<32} {fee:>8} {units:>8} {size:>6}")


if __name__ == "__main__":
    asyncio.run(main())
