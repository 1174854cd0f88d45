"""Amounts: exact integers in lamports everywhere, SOL only for people to read.

Every balance, deposit, price and fee in jupyter-io is an ``int`` of lamports. Parse what a
person typed with :func:`parse_sol` (it refuses fractions of a lamport instead of rounding) and
show amounts with :func:`format_sol`. Never use ``float`` for money.

Metering is arithmetic on a price per GPU-hour, and every party (the coordinator billing, the
user's payment hook, the wallet) uses the same three functions so that they agree to the
lamport: :func:`amount_for` (seconds → lamports, rounded down: a fraction of a lamport is
never charged), :func:`min_deposit` (rounded up) and :func:`covered_seconds`.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

from ..errors import ConfigError

__all__ = [
    "DEFAULT_SESSION_HOURS",
    "FEE_PER_SIGNATURE",
    "LAMPORTS_PER_SOL",
    "MAX_SESSION_HOURS",
    "SECONDS_PER_HOUR",
    "amount_for",
    "covered_seconds",
    "format_sol",
    "min_deposit",
    "parse_sol",
]

#: 1 SOL = 10**9 lamports (the native mint has 9 decimals).
LAMPORTS_PER_SOL = 1_000_000_000

#: The base fee a Solana cluster charges per transaction signature (no priority fee).
FEE_PER_SIGNATURE = 5_000

#: Prices are per GPU-hour.
SECONDS_PER_HOUR = 3600

#: A session's budget when nobody chose one: its escrow covers this many hours at its price.
#: The one source of the default: the escrow hook's ``max_session_hours``, the Lab
#: preferences endpoint, ``jupyter io kernelspec install --budget`` and the README say this.
DEFAULT_SESSION_HOURS = 1.0
#: The longest session budget accepted, in hours (a month).
MAX_SESSION_HOURS = 24 * 31


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


def amount_for(price_per_hour: int, seconds: int) -> int:
    """Lamports for ``seconds`` at ``price_per_hour``, rounded down (no fraction charged)."""
    return price_per_hour * max(0, seconds) // SECONDS_PER_HOUR


def min_deposit(price_per_hour: int, seconds: int) -> int:
    """Lamports that pay for ``seconds`` at ``price_per_hour``, rounded up (a deposit)."""
    return -(-price_per_hour * seconds // SECONDS_PER_HOUR)


def covered_seconds(price_per_hour: int, deposit: int) -> int | None:
    """Whole seconds ``deposit`` pays for (None: a free offer, no limit)."""
    if price_per_hour <= 0:
        return None
    return deposit * SECONDS_PER_HOUR // price_per_hour
