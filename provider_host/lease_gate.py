"""The host's check of lease tokens: who may open (or resume) a session when a coordinator
decides who rents this host.

With a coordinator configured, every HELLO must carry the lease token the coordinator signed
(``docs/coordinator-contract.md`` section 4). The server runs :func:`~provider_host.handshake.
check_hello` first (version, signature, session owner, capacity), then

* for a new session, :meth:`LeaseGate.check_new` (token valid for this user and this host,
  signed by the pinned coordinator, lease not ended, lease not attached to another session),
  creates the session, and :meth:`LeaseGate.bind` attaches the lease to it;
* for a resume, :meth:`LeaseGate.check_resume` (the same checks, and the token must be for
  the lease the session already serves).

Refusals are :class:`~provider_host.handshake.Refusal`\\ s: ``auth`` (close 1008) for forged,
altered, expired, another user's or another coordinator's tokens, a missing token, and ended
leases; ``lease_in_use`` (close 1008) for a token replayed into a second session. All of them
come before any workspace or kernel exists. The replay guard is a
:class:`jupyter_io.leases.LeaseBook`, in memory like the sessions it guards.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Collection

from solders.pubkey import Pubkey

from jupyter_io.errors import AuthError
from jupyter_io.leases import LeaseBook, LeaseClaims, verify_token
from jupyter_io.protocol import CloseCode

from .handshake import TRY_AGAIN_LATER, Refusal

__all__ = ["CODE_LEASE_IN_USE", "MAX_ENDED_REMEMBERED", "LeaseGate"]

#: ERROR code for a lease already attached to another session.
CODE_LEASE_IN_USE = "lease_in_use"
#: Ended leases remembered (refused even before their first session), oldest forgotten first.
MAX_ENDED_REMEMBERED = 10_000


def _auth(reason: str) -> Refusal:
    return Refusal("auth", CloseCode.POLICY_VIOLATION, reason)


class LeaseGate:
    """Admits lease tokens into sessions (see the module docstring).

    ``provider`` is this host's key; ``coordinator`` the pinned coordinator key, if known yet
    (:meth:`pin` sets it once the provider link has seen the coordinator); ``devices`` the
    indices this host offers (a token naming others is refused).
    """

    def __init__(
        self,
        provider: Pubkey,
        *,
        coordinator: Pubkey | None = None,
        devices: Collection[int] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.provider = provider
        self.coordinator = coordinator
        self.devices = frozenset(devices)
        self.book = LeaseBook()
        self._clock = clock
        self._ended: OrderedDict[str, None] = OrderedDict()

    def pin(self, coordinator: Pubkey) -> None:
        """Trust ``coordinator``'s signature from now on (the link checked it is the one)."""
        self.coordinator = coordinator

    def check_new(
        self, token: object, *, user: Pubkey, live_session_of: Callable[[str], str | None]
    ) -> LeaseClaims:
        """Claims of the token a new session presents, or :class:`Refusal`.

        ``live_session_of(lease)`` names the live session already serving a lease, if any (it
        catches a replay even after the book forgot an expired token).
        """
        claims = self._verify(token, user)
        bound = self.book.session_of(claims.lease_id) or live_session_of(claims.lease_id)
        if bound is not None:
            raise Refusal(
                CODE_LEASE_IN_USE,
                CloseCode.POLICY_VIOLATION,
                f"lease {claims.lease_id} is already attached to a session on this host; a "
                f"lease serves one session (resume that one, or request a new lease)",
            )
        return claims

    def bind(self, claims: LeaseClaims, session: str) -> None:
        """Attach the lease of ``claims`` (from :meth:`check_new`) to the new ``session``.

        Call it right after creating the session, with no ``await`` since :meth:`check_new`.
        """
        self.book.bind(claims, session, now=self._clock())

    def check_resume(
        self, token: object, *, user: Pubkey, session: str, session_lease: str | None
    ) -> LeaseClaims:
        """Claims of the token a resuming connection presents, or :class:`Refusal`.

        ``session_lease`` is the lease the session serves: the token must be for that lease
        (a fresher token of it is fine, and extends the binding).
        """
        claims = self._verify(token, user)
        if claims.lease_id != session_lease:
            raise _auth(
                f"this session serves another lease than {claims.lease_id}; resume it with "
                f"its own lease's token"
            )
        try:
            self.book.bind(claims, session, now=self._clock())
        except AuthError as exc:
            raise _auth(str(exc)) from None
        return claims

    def end(self, lease_id: str) -> None:
        """The lease is over (its session ended, or the coordinator said ``end``): refuse
        its tokens from now on."""
        self.book.end(lease_id)
        self._ended[lease_id] = None
        self._ended.move_to_end(lease_id)
        while len(self._ended) > MAX_ENDED_REMEMBERED:
            self._ended.popitem(last=False)

    def ended(self, lease_id: str) -> bool:
        """Whether the lease was ended here."""
        return lease_id in self._ended

    def _verify(self, token: object, user: Pubkey) -> LeaseClaims:
        coordinator = self.coordinator
        if coordinator is None:
            raise Refusal(
                "capacity",
                TRY_AGAIN_LATER,
                "this host has not reached its coordinator yet, so it cannot check lease "
                "tokens; try again shortly",
            )
        if not isinstance(token, str) or not token:
            raise _auth(
                f"this host rents through coordinator {coordinator}: send the lease token it "
                f"signed in HELLO ('token'); request a lease there first"
            )
        try:
            claims = verify_token(
                token, coordinator=coordinator, user=user, provider=self.provider, now=self._clock()
            )
        except AuthError as exc:
            raise _auth(str(exc)) from None
        if claims.lease_id in self._ended:
            raise _auth(f"lease {claims.lease_id} has ended; request a new lease")
        unknown = sorted(set(claims.gpu_indices) - self.devices)
        if unknown:
            raise _auth(
                f"lease {claims.lease_id} names devices {unknown} this host does not offer; "
                f"request a new lease"
            )
        return claims
