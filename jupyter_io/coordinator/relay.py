"""The relay: pairs a lease's client and provider websockets and copies frames between them.

For a provider nobody can reach directly (behind NAT, the demo's default), the lease's
``tunnel_url`` is this relay's client URL. Per ``docs/coordinator-contract.md`` section 3:

1. the client connects to ``/relay/{lease}?side=client`` with its lease token; the handler
   checks it, answers the websocket upgrade and calls :meth:`Relay.open_client` with the
   raw stream;
2. the relay numbers the connection and sends the provider a ``dial`` over its link
   (:meth:`Registry.deliver <jupyter_io.coordinator.registry.Registry.deliver>`: at once, or
   when it links again; through the outbox when it is linked at another replica sharing
   the database) naming ``/relay/{lease}?side=provider&conn=N`` at THIS replica's own
   address (:attr:`Relay.dial_url`), since only this replica holds the waiting client;
3. the provider connects there, signed; the handler checks the signature and that the
   connection waits for this provider (:meth:`Relay.expects`), upgrades, and calls
   :meth:`Relay.open_provider`, which pairs the two. If no provider arrives within
   ``pair_timeout`` the client is closed with 1013 (try again later);
4. from then on every frame one side sends is unmasked, re-framed
   (:class:`~jupyter_io.coordinator.relay_frames.FrameForwarder`; payloads are never parsed)
   and written to the other side. Frames the client sent before its provider arrived wait
   (reading pauses) and go first. Pings, pongs and close frames travel end to end too, so a
   close reaches the other side with its code and reason exactly as sent and the closing
   handshake completes between the two peers; the relay then closes both TCP connections.
   A side whose TCP connection drops without a close frame makes the relay close the other
   with 1001.

Flow control: when one side's socket buffer passes its high-water mark, the other side stops
being read until it drains, so a slow reader slows its writer instead of filling memory.

Before the tunnel handshake is over the client is a stranger to the provider, so until the
provider's WELCOME has passed (the one payload byte the relay looks at: a binary message's
first, the tunnel's frame kind) each side may send messages of at most
:data:`~jupyter_io.protocol.HANDSHAKE_MAX_FRAME_SIZE` and :data:`HANDSHAKE_BYTES` in all,
WELCOME must come within ``handshake_timeout`` of the pairing (else close 1008), and the
client's connection holds a :class:`~jupyter_io.admission.HandshakeSlot` (the handler's cap on
connections in their handshake, per source address and in all).

The hot path is callbacks, not coroutines: the socket is taken over from tornado after the
upgrade (:func:`~jupyter_io.coordinator.sockets.adopt`: an asyncio protocol on plain TCP, a
read loop over tornado's stream behind TLS) and each read is re-framed and written in one
call. The relay holds no state beyond
its open sockets: a restart closes them (1001) and clients resume through a new connection,
hence a new dial.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import quote

from tornado.iostream import IOStream

from ..admission import HandshakeSlot
from ..protocol import HANDSHAKE_MAX_FRAME_SIZE, FrameKind
from ..provider_link import Dial
from .relay_frames import FrameError, FrameForwarder, encode_close
from .sockets import Channel, adopt

if TYPE_CHECKING:
    from .registry import Registry

__all__ = [
    "CLOSE_POLICY",
    "CLOSE_TIMEOUT",
    "CLOSE_TRY_AGAIN",
    "HANDSHAKE_BYTES",
    "MAX_PENDING_PER_LEASE",
    "Relay",
    "RelayConnection",
    "RelaySide",
    "RelayStats",
    "sendable_close_code",
]

#: Close code when the provider did not arrive in time (RFC 6455 "try again later").
CLOSE_TRY_AGAIN = 1013
#: Close code for a side that overstays or oversends its tunnel handshake.
CLOSE_POLICY = 1008
#: Bytes either side may send before the provider's WELCOME (a HELLO and a pipelined LAUNCH
#: fit with room to spare).
HANDSHAKE_BYTES = 4 * HANDSHAKE_MAX_FRAME_SIZE
#: Client connections of one lease that may wait for their provider at once.
MAX_PENDING_PER_LEASE = 8
#: Seconds a closing side has to answer with its own close frame before its TCP is cut.
CLOSE_TIMEOUT = 5.0

_UNSENDABLE = frozenset({1004, 1005, 1006, 1015})


def sendable_close_code(code: int | None) -> int:
    """The close code to send: ``code`` itself when a peer may send it, else 1001."""
    if code is None or code in _UNSENDABLE or not (1000 <= code <= 4999) or 1016 <= code < 3000:
        return 1001
    return code


# --------------------------------------------------------------------------------------------
# Sides


class RelaySide:
    """One side of a relayed connection: its socket's callbacks go to the :class:`Relay`."""

    channel: Channel

    def __init__(self, relay: Relay, connection: RelayConnection, *, provider: bool) -> None:
        self.relay = relay
        self.connection = connection
        self.forwarder = FrameForwarder(relay.max_message_size)
        # Until the tunnel handshake is over; the provider's WELCOME lifts its own side.
        self.forwarder.hold(
            HANDSHAKE_MAX_FRAME_SIZE, until_kind=FrameKind.WELCOME if provider else None
        )
        #: Bytes this side sent before the handshake was over.
        self.handshake_bytes = 0
        #: A close frame went to this side (ours, or the other side's passed on).
        self.close_sent = False
        #: This side sends nothing more (it sent a close frame, or its TCP is gone).
        self.done = False
        #: Sides whose reading paused until this side's buffer drains.
        self.blocked: list[RelaySide] = []

    # ChannelListener
    def data_received(self, data: bytes) -> None:
        self.relay._received(self, data)

    def drained(self) -> None:
        blocked, self.blocked = self.blocked, []
        for side in blocked:
            side.channel.resume_reading()

    def connection_lost(self) -> None:
        self.relay._lost(self)

    def send_close(self, code: int, reason: str) -> None:
        """Send a close frame (once; never after one went to this side)."""
        if not self.close_sent:
            self.close_sent = True
            self.channel.write(encode_close(sendable_close_code(code), reason))


# --------------------------------------------------------------------------------------------
# Connections


@dataclass(eq=False)
class RelayConnection:
    """One client connection of a lease and, once paired, the provider connection serving it."""

    lease_id: str
    conn: int
    provider_pubkey: str
    client: RelaySide | None = None
    provider: RelaySide | None = None
    #: Frames the client sent before its provider arrived.
    early: list[bytes] = field(default_factory=list)
    closing: bool = False
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    timer: asyncio.TimerHandle | None = None
    #: The provider's WELCOME has passed: the session's limits apply.
    established: bool = False
    #: The client's place among connections in their handshake (released once established).
    slot: HandshakeSlot | None = None
    handshake_timer: asyncio.TimerHandle | None = None

    def other(self, side: RelaySide) -> RelaySide | None:
        return self.provider if side is self.client else self.client

    def sides(self) -> list[RelaySide]:
        return [side for side in (self.client, self.provider) if side is not None]


@dataclass(slots=True)
class RelayStats:
    """Counters for the status endpoint."""

    dials: int = 0
    pairs: int = 0
    timeouts: int = 0


class Relay:
    """Pairs relayed connections and forwards their frames (see the module docstring)."""

    def __init__(
        self,
        registry: Registry,
        *,
        base_url: str,
        dial_url: str | None = None,
        pair_timeout: float = 10.0,
        handshake_timeout: float = 10.0,
        max_message_size: int = 65 << 20,
        log: logging.Logger | None = None,
    ) -> None:
        #: ``ws://HOST:PORT/relay`` (``wss://`` with TLS): where clients and providers connect.
        self.base_url = base_url.rstrip("/")
        #: The same relay at this replica's own address (default: ``base_url``): dials name
        #: it, so a provider linked at another replica connects to the one holding the client.
        self.dial_url = (dial_url or base_url).rstrip("/")
        self.registry = registry
        self.pair_timeout = pair_timeout
        #: Seconds from the pairing to the provider's WELCOME.
        self.handshake_timeout = handshake_timeout
        self.max_message_size = max_message_size
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
        return f"{self.dial_url}/{quote(lease_id, safe='')}?side=provider&conn={conn}"

    # -- pairing ---------------------------------------------------------------------------

    async def open_client(
        self,
        lease_id: str,
        provider_pubkey: str,
        stream: IOStream,
        slot: HandshakeSlot | None = None,
    ) -> RelayConnection:
        """A client connected (token checked, upgrade answered): dial the provider, start
        the pairing timer, and take over its socket. ``slot`` is released once the tunnel
        handshake is over or the connection ends."""
        conn = next(self._numbers)
        connection = RelayConnection(lease_id, conn, provider_pubkey, slot=slot)
        waiting = sum(1 for c in self._by_lease.get(lease_id, ()) if c.provider is None)
        self._by_lease.setdefault(lease_id, set()).add(connection)
        connection.client = side = await self._adopt(stream, connection)
        if connection.closing:  # the lease ended while the socket was being taken over
            side.send_close(1000, "lease over")
            return connection
        if waiting >= MAX_PENDING_PER_LEASE:
            self.shut(connection, CLOSE_TRY_AGAIN, "too many connections wait for this lease")
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

    async def open_provider(self, lease_id: str, conn: int, stream: IOStream) -> bool:
        """The provider arrived for ``conn`` (signature checked, upgrade answered): pair it.
        False when the connection no longer waits (the provider's socket is closed 1001)."""
        connection = self._pending.pop((lease_id, conn), None)
        if connection is not None and connection.timer is not None:
            connection.timer.cancel()
            connection.timer = None
        placeholder = connection or RelayConnection(lease_id, conn, "")
        side = await self._adopt(stream, placeholder, provider=True)
        if connection is None or connection.closing:
            side.send_close(1001, "the client of this connection has gone")
            side.channel.close()
            return False
        connection.provider = side
        self.stats.pairs += 1
        if not connection.established:
            connection.handshake_timer = asyncio.get_running_loop().call_later(
                self.handshake_timeout, self._handshake_late, connection
            )
        client = connection.client
        assert client is not None  # a connection is pending only once its client is adopted
        for frames in connection.early:
            self._forward(client, side, frames)
        connection.early.clear()
        if client.forwarder.closed:
            self._source_closed(client)
        elif not side.blocked:
            client.channel.resume_reading()
        return True

    async def _adopt(
        self, stream: IOStream, connection: RelayConnection, *, provider: bool = False
    ) -> RelaySide:
        side = RelaySide(self, connection, provider=provider)
        await adopt(stream, side)
        return side

    def shut(self, connection: RelayConnection, code: int, reason: str) -> None:
        """Close ``connection`` from the relay: a close frame to each side, then their TCP
        once they answered (or after :data:`CLOSE_TIMEOUT`)."""
        if connection.closing:
            return
        connection.closing = True
        self._pending.pop((connection.lease_id, connection.conn), None)
        for side in connection.sides():
            side.send_close(code, reason)
        self._arm_close_timer(connection)
        self._maybe_finish(connection)

    def close_lease(self, lease_id: str, code: int, reason: str) -> int:
        """Close every connection of a lease (it ended or failed); returns how many."""
        connections = list(self._by_lease.get(lease_id, ()))
        for connection in connections:
            self.shut(connection, code, reason)
        return len(connections)

    async def close_all(self, code: int, reason: str, *, timeout: float = 2.0) -> None:
        """Close every relayed connection (shutdown: 1001, clients resume elsewhere), waiting
        up to ``timeout`` for the closing handshakes before cutting what is left."""
        connections = [c for group in self._by_lease.values() for c in group]
        for connection in connections:
            self.shut(connection, code, reason)
        waits = [asyncio.ensure_future(c.finished.wait()) for c in connections]
        if waits:
            _, late = await asyncio.wait(waits, timeout=timeout)
            for wait in late:
                wait.cancel()
        for connection in connections:
            self._finish(connection, abort=True)

    def active(self) -> int:
        """Connections open now (paired or waiting)."""
        return sum(len(connections) for connections in self._by_lease.values())

    # -- the hot path ----------------------------------------------------------------------

    def _received(self, source: RelaySide, data: bytes) -> None:
        connection = source.connection
        if source.done or connection.finished.is_set():
            return
        try:
            frames = source.forwarder.feed(data)
        except FrameError as exc:
            self.log.info("relay: lease %s: %s", connection.lease_id, exc.reason)
            source.done = True
            self.shut(connection, exc.code, exc.reason)
            return
        if not connection.established:
            if source is connection.provider and not source.forwarder.held:
                self._established(connection)  # WELCOME: lift both before it goes on
            else:
                source.handshake_bytes += len(data)
                if source.handshake_bytes > HANDSHAKE_BYTES:
                    source.done = True
                    self.shut(
                        connection,
                        CLOSE_POLICY,
                        f"more than {HANDSHAKE_BYTES} bytes before the tunnel handshake ended",
                    )
                    return
        if frames:
            target = connection.other(source)
            if target is None:  # the provider has not arrived
                if source.forwarder.closed:  # and the client gave up: answer its close
                    source.done = True
                    self.shut(connection, source.forwarder.close_code or 1000, "closed")
                    self._maybe_finish(connection)
                    return
                connection.early.append(frames)  # keep them for the provider, stop reading
                source.channel.pause_reading()
                return
            self._forward(source, target, frames)
        if source.forwarder.closed:
            self._source_closed(source)

    def _established(self, connection: RelayConnection) -> None:
        """The provider's WELCOME passed: session limits, and no longer a stranger."""
        connection.established = True
        for side in connection.sides():
            side.forwarder.lift()
        if connection.slot is not None:
            connection.slot.release()
        if connection.handshake_timer is not None:
            connection.handshake_timer.cancel()
            connection.handshake_timer = None

    def _handshake_late(self, connection: RelayConnection) -> None:
        connection.handshake_timer = None
        if not connection.established and not connection.closing:
            self.shut(
                connection,
                CLOSE_POLICY,
                f"the tunnel handshake did not end within {self.handshake_timeout:g} s",
            )

    def _forward(self, source: RelaySide, target: RelaySide, frames: bytes) -> None:
        if target.close_sent:
            return  # the relay closed it already: nothing more may reach it
        if source.forwarder.closed:
            target.close_sent = True  # its close frame is in ``frames``
        if not target.channel.write(frames):
            source.channel.pause_reading()
            target.blocked.append(source)

    def _source_closed(self, source: RelaySide) -> None:
        """``source`` sent its close frame (passed on): it sends nothing more."""
        source.done = True
        connection = source.connection
        self._arm_close_timer(connection)
        self._maybe_finish(connection)

    def _lost(self, side: RelaySide) -> None:
        """``side``'s TCP connection ended."""
        connection = side.connection
        if connection.finished.is_set():
            return
        dropped = not side.done
        side.done = True
        if dropped:
            other = connection.other(side)
            if other is not None:
                other.send_close(1001, "the other side of the relay went away")
            if connection.provider is None:
                connection.closing = True
                self._pending.pop((connection.lease_id, connection.conn), None)
        self._arm_close_timer(connection)
        self._maybe_finish(connection)

    def _maybe_finish(self, connection: RelayConnection) -> None:
        """Close both TCP connections once every side has stopped sending."""
        sides = connection.sides()
        if (
            sides
            and all(side.done for side in sides)
            and (connection.provider is not None or connection.closing)
        ):
            self._finish(connection)

    def _arm_close_timer(self, connection: RelayConnection) -> None:
        if connection.timer is not None:
            connection.timer.cancel()
        loop = asyncio.get_running_loop()
        connection.timer = loop.call_later(
            CLOSE_TIMEOUT, lambda: self._finish(connection, abort=True)
        )

    def _finish(self, connection: RelayConnection, *, abort: bool = False) -> None:
        if connection.finished.is_set():
            return
        connection.finished.set()
        connection.closing = True
        if connection.timer is not None:
            connection.timer.cancel()
            connection.timer = None
        if connection.handshake_timer is not None:
            connection.handshake_timer.cancel()
            connection.handshake_timer = None
        if connection.slot is not None:
            connection.slot.release()
        self._pending.pop((connection.lease_id, connection.conn), None)
        group = self._by_lease.get(connection.lease_id)
        if group is not None:
            group.discard(connection)
            if not group:
                del self._by_lease[connection.lease_id]
        for side in connection.sides():
            with contextlib.suppress(Exception):
                side.channel.abort() if abort else side.channel.close()

    # -- events ----------------------------------------------------------------------------

    def _lease_over(self, lease_id: str, reason: str) -> None:
        self.close_lease(lease_id, 1000, f"lease {reason}")

    def _timed_out(self, connection: RelayConnection) -> None:
        connection.timer = None
        if connection.provider is None and not connection.closing:
            self.stats.timeouts += 1
            self.log.info(
                "relay: provider %s did not connect for lease %s within %g s",
                connection.provider_pubkey,
                connection.lease_id,
                self.pair_timeout,
            )
            self.shut(
                connection,
                CLOSE_TRY_AGAIN,
                "the provider did not connect to the relay in time; try again",
            )
