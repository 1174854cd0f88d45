"""Escrow lifecycle on the embedded ledger, through its JSON-RPC endpoint (issue 4's targets).

Starts the embedded ledger (LiteSVM, SQLite store in a temporary directory — the default
setup) behind its HTTP JSON-RPC endpoint in this process, and drives sessions with solana-py's
``AsyncClient`` exactly as against a cluster: the user's side (a provisioner) opens the escrow,
the coordinator's side verifies it and settles it, each with its own long-lived client.

Measured, interleaved with a baseline (the same two transactions sent straight into a bare
LiteSVM, no RPC, no store) so the ratio survives a noisy machine:

1. lifecycle = setup + the coordinator's on-chain verification + settlement (median, p99),
   as the coordinator runs it (settling with the state it verified), and the kernel-start
   share of it (setup + verify);
2. transactions and fees per session, read back from the chain (getTransaction);
3. the first session of a fresh client (cold caches: rent, multisig, blockhash);
4. a new (user, provider, arbiter) triple: the multisig's one-time rent.

Not a pass/fail test; prints a table. On a shared machine repeat a disturbed run.

    python benchmarks/bench_escrow.py              # 300 sessions
    python benchmarks/bench_escrow.py --sessions 50 --store memory
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from solana.rpc.async_api import AsyncClient
from solders.keypair import Keypair
from solders.litesvm import LiteSVM
from solders.signature import Signature
from solders.transaction import VersionedTransaction
from solders.transaction_metadata import TransactionMetadata
from spl.token.constants import TOKEN_PROGRAM_ID

from jupyter_io.coordinator.embedded_ledger import (
    EmbeddedLedger,
    LedgerStore,
    MemoryLedgerStore,
)
from jupyter_io.coordinator.ledger_rpc import serve_ledger
from jupyter_io.coordinator.store import SqlLedgerStore
from jupyter_io.payments.amounts import LAMPORTS_PER_SOL, format_sol
from jupyter_io.payments.escrow import (
    EscrowClient,
    EscrowTerms,
    settlement_message,
    setup_message,
)
from jupyter_io.payments.token_accounts import MINT_LEN, NATIVE_MINT, native_mint_data

DEPOSIT = LAMPORTS_PER_SOL // 20  # 0.05 SOL: one hour at 0.05 SOL/h
METERED = 12_345_678


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Baseline:
    """The same setup + settlement transactions straight into a bare LiteSVM (no RPC)."""

    def __init__(self) -> None:
        from solders.account import Account

        self.svm = LiteSVM()
        self.svm.set_account(
            NATIVE_MINT,
            Account(
                lamports=self.svm.minimum_balance_for_rent_exemption(MINT_LEN),
                data=native_mint_data(),
                owner=TOKEN_PROGRAM_ID,
                executable=False,
                rent_epoch=0,
            ),
        )
        self.user, self.provider, self.arbiter = Keypair(), Keypair(), Keypair()
        for who in (self.user, self.provider):
            self.svm.airdrop(who.pubkey(), 1_000 * LAMPORTS_PER_SOL)
        self.escrow_rent = self.svm.minimum_balance_for_rent_exemption(165)
        self.multisig_rent: int | None = self.svm.minimum_balance_for_rent_exemption(355)
        self.n = 0

    def lifecycle(self) -> float:
        self.n += 1
        terms = EscrowTerms(
            self.user.pubkey(), self.provider.pubkey(), self.arbiter.pubkey(), f"b{self.n}"
        )
        started = time.perf_counter()
        blockhash = self.svm.latest_blockhash()
        setup = setup_message(
            terms,
            DEPOSIT,
            escrow_rent=self.escrow_rent,
            multisig_rent=self.multisig_rent,
            blockhash=blockhash,
        )
        r1 = self.svm.send_transaction(VersionedTransaction(setup, [self.user]))
        settle = settlement_message(terms, METERED, blockhash=blockhash)
        r2 = self.svm.send_transaction(VersionedTransaction(settle, [self.arbiter, self.provider]))
        elapsed = time.perf_counter() - started
        assert isinstance(r1, TransactionMetadata) and isinstance(r2, TransactionMetadata), (r1, r2)
        self.multisig_rent = None
        return elapsed


async def chain_fees(client: AsyncClient, signatures: list[Signature | None]) -> tuple[int, int]:
    """(transactions, lamports of fees) the chain recorded for these signatures."""
    count = fees = 0
    for signature in signatures:
        if signature is None:
            continue
        resp = await client.get_transaction(
            signature, encoding="base64", max_supported_transaction_version=0
        )
        assert resp.value is not None and resp.value.transaction.meta is not None
        count += 1
        fees += resp.value.transaction.meta.fee
    return count, fees


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=300)
    parser.add_argument("--cold", type=int, default=30, help="sessions on fresh clients")
    parser.add_argument("--store", choices=["sqlite", "memory"], default="sqlite")
    args = parser.parse_args()

    tmp = tempfile.TemporaryDirectory(prefix="bench-escrow-")
    store: LedgerStore = (
        SqlLedgerStore.sqlite(Path(tmp.name) / "ledger.sqlite")
        if args.store == "sqlite"
        else MemoryLedgerStore()
    )
    ledger = await EmbeddedLedger.open(store)
    server = await serve_ledger(ledger)
    user, provider, arbiter = Keypair(), Keypair(), Keypair()
    user_side = EscrowClient(AsyncClient(server.url))
    coordinator = EscrowClient(AsyncClient(server.url))
    await user_side.airdrop(user.pubkey(), 1_000 * LAMPORTS_PER_SOL)
    await user_side.airdrop(provider.pubkey(), 10 * LAMPORTS_PER_SOL)

    # Warm-up: the triple's multisig and the provider's wSOL account are created once.
    first = await user_side.open_escrow(user, provider.pubkey(), arbiter.pubkey(), "warm", DEPOSIT)
    first_settle = await coordinator.settle(
        first.terms, METERED, arbiter=arbiter, provider=provider
    )
    first_tx, first_fees = await chain_fees(
        coordinator.client, [first.signature, first_settle.signature]
    )
    baseline = Baseline()
    baseline.lifecycle()

    setup_t: list[float] = []
    verify_t: list[float] = []
    settle_t: list[float] = []
    base_t: list[float] = []
    signatures: list[Signature | None] = []
    for i in range(args.sessions):
        base_t.append(baseline.lifecycle())
        t0 = time.perf_counter()
        receipt = await user_side.open_escrow(
            user, provider.pubkey(), arbiter.pubkey(), f"s{i}", DEPOSIT
        )
        t1 = time.perf_counter()
        verified = await coordinator.verify_escrow(receipt.terms, DEPOSIT)
        t2 = time.perf_counter()
        settlement = await coordinator.settle(
            receipt.terms, METERED, arbiter=arbiter, provider=provider, verified=verified
        )
        t3 = time.perf_counter()
        setup_t.append(t1 - t0)
        verify_t.append(t2 - t1)
        settle_t.append(t3 - t2)
        signatures += [receipt.signature, settlement.signature]
        if i % 2:
            base_t.append(baseline.lifecycle())  # interleave: B A A B B A A ...

    # Fresh escrow clients each session (a provisioner or coordinator that just started):
    # empty caches. The HTTP client's own first request (~15-20 ms here: httpx sets up its
    # connection machinery) is paid once per process and left out with a health check.
    cold_t: list[float] = []
    for i in range(args.cold):
        u = EscrowClient(AsyncClient(server.url))
        c = EscrowClient(AsyncClient(server.url))
        await u.client.is_connected()
        await c.client.is_connected()
        t0 = time.perf_counter()
        receipt = await u.open_escrow(user, provider.pubkey(), arbiter.pubkey(), f"c{i}", DEPOSIT)
        await c.verify_escrow(receipt.terms, DEPOSIT)
        await c.settle(receipt.terms, METERED, arbiter=arbiter, provider=provider)
        cold_t.append(time.perf_counter() - t0)
        await u.client.close()
        await c.client.close()

    tx_count, fees = await chain_fees(coordinator.client, signatures)
    lifecycle = [a + c for a, c in zip(setup_t, settle_t, strict=True)]
    with_verify = [a + b + c for a, b, c in zip(setup_t, verify_t, settle_t, strict=True)]
    start_path = [a + b for a, b in zip(setup_t, verify_t, strict=True)]
    per_session_tx = tx_count / args.sessions
    per_session_fees = fees / args.sessions

    def ms(values: list[float]) -> str:
        return f"{statistics.median(values) * 1e3:7.2f} ms  p99 {pct(values, 0.99) * 1e3:7.2f} ms"

    ratio = statistics.median(with_verify) / statistics.median(base_t)
    print(f"# bench_escrow — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(
        f"# {platform.node()} · {os.cpu_count()} CPUs · Python {platform.python_version()} · "
        f"store={args.store} · {args.sessions} sessions (+{args.cold} cold)"
    )
    print()
    print("| what | median | p99 | target | met |")
    print("| --- | --- | --- | --- | --- |")

    def row(name: str, values: list[float], target: str = "", met: str = "") -> None:
        med, p99 = statistics.median(values) * 1e3, pct(values, 0.99) * 1e3
        print(f"| {name} | {med:.2f} ms | {p99:.2f} ms | {target} | {met} |")

    row(
        "lifecycle via JSON-RPC: setup + verify + settlement",
        with_verify,
        "≤ 10 ms",
        "yes" if statistics.median(with_verify) <= 0.010 else "NO",
    )
    row("  setup (user signs; 1 tx)", setup_t)
    row("  verify (coordinator reads the escrow)", verify_t)
    row("  settlement (arbiter + provider; 1 tx)", settle_t)
    row("  setup + settlement only", lifecycle)
    row("escrow on the kernel-start path (setup + verify)", start_path)
    row("lifecycle with fresh clients (cold caches, settle re-reads)", cold_t)
    row("baseline: same 2 txs straight into LiteSVM", base_t)
    print(f"| RPC lifecycle / bare LiteSVM | {ratio:.1f}x | | | |")
    print(
        f"| transactions per session | {per_session_tx:g} | | ≤ 3 | "
        f"{'yes' if per_session_tx <= 3 else 'NO'} |"
    )
    print(
        f"| fees per session | {per_session_fees:,.0f} lamports | | ≤ 15,000 | "
        f"{'yes' if per_session_fees <= 15_000 else 'NO'} |"
    )
    print(
        f"| first session of a triple | {first_tx} tx, {first_fees:,} lamports fees "
        f"+ {format_sol(first.multisig_rent)} multisig rent (once) "
        f"+ {format_sol(first.escrow_rent)} provider wSOL rent (reclaimable) | | | |"
    )
    print()
    print(f"setup {ms(setup_t)} · verify {ms(verify_t)} · settle {ms(settle_t)}")

    await user_side.client.close()
    await coordinator.client.close()
    await server.stop()
    tmp.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
