"""Top-ups of an open escrow with real transactions on the embedded ledger, conservation checked."""

from __future__ import annotations

import re

import pytest
from solders.keypair import Keypair

from jupyter_io.errors import InsufficientFunds
from jupyter_io.payments.amounts import LAMPORTS_PER_SOL
from jupyter_io.payments.escrow import EscrowError, TransactionFailed, top_up_message

from .conftest import Books, Chain, Parties

DEPOSIT = 50_000_000  # 0.05 SOL
TOP_UP = 30_000_000  # 0.03 SOL


async def test_top_up_raises_the_escrow_and_settlement_pays_from_it(
    chain: Chain, books: Books, parties: Parties
) -> None:
    terms = parties.terms("lease-top-up")
    before = await books.snapshot(terms)
    opened = await chain.escrow.open_escrow(
        parties.user, terms.provider, terms.arbiter, terms.session_id, DEPOSIT
    )

    receipt = await chain.escrow.top_up(terms, TOP_UP, parties.user)
    assert receipt.amount == TOP_UP and receipt.fee == 5_000
    assert receipt.state.amount == DEPOSIT + TOP_UP
    # What the chain says, not what the client computed: SyncNative counted the lamports.
    state = await chain.escrow.verify_escrow(terms, DEPOSIT + TOP_UP)
    assert state == receipt.state
    fees = await books.fees([receipt.signature])
    assert fees == {terms.user: 5_000}, "the user alone signs and pays for a top-up"

    # More than the first deposit can now be paid out: the top-up is real wSOL.
    metered = DEPOSIT + TOP_UP // 2
    settlement = await chain.escrow.settle(
        terms, metered, arbiter=parties.arbiter, provider=parties.provider
    )
    assert settlement.refunded_to_user == state.lamports - metered
    after = await books.snapshot(terms)
    assert after.escrow == 0
    assert await chain.escrow.wsol_balance(terms.provider) == metered
    await books.assert_conserved(
        terms,
        before,
        after,
        paid_to_provider=metered,
        signatures=[opened.signature, receipt.signature, settlement.signature],
    )
    assert before.user - after.user == (metered + opened.multisig_rent + opened.fee + receipt.fee)


async def test_top_up_of_a_settled_escrow_sends_nothing(
    chain: Chain, books: Books, parties: Parties
) -> None:
    terms = parties.terms("lease-settled-top-up")
    opened = await chain.escrow.open_escrow(
        parties.user, terms.provider, terms.arbiter, terms.session_id, DEPOSIT
    )
    await chain.escrow.settle(terms, 0, arbiter=parties.arbiter, provider=parties.provider)
    before = await books.snapshot(terms)
    with pytest.raises(EscrowError, match="is not open"):
        await chain.escrow.top_up(terms, TOP_UP, parties.user)
    assert await books.snapshot(terms) == before
    assert opened.signature is not None


async def test_a_top_up_the_chain_sees_after_settlement_fails_whole(
    chain: Chain, books: Books, parties: Parties
) -> None:
    """A top-up built while the escrow was open but landing after it closed must not leave
    lamports on the closed escrow's address: SyncNative fails, and the transfer with it."""
    terms = parties.terms("lease-raced-top-up")
    await chain.escrow.open_escrow(
        parties.user, terms.provider, terms.arbiter, terms.session_id, DEPOSIT
    )
    blockhash = (await chain.client.get_latest_blockhash()).value.blockhash
    message = top_up_message(terms, TOP_UP, blockhash=blockhash)
    await chain.escrow.settle(terms, 0, arbiter=parties.arbiter, provider=parties.provider)
    before = await books.snapshot(terms)
    with pytest.raises(TransactionFailed):
        await chain.escrow.submit(message, [parties.user], what="a late top-up")
    after = await books.snapshot(terms)
    assert after.escrow == 0
    assert after == before, "a refused top-up moves nothing (preflight refuses it: no fee)"


async def test_top_up_beyond_the_wallet_says_what_it_needs_and_holds(
    chain: Chain, books: Books, parties: Parties
) -> None:
    terms = parties.terms("lease-poor-top-up")
    await chain.escrow.open_escrow(
        parties.user, terms.provider, terms.arbiter, terms.session_id, DEPOSIT
    )
    before = await books.snapshot(terms)
    with pytest.raises(InsufficientFunds) as caught:
        await chain.escrow.top_up(terms, 10 * LAMPORTS_PER_SOL, parties.user)
    message = str(caught.value)
    assert re.search(r"needs 10\.000005 SOL with the fee", message), message
    assert f"wallet {terms.user} holds" in message and "airdrop" in message
    assert await books.snapshot(terms) == before


async def test_only_the_escrows_user_can_top_it_up(chain: Chain, parties: Parties) -> None:
    terms = parties.terms("lease-wrong-signer")
    with pytest.raises(EscrowError, match="user is"):
        await chain.escrow.top_up(terms, TOP_UP, Keypair())
    with pytest.raises(EscrowError, match="positive"):
        await chain.escrow.top_up(terms, 0, parties.user)
