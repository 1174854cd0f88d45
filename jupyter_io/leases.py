"""Signed lease tokens: the coordinator's word that a user may use a provider's GPUs.

The coordinator signs :class:`LeaseClaims` with its Ed25519 (Solana) keypair
(:func:`issue_token`); the client hands the token to the provider host, which checks it with
:func:`verify_token` against the coordinator it registered with, the user the tunnel's HELLO
proved, and its own key, then binds the lease to one tunnel session with a :class:`LeaseBook`
so the token cannot be replayed into a second session. :meth:`LeaseBook.admit` does both.

A token is two ASCII parts joined by a dot::

    base64url(canonical JSON of the claims, no padding) "." base58(Ed25519 signature)

The signature covers :data:`TOKEN_DOMAIN` followed by the JSON bytes. The domain prefix keeps
a lease signature from ever being mistaken for another signature made with a Solana key
(the tunnel's HELLO signs ``b"jupyter-io/tunnel/v1/hello\\n"`` + ...; a Solana transaction
starts with a signature count), so no other signed message can be passed off as a token.
Canonical JSON (sorted keys, no spaces, ASCII) gives one token per set of claims.

Times are Unix seconds from the caller (``now=``); nothing here reads a clock.
"""

from __future__ import annotations

import base64
import binascii
import heapq
import json
import re
import sys
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from typing import Any

from solders.keypair import Keypair
from solders.pubkey import Pubkey
from solders.signature import Signature

from .errors import AuthError

__all__ = [
    "CLOCK_SKEW_S",
    "MAX_TOKEN_LENGTH",
    "TOKEN_DOMAIN",
    "TOKEN_VERSION",
    "LeaseBook",
    "LeaseClaims",
    "issue_token",
    "token_message",
    "verify_token",
]

#: Version of the claims layout, carried in every token as ``"v"``.
TOKEN_VERSION = 1
#: Prefix of every signed lease message (domain separation, see the module docstring).
TOKEN_DOMAIN = b"jupyter-io/lease-token/v1\n"
#: Longest token accepted; real ones are well under 1 KiB. Bounds work on hostile input.
MAX_TOKEN_LENGTH = 4096
#: How far in the future ``issued_at`` may be before a token is refused: clocks differ.
CLOCK_SKEW_S = 60.0
_MAX_FLOAT = sys.float_info.max
#: Claims a token may leave out (absent means None); the rest must all be there.
_OPTIONAL = frozenset({"env", "cohort", "cohort_instructor"})
_MAX_COHORT_ID = 64
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class LeaseClaims:
    """What a lease token says: who may use which GPUs of which provider, at what price, until
    when, and which coordinator says so.

    ``gpu_indices`` are the provider's device indices (``CUDA_VISIBLE_DEVICES``) assigned to the
    lease; ``relay`` says the data path goes through the coordinator's relay. Times are Unix
    seconds. Build one, then :func:`issue_token`.
    """

    lease_id: str
    user: Pubkey
    provider: Pubkey
    gpu: str
    gpu_indices: tuple[int, ...]
    price_lamports_per_hour: int
    issued_at: float
    expires_at: float
    coordinator: Pubkey
    relay: bool = False
    #: The course environment the lease's kernels run in: the sha256 (64 lowercase hex) of
    #: its requirements text, which the provider fetches over its link and builds once
    #: (``provider_host.environments``). None: the provider's own Python. Left out of the
    #: JSON when None, so a token without one reads as it did before the claim existed.
    env: str | None = None
    #: A cohort lease (paid from the student's allowance, ``jupyter_io.payments.cohort_pool``):
    #: the cohort id and the instructor who owns the allowance, both or neither. The provider
    #: derives the allowance from them (with the user and the coordinator) to check that a
    #: settlement returns the unspent deposit there. Left out of the JSON when None.
    cohort: str | None = None
    cohort_instructor: Pubkey | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.lease_id, str) or not self.lease_id:
            raise ValueError("lease_id must be a non-empty string")
        for name in ("user", "provider", "coordinator"):
            if not isinstance(getattr(self, name), Pubkey):
                raise TypeError(f"{name} must be a solders Pubkey")
        if not isinstance(self.gpu, str) or not self.gpu:
            raise ValueError("gpu must name the leased GPU model")
        if not isinstance(self.gpu_indices, tuple) or not all(
            type(i) is int and i >= 0 for i in self.gpu_indices
        ):
            raise ValueError("gpu_indices must be a tuple of non-negative device indices")
        if len(set(self.gpu_indices)) != len(self.gpu_indices):
            raise ValueError("gpu_indices must not repeat a device")
        if type(self.price_lamports_per_hour) is not int or self.price_lamports_per_hour < 0:
            raise ValueError("price_lamports_per_hour must be a non-negative int of lamports")
        for name in ("issued_at", "expires_at"):
            value = getattr(self, name)
            # Compared, not math.isfinite(): an int beyond a float's range overflows that.
            if type(value) not in (int, float) or not -_MAX_FLOAT <= value <= _MAX_FLOAT:
                raise ValueError(f"{name} must be finite Unix seconds")
        if self.expires_at <= self.issued_at:
            raise ValueError("expires_at must be after issued_at")
        if type(self.relay) is not bool:
            raise ValueError("relay must be a bool")
        if self.env is not None and (
            not isinstance(self.env, str) or _SHA256_HEX.fullmatch(self.env) is None
        ):
            raise ValueError("env must be the sha256 of the requirements text, 64 lowercase hex")
        if (self.cohort is None) != (self.cohort_instructor is None):
            raise ValueError("cohort and cohort_instructor go together: both or neither")
        if self.cohort is not None and (
            not isinstance(self.cohort, str) or not 0 < len(self.cohort) <= _MAX_COHORT_ID
        ):
            raise ValueError(f"cohort must be a cohort id of 1 to {_MAX_COHORT_ID} characters")
        if self.cohort_instructor is not None and not isinstance(self.cohort_instructor, Pubkey):
            raise TypeError("cohort_instructor must be a solders Pubkey")

    def to_json(self) -> bytes:
        """The canonical JSON bytes a token carries (and the coordinator signs)."""
        body: dict[str, Any] = {"v": TOKEN_VERSION}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name in _OPTIONAL:
                continue
            if isinstance(value, Pubkey):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            body[f.name] = value
        return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()

    @classmethod
    def from_json(cls, payload: bytes) -> LeaseClaims:
        """Parse claims from a token's JSON; :class:`AuthError` ("malformed") if they are not."""
        try:
            body = json.loads(payload)
        except ValueError:  # also UnicodeDecodeError, and integers of over 4300 digits
            raise _malformed("the claims are not JSON") from None
        except RecursionError:
            raise _malformed("the claims nest too deeply") from None
        if not isinstance(body, dict):
            raise _malformed("the claims are not a JSON object")
        if body.get("v") != TOKEN_VERSION:
            raise _malformed(f"claims version {body.get('v')!r}, expected {TOKEN_VERSION}")
        names = {f.name for f in fields(cls)}
        if not names - _OPTIONAL <= set(body) - {"v"} <= names:
            missing = sorted(names - _OPTIONAL - set(body))
            extra = sorted(set(body) - names - {"v"})
            raise _malformed(f"claims missing {missing} or unexpected {extra}")
        try:
            values = dict(body)
            del values["v"]
            for name in ("user", "provider", "coordinator"):
                if not isinstance(values[name], str):
                    raise TypeError(name)
                values[name] = Pubkey.from_string(values[name])
            if not isinstance(values["gpu_indices"], list):
                raise TypeError("gpu_indices")
            values["gpu_indices"] = tuple(values["gpu_indices"])
            if values.get("cohort_instructor") is not None:
                if not isinstance(values["cohort_instructor"], str):
                    raise TypeError("cohort_instructor")
                values["cohort_instructor"] = Pubkey.from_string(values["cohort_instructor"])
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise _malformed(f"invalid claim: {exc}") from None


def _malformed(why: str) -> AuthError:
    return AuthError(f"lease token is malformed ({why}); request a new lease from the coordinator")


def token_message(payload: bytes) -> bytes:
    """The exact bytes the coordinator signs for a token whose claims JSON is ``payload``."""
    return TOKEN_DOMAIN + payload


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def issue_token(keypair: Keypair, claims: LeaseClaims) -> str:
    """Sign ``claims`` as the coordinator whose keypair this is; return the compact token.

    Raises :class:`ValueError` if ``claims.coordinator`` is not ``keypair``'s public key (a
    token must name the key that signed it), or if the token would be longer than
    :data:`MAX_TOKEN_LENGTH`. Hand the token to the client, which presents it
    to the provider host; the host calls :func:`verify_token` or :meth:`LeaseBook.admit`.
    """
    if claims.coordinator != keypair.pubkey():
        raise ValueError(
            f"claims name coordinator {claims.coordinator}, but the signing key is "
            f"{keypair.pubkey()}"
        )
    payload = claims.to_json()
    signature = keypair.sign_message(token_message(payload))
    token = f"{_b64encode(payload)}.{signature}"
    if len(token) > MAX_TOKEN_LENGTH:  # verify_token would refuse it: fail here, loudly
        raise ValueError(
            f"these claims make a token of {len(token)} characters, more than the "
            f"{MAX_TOKEN_LENGTH} a provider accepts; shorten the lease id or GPU name"
        )
    return token


def _parse(token: str) -> tuple[bytes, Signature, LeaseClaims]:
    if not isinstance(token, str):
        raise _malformed("not a string")
    if len(token) > MAX_TOKEN_LENGTH:
        raise _malformed(f"{len(token)} characters, more than {MAX_TOKEN_LENGTH}")
    parts = token.split(".")
    if len(parts) != 2 or not all(parts):
        raise _malformed("expected two dot-separated parts: claims.signature")
    text, signature_text = parts
    try:
        payload = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise _malformed("the claims part is not base64url") from None
    if _b64encode(payload) != text:  # one encoding per payload: no malleable spellings
        raise _malformed("the claims part is not canonical base64url")
    try:
        signature = Signature.from_string(signature_text)
    except ValueError:
        raise _malformed("the signature part is not a base58 Ed25519 signature") from None
    claims = LeaseClaims.from_json(payload)
    if claims.to_json() != payload:
        raise _malformed("the claims are not in canonical JSON form")
    return payload, signature, claims


def _when(seconds: float) -> str:
    try:
        return datetime.fromtimestamp(seconds, tz=timezone.utc).isoformat(timespec="seconds")
    except (OverflowError, ValueError, OSError):  # beyond the years datetime can show
        return f"{seconds} Unix seconds"


def verify_token(
    token: str, *, coordinator: Pubkey, user: Pubkey, provider: Pubkey, now: float
) -> LeaseClaims:
    """Check a lease token and return its claims, or raise :class:`AuthError` saying why.

    ``coordinator`` is the key this provider trusts (the coordinator it registered with),
    ``user`` the key the client proved in HELLO, ``provider`` this host's own key, ``now`` the
    current Unix time. Refused, each with its own message: malformed tokens; bad signatures
    (forged or altered tokens); tokens signed by another coordinator; expired tokens (and ones
    issued more than :data:`CLOCK_SKEW_S` in the future); tokens issued to another user or
    for another provider. Next: :meth:`LeaseBook.bind` the lease to the tunnel session.
    """
    payload, signature, claims = _parse(token)
    message = token_message(payload)
    if not signature.verify(coordinator, message):
        if claims.coordinator != coordinator and signature.verify(claims.coordinator, message):
            raise AuthError(
                f"lease {claims.lease_id} was signed by coordinator {claims.coordinator}, but "
                f"this provider trusts coordinator {coordinator}; lease through the "
                f"coordinator this provider is registered with"
            )
        raise AuthError(
            f"lease token signature is not valid for coordinator {coordinator}: the token was "
            f"forged or altered; refusing it"
        )
    if claims.coordinator != coordinator:
        raise AuthError(
            f"lease {claims.lease_id} names coordinator {claims.coordinator} but was signed by "
            f"{coordinator}; refusing an inconsistent token"
        )
    if claims.issued_at > now + CLOCK_SKEW_S:
        raise AuthError(
            f"lease {claims.lease_id} is issued {claims.issued_at - now:.0f} s in the future "
            f"({_when(claims.issued_at)}); check the clocks of the coordinator and this host"
        )
    if now >= claims.expires_at:
        raise AuthError(
            f"lease {claims.lease_id} expired {now - claims.expires_at:.0f} s ago (at "
            f"{_when(claims.expires_at)}); request a new lease"
        )
    if claims.user != user:
        raise AuthError(
            f"lease {claims.lease_id} was issued to user {claims.user}, not to {user} who is "
            f"connecting; a lease can only be used by the user it was issued to"
        )
    if claims.provider != provider:
        raise AuthError(
            f"lease {claims.lease_id} is for provider {claims.provider}, not this provider "
            f"({provider}); connect to the provider the lease names"
        )
    return claims


@dataclass(slots=True)
class _Binding:
    session: str
    user: Pubkey
    expires_at: float
    ended: bool = False


class LeaseBook:
    """The provider host's replay guard: each lease attaches to one tunnel session only.

    The first session that presents a lease owns it; the same session may come back with it
    (a reconnect, or a refreshed token for the same lease with a later expiry), any other
    session is refused. After :meth:`end` even the owner is refused. An entry is forgotten
    once its token has expired, when :func:`verify_token` refuses the token anyway, so the
    book holds only live leases. In memory: a host restart forgets it, as it does its kernels.
    """

    def __init__(self) -> None:
        self._bindings: dict[str, _Binding] = {}
        self._expiries: list[tuple[float, str]] = []  # heap; stale entries skipped on pop

    def __len__(self) -> int:
        return len(self._bindings)

    def session_of(self, lease_id: str) -> str | None:
        """The session a lease is attached to, or None."""
        binding = self._bindings.get(lease_id)
        return binding.session if binding is not None else None

    def admit(
        self,
        token: str,
        session: str,
        *,
        coordinator: Pubkey,
        user: Pubkey,
        provider: Pubkey,
        now: float,
    ) -> LeaseClaims:
        """:func:`verify_token`, then :meth:`bind` to ``session``: the host's one call per HELLO.

        Call it when HELLO carries a token, with the session id the host assigned (a new
        session) or the one HELLO resumes; raises :class:`AuthError` on any refusal.
        """
        claims = verify_token(token, coordinator=coordinator, user=user, provider=provider, now=now)
        self.bind(claims, session, now=now)
        return claims

    def bind(self, claims: LeaseClaims, session: str, *, now: float) -> None:
        """Attach the lease in ``claims`` (already verified) to ``session``.

        Raises :class:`AuthError` if the lease is attached to another session, belongs to
        another user, has ended, or has expired.
        """
        self.prune(now)
        if now >= claims.expires_at:
            raise AuthError(f"lease {claims.lease_id} has expired; request a new lease")
        binding = self._bindings.get(claims.lease_id)
        if binding is None:
            self._bindings[claims.lease_id] = _Binding(session, claims.user, claims.expires_at)
            heapq.heappush(self._expiries, (claims.expires_at, claims.lease_id))
            return
        if binding.ended:
            raise AuthError(f"lease {claims.lease_id} has ended; request a new lease")
        if binding.user != claims.user:
            raise AuthError(f"lease {claims.lease_id} belongs to another user; refusing it")
        if binding.session != session:
            raise AuthError(
                f"lease {claims.lease_id} is already attached to another session; a lease "
                f"serves one session only (tokens cannot be replayed), so request a new lease"
            )
        if claims.expires_at > binding.expires_at:  # a refreshed token for the same lease
            binding.expires_at = claims.expires_at
            heapq.heappush(self._expiries, (claims.expires_at, claims.lease_id))

    def end(self, lease_id: str) -> None:
        """Mark a lease over (the session ended or the lease was settled): refuse it from now
        on, until its token expires and the entry is forgotten."""
        binding = self._bindings.get(lease_id)
        if binding is not None:
            binding.ended = True

    def prune(self, now: float) -> int:
        """Forget leases whose tokens have expired; return how many. :meth:`bind` calls it."""
        removed = 0
        heap = self._expiries
        while heap and heap[0][0] <= now:
            expires_at, lease_id = heapq.heappop(heap)
            binding = self._bindings.get(lease_id)
            if binding is not None and binding.expires_at == expires_at:
                del self._bindings[lease_id]
                removed += 1
        return removed
