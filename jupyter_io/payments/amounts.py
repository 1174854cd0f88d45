"""Amounts: exact integers in lamports everywhere, SOL only for people to read.

Every balance, deposit, price and fee in jupyter-io is an ``int`` of lamports. Parse what a
person typed with :func:`parse_sol` (it refuses fractions of a lamport instead of rounding) and
show amounts with :func:`format_sol`. Never use ``float`` for money.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

from ..errors import ConfigError

__all__ = [
    "FEE_PER_SIGNATURE",
    "LAMPORTS_PER_SOL",
    "format_sol",
    "parse_sol",
]

#: 1 SOL = 10**9 lamports (the native mint has 9 decimals).
LAMPORTS_PER_SOL = 1_000_000_000

#: The base fee a Solana cluster charges per transaction signature (no priority fee).
FEE_PER_SIGNATURE = 5_000


def parse_sol(text: str | int | Decimal) -> int:
    """Convert an amount of SOL (``"0.05"``, ``Decimal``, ``int``) to lamports, exactly.

    Raises :class:`ConfigError` for anything that is not a non-negative amount with at most
    nine decimals; rounding money silently is how balances drift.
    """
    try:
        value = Decimal(str(text).strip())
    except InvalidOperation:
        raise ConfigError(f"{text!r} is not an amount of SOL (e.g. 0.05)") from None
    if not value.is_finite() or value < 0:
        raise ConfigError(f"{text!r} is not a non-negative amount of SOL")
    lamports = value * LAMPORTS_PER_SOL
    if lamports != lamports.to_integral_value():
        raise ConfigError(f"{text!r} SOL has more than 9 decimals (1 lamport = 0.000000001 SOL)")
    return int(lamports)


def format_sol(lamports: int) -> str:
    """Show ``lamports`` as SOL without losing a digit: ``format_sol(50_000_000) == "0.05 SOL"``."""
    sign = "-" if lamports < 0 else ""
    whole, frac = divmod(abs(lamports), LAMPORTS_PER_SOL)
    text = f"{whole}.{frac:09d}".rstrip("0").rstrip(".")
    return f"{sign}{text} SOL"
