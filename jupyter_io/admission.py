"""How many connections may be in their handshake at once: per source address and in all.

A connection that has not proven who it is yet costs its server memory and a place in the
event loop, and costs its sender nothing. Both daemons bound that: the provider host for its
tunnel endpoint, the coordinator for its relay and provider-link endpoints. Each takes a
:class:`HandshakeSlot` from a :class:`HandshakeSlots` when a connection arrives and releases
it when the peer has authenticated (a verified HELLO, a verified link hello) or when the
connection ends, whichever comes first; an authenticated connection no longer counts.

Over either cap, :meth:`HandshakeSlots.admit` still returns a slot, whose
:attr:`~HandshakeSlot.refusal` says why, so the server can answer with that reason (an HTTP
503) instead of a bare reset. Those answering connections are bounded as well (by the total
cap, in a pool of their own); past that, :meth:`~HandshakeSlots.admit` returns None and the
server drops the connection at once. Sans-I/O: no sockets, no clock.
"""

from __future__ import annotations

from collections import Counter

__all__ = ["HandshakeSlot", "HandshakeSlots"]


class HandshakeSlot:
    """One connection's place among those in their handshake; :meth:`release` it once."""

    __slots__ = ("_counted", "_owner", "address", "refusal")

    def __init__(
        self, owner: HandshakeSlots, address: str, refusal: str | None, counted: bool
    ) -> None:
        self._owner: HandshakeSlots | None = owner
        self._counted = counted
        #: The source address it was counted under.
        self.address = address
        #: None when admitted; else why the connection must be refused (say it, then close).
        self.refusal = refusal

    @property
    def released(self) -> bool:
        """True once :meth:`release` ran."""
        return self._owner is None

    def release(self) -> None:
        """The connection authenticated or ended: it no longer counts (idempotent)."""
        owner = self._owner
        if owner is None:
            return
        self._owner = None
        owner._released(self, self._counted)


class HandshakeSlots:
    """The two caps on connections in their handshake (see the module docstring).

    ``per_address`` bounds one source address, ``total`` all addresses together; what the
    refusals say names ``what`` (e.g. ``"tunnel"``) and the cap that was hit.
    """

    def __init__(self, *, total: int, per_address: int, what: str = "handshake") -> None:
        if total < 1 or per_address < 1:
            raise ValueError("the caps on unauthenticated connections must be at least 1")
        self.total = total
        self.per_address = per_address
        self.what = what
        self._by_address: Counter[str] = Counter()
        self._count = 0
        self._refusing = 0

    def admit(self, address: str) -> HandshakeSlot | None:
        """A slot for a new connection from ``address``: admitted (``refusal`` None), to be
        refused with a reason, or None when even refusals are over their bound (drop it)."""
        if self._by_address[address] >= self.per_address:
            refusal = (
                f"{self.per_address} {self.what} connections from {address} are already "
                f"waiting to authenticate; finish or close those, then try again"
            )
        elif self._count >= self.total:
            refusal = (
                f"{self.total} {self.what} connections are waiting to authenticate here; "
                f"try again in a few seconds"
            )
        else:
            self._by_address[address] += 1
            self._count += 1
            return HandshakeSlot(self, address, None, True)
        if not self._by_address[address]:
            del self._by_address[address]  # the lookup above must not keep a zero entry
        if self._refusing >= self.total:
            return None
        self._refusing += 1
        return HandshakeSlot(self, address, refusal, False)

    def waiting(self, address: str | None = None) -> int:
        """Connections admitted and not yet released (from ``address``, or in all)."""
        if address is None:
            return self._count
        return self._by_address.get(address, 0)

    def _released(self, slot: HandshakeSlot, counted: bool) -> None:
        if not counted:
            self._refusing -= 1
            return
        self._count -= 1
        left = self._by_address[slot.address] - 1
        if left:
            self._by_address[slot.address] = left
        else:
            del self._by_address[slot.address]
