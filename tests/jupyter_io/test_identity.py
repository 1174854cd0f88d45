"""Keypair files and the HELLO challenge-response."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from solders.keypair import Keypair

from jupyter_io.errors import AuthError, ConfigError
from jupyter_io.identity import (
    load_allowlist,
    load_keypair,
    load_or_create_keypair,
    new_nonce,
    sign_challenge,
    verify_challenge,
    write_keypair,
)


def test_keypair_file_round_trip_in_solana_cli_format(tmp_path: Path) -> None:
    keypair = Keypair()
    path = write_keypair(keypair, tmp_path / "id.json")
    assert json.loads(path.read_text()) == list(bytes(keypair))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_keypair(path).pubkey() == keypair.pubkey()


def test_load_or_create_is_stable(tmp_path: Path) -> None:
    first = load_or_create_keypair(tmp_path / "a" / "demo.json")
    assert load_or_create_keypair(tmp_path / "a" / "demo.json").pubkey() == first.pubkey()


def test_missing_or_garbled_keypair_is_a_clear_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_keypair(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2, 3]")
    with pytest.raises(ConfigError, match="not a Solana keypair file"):
        load_keypair(bad)


def test_allowlist_from_keys_and_file(tmp_path: Path) -> None:
    a, b = Keypair().pubkey(), Keypair().pubkey()
    listing = tmp_path / "allow.txt"
    listing.write_text(f"# students\n{b}  # bob\n\n")
    assert load_allowlist([str(a)], [str(listing)]) == {a, b}
    with pytest.raises(ConfigError, match="not a base58"):
        load_allowlist(["not-a-key"])


def test_challenge_signature_verifies_only_for_its_nonce_and_host() -> None:
    user, host, other_host = Keypair(), Keypair().pubkey(), Keypair().pubkey()
    nonce = new_nonce()
    sig = str(sign_challenge(user, nonce, host))
    assert verify_challenge(str(user.pubkey()), sig, nonce, host) == user.pubkey()
    with pytest.raises(AuthError):
        verify_challenge(str(user.pubkey()), sig, new_nonce(), host)
    with pytest.raises(AuthError):  # a signature cannot be relayed to another host
        verify_challenge(str(user.pubkey()), sig, nonce, other_host)
    with pytest.raises(AuthError):  # somebody else's key with this signature
        verify_challenge(str(Keypair().pubkey()), sig, nonce, host)
    with pytest.raises(AuthError, match="malformed"):
        verify_challenge("xyz", "abc", nonce, host)
