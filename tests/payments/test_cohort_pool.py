"""Cohort pools with real transactions on the embedded ledger (docs/payments-contract.md
section 6): allowances funded by an instructor, sessions funded from them by student +
arbiter, settled, refunded and reclaimed; every scenario ends with :class:`CohortBooks`'
conservation check, and every student holds 0 SOL throughout.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from solders.hash import Hash
from solders.instruction import Instruction
from solders.keypair import Keypair
from solders.message import MessageV0
from solders.pubkey import Pubkey
from spl.token.constants import TOKEN_PROGRAM_ID
from spl.token.instructions import approve_checked
from spl.token.models import ApproveCheckedParams

from jupyter_io.errors import InsufficientFunds
from jupyter_io.payments.amounts import FEE_PER_SIGNATURE, LAMPORTS_PER_SOL
from jupyter_io.payments.cohort_pool import (
    AllowanceGrant,
    AllowanceState,
    AllowanceTerms,
    CohortPoolClient,
    CohortPoolError,
    CohortSession,
    allowance_problems,
    cohort_settlement_message,
    delegate_problems,
    fund_message,
    funding_message,
    match_cohort_funding,
    match_cohort_settlement,
    pack_grants,
    transaction_size,
)
from jupyter_io.payments.escrow import TransactionFailed
from jupyter_io.payments.instructions import compile_message, move_wsol
from jupyter_io.payments.token_accounts import (
    ACCOUNT_LEN,
    MULTISIG_LEN,
    NATIVE_DECIMALS,
    NATIVE_MINT,
    Multisig,
    decode_token_account,
)

from ..cohort_books import CohortBooks
from .conftest import Chain

CAP = 200_000_000  # 0.2 SOL per student
DEPOSIT = 50_000_000
METERED = 12_345_678
FUNDING_FEE = 2 * FEE_PER_SIGNATURE


@dataclass
class Pool:
    chain: Chain
    pool: CohortPoolClient
    instructor: Keypair
    arbiter: Keypair
    provider: Keypair
    students: list[Keypair]
    cohort: str = "c_test0000000000ab"

    def terms(self, i: int = 0, cohort: str | None = None) -> AllowanceTerms:
        return AllowanceTerms(
            self.instructor.pubkey(),
            self.students[i].pubkey(),
            self.arbiter.pubkey(),
            cohort or self.cohort,
        )

    def session(self, lease: str, i: int = 0) -> CohortSession:
        return self.terms(i).session(self.provider.pubkey(), lease)

    async def fund(self, students: int = 1, cap: int = CAP) -> list[str]:
        grants = await self.pool.plan_grants([(self.terms(i), cap) for i in range(students)])
        return [str(r.signature) for r in await self.pool.fund(self.instructor, grants)]

    async def open(self, lease: str, deposit: int = DEPOSIT, i: int = 0) -> tuple[str, int]:
        """Fund a session; returns its signature and the escrow rent the arbiter fronted."""
        plan = await self.pool.funding_plan(self.session(lease, i), deposit)
        assert plan.deposit == deposit
        signature = await self.pool.fund_session(
            plan, student=self.students[i], arbiter=self.arbiter
        )
        return str(signature), plan.escrow_rent


@pytest.fixture
async def pool(chain: Chain) -> Pool:
    p = Pool(chain, CohortPoolClient(chain.client), Keypair(), Keypair(), Keypair(), [])
    p.students = [Keypair() for _ in range(5)]
    await chain.escrow.airdrop(p.instructor.pubkey(), 2 * LAMPORTS_PER_SOL)
    await chain.escrow.airdrop(p.arbiter.pubkey(), LAMPORTS_PER_SOL // 10)
    await chain.escrow.airdrop(p.provider.pubkey(), LAMPORTS_PER_SOL // 10)
    return p


@pytest.fixture
def cbooks(chain: Chain) -> CohortBooks:
    return CohortBooks(lambda: chain.client)


async def _token(chain: Chain, address: Pubkey) -> tuple[int, int]:
    account = (await chain.client.get_account_info(address)).value
    assert account is not None
    token = decode_token_account(bytes(account.data))
    assert token is not None
    return token.amount, token.delegated_amount


async def test_funded_session_settled_conserves_and_returns_the_rest_to_the_allowance(
    pool: Pool, cbooks: CohortBooks, chain: Chain
) -> None:
    session = pool.session("lease-settle")
    others = [pool.terms(1), pool.terms(2)]
    before = await cbooks.snapshot([session], others)
    funded = await pool.fund(students=3)
    assert len(funded) == 2, "two new students (allowance and delegate) fit one transaction"
    for i in range(3):
        state = await pool.pool.allowance_state(pool.terms(i))
        assert state is not None and (state.amount, state.delegated_amount) == (CAP, CAP)
        assert await chain.balance(pool.students[i].pubkey()) == 0

    opened, rent = await pool.open("lease-settle")
    # The escrow is a plain 2-of-3 escrow of the student: the coordinator's usual check passes.
    assert (await chain.escrow.verify_escrow(session.escrow, DEPOSIT)).amount == DEPOSIT
    during = await cbooks.snapshot([session], others)
    assert during.escrows == DEPOSIT + rent
    await cbooks.assert_conserved(
        [session],
        before,
        during,
        paid_to_provider=0,
        signatures=[*funded, opened],
        rent_in_open_escrows=rent,
    )

    settled = await pool.pool.settle_cohort(
        session, METERED, arbiter=pool.arbiter, provider=pool.provider
    )
    assert settled is not None
    after = await cbooks.snapshot([session], others)
    assert after.escrows == 0
    await cbooks.assert_conserved(
        [session],
        before,
        after,
        paid_to_provider=METERED,
        signatures=[*funded, opened, str(settled)],
    )
    reimbursement = FUNDING_FEE + MULTISIG_LEN_RENT
    amount, delegated = await _token(chain, session.allowance.allowance)
    assert amount == CAP - reimbursement - METERED
    # SPL approve semantics: the remainder came back, the delegated amount did not.
    assert delegated == CAP - reimbursement - DEPOSIT
    assert await chain.balance(pool.students[0].pubkey()) == 0
    # Settling again is a no-op.
    assert (
        await pool.pool.settle_cohort(
            session, METERED, arbiter=pool.arbiter, provider=pool.provider
        )
        is None
    )


MULTISIG_LEN_RENT = (MULTISIG_LEN + 128) * 6960  # the ledger's default rent, checked below


async def test_rents_are_what_the_books_assume(chain: Chain) -> None:
    rent = await chain.client.get_minimum_balance_for_rent_exemption(MULTISIG_LEN)
    assert rent.value == MULTISIG_LEN_RENT


@pytest.mark.parametrize("provider_has_wsol", [False, True])
async def test_refund_when_the_provider_failed_conserves(
    pool: Pool, cbooks: CohortBooks, chain: Chain, provider_has_wsol: bool
) -> None:
    session = pool.session("lease-refund")
    if provider_has_wsol:  # paid once before: it has its wSOL account
        await pool.fund()
        first = pool.session("lease-earlier")
        await pool.open("lease-earlier")
        await pool.pool.settle_cohort(first, 1_000, arbiter=pool.arbiter, provider=pool.provider)
    before = await cbooks.snapshot([session])
    funded = [] if provider_has_wsol else await pool.fund()
    opened, _ = await pool.open("lease-refund")
    share = 1_234_567
    refunded = await pool.pool.refund_cohort(
        session, share, student=pool.students[0], arbiter=pool.arbiter
    )
    after = await cbooks.snapshot([session])
    assert after.escrows == 0
    fees = await cbooks.assert_conserved(
        [session],
        before,
        after,
        paid_to_provider=share,
        signatures=[*funded, opened, str(refunded)],
    )
    assert fees[pool.arbiter.pubkey()] == 2 * FUNDING_FEE  # funding + refund, both reimbursed
    assert await chain.balance(pool.students[0].pubkey()) == 0


async def test_reclaim_before_any_session_returns_everything_but_fees_and_delegate_rent(
    pool: Pool, cbooks: CohortBooks, chain: Chain
) -> None:
    session = pool.session("unused")
    others = [pool.terms(1)]
    before = await cbooks.snapshot([session], others)
    funded = await pool.fund(students=2)
    receipts = await pool.pool.reclaim(pool.instructor, [pool.terms(0), pool.terms(1)])
    assert len(receipts) == 1 and receipts[0].returned == 2 * (CAP + ALLOWANCE_RENT)
    after = await cbooks.snapshot([session], others)
    assert after.allowance == 0
    assert await pool.pool.allowance_state(pool.terms(1)) is None
    await cbooks.assert_conserved(
        [session],
        before,
        after,
        paid_to_provider=0,
        signatures=[*funded, str(receipts[0].signature)],
    )
    # The instructor lost only fees and the two delegates' one-time rent.
    lost = before.instructor - after.instructor
    assert lost == 2 * FEE_PER_SIGNATURE + 2 * MULTISIG_LEN_RENT
    # Reclaiming what is gone is a no-op.
    assert await pool.pool.reclaim(pool.instructor, [pool.terms(0)]) == []


ALLOWANCE_RENT = (ACCOUNT_LEN + 128) * 6960


async def test_reclaim_mid_session_sends_the_remainder_to_the_instructor(
    pool: Pool, cbooks: CohortBooks, chain: Chain
) -> None:
    session = pool.session("lease-mid")
    before = await cbooks.snapshot([session])
    funded = await pool.fund()
    opened, rent = await pool.open("lease-mid")
    (reclaimed,) = await pool.pool.reclaim(pool.instructor, [pool.terms()])
    # The live session's escrow is untouched by the reclaim.
    assert (await chain.escrow.verify_escrow(session.escrow, DEPOSIT)).amount == DEPOSIT
    mid = await cbooks.snapshot([session])
    await cbooks.assert_conserved(
        [session],
        before,
        mid,
        paid_to_provider=0,
        signatures=[*funded, opened, str(reclaimed.signature)],
        rent_in_open_escrows=rent,
    )
    assert await pool.pool.remainder_destination(session) == "instructor"
    settled = await pool.pool.settle_cohort(
        session, METERED, arbiter=pool.arbiter, provider=pool.provider
    )
    after = await cbooks.snapshot([session])
    assert after.escrows == 0 and after.allowance == 0
    await cbooks.assert_conserved(
        [session],
        before,
        after,
        paid_to_provider=METERED,
        signatures=[*funded, opened, str(reclaimed.signature), str(settled)],
    )
    assert after.instructor - mid.instructor == DEPOSIT - METERED


async def test_reclaim_after_sessions_and_a_refund_mid_session(
    pool: Pool, cbooks: CohortBooks, chain: Chain
) -> None:
    one, two = pool.session("lease-1"), pool.session("lease-2")
    before = await cbooks.snapshot([one, two])
    funded = await pool.fund()
    first, _ = await pool.open("lease-1")
    settled = await pool.pool.settle_cohort(one, 777, arbiter=pool.arbiter, provider=pool.provider)
    second, _ = await pool.open("lease-2")
    (reclaimed,) = await pool.pool.reclaim(pool.instructor, [pool.terms()])
    refunded = await pool.pool.refund_cohort(two, 0, student=pool.students[0], arbiter=pool.arbiter)
    after = await cbooks.snapshot([one, two])
    assert after.escrows == after.allowance == 0
    await cbooks.assert_conserved(
        [one, two],
        before,
        after,
        paid_to_provider=777,
        signatures=[*funded, first, str(settled), second, str(reclaimed.signature), str(refunded)],
    )


async def test_funding_is_capped_by_what_the_delegate_may_still_spend(
    pool: Pool, chain: Chain
) -> None:
    await pool.fund()
    session = pool.session("lease-big")
    plan = await pool.pool.funding_plan(session, 10 * CAP)
    assert plan.deposit == CAP - plan.reimbursement
    await pool.pool.fund_session(plan, student=pool.students[0], arbiter=pool.arbiter)
    with pytest.raises(InsufficientFunds, match="ask the instructor to top it up"):
        await pool.pool.funding_plan(pool.session("lease-more"), 1)
    # A top-up (lamports, SyncNative, approve) puts the cap back in reach.
    grants = await pool.pool.plan_grants([(pool.terms(), CAP)])
    assert [(g.lamports, g.approve, g.allowance_rent) for g in grants] == [(CAP, CAP, None)]
    await pool.pool.fund(pool.instructor, grants)
    assert (await pool.pool.funding_plan(pool.session("lease-more"), CAP)).deposit > 0


def _steal(
    terms: AllowanceTerms,
    dest: Pubkey,
    amount: int,
    signers: list[Pubkey],
    payer: Pubkey,
    blockhash: Hash,
) -> MessageV0:
    ix = move_wsol(
        source=terms.allowance, dest=dest, owner=terms.delegate, amount=amount, signers=signers
    )
    return compile_message(payer, [ix], blockhash)


async def _wsol_account(pool: Pool, owner: Keypair) -> Pubkey:
    """A wSOL account of ``owner`` (its associated account), created by ``owner``."""
    from spl.token.instructions import (
        create_idempotent_associated_token_account,
        get_associated_token_address,
    )

    blockhash = (await pool.chain.client.get_latest_blockhash()).value.blockhash
    ix = create_idempotent_associated_token_account(owner.pubkey(), owner.pubkey(), NATIVE_MINT)
    message = MessageV0.try_compile(owner.pubkey(), [ix], [], blockhash)
    await pool.pool.submit(message, [owner])
    return get_associated_token_address(owner.pubkey(), NATIVE_MINT)


@pytest.mark.parametrize("thief", ["student", "arbiter", "provider"])
async def test_one_party_alone_cannot_move_allowance_funds(
    pool: Pool, cbooks: CohortBooks, thief: str
) -> None:
    await pool.fund()
    terms = pool.terms()
    key = {"student": pool.students[0], "arbiter": pool.arbiter, "provider": pool.provider}[thief]
    if thief == "student":
        await pool.chain.escrow.airdrop(key.pubkey(), LAMPORTS_PER_SOL // 100)  # for the fee
    dest = await _wsol_account(pool, key)
    before = await cbooks.snapshot([pool.session("x")])
    blockhash = (await pool.chain.client.get_latest_blockhash()).value.blockhash
    with pytest.raises(TransactionFailed, match=r"missing required signature|Custom"):
        await pool.pool.submit(
            _steal(terms, dest, 1_000, [key.pubkey()], key.pubkey(), blockhash), [key]
        )
    assert await cbooks.snapshot([pool.session("x")]) == before
    assert (await pool.pool.allowance_state(terms)) is not None


async def test_student_and_arbiter_cannot_spend_over_the_cap(pool: Pool, chain: Chain) -> None:
    # The instructor adds lamports without raising the approval: the allowance holds more
    # than the delegate may move.
    await pool.fund()
    terms = pool.terms()
    extra = AllowanceGrant(terms, 100_000_000, CAP, None, None)
    await pool.pool.fund(pool.instructor, [extra])
    state = await pool.pool.allowance_state(terms)
    assert state is not None and state.amount == CAP + 100_000_000 and state.spendable == CAP
    dest = await _wsol_account(pool, pool.arbiter)
    signers = [pool.students[0].pubkey(), pool.arbiter.pubkey()]
    blockhash = (await chain.client.get_latest_blockhash()).value.blockhash
    with pytest.raises(TransactionFailed, match=r"insufficient funds"):
        await pool.pool.submit(
            _steal(terms, dest, CAP + 1, signers, pool.arbiter.pubkey(), blockhash),
            [pool.arbiter, pool.students[0]],
        )
    assert (await pool.pool.allowance_state(terms)) == state


async def test_an_allowance_not_as_agreed_is_refused_naming_the_field(
    pool: Pool, chain: Chain
) -> None:
    await pool.fund()
    terms = pool.terms()
    # The instructor re-approves someone else as delegate: funding is refused, named.
    stranger = Keypair().pubkey()
    blockhash = (await chain.client.get_latest_blockhash()).value.blockhash
    ix: Instruction = approve_checked(
        ApproveCheckedParams(
            program_id=TOKEN_PROGRAM_ID,
            source=terms.allowance,
            mint=NATIVE_MINT,
            delegate=stranger,
            owner=terms.instructor,
            amount=1,
            decimals=NATIVE_DECIMALS,
        )
    )
    await pool.pool.submit(
        MessageV0.try_compile(terms.instructor, [ix], [], blockhash), [pool.instructor]
    )
    with pytest.raises(CohortPoolError, match=rf"its delegate is {stranger}, not the student"):
        await pool.pool.funding_plan(pool.session("lease-x"), DEPOSIT)
    # An allowance of another cohort (same instructor, student, arbiter) is another address.
    assert pool.terms(cohort="c_other00000000000").allowance != terms.allowance
    assert await pool.pool.allowance_state(pool.terms(cohort="c_other00000000000")) is None


def test_pure_checks_name_each_field() -> None:
    i, s, a, x = (Keypair().pubkey() for _ in range(4))
    terms = AllowanceTerms(i, s, a, "c_x")
    assert delegate_problems(terms, Multisig(2, 2, True, (s, a))) == []
    assert delegate_problems(terms, Multisig(2, 2, True, (a, s))) == []
    dup = delegate_problems(terms, Multisig(2, 2, True, (s, s)))
    assert any("duplicate signer" in p for p in dup) and any("arbiter" in p for p in dup)
    assert any(
        "threshold m = 1" in p for p in delegate_problems(terms, Multisig(1, 2, True, (s, a)))
    )
    assert any(
        "extra signer" in p for p in delegate_problems(terms, Multisig(2, 3, True, (s, a, x)))
    )
    from jupyter_io.payments.token_accounts import TokenAccount

    good = TokenAccount(NATIVE_MINT, i, 10, terms.delegate, 1, 2_039_280, 10, None)
    assert allowance_problems(terms, good, 2_039_290) == []
    bad = TokenAccount(x, s, 10, x, 2, 2_039_280, 5, x)
    problems = " | ".join(allowance_problems(terms, bad, 2_039_290))
    for field in ("wrong mint", "its owner is", "frozen", f"its delegate is {x}", "authority"):
        assert field in problems
    # Spent to the cap: SPL Token cleared the delegate; not a fault, nothing is spendable.
    spent = TokenAccount(NATIVE_MINT, i, 10, None, 1, 2_039_280, 0, None)
    assert allowance_problems(terms, spent, 2_039_290) == []
    with pytest.raises(CohortPoolError):
        AllowanceTerms(i, i, a, "c_x")


def test_the_provider_matches_only_the_exact_cohort_settlement() -> None:
    i, s, a, p = (Keypair().pubkey() for _ in range(4))
    session = AllowanceTerms(i, s, a, "c_x").session(p, "lease")
    blockhash = Hash.default()
    for to in ("allowance", "instructor"):
        good = cohort_settlement_message(
            session,
            500,
            remainder=1_000,
            remainder_to=to,
            blockhash=blockhash,
        )
        assert match_cohort_settlement(session, 500, bytes(good), blockhash=blockhash)
        assert not match_cohort_settlement(session, 501, bytes(good), blockhash=blockhash)
    # The remainder sent to someone else's allowance (another student's), or the provider's
    # pay short: refused.
    other = AllowanceTerms(i, Keypair().pubkey(), a, "c_x").session(p, "lease")
    stolen = cohort_settlement_message(other, 500, remainder=1_000, blockhash=blockhash)
    assert not match_cohort_settlement(session, 500, bytes(stolen), blockhash=blockhash)
    assert not match_cohort_settlement(session, 500, b"not a message", blockhash=blockhash)


def test_several_students_fit_one_funding_transaction() -> None:
    i, a = Keypair().pubkey(), Keypair().pubkey()
    new = [
        AllowanceGrant(
            AllowanceTerms(i, Keypair().pubkey(), a, "c_x"), CAP, CAP, 2_039_280, 3_361_680
        )
        for _ in range(12)
    ]
    batches = pack_grants(new, blockhash=Hash.default())
    assert [len(b) for b in batches] == [2] * 6
    for batch in batches:
        assert transaction_size(fund_message(batch, blockhash=Hash.default())) <= 1232


def test_the_student_matches_only_the_exact_funding_of_its_lease() -> None:
    i, s, a, p = (Keypair().pubkey() for _ in range(4))
    session = AllowanceTerms(i, s, a, "c_x").session(p, "lease")
    blockhash = Hash.new_unique()
    for multisig_rent in (None, MULTISIG_LEN_RENT):
        good = funding_message(
            session, DEPOSIT, escrow_rent=ALLOWANCE_RENT, multisig_rent=multisig_rent,
            reimbursement=FUNDING_FEE + (multisig_rent or 0), blockhash=blockhash,
        )  # fmt: skip
        assert match_cohort_funding(session, DEPOSIT, bytes(good))
        assert not match_cohort_funding(session, DEPOSIT + 1, bytes(good))
    # The arbiter asks for more than its fee back, or funds another lease's escrow: refused.
    greedy = funding_message(
        session, DEPOSIT, escrow_rent=ALLOWANCE_RENT, multisig_rent=None,
        reimbursement=FUNDING_FEE + 1, blockhash=blockhash,
    )  # fmt: skip
    assert not match_cohort_funding(session, DEPOSIT, bytes(greedy))
    other = AllowanceTerms(i, s, a, "c_x").session(p, "another-lease")
    elsewhere = funding_message(
        other, DEPOSIT, escrow_rent=ALLOWANCE_RENT, multisig_rent=None,
        reimbursement=FUNDING_FEE, blockhash=blockhash,
    )  # fmt: skip
    assert not match_cohort_funding(session, DEPOSIT, bytes(elsewhere))
    assert not match_cohort_funding(session, DEPOSIT, b"\x80garbage")


async def test_a_class_larger_than_one_rpc_read_is_funded_read_and_reclaimed(
    pool: Pool, chain: Chain
) -> None:
    # 101 students: 202 keys to plan the grants, 101 to reclaim, more than the 100 one
    # getMultipleAccounts call takes (the ledger refused such a class's top-up and reclaim).
    pool.students = [Keypair() for _ in range(101)]
    terms = [pool.terms(i) for i in range(101)]
    before = await chain.balance(pool.instructor.pubkey())
    funded = await pool.pool.fund(
        pool.instructor, await pool.pool.plan_grants([(t, 1_000_000) for t in terms])
    )
    states = await pool.pool.allowance_states(terms)
    assert [(s.amount, s.spendable) for s in states if isinstance(s, AllowanceState)] == [
        (1_000_000, 1_000_000)
    ] * 101
    receipts = await pool.pool.reclaim(pool.instructor, terms)
    assert sum(len(r.closed) for r in receipts) == 101
    assert await pool.pool.allowance_states(terms) == [None] * 101
    fees = sum(r.fee for r in funded) + sum(r.fee for r in receipts)
    lost = before - await chain.balance(pool.instructor.pubkey())
    assert lost == fees + 101 * MULTISIG_LEN_RENT  # the delegates' one-time rent, no more
