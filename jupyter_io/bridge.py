"""The I/O half of a tunnel end: moves frames between ZMQ sockets and a websocket.

Both ends of the kernel tunnel are a :class:`Bridge`. The provisioner's facade gives it the
ROUTER/XPUB sockets Jupyter clients connect to; the provider host gives it the DEALER/SUB
sockets connected to the real kernel. The bridge outlives websocket connections: call
:meth:`Bridge.attach` with each (re)connected websocket after the handshake, and
:meth:`Bridge.serve` to pump until that websocket closes. While no websocket is attached,
outgoing messages are kept by the :class:`~jupyter_io.protocol.Tunnel` and replayed on the
next attach.

The hot path copies bytes: ZMQ parts go into a frame untouched, and no JSON is parsed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import zmq
import zmq.asyncio
from websockets.asyncio.connection import Connection
from websockets.exceptions import ConnectionClosed

from .errors import JupyterIOError, ProtocolError
from .protocol import Channel, CloseCode, Frame, FrameKind, Tunnel

__all__ = ["Bridge", "ControlHandler"]

ControlHandler = Callable[[Frame], Awaitable[None] | None]
"""Called with every reliable control frame (LAUNCH, SIGNAL, STARTED, EXITED, END)."""


class Bridge:
    """Pumps one tunnel session between ZMQ sockets and the currently attached websocket.

    ``outbound`` sockets are read and their messages sent through the tunnel; DATA frames
    arriving on a channel are written to the ``inbound`` socket of that channel. The same
    socket may appear in both maps (shell, stdin, control, hb are two-way).
    """

    def __init__(
        self,
        tunnel: Tunnel,
        *,
        outbound: Mapping[Channel, zmq.asyncio.Socket],
        inbound: Mapping[Channel, zmq.asyncio.Socket],
        on_control: ControlHandler,
        log: logging.Logger | logging.LoggerAdapter[Any] | None = None,
        ack_interval: float = 0.05,
    ) -> None:
        self.tunnel = tunnel
        self.outbound = dict(outbound)
        self.inbound = dict(inbound)
        self.on_control = on_control
        self.log = log or logging.getLogger(__name__)
        self.ack_interval = ack_interval
        self.ws: Connection | None = None
        #: Set when an unrecoverable error (e.g. buffer overflow) ended the session.
        self.failure: JupyterIOError | None = None
        self._pumps: list[asyncio.Task[None]] = []
        self._failed = asyncio.Event()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start reading the outbound ZMQ sockets (once per session)."""
        if self._pumps:
            return
        for channel, sock in self.outbound.items():
            self._pumps.append(asyncio.create_task(self._pump(channel, sock)))

    async def stop(self) -> None:
        """Stop the pumps. The sockets stay open: their owner closes them."""
        for task in self._pumps:
            task.cancel()
        for task in self._pumps:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._pumps.clear()

    async def attach(self, ws: Connection, peer_received: int) -> None:
        """Adopt a freshly handshaken websocket and replay what the peer has not received."""
        self.ws = ws
        for frame in self.tunnel.replay(peer_received):
            await ws.send(frame)

    def detach(self, ws: Connection | None = None) -> None:
        """Forget the websocket (only if it is still ``ws``, when given)."""
        if ws is None or self.ws is ws:
            self.ws = None

    async def serve(self, ws: Connection) -> None:
        """Receive from ``ws`` until it closes; returns after detaching it.

        A protocol violation by the peer closes the websocket with a reason and ends only
        this connection; the session (and its kernel) waits for a resume.
        """
        flusher = asyncio.create_task(self._flush_acks(ws))
        failed = asyncio.create_task(self._failed.wait())
        receiver = asyncio.create_task(self._receive(ws))
        try:
            await asyncio.wait({receiver, failed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (flusher, failed, receiver):
                task.cancel()
            for task in (flusher, failed, receiver):
                with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                    await task
            self.detach(ws)
        if self.failure is not None:
            await ws.close(CloseCode.BUFFER_OVERFLOW, str(self.failure)[:120])

    # -- sending ---------------------------------------------------------------------------

    async def send_control(self, kind: FrameKind, body: dict[str, Any] | None = None) -> None:
        """Send a reliable control frame now, or on the next attach if disconnected."""
        frame = self.tunnel.send_control(kind, body)
        await self._write(frame)

    async def _write(self, frame: bytes) -> None:
        ws = self.ws
        if ws is None:
            return  # kept in the tunnel; replayed on the next attach
        try:
            # The websocket writes before it awaits drain, so frames leave in seq order.
            await ws.send(frame)
        except ConnectionClosed:
            self.detach(ws)

    async def _pump(self, channel: Channel, sock: zmq.asyncio.Socket) -> None:
        send_data = self.tunnel.send_data
        while True:
            parts = await sock.recv_multipart()
            try:
                frame = send_data(channel, parts)
            except JupyterIOError as exc:
                self._fail(exc)
                return
            ws = self.ws
            if ws is not None:
                try:
                    await ws.send(frame)
                except ConnectionClosed:
                    self.detach(ws)

    def _fail(self, exc: JupyterIOError) -> None:
        self.log.error("tunnel session failed: %s", exc)
        self.failure = exc
        self._failed.set()

    # -- receiving -------------------------------------------------------------------------

    async def _receive(self, ws: Connection) -> None:
        receive = self.tunnel.receive
        inbound = self.inbound
        try:
            async for message in ws:
                if isinstance(message, str):
                    raise ProtocolError("text message on the tunnel; frames are binary")
                frame = receive(message)
                if frame is None:
                    continue
                if frame.kind is FrameKind.DATA:
                    sock = inbound.get(frame.channel)
                    if sock is None:
                        raise ProtocolError(f"no {frame.channel.name} channel in this direction")
                    await sock.send_multipart(frame.parts, copy=len(frame.parts[-1]) < 65536)
                else:
                    result = self.on_control(frame)
                    if result is not None:
                        await result
                if self.tunnel.ack_due:
                    await ws.send(self.tunnel.ack_frame())
        except ProtocolError as exc:
            self.log.warning("closing tunnel connection: %s", exc)
            await ws.close(CloseCode.PROTOCOL_ERROR, str(exc)[:120])
        except ConnectionClosed:
            pass

    async def _flush_acks(self, ws: Connection) -> None:
        while True:
            await asyncio.sleep(self.ack_interval)
            if self.tunnel.ack_pending:
                try:
                    await ws.send(self.tunnel.ack_frame())
                except ConnectionClosed:
                    return
