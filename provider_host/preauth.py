"""What a tunnel connection may cost the host before its HELLO is verified: a few KB.

Until then the peer is a stranger, so the tunnel endpoint (:mod:`provider_host.server`)
bounds what it reads and how long it waits:

* the HTTP upgrade request may take at most :data:`MAX_REQUEST_BYTES`;
* websocket messages are limited to :data:`~jupyter_io.protocol.HANDSHAKE_MAX_FRAME_SIZE`,
  checked by the ``websockets`` reader from a frame's header, before any of its payload is
  buffered (a bigger frame closes the connection with 1009), and at most
  :data:`HANDSHAKE_QUEUE` of them wait to be read;
* the connection holds a :class:`~jupyter_io.admission.HandshakeSlot` from its TCP accept:
  past ``max_unauthenticated_per_address`` or ``max_unauthenticated`` it is answered 503;
* ``handshake_timeout`` runs from the TCP accept to the verified HELLO.

A latency ping (``GET /tunnel/ping``, :mod:`jupyter_io.ping`) is such a connection too: it
holds its slot until the host has answered it and closed.

Build the connection class once per server with :func:`tunnel_connection_class` and give it
to ``websockets.asyncio.server.serve(create_connection=...)``; once the HELLO checks out,
:func:`authenticated` lifts the limits to the session's and releases the slot.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from websockets.asyncio.connection import Connection
from websockets.asyncio.server import ServerConnection
from websockets.protocol import State

from jupyter_io.admission import HandshakeSlot, HandshakeSlots

__all__ = [
    "HANDSHAKE_QUEUE",
    "MAX_REQUEST_BYTES",
    "SESSION_QUEUE",
    "TunnelConnection",
    "authenticated",
    "handshake_deadline",
    "tunnel_connection_class",
]

#: Most bytes of the HTTP upgrade request (ours are under 1 KB; browsers send 2-4 KB).
MAX_REQUEST_BYTES = 16 * 1024
#: Messages queued unread before HELLO is verified (HELLO and a pipelined LAUNCH: 2).
HANDSHAKE_QUEUE = (4, 1)
#: The ``websockets`` default queue once the session runs (high, low water marks).
SESSION_QUEUE = (16, 4)


class TunnelConnection(ServerConnection):
    """A ``websockets`` server connection counted among those in their handshake."""

    #: Its place among connections in their handshake (None: dropped at accept).
    slot: HandshakeSlot | None = None
    #: Event-loop time of the TCP accept (the handshake deadline runs from there).
    accepted_at: float = 0.0
    _request_bytes: int = 0

    @property
    def request_bytes(self) -> int:
        """Bytes received before the websocket opened: the HTTP request (a latency ping's
        size is checked against it, ``jupyter_io.ping``)."""
        return self._request_bytes

    def _slots(self) -> HandshakeSlots:
        raise NotImplementedError  # bound by tunnel_connection_class

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.accepted_at = self.loop.time()
        peer = transport.get_extra_info("peername")
        self.slot = self._slots().admit(str(peer[0]) if peer else "unknown")
        if self.slot is None:  # even refusals are over their bound: not worth an answer
            cast(asyncio.Transport, transport).abort()

    def data_received(self, data: bytes) -> None:
        if self.protocol.state is State.CONNECTING:
            self._request_bytes += len(data)
            if self._request_bytes > MAX_REQUEST_BYTES:
                self.transport.abort()
                return
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.slot is not None:
            self.slot.release()
        super().connection_lost(exc)


def tunnel_connection_class(slots: HandshakeSlots) -> type[TunnelConnection]:
    """A :class:`TunnelConnection` class whose connections take their slot from ``slots``."""

    class BoundTunnelConnection(TunnelConnection):
        def _slots(self) -> HandshakeSlots:
            return slots

    return BoundTunnelConnection


def handshake_deadline(ws: Connection, timeout: float) -> float:
    """Seconds left of ``timeout`` for ``ws`` to deliver its HELLO (counted from its TCP
    accept for an accepted connection, from now for one the host dialled)."""
    if isinstance(ws, TunnelConnection):
        return max(0.0, ws.accepted_at + timeout - ws.loop.time())
    return timeout


def authenticated(ws: Connection, max_frame_size: int) -> None:
    """HELLO checked out: the session's frame limit and queue apply from the next frame
    (the reader computes a frame's limit when its first byte arrives), and ``ws`` no longer
    counts among connections in their handshake."""
    ws.protocol.max_message_size = max_frame_size
    messages: Any = ws.recv_messages
    messages.high, messages.low = SESSION_QUEUE
    if isinstance(ws, TunnelConnection) and ws.slot is not None:
        ws.slot.release()
