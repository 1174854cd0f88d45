"""The host's side of the tunnel handshake, as a pure decision over a HELLO.

The server sends CHALLENGE, reads one HELLO frame and calls :func:`check_hello`; it either
returns the proven :class:`Hello` or raises :class:`Refusal` carrying the ERROR code and the
websocket close code of ``docs/tunnel-contract.md``. Checks run in the contract's order
(version, signature and allow-list, unknown session, session owner, capacity), all before the
server creates any workspace or kernel; with a coordinator, the lease token is checked after
these (:mod:`provider_host.lease_gate`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from solders.pubkey import Pubkey

from jupyter_io.errors import AuthError, ProtocolError
from jupyter_io.identity import verify_challenge
from jupyter_io.protocol import PROTOCOL_VERSION, CloseCode

__all__ = ["TRY_AGAIN_LATER", "Hello", "Refusal", "challenge_body", "check_hello"]

#: RFC 6455 close code for "try again later" (the tunnel's ``capacity`` refusal).
TRY_AGAIN_LATER = 1013


@dataclass(frozen=True, slots=True)
class Hello:
    """A HELLO whose signature and key checked out."""

    pubkey: Pubkey
    session: str | None
    """Session id to resume, or None for a new session."""
    received: int
    """Highest host frame the client received in that session (0 when new)."""
    token: Any = None


class Refusal(Exception):
    """The handshake fails: send ERROR ``{code, reason}`` then close with ``close_code``."""

    def __init__(self, code: str, close_code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.close_code = close_code
        self.reason = reason


def challenge_body(nonce: bytes, host: Pubkey) -> dict[str, Any]:
    """The CHALLENGE frame's body."""
    return {"version": PROTOCOL_VERSION, "nonce": nonce.hex(), "host": str(host)}


def check_hello(
    body: Mapping[str, Any],
    *,
    nonce: bytes,
    host: Pubkey,
    allowed: Collection[Pubkey] | None,
    session_owner: Callable[[str], Pubkey | None],
    has_capacity: Callable[[], bool],
) -> Hello:
    """Decide on a HELLO ``body``.

    ``allowed`` is the allow-list, or None when a lease token decides instead (a host with a
    coordinator: :mod:`provider_host.lease_gate` checks the token next).
    ``session_owner(id)`` returns the owner of a live session or None; ``has_capacity()``
    says whether a new session may start. Raises :class:`ProtocolError` for a malformed HELLO
    (close 1002, no ERROR frame) and :class:`Refusal` for a well-formed one that is refused.
    """
    if body.get("version") != PROTOCOL_VERSION:
        raise Refusal(
            "version_mismatch",
            CloseCode.VERSION_MISMATCH,
            f"this host speaks tunnel protocol version {PROTOCOL_VERSION}, the client "
            f"{body.get('version')!r}; upgrade the older side",
        )
    try:
        key = verify_challenge(body.get("pubkey"), body.get("signature"), nonce, host)  # type: ignore[arg-type]
    except AuthError as exc:
        raise Refusal("auth", CloseCode.POLICY_VIOLATION, str(exc)) from None
    if allowed is not None and key not in allowed:
        raise Refusal(
            "auth",
            CloseCode.POLICY_VIOLATION,
            f"{key} is not on this host's allow-list; ask the provider to add it (--allow)",
        )
    session = body.get("session")
    received = body.get("received", 0)
    if session is not None and not isinstance(session, str):
        raise ProtocolError("HELLO session must be null or a session id string")
    if not isinstance(received, int) or isinstance(received, bool) or received < 0:
        raise ProtocolError("HELLO received must be a non-negative integer")
    if session is not None:
        owner = session_owner(session)
        if owner is None:
            raise Refusal(
                "unknown_session",
                CloseCode.UNKNOWN_SESSION,
                "this host has no such session (it ended or the host restarted); its kernel "
                "is gone",
            )
        if owner != key:
            raise Refusal("auth", CloseCode.POLICY_VIOLATION, "that session belongs to another key")
        return Hello(key, session, received, body.get("token"))
    if not has_capacity():
        raise Refusal(
            "capacity", TRY_AGAIN_LATER, "this host has no free kernel slot or GPU; try again later"
        )
    return Hello(key, None, 0, body.get("token"))
