"""Escrows checked exactly, and watched (``docs/payments-contract.md`` sections 1, 3 and 4).

A real escrow coordinator serves its embedded ledger (LiteSVM); every malformed escrow here is
built by the user with real transactions (solana-py's ``spl.token`` instruction builders), as
an attacker would. The coordinator must refuse each at ``POST /leases/{id}/escrow`` naming the
field; the exact attack that once worked (a multisig listing the user twice, which SPL Token
counts as two signatures) is replayed end to end. An escrow that changes while its lease runs
(LiteSVM's ``set_account`` stands in for any way it could change) ends the lease at the next
budget check, and the provider is paid what can still be recovered. Every lamport is accounted
for (``tests/escrow_books.py``).
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import pytest
from solders.account import Account
from solders.instruction import Instruction
from solders.keypair import Keypair
from solders.message import MessageV0, to_bytes_versioned
from solders.pubkey import Pubkey
from solders.signature import Signature
from solders.system_program import (
    CreateAccountParams,
    CreateAccountWithSeedParams,
    create_account,
    create_account_with_seed,
)
from spl.token.constants import TOKEN_PROGRAM_ID
from spl.token.instructions import (
    AuthorityType,
    approve,
    close_account,
    initialize_account3,
    initialize_mint2,
    initialize_multisig2,
    set_authority,
)
from spl.token.models import (
    ApproveParams,
    CloseAccountParams,
    InitializeAccount3Params,
    InitializeMint2Params,
    InitializeMultisig2Params,
    SetAuthorityParams,
)

from jupyter_io.coordinator.models import SettlementState
from jupyter_io.coordinator.server import CoordinatorServer
from jupyter_io.coordinator.settlement import SettlementWorker
from jupyter_io.coordinator_client import (
    ESCROW_NOT_INTACT,
    CoordinatorClient,
    CoordinatorPaymentError,
)
from jupyter_io.errors import LeaseError
from jupyter_io.payments.amounts import LAMPORTS_PER_SOL
from jupyter_io.payments.escrow import (
    EscrowClient,
    EscrowTerms,
    escrow_seed,
    multisig_seed,
    settlement_message,
)
from jupyter_io.payments.token_accounts import ACCOUNT_LEN, MINT_LEN, MULTISIG_LEN, NATIVE_MINT

from ..escrow_books import Books
from .conftest import WAIT, FakeProvider, Starter, gpu_offer

pytestmark = pytest.mark.timeout(90)

PRICE = 3_600_000  # lamports per hour: 1,000 a second
DEPOSIT = PRICE // 60  # one minute


@dataclass
class Market:
    """An escrow coordinator, a linked provider (with SOL for fees) and a funded user."""

    server: CoordinatorServer
    provider: FakeProvider
    user: Keypair
    api: CoordinatorClient
    escrow: EscrowClient

    @property
    def arbiter(self) -> Pubkey:
        assert self.server.keypair is not None
        return self.server.keypair.pubkey()

    @property
    def books(self) -> Books:
        return Books(lambda: self.escrow.client)

    async def lease(self) -> EscrowTerms:
        grant = await self.api._call("POST", "/api/v1/leases", {"gpu": "RTX 4090"}, sign=True)
        return EscrowTerms(
            self.user.pubkey(), self.provider.keypair.pubkey(), self.arbiter, grant["lease"]
        )

    async def fund(self, terms: EscrowTerms) -> tuple[int | None, str | None, str]:
        """``POST /leases/{id}/escrow``: (status, error code, message)."""
        try:
            await self.api.fund_lease(terms.session_id, None)
        except CoordinatorPaymentError as exc:
            return exc.status, exc.code, str(exc)
        return 200, None, ""

    async def send(self, instructions: list[Instruction], signers: list[Keypair]) -> str:
        blockhash = (await self.escrow.client.get_latest_blockhash()).value.blockhash
        message = MessageV0.try_compile(signers[0].pubkey(), instructions, [], blockhash)
        return str(await self.escrow.submit(message, signers, what="a test transaction"))

    async def rent(self, size: int) -> int:
        return (await self.escrow.client.get_minimum_balance_for_rent_exemption(size)).value


@pytest.fixture
async def market(
    start_coordinator: Starter, providers: list[FakeProvider]
) -> AsyncIterator[Market]:
    server = await start_coordinator(
        payments="escrow", settle_retry_interval=0.2, escrow_check_interval=0.2
    )
    provider = FakeProvider(server.url, [gpu_offer(price=PRICE)])
    providers.append(provider)
    await provider.connect()
    user = Keypair()
    escrow = EscrowClient.connect(server.solana_url)
    await escrow.airdrop(user.pubkey(), 2 * LAMPORTS_PER_SOL)
    await escrow.airdrop(provider.keypair.pubkey(), LAMPORTS_PER_SOL // 10)  # its fees
    made = Market(server, provider, user, CoordinatorClient(server.url, user, timeout=WAIT), escrow)
    try:
        yield made
    finally:
        made.api.close()
        await escrow.close()


# -- malformed escrows, each built with real transactions -----------------------------------


async def _open_custom(
    market: Market,
    terms: EscrowTerms,
    *,
    signers: list[Pubkey],
    m: int,
    mint: Pubkey = NATIVE_MINT,
) -> str:
    """The user's own setup transaction: the multisig at the derived address with ``m`` of
    ``signers``, and the escrow at its derived address (funded with the deposit when its mint
    is wrapped SOL)."""
    user = market.user
    escrow_rent = await market.rent(ACCOUNT_LEN)
    return await market.send(
        [
            create_account_with_seed(
                CreateAccountWithSeedParams(
                    from_pubkey=user.pubkey(), to_pubkey=terms.multisig, base=user.pubkey(),
                    seed=multisig_seed(terms.provider, terms.arbiter),
                    lamports=await market.rent(MULTISIG_LEN), space=MULTISIG_LEN,
                    owner=TOKEN_PROGRAM_ID,
                )
            ),
            initialize_multisig2(
                InitializeMultisig2Params(
                    program_id=TOKEN_PROGRAM_ID, multisig=terms.multisig, m=m, signers=signers
                )
            ),
            create_account_with_seed(
                CreateAccountWithSeedParams(
                    from_pubkey=user.pubkey(), to_pubkey=terms.escrow, base=user.pubkey(),
                    seed=escrow_seed(terms.provider, terms.arbiter, terms.session_id),
                    lamports=escrow_rent + (DEPOSIT if mint == NATIVE_MINT else 0),
                    space=ACCOUNT_LEN, owner=TOKEN_PROGRAM_ID,
                )
            ),
            initialize_account3(
                InitializeAccount3Params(
                    program_id=TOKEN_PROGRAM_ID, account=terms.escrow, mint=mint,
                    owner=terms.multisig,
                )
            ),
        ],
        [user],
    )  # fmt: skip


async def _duplicate_signer(market: Market, terms: EscrowTerms) -> None:
    await _open_custom(
        market, terms, signers=[terms.user, terms.provider, terms.arbiter, terms.user], m=2
    )


async def _extra_signer(market: Market, terms: EscrowTerms) -> None:
    extra = Keypair().pubkey()
    await _open_custom(
        market, terms, signers=[terms.user, terms.provider, terms.arbiter, extra], m=2
    )


async def _threshold_one(market: Market, terms: EscrowTerms) -> None:
    await _open_custom(market, terms, signers=list(terms.signers), m=1)


async def _four_signers(market: Market, terms: EscrowTerms) -> None:
    # 3 of 4 where the user holds the fourth key: user + stranger are 2 of 3 "others".
    stranger = Keypair().pubkey()
    await _open_custom(
        market, terms, signers=[terms.user, terms.provider, terms.arbiter, stranger], m=3
    )


async def _wrong_mint(market: Market, terms: EscrowTerms) -> None:
    user, mint = market.user, Keypair()
    await market.send(
        [
            create_account(
                CreateAccountParams(
                    from_pubkey=user.pubkey(), to_pubkey=mint.pubkey(),
                    lamports=await market.rent(MINT_LEN), space=MINT_LEN, owner=TOKEN_PROGRAM_ID,
                )
            ),
            initialize_mint2(
                InitializeMint2Params(
                    decimals=9, program_id=TOKEN_PROGRAM_ID, mint=mint.pubkey(),
                    mint_authority=user.pubkey(), freeze_authority=None,
                )
            ),
        ],
        [user, mint],
    )  # fmt: skip
    await _open_custom(market, terms, signers=list(terms.signers), m=2, mint=mint.pubkey())


async def _foreign_arbiter(market: Market, terms: EscrowTerms) -> None:
    someone = Keypair().pubkey()
    await _open_custom(market, terms, signers=[terms.user, terms.provider, someone], m=2)


async def _honest_then(market: Market, terms: EscrowTerms, change: Instruction) -> None:
    """An honest escrow, then ``change`` made by its owner, the multisig: SPL lets only two
    of its members do that (here the user and the provider co-sign, as any two could)."""
    await market.escrow.open_escrow(
        market.user, terms.provider, terms.arbiter, terms.session_id, DEPOSIT
    )
    await market.send([change], [market.user, market.provider.keypair])


async def _delegate(market: Market, terms: EscrowTerms) -> None:
    await _honest_then(
        market,
        terms,
        approve(
            ApproveParams(
                program_id=TOKEN_PROGRAM_ID, source=terms.escrow, delegate=terms.user,
                owner=terms.multisig, amount=DEPOSIT, signers=[terms.user, terms.provider],
            )
        ),
    )  # fmt: skip


async def _foreign_close_authority(market: Market, terms: EscrowTerms) -> None:
    await _honest_then(
        market,
        terms,
        set_authority(
            SetAuthorityParams(
                program_id=TOKEN_PROGRAM_ID, account=terms.escrow,
                authority=AuthorityType.CLOSE_ACCOUNT, current_authority=terms.multisig,
                signers=[terms.user, terms.provider], new_authority=terms.user,
            )
        ),
    )  # fmt: skip


Build = Callable[[Market, EscrowTerms], Awaitable[None]]
MALFORMED: list[tuple[str, Build, str]] = [
    ("duplicate signer", _duplicate_signer, "duplicate signer"),
    ("extra signer", _extra_signer, "extra signer"),
    ("m = 1", _threshold_one, "threshold m = 1"),
    ("n = 4", _four_signers, "n = 4 signers"),
    ("wrong mint", _wrong_mint, "wrong mint"),
    ("delegate", _delegate, "delegate"),
    ("foreign close authority", _foreign_close_authority, "close authority"),
    ("someone else's arbiter", _foreign_arbiter, "the arbiter"),
]


@pytest.mark.parametrize(
    ("build", "field"), [(b, f) for _, b, f in MALFORMED], ids=[n for n, _, _ in MALFORMED]
)
async def test_a_malformed_escrow_is_refused_at_lease_time_naming_the_field(
    market: Market, build: Build, field: str
) -> None:
    terms = await market.lease()
    await build(market, terms)
    status, code, message = await market.fund(terms)
    assert status == 402 and code == "escrow_missing", message
    assert field in message, message
    info = await market.api.get_lease(terms.session_id)
    assert info.state == "requested" and info.escrow is not None
    assert info.billing is not None and info.billing.escrow is None  # nothing recorded


def _close_alone(terms: EscrowTerms) -> Instruction:
    """The escrow closed to the user, the multisig's authority signed by the user alone."""
    return close_account(
        CloseAccountParams(
            program_id=TOKEN_PROGRAM_ID,
            account=terms.escrow,
            dest=terms.user,
            owner=terms.multisig,
            signers=[terms.user],
        )
    )


async def test_the_duplicate_signer_attack_is_refused_and_nothing_is_recorded_as_paid(
    market: Market,
) -> None:
    # The attack that worked: [user, provider, arbiter, user] with m = 2, then the user
    # closes the escrow with its signature alone.
    terms = await market.lease()
    before = await market.books.snapshot(terms)
    setup = await _open_custom(
        market, terms, signers=[terms.user, terms.provider, terms.arbiter, terms.user], m=2
    )
    status, _, message = await market.fund(terms)
    assert status == 402 and "duplicate signer" in message, message
    assert str(terms.user) in message
    # No token by renewal either: the provider is never told to serve it.
    with pytest.raises(CoordinatorPaymentError) as refused:
        await market.api.renew_token(terms.session_id)
    assert refused.value.status == 402

    # SPL Token really lets the user alone move it (two slots): the coordinator was right.
    close = await market.send([_close_alone(terms)], [market.user])
    await market.api._call("DELETE", f"/api/v1/leases/{terms.session_id}", sign=True)
    after = await market.books.snapshot(terms)
    await market.books.assert_conserved(
        terms, before, after, paid_to_provider=0, signatures=[setup, close]
    )
    assert after.escrow == 0 and after.provider_wsol == 0
    store = market.server.store
    assert store is not None
    await store.enqueue_settlements()
    assert await store.get_settlement(terms.session_id) is None  # never funded: nothing owed
    record = await market.api._call("GET", f"/api/v1/leases/{terms.session_id}", sign=True)
    assert record["billing"]["settlement"] is None and record["billing"]["deposit_lamports"] == 0


# -- an intact escrow that changes while its lease runs -------------------------------------


def _with_delegate(account: Account, delegate: Pubkey, amount: int) -> Account:
    data = bytearray(bytes(account.data))
    data[72:76] = (1).to_bytes(4, "little")  # COption::Some
    data[76:108] = bytes(delegate)
    data[121:129] = amount.to_bytes(8, "little")  # delegated_amount
    return Account(account.lamports, bytes(data), account.owner, account.executable)


def _user_listed_twice(account: Account, terms: EscrowTerms) -> Account:
    data = bytearray(bytes(account.data))
    data[3 + 32 : 3 + 64] = bytes(terms.user)  # the provider's slot now holds the user
    return Account(account.lamports, bytes(data), account.owner, account.executable)


@pytest.mark.parametrize("tamper", ["delegate", "closed by the user alone"])
async def test_an_escrow_that_changes_mid_lease_ends_it_and_the_provider_gets_what_is_left(
    market: Market, tamper: str
) -> None:
    server, provider = market.server, market.provider
    store, ledger = server.store, server.ledger
    assert store is not None and ledger is not None
    terms = await market.lease()
    lease = terms.session_id
    before = await market.books.snapshot(terms)
    receipt = await market.escrow.open_escrow(
        market.user, terms.provider, terms.arbiter, lease, DEPOSIT
    )
    status, _, refusal = await market.fund(terms)
    assert status == 200, refusal
    await provider.session(lease, "active")
    await provider.heartbeat()  # handled in order: the lease is active
    await asyncio.sleep(1.2)  # a second of service to be paid for
    await provider.usage(lease, 1, 1)

    # The escrow changes under the coordinator (set_account stands in for any way it could).
    signatures: list[Signature | str | None] = [receipt.signature]
    svm = ledger._runtime()
    if tamper == "delegate":
        escrow = svm.get_account(terms.escrow)
        assert escrow is not None
        svm.set_account(terms.escrow, _with_delegate(escrow, terms.user, DEPOSIT))
    else:
        multisig = svm.get_account(terms.multisig)
        assert multisig is not None
        svm.set_account(terms.multisig, _user_listed_twice(multisig, terms))
        signatures.append(await market.send([_close_alone(terms)], [market.user]))

    # The next budget check (every 0.2 s here) ends the lease, and the user sees why.
    end = await provider.next_message("end")
    assert end == {"type": "end", "lease": lease, "reason": ESCROW_NOT_INTACT}
    info = await market.api.get_lease(lease)
    assert info.state == "ended" and info.why_ended == ESCROW_NOT_INTACT

    if tamper == "delegate":
        # Arbiter + provider can still move it: the provider is paid what it served.
        request = await provider.next_message("sign_settlement")
        message = MessageV0.from_bytes(base64.b64decode(request["message"]))
        signature = provider.keypair.sign_message(to_bytes_versioned(message))
        await provider.send(
            {"type": "settlement_signature", "lease": lease, "signature": str(signature)}
        )
    settlements = server.settlements
    assert settlements is not None
    await asyncio.wait_for(settlements.wait_idle(), WAIT)
    row = await store.get_settlement(lease)
    assert row is not None
    after = await market.books.snapshot(terms)
    if tamper == "delegate":
        assert row.state is SettlementState.DONE and row.signature == str(signature)
        assert 1_000 <= row.amount_lamports == request["amount"] < DEPOSIT
        signatures.append(row.signature)
        paid = row.amount_lamports
    else:
        # Closed by the user alone: nothing to recover, and nothing recorded as paid.
        assert row.state is SettlementState.FAILED, row
        assert row.amount_lamports == 0 and row.signature is None
        assert "nothing was paid" in (row.error or "")
        paid = 0
    await market.books.assert_conserved(
        terms, before, after, paid_to_provider=paid, signatures=signatures
    )
    assert after.escrow == 0
    assert await market.escrow.wsol_balance(terms.provider) == paid
    record = await market.api._call("GET", f"/api/v1/leases/{lease}", sign=True)
    shown = record["billing"]["settlement"]
    assert shown["state"] == row.state.value and shown["amount_lamports"] == paid


# -- amounts are recorded from landed transactions only --------------------------------------


async def test_a_settlement_whose_outcome_was_lost_is_recorded_from_the_ledger(
    market: Market,
) -> None:
    # A coordinator noted its settlement's signature, submitted it, and crashed before it
    # recorded the outcome. The next worker finds the escrow closed and records what that
    # transaction paid, read from the ledger: not its own estimate, not nothing.
    server, provider = market.server, market.provider
    store, registry, billing, own = (
        server.store,
        server.registry,
        server.billing,
        server.settlements,
    )
    assert store is not None and registry is not None and billing is not None
    assert own is not None and server.keypair is not None
    await own.stop()
    terms = await market.lease()
    lease = terms.session_id
    before = await market.books.snapshot(terms)
    receipt = await market.escrow.open_escrow(
        market.user, terms.provider, terms.arbiter, lease, DEPOSIT
    )
    assert (await market.fund(terms))[0] == 200
    await market.api.end_lease(lease)
    assert await store.enqueue_settlements() == [lease]

    crashed = "coordinator-that-crashed"
    now = datetime.now(timezone.utc)
    assert await store.claim_settlement(lease, crashed, until=now + timedelta(seconds=60))
    blockhash = (await market.escrow.client.get_latest_blockhash()).value.blockhash
    message = settlement_message(terms, 5_000, blockhash=blockhash, fee_payer=terms.provider)
    provider_signature = provider.keypair.sign_message(to_bytes_versioned(message))
    assert await store.note_settlement_attempt(lease, crashed, str(provider_signature))
    landed = await market.escrow.submit(message, [server.keypair, provider.keypair])
    assert landed == provider_signature  # the fee payer's signature is the transaction's
    pending = await store.get_settlement(lease)
    assert pending is not None and pending.state is SettlementState.PENDING
    assert pending.to_json()["signature"] is None and pending.amount_lamports == 0
    await store.release_settlements(crashed)

    worker = SettlementWorker(store, registry, billing, final_report_grace=0.0)
    assert await worker.run_once() == 0
    row = await store.get_settlement(lease)
    assert row is not None and row.state is SettlementState.DONE, row
    assert row.signature == str(landed) and row.amount_lamports == 5_000
    assert row.fee_lamports == 10_000 and worker.stats.found_closed == 1
    after = await market.books.snapshot(terms)
    await market.books.assert_conserved(
        terms, before, after, paid_to_provider=5_000, signatures=[receipt.signature, landed]
    )


async def test_a_refund_is_recorded_only_as_the_arbiter_signed_transaction_that_closed_it(
    market: Market,
) -> None:
    # The user and the provider close the escrow between them (any two members can), then
    # the user reports that transaction as "the refund": it paid the provider nothing and the
    # arbiter never signed it, so it is not recorded as a refund that paid anything.
    server, provider = market.server, market.provider
    store, registry = server.store, server.registry
    assert store is not None and registry is not None
    terms = await market.lease()
    lease = terms.session_id
    await market.escrow.open_escrow(market.user, terms.provider, terms.arbiter, lease, DEPOSIT)
    assert (await market.fund(terms))[0] == 200
    await provider.close(1001)
    await registry.wait_for(
        lambda: (p := registry.provider(provider.pubkey)) is None or not p.linked, WAIT
    )
    await market.api.end_lease(lease)
    close = await market.send(
        [
            close_account(
                CloseAccountParams(
                    program_id=TOKEN_PROGRAM_ID,
                    account=terms.escrow,
                    dest=terms.user,
                    owner=terms.multisig,
                    signers=[terms.user, terms.provider],
                )
            )
        ],
        [market.user, provider.keypair],
    )
    with pytest.raises(LeaseError, match="not the refund of lease"):  # a 409
        await market.api.report_refund(lease, close)
    settlements = server.settlements
    assert settlements is not None
    await asyncio.wait_for(settlements.wait_idle(), WAIT)
    row = await store.get_settlement(lease)
    assert row is not None and row.state is SettlementState.FAILED, row
    assert row.amount_lamports == 0 and row.signature is None
