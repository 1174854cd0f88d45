"""Signatures between the coordinator and its clients and providers: signed REST requests, the
provider link's hello and welcome, and providers' usage reports. A contract both sides import
(the coordinator verifies, users and provider hosts sign), like :mod:`jupyter_io.protocol`:
pure functions on stdlib and solders; nothing here does I/O or reads a clock unless told.

Every signed message starts with its own domain prefix, so a signature made for one purpose
can never be passed off as another (nor as a lease token, a tunnel HELLO or a Solana
transaction, which carry prefixes of their own):

* **requests** (``docs/coordinator-contract.md`` section 2): the client calls
  :func:`sign_request` and sends the three headers it returns; the coordinator calls
  :func:`verify_request` (and, for requests that change something, a :class:`ReplayGuard`);
* **provider hello** (section 1): the provider answers the coordinator's challenge with
  :func:`sign_provider_hello`; the coordinator checks it with :func:`verify_provider_hello`;
* **usage reports** (section 1, item 5): the provider signs with :func:`sign_usage`; the
  coordinator checks with :func:`verify_usage`.

Each check raises :class:`~jupyter_io.errors.AuthError` with a message that says what to fix.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from solders.keypair import Keypair
from solders.pubkey import Pubkey
from solders.signature import Signature

from .errors import AuthError

__all__ = [
    "API_DOMAIN",
    "HEADER_LEASE_TOKEN",
    "HEADER_PUBKEY",
    "HEADER_SIGNATURE",
    "HEADER_TIMESTAMP",
    "MAX_SKEW_S",
    "PROVIDER_DOMAIN",
    "USAGE_DOMAIN",
    "WELCOME_DOMAIN",
    "ReplayGuard",
    "SignedRequest",
    "canonical_json",
    "provider_hello_message",
    "request_message",
    "sign_provider_hello",
    "sign_request",
    "sign_usage",
    "sign_welcome",
    "usage_message",
    "verify_provider_hello",
    "verify_request",
    "verify_usage",
    "verify_welcome",
    "welcome_message",
]

#: Prefix of every signed REST request.
API_DOMAIN = b"jupyter-io/api/v1\n"
#: Prefix of the provider's answer to the provider-link challenge.
PROVIDER_DOMAIN = b"jupyter-io/coordinator/v1/provider\n"
#: Prefix of the coordinator's signature in the link's welcome (it proves its key too).
WELCOME_DOMAIN = b"jupyter-io/coordinator/v1/welcome\n"
#: Prefix of every signed usage report.
USAGE_DOMAIN = b"jupyter-io/usage/v1\n"

HEADER_PUBKEY = "X-JIO-Pubkey"
HEADER_TIMESTAMP = "X-JIO-Timestamp"
HEADER_SIGNATURE = "X-JIO-Signature"
#: The relay's client side carries the lease token in this header.
HEADER_LEASE_TOKEN = "X-JIO-Lease-Token"

#: How far a request's timestamp may be from the coordinator's clock, either way.
MAX_SKEW_S = 60.0

_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


# --------------------------------------------------------------------------------------------
# Signed requests


def request_message(method: str, path: str, timestamp: str, body: bytes = b"") -> bytes:
    """The bytes a signed request's signature covers.

    ``path`` is the request path with its query string, exactly as sent (``/api/v1/leases``,
    ``/relay/LEASE?side=provider&conn=1``); ``timestamp`` the ``X-JIO-Timestamp`` header text.
    """
    digest = hashlib.sha256(body).hexdigest() if body else _EMPTY_SHA256
    return API_DOMAIN + f"{method.upper()}\n{path}\n{timestamp}\n{digest}".encode()


def sign_request(
    keypair: Keypair, method: str, path: str, body: bytes = b"", *, now: float | None = None
) -> dict[str, str]:
    """The three headers that sign a request as ``keypair`` (``now`` defaults to the clock).

    The timestamp carries microseconds, so two identical requests a moment apart still get
    different signatures (the coordinator refuses a replayed POST).
    """
    timestamp = f"{time.time() if now is None else now:.6f}"
    signature = keypair.sign_message(request_message(method, path, timestamp, body))
    return {
        HEADER_PUBKEY: str(keypair.pubkey()),
        HEADER_TIMESTAMP: timestamp,
        HEADER_SIGNATURE: str(signature),
    }


@dataclass(frozen=True, slots=True)
class SignedRequest:
    """Who signed a request (:func:`verify_request`'s answer)."""

    pubkey: Pubkey
    timestamp: float
    signature: str


def verify_request(
    headers: Mapping[str, str],
    method: str,
    path: str,
    body: bytes,
    *,
    now: float,
    max_skew: float = MAX_SKEW_S,
) -> SignedRequest:
    """Check a request's signature headers; return the key that signed it.

    Raises :class:`AuthError` when a header is missing or malformed, the timestamp is more
    than ``max_skew`` seconds from ``now``, or the signature does not cover this method,
    path, timestamp and body with that key. Next, for a request that changes state:
    :meth:`ReplayGuard.check`.
    """
    pubkey_text = headers.get(HEADER_PUBKEY)
    timestamp = headers.get(HEADER_TIMESTAMP)
    signature_text = headers.get(HEADER_SIGNATURE)
    if not pubkey_text or not timestamp or not signature_text:
        raise AuthError(
            f"this request must be signed: send {HEADER_PUBKEY}, {HEADER_TIMESTAMP} and "
            f"{HEADER_SIGNATURE} (jupyter_io.signing.sign_request makes them)"
        )
    try:
        pubkey = Pubkey.from_string(pubkey_text)
        signature = Signature.from_string(signature_text)
    except ValueError:
        raise AuthError(
            f"{HEADER_PUBKEY} or {HEADER_SIGNATURE} is not valid base58 (a Solana public key, "
            f"an Ed25519 signature)"
        ) from None
    try:
        when = float(timestamp)
    except ValueError:
        when = math.nan
    if not math.isfinite(when):
        raise AuthError(f"{HEADER_TIMESTAMP} {timestamp[:40]!r} is not Unix seconds")
    if abs(now - when) > max_skew:
        raise AuthError(
            f"request timestamp is {now - when:+.0f} s off the coordinator's clock (more than "
            f"{max_skew:.0f} s): sign each request when sending it, and check this machine's "
            f"clock"
        )
    if not signature.verify(pubkey, request_message(method, path, timestamp, body)):
        raise AuthError(
            f"request signature is not valid for {pubkey}: it must sign METHOD, the path with "
            f"query, {HEADER_TIMESTAMP} and sha256(body) exactly as sent"
        )
    return SignedRequest(pubkey, when, signature_text)


class ReplayGuard:
    """Refuses a signed request seen before: a captured POST cannot be sent twice.

    Signatures are remembered for ``2 * max_skew`` seconds, after which
    :func:`verify_request` refuses their timestamps anyway, so memory stays bounded by the
    request rate. In-memory, one per coordinator process.
    """

    def __init__(self, max_skew: float = MAX_SKEW_S) -> None:
        self._window = 2 * max_skew
        self._seen: set[str] = set()
        self._order: deque[tuple[float, str]] = deque()

    def __len__(self) -> int:
        return len(self._seen)

    def check(self, request: SignedRequest, *, now: float) -> None:
        """Remember ``request``; raise :class:`AuthError` if it was seen before."""
        order = self._order
        while order and order[0][0] <= now - self._window:
            self._seen.discard(order.popleft()[1])
        if request.signature in self._seen:
            raise AuthError("this signed request was already used; sign each request afresh")
        self._seen.add(request.signature)
        order.append((now, request.signature))


# --------------------------------------------------------------------------------------------
# The provider link's hello


def provider_hello_message(coordinator: Pubkey, nonce: bytes) -> bytes:
    """The bytes a provider signs to answer ``nonce`` from ``coordinator``."""
    return PROVIDER_DOMAIN + bytes(coordinator) + nonce


def sign_provider_hello(keypair: Keypair, coordinator: Pubkey, nonce: bytes) -> str:
    """The hello's ``signature`` (base58) answering the coordinator's challenge."""
    return str(keypair.sign_message(provider_hello_message(coordinator, nonce)))


def verify_provider_hello(pubkey: str, signature: str, coordinator: Pubkey, nonce: bytes) -> Pubkey:
    """Check a hello's key and signature against the challenge; return the proven key."""
    try:
        key = Pubkey.from_string(pubkey)
        sig = Signature.from_string(signature)
    except (ValueError, TypeError):
        raise AuthError("hello carries a malformed public key or signature") from None
    if not sig.verify(key, provider_hello_message(coordinator, nonce)):
        raise AuthError(
            f"hello signature does not prove ownership of {key}: sign "
            f"b'jupyter-io/coordinator/v1/provider\\n' + coordinator key + nonce"
        )
    return key


def welcome_message(provider: Pubkey, nonce: bytes) -> bytes:
    """The bytes the coordinator signs to answer the provider's own ``nonce`` (mutual auth)."""
    return WELCOME_DOMAIN + bytes(provider) + nonce


def sign_welcome(keypair: Keypair, provider: Pubkey, nonce: bytes) -> str:
    """The welcome's ``signature`` (base58): the coordinator proves it holds its key."""
    return str(keypair.sign_message(welcome_message(provider, nonce)))


def verify_welcome(
    coordinator: Pubkey, signature: str | None, provider: Pubkey, nonce: bytes
) -> None:
    """Check that the welcome was signed by ``coordinator`` for this provider and nonce.

    Without it a provider would trust whoever answers on the coordinator's URL with the
    coordinator's *public* key, and obey its ``end`` and ``dial`` messages.
    """
    try:
        sig = Signature.from_string(signature or "")
    except (ValueError, TypeError):
        raise AuthError("the welcome carries no valid coordinator signature") from None
    if not sig.verify(coordinator, welcome_message(provider, nonce)):
        raise AuthError(f"the welcome is not signed by coordinator {coordinator}")


# --------------------------------------------------------------------------------------------
# Usage reports


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no spaces, ASCII: one byte string per value (what signatures cover)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def usage_message(fields: Mapping[str, Any]) -> bytes:
    """The bytes a usage report's signature covers: every field but ``signature``."""
    return USAGE_DOMAIN + canonical_json({k: v for k, v in fields.items() if k != "signature"})


def sign_usage(keypair: Keypair, fields: Mapping[str, Any]) -> dict[str, Any]:
    """``fields`` (``type``, ``lease``, ``seq``, ``seconds``, ``gpu_utilisation``, ``at``)
    plus their ``signature``: the usage message to send."""
    unsigned = {k: v for k, v in fields.items() if k != "signature"}
    return {**unsigned, "signature": str(keypair.sign_message(usage_message(unsigned)))}


def verify_usage(provider: Pubkey, fields: Mapping[str, Any]) -> None:
    """Check that ``provider`` signed the usage report ``fields`` (as received)."""
    signature_text = fields.get("signature")
    try:
        signature = Signature.from_string(str(signature_text))
    except ValueError:
        raise AuthError("usage report signature is not a base58 Ed25519 signature") from None
    if not signature.verify(provider, usage_message(fields)):
        raise AuthError(
            f"usage report for lease {fields.get('lease')!r} is not signed by provider "
            f"{provider}; it was not stored"
        )
