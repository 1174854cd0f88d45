"""The embedded ledger: the real Solana runtime (LiteSVM) with durable accounts.

For local use jupyter-io needs no validator: :class:`EmbeddedLedger` runs transactions through
``solders.litesvm.LiteSVM`` (the actual SVM, the real SPL Token and Associated Token programs)
and keeps its accounts in a database, so a restart loses no balance. It is served to clients as
a Solana JSON-RPC endpoint by :mod:`jupyter_io.coordinator.ledger_rpc`; nothing talks to it directly
except that endpoint, which is what keeps one code path for the embedded ledger and a real
cluster.

How it departs from LiteSVM's defaults, and why:

- **Durability without replay.** After every transaction that lands, the writable accounts it
  named are read back and upserted into a :class:`LedgerStore` (one row per account, keyed by
  address), in the same database transaction as the current slot. On start every stored account
  is written back with ``set_account``. Start-up therefore costs one row per live account, never
  one per past transaction. Closed accounts are deleted. Programs, sysvars and the wrapped-SOL
  mint are not stored: the runtime provides them (the mint is created on every start, LiteSVM
  does not ship it).
- **Blockhashes like a cluster's.** LiteSVM accepts only its one current blockhash, and that
  hash is the same in every fresh instance, so after a restart an old signed transaction would
  be accepted again. The ledger therefore checks blockhashes itself: slots advance with wall
  time (400 ms, as on mainnet), each slot gets a fresh random blockhash when one is asked for,
  and a transaction is accepted while its blockhash is at most 150 slots old (about 60 s) and
  its signature has not been seen. Hashes are forgotten on restart, so nothing signed before a
  restart can land after it.
- **Preflight.** ``send_transaction`` simulates first (unless told to skip preflight) and
  refuses a failing transaction without charging its fee, as an RPC node's preflight does; a
  transaction sent with ``skip_preflight`` that fails lands, pays its fee and records its error.
- **One writer.** All access to the runtime goes through one ``asyncio.Lock``; a transaction's
  accounts are durable before its signature is returned or its status becomes visible.

Start one with ``ledger = await EmbeddedLedger.open(store)`` (``store``: the coordinator's
:class:`~jupyter_io.coordinator.store.SqlLedgerStore`, or none for a throw-away in-memory
ledger), serve it with :func:`jupyter_io.coordinator.ledger_rpc.serve_ledger` and finish with
``await ledger.close()``.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from solders.account import Account
from solders.address_lookup_table_account import AddressLookupTable
from solders.hash import Hash
from solders.litesvm import LiteSVM
from solders.message import Message, MessageV0
from solders.pubkey import Pubkey
from solders.rpc.responses import RpcSimulateTransactionResult
from solders.signature import Signature
from solders.transaction import VersionedTransaction
from solders.transaction_metadata import FailedTransactionMetadata, TransactionMetadata
from solders.transaction_status import TransactionErrorFieldless, TransactionStatus
from spl.token.constants import TOKEN_PROGRAM_ID

from ..errors import PaymentError
from ..payments.amounts import FEE_PER_SIGNATURE, LAMPORTS_PER_SOL
from ..payments.token_accounts import MINT_LEN, NATIVE_MINT, native_mint_data

__all__ = [
    "MAX_BLOCKHASH_AGE",
    "SLOT_SECONDS",
    "EmbeddedLedger",
    "LedgerSnapshot",
    "LedgerStore",
    "MemoryLedgerStore",
    "SimulationOutcome",
    "TransactionRecord",
    "TransactionRejected",
    "error_json",
    "error_text",
]

#: Wall-clock seconds per slot (mainnet's target).
SLOT_SECONDS = 0.4
#: How many slots a blockhash stays valid (a cluster's ``MAX_PROCESSING_AGE``).
MAX_BLOCKHASH_AGE = 150

_SYSVAR_OWNER = Pubkey.from_string("Sysvar1111111111111111111111111111111111111")


# ----------------------------------------------------------------------------------------------
# Errors


class TransactionRejected(PaymentError):
    """The ledger refused a request; carries the JSON-RPC error a real node would return.

    ``code`` follows the Solana RPC: -32002 preflight failure (``data`` holds the simulation:
    ``err``, ``logs``, ``unitsConsumed``), -32003 signature verification failure, -32602
    invalid transaction or parameters, -32005 unhealthy ledger.
    """

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data


def error_json(err: Any) -> Any:
    """A solders ``TransactionError`` as the JSON a node puts in ``err`` (None stays None)."""
    if err is None:
        return None
    return json.loads(TransactionStatus(0, None, None, err, None).to_json())["err"]


_ERROR_TEXT = {
    "AccountInUse": "Account in use",
    "AccountNotFound": "Attempt to debit an account but found no record of a prior credit.",
    "AlreadyProcessed": "This transaction has already been processed",
    "BlockhashNotFound": "Blockhash not found",
    "InsufficientFundsForFee": "Insufficient funds for fee",
    "InvalidAccountForFee": "This account may not be used to pay transaction fees",
    "SignatureFailure": "Transaction did not pass signature verification",
    "ProgramAccountNotFound": "Attempt to load a program that does not exist",
}
_INSTRUCTION_ERROR_TEXT = {
    "AccountAlreadyInitialized": "instruction requires an uninitialized account",
    "InvalidAccountData": "invalid account data for instruction",
    "MissingRequiredSignature": "missing required signature for instruction",
    "UninitializedAccount": "instruction requires an initialized account",
    "IllegalOwner": "Provided owner is not allowed",
    "InsufficientFunds": "insufficient funds for instruction",
}


def error_text(err: Any) -> str:
    """Human text for a transaction error, worded like the Solana runtime's messages."""
    value = error_json(err)
    if isinstance(value, str):
        return _ERROR_TEXT.get(value, value)
    if isinstance(value, dict) and "InstructionError" in value:
        index, inner = value["InstructionError"]
        if isinstance(inner, dict) and "Custom" in inner:
            detail = f"custom program error: {inner['Custom']:#x}"
        elif isinstance(inner, str):
            detail = _INSTRUCTION_ERROR_TEXT.get(inner, inner)
        else:
            detail = json.dumps(inner)
        return f"Error processing Instruction {index}: {detail}"
    if isinstance(value, dict) and "InsufficientFundsForRent" in value:
        index = value["InsufficientFundsForRent"].get("account_index")
        return f"Transaction results in an account ({index}) with insufficient funds for rent"
    return json.dumps(value)


def _unhealthy(detail: str) -> TransactionRejected:
    # A node sends data.numSlotsBehind with -32005; solders' parser panics without it.
    return TransactionRejected(-32005, f"Node is unhealthy: {detail}", {"numSlotsBehind": None})


def _is_fatal(exc: BaseException) -> bool:
    return isinstance(exc, KeyboardInterrupt | SystemExit | GeneratorExit | asyncio.CancelledError)


# ----------------------------------------------------------------------------------------------
# Storage


@dataclass(slots=True)
class LedgerSnapshot:
    """What a store hands back on start: every live account and the ledger's metadata."""

    accounts: list[tuple[Pubkey, Account]] = field(default_factory=list)
    meta: dict[str, str] = field(default_factory=dict)


class LedgerStore(Protocol):
    """Where the embedded ledger keeps its accounts. One row per account, never a journal.

    ``load`` is called once on start; ``commit`` after each landed transaction with the
    accounts it changed (``None`` = closed) and metadata, atomically; ``close`` at the end.
    """

    async def load(self) -> LedgerSnapshot: ...

    async def commit(
        self, accounts: Sequence[tuple[Pubkey, Account | None]], meta: Mapping[str, str]
    ) -> None: ...

    async def close(self) -> None: ...


class MemoryLedgerStore:
    """A store in process memory: nothing survives the process, but a ledger reopened on the
    same object gets its accounts back (handy for tests and throw-away demos)."""

    def __init__(self) -> None:
        self.accounts: dict[Pubkey, Account] = {}
        self.meta: dict[str, str] = {}

    async def load(self) -> LedgerSnapshot:
        return LedgerSnapshot(list(self.accounts.items()), dict(self.meta))

    async def commit(
        self, accounts: Sequence[tuple[Pubkey, Account | None]], meta: Mapping[str, str]
    ) -> None:
        for pubkey, account in accounts:
            if account is None:
                self.accounts.pop(pubkey, None)
            else:
                self.accounts[pubkey] = account
        self.meta.update(meta)

    async def close(self) -> None:
        return None


# ----------------------------------------------------------------------------------------------
# The ledger


@dataclass(slots=True)
class TransactionRecord:
    """A landed transaction, as ``getSignatureStatuses`` and ``getTransaction`` report it."""

    signature: Signature
    slot: int
    err: Any  # a solders TransactionError, or None on success
    fee: int
    logs: list[str]
    compute_units: int
    pre_balances: list[int]
    post_balances: list[int]
    block_time: int
    transaction: VersionedTransaction | None  # None for airdrops


@dataclass(slots=True)
class SimulationOutcome:
    """What ``simulateTransaction`` returns: the error (None if it would succeed), logs, cost."""

    err: Any
    logs: list[str]
    compute_units: int
    fee: int
    accounts: list[Account | None] | None = None
    replacement_blockhash: tuple[Hash, int] | None = None


def _writable_keys(message: Message | MessageV0, svm: LiteSVM) -> list[Pubkey]:
    keys = list(message.account_keys)
    header = message.header
    signed = header.num_required_signatures
    writable = [
        key
        for i, key in enumerate(keys)
        if (i < signed - header.num_readonly_signed_accounts)
        or (signed <= i < len(keys) - header.num_readonly_unsigned_accounts)
    ]
    if isinstance(message, MessageV0):
        for lookup in message.address_table_lookups:
            table = svm.get_account(lookup.account_key)
            if table is None:
                continue
            addresses = AddressLookupTable.deserialize(bytes(table.data)).addresses
            writable.extend(addresses[i] for i in lookup.writable_indexes if i < len(addresses))
    return writable


class EmbeddedLedger:
    """LiteSVM plus durable accounts, cluster-like blockhashes and preflight (see module doc).

    Create with :meth:`open`; every method that touches the runtime is a coroutine because it
    waits its turn on the ledger's lock. The JSON-RPC layer is the intended caller.
    """

    def __init__(
        self,
        store: LedgerStore | None = None,
        *,
        slot_seconds: float = SLOT_SECONDS,
        max_airdrop_lamports: int = 1_000 * LAMPORTS_PER_SOL,
        history_limit: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store: LedgerStore = store if store is not None else MemoryLedgerStore()
        self.max_airdrop_lamports = max_airdrop_lamports
        self._slot_seconds = slot_seconds
        self._history_limit = history_limit
        self._clock = clock
        self._lock = asyncio.Lock()
        self._svm: LiteSVM | None = None
        self._base_slot = 0
        self._t0 = 0.0
        self._svm_slot = -1
        self._latest: tuple[Hash, int] | None = None
        self._recent: OrderedDict[Hash, int] = OrderedDict()
        self._history: OrderedDict[Signature, TransactionRecord] = OrderedDict()
        self._skip: set[Pubkey] = set()
        self._failure: BaseException | None = None
        self.genesis_hash = Hash.default()
        self.transaction_count = 0

    @classmethod
    async def open(cls, store: LedgerStore | None = None, **options: Any) -> EmbeddedLedger:
        """Start a ledger on ``store`` (default: in memory), restoring every stored account."""
        ledger = cls(store, **options)
        await ledger._start()
        return ledger

    async def _start(self) -> None:
        snapshot = await self.store.load()
        svm = LiteSVM()
        # The ledger checks blockhashes (restart-safe) and signatures (once, before preflight).
        svm.with_blockhash_check(False)
        svm.with_sigverify(False)
        svm.set_account(
            NATIVE_MINT,
            Account(
                lamports=svm.minimum_balance_for_rent_exemption(MINT_LEN),
                data=native_mint_data(),
                owner=TOKEN_PROGRAM_ID,
                executable=False,
                rent_epoch=0,
            ),
        )
        for pubkey, account in snapshot.accounts:
            svm.set_account(pubkey, account)
        self._skip = {NATIVE_MINT, svm.airdrop_pubkey()}
        self._svm = svm
        meta = snapshot.meta
        self._base_slot = int(meta.get("slot", "0")) + 1
        self._t0 = self._clock()
        self.transaction_count = int(meta.get("transaction_count", "0"))
        if "genesis_hash" in meta:
            self.genesis_hash = Hash.from_string(meta["genesis_hash"])
        else:
            self.genesis_hash = Hash(os.urandom(32))
            await self.store.commit([], {"genesis_hash": str(self.genesis_hash)})

    async def close(self) -> None:
        """Stop accepting requests and close the store. Committed accounts are already durable."""
        async with self._lock:
            if self._svm is None:
                return
            self._svm = None
            await self.store.close()

    # -- time, slots, blockhashes -------------------------------------------------------------

    @property
    def slot(self) -> int:
        """The current slot: advances every 400 ms and never goes back, even across restarts."""
        elapsed = self._clock() - self._t0
        return self._base_slot + int(elapsed / self._slot_seconds + 1e-9)  # 0.4 is inexact

    def latest_blockhash(self) -> tuple[Hash, int]:
        """A blockhash to sign with and the last block height at which it is still accepted."""
        self._runtime()
        slot = self.slot
        if self._latest is None or self._latest[1] != slot:
            blockhash = Hash(os.urandom(32))
            self._recent[blockhash] = slot
            self._latest = (blockhash, slot)
            oldest = slot - MAX_BLOCKHASH_AGE
            while self._recent and next(iter(self._recent.values())) < oldest:
                self._recent.popitem(last=False)
        return self._latest[0], self._latest[1] + MAX_BLOCKHASH_AGE

    def is_blockhash_valid(self, blockhash: Hash) -> bool:
        """Whether a transaction signed over ``blockhash`` would still be accepted."""
        slot = self._recent.get(blockhash)
        return slot is not None and slot >= self.slot - MAX_BLOCKHASH_AGE

    # -- reads -------------------------------------------------------------------------------

    def _runtime(self) -> LiteSVM:
        if self._failure is not None:
            raise _unhealthy(
                f"the ledger store failed ({self._failure}); restart the coordinator to resume "
                f"from the last committed state"
            )
        if self._svm is None:
            raise _unhealthy("the ledger is closed")
        return self._svm

    @property
    def healthy(self) -> bool:
        """False once closed or after a store failure (then every call is refused)."""
        return self._svm is not None and self._failure is None

    async def get_accounts(self, pubkeys: Sequence[Pubkey]) -> list[Account | None]:
        """Current state of ``pubkeys`` (``None`` for absent or closed accounts)."""
        async with self._lock:
            svm = self._runtime()
            accounts = [svm.get_account(k) for k in pubkeys]
        return [a if a is not None and a.lamports > 0 else None for a in accounts]

    async def get_account(self, pubkey: Pubkey) -> Account | None:
        """Current state of one account, ``None`` if it does not exist."""
        return (await self.get_accounts([pubkey]))[0]

    async def get_balance(self, pubkey: Pubkey) -> int:
        """Lamports held by ``pubkey`` (0 for an absent account)."""
        account = await self.get_account(pubkey)
        return account.lamports if account is not None else 0

    def minimum_balance_for_rent_exemption(self, data_len: int) -> int:
        """Lamports an account of ``data_len`` bytes needs to be rent-exempt."""
        return self._runtime().minimum_balance_for_rent_exemption(data_len)

    def fee_for_message(self, message: Any) -> int | None:
        """The fee the ledger charges for ``message``; None if its blockhash has expired."""
        if not self.is_blockhash_valid(message.recent_blockhash):
            return None
        return FEE_PER_SIGNATURE * message.header.num_required_signatures

    def transaction(self, signature: Signature) -> TransactionRecord | None:
        """The record of a landed transaction still in the ledger's history, else None."""
        return self._history.get(signature)

    # -- writes ------------------------------------------------------------------------------

    def _check(self, tx: VersionedTransaction, sig_verify: bool) -> Message | MessageV0:
        message = tx.message
        if not isinstance(message, Message | MessageV0):
            raise TransactionRejected(
                -32602, "invalid transaction: only legacy and v0 messages are supported"
            )
        try:
            tx.sanitize()
        except Exception as exc:
            raise TransactionRejected(-32602, f"invalid transaction: {exc}") from None
        if sig_verify and not all(tx.verify_with_results()):
            raise TransactionRejected(-32003, "Transaction signature verification failure")
        return message

    def _preflight_error(self, err: Any, logs: list[str] | None = None, units: int = 0) -> Any:
        data = RpcSimulateTransactionResult(
            err=err, logs=logs or [], accounts=None, units_consumed=units, return_data=None
        )
        return TransactionRejected(
            -32002,
            f"Transaction simulation failed: {error_text(err)}",
            json.loads(data.to_json()),
        )

    def _sync_clock(self, svm: LiteSVM, slot: int) -> None:
        if slot != self._svm_slot:
            svm.warp_to_slot(slot)
            self._svm_slot = slot

    async def send_transaction(
        self, tx: VersionedTransaction, *, skip_preflight: bool = False
    ) -> Signature:
        """Land ``tx``; return its signature once its accounts are durable.

        Raises :class:`TransactionRejected` for a malformed or badly signed transaction, an
        expired blockhash, or (with preflight) a transaction that would fail; then nothing has
        changed. With ``skip_preflight`` a failing transaction lands, pays its fee and its
        status carries the error.
        """
        message = self._check(tx, sig_verify=True)
        signature = tx.signatures[0]
        async with self._lock:
            svm = self._runtime()
            if signature in self._history:
                if skip_preflight:
                    return signature
                raise self._preflight_error(TransactionErrorFieldless.AlreadyProcessed)
            if not self.is_blockhash_valid(message.recent_blockhash):
                raise self._preflight_error(TransactionErrorFieldless.BlockhashNotFound)
            slot = self.slot
            self._sync_clock(svm, slot)
            writable = _writable_keys(message, svm)
            keys = list(message.account_keys)
            try:
                if not skip_preflight:
                    simulated = svm.simulate_transaction(tx)
                    if isinstance(simulated, FailedTransactionMetadata):
                        meta = simulated.meta()
                        raise self._preflight_error(
                            simulated.err(), meta.logs(), meta.compute_units_consumed()
                        )
                pre = [svm.get_balance(k) or 0 for k in keys]
                result = svm.send_transaction(tx)
            except TransactionRejected:
                raise
            except BaseException as exc:
                if _is_fatal(exc):
                    raise
                # LiteSVM panics (pyo3 PanicException, a BaseException) on some malformed input.
                raise TransactionRejected(
                    -32602, f"invalid transaction: the runtime refused it ({exc})"
                ) from None
            if isinstance(result, FailedTransactionMetadata):
                err, meta = result.err(), result.meta()
                if meta.fee() == 0 and err in (
                    TransactionErrorFieldless.AccountNotFound,
                    TransactionErrorFieldless.InsufficientFundsForFee,
                    TransactionErrorFieldless.InvalidAccountForFee,
                    TransactionErrorFieldless.SanitizeFailure,
                ):
                    # Not landed at all (no fee could be charged): a node drops these.
                    raise self._preflight_error(err, meta.logs(), meta.compute_units_consumed())
            else:
                err, meta = None, result
            post = [svm.get_balance(k) or 0 for k in keys]
            record = TransactionRecord(
                signature=signature,
                slot=slot,
                err=err,
                fee=meta.fee(),
                logs=list(meta.logs()),
                compute_units=meta.compute_units_consumed(),
                pre_balances=pre,
                post_balances=post,
                block_time=int(time.time()),
                transaction=tx,
            )
            await self._persist(svm, writable, record)
            return signature

    async def _persist(
        self, svm: LiteSVM, keys: Sequence[Pubkey], record: TransactionRecord
    ) -> None:
        changed: list[tuple[Pubkey, Account | None]] = []
        seen: set[Pubkey] = set()
        for key in keys:
            if key in seen or key in self._skip:
                continue
            seen.add(key)
            account = svm.get_account(key)
            if account is None or account.lamports == 0:
                changed.append((key, None))
            elif account.executable or account.owner == _SYSVAR_OWNER:
                continue
            else:
                changed.append((key, account))
        self.transaction_count += 1
        meta = {"slot": str(record.slot), "transaction_count": str(self.transaction_count)}
        try:
            await self.store.commit(changed, meta)
        except BaseException as exc:
            # The runtime is now ahead of the store; serving on would show balances that a
            # restart forgets. Refuse everything from here on; a restart resumes consistently.
            self._failure = exc
            if _is_fatal(exc):
                raise
            raise _unhealthy(f"the ledger store failed ({exc})") from None
        self._history[record.signature] = record
        self._trim_history()

    def _trim_history(self) -> None:
        # Keep every signature whose blockhash could still be valid (replay protection); beyond
        # that, keep at most history_limit records for getTransaction/getSignatureStatuses.
        oldest_live = self.slot - MAX_BLOCKHASH_AGE - 1
        while len(self._history) > self._history_limit:
            first = next(iter(self._history.values()))
            if first.slot >= oldest_live:
                break
            self._history.popitem(last=False)

    async def simulate_transaction(
        self,
        tx: VersionedTransaction,
        *,
        sig_verify: bool = False,
        replace_recent_blockhash: bool = False,
        accounts: Sequence[Pubkey] | None = None,
    ) -> SimulationOutcome:
        """Run ``tx`` without committing anything; report its error, logs and cost."""
        if sig_verify and replace_recent_blockhash:
            raise TransactionRejected(
                -32602, "sigVerify may not be used with replaceRecentBlockhash"
            )
        self._check(tx, sig_verify=sig_verify)
        async with self._lock:
            svm = self._runtime()
            replacement = None
            if replace_recent_blockhash:
                replacement = self.latest_blockhash()
            elif not self.is_blockhash_valid(tx.message.recent_blockhash):
                return SimulationOutcome(TransactionErrorFieldless.BlockhashNotFound, [], 0, 0)
            elif tx.signatures[0] in self._history:
                return SimulationOutcome(TransactionErrorFieldless.AlreadyProcessed, [], 0, 0)
            self._sync_clock(svm, self.slot)
            try:
                result = svm.simulate_transaction(tx)
            except BaseException as exc:
                if _is_fatal(exc):
                    raise
                raise TransactionRejected(
                    -32602, f"invalid transaction: the runtime refused it ({exc})"
                ) from None
            if isinstance(result, FailedTransactionMetadata):
                err, meta = result.err(), result.meta()
                post: dict[Pubkey, Account] = {}
            else:
                err, meta = None, result.meta()
                post = dict(result.post_accounts())
            wanted = None
            if accounts is not None:
                wanted = []
                for key in accounts:
                    account = post.get(key, svm.get_account(key))
                    wanted.append(account if account is not None and account.lamports else None)
        return SimulationOutcome(
            err=err,
            logs=list(meta.logs()),
            compute_units=meta.compute_units_consumed(),
            fee=meta.fee(),
            accounts=wanted,
            replacement_blockhash=replacement,
        )

    async def airdrop(self, pubkey: Pubkey, lamports: int) -> Signature:
        """Mint ``lamports`` to ``pubkey`` from the ledger's faucet (embedded ledger only)."""
        if not 0 < lamports <= self.max_airdrop_lamports:
            raise TransactionRejected(
                -32602,
                f"airdrop must be between 1 lamport and {self.max_airdrop_lamports} lamports",
            )
        async with self._lock:
            svm = self._runtime()
            slot = self.slot
            self._sync_clock(svm, slot)
            # A fresh internal blockhash, or two equal airdrops would share one signature.
            svm.expire_blockhash()
            pre = svm.get_balance(pubkey) or 0
            result = svm.airdrop(pubkey, lamports)
            if isinstance(result, FailedTransactionMetadata):
                raise TransactionRejected(-32603, f"airdrop failed: {error_text(result.err())}")
            assert isinstance(result, TransactionMetadata)
            record = TransactionRecord(
                signature=result.signature(),
                slot=slot,
                err=None,
                fee=0,
                logs=list(result.logs()),
                compute_units=result.compute_units_consumed(),
                pre_balances=[pre],
                post_balances=[svm.get_balance(pubkey) or 0],
                block_time=int(time.time()),
                transaction=None,
            )
            await self._persist(svm, [pubkey], record)
            return record.signature
