"""SOL escrow per session: a wrapped-SOL account that only 2 of {user, provider, arbiter} can move.

No custom on-chain program: the escrow is an SPL Token account of the native mint (wSOL)
owned by an SPL Token **2-of-3 multisig** of the user, the provider and the coordinator (the
arbiter). Both live at addresses derived from the user's key with ``create_account_with_seed``:

- the multisig per (user, provider, arbiter) triple — its rent cannot be reclaimed (SPL Token
  has no instruction to close a multisig), so it is created once and reused by every session of
  that triple;
- the escrow per session (the seed binds the session id, provider and arbiter).

Lifecycle, each step one transaction, the same code against the embedded ledger or any cluster:

1. :meth:`EscrowClient.open_escrow` — signed by the user only: creates the multisig if missing,
   creates the escrow funded with the deposit and initialises it (fee 5,000 lamports).
   :meth:`EscrowClient.top_up` — signed by the user only, any time before settlement: moves
   more SOL into the escrow and syncs its wSOL amount (fee 5,000 lamports).
2. :meth:`EscrowClient.verify_escrow` — the coordinator checks on-chain, before activating the
   lease, that the escrow is a wSOL account owned by the right 2-of-3 multisig and holds enough.
3. :meth:`EscrowClient.settle` — signed by arbiter + provider: pays the metered amount into the
   provider's wSOL account (its associated token account, created if missing *at the provider's
   expense*: the rent stays the provider's and comes back when it unwraps) and closes the escrow
   to the user (refund plus the escrow's rent). Fee 10,000 lamports, paid by the provider by
   default. Idempotent: settling a closed escrow is a no-op.
   :meth:`EscrowClient.refund` — signed by user + arbiter when the provider failed: pays the
   provider its delivered share (wSOL if it has a wSOL account, otherwise native SOL from the
   refund, in the same transaction) and closes the escrow to the user.
4. :meth:`EscrowClient.unwrap` — the provider turns its wSOL back into SOL.

Conservation: every escrowed lamport ends with the provider, with the user, or stays in the
escrow; the only other movements are the fees (5,000 lamports per signature, reported on each
result) and the multisig's one-time rent.

For co-signing across machines (arbiter on the coordinator, provider on its host), build the
message with :func:`settlement_message` / :func:`refund_message`, send ``bytes(message)``
(``MessageV0.from_bytes`` reads it back), have each party sign
``solders.message.to_bytes_versioned(message)`` — the versioned form a transaction's
signatures cover, not ``bytes(message)`` — and :meth:`EscrowClient.submit` the signatures
(``Presigner``).
Start with ``async with EscrowClient.connect(url) as escrow: ...``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal, TypeVar

from solana.exceptions import SolanaRpcException
from solana.rpc.async_api import AsyncClient
from solana.rpc.commitment import Commitment, Confirmed
from solana.rpc.core import RPCException
from solana.rpc.models import TxOpts
from solders.account import Account
from solders.hash import Hash
from solders.instruction import Instruction
from solders.keypair import Keypair
from solders.message import MessageV0
from solders.presigner import Presigner
from solders.pubkey import Pubkey
from solders.signature import Signature
from solders.system_program import ID as SYSTEM_PROGRAM_ID
from solders.transaction import VersionedTransaction
from solders.transaction_status import TransactionStatus
from spl.token.constants import TOKEN_PROGRAM_ID
from spl.token.instructions import (
    create_idempotent_associated_token_account,
    get_associated_token_address,
)

from ..errors import InsufficientFunds, PaymentError
from .amounts import FEE_PER_SIGNATURE, format_sol
from .instructions import (
    CLOSE_ACCOUNT_TAG,
    SYSTEM_TRANSFER_TAG,
    TRANSFER_CHECKED_TAG,
    close_wsol,
    compile_message,
    create_multisig,
    create_wsol_account,
    derived_seed,
    move_wsol,
    pay_sol,
    wrap_sol,
)
from .token_accounts import (
    ACCOUNT_LEN,
    MULTISIG_LEN,
    NATIVE_MINT,
    Multisig,
    TokenAccount,
    decode_multisig,
    decode_token_account,
    multisig_signer_problems,
    wsol_account_problems,
)

__all__ = [
    "MULTISIG_THRESHOLD",
    "ClosingTransaction",
    "EscrowClient",
    "EscrowError",
    "EscrowReceipt",
    "EscrowState",
    "EscrowTerms",
    "Settlement",
    "Signer",
    "TopUpReceipt",
    "TransactionFailed",
    "close_escrow",
    "escrow_seed",
    "escrow_transfer",
    "multisig_problems",
    "multisig_seed",
    "opening_instructions",
    "provider_payout",
    "refund_message",
    "settlement_message",
    "setup_message",
    "token_problems",
    "top_up_message",
]

#: Signatures of the {user, provider, arbiter} multisig needed to move escrowed funds.
MULTISIG_THRESHOLD = 2

#: A party's signature: its keypair here, or a ``Presigner`` carrying a signature made elsewhere.
Signer = Keypair | Presigner

_SEED_DOMAIN = b"jupyter-io/escrow/v1/"
_VERIFIED_CACHE_SIZE = 10_000
_T = TypeVar("_T")
_Build = Callable[[Hash], MessageV0]  # a message for a given blockhash


class EscrowError(PaymentError):
    """The escrow is missing or is not what the session agreed (wrong owner, mint, amount)."""


class TransactionFailed(PaymentError):
    """The cluster refused or failed a transaction. ``err`` is the RPC's error JSON."""

    def __init__(self, message: str, err: Any = None, logs: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.err = err
        self.logs = list(logs)


# ----------------------------------------------------------------------------------------------
# Addresses


def _seed(kind: str, *parts: bytes) -> str:
    return derived_seed(_SEED_DOMAIN, kind, b"".join(parts))


def multisig_seed(provider: Pubkey, arbiter: Pubkey) -> str:
    """Seed (under the user's key) of the multisig shared by every session of this triple."""
    return _seed("ms", bytes(provider), bytes(arbiter))


def escrow_seed(provider: Pubkey, arbiter: Pubkey, session_id: str) -> str:
    """Seed (under the user's key) of one session's escrow account."""
    return _seed("es", bytes(provider), bytes(arbiter), session_id.encode())


@dataclass(frozen=True)
class EscrowTerms:
    """Who is party to a session's escrow; every address follows from these four values
    (derived once per object: a program address costs a curve check)."""

    user: Pubkey
    provider: Pubkey
    arbiter: Pubkey
    session_id: str

    def __post_init__(self) -> None:
        if len({self.user, self.provider, self.arbiter}) != 3:
            raise EscrowError("user, provider and arbiter must be three different keys")
        if not self.session_id:
            raise EscrowError("an escrow needs a session id (the lease id)")

    @cached_property
    def multisig(self) -> Pubkey:
        """The 2-of-3 multisig that owns the escrow."""
        seed = multisig_seed(self.provider, self.arbiter)
        return Pubkey.create_with_seed(self.user, seed, TOKEN_PROGRAM_ID)

    @cached_property
    def escrow(self) -> Pubkey:
        """The session's wSOL escrow account."""
        seed = escrow_seed(self.provider, self.arbiter, self.session_id)
        return Pubkey.create_with_seed(self.user, seed, TOKEN_PROGRAM_ID)

    @cached_property
    def provider_wsol(self) -> Pubkey:
        """The provider's wSOL (associated token) account, where it is paid."""
        return get_associated_token_address(self.provider, NATIVE_MINT)

    @property
    def signers(self) -> tuple[Pubkey, Pubkey, Pubkey]:
        """The multisig's members, in the order they are registered on-chain."""
        return (self.user, self.provider, self.arbiter)


@dataclass(frozen=True, slots=True)
class EscrowState:
    """An escrow as verified on-chain. ``amount`` is the wSOL balance in lamports."""

    address: Pubkey
    amount: int
    lamports: int
    rent_exempt_reserve: int


@dataclass(frozen=True, slots=True)
class EscrowReceipt:
    """Result of :meth:`EscrowClient.open_escrow`. ``signature`` is None when the escrow
    already existed (a retried setup); then ``fee`` and rents are 0."""

    terms: EscrowTerms
    state: EscrowState
    signature: Signature | None
    fee: int
    multisig_created: bool
    #: Lamports the user spent on rent: the escrow's (returned at settlement) and, the first
    #: time for this triple, the multisig's (never returned).
    escrow_rent: int
    multisig_rent: int


@dataclass(frozen=True, slots=True)
class TopUpReceipt:
    """Result of :meth:`EscrowClient.top_up`: ``amount`` lamports moved from the user into the
    escrow by transaction ``signature`` (the user paid ``fee``); ``state`` is the escrow after."""

    terms: EscrowTerms
    signature: Signature
    amount: int
    fee: int
    state: EscrowState


@dataclass(frozen=True, slots=True)
class Settlement:
    """Result of :meth:`EscrowClient.settle` or :meth:`EscrowClient.refund`.

    ``already_settled`` means the escrow was found closed (or never opened): nothing moved,
    ``signature`` is None. Otherwise the provider received ``paid_to_provider`` (as ``payout``:
    wSOL into its token account, or native SOL), the user ``refunded_to_user`` (unspent
    deposit plus the escrow's rent, before its share of fees), and ``fee_payer`` paid ``fee``.
    """

    terms: EscrowTerms
    signature: Signature | None
    paid_to_provider: int
    refunded_to_user: int
    fee: int
    fee_payer: Pubkey | None
    payout: Literal["wsol", "sol", "none"]
    already_settled: bool = False


@dataclass(frozen=True, slots=True)
class ClosingTransaction:
    """A landed transaction that closed an escrow (:meth:`EscrowClient.closing_transaction`):
    it paid the provider ``paid_to_provider`` lamports from the escrow, was signed by
    ``signers`` and cost ``fee``."""

    signature: Signature
    paid_to_provider: int
    signers: frozenset[Pubkey]
    fee: int


# ----------------------------------------------------------------------------------------------
# Pure message builders (no I/O): what each party signs


def setup_message(
    terms: EscrowTerms,
    deposit: int,
    *,
    escrow_rent: int,
    multisig_rent: int | None,
    blockhash: Hash,
) -> MessageV0:
    """The setup transaction's message, paid and signed by the user alone.

    ``multisig_rent`` None means the multisig already exists; otherwise it is created and
    initialised first, with that rent.
    """
    instructions = opening_instructions(
        terms, payer=terms.user, lamports=escrow_rent + deposit, multisig_rent=multisig_rent
    )
    return compile_message(terms.user, instructions, blockhash)


def top_up_message(terms: EscrowTerms, lamports: int, *, blockhash: Hash) -> MessageV0:
    """The top-up's message, paid and signed by the user alone: a system transfer of
    ``lamports`` into the escrow account, then SyncNative so its wSOL amount counts them.

    Atomic: if the escrow is no longer a wSOL account (settled meanwhile), SyncNative fails
    and the transfer with it, so no lamport lands on a closed escrow's address.
    """
    instructions = wrap_sol(payer=terms.user, account=terms.escrow, lamports=lamports)
    return compile_message(terms.user, instructions, blockhash)


def opening_instructions(
    terms: EscrowTerms, *, payer: Pubkey, lamports: int, multisig_rent: int | None
) -> list[Instruction]:
    """Create the escrow at the user's derived address with ``lamports`` (its rent plus
    what it holds from the start) from ``payer``, owned by the 2-of-3 multisig; first, when
    ``multisig_rent`` is not None, create and initialise that multisig with that rent. The
    user's key is the base of both addresses, so the user signs."""
    instructions: list[Instruction] = []
    if multisig_rent is not None:
        instructions += create_multisig(
            payer=payer,
            base=terms.user,
            seed=multisig_seed(terms.provider, terms.arbiter),
            address=terms.multisig,
            rent=multisig_rent,
            threshold=MULTISIG_THRESHOLD,
            signers=terms.signers,
        )
    instructions += create_wsol_account(
        payer=payer,
        base=terms.user,
        seed=escrow_seed(terms.provider, terms.arbiter, terms.session_id),
        address=terms.escrow,
        lamports=lamports,
        owner=terms.multisig,
    )
    return instructions


def escrow_transfer(
    terms: EscrowTerms, dest: Pubkey, amount: int, cosigners: Sequence[Pubkey]
) -> Instruction:
    """Move ``amount`` of the escrow's wSOL to the token account ``dest``; ``cosigners``
    are the two of the multisig who sign."""
    return move_wsol(
        source=terms.escrow, dest=dest, owner=terms.multisig, amount=amount, signers=cosigners
    )


def provider_payout(
    terms: EscrowTerms,
    amount: int,
    cosigners: Sequence[Pubkey],
    *,
    create_payout_for: Pubkey | None,
) -> list[Instruction]:
    """Pay ``amount`` of the escrow's wSOL into the provider's wSOL account, created first
    (idempotently) at ``create_payout_for``'s expense when that is not None; nothing when
    ``amount`` is 0."""
    instructions: list[Instruction] = []
    if amount > 0:
        if create_payout_for is not None:
            instructions.append(
                create_idempotent_associated_token_account(
                    payer=create_payout_for, owner=terms.provider, mint=NATIVE_MINT
                )
            )
        instructions.append(escrow_transfer(terms, terms.provider_wsol, amount, cosigners))
    return instructions


def close_escrow(terms: EscrowTerms, dest: Pubkey, cosigners: Sequence[Pubkey]) -> Instruction:
    """Close the escrow (two of the multisig, ``cosigners``, sign): its balance, wSOL and
    rent alike, goes to ``dest``."""
    return close_wsol(account=terms.escrow, dest=dest, owner=terms.multisig, signers=cosigners)


def _move_and_close(
    terms: EscrowTerms,
    amount: int,
    cosigners: Sequence[Pubkey],
    *,
    create_payout_for: Pubkey | None,
) -> list[Instruction]:
    instructions = provider_payout(terms, amount, cosigners, create_payout_for=create_payout_for)
    instructions.append(close_escrow(terms, terms.user, cosigners))
    return instructions


def settlement_message(
    terms: EscrowTerms,
    amount: int,
    *,
    blockhash: Hash,
    fee_payer: Pubkey | None = None,
    create_payout_account: bool = True,
) -> MessageV0:
    """The normal settlement's message, to be signed by the arbiter and the provider.

    Pays ``amount`` lamports of wSOL to the provider's associated token account (created in
    the same transaction if needed, rent paid by the provider, who recovers it by unwrapping)
    and closes the escrow to the user. ``fee_payer`` defaults to the provider; it may be the
    arbiter.
    """
    payer = fee_payer or terms.provider
    if payer not in (terms.provider, terms.arbiter):
        raise EscrowError("the settlement's fee payer must be the provider or the arbiter")
    instructions = _move_and_close(
        terms,
        amount,
        (terms.arbiter, terms.provider),
        create_payout_for=terms.provider if create_payout_account else None,
    )
    return compile_message(payer, instructions, blockhash)


def refund_message(
    terms: EscrowTerms,
    provider_share: int,
    *,
    blockhash: Hash,
    provider_has_wsol_account: bool,
    fee_payer: Pubkey | None = None,
) -> MessageV0:
    """The refund's message (provider failed), to be signed by the user and the arbiter.

    The provider still gets ``provider_share`` for the time it delivered: as wSOL into its
    token account when it has one, otherwise in native SOL that the user passes on from the
    refund in the same transaction (the provider is not there to pay for a token account).
    ``fee_payer`` defaults to the user; it may be the arbiter.
    """
    payer = fee_payer or terms.user
    if payer not in (terms.user, terms.arbiter):
        raise EscrowError("the refund's fee payer must be the user or the arbiter")
    cosigners = (terms.user, terms.arbiter)
    if provider_share == 0 or provider_has_wsol_account:
        instructions = _move_and_close(terms, provider_share, cosigners, create_payout_for=None)
    else:
        instructions = _move_and_close(terms, 0, cosigners, create_payout_for=None)
        instructions.append(pay_sol(terms.user, terms.provider, provider_share))
    return compile_message(payer, instructions, blockhash)


# ----------------------------------------------------------------------------------------------
# Pure checks (no I/O): is an escrow exactly what the payments contract says?


def multisig_problems(terms: EscrowTerms, multisig: Multisig) -> list[str]:
    """What is wrong with the escrow's multisig, each naming its field; empty when it is
    exactly m = 2, n = 3, signers user, provider and arbiter (each once, nothing else).

    The signers are compared as a list, not a set: SPL Token counts a signature once per
    slot its key fills, so a key listed twice is two of the ``m`` signatures by itself.
    """
    roles = {terms.user: "user", terms.provider: "provider", terms.arbiter: "arbiter"}
    return multisig_signer_problems(
        multisig,
        threshold=MULTISIG_THRESHOLD,
        roles=roles,
        stranger="none of user, provider, arbiter",
    )


def token_problems(terms: EscrowTerms, token: TokenAccount, lamports: int) -> list[str]:
    """What is wrong with the escrow's token account (``lamports``: the account's balance),
    each naming its field; empty when it is an initialized wrapped-SOL account owned by the
    multisig, with no delegate and no close authority, its amount backed by its lamports."""
    authority: list[str] = []
    if token.delegate is not None or token.delegated_amount:
        authority.append(
            f"it has a delegate ({token.delegate}, {token.delegated_amount} lamports "
            f"delegated), who could move funds alone"
        )
    if token.close_authority is not None and token.close_authority != terms.multisig:
        authority.append(
            f"it has a close authority ({token.close_authority}) other than the multisig, "
            f"who could close it alone"
        )
    return wsol_account_problems(
        token, lamports, owner=terms.multisig, owner_role="multisig", authority_problems=authority
    )


# ----------------------------------------------------------------------------------------------
# The client


def _err_json(err: Any) -> Any:
    """A solders ``TransactionError`` as the JSON a node sends (``"BlockhashNotFound"``,
    ``{"InstructionError": [0, {"Custom": 1}]}``), so callers can compare plain values."""
    if err is None:
        return None
    try:
        return json.loads(TransactionStatus(0, None, None, err, None).to_json())["err"]
    except (TypeError, ValueError):
        return str(err)


def _is_panic(exc: BaseException) -> bool:
    return type(exc).__name__ == "PanicException"


class EscrowClient:
    """Escrow operations over any Solana JSON-RPC endpoint (solana-py ``AsyncClient``).

    Caches rent amounts, multisigs known to exist (SPL Token cannot close one), multisigs
    verified (keyed on their exact account data: a changed account is checked again), and a
    blockhash for ``blockhash_ttl`` seconds (re-fetched and retried once if the cluster has
    expired it).
    """

    def __init__(
        self,
        client: AsyncClient,
        *,
        commitment: Commitment = Confirmed,
        confirm_timeout: float = 90.0,
        blockhash_ttl: float = 20.0,
        owns_client: bool = False,
    ) -> None:
        self.client = client
        self.commitment = commitment
        self.confirm_timeout = confirm_timeout
        self.blockhash_ttl = blockhash_ttl
        self._owns_client = owns_client
        self._rent: dict[int, int] = {}
        #: Multisigs known to exist (created or verified here): :meth:`open_escrow` need not
        #: read them again. Existence only; never taken as a verification.
        self._multisigs: set[Pubkey] = set()
        #: Multisigs verified, keyed on exactly what was verified: (address, owning program,
        #: account data).
        self._verified: set[tuple[Pubkey, Pubkey, bytes]] = set()
        self._blockhash: tuple[Hash, int, float] | None = None
        self._required_rank = {"processed": 0, "confirmed": 1, "finalized": 2}[str(commitment)]

    @classmethod
    def connect(cls, url: str, **options: Any) -> EscrowClient:
        """A client of its own for ``url`` (closed with the EscrowClient)."""
        return cls(AsyncClient(url, timeout=30.0), owns_client=True, **options)

    async def close(self) -> None:
        """Close the HTTP client if this object created it."""
        if self._owns_client:
            await self.client.close()

    async def __aenter__(self) -> EscrowClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    # -- RPC plumbing ----------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The RPC endpoint this client talks to."""
        provider = getattr(self.client, "_provider", None)
        return str(getattr(provider, "endpoint_uri", "the configured endpoint"))

    async def _call(self, what: str, request: Awaitable[_T]) -> _T:
        try:
            return await request
        except RPCException as exc:
            raise self._rejected(what, exc) from None
        except SolanaRpcException as exc:
            cause = exc.__cause__ or exc
            raise PaymentError(
                f"cannot reach the Solana RPC at {self.url} while {what} ({cause!r}); check the "
                f"Solana URL setting, or start the coordinator that serves the embedded ledger"
            ) from None
        except (OSError, ValueError) as exc:
            raise PaymentError(f"the Solana RPC at {self.url} failed while {what}: {exc}") from None
        except BaseException as exc:
            # solders' response parsers panic (pyo3 PanicException, a BaseException) on JSON
            # they do not expect, e.g. a node's error without its usual data.
            if not _is_panic(exc):
                raise
            raise PaymentError(
                f"the Solana RPC at {self.url} sent an unreadable answer while {what}: {exc}"
            ) from None

    def _rejected(self, what: str, exc: RPCException) -> TransactionFailed:
        detail = exc.args[0] if exc.args else exc
        message = getattr(detail, "message", str(detail))
        data = getattr(detail, "data", None)
        err = _err_json(getattr(data, "err", None)) if data is not None else None
        logs = list(getattr(data, "logs", None) or [])
        tail = f"; program logs: {' | '.join(logs[-4:])}" if logs else ""
        return TransactionFailed(f"{what}: the cluster refused it: {message}{tail}", err, logs)

    async def _rent_for(self, sizes: Sequence[int]) -> None:
        missing = [s for s in sizes if s not in self._rent]
        if not missing:
            return
        values = await asyncio.gather(
            *(
                self._call("reading rent", self.client.get_minimum_balance_for_rent_exemption(s))
                for s in missing
            )
        )
        for size, resp in zip(missing, values, strict=True):
            self._rent[size] = resp.value

    async def _latest_blockhash(self, *, fresh: bool = False) -> Hash:
        cached = self._blockhash
        if not fresh and cached is not None and time.monotonic() - cached[2] < self.blockhash_ttl:
            return cached[0]
        resp = await self._call(
            "fetching a blockhash", self.client.get_latest_blockhash(self.commitment)
        )
        value = resp.value
        self._blockhash = (value.blockhash, value.last_valid_block_height, time.monotonic())
        return value.blockhash

    async def _accounts(self, what: str, keys: Sequence[Pubkey]) -> list[Account | None]:
        resp = await self._call(
            what, self.client.get_multiple_accounts(list(keys), self.commitment, "base64")
        )
        return [a if a is not None and a.lamports > 0 else None for a in resp.value]

    async def submit(
        self, message: MessageV0, signers: Sequence[Signer], *, what: str = "sending"
    ) -> Signature:
        """Sign ``message`` with ``signers`` (keypairs or presigners), send it with preflight,
        wait for the client's commitment and return the signature.

        Raises :class:`TransactionFailed` when the cluster refuses the transaction or it lands
        with an error (``confirm_transaction`` alone would not say), :class:`PaymentError` when
        the RPC is unreachable or confirmation times out.
        """
        try:
            tx = VersionedTransaction(message, list(signers))
        except BaseException as exc:  # SignerError, or a pyo3 PanicException (BaseException)
            if not (isinstance(exc, Exception) or _is_panic(exc)):
                raise
            needed = list(message.account_keys)[: message.header.num_required_signatures]
            given = [s.pubkey() for s in signers]
            missing = [str(k) for k in needed if k not in given]
            raise PaymentError(
                f"{what}: cannot sign ({exc}); required signers {[str(k) for k in needed]}, "
                f"missing {missing or 'none (a signer does not match its key)'}"
            ) from None
        opts = TxOpts(
            skip_confirmation=True, skip_preflight=False, preflight_commitment=self.commitment
        )
        resp = await self._call(what, self.client.send_raw_transaction(bytes(tx), opts))
        cached = self._blockhash
        last_valid = cached[1] if cached and cached[0] == message.recent_blockhash else None
        await self._confirm(resp.value, what, last_valid_block_height=last_valid)
        return resp.value

    async def _confirm(
        self, signature: Signature, what: str, *, last_valid_block_height: int | None = None
    ) -> None:
        deadline = time.monotonic() + self.confirm_timeout
        delay = 0.0
        polls = 0
        expired = False
        while True:
            polls += 1
            if last_valid_block_height is not None and polls % 4 == 0:
                # Past its blockhash's last valid height a transaction can no longer land:
                # one more status read settles it either way.
                request = self.client.get_block_height()
                height = await self._call("reading the block height", request)
                expired = height.value > last_valid_block_height
            resp = await self._call(
                "confirming a transaction", self.client.get_signature_statuses([signature])
            )
            status = resp.value[0]
            if status is not None:
                if status.err is not None:
                    err = _err_json(status.err)
                    raise TransactionFailed(f"{what}: transaction {signature} failed: {err}", err)
                level = status.confirmation_status
                if level is not None and int(level) >= self._required_rank:
                    return
            elif expired:
                raise PaymentError(
                    f"{what}: transaction {signature} expired without landing (its blockhash "
                    f"is too old); nothing moved, it is safe to retry"
                )
            if time.monotonic() >= deadline:
                raise PaymentError(
                    f"{what}: transaction {signature} not confirmed after "
                    f"{self.confirm_timeout:.0f} s; it may still land — check it before retrying"
                )
            await asyncio.sleep(delay)
            delay = min(0.5, delay + 0.1)

    async def _submit_fresh(self, build: _Build, signers: Sequence[Signer], what: str) -> Signature:
        """Build with a (cached) blockhash and submit; on an expired blockhash, rebuild once."""
        message = build(await self._latest_blockhash())
        try:
            return await self.submit(message, signers, what=what)
        except TransactionFailed as exc:
            if exc.err != "BlockhashNotFound" or any(isinstance(s, Presigner) for s in signers):
                raise
        message = build(await self._latest_blockhash(fresh=True))
        return await self.submit(message, signers, what=what)

    # -- queries ---------------------------------------------------------------------------

    async def balance(self, pubkey: Pubkey) -> int:
        """Lamports held by a wallet."""
        request = self.client.get_balance(pubkey, self.commitment)
        resp = await self._call("reading a balance", request)
        return resp.value

    async def wsol_balance(self, owner: Pubkey) -> int:
        """Lamports of wSOL in ``owner``'s associated wSOL account (0 if it has none)."""
        address = get_associated_token_address(owner, NATIVE_MINT)
        (account,) = await self._accounts("reading a wSOL account", [address])
        token = decode_token_account(bytes(account.data)) if account is not None else None
        return token.amount if token is not None else 0

    async def airdrop(self, pubkey: Pubkey, lamports: int) -> Signature:
        """Request an airdrop (embedded ledger, devnet, testnet) and wait until it lands."""
        resp = await self._call(
            f"requesting an airdrop of {format_sol(lamports)}",
            self.client.request_airdrop(pubkey, lamports, self.commitment),
        )
        await self._confirm(resp.value, "airdrop")
        return resp.value

    def _check_escrow(
        self, terms: EscrowTerms, escrow: Account | None, multisig: Account | None
    ) -> EscrowState | None:
        if escrow is None:
            return None
        address = terms.escrow
        if escrow.owner != TOKEN_PROGRAM_ID:
            raise EscrowError(
                f"escrow {address} belongs to program {escrow.owner}, not SPL Token "
                f"({TOKEN_PROGRAM_ID}); it is no escrow"
            )
        token = decode_token_account(bytes(escrow.data))
        if token is None:
            raise EscrowError(
                f"escrow {address} is not an initialized SPL Token account "
                f"({len(escrow.data)} bytes); it is no escrow"
            )
        problems = token_problems(terms, token, escrow.lamports)
        if problems:
            raise EscrowError(f"escrow {address} is not as agreed: " + "; ".join(problems))
        self._check_multisig(terms, multisig)
        assert token.rent_exempt_reserve is not None
        return EscrowState(
            address=address,
            amount=token.amount,
            lamports=escrow.lamports,
            rent_exempt_reserve=token.rent_exempt_reserve,
        )

    def _check_multisig(self, terms: EscrowTerms, account: Account | None) -> None:
        if account is None:
            raise EscrowError(f"the escrow's multisig {terms.multisig} does not exist")
        # The cache holds exactly what was verified (address, owning program, every byte):
        # an account that changed since, by whatever means, is verified again.
        data = bytes(account.data)
        key = (terms.multisig, account.owner, data)
        if key in self._verified:
            return
        if account.owner != TOKEN_PROGRAM_ID:
            raise EscrowError(
                f"multisig {terms.multisig} belongs to program {account.owner}, not SPL Token"
            )
        multisig = decode_multisig(data)
        if multisig is None:
            raise EscrowError(f"{terms.multisig} is not an initialized SPL Token multisig")
        problems = multisig_problems(terms, multisig)
        if problems:
            raise EscrowError(
                f"multisig {terms.multisig} is {multisig.m}-of-{multisig.n} "
                f"{[str(s) for s in multisig.signers]}, not 2-of-3 user, provider, arbiter: "
                + "; ".join(problems)
            )
        if len(self._verified) >= _VERIFIED_CACHE_SIZE:
            self._verified.clear()
        self._verified.add(key)
        self._multisigs.add(terms.multisig)

    async def escrow_state(self, terms: EscrowTerms) -> EscrowState | None:
        """The escrow as it is on-chain, None if closed (settled) or never opened.

        Raises :class:`EscrowError` if an account exists there but is not a proper escrow.
        """
        escrow, multisig = await self._accounts(
            "reading the escrow", [terms.escrow, terms.multisig]
        )
        return self._check_escrow(terms, escrow, multisig)

    async def recoverable_state(self, terms: EscrowTerms) -> EscrowState | None:
        """What is left to recover from an escrow that may no longer be intact: the escrow
        if it is still a wrapped-SOL token account owned by the session's multisig, whatever
        else changed (the multisig's signers, a delegate, a close authority: a settlement's
        preflight then says whether arbiter and provider can still move it); None when
        nothing is there (closed, or no longer such an account)."""
        (escrow,) = await self._accounts("reading the escrow", [terms.escrow])
        if escrow is None or escrow.owner != TOKEN_PROGRAM_ID:
            return None
        token = decode_token_account(bytes(escrow.data))
        if (
            token is None
            or token.mint != NATIVE_MINT
            or token.rent_exempt_reserve is None
            or token.owner != terms.multisig
        ):
            return None
        amount = min(token.amount, max(0, escrow.lamports - token.rent_exempt_reserve))
        return EscrowState(terms.escrow, amount, escrow.lamports, token.rent_exempt_reserve)

    async def closing_transaction(
        self, terms: EscrowTerms, signature: Signature
    ) -> ClosingTransaction | None:
        """Read transaction ``signature`` from the ledger: None unless it landed without
        error and closed the escrow; else what it paid the provider out of the escrow (wSOL
        into its token account, or native SOL passed on from the user's refund), who signed
        it, and its fee. How a settlement is known to have landed before its amount is
        recorded (also one of ours whose outcome a restart lost)."""
        resp = await self._call(
            "reading a settlement transaction",
            self.client.get_transaction(
                signature, "base64", self.commitment, max_supported_transaction_version=0
            ),
        )
        found = resp.value
        meta = found.transaction.meta if found is not None else None
        if found is None or meta is None or meta.err is not None:
            return None
        tx = found.transaction.transaction
        if not isinstance(tx, VersionedTransaction):
            return None
        message = tx.message
        keys = list(message.account_keys)
        paid = 0
        closed = False
        for ix in message.instructions:
            program, data = keys[ix.program_id_index], bytes(ix.data)
            accounts = [keys[i] for i in bytes(ix.accounts)]
            if program == TOKEN_PROGRAM_ID and data[:1] == bytes([TRANSFER_CHECKED_TAG]):
                if accounts[:3] == [terms.escrow, NATIVE_MINT, terms.provider_wsol]:
                    paid += int.from_bytes(data[1:9], "little")
            elif program == TOKEN_PROGRAM_ID and data[:1] == bytes([CLOSE_ACCOUNT_TAG]):
                closed = closed or accounts[:1] == [terms.escrow]
            elif program == SYSTEM_PROGRAM_ID and data[:4] == SYSTEM_TRANSFER_TAG:
                # From the user's refund, or (a cohort refund) from the closed escrow's
                # lamports, passed on by the arbiter.
                if accounts[:2] in ([terms.user, terms.provider], [terms.arbiter, terms.provider]):
                    paid += int.from_bytes(data[4:12], "little")
        if not closed:
            return None
        signers = frozenset(keys[: message.header.num_required_signatures])
        return ClosingTransaction(signature, paid, signers, meta.fee)

    async def verify_escrow(self, terms: EscrowTerms, min_amount: int) -> EscrowState:
        """Check on-chain that the session's escrow is funded: call before activating a lease.

        The escrow must be an initialized wSOL token account owned by the session's multisig,
        with no delegate and no close authority (:func:`token_problems`); the multisig must be
        exactly m = 2, n = 3 of user, provider and arbiter (:func:`multisig_problems`); the
        escrow must hold at least ``min_amount`` lamports. Raises :class:`EscrowError` naming
        every field that differs otherwise.
        """
        state = await self.escrow_state(terms)
        if state is None:
            raise EscrowError(
                f"no escrow for session {terms.session_id} at {terms.escrow}; the user's wallet "
                f"must open it before the kernel starts"
            )
        if state.amount < min_amount:
            raise EscrowError(
                f"escrow {terms.escrow} holds {format_sol(state.amount)}, the session needs "
                f"{format_sol(min_amount)}"
            )
        return state

    # -- setup -------------------------------------------------------------------------------

    async def open_escrow(
        self,
        user: Keypair,
        provider: Pubkey,
        arbiter: Pubkey,
        session_id: str,
        deposit: int,
    ) -> EscrowReceipt:
        """Fund the session's escrow from the user's wallet in one transaction (user signs).

        Creates the (user, provider, arbiter) multisig the first time. Idempotent: if the
        escrow already exists and holds at least ``deposit``, returns it without a transaction.
        Raises :class:`InsufficientFunds` (nothing moved) when the wallet cannot cover the
        deposit, the rents and the fee. Next: the coordinator calls :meth:`verify_escrow`.
        """
        if deposit <= 0:
            raise EscrowError("an escrow deposit must be a positive number of lamports")
        terms = EscrowTerms(user.pubkey(), provider, arbiter, session_id)
        multisig_rent: int | None = None
        if terms.multisig not in self._multisigs:
            # First session of this triple seen by this client: look before creating. Later
            # ones skip the read (a multisig can never be closed) and let preflight object.
            # A fresh client also needs rents and a blockhash: ask for all at once.
            _, (wallet, multisig, escrow), _ = await asyncio.gather(
                self._rent_for([ACCOUNT_LEN, MULTISIG_LEN]),
                self._accounts(
                    "reading the wallet and escrow", [terms.user, terms.multisig, terms.escrow]
                ),
                self._latest_blockhash(),
            )
            escrow_rent = self._rent[ACCOUNT_LEN]
            existing = self._existing(terms, escrow, multisig, deposit)
            if existing is not None:
                return existing
            if multisig is not None:
                self._check_multisig(terms, multisig)
            else:
                multisig_rent = self._rent[MULTISIG_LEN]
            needed = deposit + escrow_rent + (multisig_rent or 0) + FEE_PER_SIGNATURE
            held = wallet.lamports if wallet is not None else 0
            if held < needed:
                raise self._insufficient(terms.user, needed, held, deposit)
        else:
            await self._rent_for([ACCOUNT_LEN])  # cached after the first session
            escrow_rent = self._rent[ACCOUNT_LEN]
        needed = deposit + escrow_rent + (multisig_rent or 0) + FEE_PER_SIGNATURE

        def build(blockhash: Hash) -> MessageV0:
            return setup_message(
                terms,
                deposit,
                escrow_rent=escrow_rent,
                multisig_rent=multisig_rent,
                blockhash=blockhash,
            )

        what = f"opening the escrow for session {session_id}"
        try:
            signature = await self._submit_fresh(build, [user], what)
        except TransactionFailed as exc:
            # An earlier identical setup may have landed (a retry), or the wallet is short.
            wallet, multisig, escrow = await self._accounts(
                what, [terms.user, terms.multisig, terms.escrow]
            )
            existing = self._existing(terms, escrow, multisig, deposit)
            if existing is not None:
                return existing
            held = wallet.lamports if wallet is not None else 0
            if self._looks_like_funds(exc) or held < needed:
                raise self._insufficient(terms.user, needed, held, deposit) from None
            raise
        self._multisigs.add(terms.multisig)
        state = EscrowState(terms.escrow, deposit, escrow_rent + deposit, escrow_rent)
        return EscrowReceipt(
            terms=terms,
            state=state,
            signature=signature,
            fee=FEE_PER_SIGNATURE,
            multisig_created=multisig_rent is not None,
            escrow_rent=escrow_rent,
            multisig_rent=multisig_rent or 0,
        )

    def _existing(
        self, terms: EscrowTerms, escrow: Account | None, multisig: Account | None, deposit: int
    ) -> EscrowReceipt | None:
        state = self._check_escrow(terms, escrow, multisig)
        if state is None:
            return None
        if state.amount < deposit:
            raise EscrowError(
                f"escrow {terms.escrow} for session {terms.session_id} already exists with "
                f"{format_sol(state.amount)}, less than the {format_sol(deposit)} asked"
            )
        return EscrowReceipt(terms, state, None, 0, False, 0, 0)

    @staticmethod
    def _looks_like_funds(exc: TransactionFailed) -> bool:
        err = exc.err
        if err in ("AccountNotFound", "InsufficientFundsForFee"):
            return True
        if isinstance(err, dict) and "InsufficientFundsForRent" in err:
            return True
        return any("insufficient lamports" in line for line in exc.logs)

    @staticmethod
    def _insufficient(wallet: Pubkey, needed: int, held: int, deposit: int) -> InsufficientFunds:
        return InsufficientFunds(
            f"escrow needs {format_sol(needed)} ({format_sol(deposit)} deposit plus rent and "
            f"fee), wallet {wallet} holds {format_sol(held)}; run `jupyter io wallet airdrop` "
            f"on the local ledger or fund it"
        )

    async def top_up(self, terms: EscrowTerms, lamports: int, user: Keypair) -> TopUpReceipt:
        """Add ``lamports`` to an open escrow from the user's wallet (one transaction, the
        user signs; see :func:`top_up_message`). Next: tell the coordinator
        (``POST /api/v1/leases/{id}/escrow`` again) so it raises the recorded deposit.

        Raises :class:`EscrowError` when the escrow is not open (never opened, or settled:
        nothing is sent) and :class:`InsufficientFunds` (nothing moved) when the wallet cannot
        cover ``lamports`` and the fee.
        """
        if lamports <= 0:
            raise EscrowError("a top-up must be a positive number of lamports")
        if user.pubkey() != terms.user:
            raise EscrowError(
                f"the top-up signer is {user.pubkey()}, but this escrow's user is {terms.user}"
            )
        what = f"topping up the escrow of session {terms.session_id}"
        (wallet, escrow, multisig), _ = await asyncio.gather(
            self._accounts(what, [terms.user, terms.escrow, terms.multisig]),
            self._latest_blockhash(),
        )
        state = self._check_escrow(terms, escrow, multisig)
        if state is None:
            raise EscrowError(
                f"escrow {terms.escrow} of session {terms.session_id} is not open (settled, or "
                f"never opened); nothing was sent. A new session opens a new escrow"
            )
        needed = lamports + FEE_PER_SIGNATURE
        held = wallet.lamports if wallet is not None else 0
        if held < needed:
            raise InsufficientFunds(
                f"a top-up of {format_sol(lamports)} needs {format_sol(needed)} with the fee, "
                f"wallet {terms.user} holds {format_sol(held)}; run `jupyter io wallet "
                f"airdrop` on the local ledger or fund it"
            )

        def build(blockhash: Hash) -> MessageV0:
            return top_up_message(terms, lamports, blockhash=blockhash)

        signature = await self._submit_fresh(build, [user], what)
        after = EscrowState(
            terms.escrow,
            state.amount + lamports,
            state.lamports + lamports,
            state.rent_exempt_reserve,
        )
        return TopUpReceipt(terms, signature, lamports, FEE_PER_SIGNATURE, after)

    # -- settlement ----------------------------------------------------------------------------

    async def settle(
        self,
        terms: EscrowTerms,
        amount: int,
        *,
        arbiter: Signer,
        provider: Signer,
        fee_payer: Pubkey | None = None,
        verified: EscrowState | None = None,
    ) -> Settlement:
        """Pay the provider ``amount`` (the metered lamports) and refund the rest to the user.

        One transaction signed by the arbiter and the provider. A second call after success
        finds the escrow closed and returns ``already_settled`` without sending anything.
        Raises :class:`EscrowError` if ``amount`` exceeds the escrow.

        ``verified`` is the state :meth:`verify_escrow` returned when the lease started; with
        it the escrow is not read again (only its owners can take from it, so it cannot have
        shrunk; preflight still guards every case, and a refused settlement is re-examined).
        Lamports third parties may have sent to the escrow since also go to the user, beyond
        the ``refunded_to_user`` then reported. Without it (e.g. after a coordinator restart)
        the escrow is read first.
        """
        self._check_parties(terms, {"arbiter": arbiter, "provider": provider})
        payer = fee_payer or terms.provider
        what = f"settling session {terms.session_id}"
        if verified is not None and verified.address == terms.escrow:
            self._check_amount(terms, verified, amount)
            state, create_payout = verified, True
        else:
            found = await self._escrow_to_close(terms, amount, what, prefetch_blockhash=True)
            if found is None:
                return self._no_op(terms)
            state, has_payout = found
            create_payout = not has_payout

        def build(blockhash: Hash) -> MessageV0:
            return settlement_message(
                terms,
                amount,
                blockhash=blockhash,
                fee_payer=payer,
                create_payout_account=create_payout,
            )

        return await self._close(
            terms,
            state,
            amount,
            build,
            [arbiter, provider],
            payer,
            "wsol" if amount else "none",
            what,
        )

    async def refund(
        self,
        terms: EscrowTerms,
        provider_share: int = 0,
        *,
        user: Signer,
        arbiter: Signer,
        fee_payer: Pubkey | None = None,
    ) -> Settlement:
        """Close the escrow to the user when the provider failed (user + arbiter sign).

        ``provider_share`` is what the provider earned before it failed (0 for a full refund);
        it goes to the provider's wSOL account if it has one, else in native SOL. Idempotent
        like :meth:`settle`.
        """
        self._check_parties(terms, {"user": user, "arbiter": arbiter})
        payer = fee_payer or terms.user
        what = f"refunding session {terms.session_id}"
        found = await self._escrow_to_close(terms, provider_share, what)
        if found is None:
            return self._no_op(terms)
        state, has_wsol = found

        def build(blockhash: Hash) -> MessageV0:
            return refund_message(
                terms,
                provider_share,
                blockhash=blockhash,
                provider_has_wsol_account=has_wsol,
                fee_payer=payer,
            )

        kind: Literal["wsol", "sol", "none"] = (
            "none" if provider_share == 0 else "wsol" if has_wsol else "sol"
        )
        return await self._close(
            terms, state, provider_share, build, [user, arbiter], payer, kind, what
        )

    async def _escrow_to_close(
        self, terms: EscrowTerms, amount: int, what: str, *, prefetch_blockhash: bool = False
    ) -> tuple[EscrowState, bool] | None:
        """The escrow as read and checked for a settlement or refund paying the provider
        ``amount`` (:class:`EscrowError` if it holds less), and whether the provider has its
        wSOL account; None when the escrow is closed. ``prefetch_blockhash``: fetch the
        blockhash the message will need with the same round trip."""
        reading = self._accounts(what, [terms.escrow, terms.multisig, terms.provider_wsol])
        if prefetch_blockhash:
            (escrow, multisig, payout), _ = await asyncio.gather(reading, self._latest_blockhash())
        else:
            escrow, multisig, payout = await reading
        state = self._check_escrow(terms, escrow, multisig)
        if state is None:
            return None
        self._check_amount(terms, state, amount)
        return state, payout is not None

    async def _close(
        self,
        terms: EscrowTerms,
        state: EscrowState,
        amount: int,
        build: _Build,
        signers: Sequence[Signer],
        payer: Pubkey,
        payout: Literal["wsol", "sol", "none"],
        what: str,
    ) -> Settlement:
        try:
            signature = await self._submit_fresh(build, signers, what)
        except TransactionFailed:
            # A duplicate that raced us (or an earlier attempt we lost track of) may have
            # closed it: then this request is a no-op, never a second payment.
            current = await self.escrow_state(terms)
            if current is None:
                return self._no_op(terms)
            self._check_amount(terms, current, amount)
            raise
        return Settlement(
            terms=terms,
            signature=signature,
            paid_to_provider=amount,
            refunded_to_user=state.lamports - amount,
            fee=FEE_PER_SIGNATURE * len(signers),
            fee_payer=payer,
            payout=payout,
        )

    @staticmethod
    def _no_op(terms: EscrowTerms) -> Settlement:
        return Settlement(terms, None, 0, 0, 0, None, "none", already_settled=True)

    @staticmethod
    def _check_amount(terms: EscrowTerms, state: EscrowState, amount: int) -> None:
        if not 0 <= amount <= state.amount:
            raise EscrowError(
                f"cannot pay {format_sol(amount)} from escrow {terms.escrow}, which holds "
                f"{format_sol(state.amount)}"
            )

    @staticmethod
    def _check_parties(terms: EscrowTerms, signers: dict[str, Signer]) -> None:
        for role, signer in signers.items():
            expected = getattr(terms, role)
            if signer.pubkey() != expected:
                raise EscrowError(
                    f"the {role} signer is {signer.pubkey()}, but this escrow's {role} "
                    f"is {expected}"
                )

    # -- provider ------------------------------------------------------------------------------

    async def unwrap(
        self, provider: Keypair, *, keep_account: bool = False
    ) -> tuple[Signature | None, int]:
        """Turn the provider's wSOL into SOL: close its wSOL account to its wallet.

        Returns the signature (None if there was no account) and the lamports that came back
        (earnings plus the account's rent). With ``keep_account`` the account is recreated in
        the same transaction, so the next settlement need not pay for it (its rent stays
        locked there).
        """
        owner = provider.pubkey()
        address = get_associated_token_address(owner, NATIVE_MINT)
        (account,) = await self._accounts("reading the wSOL account", [address])
        if account is None:
            return None, 0
        instructions = [close_wsol(account=address, dest=owner, owner=owner)]
        returned = account.lamports
        if keep_account:
            instructions.append(
                create_idempotent_associated_token_account(owner, owner, NATIVE_MINT)
            )
            token = decode_token_account(bytes(account.data))
            returned = token.amount if token is not None else 0

        def build(blockhash: Hash) -> MessageV0:
            return compile_message(owner, instructions, blockhash)

        signature = await self._submit_fresh(build, [provider], "unwrapping wSOL")
        return signature, returned
