"""Payment hooks against the embedded ledger, with real transactions and conservation checks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from solders.keypair import Keypair
from traitlets.config import Config

from jupyter_io.errors import ConfigError, InsufficientFunds
from jupyter_io.identity import write_keypair
from jupyter_io.payments.amounts import LAMPORTS_PER_SOL, format_sol
from jupyter_io.payments.hooks import FreeHook, SessionTerms, SolanaEscrowHook

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
