"""Lamports are exact; SOL is only for display."""

from __future__ import annotations

from decimal import Decimal

import pytest

from jupyter_io.errors import ConfigError
from jupyter_io.payments.amounts import LAMPORTS_PER_SOL, format_sol, parse_sol


@pytest.mark.parametrize(
    ("text", "lamports"),
    [("0.05", 50_000_000), ("1", LAMPORTS_PER_SOL), (" 2.000000001 ", 2_000_000_001),
     (Decimal("0.1"), 100_000_000), (3, 3 * LAMPORTS_PER_SOL), ("0", 0)],
)  # fmt: skip
def test_parse_sol_is_exact(text: str | int | Decimal, lamports: int) -> None:
    assert parse_sol(text) == lamports


@pytest.mark.parametrize("text", ["0.0000000001", "-1", "abc", "nan", "inf", ""])
def test_parse_sol_refuses_what_it_cannot_represent(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_sol(text)


@pytest.mark.parametrize(
    ("lamports", "text"),
    [(50_000_000, "0.05 SOL"), (LAMPORTS_PER_SOL, "1 SOL"), (0, "0 SOL"), (1, "0.000000001 SOL"),
     (-5_000, "-0.000005 SOL"), (2_039_280, "0.00203928 SOL")],
)  # fmt: skip
def test_format_sol_keeps_every_digit(lamports: int, text: str) -> None:
    assert format_sol(lamports) == text
    assert parse_sol(text.removesuffix(" SOL").lstrip("-")) == abs(lamports)
