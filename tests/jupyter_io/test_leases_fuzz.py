"""Property-based tests of the lease-token parser (hypothesis).

The contract (``jupyter_io.leases``): :func:`verify_token` raises only
:class:`~jupyter_io.errors.AuthError`, whatever the token holds, even when the coordinator's
own key signed the bytes; a token it accepts is exactly the token :func:`issue_token` makes
of the claims it returns (one spelling per set of claims); and every set of claims the
coordinator can issue verifies back to itself.
"""

from __future__ import annotations

import base64
import json
import sys
from dataclasses import fields
from typing import Any

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st
from solders.keypair import Keypair

from jupyter_io.errors import AuthError
from jupyter_io.leases import (
    MAX_TOKEN_LENGTH,
    TOKEN_VERSION,
    LeaseClaims,
    issue_token,
    token_message,
    verify_token,
)

from ..fuzzing import EDGE_NUMBERS, JSON, hostile_json

COORDINATOR = Keypair()
USER = Keypair().pubkey()
PROVIDER = Keypair().pubkey()
NOW = 1_750_000_000.0
HUGE = sys.float_info.max


def verify(token: str) -> LeaseClaims:
    return verify_token(
        token, coordinator=COORDINATOR.pubkey(), user=USER, provider=PROVIDER, now=NOW
    )


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed(payload: bytes) -> str:
    """``payload`` as a token the trusted coordinator signed: the parser's last line."""
    return f"{b64(payload)}.{COORDINATOR.sign_message(token_message(payload))}"


def canonical(body: Any) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def valid_body() -> dict[str, Any]:
    return {
        "v": TOKEN_VERSION,
        "lease_id": "lease-1",
        "user": str(USER),
        "provider": str(PROVIDER),
        "coordinator": str(COORDINATOR.pubkey()),
        "gpu": "RTX 4090",
        "gpu_indices": [0, 1],
        "price_lamports_per_hour": 1_000_000,
        "issued_at": NOW - 10,
        "expires_at": NOW + 3600,
        "relay": False,
    }


NAMES = [f.name for f in fields(LeaseClaims)] + ["v"]


@st.composite
def claim_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """A claims object with some fields replaced by anything JSON, dropped, or added."""
    body = valid_body()
    for name in draw(st.lists(st.sampled_from(NAMES), max_size=3)):
        if draw(st.booleans()):
            body[name] = draw(EDGE_NUMBERS | JSON)
        else:
            body.pop(name, None)
    if not draw(st.integers(0, 3)):
        body[draw(st.text(max_size=8))] = draw(JSON)
    return body


def check(token: str) -> None:
    """Refused with AuthError, or accepted and then the one token its claims give."""
    try:
        claims = verify(token)
    except AuthError:
        return
    assert issue_token(COORDINATOR, claims) == token


@given(st.text(max_size=200))
@example("a.b")
@example("." * 5000)
@example("AAAA." + "1" * 5000)
@example("\udcff.\udcff")
def test_any_text_is_refused_with_auth_error(token: str) -> None:
    check(token)


@given(hostile_json())
@example(b"[" * 3000)  # found by fuzzing: RecursionError escaped
@example(b"\xff\xfe")
def test_any_signed_bytes_are_refused_with_auth_error(payload: bytes) -> None:
    check(signed(payload))


@given(claim_bodies())
@example({**valid_body(), "expires_at": 10**400})  # found by fuzzing: OverflowError escaped
@example({**valid_body(), "issued_at": -(10**400)})
@example({**valid_body(), "expires_at": -HUGE})  # found by fuzzing: _when() OverflowError
@example({**valid_body(), "issued_at": HUGE, "expires_at": HUGE})
@example({**valid_body(), "issued_at": 1e300, "expires_at": 1e301})
def test_any_signed_claims_are_refused_with_auth_error_or_reissue_identically(
    body: dict[str, Any],
) -> None:
    try:
        payload = canonical(body)
    except ValueError:  # json cannot write an int of over 4300 digits; neither can a peer
        assume(False)
    check(signed(payload))


PUBKEYS = st.sampled_from([USER, PROVIDER, Keypair().pubkey()])
TIMES = st.floats(-1e12, 1e12, allow_nan=False) | st.integers(-(10**12), 10**12)


@st.composite
def claims(draw: st.DrawFn) -> LeaseClaims:
    issued = draw(TIMES)
    return LeaseClaims(
        lease_id=draw(st.text(min_size=1, max_size=80)),
        user=draw(PUBKEYS),
        provider=draw(PUBKEYS),
        gpu=draw(st.text(min_size=1, max_size=80)),
        gpu_indices=tuple(draw(st.lists(st.integers(0, 2**64), unique=True, max_size=16))),
        price_lamports_per_hour=draw(st.integers(0, 2**64)),
        issued_at=issued,
        expires_at=issued + draw(st.floats(1e-3, 1e9) | st.integers(1, 10**9)),
        coordinator=COORDINATOR.pubkey(),
        relay=draw(st.booleans()),
    )


@given(claims())
def test_every_issued_token_verifies_back_to_its_claims(lease: LeaseClaims) -> None:
    token = issue_token(COORDINATOR, lease)
    assert verify_token(
        token, coordinator=COORDINATOR.pubkey(), user=lease.user, provider=lease.provider,
        now=float(lease.issued_at),
    ) == lease  # fmt: skip


def test_claims_beyond_a_floats_range_are_malformed_not_an_overflow() -> None:
    """Found by fuzzing: an ``expires_at`` integer past 1.8e308 raised OverflowError out of
    the token parser (math.isfinite converts it), not AuthError."""
    with pytest.raises(AuthError, match="malformed"):
        verify(signed(canonical({**valid_body(), "expires_at": 10**400})))
    with pytest.raises(ValueError, match="finite Unix seconds"):
        LeaseClaims(**{**claims_kwargs(), "issued_at": 10**400})


def test_extreme_but_signed_times_are_refused_with_a_message() -> None:
    """Found by fuzzing: the refusal message's date (datetime.fromtimestamp) overflowed for
    a time past year 9999, so a signed token expiring at -1.7e308 raised OverflowError."""
    with pytest.raises(AuthError, match="expired"):
        verify(signed(canonical({**valid_body(), "issued_at": -HUGE, "expires_at": -1e300})))
    with pytest.raises(AuthError, match="in the future"):
        verify(signed(canonical({**valid_body(), "issued_at": 1e300, "expires_at": 1e301})))


def test_claims_too_long_for_a_token_are_refused_when_issued() -> None:
    """A token the provider would refuse as too long is not issued at all."""
    long = LeaseClaims(**{**claims_kwargs(), "gpu": "x" * MAX_TOKEN_LENGTH})
    with pytest.raises(ValueError, match="more than the 4096"):
        issue_token(COORDINATOR, long)


def claims_kwargs() -> dict[str, Any]:
    return {
        "lease_id": "lease-1",
        "user": USER,
        "provider": PROVIDER,
        "gpu": "RTX 4090",
        "gpu_indices": (0,),
        "price_lamports_per_hour": 1,
        "issued_at": NOW,
        "expires_at": NOW + 60,
        "coordinator": COORDINATOR.pubkey(),
    }
