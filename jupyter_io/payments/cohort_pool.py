"""Cohort pools: an instructor pays for students' sessions through per-student allowances.

No custom on-chain program, as for the plain escrow (:mod:`jupyter_io.payments.escrow`). Per
student, the instructor holds an **allowance**: a wrapped-SOL token account *owned by the
instructor*, at an address derived from the instructor's key (the seed binds the cohort id,
the student and the arbiter), whose **delegate** is a 2-of-2 SPL multisig of [student,
arbiter] (derived from the instructor's key too, one per student and arbiter) with a
delegated amount (the cap). Neither the student nor the arbiter can move a lamport of it
alone; together they can move at most the delegated amount, and the arbiter co-signs nothing
but the exact funding of one of that student's cohort leases
(``docs/payments-contract.md`` section 6).

Transactions (each one message, built by a pure function below):

- :func:`fund_message` — the instructor (signer, fee payer) creates, funds and approves
  allowances, several students per transaction (:func:`pack_grants`), or tops one up: more
  lamports, SyncNative, and a fresh approval (SPL Token's ``Approve`` *replaces* the
  delegated amount).
- :func:`reclaim_message` — the instructor revokes and closes allowances: everything unspent
  (tokens and rent) comes back to the instructor, at any time.
- :func:`funding_message` — a cohort session's escrow (the usual 2-of-3 [student, provider,
  arbiter] escrow of :class:`~jupyter_io.payments.escrow.EscrowTerms`, derived from the
  student's key as always) funded from the allowance in one transaction: fee payer the
  arbiter, which fronts the escrow's rent (and the multisig's, the first time); the 2-of-2
  delegate (student + arbiter) moves the deposit from the allowance into the escrow, and the
  fee plus the multisig's rent (what the arbiter fronts and never gets back) into the
  arbiter's wSOL account. The student needs no SOL.
- :func:`cohort_settlement_message` / :func:`cohort_refund_message` — as the plain ones, but
  what the provider is not owed goes back to the allowance (``TransferChecked``) and the
  escrow is closed to the arbiter, who fronted its rent. When the allowance is gone
  (reclaimed), the remainder goes to the instructor instead: closed to the arbiter with the
  escrow, then passed on by the arbiter in the same transaction.

Checks (pure, on exact on-chain bytes, each refusal naming the field):
:func:`allowance_problems` and :func:`delegate_problems`; a cohort escrow must pass the plain
:func:`~jupyter_io.payments.escrow.token_problems` / ``multisig_problems``.
:func:`match_cohort_settlement` is the provider's check of a settlement it is asked to sign,
:func:`match_cohort_funding` the student's of a funding.

I/O: :class:`CohortPoolClient` (an :class:`~jupyter_io.payments.escrow.EscrowClient`);
:meth:`CohortPoolClient.allowance_states` reads many allowances at once (a class's dashboard).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

from solders.account import Account
from solders.hash import Hash
from solders.instruction import Instruction
from solders.keypair import Keypair
from solders.message import MessageV0, to_bytes_versioned
from solders.pubkey import Pubkey
from solders.signature import Signature
from solders.system_program import ID as SYSTEM_PROGRAM_ID
from spl.token.constants import TOKEN_PROGRAM_ID
from spl.token.instructions import (
    approve_checked,
    create_idempotent_associated_token_account,
    get_associated_token_address,
    revoke,
)
from spl.token.models import ApproveCheckedParams, RevokeParams

from ..errors import InsufficientFunds
from .amounts import FEE_PER_SIGNATURE, format_sol
from .escrow import (
    EscrowClient,
    EscrowError,
    EscrowState,
    EscrowTerms,
    Signer,
    close_escrow,
    escrow_transfer,
    opening_instructions,
    provider_payout,
)
from .instructions import (
    CREATE_WITH_SEED_TAG,
    close_wsol,
    compile_message,
    create_multisig,
    create_wsol_account,
    derived_seed,
    move_wsol,
    pay_sol,
    transfer_amounts,
    wrap_sol,
)
from .token_accounts import (
    ACCOUNT_LEN,
    MULTISIG_LEN,
    NATIVE_DECIMALS,
    NATIVE_MINT,
    Multisig,
    TokenAccount,
    decode_multisig,
    decode_token_account,
    multisig_signer_problems,
    wsol_account_problems,
)

__all__ = [
    "DELEGATE_THRESHOLD",
    "FUNDING_SIGNATURES",
    "MAX_ACCOUNTS_PER_CALL",
    "MAX_TRANSACTION_BYTES",
    "AllowanceGrant",
    "AllowanceState",
    "AllowanceTerms",
    "CohortPoolClient",
    "CohortPoolError",
    "CohortSession",
    "FundReceipt",
    "FundingPlan",
    "ReclaimReceipt",
    "RemainderTo",
    "allowance_problems",
    "allowance_seed",
    "cohort_refund_message",
    "cohort_settlement_message",
    "delegate_problems",
    "delegate_seed",
    "fund_message",
    "funding_message",
    "match_cohort_funding",
    "match_cohort_refund",
    "match_cohort_settlement",
    "pack_grants",
    "reclaim_message",
    "transaction_size",
]

#: Signatures of the [student, arbiter] delegate needed to move allowance funds: both.
DELEGATE_THRESHOLD = 2
#: Signatures on a funding transaction (arbiter, fee payer; student): its fee is this x 5,000.
FUNDING_SIGNATURES = 2
#: Solana's limit on a serialized transaction (signatures included).
MAX_TRANSACTION_BYTES = 1232
#: Keys per ``getMultipleAccounts`` call: the bound of Solana's RPC (and the embedded ledger's).
MAX_ACCOUNTS_PER_CALL = 100

#: Where a cohort escrow's unspent remainder goes: the allowance, or (allowance reclaimed)
#: the instructor's wallet.
RemainderTo = Literal["allowance", "instructor"]
_REMAINDER_TO: tuple[RemainderTo, ...] = ("allowance", "instructor")

_SEED_DOMAIN = b"jupyter-io/cohort/v1/"
_Builder = Callable[[Hash], MessageV0]


class CohortPoolError(EscrowError):
    """An allowance or a cohort escrow is missing or is not what the cohort agreed."""


def _seed(kind: str, *parts: bytes) -> str:
    # Each part is length-prefixed: a cohort id cannot run into the keys that follow it.
    body = b"".join(len(p).to_bytes(2, "little") + p for p in parts)
    return derived_seed(_SEED_DOMAIN, kind, body)


def allowance_seed(cohort_id: str, student: Pubkey, arbiter: Pubkey) -> str:
    """Seed (under the instructor's key) of a student's allowance in a cohort."""
    return _seed("al", cohort_id.encode(), bytes(student), bytes(arbiter))


def delegate_seed(student: Pubkey, arbiter: Pubkey) -> str:
    """Seed (under the instructor's key) of the [student, arbiter] 2-of-2 delegate; one per
    instructor, student and arbiter, shared by that instructor's cohorts (a multisig cannot
    be closed, so its rent is paid once)."""
    return _seed("dl", bytes(student), bytes(arbiter))


@dataclass(frozen=True)
class AllowanceTerms:
    """Who is party to a student's allowance; every address follows from these four values."""

    instructor: Pubkey
    student: Pubkey
    arbiter: Pubkey
    cohort_id: str

    def __post_init__(self) -> None:
        if len({self.instructor, self.student, self.arbiter}) != 3:
            raise CohortPoolError("instructor, student and arbiter must be three different keys")
        if not self.cohort_id:
            raise CohortPoolError("an allowance needs a cohort id")

    @cached_property
    def allowance(self) -> Pubkey:
        """The student's wSOL allowance, owned by the instructor."""
        seed = allowance_seed(self.cohort_id, self.student, self.arbiter)
        return Pubkey.create_with_seed(self.instructor, seed, TOKEN_PROGRAM_ID)

    @cached_property
    def delegate(self) -> Pubkey:
        """The 2-of-2 [student, arbiter] multisig the allowance is delegated to."""
        seed = delegate_seed(self.student, self.arbiter)
        return Pubkey.create_with_seed(self.instructor, seed, TOKEN_PROGRAM_ID)

    @property
    def delegate_signers(self) -> tuple[Pubkey, Pubkey]:
        """The delegate's members, in the order they are registered on-chain."""
        return (self.student, self.arbiter)

    def session(self, provider: Pubkey, lease_id: str) -> CohortSession:
        """The cohort session of ``lease_id`` on ``provider``'s GPUs."""
        escrow = EscrowTerms(self.student, provider, self.arbiter, lease_id)
        return CohortSession(self, escrow)


@dataclass(frozen=True)
class CohortSession:
    """A cohort lease's escrow (the plain 2-of-3 escrow of the student) and its allowance."""

    allowance: AllowanceTerms
    escrow: EscrowTerms

    def __post_init__(self) -> None:
        if self.escrow.user != self.allowance.student:
            raise CohortPoolError("the escrow's user must be the allowance's student")
        if self.escrow.arbiter != self.allowance.arbiter:
            raise CohortPoolError("the escrow's arbiter must be the allowance's arbiter")
        if self.escrow.provider == self.allowance.instructor:
            raise CohortPoolError("the instructor cannot be the session's provider")

    @cached_property
    def arbiter_wsol(self) -> Pubkey:
        """The arbiter's wSOL (associated token) account, where it is reimbursed."""
        return get_associated_token_address(self.allowance.arbiter, NATIVE_MINT)


@dataclass(frozen=True, slots=True)
class AllowanceState:
    """An allowance as verified on-chain: ``amount`` lamports of wSOL, of which the delegate
    may still move ``delegated_amount`` (``spendable`` = the smaller)."""

    address: Pubkey
    amount: int
    delegated_amount: int
    lamports: int
    rent_exempt_reserve: int

    @property
    def spendable(self) -> int:
        """What student + arbiter can still move out of it."""
        return min(self.amount, self.delegated_amount)


@dataclass(frozen=True, slots=True)
class AllowanceGrant:
    """One student's part of a :func:`fund_message`.

    ``allowance_rent`` None: the allowance exists, ``lamports`` are a top-up (transfer +
    SyncNative); otherwise it is created with that rent plus ``lamports``.
    ``delegate_rent`` None: the delegate multisig exists; otherwise it is created first.
    ``approve``: the delegated amount set afterwards (SPL Token's approve replaces it).
    """

    terms: AllowanceTerms
    lamports: int
    approve: int
    allowance_rent: int | None
    delegate_rent: int | None

    @property
    def outlay(self) -> int:
        """Lamports leaving the instructor's wallet for this grant (fees aside)."""
        return self.lamports + (self.allowance_rent or 0) + (self.delegate_rent or 0)


@dataclass(frozen=True, slots=True)
class FundingPlan:
    """What a funding transaction moves (:meth:`CohortPoolClient.funding_plan`).

    ``deposit`` into the escrow and ``reimbursement`` (fee + ``multisig_rent``) to the
    arbiter, both out of the allowance; the arbiter fronts ``escrow_rent`` (back when the
    escrow closes) and ``multisig_rent`` (None: the escrow's multisig exists already)."""

    session: CohortSession
    deposit: int
    reimbursement: int
    escrow_rent: int
    multisig_rent: int | None
    create_arbiter_wsol: bool

    def message(self, blockhash: Hash) -> MessageV0:
        """The funding message for ``blockhash``."""
        return funding_message(
            self.session,
            self.deposit,
            escrow_rent=self.escrow_rent,
            multisig_rent=self.multisig_rent,
            reimbursement=self.reimbursement,
            blockhash=blockhash,
        )


@dataclass(frozen=True, slots=True)
class FundReceipt:
    """One transaction of :meth:`CohortPoolClient.fund`: the grants it carried, its fee."""

    signature: Signature
    grants: tuple[AllowanceGrant, ...]
    fee: int


@dataclass(frozen=True, slots=True)
class ReclaimReceipt:
    """One transaction of :meth:`CohortPoolClient.reclaim`: ``returned`` lamports (tokens
    and rent of the closed allowances) went back to the instructor, who paid ``fee``."""

    signature: Signature
    closed: tuple[AllowanceTerms, ...]
    returned: int
    fee: int


# ----------------------------------------------------------------------------------------------
# Pure message builders: the instructor's


def _grant_instructions(grant: AllowanceGrant) -> list[Instruction]:
    terms = grant.terms
    instructor = terms.instructor
    instructions: list[Instruction] = []
    if grant.delegate_rent is not None:
        instructions += create_multisig(
            payer=instructor,
            base=instructor,
            seed=delegate_seed(terms.student, terms.arbiter),
            address=terms.delegate,
            rent=grant.delegate_rent,
            threshold=DELEGATE_THRESHOLD,
            signers=terms.delegate_signers,
        )
    if grant.allowance_rent is not None:
        instructions += create_wsol_account(
            payer=instructor,
            base=instructor,
            seed=allowance_seed(terms.cohort_id, terms.student, terms.arbiter),
            address=terms.allowance,
            lamports=grant.allowance_rent + grant.lamports,
            owner=instructor,
        )
    elif grant.lamports > 0:
        instructions += wrap_sol(payer=instructor, account=terms.allowance, lamports=grant.lamports)
    instructions.append(
        approve_checked(
            ApproveCheckedParams(
                program_id=TOKEN_PROGRAM_ID,
                source=terms.allowance,
                mint=NATIVE_MINT,
                delegate=terms.delegate,
                owner=instructor,
                amount=grant.approve,
                decimals=NATIVE_DECIMALS,
            )
        )
    )
    return instructions


def fund_message(grants: Sequence[AllowanceGrant], *, blockhash: Hash) -> MessageV0:
    """One transaction of the instructor (signer and fee payer, its only signature) creating,
    funding or topping up, and approving the allowances of ``grants`` (all of one instructor).
    Atomic: a top-up of an allowance that is gone fails at SyncNative, and the whole
    transaction with it."""
    if not grants:
        raise CohortPoolError("nothing to fund")
    instructor = grants[0].terms.instructor
    instructions: list[Instruction] = []
    for grant in grants:
        if grant.terms.instructor != instructor:
            raise CohortPoolError("one funding transaction serves one instructor")
        if grant.lamports < 0 or grant.approve < 0:
            raise CohortPoolError("amounts must be non-negative lamports")
        instructions += _grant_instructions(grant)
    return compile_message(instructor, instructions, blockhash)


def reclaim_message(allowances: Sequence[AllowanceTerms], *, blockhash: Hash) -> MessageV0:
    """The instructor revokes and closes ``allowances``: every lamport they hold (unspent
    tokens and rent) goes back to the instructor's wallet. Signed and paid by the instructor
    alone; valid at any time, also while a session it funded runs (that escrow's remainder
    then goes to the instructor, see :func:`cohort_settlement_message`)."""
    if not allowances:
        raise CohortPoolError("nothing to reclaim")
    instructor = allowances[0].instructor
    instructions: list[Instruction] = []
    for terms in allowances:
        if terms.instructor != instructor:
            raise CohortPoolError("one reclaim transaction serves one instructor")
        instructions += [
            revoke(
                RevokeParams(program_id=TOKEN_PROGRAM_ID, account=terms.allowance, owner=instructor)
            ),
            close_wsol(account=terms.allowance, dest=instructor, owner=instructor),
        ]
    return compile_message(instructor, instructions, blockhash)


def transaction_size(message: MessageV0) -> int:
    """Bytes of the transaction carrying ``message`` with all its signatures."""
    signatures = message.header.num_required_signatures
    return 1 + 64 * signatures + len(to_bytes_versioned(message))


def pack_grants(grants: Sequence[AllowanceGrant], *, blockhash: Hash) -> list[list[AllowanceGrant]]:
    """Split ``grants`` into as few transactions as fit :data:`MAX_TRANSACTION_BYTES`, in
    order."""
    batches: list[list[AllowanceGrant]] = []
    current: list[AllowanceGrant] = []
    for grant in grants:
        trial = [*current, grant]
        if transaction_size(fund_message(trial, blockhash=blockhash)) <= MAX_TRANSACTION_BYTES:
            current = trial
            continue
        if not current:
            raise CohortPoolError("one allowance does not fit a transaction")  # cannot happen
        batches.append(current)
        current = [grant]
    if current:
        batches.append(current)
    return batches


# ----------------------------------------------------------------------------------------------
# Pure message builders: the session's


def funding_message(
    session: CohortSession,
    deposit: int,
    *,
    escrow_rent: int,
    multisig_rent: int | None,
    reimbursement: int,
    blockhash: Hash,
) -> MessageV0:
    """The cohort session's funding, signed by the arbiter (fee payer) and the student.

    The arbiter creates the escrow (and, ``multisig_rent`` not None, its 2-of-3 multisig) at
    the student's derived addresses (``create_account_with_seed`` with the student as base:
    the student's signature is needed, and given) fronting the rents; the [student, arbiter]
    delegate moves ``deposit`` from the allowance into the escrow and ``reimbursement`` into
    the arbiter's wSOL account (created idempotently at the arbiter's expense).
    """
    if deposit <= 0:
        raise CohortPoolError("a cohort deposit must be a positive number of lamports")
    if reimbursement < 0:
        raise CohortPoolError("a reimbursement cannot be negative")
    terms, allowance = session.escrow, session.allowance
    arbiter = terms.arbiter
    cosigners = list(allowance.delegate_signers)
    instructions = opening_instructions(
        terms, payer=arbiter, lamports=escrow_rent, multisig_rent=multisig_rent
    )
    instructions.append(_delegate_transfer(session, terms.escrow, deposit, cosigners))
    if reimbursement > 0:
        instructions += [
            create_idempotent_associated_token_account(
                payer=arbiter, owner=arbiter, mint=NATIVE_MINT
            ),
            _delegate_transfer(session, session.arbiter_wsol, reimbursement, cosigners),
        ]
    return compile_message(arbiter, instructions, blockhash)


def _delegate_transfer(
    session: CohortSession, dest: Pubkey, amount: int, cosigners: list[Pubkey]
) -> Instruction:
    return move_wsol(
        source=session.allowance.allowance,
        dest=dest,
        owner=session.allowance.delegate,
        amount=amount,
        signers=cosigners,
    )


def _cohort_close(
    session: CohortSession,
    *,
    to_provider_wsol: int,
    create_payout_for: Pubkey | None,
    remainder: int,
    remainder_to: RemainderTo,
    provider_in_sol: int,
    cosigners: Sequence[Pubkey],
) -> list[Instruction]:
    terms = session.escrow
    arbiter = terms.arbiter
    instructions = provider_payout(
        terms, to_provider_wsol, cosigners, create_payout_for=create_payout_for
    )
    if remainder > 0 and remainder_to == "allowance":
        instructions.append(
            escrow_transfer(terms, session.allowance.allowance, remainder, cosigners)
        )
    # The escrow's rent (and, below, whatever is passed on) goes to the arbiter, who fronted
    # the rent; a native account closes with its balance.
    instructions.append(close_escrow(terms, arbiter, cosigners))
    if remainder > 0 and remainder_to == "instructor":
        instructions.append(pay_sol(arbiter, session.allowance.instructor, remainder))
    if provider_in_sol > 0:
        instructions.append(pay_sol(arbiter, terms.provider, provider_in_sol))
    return instructions


def cohort_settlement_message(
    session: CohortSession,
    amount: int,
    *,
    remainder: int,
    remainder_to: RemainderTo = "allowance",
    blockhash: Hash,
    create_payout_account: bool = True,
) -> MessageV0:
    """A cohort session's settlement, signed by the arbiter and the provider (fee payer, as
    for a plain session): ``amount`` to the provider's wSOL account, ``remainder`` (the rest
    of the escrow's wSOL) to the allowance — or, ``remainder_to="instructor"`` when the
    allowance was reclaimed, to the instructor's wallet — and the escrow closed to the
    arbiter, which gets back the rent it fronted."""
    if amount < 0 or remainder < 0:
        raise CohortPoolError("amounts must be non-negative lamports")
    terms = session.escrow
    instructions = _cohort_close(
        session,
        to_provider_wsol=amount,
        create_payout_for=terms.provider if create_payout_account else None,
        remainder=remainder,
        remainder_to=remainder_to,
        provider_in_sol=0,
        cosigners=(terms.arbiter, terms.provider),
    )
    return compile_message(terms.provider, instructions, blockhash)


def cohort_refund_message(
    session: CohortSession,
    provider_share: int,
    *,
    remainder: int,
    remainder_to: RemainderTo = "allowance",
    provider_has_wsol_account: bool,
    blockhash: Hash,
) -> MessageV0:
    """A cohort session's refund (the provider failed), signed by the student and the arbiter;
    the arbiter pays the fee (the student holds no SOL) and is reimbursed from the escrow:
    what neither ``provider_share`` nor ``remainder`` takes stays in the escrow and comes to
    the arbiter when it closes. The provider's share is wSOL if it has a wSOL account, else
    native SOL the arbiter passes on from the closed escrow in the same transaction."""
    if provider_share < 0 or remainder < 0:
        raise CohortPoolError("amounts must be non-negative lamports")
    terms = session.escrow
    in_wsol = provider_share if provider_has_wsol_account else 0
    instructions = _cohort_close(
        session,
        to_provider_wsol=in_wsol,
        create_payout_for=None,
        remainder=remainder,
        remainder_to=remainder_to,
        provider_in_sol=provider_share - in_wsol,
        cosigners=(terms.user, terms.arbiter),
    )
    return compile_message(terms.arbiter, instructions, blockhash)


def match_cohort_settlement(
    session: CohortSession, amount: int, message: bytes, *, blockhash: Hash
) -> bool:
    """True when ``message`` is byte for byte a :func:`cohort_settlement_message` of
    ``session`` paying the provider ``amount``, for some remainder (read from the message,
    then the whole message rebuilt around it and compared), to the allowance or the
    instructor, with or without creating the provider's wSOL account. What a provider checks
    before co-signing a cohort lease's settlement."""
    try:
        parsed = MessageV0.from_bytes(message)
    except ValueError:
        return False

    def build(remainder: int, to: RemainderTo, create: bool) -> MessageV0:
        return cohort_settlement_message(
            session,
            amount,
            remainder=remainder,
            remainder_to=to,
            blockhash=blockhash,
            create_payout_account=create,
        )

    return _rebuilds(message, transfer_amounts(parsed), build)


def _rebuilds(
    message: bytes,
    remainders: Iterable[int],
    build: Callable[[int, RemainderTo, bool], MessageV0],
) -> bool:
    """True when ``build(remainder, to, flag)`` is ``message`` byte for byte for one of
    ``remainders``, either destination of the remainder and either value of the flag."""
    for remainder in remainders:
        for to in _REMAINDER_TO:
            for flag in (True, False):
                if bytes(build(remainder, to, flag)) == message:
                    return True
    return False


def match_cohort_funding(session: CohortSession, deposit: int, message: bytes) -> bool:
    """True when ``message`` is byte for byte a :func:`funding_message` of ``session`` moving
    ``deposit`` into its escrow and reimbursing the arbiter exactly its fee plus the rent of
    the multisig it creates (the rents read from the message, the whole message rebuilt
    around them and compared). What the student checks before signing a cohort funding: it
    moves allowance funds into this lease's escrow and nowhere else."""
    try:
        parsed = MessageV0.from_bytes(message)
    except ValueError:
        return False
    keys = list(parsed.account_keys)
    rents: set[int] = set()
    for ix in parsed.instructions:
        data = bytes(ix.data)
        if keys[ix.program_id_index] != SYSTEM_PROGRAM_ID or data[:4] != CREATE_WITH_SEED_TAG:
            continue
        if len(data) < 44:
            return False
        end = 44 + int.from_bytes(data[36:44], "little")
        if len(data) < end + 8:
            return False
        rents.add(int.from_bytes(data[end : end + 8], "little"))
    blockhash = parsed.recent_blockhash
    for escrow_rent in rents:
        for multisig_rent in [None, *rents]:
            try:
                candidate = funding_message(
                    session,
                    deposit,
                    escrow_rent=escrow_rent,
                    multisig_rent=multisig_rent,
                    reimbursement=FEE_PER_SIGNATURE * FUNDING_SIGNATURES + (multisig_rent or 0),
                    blockhash=blockhash,
                )
            except CohortPoolError:
                return False
            if bytes(candidate) == message:
                return True
    return False


def match_cohort_refund(
    session: CohortSession, provider_share: int, message: bytes, *, max_remainder: int
) -> bool:
    """True when ``message`` is byte for byte a :func:`cohort_refund_message` of ``session``
    paying the provider ``provider_share`` (wSOL, or SOL passed on by the arbiter) and
    returning a remainder (read from the message) to the allowance or the instructor, with at
    most the arbiter's fee left to it: the remainder is at least ``max_remainder`` (what the
    escrow holds beyond the share) less that fee. What the student checks before co-signing
    a cohort refund."""
    try:
        parsed = MessageV0.from_bytes(message)
    except ValueError:
        return False
    fee = FEE_PER_SIGNATURE * 2
    remainders = [r for r in transfer_amounts(parsed) if r >= max_remainder - fee]

    def build(remainder: int, to: RemainderTo, has_wsol: bool) -> MessageV0:
        return cohort_refund_message(
            session,
            provider_share,
            remainder=remainder,
            remainder_to=to,
            provider_has_wsol_account=has_wsol,
            blockhash=parsed.recent_blockhash,
        )

    return _rebuilds(message, remainders, build)


# ----------------------------------------------------------------------------------------------
# Pure checks


def delegate_problems(terms: AllowanceTerms, multisig: Multisig) -> list[str]:
    """What is wrong with the allowance's delegate, each naming its field; empty when it is
    exactly m = 2, n = 2, signers student and arbiter (each once, in that order or not)."""
    roles = {terms.student: "student", terms.arbiter: "arbiter"}
    return multisig_signer_problems(
        multisig,
        threshold=DELEGATE_THRESHOLD,
        roles=roles,
        stranger="neither the student nor the arbiter",
    )


def allowance_problems(terms: AllowanceTerms, token: TokenAccount, lamports: int) -> list[str]:
    """What is wrong with the allowance's token account (``lamports``: its balance), each
    naming its field; empty when it is an initialized wrapped-SOL account owned by the
    instructor, delegated to the [student, arbiter] multisig (or to no one, with nothing
    delegated: spent to the cap or revoked), with no close authority but the instructor, its
    amount backed by its lamports."""
    authority: list[str] = []
    # No delegate with nothing delegated: spent to the cap (SPL Token clears the delegate
    # when its amount reaches 0) or revoked; nothing can be moved until a new approval.
    spent = token.delegate is None and token.delegated_amount == 0
    if token.delegate != terms.delegate and not spent:
        authority.append(
            f"its delegate is {token.delegate}, not the student + arbiter multisig {terms.delegate}"
        )
    if token.close_authority is not None and token.close_authority != terms.instructor:
        authority.append(
            f"it has a close authority ({token.close_authority}) other than the instructor"
        )
    return wsol_account_problems(
        token,
        lamports,
        owner=terms.instructor,
        owner_role="instructor",
        authority_problems=authority,
    )


# ----------------------------------------------------------------------------------------------
# The client


class CohortPoolClient(EscrowClient):
    """Allowance and cohort-escrow operations over any Solana JSON-RPC endpoint; the plain
    escrow operations (``verify_escrow``, ``submit``...) are inherited."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Keys per ``getMultipleAccounts`` call of :meth:`allowance_states`.
        self.max_accounts_per_call = MAX_ACCOUNTS_PER_CALL
        #: Delegate multisigs verified as some allowance's [student, arbiter] 2-of-2, by
        #: address: SPL Token can neither change nor close an initialized multisig, so what
        #: was verified once stays so and :meth:`allowance_states` reads it only once.
        self._delegates: dict[Pubkey, Account] = {}

    # -- reading ------------------------------------------------------------------------------

    def check_allowance(
        self, terms: AllowanceTerms, account: Account | None, delegate: Account | None
    ) -> AllowanceState | None:
        """The allowance verified from its account and its delegate's (None: no allowance);
        :class:`CohortPoolError` naming every field that differs otherwise."""
        if account is None:
            return None
        where = f"allowance {terms.allowance} of student {terms.student}"
        if account.owner != TOKEN_PROGRAM_ID:
            raise CohortPoolError(f"{where} belongs to program {account.owner}, not SPL Token")
        token = decode_token_account(bytes(account.data))
        if token is None:
            raise CohortPoolError(f"{where} is not an initialized SPL Token account")
        problems = allowance_problems(terms, token, account.lamports)
        if delegate is None:
            problems.append(f"its delegate multisig {terms.delegate} does not exist")
        elif delegate.owner != TOKEN_PROGRAM_ID:
            problems.append(f"its delegate {terms.delegate} belongs to program {delegate.owner}")
        else:
            multisig = decode_multisig(bytes(delegate.data))
            if multisig is None:
                problems.append(f"its delegate {terms.delegate} is not an initialized multisig")
            else:
                problems += [f"delegate: {p}" for p in delegate_problems(terms, multisig)]
        if problems:
            raise CohortPoolError(f"{where} is not as agreed: " + "; ".join(problems))
        assert token.rent_exempt_reserve is not None
        return AllowanceState(
            terms.allowance,
            token.amount,
            token.delegated_amount,
            account.lamports,
            token.rent_exempt_reserve,
        )

    async def allowance_state(self, terms: AllowanceTerms) -> AllowanceState | None:
        """The allowance as it is on-chain, None if there is none (never funded, reclaimed)."""
        account, delegate = await self._accounts(
            "reading an allowance", [terms.allowance, terms.delegate]
        )
        return self.check_allowance(terms, account, delegate)

    async def _many_accounts(self, what: str, keys: Sequence[Pubkey]) -> list[Account | None]:
        """The accounts of any number of ``keys``, in order: :attr:`max_accounts_per_call` a
        ``getMultipleAccounts`` call (a class of hundreds is more than one call may ask
        for), the calls sent at once."""
        step = max(1, self.max_accounts_per_call)
        found = await asyncio.gather(
            *(self._accounts(what, keys[i : i + step]) for i in range(0, len(keys), step))
        )
        return list(itertools.chain.from_iterable(found))

    async def allowance_states(
        self, allowances: Sequence[AllowanceTerms]
    ) -> list[AllowanceState | CohortPoolError | None]:
        """Each allowance as it is on-chain, in order: its :class:`AllowanceState`, None (no
        allowance), or the :class:`CohortPoolError` naming what is not as agreed (returned,
        not raised: one bad allowance does not hide the others).

        The accounts are read with ``getMultipleAccounts``, :attr:`max_accounts_per_call`
        keys a call, the calls sent at once; a delegate verified before is not read again
        (``_delegates``), so a funded class of N students costs ceil(N / 100) calls.
        :class:`~jupyter_io.errors.PaymentError` if the RPC cannot be read."""
        keys: list[Pubkey] = []
        for terms in allowances:
            keys.append(terms.allowance)
            if terms.delegate not in self._delegates:
                keys.append(terms.delegate)
        keys = list(dict.fromkeys(keys))
        found = await self._many_accounts("reading allowances", keys)
        accounts = dict(zip(keys, found, strict=True))
        states: list[AllowanceState | CohortPoolError | None] = []
        for terms in allowances:
            delegate = self._delegates.get(terms.delegate) or accounts.get(terms.delegate)
            try:
                state = self.check_allowance(terms, accounts[terms.allowance], delegate)
            except CohortPoolError as exc:
                states.append(exc)
                continue
            if state is not None and delegate is not None:
                self._delegates[terms.delegate] = delegate  # it passed delegate_problems
            states.append(state)
        return states

    # -- instructor ----------------------------------------------------------------------------

    async def plan_grants(
        self, targets: Sequence[tuple[AllowanceTerms, int]]
    ) -> list[AllowanceGrant]:
        """Grants that bring each allowance to hold at least its target and delegate exactly
        that much: a missing allowance is created with the target, one holding less is topped
        up by the difference, and each is (re-)approved for the target. Allowances that are
        not as agreed raise :class:`CohortPoolError` (nothing is sent)."""
        keys: list[Pubkey] = []
        for terms, _ in targets:
            keys += [terms.allowance, terms.delegate]
        accounts, _ = await asyncio.gather(
            self._many_accounts("reading allowances", keys),
            self._rent_for([ACCOUNT_LEN, MULTISIG_LEN]),
        )
        grants: list[AllowanceGrant] = []
        delegates_created: set[Pubkey] = set()
        for i, (terms, target) in enumerate(targets):
            if target <= 0:
                raise CohortPoolError("an allowance's target must be a positive number of lamports")
            account, delegate = accounts[2 * i], accounts[2 * i + 1]
            delegate_rent: int | None = None
            if delegate is None and terms.delegate not in delegates_created:
                delegate_rent = self._rent[MULTISIG_LEN]
                delegates_created.add(terms.delegate)
            if account is None:
                grants.append(
                    AllowanceGrant(terms, target, target, self._rent[ACCOUNT_LEN], delegate_rent)
                )
                continue
            state = self.check_allowance(terms, account, delegate)
            assert state is not None
            top_up = max(0, target - state.amount)
            if top_up == 0 and state.delegated_amount == target:
                continue
            grants.append(AllowanceGrant(terms, top_up, target, None, None))
        return grants

    async def fund(
        self, instructor: Keypair, grants: Sequence[AllowanceGrant]
    ) -> list[FundReceipt]:
        """Send ``grants`` (:meth:`plan_grants`) in as few transactions as fit, the instructor
        signing and paying each. :class:`InsufficientFunds` (nothing sent) when the wallet
        cannot cover them."""
        if not grants:
            return []
        owner = instructor.pubkey()
        blockhash = await self._latest_blockhash()
        batches = pack_grants(grants, blockhash=blockhash)
        needed = sum(g.outlay for g in grants) + FEE_PER_SIGNATURE * len(batches)
        held = await self.balance(owner)
        if held < needed:
            raise InsufficientFunds(
                f"funding {len(grants)} allowance(s) needs {format_sol(needed)} with rents and "
                f"fees, wallet {owner} holds {format_sol(held)}; fund it first"
            )
        receipts: list[FundReceipt] = []
        for batch in batches:

            def build(blockhash: Hash, batch: list[AllowanceGrant] = batch) -> MessageV0:
                return fund_message(batch, blockhash=blockhash)

            signature = await self._submit_fresh(build, [instructor], "funding allowances")
            receipts.append(FundReceipt(signature, tuple(batch), FEE_PER_SIGNATURE))
        return receipts

    async def reclaim(
        self, instructor: Keypair, allowances: Sequence[AllowanceTerms], *, batch: int = 8
    ) -> list[ReclaimReceipt]:
        """Revoke and close those of ``allowances`` that exist (the rest are skipped), up to
        ``batch`` per transaction; everything they hold comes back to the instructor."""
        keys = [t.allowance for t in allowances]
        accounts = await self._many_accounts("reading allowances", keys)
        present = [(t, a) for t, a in zip(allowances, accounts, strict=True) if a is not None]
        receipts: list[ReclaimReceipt] = []
        for start in range(0, len(present), batch):
            chunk = present[start : start + batch]
            closing = [t for t, _ in chunk]

            def build(blockhash: Hash, closing: list[AllowanceTerms] = closing) -> MessageV0:
                return reclaim_message(closing, blockhash=blockhash)

            signature = await self._submit_fresh(build, [instructor], "reclaiming allowances")
            returned = sum(a.lamports for _, a in chunk)
            receipts.append(ReclaimReceipt(signature, tuple(closing), returned, FEE_PER_SIGNATURE))
        return receipts

    # -- arbiter: funding --------------------------------------------------------------------

    async def funding_plan(self, session: CohortSession, deposit: int) -> FundingPlan:
        """Read the allowance, the escrow and its multisig and plan the funding of ``deposit``
        (at most what the allowance can spend after the arbiter's reimbursement; pass the
        largest deposit wanted, the plan carries what fits). :class:`CohortPoolError` when the
        allowance is missing or not as agreed, the escrow exists already, or nothing fits."""
        terms = session.escrow
        allowance_terms = session.allowance
        what = f"planning the funding of cohort lease {terms.session_id}"
        (allowance, delegate, escrow, multisig, arbiter_wsol), _ = await asyncio.gather(
            self._accounts(
                what,
                [
                    allowance_terms.allowance,
                    allowance_terms.delegate,
                    terms.escrow,
                    terms.multisig,
                    session.arbiter_wsol,
                ],
            ),
            self._rent_for([ACCOUNT_LEN, MULTISIG_LEN]),
        )
        state = self.check_allowance(allowance_terms, allowance, delegate)
        if state is None:
            raise CohortPoolError(
                f"student {allowance_terms.student} has no allowance in cohort "
                f"{allowance_terms.cohort_id} (at {allowance_terms.allowance}); the instructor "
                f"funds it with `jupyter io cohort fund`"
            )
        if escrow is not None:
            raise CohortPoolError(
                f"the escrow {terms.escrow} of lease {terms.session_id} exists already"
            )
        multisig_rent: int | None = None
        if multisig is None:
            multisig_rent = self._rent[MULTISIG_LEN]
        else:
            self._check_multisig(terms, multisig)
        reimbursement = FEE_PER_SIGNATURE * FUNDING_SIGNATURES + (multisig_rent or 0)
        fits = min(deposit, state.spendable - reimbursement)
        if fits <= 0:
            raise InsufficientFunds(
                f"the allowance of student {allowance_terms.student} can spend "
                f"{format_sol(state.spendable)}, not enough for a session (the funding costs "
                f"{format_sol(reimbursement)}); ask the instructor to top it up"
            )
        return FundingPlan(
            session,
            fits,
            reimbursement,
            self._rent[ACCOUNT_LEN],
            multisig_rent,
            arbiter_wsol is None,
        )

    async def fund_session(
        self, plan: FundingPlan, *, student: Signer, arbiter: Signer
    ) -> Signature:
        """Build and send the funding of ``plan`` signed by student and arbiter (both
        keypairs here; across machines use :meth:`FundingPlan.message` and :meth:`submit`)."""
        return await self._submit_fresh(
            plan.message,
            [arbiter, student],
            f"funding cohort lease {plan.session.escrow.session_id}",
        )

    # -- settlement and refund ---------------------------------------------------------------

    async def remainder_destination(self, session: CohortSession) -> RemainderTo:
        """Where an escrow's remainder goes now: the allowance if it is still exactly as
        agreed, else (reclaimed, or changed) the instructor."""
        allowance, delegate = await self._accounts(
            "reading an allowance", [session.allowance.allowance, session.allowance.delegate]
        )
        try:
            state = self.check_allowance(session.allowance, allowance, delegate)
        except CohortPoolError:
            return "instructor"
        return "allowance" if state is not None else "instructor"

    async def settlement_plan(
        self, session: CohortSession, amount: int
    ) -> tuple[EscrowState, RemainderTo, bool] | None:
        """The escrow (None: closed), where its remainder goes, and whether the provider
        needs its wSOL account created, for a settlement paying ``amount``."""
        found = await self._escrow_to_close(
            session.escrow, amount, f"settling cohort lease {session.escrow.session_id}"
        )
        if found is None:
            return None
        state, has_payout = found
        return state, await self.remainder_destination(session), not has_payout

    async def settle_cohort(
        self, session: CohortSession, amount: int, *, arbiter: Signer, provider: Signer
    ) -> Signature | None:
        """Settle a cohort escrow (arbiter + provider; the provider pays the fee): ``amount``
        to the provider, the rest back to the allowance (or the instructor), the rent to the
        arbiter. None when the escrow is already closed."""
        plan = await self.settlement_plan(session, amount)
        if plan is None:
            return None
        state, to, create = plan

        def build(blockhash: Hash) -> MessageV0:
            return cohort_settlement_message(
                session,
                amount,
                remainder=state.amount - amount,
                remainder_to=to,
                blockhash=blockhash,
                create_payout_account=create,
            )

        return await self._submit_fresh(
            build, [provider, arbiter], f"settling cohort lease {session.escrow.session_id}"
        )

    async def refund_plan(
        self, session: CohortSession, provider_share: int
    ) -> tuple[EscrowState, RemainderTo, bool, int] | None:
        """For a refund: the escrow (None: closed), where the remainder goes, whether the
        provider has a wSOL account, and the remainder after the provider's share and the
        arbiter's fee."""
        found = await self._escrow_to_close(
            session.escrow, provider_share, f"refunding cohort lease {session.escrow.session_id}"
        )
        if found is None:
            return None
        state, has_wsol = found
        fee = FEE_PER_SIGNATURE * 2
        remainder = max(0, state.amount - provider_share - fee)
        to = await self.remainder_destination(session)
        return state, to, has_wsol, remainder

    def refund_builder(
        self,
        session: CohortSession,
        provider_share: int,
        plan: tuple[EscrowState, RemainderTo, bool, int],
    ) -> _Builder:
        """The refund message for a blockhash, from :meth:`refund_plan`'s answer."""
        _, to, has_wsol, remainder = plan

        def build(blockhash: Hash) -> MessageV0:
            return cohort_refund_message(
                session,
                provider_share,
                remainder=remainder,
                remainder_to=to,
                provider_has_wsol_account=has_wsol,
                blockhash=blockhash,
            )

        return build

    async def refund_cohort(
        self, session: CohortSession, provider_share: int, *, student: Signer, arbiter: Signer
    ) -> Signature | None:
        """Refund a cohort escrow (student + arbiter; the arbiter pays the fee and takes it
        back from the escrow). None when the escrow is already closed."""
        plan = await self.refund_plan(session, provider_share)
        if plan is None:
            return None
        return await self._submit_fresh(
            self.refund_builder(session, provider_share, plan),
            [arbiter, student],
            f"refunding cohort lease {session.escrow.session_id}",
        )
