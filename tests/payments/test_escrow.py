"""Escrow scenarios with real transactions on the embedded ledger, through its JSON-RPC endpoint.

Every scenario ends with the conservation check of :class:`Books`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from pathlib import Path

import pytest
from solana.rpc.async_api import AsyncClient
from solana.rpc.core import RPCException
from solana.rpc.models import TxOpts
from solders.account import Account
from solders.hash import Hash
from solders.keypair import Keypair
from solders.message import MessageV0
from solders.null_signer import NullSigner
from solders.pubkey import Pubkey
from solders.signature import Signature
from solders.transaction import VersionedTransaction
from spl.token.constants import TOKEN_PROGRAM_ID
from spl.token.instructions import (
    close_account,
    create_idempotent_associated_token_account,
    get_associated_token_address,
    transfer_checked,
)
from spl.token.models import (
    CloseAccountParams,
    TransferCheckedParams,
)

from jupyter_io.errors import InsufficientFunds, PaymentError
from jupyter_io.payments.amounts import LAMPORTS_PER_SOL
from jupyter_io.payments.escrow import (
    EscrowClient,
    EscrowError,
    EscrowTerms,
    TransactionFailed,
    escrow_seed,
    multisig_seed,
    settlement_message,
    setup_message,
)
from jupyter_io.payments.instructions import compile_message, create_multisig, create_wsol_account
from jupyter_io.payments.token_accounts import ACCOUNT_LEN, MULTISIG_LEN, NATIVE_MINT

from .conftest import Books, Chain, Parties

DEPOSIT = 50_000_000  # 0.05 SOL
METERED = 12_345_678


async def test_normal_settlement_pays_provider_and_refunds_user(
    chain: Chain, books: Books, parties: Parties
) -> None:
    terms = parties.terms("lease-normal")
    before = await books.snapshot(terms)

    receipt = await chain.escrow.open_escrow(
        parties.user, terms.provider, terms.arbiter, terms.session_id, DEPOSIT
    )
    assert receipt.multisig_created and receipt.fee == 5_000
    state = await chain.escrow.verify_escrow(terms, DEPOSIT)
    assert state.amount == DEPOSIT
    during = await books.snapshot(terms)
    assert during.escrow == DEPOSIT + receipt.escrow_rent
    await books.assert_conserved(
        terms, before, during, paid_to_provider=0, signatures=[receipt.signature]
    )

    settlement = await chain.escrow.settle(
        terms, METERED, arbiter=parties.arbiter, provider=parties.provider, verified=state
    )
    assert settlement.payout == "wsol" and not settlement.already_settled
    assert settlement.paid_to_provider == METERED
    assert settlement.refunded_to_user == DEPOSIT - METERED + receipt.escrow_rent
    assert settlement.fee == 10_000 and settlement.fee_payer == terms.provider
    after = await books.snapshot(terms)
    assert after.escrow == 0
    assert await chain.escrow.wsol_balance(terms.provider) == METERED
    await books.assert_conserved(
        terms,
        before,
        after,
        paid_to_provider=METERED,
        signatures=[receipt.signature, settlement.signature],
        reported_fees=receipt.fee + settlement.fee,
    )
    # Exactly: the user lost what was metered, the multisig's rent and its setup fee.
    assert before.user - after.user == METERED + receipt.multisig_rent + receipt.fee
    assert await chain.escrow.escrow_state(terms) is None

    # The provider unwraps: its wSOL (and the account's rent) come back as SOL.
    wallet_before = await chain.balance(terms.provider)
    signature, returned = await chain.escrow.unwrap(parties.provider)
    assert returned == after.provider_wsol  # earnings plus the account's rent
    assert await chain.balance(terms.provider) == wallet_before + after.provider_wsol - 5_000
    final = await books.snapshot(terms)
    assert final.provider_wsol == 0
    await books.assert_conserved(
        terms,
        before,
        final,
        paid_to_provider=METERED,
        signatures=[receipt.signature, settlement.signature, signature],
    )


async def test_full_refund_when_the_provider_failed(
    chain: Chain, books: Books, parties: Parties
) -> None:
    terms = parties.terms("lease-failed")
    before = await books.snapshot(terms)
    receipt = await chain.escrow.open_escrow(
        parties.user, terms.provider, terms.arbiter, terms.session_id, DEPOSIT
    )
    refund = await chain.escrow.refund(terms, 0, user=parties.user, arbiter=parties.arbiter)
    assert refund.payout == "none" and refund.fee_payer == terms.user
    assert refund.refunded_to_user == DEPOSIT + receipt.escrow_rent
    after = await books.snapshot(terms)
    assert after.escrow == 0 and after.provider == before.provider
    await books.assert_conserved(
        terms,
        before,
        after,
        paid_to_provider=0,
        signatures=[receipt.signature, refund.signature],
        reported_fees=receipt.fee + refund.fee,
    )
    # All that is gone for good: the fees and the multisig's rent (reused next time).
    assert before.user - after.user == receipt.fee + refund.fee + receipt.multisig_rent


async def test_refund_pays_delivered_share_in_sol_when_provider_has_no_wsol_account(
    chain: Chain, books: Books, parties: Parties
) -> None:
    terms = parties.terms("lease-killed-midway")
    before = await books.snapshot(terms)
    receipt = await chain.escrow.open_escrow(
        parties.user, terms.provider, terms.arbiter, terms.session_id, DEPOSIT
    )
    refund = await chain.escrow.refund(terms, METERED, user=parties.user, arbiter=parties.arbiter)
    assert refund.payout == "sol"
    after = await books.snapshot(terms)
    assert after.provider - before.provider == METERED and after.provider_wsol == 0
    await books.assert_conserved(
        terms,
        before,
        after,
        paid_to_provider=METERED,
        signatures=[receipt.signature, refund.signature],
    )


async def test_refund_pays_delivered_share_in_wsol_when_provider_has_an_account(
    chain: Chain, books: Books, parties: Parties
) -> None:
    first = parties.terms("earlier")
    await chain.escrow.open_escrow(parties.user, first.provider, first.arbiter, "earlier", DEPOSIT)
    await chain.escrow.settle(first, 1_000, arbiter=parties.arbiter, provider=parties.provider)

    terms = parties.terms("lease-killed-later")
    before = await books.snapshot(terms)
    receipt = await chain.escrow.open_escrow(
        parties.user, terms.provider, terms.arbiter, terms.session_id, DEPOSIT
    )
    assert not receipt.multisig_created
    refund = await chain.escrow.refund(terms, METERED, user=parties.user, arbiter=parties.arbiter)
    assert refund.payout == "wsol"
    after = await books.snapshot(terms)
    assert after.provider_wsol - before.provider_wsol == METERED
    await books.assert_conserved(
        terms,
        before,
        after,
        paid_to_provider=METERED,
        signatures=[receipt.signature, refund.signature],
    )


async def test_settlement_after_ledger_restart_uses_persisted_state(
    chain: Chain, books: Books, parties: Parties
) -> None:
    terms = parties.terms("lease-restart")
    before = await books.snapshot(terms)
    receipt = await chain.escrow.open_escrow(
        parties.user, terms.provider, terms.arbiter, terms.session_id, DEPOSIT
    )
    prior = await books.snapshot(terms)
    await books.assert_conserved(
        terms, before, prior, paid_to_provider=0, signatures=[receipt.signature]
    )
    keys = (terms.user, terms.multisig, terms.escrow, terms.provider, terms.arbiter)
    raw_before = [await chain.ledger.get_account(k) for k in keys]

    await chain.restart()  # a new LiteSVM, a new HTTP server, fresh client caches

    assert await books.snapshot(terms) == prior
    assert [await chain.ledger.get_account(k) for k in keys] == raw_before  # byte for byte
    settlement = await chain.escrow.settle(
        terms, METERED, arbiter=parties.arbiter, provider=parties.provider
    )
    assert settlement.signature is not None
    again = await chain.escrow.settle(
        terms, METERED, arbiter=parties.arbiter, provider=parties.provider
    )
    assert again.already_settled and again.signature is None
    after = await books.snapshot(terms)
    await books.assert_conserved(
        terms,
        prior,
        after,
        paid_to_provider=METERED,
        signatures=[settlement.signature],
        reported_fees=settlement.fee,
    )

    await chain.restart()
    assert await books.snapshot(terms) == after
    assert before.user - after.user == METERED + receipt.multisig_rent + receipt.fee


async def test_insufficient_funds_is_clear_and_moves_nothing(
    chain: Chain, books: Books, parties: Parties
) -> None:
    poor = Keypair()
    await chain.escrow.airdrop(poor.pubkey(), 10_000_000)  # 0.01 SOL
    terms = EscrowTerms(poor.pubkey(), parties.provider.pubkey(), parties.arbiter.pubkey(), "x")
    before = await books.snapshot(terms)
    with pytest.raises(InsufficientFunds) as caught:
        await chain.escrow.open_escrow(poor, terms.provider, terms.arbiter, "x", DEPOSIT)
    message = str(caught.value)
    assert "escrow needs 0.05540596 SOL" in message  # deposit + both rents + fee
    assert f"wallet {poor.pubkey()} holds 0.01 SOL" in message
    assert "jupyter io wallet airdrop" in message
    assert await books.snapshot(terms) == before

    # Same through the fast path (multisig known to this client): the chain's preflight
    # refuses, the client still explains, and no fee was charged.
    await chain.escrow.airdrop(poor.pubkey(), 100_000_000)
    await chain.escrow.open_escrow(poor, terms.provider, terms.arbiter, "x", 1_000_000)
    before = await books.snapshot(terms)
    with pytest.raises(InsufficientFunds, match=r"escrow needs 1\.00204428 SOL"):
        await chain.escrow.open_escrow(poor, terms.provider, terms.arbiter, "y", LAMPORTS_PER_SOL)
    assert await books.snapshot(terms) == before

    # A wallet that never held anything.
    empty = Keypair()
    with pytest.raises(InsufficientFunds, match="holds 0 SOL"):
        await chain.escrow.open_escrow(empty, terms.provider, terms.arbiter, "z", DEPOSIT)


def _steal(
    terms: EscrowTerms, thief: Keypair, blockhash: Hash, cosigners: list[Pubkey] | None = None
) -> MessageV0:
    """One party alone: pay itself from the escrow, then close the escrow to itself."""
    me = thief.pubkey()
    signers = [me, *(cosigners or [])]
    mine = get_associated_token_address(me, NATIVE_MINT)
    return MessageV0.try_compile(
        me,
        [
            create_idempotent_associated_token_account(me, me, NATIVE_MINT),
            transfer_checked(
                TransferCheckedParams(
                    program_id=TOKEN_PROGRAM_ID,
                    source=terms.escrow,
                    mint=NATIVE_MINT,
                    dest=mine,
                    owner=terms.multisig,
                    amount=DEPOSIT,
                    decimals=9,
                    signers=signers,
                )
            ),
            close_account(
                CloseAccountParams(
                    program_id=TOKEN_PROGRAM_ID,
                    account=terms.escrow,
                    dest=me,
                    owner=terms.multisig,
                    signers=signers,
                )
            ),
        ],
        [],
        blockhash,
    )


@pytest.mark.parametrize("role", ["user", "provider", "arbiter"])
async def test_one_party_alone_cannot_move_escrowed_funds(
    chain: Chain, books: Books, parties: Parties, role: str
) -> None:
    terms = parties.terms(f"lease-theft-{role}")
    receipt = await chain.escrow.open_escrow(
        parties.user, terms.provider, terms.arbiter, terms.session_id, DEPOSIT
    )
    thief: Keypair = getattr(parties, role)
    before = await books.snapshot(terms)

    # Preflight refuses, and nothing (not even a fee) is charged.
    blockhash = (await chain.client.get_latest_blockhash()).value.blockhash
    with pytest.raises(TransactionFailed, match=r"missing required signature|Custom"):
        await chain.escrow.submit(_steal(terms, thief, blockhash), [thief])
    assert await books.snapshot(terms) == before

    # Skipping preflight, the transaction lands and the runtime itself refuses: the escrow is
    # intact, only the thief's fee is gone, and the client sees the error (confirmation
    # alone would not raise).
    tx = VersionedTransaction(_steal(terms, thief, blockhash), [thief])
    sent = await chain.client.send_raw_transaction(bytes(tx), TxOpts(skip_preflight=True))
    status = (await chain.client.get_signature_statuses([sent.value])).value[0]
    assert status is not None and status.err is not None
    with pytest.raises(TransactionFailed, match="failed"):
        await chain.escrow._confirm(sent.value, "stealing")
    after = await books.snapshot(terms)
    assert after.escrow == before.escrow
    await books.assert_conserved(terms, before, after, paid_to_provider=0, signatures=[sent.value])
    assert (await chain.escrow.verify_escrow(terms, DEPOSIT)).amount == DEPOSIT

    # Naming a second member without its signature does not help: the node refuses the
    # transaction's signatures outright.
    other = parties.arbiter if role != "arbiter" else parties.provider
    forged = _steal(terms, thief, blockhash, [other.pubkey()])
    tx = VersionedTransaction(forged, [thief, NullSigner(other.pubkey())])
    with pytest.raises(RPCException, match="SignatureVerificationFailure"):
        await chain.client.send_raw_transaction(bytes(tx))
    assert (await books.snapshot(terms)).escrow == before.escrow
    assert receipt.state.amount == DEPOSIT


async def test_duplicated_settlement_is_a_no_op(
    chain: Chain, books: Books, parties: Parties
) -> None:
    terms = parties.terms("lease-dup")
    before = await books.snapshot(terms)
    receipt = await chain.escrow.open_escrow(
        parties.user, terms.provider, terms.arbiter, terms.session_id, DEPOSIT
    )
    verified = await chain.escrow.verify_escrow(terms, DEPOSIT)
    first, second = await asyncio.gather(
        chain.escrow.settle(terms, METERED, arbiter=parties.arbiter, provider=parties.provider),
        chain.escrow.settle(
            terms, METERED, arbiter=parties.arbiter, provider=parties.provider, verified=verified
        ),
    )
    third = await chain.escrow.settle(
        terms, METERED, arbiter=parties.arbiter, provider=parties.provider, verified=verified
    )
    refund = await chain.escrow.refund(terms, 0, user=parties.user, arbiter=parties.arbiter)
    results = [first, second, third, refund]
    assert sum(1 for r in results if not r.already_settled) == 1
    paid = next(r for r in results if not r.already_settled)
    after = await books.snapshot(terms)
    await books.assert_conserved(
        terms,
        before,
        after,
        paid_to_provider=METERED,
        signatures=[receipt.signature, paid.signature],
        reported_fees=sum(r.fee for r in results) + receipt.fee,
    )
    # A second client (a restarted coordinator) sees the same thing.
    fresh = EscrowClient(AsyncClient(chain.url))
    try:
        again = await fresh.settle(
            terms, METERED, arbiter=parties.arbiter, provider=parties.provider
        )
    finally:
        await fresh.client.close()
    assert again.already_settled


async def test_retried_setup_returns_the_existing_escrow(
    chain: Chain, books: Books, parties: Parties
) -> None:
    terms = parties.terms("lease-retry")
    first = await chain.escrow.open_escrow(
        parties.user, terms.provider, terms.arbiter, terms.session_id, DEPOSIT
    )
    before = await books.snapshot(terms)
    again = await chain.escrow.open_escrow(
        parties.user, terms.provider, terms.arbiter, terms.session_id, DEPOSIT
    )
    assert again.signature is None and again.state.address == first.state.address
    assert await books.snapshot(terms) == before
    with pytest.raises(EscrowError, match="already exists"):
        await chain.escrow.open_escrow(
            parties.user, terms.provider, terms.arbiter, terms.session_id, DEPOSIT + 1
        )


async def test_multisig_is_reused_across_sessions_of_one_triple(
    chain: Chain, books: Books, parties: Parties
) -> None:
    one, two = parties.terms("session-1"), parties.terms("session-2")
    assert one.multisig == two.multisig and one.escrow != two.escrow
    before = await books.snapshot(one)
    first = await chain.escrow.open_escrow(
        parties.user, one.provider, one.arbiter, one.session_id, DEPOSIT
    )
    # A fresh client does not know the multisig yet: it must find and reuse it.
    fresh = EscrowClient(AsyncClient(chain.url))
    try:
        second = await fresh.open_escrow(
            parties.user, two.provider, two.arbiter, two.session_id, DEPOSIT
        )
    finally:
        await fresh.client.close()
    assert first.multisig_created and first.multisig_rent > 0
    assert not second.multisig_created and second.multisig_rent == 0
    s1 = await chain.escrow.settle(one, 1_000, arbiter=parties.arbiter, provider=parties.provider)
    s2 = await chain.escrow.settle(two, 2_000, arbiter=parties.arbiter, provider=parties.provider)
    after = await books.snapshot(one)
    assert after.multisig == first.multisig_rent  # one multisig, paid for once
    await books.assert_conserved(
        one,
        before,
        after,
        paid_to_provider=3_000,
        signatures=[first.signature, second.signature, s1.signature, s2.signature],
    )
    # A different provider gets a different multisig.
    other = EscrowTerms(one.user, Keypair().pubkey(), one.arbiter, "session-1")
    assert other.multisig != one.multisig


async def test_verify_refuses_an_escrow_that_is_not_as_agreed(
    chain: Chain, parties: Parties
) -> None:
    terms = parties.terms("lease-fake")
    with pytest.raises(EscrowError, match="no escrow for session"):
        await chain.escrow.verify_escrow(terms, DEPOSIT)

    # The user builds, at the escrow's address, a wSOL account it owns itself.
    user = parties.user
    rent = (await chain.client.get_minimum_balance_for_rent_exemption(ACCOUNT_LEN)).value
    blockhash = (await chain.client.get_latest_blockhash()).value.blockhash
    fake = compile_message(
        user.pubkey(),
        create_wsol_account(
            payer=user.pubkey(),
            base=user.pubkey(),
            seed=escrow_seed(terms.provider, terms.arbiter, terms.session_id),
            address=terms.escrow,
            lamports=rent + DEPOSIT,
            owner=user.pubkey(),
        ),
        blockhash,
    )
    await chain.escrow.submit(fake, [user])
    with pytest.raises(EscrowError, match="not the multisig"):
        await chain.escrow.verify_escrow(terms, DEPOSIT)

    # Or a 1-of-3 "multisig" at the multisig's address (another triple), owning an escrow.
    sneaky = EscrowTerms(user.pubkey(), terms.provider, Keypair().pubkey(), "lease-sneaky")
    ms_rent = (await chain.client.get_minimum_balance_for_rent_exemption(MULTISIG_LEN)).value
    weak = compile_message(
        user.pubkey(),
        create_multisig(
            payer=user.pubkey(),
            base=user.pubkey(),
            seed=multisig_seed(sneaky.provider, sneaky.arbiter),
            address=sneaky.multisig,
            rent=ms_rent,
            threshold=1,
            signers=sneaky.signers,
        ),
        blockhash,
    )
    await chain.escrow.submit(weak, [user])
    with pytest.raises(EscrowError, match="1-of-3"):
        await chain.escrow.open_escrow(
            user, sneaky.provider, sneaky.arbiter, sneaky.session_id, DEPOSIT
        )
    own = setup_message(sneaky, DEPOSIT, escrow_rent=rent, multisig_rent=None, blockhash=blockhash)
    await chain.escrow.submit(own, [user])
    with pytest.raises(EscrowError, match="1-of-3"):
        await chain.escrow.verify_escrow(sneaky, DEPOSIT)

    # An honest escrow that holds less than the session needs.
    short = parties.terms("lease-short")
    fresh = EscrowClient(AsyncClient(chain.url))
    try:
        await fresh.open_escrow(user, short.provider, short.arbiter, short.session_id, 1_000)
        with pytest.raises(EscrowError, match=r"the session needs 0\.05 SOL"):
            await fresh.verify_escrow(short, DEPOSIT)
    finally:
        await fresh.client.close()


async def test_a_verified_multisig_that_changes_is_verified_again(
    chain: Chain, parties: Parties
) -> None:
    # The cache of verified multisigs is keyed on their exact bytes, not their address.
    terms = parties.terms("lease-cached")
    await chain.escrow.open_escrow(
        parties.user, terms.provider, terms.arbiter, terms.session_id, DEPOSIT
    )
    assert (await chain.escrow.verify_escrow(terms, DEPOSIT)).amount == DEPOSIT
    svm = chain.ledger._runtime()  # set_account stands in for any way an account could change
    honest = svm.get_account(terms.multisig)
    assert honest is not None
    data = bytearray(bytes(honest.data))
    data[3 + 32 : 3 + 64] = bytes(terms.user)  # the provider's slot now holds the user
    svm.set_account(
        terms.multisig, Account(honest.lamports, bytes(data), honest.owner, honest.executable)
    )
    with pytest.raises(EscrowError, match=r"duplicate signer.*the provider \S+ is not a signer"):
        await chain.escrow.verify_escrow(terms, DEPOSIT)
    svm.set_account(terms.multisig, honest)
    assert (await chain.escrow.verify_escrow(terms, DEPOSIT)).amount == DEPOSIT


async def test_the_closing_transaction_is_read_back_from_the_ledger(
    chain: Chain, parties: Parties
) -> None:
    terms = parties.terms("lease-read-back")
    receipt = await chain.escrow.open_escrow(
        parties.user, terms.provider, terms.arbiter, terms.session_id, DEPOSIT
    )
    assert receipt.signature is not None
    # The setup did not close the escrow: it is no settlement.
    assert await chain.escrow.closing_transaction(terms, receipt.signature) is None
    settled = await chain.escrow.settle(
        terms, 12_345, arbiter=parties.arbiter, provider=parties.provider
    )
    assert settled.signature is not None
    closing = await chain.escrow.closing_transaction(terms, settled.signature)
    assert closing is not None and closing.paid_to_provider == 12_345
    assert closing.fee == settled.fee and closing.signers == {terms.provider, terms.arbiter}
    # Another session's escrow was not closed by it.
    other = parties.terms("lease-other")
    assert await chain.escrow.closing_transaction(other, settled.signature) is None


async def test_settling_more_than_escrowed_is_refused(chain: Chain, parties: Parties) -> None:
    terms = parties.terms("lease-greedy")
    await chain.escrow.open_escrow(
        parties.user, terms.provider, terms.arbiter, terms.session_id, DEPOSIT
    )
    with pytest.raises(EscrowError, match=r"which holds 0\.05 SOL"):
        await chain.escrow.settle(
            terms, DEPOSIT + 1, arbiter=parties.arbiter, provider=parties.provider
        )
    # A stale or wrong "verified" state does not fool it: preflight refuses, and the
    # client re-reads the escrow to explain why.
    real = await chain.escrow.verify_escrow(terms, DEPOSIT)
    inflated = dataclasses.replace(real, amount=10 * DEPOSIT, lamports=real.lamports * 10)
    with pytest.raises(EscrowError, match=r"which holds 0\.05 SOL"):
        await chain.escrow.settle(
            terms, 2 * DEPOSIT, arbiter=parties.arbiter, provider=parties.provider,
            verified=inflated,
        )  # fmt: skip
    assert (await chain.escrow.verify_escrow(terms, DEPOSIT)).amount == DEPOSIT
    with pytest.raises(EscrowError, match="provider signer is"):
        await chain.escrow.settle(terms, 1, arbiter=parties.arbiter, provider=parties.user)


async def test_missing_signer_is_a_clean_payment_error(chain: Chain, parties: Parties) -> None:
    terms = parties.terms("lease-signers")
    blockhash = (await chain.client.get_latest_blockhash()).value.blockhash
    message = settlement_message(terms, 1, blockhash=blockhash)
    with pytest.raises(PaymentError, match=f"missing \\['{terms.arbiter}'\\]"):
        await chain.escrow.submit(message, [parties.provider])


async def test_unreachable_rpc_is_a_clear_payment_error(parties: Parties) -> None:
    async with EscrowClient.connect("http://127.0.0.1:9/") as client:
        with pytest.raises(
            PaymentError, match=re.escape("cannot reach the Solana RPC at http://127.0.0.1:9")
        ):
            await client.open_escrow(
                parties.user, parties.provider.pubkey(), parties.arbiter.pubkey(), "s", DEPOSIT
            )


async def test_expired_blockhash_is_refetched(tmp_path: Path) -> None:
    now = [1000.0]
    chain = await Chain(tmp_path / "clocked.sqlite", clock=lambda: now[0]).start()
    try:
        chain.escrow.blockhash_ttl = 3600  # cache it far beyond the ledger's 150 slots
        user, provider, arbiter = Keypair(), Keypair().pubkey(), Keypair().pubkey()
        await chain.escrow.airdrop(user.pubkey(), LAMPORTS_PER_SOL)
        await chain.escrow.open_escrow(user, provider, arbiter, "a", 1_000_000)
        now[0] += 0.4 * 151  # 151 slots later the cached blockhash has expired
        receipt = await chain.escrow.open_escrow(user, provider, arbiter, "b", 1_000_000)
        assert receipt.signature is not None
    finally:
        await chain.stop()


async def test_a_transaction_that_never_lands_expires_cleanly(chain: Chain) -> None:
    slot = (await chain.client.get_block_height()).value
    with pytest.raises(PaymentError, match="expired without landing"):
        await chain.escrow._confirm(Signature.default(), "paying", last_valid_block_height=slot - 1)
