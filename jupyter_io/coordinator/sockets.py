"""Websocket connections the coordinator drives itself, after tornado has read the upgrade.

Tornado parses the HTTP request and runs the checks (tokens, signatures); then, instead of
handing the connection to tornado's websocket layer, which costs a coroutine and several
futures per message, the handler answers the upgrade with :func:`accept_upgrade` and the
socket is taken over with :func:`adopt`:

* on plain TCP the socket leaves tornado's stream and is driven by an
  :class:`asyncio.Protocol` (one callback per read, one ``transport.write`` per batch);
* behind TLS, where tornado owns the encryption, a small read loop over tornado's stream
  delivers the same callbacks.

Either way the owner gets a :class:`Channel` (write, pause/resume reading, close, abort) and
receives :class:`ChannelListener` callbacks (bytes received, buffer drained, connection
lost). What the bytes mean is the owner's business: the relay re-frames them
(:mod:`~jupyter_io.coordinator.relay_frames`), the provider link runs the ``websockets``
library's sans-I/O protocol over them (:mod:`~jupyter_io.coordinator.links`).
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any, Protocol, cast

from tornado import web
from tornado.iostream import IOStream, SSLIOStream, StreamClosedError
from tornado.websocket import WebSocketProtocol13

__all__ = [
    "HIGH_WATER",
    "READ_CHUNK",
    "Channel",
    "ChannelListener",
    "accept_upgrade",
    "adopt",
    "check_upgrade",
]

#: Most bytes one read takes from a socket (tornado streams).
READ_CHUNK = 1 << 20
#: Bytes buffered for writing beyond which :meth:`Channel.write` says "slow down".
HIGH_WATER = 4 << 20


class ChannelListener(Protocol):
    """What a channel's owner is told. :func:`adopt` sets :attr:`channel` before the first
    callback."""

    channel: Channel

    def data_received(self, data: bytes) -> None:
        """Bytes arrived."""

    def drained(self) -> None:
        """The write buffer went back under the high-water mark."""

    def connection_lost(self) -> None:
        """The TCP connection ended (either way); nothing more will arrive."""


class Channel:
    """A socket taken over from tornado (see the module docstring)."""

    def write(self, data: bytes) -> bool:
        """Queue bytes; False once the buffer is past :data:`HIGH_WATER` (pause the writer;
        :meth:`ChannelListener.drained` follows)."""
        raise NotImplementedError

    def pause_reading(self) -> None:
        raise NotImplementedError

    def resume_reading(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Close the TCP connection once what is queued has been sent."""
        raise NotImplementedError

    def abort(self) -> None:
        """Close the TCP connection now."""
        raise NotImplementedError


class _ProtocolChannel(Channel, asyncio.Protocol):
    """Plain TCP driven by asyncio: the fast path."""

    transport: asyncio.Transport

    def __init__(self, listener: ChannelListener) -> None:
        self.listener = listener
        self._write_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        self.listener.data_received(data)

    def eof_received(self) -> bool:
        return False  # no half-open websockets: close, and connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.listener.connection_lost()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self.listener.drained()

    def write(self, data: bytes) -> bool:
        if self.transport.is_closing():
            return True
        self.transport.write(data)
        return not self._write_paused

    def pause_reading(self) -> None:
        if not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if not self.transport.is_closing():
            self.transport.resume_reading()

    def close(self) -> None:
        self.transport.close()

    def abort(self) -> None:
        self.transport.abort()


class _StreamChannel(Channel):
    """A tornado stream (TLS) read by a small loop."""

    def __init__(self, listener: ChannelListener, stream: IOStream) -> None:
        self.listener = listener
        self.stream = stream
        self._reading = asyncio.Event()
        self._reading.set()
        self._unflushed = 0
        self._task = asyncio.create_task(self._read_loop())

    async def _read_loop(self) -> None:
        read = self.stream.read_bytes
        try:
            while True:
                await self._reading.wait()
                self.listener.data_received(await read(READ_CHUNK, partial=True))
        except StreamClosedError:
            self.listener.connection_lost()

    def write(self, data: bytes) -> bool:
        try:
            future = self.stream.write(data)
        except StreamClosedError:
            return True  # the read loop reports the loss
        if future.done():
            _consume(future)
            return True
        self._unflushed += 1
        future.add_done_callback(self._flushed)
        return False

    def _flushed(self, future: asyncio.Future[None]) -> None:
        _consume(future)
        self._unflushed -= 1
        if not self._unflushed:
            self.listener.drained()

    def pause_reading(self) -> None:
        self._reading.clear()

    def resume_reading(self) -> None:
        self._reading.set()

    def close(self) -> None:
        if self.stream.closed():
            return
        if not self._unflushed:
            self.stream.close()
            return
        try:  # close once the queued bytes (a close frame among them) are out
            self.stream.write(b"").add_done_callback(lambda _: self.stream.close())
        except StreamClosedError:
            pass

    def abort(self) -> None:
        self.stream.close()


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # a closed stream: the read loop reports the loss


def check_upgrade(handler: web.RequestHandler) -> str:
    """The request's ``Sec-WebSocket-Key`` if it is a websocket upgrade tornado's websocket
    layer would accept; else :class:`tornado.web.HTTPError` (400, or 426 for a version)."""
    headers = handler.request.headers
    if headers.get("Upgrade", "").lower() != "websocket" or "upgrade" not in {
        token.strip().lower() for token in headers.get("Connection", "").split(",")
    }:
        raise web.HTTPError(400, "this is a websocket endpoint")
    if headers.get("Sec-WebSocket-Version") != "13":
        handler.set_header("Sec-WebSocket-Version", "13")
        raise web.HTTPError(426, "websocket version 13 is required")
    key = headers.get("Sec-WebSocket-Key")
    if not key:
        raise web.HTTPError(400, "Sec-WebSocket-Key is missing")
    return key


def accept_upgrade(
    handler: web.RequestHandler, key: str, subprotocols: tuple[str, ...] = ()
) -> IOStream:
    """Answer ``101 Switching Protocols`` (no extension, so no compression; the first of
    ``subprotocols`` the client offered, if any) and detach the stream from tornado's HTTP
    handling. Next: :func:`adopt`."""
    offered = handler.request.headers.get("Sec-WebSocket-Protocol", "").replace(" ", "").split(",")
    handler.clear_header("Content-Type")
    handler.set_status(101)
    handler.set_header("Upgrade", "websocket")
    handler.set_header("Connection", "Upgrade")
    handler.set_header("Sec-WebSocket-Accept", WebSocketProtocol13.compute_accept_value(key))
    chosen = next((p for p in subprotocols if p in offered), None)
    if chosen is not None:
        handler.set_header("Sec-WebSocket-Protocol", chosen)
    handler.finish()
    stream = handler.detach()
    stream.set_nodelay(True)
    return stream


async def adopt(stream: IOStream, listener: ChannelListener) -> Channel:
    """Take over ``stream`` (after :func:`accept_upgrade`): an asyncio protocol on plain TCP,
    a read loop over the stream behind TLS. Bytes tornado had already read are delivered
    first."""
    await stream.write(b"")  # the 101 response is out
    if isinstance(stream, SSLIOStream) or stream.socket is None:
        listener.channel = stream_channel = _StreamChannel(listener, stream)
        return stream_channel
    # Whatever tornado has read beyond the request (a client may write right after 101).
    pending = cast("asyncio.Future[bytes]", stream.read_bytes(READ_CHUNK, partial=True))
    leftover = pending.result() if pending.done() else b""
    pending.add_done_callback(_consume)
    sock = stream.socket.dup()  # the TCP connection outlives tornado's stream object
    stream.close()
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    listener.channel = channel = _ProtocolChannel(listener)
    await asyncio.get_running_loop().connect_accepted_socket(lambda: channel, sock=sock)
    if leftover:
        listener.data_received(leftover)
    return channel
