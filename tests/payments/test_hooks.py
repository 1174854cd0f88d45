"""Payment hooks against the embedded ledger, with real transactions and conservation checks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from solders.keypair import Keypair
from solders.message import MessageV0, to_bytes_versioned
from solders.signature import Signature
from solders.system_program import TransferParams, transfer
from traitlets.config import Config

from jupyter_io.errors import ConfigError, InsufficientFunds, PaymentError
from jupyter_io.identity import write_keypair
from jupyter_io.payments.amounts import LAMPORTS_PER_SOL, format_sol
from jupyter_io.payments.escrow import refund_message
from jupyter_io.payments.hooks import EscrowInfo, FreeHook, SessionTerms, SolanaEscrowHook

from .conftest import Books, Chain, Parties

PRICE = 36_000_000  # lamports per GPU-hour (0.036 SOL): 10,000 lamports a second


def _session(parties: Parties, session_id: str, price: int = PRICE) -> SessionTerms:
    return SessionTerms(
        session_id,
        parties.user.pubkey(),
        parties.provider.pubkey(),
        parties.arbiter.pubkey(),
        price,
    )


def _hook(chain: Chain, keypair: Keypair, tmp_path: Path, **traits: object) -> SolanaEscrowHook:
    path = write_keypair(keypair, tmp_path / f"{keypair.pubkey()}.json")
    config = Config({"SolanaEscrowHook": {"solana_url": chain.url, "keypair_path": str(path)}})
    config.SolanaEscrowHook.update(traits)
    return SolanaEscrowHook(config=config)


async def test_open_verify_settle_pays_exactly_and_refunds_the_rest(
    chain: Chain, books: Books, parties: Parties, tmp_path: Path
) -> None:
    hook = _hook(chain, parties.user, tmp_path)
    session = _session(parties, "hook-normal")
    terms = session.escrow_terms
    before = await books.snapshot(terms)
    try:
        info = await hook.open(session)
        assert info.deposit == PRICE  # price * 1 h, the default
        assert info.state is not None and info.state.amount == PRICE
        verified = await hook.verify()
        assert verified.verified and verified.address == terms.escrow

        seconds = 1_234
        settlement = await hook.settle(seconds, arbiter=parties.arbiter, provider=parties.provider)
        assert settlement.paid_to_provider == PRICE * seconds // 3600 == 12_340_000
        assert settlement.refunded_to_user == info.state.lamports - 12_340_000
        after = await books.snapshot(terms)
        assert after.escrow == 0
        await books.assert_conserved(
            terms,
            before,
            after,
            paid_to_provider=12_340_000,
            signatures=[info.signature, settlement.signature],
            reported_fees=info.fee + settlement.fee,
        )
        # A duplicated settlement is a no-op.
        again = await hook.settle(seconds, arbiter=parties.arbiter, provider=parties.provider)
        assert again.already_settled and again.signature is None
        assert await books.snapshot(terms) == after
    finally:
        await hook.close()


async def test_refund_pays_provider_only_what_it_delivered(
    chain: Chain, books: Books, parties: Parties, tmp_path: Path
) -> None:
    hook = _hook(chain, parties.user, tmp_path, max_session_hours=0.5)
    session = _session(parties, "hook-refund")
    terms = session.escrow_terms
    before = await books.snapshot(terms)
    try:
        info = await hook.open(session)
        assert info.deposit == PRICE // 2
        await hook.verify()
        refund = await hook.refund(60, arbiter=parties.arbiter)
        assert refund.paid_to_provider == 600_000
        after = await books.snapshot(terms)
        assert after.escrow == 0
        await books.assert_conserved(
            terms,
            before,
            after,
            paid_to_provider=600_000,
            signatures=[info.signature, refund.signature],
            reported_fees=info.fee + refund.fee,
        )
    finally:
        await hook.close()


async def test_open_is_idempotent_for_a_restarted_kernel(
    chain: Chain, parties: Parties, tmp_path: Path
) -> None:
    hook = _hook(chain, parties.user, tmp_path)
    session = _session(parties, "hook-restart")
    try:
        first = await hook.open(session)
        second = await hook.open(session)
        assert second.address == first.address and second.signature is None
        await hook.settle(0, arbiter=parties.arbiter, provider=parties.provider)
    finally:
        await hook.close()


async def test_insufficient_funds_names_needed_and_held(
    chain: Chain, parties: Parties, tmp_path: Path
) -> None:
    poor = Keypair()
    held = LAMPORTS_PER_SOL // 100
    await chain.escrow.airdrop(poor.pubkey(), held)
    hook = _hook(chain, poor, tmp_path)
    session = SessionTerms(
        "hook-poor", poor.pubkey(), parties.provider.pubkey(), parties.arbiter.pubkey(), PRICE
    )
    try:
        with pytest.raises(InsufficientFunds) as caught:
            await hook.open(session)
    finally:
        await hook.close()
    message = str(caught.value)
    assert re.search(r"escrow needs [0-9.]+ SOL", message)
    assert f"wallet {poor.pubkey()} holds {format_sol(held)}" in message
    assert await chain.balance(poor.pubkey()) == held
    assert await chain.escrow.escrow_state(session.escrow_terms) is None


async def test_wrong_wallet_is_refused_before_any_transaction(
    chain: Chain, parties: Parties, tmp_path: Path
) -> None:
    hook = _hook(chain, Keypair(), tmp_path)
    try:
        with pytest.raises(ConfigError, match="keypair_path"):
            await hook.open(_session(parties, "hook-wrong-wallet"))
    finally:
        await hook.close()


async def test_free_hook_refuses_without_allow_free(parties: Parties) -> None:
    session = _session(parties, "free", price=0)
    with pytest.raises(ConfigError, match="allow_free"):
        await FreeHook().open(session)


async def test_free_hook_with_allow_free_moves_nothing(parties: Parties) -> None:
    hook = FreeHook(config=Config({"FreeHook": {"allow_free": True}}))
    info = await hook.open(_session(parties, "free", price=0))
    assert info.state is None and info.deposit == 0
    assert (await hook.verify()) is info
    settlement = await hook.settle(3_600, arbiter=parties.arbiter, provider=parties.provider)
    assert settlement.paid_to_provider == 0 and settlement.signature is None
    with pytest.raises(ConfigError, match="SolanaEscrowHook"):
        await hook.open(_session(parties, "priced"))


async def test_the_ledger_is_the_coordinators_unless_configured(
    chain: Chain, parties: Parties, tmp_path: Path
) -> None:
    path = write_keypair(parties.user, tmp_path / "user.json")
    hook = SolanaEscrowHook(config=Config({"SolanaEscrowHook": {"keypair_path": str(path)}}))
    with pytest.raises(ConfigError, match="solana_url"):
        _ = hook.ledger_url  # nothing configured, no session naming a ledger: say so
    session = SessionTerms(
        "hook-named-ledger",
        parties.user.pubkey(),
        parties.provider.pubkey(),
        parties.arbiter.pubkey(),
        PRICE,
        solana_url=chain.url,
    )
    try:
        info = await hook.open(session)
        assert hook.ledger_url == chain.url
        assert (await chain.escrow.verify_escrow(session.escrow_terms, PRICE)) == info.state
    finally:
        await hook.close()
    configured = _hook(chain, parties.user, tmp_path)
    elsewhere = SessionTerms(
        "x", parties.user.pubkey(), parties.provider.pubkey(), parties.arbiter.pubkey(), PRICE,
        solana_url="http://127.0.0.1:9/solana",
    )  # fmt: skip
    configured.escrow = EscrowInfo(elsewhere, PRICE, None)
    assert configured.ledger_url == chain.url, "c.SolanaEscrowHook.solana_url wins"


async def test_top_up_through_the_hook_raises_the_deposit(
    chain: Chain, books: Books, parties: Parties, tmp_path: Path
) -> None:
    hook = _hook(chain, parties.user, tmp_path)
    session = _session(parties, "hook-top-up")
    terms = session.escrow_terms
    before = await books.snapshot(terms)
    try:
        info = await hook.open(session)
        receipt = await hook.top_up(PRICE // 2)
        assert hook.escrow is not None and hook.escrow.deposit == PRICE + PRICE // 2
        state = await chain.escrow.verify_escrow(terms, PRICE + PRICE // 2)
        assert hook.escrow.state == state
        after = await books.snapshot(terms)
        await books.assert_conserved(
            terms,
            before,
            after,
            paid_to_provider=0,
            signatures=[info.signature, receipt.signature],
            reported_fees=info.fee + receipt.fee,
        )
    finally:
        await hook.close()


async def _arbiter_signed_refund(
    chain: Chain, parties: Parties, session: SessionTerms, share: int
) -> tuple[MessageV0, Signature]:
    blockhash = (await chain.client.get_latest_blockhash()).value.blockhash
    message = refund_message(
        session.escrow_terms,
        share,
        blockhash=blockhash,
        provider_has_wsol_account=False,
    )
    return message, parties.arbiter.sign_message(to_bytes_versioned(message))


async def test_complete_refund_cosigns_the_arbiters_refund_exactly_once(
    chain: Chain, books: Books, parties: Parties, tmp_path: Path
) -> None:
    hook = _hook(chain, parties.user, tmp_path)
    session = _session(parties, "hook-cosigned-refund")
    terms = session.escrow_terms
    before = await books.snapshot(terms)
    share = session.amount_for(90)
    try:
        info = await hook.open(session)
        message, arbiter_signature = await _arbiter_signed_refund(chain, parties, session, share)
        signature = await hook.complete_refund(
            message, arbiter_signature, share, max_provider_share=share
        )
        assert signature is not None
        after = await books.snapshot(terms)
        assert after.escrow == 0
        fees = await books.fees([signature])
        assert fees == {terms.user: 10_000}, "the user pays the refund's two signatures"
        await books.assert_conserved(
            terms,
            before,
            after,
            paid_to_provider=share,
            signatures=[info.signature, signature],
        )
        # The same offer again (a retried cleanup): the escrow is closed, nothing moves.
        again = await hook.complete_refund(message, arbiter_signature, share)
        assert again is None
        assert await books.snapshot(terms) == after
    finally:
        await hook.close()


async def test_complete_refund_signs_nothing_but_this_escrows_refund(
    chain: Chain, books: Books, parties: Parties, tmp_path: Path
) -> None:
    hook = _hook(chain, parties.user, tmp_path)
    session = _session(parties, "hook-forged-refund")
    terms = session.escrow_terms
    share = session.amount_for(60)
    try:
        await hook.open(session)
        before = await books.snapshot(terms)
        # A share larger than the message pays, or larger than the user saw delivered.
        message, arbiter_signature = await _arbiter_signed_refund(chain, parties, session, share)
        with pytest.raises(PaymentError, match="not signed"):
            await hook.complete_refund(message, arbiter_signature, share + 1)
        with pytest.raises(PaymentError, match="more than"):
            await hook.complete_refund(
                message, arbiter_signature, share, max_provider_share=share - 1
            )
        # A transaction that takes from the user's wallet, dressed up as a refund.
        blockhash = message.recent_blockhash
        theft = MessageV0.try_compile(
            terms.user,
            [
                transfer(
                    TransferParams(
                        from_pubkey=terms.user, to_pubkey=terms.arbiter, lamports=LAMPORTS_PER_SOL
                    )
                )
            ],
            [],
            blockhash,
        )
        signed = parties.arbiter.sign_message(to_bytes_versioned(theft))
        with pytest.raises(PaymentError, match="not signed"):
            await hook.complete_refund(theft, signed, 0)
        assert await books.snapshot(terms) == before
    finally:
        await hook.close()


async def test_escrow_info_survives_json(chain: Chain, parties: Parties, tmp_path: Path) -> None:
    hook = _hook(chain, parties.user, tmp_path)
    try:
        info = await hook.open(_session(parties, "hook-json"))
    finally:
        await hook.close()
    assert EscrowInfo.from_json(info.to_json()) == info
    other = _hook(chain, parties.user, tmp_path)
    other.restore(EscrowInfo.from_json(info.to_json()))
    try:
        verified = await other.verify()
        assert verified.address == info.address and verified.verified
    finally:
        await other.close()
