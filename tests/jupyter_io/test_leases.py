"""Lease tokens: issue, verify, every refusal, tampering, and the provider's replay guard."""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from typing import Any

import pytest
from solders.keypair import Keypair
from solders.pubkey import Pubkey

from jupyter_io.errors import AuthError
from jupyter_io.identity import challenge_message, sign_challenge
from jupyter_io.leases import (
    CLOCK_SKEW_S,
    MAX_TOKEN_LENGTH,
    TOKEN_DOMAIN,
    LeaseBook,
    LeaseClaims,
    issue_token,
    token_message,
    verify_token,
)

COORDINATOR = Keypair()
USER = Keypair().pubkey()
PROVIDER = Keypair().pubkey()
NOW = 1_750_000_000.0


def claims(**changes: Any) -> LeaseClaims:
    base = LeaseClaims(
        lease_id="lease-7f3a",
        user=USER,
        provider=PROVIDER,
        gpu="RTX 4090",
        gpu_indices=(0, 2),
        price_lamports_per_hour=120_000_000,
        issued_at=NOW,
        expires_at=NOW + 3600,
        coordinator=COORDINATOR.pubkey(),
        relay=True,
    )
    return replace(base, **changes)


def verify(token: str, **overrides: Any) -> LeaseClaims:
    expected: dict[str, Any] = {
        "coordinator": COORDINATOR.pubkey(),
        "user": USER,
        "provider": PROVIDER,
        "now": NOW + 10,
    }
    expected.update(overrides)
    return verify_token(token, **expected)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def split(token: str) -> tuple[bytes, str]:
    text, signature = token.split(".")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)), signature


def test_round_trip() -> None:
    issued = claims()
    token = issue_token(COORDINATOR, issued)
    assert verify(token) == issued
    payload, signature = split(token)
    body = json.loads(payload)
    assert body["v"] == 1 and body["user"] == str(USER) and body["gpu_indices"] == [0, 2]
    assert list(body) == sorted(body)  # canonical: sorted keys, compact
    assert b", " not in payload and b": " not in payload
    assert len(token) < 1024 and token.isascii()
    # The signature is an ordinary Solana signature over the domain-separated message.
    from solders.signature import Signature

    assert Signature.from_string(signature).verify(COORDINATOR.pubkey(), TOKEN_DOMAIN + payload)
    assert token_message(payload) == TOKEN_DOMAIN + payload


def test_issuing_is_deterministic_and_needs_the_named_key() -> None:
    assert issue_token(COORDINATOR, claims()) == issue_token(COORDINATOR, claims())
    with pytest.raises(ValueError, match="signing key"):
        issue_token(Keypair(), claims())


def test_claims_validate_their_fields() -> None:
    with pytest.raises(ValueError, match="expires_at"):
        claims(expires_at=NOW)
    with pytest.raises(ValueError, match="gpu_indices"):
        claims(gpu_indices=(0, 0))
    with pytest.raises(ValueError, match="gpu_indices"):
        claims(gpu_indices=[0])
    with pytest.raises(ValueError, match="price"):
        claims(price_lamports_per_hour=1.5)
    with pytest.raises(TypeError, match="Pubkey"):
        claims(user=str(USER))
    with pytest.raises(ValueError, match="lease_id"):
        claims(lease_id="")


@pytest.mark.parametrize(
    ("token", "why"),
    [
        ("", "two dot-separated parts"),
        ("abc", "two dot-separated parts"),
        ("a.b.c", "two dot-separated parts"),
        (".sig", "two dot-separated parts"),
        ("!!!.5URv", "not base64url"),
        (f"{b64(b'{}')}.not-base58!", "not a base58 Ed25519 signature"),
        (f"{b64(b'{}')}.{'1' * 10}", "not a base58 Ed25519 signature"),
        ("x" * (MAX_TOKEN_LENGTH + 1), "more than"),
    ],
)
def test_malformed_tokens_are_refused(token: str, why: str) -> None:
    with pytest.raises(AuthError, match=f"malformed.*{why}"):
        verify(token)


def sign_raw(payload: bytes, keypair: Keypair = COORDINATOR) -> str:
    return f"{b64(payload)}.{keypair.sign_message(token_message(payload))}"


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"v": 2}', "version 2"),
        (b'{"v": 1}', "missing"),
    ],
)
def test_well_signed_garbage_is_malformed(payload: bytes, why: str) -> None:
    with pytest.raises(AuthError, match=f"malformed.*{why}"):
        verify(sign_raw(payload))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("user", "not-a-key"),
        ("user", 5),
        ("gpu_indices", "0,2"),
        ("gpu_indices", [-1]),
        ("price_lamports_per_hour", "120000000"),
        ("expires_at", None),
        ("relay", 1),
        ("unexpected", True),
    ],
)
def test_claims_of_the_wrong_type_are_malformed(field: str, value: Any) -> None:
    body = json.loads(claims().to_json())
    body[field] = value
    payload = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(AuthError, match="malformed"):
        verify(sign_raw(payload))


def test_non_canonical_encodings_are_malformed() -> None:
    body = json.loads(claims().to_json())
    spaced = json.dumps(body, sort_keys=True).encode()
    with pytest.raises(AuthError, match="canonical JSON"):
        verify(sign_raw(spaced))
    token = issue_token(COORDINATOR, claims())
    text, signature = token.split(".")
    with pytest.raises(AuthError, match="malformed"):
        verify(f"{text}==.{signature}")


def test_a_forged_token_is_refused() -> None:
    forger = Keypair()
    # Claims naming the real coordinator, signed by someone else.
    with pytest.raises(AuthError, match="forged or altered"):
        verify(sign_raw(claims().to_json(), forger))


def test_a_token_from_another_coordinator_is_refused_as_such() -> None:
    other = Keypair()
    token = issue_token(other, claims(coordinator=other.pubkey()))
    with pytest.raises(AuthError, match=f"signed by coordinator {other.pubkey()}.*trusts"):
        verify(token)
    assert verify(token, coordinator=other.pubkey()).coordinator == other.pubkey()


def test_a_token_naming_another_coordinator_than_its_signer_is_refused() -> None:
    payload = claims(coordinator=Keypair().pubkey()).to_json()
    with pytest.raises(AuthError, match="inconsistent"):
        verify(sign_raw(payload))


def test_expired_tokens_are_refused() -> None:
    token = issue_token(COORDINATOR, claims())
    assert verify(token, now=NOW + 3599.9)
    with pytest.raises(AuthError, match=r"lease-7f3a expired 0 s ago.*request a new lease"):
        verify(token, now=NOW + 3600)
    with pytest.raises(AuthError, match="expired 600 s ago"):
        verify(token, now=NOW + 4200)


def test_tokens_from_the_future_are_refused_beyond_clock_skew() -> None:
    token = issue_token(COORDINATOR, claims())
    assert verify(token, now=NOW - CLOCK_SKEW_S + 1)
    with pytest.raises(AuthError, match=r"in the future.*clocks"):
        verify(token, now=NOW - CLOCK_SKEW_S - 10)


def test_a_token_issued_for_another_user_is_refused() -> None:
    token = issue_token(COORDINATOR, claims())
    stranger = Keypair().pubkey()
    with pytest.raises(AuthError, match=f"issued to user {USER}, not to {stranger}"):
        verify(token, user=stranger)


def test_a_token_for_another_provider_is_refused() -> None:
    token = issue_token(COORDINATOR, claims())
    me = Keypair().pubkey()
    with pytest.raises(AuthError, match=f"for provider {PROVIDER}, not this provider \\({me}\\)"):
        verify(token, provider=me)


@pytest.mark.parametrize(
    "change",
    [
        {"lease_id": "lease-7f3b"},
        {"user": Keypair().pubkey()},
        {"provider": Keypair().pubkey()},
        {"gpu": "RTX 4080"},
        {"gpu_indices": (0, 1)},
        {"gpu_indices": (0, 2, 3)},
        {"price_lamports_per_hour": 1},
        {"issued_at": NOW - 1},
        {"expires_at": NOW + 86_400},
        {"relay": False},
    ],
)
def test_changing_any_claim_breaks_the_signature(change: dict[str, Any]) -> None:
    _, signature = split(issue_token(COORDINATOR, claims()))
    altered = claims(**change)
    token = f"{b64(altered.to_json())}.{signature}"
    with pytest.raises(AuthError, match="forged or altered"):
        verify(
            token,
            user=altered.user,
            provider=altered.provider,
        )


def test_flipping_any_bit_of_the_claims_is_refused() -> None:
    token = issue_token(COORDINATOR, claims())
    payload, signature = split(token)
    for position in range(len(payload)):
        for bit in (0x01, 0x20):
            tampered = bytearray(payload)
            tampered[position] ^= bit
            with pytest.raises(AuthError):
                verify(f"{b64(bytes(tampered))}.{signature}")


def test_flipping_any_character_of_the_signature_is_refused() -> None:
    token = issue_token(COORDINATOR, claims())
    text, signature = token.split(".")
    alphabet = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
    for position in range(len(signature)):
        replacement = alphabet[(alphabet.index(signature[position]) + 1) % len(alphabet)]
        forged = signature[:position] + replacement + signature[position + 1 :]
        with pytest.raises(AuthError):
            verify(f"{text}.{forged}")


def test_signatures_of_other_messages_are_not_tokens() -> None:
    payload = claims().to_json()
    # The bare claims, signed without the domain prefix.
    undomained = f"{b64(payload)}.{COORDINATOR.sign_message(payload)}"
    with pytest.raises(AuthError, match="forged or altered"):
        verify(undomained)
    # A HELLO answer made with the same key, whatever nonce the attacker chose.
    hello = sign_challenge(COORDINATOR, payload, PROVIDER)
    with pytest.raises(AuthError, match="forged or altered"):
        verify(f"{b64(payload)}.{hello}")
    # And neither message format can be a prefix of the other.
    hello_message = challenge_message(b"\0" * 32, PROVIDER)
    assert not hello_message.startswith(TOKEN_DOMAIN)
    assert not TOKEN_DOMAIN.startswith(hello_message[: len(TOKEN_DOMAIN)])


# -- the provider's replay guard ------------------------------------------------------------


def admit(book: LeaseBook, token: str, session: str, now: float = NOW + 10) -> LeaseClaims:
    return book.admit(
        token,
        session,
        coordinator=COORDINATOR.pubkey(),
        user=USER,
        provider=PROVIDER,
        now=now,
    )


def test_a_lease_attaches_to_one_session_and_its_reconnects() -> None:
    book = LeaseBook()
    token = issue_token(COORDINATOR, claims())
    assert admit(book, token, "session-1") == claims()
    assert book.session_of("lease-7f3a") == "session-1"
    admit(book, token, "session-1", now=NOW + 100)  # reconnect of the same session
    with pytest.raises(AuthError, match="already attached to another session"):
        admit(book, token, "session-2")
    assert book.session_of("lease-7f3a") == "session-1"
    other_lease = issue_token(COORDINATOR, claims(lease_id="lease-2"))
    admit(book, other_lease, "session-2")
    assert len(book) == 2


def test_admit_verifies_before_binding() -> None:
    book = LeaseBook()
    with pytest.raises(AuthError, match="forged"):
        admit(book, sign_raw(claims().to_json(), Keypair()), "session-1")
    assert len(book) == 0


def test_entries_expire_with_the_token() -> None:
    book = LeaseBook()
    admit(book, issue_token(COORDINATOR, claims()), "session-1")
    admit(book, issue_token(COORDINATOR, claims(lease_id="late", expires_at=NOW + 7200)), "s")
    assert book.prune(NOW + 3599) == 0
    assert book.prune(NOW + 3600) == 1
    assert book.session_of("lease-7f3a") is None and len(book) == 1
    with pytest.raises(AuthError, match="expired"):
        book.bind(claims(), "session-2", now=NOW + 3600)
    assert book.prune(NOW + 7200) == 1 and len(book) == 0


def test_a_refreshed_token_extends_the_binding_of_its_session_only() -> None:
    book = LeaseBook()
    admit(book, issue_token(COORDINATOR, claims()), "session-1")
    refreshed = issue_token(COORDINATOR, claims(issued_at=NOW + 3000, expires_at=NOW + 7200))
    with pytest.raises(AuthError, match="another session"):
        admit(book, refreshed, "session-2", now=NOW + 3100)
    admit(book, refreshed, "session-1", now=NOW + 3100)
    assert book.prune(NOW + 3600) == 0  # the old expiry no longer applies
    assert book.session_of("lease-7f3a") == "session-1"
    assert book.prune(NOW + 7200) == 1


def test_an_ended_lease_is_refused_even_to_its_session() -> None:
    book = LeaseBook()
    token = issue_token(COORDINATOR, claims())
    admit(book, token, "session-1")
    book.end("lease-7f3a")
    book.end("never-seen")
    with pytest.raises(AuthError, match="has ended"):
        admit(book, token, "session-1")


def test_a_lease_id_reused_for_another_user_is_refused() -> None:
    book = LeaseBook()
    book.bind(claims(), "session-1", now=NOW)
    other_user = claims(user=Keypair().pubkey())
    with pytest.raises(AuthError, match="another user"):
        book.bind(other_user, "session-1", now=NOW)


def test_pubkeys_round_trip_through_claims_json() -> None:
    parsed = LeaseClaims.from_json(claims().to_json())
    assert parsed == claims()
    assert isinstance(parsed.user, Pubkey)
