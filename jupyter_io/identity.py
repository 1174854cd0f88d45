"""Identities: Solana keypairs, and the challenge-response that proves one over the tunnel.

Every party is a Solana keypair (the Solana CLI's JSON file: an array of 64 integers).
The provider host sends a random nonce in CHALLENGE; the client signs
:func:`challenge_message` (which binds the nonce to the host's public key, so a signature
cannot be relayed to another host) and sends its public key and signature in HELLO; the host
checks it with :func:`verify_challenge` and its allow-list.

Call :func:`load_keypair` (or :func:`load_or_create_keypair` for demo keys) first.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

from solders.keypair import Keypair
from solders.pubkey import Pubkey
from solders.signature import Signature

from .errors import AuthError, ConfigError

__all__ = [
    "DEFAULT_KEYPAIR_PATH",
    "challenge_message",
    "load_allowlist",
    "load_keypair",
    "load_or_create_keypair",
    "new_nonce",
    "parse_pubkey",
    "sign_challenge",
    "verify_challenge",
    "write_keypair",
]

#: Where the Solana CLI keeps the default wallet.
DEFAULT_KEYPAIR_PATH = "~/.config/solana/id.json"

_CHALLENGE_DOMAIN = b"jupyter-io/tunnel/v1/hello\n"


def load_keypair(path: str | os.PathLike[str]) -> Keypair:
    """Read a Solana CLI keypair file. Raises :class:`ConfigError` naming the file."""
    file = Path(path).expanduser()
    try:
        raw = json.loads(file.read_text())
        return Keypair.from_bytes(bytes(raw))
    except FileNotFoundError:
        raise ConfigError(
            f"keypair file {file} does not exist; create one with `solana-keygen new` or "
            f"point keypair_path at an existing one"
        ) from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"{file} is not a Solana keypair file (a JSON array of 64 bytes): {exc}"
        ) from None


def write_keypair(keypair: Keypair, path: str | os.PathLike[str]) -> Path:
    """Write ``keypair`` in the Solana CLI format, readable by its owner only."""
    file = Path(path).expanduser()
    file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(list(bytes(keypair)), f)
    return file


def load_or_create_keypair(path: str | os.PathLike[str]) -> Keypair:
    """Load the keypair at ``path``, creating a fresh one there if the file is missing."""
    file = Path(path).expanduser()
    if not file.exists():
        keypair = Keypair()
        write_keypair(keypair, file)
        return keypair
    return load_keypair(file)


def parse_pubkey(text: str) -> Pubkey:
    """Parse a base58 public key, with an error that shows the offending text."""
    try:
        return Pubkey.from_string(text.strip())
    except ValueError:
        raise ConfigError(f"{text!r} is not a base58 Solana public key") from None


def load_allowlist(keys: Iterable[str] = (), files: Iterable[str] = ()) -> frozenset[Pubkey]:
    """Public keys from ``keys`` plus files of one base58 key per line (``#`` comments)."""
    allowed = {parse_pubkey(k) for k in keys}
    for name in files:
        path = Path(name).expanduser()
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"cannot read allow-list file {path}: {exc}") from None
        for line in lines:
            line = line.split("#", 1)[0].strip()
            if line:
                allowed.add(parse_pubkey(line))
    return frozenset(allowed)


def new_nonce() -> bytes:
    """A fresh 32-byte challenge nonce."""
    return secrets.token_bytes(32)


def challenge_message(nonce: bytes, host: Pubkey) -> bytes:
    """The exact bytes a client signs to answer ``nonce`` from ``host``."""
    return _CHALLENGE_DOMAIN + bytes(host) + nonce


def sign_challenge(keypair: Keypair, nonce: bytes, host: Pubkey) -> Signature:
    """Answer a host's challenge with ``keypair``."""
    return keypair.sign_message(challenge_message(nonce, host))


def verify_challenge(pubkey: str, signature: str, nonce: bytes, host: Pubkey) -> Pubkey:
    """Check a HELLO's key and signature; return the proven key or raise :class:`AuthError`."""
    try:
        key = Pubkey.from_string(pubkey)
        sig = Signature.from_string(signature)
    except (ValueError, TypeError):
        raise AuthError("HELLO carries a malformed public key or signature") from None
    if not sig.verify(key, challenge_message(nonce, host)):
        raise AuthError(f"signature does not prove ownership of {key}")
    return key
