"""Identities: Solana keypairs, and the challenge-response that proves one over the tunnel.

Every party is a Solana keypair (the Solana CLI's JSON file: an array of 64 integers).
The provider host sends a random nonce in CHALLENGE; the client signs
:func:`challenge_message` (which binds the nonce to the host's public key, so a signature
cannot be relayed to another host) and sends its public key and signature in HELLO; the host
checks it with :func:`verify_challenge` and its allow-list.

Call :func:`load_keypair` (or :func:`load_or_create_keypair` for demo and host keys) first;
:func:`create_keypair_file` makes a new one without ever overwriting (``jupyter io keygen``).
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
    "KeypairExists",
    "challenge_message",
    "create_keypair_file",
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


class KeypairExists(ConfigError):
    """:func:`create_keypair_file` found a file where it was to write: nothing was written."""


def load_keypair(path: str | os.PathLike[str], *, option: str = "--keypair") -> Keypair:
    """Read a Solana CLI keypair file. Raises :class:`ConfigError` naming the file and, for
    a missing one, how to make it and ``option`` (how the caller's user names the file)."""
    file = Path(path).expanduser()
    try:
        raw = json.loads(file.read_text())
        return Keypair.from_bytes(bytes(raw))
    except FileNotFoundError:
        raise ConfigError(
            f"keypair file {file} does not exist; create it with `jupyter io keygen {file}` "
            f"(or `solana-keygen new -o {file}`), or pass {option} with an existing one"
        ) from None
    except IsADirectoryError:
        raise ConfigError(
            f"{file} is a directory, not a keypair file; pass {option} with a keypair file"
        ) from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"{file} is not a Solana keypair file (a JSON array of 64 bytes): {exc}"
        ) from None


def write_keypair(keypair: Keypair, path: str | os.PathLike[str]) -> Path:
    """Write ``keypair`` in the Solana CLI format (a JSON array of its 64 bytes), readable by
    its owner only (0600; missing parent directories are created 0700). Overwrites."""
    file = Path(path).expanduser()
    _private_dirs(file.parent)
    fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(list(bytes(keypair)), f)
    return file


def create_keypair_file(path: str | os.PathLike[str]) -> tuple[Keypair, Path]:
    """Write a fresh keypair to ``path`` in the Solana CLI format, as :func:`write_keypair`,
    but never over an existing file (checked atomically: ``O_EXCL``). Returns the keypair and
    the file. Raises :class:`KeypairExists` when something is there already, and
    :class:`ConfigError` when the file cannot be written."""
    file = Path(path).expanduser()
    keypair = Keypair()
    try:
        _private_dirs(file.parent)
        fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeypairExists(
            f"{file} exists already; it was left as it is (a keypair file is an identity and "
            f"may hold funds): pick another path, or delete it yourself first"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot create keypair file {file}: {exc.strerror}") from None
    with os.fdopen(fd, "w") as f:
        json.dump(list(bytes(keypair)), f)
    return keypair, file


def _private_dirs(directory: Path) -> None:
    """Create ``directory`` and its missing parents 0700 (``mkdir(parents=True)`` would give
    the parents the default mode); existing ones are left as they are."""
    missing = []
    while not directory.exists() and directory != directory.parent:
        missing.append(directory)
        directory = directory.parent
    for each in reversed(missing):
        each.mkdir(mode=0o700, exist_ok=True)


def load_or_create_keypair(path: str | os.PathLike[str]) -> Keypair:
    """Load the keypair at ``path``, creating a fresh one there if the file is missing."""
    file = Path(path).expanduser()
    if not file.exists():
        try:
            return create_keypair_file(file)[0]
        except KeypairExists:  # made meanwhile by another process: use that one
            pass
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
