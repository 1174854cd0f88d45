"""The relay: pairs a lease's client and provider websockets and copies messages between them.

For a provider nobody can reach directly (behind NAT, the demo's default), the lease's
``tunnel_url`` is this relay's client URL. Per ``docs/coordinator-contract.md`` section 3:

1. the client connects to ``/relay/{lease}?side=client`` with its lease token (the handler
   checks it before upgrading) and the handler calls :meth:`Relay.open_client`;
2. the relay numbers the connection and sends the provider a ``dial`` over its link
   (:meth:`Registry.deliver <jupyter_io.coordinator.registry.Registry.deliver>`: at once, or
   when it links again) naming ``/relay/{lease}?side=provider&conn=N``;
3. the provider connects there, signed (checked before upgrading, including that the
   connection is pending: :meth:`Relay.expects`) and the handler calls
   :meth:`Relay.open_provider`, which pairs the two; if no provider arrives within
   ``pair_timeout`` the client is closed with 1013 (try again later);
4. from then on every message goes to the other side as it came (bytes as bytes, text as
   text), never parsed; when either side closes, :meth:`Relay.closed` closes the other with
   the same code (a close without a sendable code becomes 1001).

The tunnel's own handshake runs end to end through the pair, so the relay needs no trust in
either side's bytes; a resuming client simply connects again, which dials again. The relay is
stateless beyond its open sockets: a restart closes them (1001) and clients resume.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol
from urllib.parse import quote

from .provider_link import Dial

if TYPE_CHECKING:
    from .registry import Registry

__all__ = [
    "CLOSE_TRY_AGAIN",
    "MAX_PENDING_PER_LEASE",
    "Relay",
    "RelayConnection",
    "RelayEndpoint",
    "RelayStats",
    "sendable_close_code",
]

#: Close code when the provider did not arrive in time (RFC 6455 "try again later").
CLOSE_TRY_AGAIN = 1013
#: Client connections of one lease that may wait for their provider at once.
MAX_PENDING_PER_LEASE = 8

_UNSENDABLE = frozenset({1004, 1005, 1006, 1015})


def sendable_close_code(code: int | None) -> int:
    """The close code to pass on: ``code`` itself when a peer may send it, else 1001."""
    if code is None or code in _UNSENDABLE or not (1000 <= code <= 4999) or 1016 <= code < 3000:
        return 1001
    return code


class RelayEndpoint(Protocol):
    """One side of a relayed connection (the websocket handler)."""

    def forward(self, message: bytes | str) -> Awaitable[None] | None:
        """Send ``message`` as it came; an awaitable while the socket's buffer is full."""

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        """Close this side."""


@dataclass(eq=False, slots=True)
class RelayConnection:
    """One client connection of a lease and, once paired, the provider connection serving it."""

    lease_id: str
    conn: int
    provider_pubkey: str
    client: RelayEndpoint
    provider: RelayEndpoint | None = None
    paired: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    closed: bool = False
    timer: asyncio.TimerHandle | None = None

    def peer_of(self, side: str) -> RelayEndpoint | None:
        """The endpoint opposite ``side`` (``"client"`` or ``"provider"``)."""
        return self.provider if side == "client" else self.client


@dataclass(slots=True)
class RelayStats:
    """Counters for the status endpoint."""

    dials: int = 0
    pairs: int = 0
    timeouts: int = 0


class Relay:
    """Pairs and closes relayed connections (see the module docstring)."""

    def __init__(
        self,
        registry: Registry,
        *,
        base_url: str,
        pair_timeout: float = 10.0,
        log: logging.Logger | None = None,
    ) -> None:
        #: ``ws://HOST:PORT/relay`` (``wss://`` with TLS): where clients and providers connect.
        self.base_url = base_url.rstrip("/")
        self.registry = registry
        self.pair_timeout = pair_timeout
        self.log = log or logging.getLogger("jupyter_io.coordinator")
        self.stats = RelayStats()
        self._numbers = itertools.count(1)
        self._pending: dict[tuple[str, int], RelayConnection] = {}
        self._by_lease: dict[str, set[RelayConnection]] = {}
        registry.lease_listeners.append(self._lease_over)

    # -- URLs ------------------------------------------------------------------------------

    def client_url(self, lease_id: str) -> str:
        """Where a lease's client connects (the lease's ``tunnel_url`` when relayed)."""
        return f"{self.base_url}/{quote(lease_id, safe='')}?side=client"

    def provider_url(self, lease_id: str, conn: int) -> str:
        """Where the provider connects to serve client connection ``conn``."""
        return f"{self.base_url}/{quote(lease_id, safe='')}?side=provider&conn={conn}"

    # -- pairing ---------------------------------------------------------------------------

    def open_client(
        self, lease_id: str, provider_pubkey: str, client: RelayEndpoint
    ) -> RelayConnection:
        """A client connected (its token already checked): dial the provider and start the
        pairing timer. Returns the connection; forward the client's messages once
        ``paired`` is done."""
        conn = next(self._numbers)
        connection = RelayConnection(lease_id, conn, provider_pubkey, client)
        waiting = sum(1 for c in self._by_lease.get(lease_id, ()) if c.provider is None)
        self._by_lease.setdefault(lease_id, set()).add(connection)
        if waiting >= MAX_PENDING_PER_LEASE:
            self._close(connection, "client", CLOSE_TRY_AGAIN, "too many connections waiting")
            return connection
        self._pending[(lease_id, conn)] = connection
        loop = asyncio.get_running_loop()
        connection.timer = loop.call_later(self.pair_timeout, self._timed_out, connection)
        self.stats.dials += 1
        self.registry.deliver(
            provider_pubkey,
            Dial(lease_id, self.provider_url(lease_id, conn)),
            ttl=self.pair_timeout,
        )
        return connection

    def expects(self, lease_id: str, conn: int, provider_pubkey: str) -> bool:
        """Whether connection ``conn`` of the lease waits for this provider."""
        connection = self._pending.get((lease_id, conn))
        return connection is not None and connection.provider_pubkey == provider_pubkey

    def open_provider(
        self, lease_id: str, conn: int, provider: RelayEndpoint
    ) -> RelayConnection | None:
        """The provider arrived for ``conn``: pair it. None when the connection no longer
        waits (its client left or timed out); close the provider's socket then."""
        connection = self._pending.pop((lease_id, conn), None)
        if connection is None or connection.closed:
            return None
        if connection.timer is not None:
            connection.timer.cancel()
        connection.provider = provider
        connection.paired.set_result(None)
        self.stats.pairs += 1
        return connection

    def closed(
        self, connection: RelayConnection, side: str, code: int | None, reason: str | None
    ) -> None:
        """One side's socket closed: close the other with the same code."""
        self._close(connection, side, code, reason or "")

    def close_lease(self, lease_id: str, code: int, reason: str) -> int:
        """Close every connection of a lease (it ended or failed); returns how many."""
        connections = list(self._by_lease.get(lease_id, ()))
        for connection in connections:
            self._close(connection, None, code, reason)
        return len(connections)

    def close_all(self, code: int, reason: str) -> None:
        """Close every relayed connection (shutdown: 1001, clients resume elsewhere)."""
        for lease_id in list(self._by_lease):
            self.close_lease(lease_id, code, reason)

    def active(self) -> int:
        """Connections open now (paired or waiting)."""
        return sum(len(connections) for connections in self._by_lease.values())

    # -- internals -------------------------------------------------------------------------

    def _lease_over(self, lease_id: str, reason: str) -> None:
        self.close_lease(lease_id, 1000, f"lease {reason}"[:120])

    def _timed_out(self, connection: RelayConnection) -> None:
        if connection.provider is None and not connection.closed:
            self.stats.timeouts += 1
            self.log.info(
                "relay: provider %s did not connect for lease %s within %g s",
                connection.provider_pubkey,
                connection.lease_id,
                self.pair_timeout,
            )
            self._close(
                connection,
                "provider",
                CLOSE_TRY_AGAIN,
                "the provider did not connect to the relay in time; try again",
            )

    def _close(
        self, connection: RelayConnection, side: str | None, code: int | None, reason: str
    ) -> None:
        """Close ``connection``; ``side`` is the one already closed (None: neither)."""
        if connection.closed:
            return
        connection.closed = True
        if connection.timer is not None:
            connection.timer.cancel()
        self._pending.pop((connection.lease_id, connection.conn), None)
        connections = self._by_lease.get(connection.lease_id)
        if connections is not None:
            connections.discard(connection)
            if not connections:
                del self._by_lease[connection.lease_id]
        if not connection.paired.done():
            connection.paired.cancel()
        outgoing = sendable_close_code(code)
        text = reason.encode()[:120].decode(errors="ignore")
        if side != "client":
            connection.client.close(outgoing, text)
        if side != "provider" and connection.provider is not None:
            connection.provider.close(outgoing, text)
