"""SPL Token account layouts: decode token accounts, mints and multisigs from raw bytes.

Both ends need these: the escrow client checks an escrow on-chain from base64 account data
(so it works against any RPC node, without trusting a server-side parser), and the embedded
ledger's JSON-RPC endpoint renders the same accounts for ``jsonParsed`` requests.

Call :func:`decode_token_account`, :func:`decode_mint` or :func:`decode_multisig` on an
account's ``data``; they return ``None`` when the bytes are not that kind of account.
:func:`native_mint_data` builds the wrapped-SOL mint that LiteSVM does not ship.
:func:`multisig_signer_problems` and :func:`wsol_account_problems` are the field-by-field
checks the escrow and the cohort allowances share.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from solders.pubkey import Pubkey
from spl.token.constants import ACCOUNT_LEN, MINT_LEN, MULTISIG_LEN, WRAPPED_SOL_MINT

__all__ = [
    "ACCOUNT_LEN",
    "MINT_LEN",
    "MULTISIG_LEN",
    "NATIVE_DECIMALS",
    "NATIVE_MINT",
    "Mint",
    "Multisig",
    "TokenAccount",
    "TokenAccountState",
    "decode_mint",
    "decode_multisig",
    "decode_token_account",
    "mint_json",
    "multisig_json",
    "multisig_signer_problems",
    "native_mint_data",
    "token_account_json",
    "ui_token_amount",
    "wsol_account_problems",
]

#: The wrapped-SOL mint (``So11111111111111111111111111111111111111112``).
NATIVE_MINT: Pubkey = WRAPPED_SOL_MINT
NATIVE_DECIMALS = 9

# Layouts of spl-token 3.x (program TokenkegQfeZyiNwAJbNbGKPFXCWuBvf9Ss623VQ5DA):
# Account: mint, owner, amount u64, delegate COption<Pubkey>, state u8, is_native COption<u64>,
#          delegated_amount u64, close_authority COption<Pubkey>          = 165 bytes
# Mint:    mint_authority COption<Pubkey>, supply u64, decimals u8, is_initialized u8,
#          freeze_authority COption<Pubkey>                                = 82 bytes
# Multisig: m u8, n u8, is_initialized u8, signers [Pubkey; 11]            = 355 bytes
_ACCOUNT = struct.Struct("<32s32sQI32sBIQQI32s")
_MINT = struct.Struct("<I32sQBBI32s")
_MAX_SIGNERS = 11


class TokenAccountState:
    """Values of a token account's ``state`` byte."""

    UNINITIALIZED = 0
    INITIALIZED = 1
    FROZEN = 2


_STATE_NAMES = {0: "uninitialized", 1: "initialized", 2: "frozen"}


@dataclass(frozen=True, slots=True)
class TokenAccount:
    """A decoded SPL Token account. ``amount`` is in base units (lamports for wSOL)."""

    mint: Pubkey
    owner: Pubkey
    amount: int
    delegate: Pubkey | None
    state: int
    #: For wrapped-SOL accounts, the rent-exempt reserve kept out of ``amount``; else None.
    rent_exempt_reserve: int | None
    delegated_amount: int
    close_authority: Pubkey | None

    @property
    def is_native(self) -> bool:
        """True for a wrapped-SOL account (its lamports back its amount one for one)."""
        return self.rent_exempt_reserve is not None


@dataclass(frozen=True, slots=True)
class Mint:
    """A decoded SPL Token mint."""

    mint_authority: Pubkey | None
    supply: int
    decimals: int
    is_initialized: bool
    freeze_authority: Pubkey | None


@dataclass(frozen=True, slots=True)
class Multisig:
    """A decoded SPL Token multisig: ``m`` of the ``signers`` must sign."""

    m: int
    n: int
    is_initialized: bool
    signers: tuple[Pubkey, ...]


def _opt_key(tag: int, raw: bytes) -> Pubkey | None:
    return Pubkey.from_bytes(raw) if tag == 1 else None


def decode_token_account(data: bytes) -> TokenAccount | None:
    """Decode a 165-byte token account; ``None`` if ``data`` is not an initialized one."""
    if len(data) != ACCOUNT_LEN:
        return None
    (mint, owner, amount, dtag, delegate, state, ntag, native, damount, ctag, close) = (
        _ACCOUNT.unpack(data)
    )
    if state == TokenAccountState.UNINITIALIZED or state not in _STATE_NAMES:
        return None
    return TokenAccount(
        mint=Pubkey.from_bytes(mint),
        owner=Pubkey.from_bytes(owner),
        amount=amount,
        delegate=_opt_key(dtag, delegate),
        state=state,
        rent_exempt_reserve=native if ntag == 1 else None,
        delegated_amount=damount,
        close_authority=_opt_key(ctag, close),
    )


def decode_mint(data: bytes) -> Mint | None:
    """Decode an 82-byte mint; ``None`` if ``data`` is not an initialized mint."""
    if len(data) != MINT_LEN:
        return None
    atag, authority, supply, decimals, initialized, ftag, freeze = _MINT.unpack(data)
    if not initialized:
        return None
    return Mint(
        mint_authority=_opt_key(atag, authority),
        supply=supply,
        decimals=decimals,
        is_initialized=True,
        freeze_authority=_opt_key(ftag, freeze),
    )


def decode_multisig(data: bytes) -> Multisig | None:
    """Decode a 355-byte multisig; ``None`` if ``data`` is not an initialized multisig."""
    if len(data) != MULTISIG_LEN:
        return None
    m, n, initialized = data[0], data[1], data[2]
    if not initialized or not 1 <= m <= n <= _MAX_SIGNERS:
        return None
    signers = tuple(Pubkey.from_bytes(data[3 + 32 * i : 35 + 32 * i]) for i in range(n))
    return Multisig(m=m, n=n, is_initialized=True, signers=signers)


def multisig_signer_problems(
    multisig: Multisig, *, threshold: int, roles: dict[Pubkey, str], stranger: str
) -> list[str]:
    """What keeps ``multisig`` from being exactly ``threshold``-of-``len(roles)`` of the keys
    of ``roles`` (key -> role, e.g. "user"), each once, nothing else; a problem a line,
    naming the field. ``stranger`` completes "extra signer: KEY is ...".

    The signers are compared as a list, not a set: SPL Token counts a signature once per
    slot its key fills, so a key listed twice is two of the ``m`` signatures by itself.
    """
    problems: list[str] = []
    if multisig.m != threshold:
        problems.append(f"threshold m = {multisig.m}, not {threshold}")
    if multisig.n != len(roles):
        problems.append(f"n = {multisig.n} signers, not {len(roles)}")
    signers = list(multisig.signers[: multisig.n])
    for key in dict.fromkeys(signers):
        count = signers.count(key)
        if count > 1:
            who = roles.get(key, "a stranger")
            problems.append(
                f"duplicate signer: {key} ({who}) fills {count} slots, so its signature "
                f"alone counts {count} times"
            )
        if key not in roles:
            problems.append(f"extra signer: {key} is {stranger}")
    for key, role in roles.items():
        if key not in signers:
            problems.append(f"the {role} {key} is not a signer")
    return problems


def wsol_account_problems(
    token: TokenAccount,
    lamports: int,
    *,
    owner: Pubkey,
    owner_role: str,
    authority_problems: list[str],
) -> list[str]:
    """What keeps ``token`` (an account holding ``lamports``) from being an initialized
    wrapped-SOL account of ``owner`` (named "the ``owner_role``" in the text) with its amount
    backed by its lamports, each naming its field, in the order mint, owner, state, then
    ``authority_problems`` (the caller's delegate and close-authority findings), then the
    amount."""
    problems: list[str] = []
    if token.mint != NATIVE_MINT:
        problems.append(f"wrong mint: {token.mint}, not wrapped SOL ({NATIVE_MINT})")
    elif not token.is_native:
        problems.append("is_native is unset: it is not a wrapped-SOL account")
    if token.owner != owner:
        problems.append(f"its owner is {token.owner}, not the {owner_role} {owner}")
    if token.state != TokenAccountState.INITIALIZED:
        problems.append("its state is frozen")
    problems += authority_problems
    reserve = token.rent_exempt_reserve
    if reserve is not None and token.amount + reserve > lamports:
        problems.append(
            f"its amount ({token.amount}) and rent reserve ({reserve}) exceed its "
            f"{lamports} lamports"
        )
    return problems


def native_mint_data() -> bytes:
    """The bytes of the wrapped-SOL mint: no authorities, supply 0, 9 decimals, initialized."""
    return _MINT.pack(0, bytes(32), 0, NATIVE_DECIMALS, 1, 0, bytes(32))


def ui_token_amount(amount: int, decimals: int) -> dict[str, Any]:
    """The RPC's ``UiTokenAmount`` object (``uiAmountString`` is the exact one)."""
    exact = Decimal(amount).scaleb(-decimals) if decimals else Decimal(amount)
    text = format(exact, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return {
        "amount": str(amount),
        "decimals": decimals,
        "uiAmount": float(exact),
        "uiAmountString": text,
    }


def token_account_json(account: TokenAccount, decimals: int) -> dict[str, Any]:
    """``jsonParsed`` rendering of a token account, as a Solana RPC node returns it."""
    info: dict[str, Any] = {
        "isNative": account.is_native,
        "mint": str(account.mint),
        "owner": str(account.owner),
        "state": _STATE_NAMES[account.state],
        "tokenAmount": ui_token_amount(account.amount, decimals),
    }
    if account.delegate is not None:
        info["delegate"] = str(account.delegate)
        info["delegatedAmount"] = ui_token_amount(account.delegated_amount, decimals)
    if account.rent_exempt_reserve is not None:
        info["rentExemptReserve"] = ui_token_amount(account.rent_exempt_reserve, decimals)
    if account.close_authority is not None:
        info["closeAuthority"] = str(account.close_authority)
    return {"type": "account", "info": info}


def mint_json(mint: Mint) -> dict[str, Any]:
    """``jsonParsed`` rendering of a mint."""
    return {
        "type": "mint",
        "info": {
            "decimals": mint.decimals,
            "freezeAuthority": str(mint.freeze_authority) if mint.freeze_authority else None,
            "isInitialized": mint.is_initialized,
            "mintAuthority": str(mint.mint_authority) if mint.mint_authority else None,
            "supply": str(mint.supply),
        },
    }


def multisig_json(multisig: Multisig) -> dict[str, Any]:
    """``jsonParsed`` rendering of a multisig."""
    return {
        "type": "multisig",
        "info": {
            "isInitialized": multisig.is_initialized,
            "numRequiredSigners": multisig.m,
            "numValidSigners": multisig.n,
            "signers": [str(s) for s in multisig.signers],
        },
    }
