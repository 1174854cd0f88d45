"""The embedded ledger: durability, restart without replay, replay protection, failure modes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from solana.rpc.core import RPCException
from solana.rpc.models import TxOpts
from solders.account import Account
from solders.keypair import Keypair
from solders.message import MessageV0
from solders.pubkey import Pubkey
from solders.system_program import TransferParams, transfer
from solders.transaction import VersionedTransaction
from sqlalchemy.ext.asyncio import create_async_engine

from jupyter_io.coordinator.embedded_ledger import (
    MAX_BLOCKHASH_AGE,
    EmbeddedLedger,
    MemoryLedgerStore,
    TransactionRejected,
)
from jupyter_io.coordinator.store import SqlLedgerStore
from jupyter_io.payments.amounts import LAMPORTS_PER_SOL
from jupyter_io.payments.escrow import TransactionFailed

from .conftest import Chain


async def _transfer(chain: Chain, payer: Keypair, to: Pubkey, lamports: int) -> bytes:
    blockhash = (await chain.client.get_latest_blockhash()).value.blockhash
    message = MessageV0.try_compile(
        payer.pubkey(),
        [transfer(TransferParams(from_pubkey=payer.pubkey(), to_pubkey=to, lamports=lamports))],
        [],
        blockhash,
    )
    return bytes(VersionedTransaction(message, [payer]))


async def test_startup_loads_accounts_not_history(chain: Chain) -> None:
    alice, bob = Keypair(), Keypair()
    await chain.escrow.airdrop(alice.pubkey(), LAMPORTS_PER_SOL)
    rows_after_setup = await chain.store.count_accounts()
    for i in range(60):
        raw = await _transfer(chain, alice, bob.pubkey(), 1_000_000 + i)
        await chain.escrow._confirm((await chain.client.send_raw_transaction(raw)).value, "pay")
    # 60 transactions later the store still holds one row per account (alice, bob).
    assert await chain.store.count_accounts() == rows_after_setup + 1 == 2
    snapshot = await chain.store.load()
    assert {k for k, _ in snapshot.accounts} == {alice.pubkey(), bob.pubkey()}
    assert set(snapshot.meta) == {"genesis_hash", "slot", "transaction_count"}
    alice_balance = await chain.balance(alice.pubkey())
    bob_balance = await chain.balance(bob.pubkey())
    genesis = (await chain.client.get_genesis_hash()).value
    slot = (await chain.client.get_slot()).value

    started = time.perf_counter()
    await chain.restart()
    assert time.perf_counter() - started < 2.0
    assert await chain.balance(alice.pubkey()) == alice_balance
    assert await chain.balance(bob.pubkey()) == bob_balance
    assert (await chain.client.get_genesis_hash()).value == genesis
    assert (await chain.client.get_slot()).value > slot  # slots never go back
    assert (await chain.client.get_transaction_count()).value == 61


async def test_closed_accounts_leave_the_store(chain: Chain) -> None:
    user, provider, arbiter = Keypair(), Keypair(), Keypair()
    await chain.escrow.airdrop(user.pubkey(), LAMPORTS_PER_SOL)
    await chain.escrow.airdrop(provider.pubkey(), LAMPORTS_PER_SOL)
    receipt = await chain.escrow.open_escrow(
        user, provider.pubkey(), arbiter.pubkey(), "s", 1_000_000
    )
    stored = {k for k, _ in (await chain.store.load()).accounts}
    assert receipt.terms.escrow in stored and receipt.terms.multisig in stored
    await chain.escrow.settle(receipt.terms, 10, arbiter=arbiter, provider=provider)
    stored = {k for k, _ in (await chain.store.load()).accounts}
    assert receipt.terms.escrow not in stored
    assert receipt.terms.provider_wsol in stored and receipt.terms.multisig in stored
    # Programs, sysvars and the wrapped-SOL mint are the runtime's, never stored.
    assert stored == {
        user.pubkey(),
        provider.pubkey(),
        receipt.terms.multisig,
        receipt.terms.provider_wsol,
    }


async def test_a_transaction_signed_before_a_restart_cannot_land_after_it(chain: Chain) -> None:
    alice, bob = Keypair(), Keypair()
    await chain.escrow.airdrop(alice.pubkey(), LAMPORTS_PER_SOL)
    raw = await _transfer(chain, alice, bob.pubkey(), 5_000_000)
    await chain.escrow._confirm((await chain.client.send_raw_transaction(raw)).value, "pay")
    balance = await chain.balance(alice.pubkey())

    with pytest.raises(RPCException, match="already been processed"):
        await chain.client.send_raw_transaction(raw)
    # Without preflight a node answers a duplicate with its signature and does nothing.
    again = await chain.client.send_raw_transaction(raw, TxOpts(skip_preflight=True))
    assert again.value == VersionedTransaction.from_bytes(raw).signatures[0]
    assert await chain.balance(alice.pubkey()) == balance

    await chain.restart()
    with pytest.raises(RPCException, match="Blockhash not found"):
        await chain.client.send_raw_transaction(raw)
    with pytest.raises(RPCException, match="Blockhash not found"):
        await chain.client.send_raw_transaction(raw, TxOpts(skip_preflight=True))
    assert await chain.balance(alice.pubkey()) == balance


async def test_blockhashes_expire_after_150_slots(tmp_path: Path) -> None:
    now = [50.0]
    ledger = await EmbeddedLedger.open(clock=lambda: now[0])
    blockhash, last_valid = ledger.latest_blockhash()
    assert last_valid == ledger.slot + MAX_BLOCKHASH_AGE
    assert ledger.latest_blockhash()[0] == blockhash  # same slot, same hash
    now[0] += 0.4
    assert ledger.latest_blockhash()[0] != blockhash
    now[0] += 0.4 * (MAX_BLOCKHASH_AGE - 1)
    assert ledger.is_blockhash_valid(blockhash)
    now[0] += 0.4
    assert not ledger.is_blockhash_valid(blockhash)
    await ledger.close()


async def test_a_failing_transaction_without_preflight_lands_and_pays_its_fee(
    chain: Chain,
) -> None:
    alice, bob = Keypair(), Keypair()
    await chain.escrow.airdrop(alice.pubkey(), LAMPORTS_PER_SOL)
    raw = await _transfer(chain, alice, bob.pubkey(), 5 * LAMPORTS_PER_SOL)
    with pytest.raises(RPCException, match="insufficient lamports"):
        await chain.client.send_raw_transaction(raw)
    assert await chain.balance(alice.pubkey()) == LAMPORTS_PER_SOL  # preflight: nothing paid

    sent = await chain.client.send_raw_transaction(raw, TxOpts(skip_preflight=True))
    status = (await chain.client.get_signature_statuses([sent.value])).value[0]
    assert status is not None and status.err is not None
    # solana-py's confirm_transaction returns happily on a failed transaction ...
    await chain.client.confirm_transaction(sent.value)
    # ... so the escrow client checks err itself.
    with pytest.raises(TransactionFailed, match="InstructionError"):
        await chain.escrow._confirm(sent.value, "paying")
    assert await chain.balance(alice.pubkey()) == LAMPORTS_PER_SOL - 5_000
    tx = await chain.client.get_transaction(
        sent.value, encoding="json", max_supported_transaction_version=0
    )
    assert tx.value is not None and tx.value.transaction.meta is not None
    assert tx.value.transaction.meta.fee == 5_000
    assert tx.value.transaction.meta.err is not None
    await chain.restart()  # the fee is durable too
    assert await chain.balance(alice.pubkey()) == LAMPORTS_PER_SOL - 5_000


class PanicException(BaseException):
    """Stands in for pyo3's PanicException (a BaseException, not an Exception)."""


async def test_a_runtime_panic_becomes_a_clean_rpc_error(
    chain: Chain, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = Keypair()
    await chain.escrow.airdrop(alice.pubkey(), LAMPORTS_PER_SOL)
    raw = await _transfer(chain, alice, Keypair().pubkey(), 1_000_000)
    svm = chain.ledger._svm

    def panic(_tx: object) -> None:
        raise PanicException("called `Option::unwrap()` on a `None` value")

    monkeypatch.setattr(svm, "simulate_transaction", panic)
    with pytest.raises(RPCException, match="the runtime refused it"):
        await chain.client.send_raw_transaction(raw)
    monkeypatch.undo()
    assert (await chain.client.send_raw_transaction(raw)).value is not None
    assert await chain.client.is_connected()


async def test_a_store_failure_stops_the_ledger_consistently(
    chain: Chain, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice, bob = Keypair(), Keypair()
    await chain.escrow.airdrop(alice.pubkey(), LAMPORTS_PER_SOL)
    raw = await _transfer(chain, alice, bob.pubkey(), 1_000_000)

    async def broken(*_args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(chain.store, "commit", broken)
    with pytest.raises(RPCException, match="unhealthy"):
        await chain.client.send_raw_transaction(raw)
    with pytest.raises(RPCException, match="NodeUnhealthy"):
        await chain.client.is_connected()  # getHealth says so
    with pytest.raises(RPCException):
        await chain.client.get_balance(alice.pubkey())
    monkeypatch.undo()
    await chain.restart()  # back to the last committed state: the transfer never happened
    assert await chain.balance(alice.pubkey()) == LAMPORTS_PER_SOL
    assert await chain.balance(bob.pubkey()) == 0


async def test_store_on_the_coordinators_async_engine(tmp_path: Path) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'coordinator.db'}")
    store = SqlLedgerStore(engine, table_prefix="solana_")
    ledger = await EmbeddedLedger.open(store)
    alice = Keypair()
    await ledger.airdrop(alice.pubkey(), 123_456_789)
    await ledger.close()
    assert await store.count_accounts() == 1
    ledger = await EmbeddedLedger.open(SqlLedgerStore(engine, table_prefix="solana_"))
    assert await ledger.get_balance(alice.pubkey()) == 123_456_789
    await ledger.close()
    await engine.dispose()


async def test_u64_fields_survive_the_store(tmp_path: Path) -> None:
    store = SqlLedgerStore.sqlite(tmp_path / "u64.sqlite")
    await store.load()
    key = Keypair().pubkey()
    account = Account(
        lamports=2**64 - 1, data=b"\x01\x02", owner=key, executable=False, rent_epoch=2**64 - 1
    )
    await store.commit([(key, account)], {})
    assert (await store.load()).accounts == [(key, account)]
    await store.close()


async def test_memory_store_and_closed_ledger() -> None:
    store = MemoryLedgerStore()
    ledger = await EmbeddedLedger.open(store)
    alice = Keypair()
    await ledger.airdrop(alice.pubkey(), 1_000_000)
    await ledger.close()
    with pytest.raises(TransactionRejected, match="closed"):
        await ledger.get_balance(alice.pubkey())
    ledger = await EmbeddedLedger.open(store)
    assert await ledger.get_balance(alice.pubkey()) == 1_000_000
    with pytest.raises(TransactionRejected, match="airdrop must be"):
        await ledger.airdrop(alice.pubkey(), ledger.max_airdrop_lamports + 1)
    await ledger.close()
