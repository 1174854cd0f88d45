"""SPL Token layouts decode what the real Token program writes."""

from __future__ import annotations

from solders.keypair import Keypair

from jupyter_io.payments.token_accounts import (
    decode_mint,
    decode_multisig,
    decode_token_account,
    native_mint_data,
    ui_token_amount,
)

from .conftest import Chain, Parties


def test_native_mint_layout() -> None:
    mint = decode_mint(native_mint_data())
    assert mint is not None
    assert (mint.decimals, mint.supply, mint.mint_authority, mint.freeze_authority) == (
        9, 0, None, None,
    )  # fmt: skip
    assert decode_token_account(native_mint_data()) is None
    assert decode_multisig(bytes(355)) is None  # uninitialized


def test_ui_amount_strings_are_exact() -> None:
    assert ui_token_amount(1, 9)["uiAmountString"] == "0.000000001"
    assert ui_token_amount(10**9, 9)["uiAmountString"] == "1"
    assert ui_token_amount(0, 9)["uiAmountString"] == "0"
    assert ui_token_amount(150, 0) == {
        "amount": "150", "decimals": 0, "uiAmount": 150.0, "uiAmountString": "150",
    }  # fmt: skip


async def test_decodes_accounts_written_by_the_token_program(
    chain: Chain, parties: Parties
) -> None:
    receipt = await chain.escrow.open_escrow(
        parties.user, parties.provider.pubkey(), parties.arbiter.pubkey(), "layout", 777_000
    )
    terms = receipt.terms
    escrow, multisig = (
        await chain.client.get_multiple_accounts([terms.escrow, terms.multisig])
    ).value
    assert escrow is not None and multisig is not None
    token = decode_token_account(bytes(escrow.data))
    assert token is not None
    assert token.owner == terms.multisig and token.amount == 777_000 and token.is_native
    assert token.rent_exempt_reserve == receipt.escrow_rent
    assert token.delegate is None and token.close_authority is None
    decoded = decode_multisig(bytes(multisig.data))
    assert decoded is not None and decoded.m == 2 and decoded.n == 3
    assert decoded.signers == terms.signers
    assert decode_multisig(bytes(escrow.data)) is None
    assert decode_token_account(bytes(multisig.data)) is None
    assert Keypair().pubkey() not in decoded.signers
