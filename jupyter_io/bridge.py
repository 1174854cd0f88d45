"""The I/O half of a tunnel end: moves frames between ZMQ sockets and a websocket.

Both ends of the kernel tunnel are a :class:`Bridge`. The provisioner's facade gives it the
ROUTER/XPUB sockets Jupyter clients connect to; the provider host gives it the DEALER/SUB
sockets connected to the real kernel. The bridge outlives websocket connections: call
:meth:`Bridge.attach` with each (re)connected websocket after the handshake, and
:meth:`Bridge.serve` to pump until that websocket closes. While no websocket is attached,
outgoing messages are kept by the :class:`~jupyter_io.protocol.Tunnel` and replayed by the
next :meth:`Bridge.serve`.

The hot path copies bytes: ZMQ parts go into a frame untouched, and no JSON is parsed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import struct
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import zmq
import zmq.asyncio
from websockets.asyncio.connection import Connection
from websockets.exceptions import ConnectionClosed
from websockets.frames import apply_mask
from websockets.protocol import Side

from .errors import JupyterIOError, ProtocolError
from .protocol import VIEW_THRESHOLD, Channel, CloseCode, Frame, FrameKind, Tunnel

__all__ = ["Bridge", "ControlHandler", "Gate", "Tap"]

ControlHandler = Callable[[Frame], Awaitable[None] | None]
"""Called with every reliable control frame (LAUNCH, SIGNAL, STARTED, EXITED, END)."""
Gate = Callable[[list[bytes]], Awaitable[None] | None]
"""Looks at each outbound message of its channel before it is sequenced; an awaitable
holds that message (and the channel's later ones) until it completes."""
Tap = Callable[[Sequence[bytes]], None]
"""Hears each inbound message of its channel once it is handed to the socket."""

_BURST = 64
"""The most ZMQ messages a pump reads per wake-up before it sends them and yields."""
_BURST_BYTES = 1024 * 1024
"""... and the most bytes: small messages are worth coalescing into one write, large ones
are not, and a burst of many large buffers joined into one (64 MB) allocation costs more
than its copy: allocations that size are fresh pages from the kernel every time."""

_HEAD_SHORT = struct.Struct("!BB")
_HEAD_MEDIUM = struct.Struct("!BBH")
_HEAD_LONG = struct.Struct("!BBQ")


def _ws_header(length: int, mask: bytes | None) -> bytes:
    """The RFC 6455 header of one unfragmented binary frame (FIN, opcode 2) of ``length``
    payload bytes, with the masking key when given (frames a client sends are masked)."""
    bit = 0x80 if mask is not None else 0
    if length < 126:
        head = _HEAD_SHORT.pack(0x82, bit | length)
    elif length < 65536:
        head = _HEAD_MEDIUM.pack(0x82, bit | 126, length)
    else:
        head = _HEAD_LONG.pack(0x82, bit | 127, length)
    return head + mask if mask is not None else head


def _wire_bytes(frames: list[bytes], masked: bool) -> bytes:
    """``frames`` as websocket binary frames, back to back, in one buffer."""
    chunks: list[bytes] = []
    for frame in frames:
        if masked:
            mask = secrets.token_bytes(4)
            chunks += (_ws_header(len(frame), mask), apply_mask(frame, mask))
        else:
            chunks += (_ws_header(len(frame), None), frame)
    return b"".join(chunks)


async def _send_frames(ws: Connection, frames: list[bytes]) -> None:
    """Send each frame as one binary websocket message, all in one transport write.

    Like ``ws.send`` per frame (same connection checks, failure handling and drain through
    ``send_context``), but cheaper on the hot path: websockets serialises a frame by copying
    it into a ``BytesIO`` and out again, and asyncio's ``writelines`` (Python 3.11) joins the
    chunks once more, so a 1 MB comm buffer was copied four times on its way to the socket.
    Here the headers and frames are joined once, and the burst costs one ``send()`` and one
    wake-up of the peer. The tunnel negotiates no extension (``compression=None``); should a
    connection have one, websockets frames the messages itself. Only unfragmented messages
    are sent on the tunnel, so writing whole frames never splits a fragmented one.
    """
    async with ws.send_context():
        protocol = ws.protocol
        if protocol.extensions:
            for frame in frames:
                protocol.send_binary(frame)
            return  # send_context writes them
        ws.send_data()  # anything websockets queued goes first (normally nothing)
        ws.transport.write(_wire_bytes(frames, protocol.side is Side.CLIENT))


class Bridge:
    """Pumps one tunnel session between ZMQ sockets and the currently attached websocket.

    ``outbound`` sockets are read and their messages sent through the tunnel; DATA frames
    arriving on a channel are written to the ``inbound`` socket of that channel. The same
    socket may appear in both maps (shell, stdin, control, hb are two-way).

    Ordering after a reconnect: :meth:`attach` only takes the peer's resume point;
    :meth:`serve` replays what the peer missed *while receiving* (so acks and keepalive pongs
    are heard during a long replay), and adopts the websocket for live frames only once the
    replay has caught up. Frames the pumps produce meanwhile are kept by the tunnel and sent
    by the replay, so live output can never overtake replayed output.

    Flow control: while attached, a pump stops reading its ZMQ socket when more than half of
    ``tunnel.max_unacked_bytes`` awaits acknowledgement, and resumes as acks arrive, so a
    healthy but slower peer applies back-pressure instead of overflowing the buffer. While
    detached, pumps keep buffering up to the bound; beyond it the session fails.
    """

    def __init__(
        self,
        tunnel: Tunnel,
        *,
        outbound: Mapping[Channel, zmq.asyncio.Socket],
        inbound: Mapping[Channel, zmq.asyncio.Socket],
        on_control: ControlHandler,
        on_failure: Callable[[JupyterIOError], None] | None = None,
        log: logging.Logger | logging.LoggerAdapter[Any] | None = None,
        ack_interval: float = 0.05,
        gates: Mapping[Channel, Gate] | None = None,
        taps: Mapping[Channel, Tap] | None = None,
    ) -> None:
        """``gates`` and ``taps`` (per channel) let the file channel hold an execute_request
        until local edits are sent, and hear execute_replies; channels without one pay
        nothing."""
        self.tunnel = tunnel
        self.gates = dict(gates or {})
        self.taps = dict(taps or {})
        self._window = asyncio.Event()
        self._window_limit: int | None = None
        self.outbound = dict(outbound)
        self.inbound = dict(inbound)
        self.on_control = on_control
        self.on_failure = on_failure
        self.log = log or logging.getLogger(__name__)
        self.ack_interval = ack_interval
        #: The websocket live frames go to (None while detached or replaying).
        self.ws: Connection | None = None
        #: Set when an unrecoverable error (e.g. buffer overflow) ended the session.
        self.failure: JupyterIOError | None = None
        self._pumps: list[asyncio.Task[None]] = []
        self._failed = asyncio.Event()
        self._acked = asyncio.Event()
        self._ack_wanted = asyncio.Event()
        self._latest: Connection | None = None
        self._high_water = tunnel.max_unacked_bytes // 2
        #: Loop time of the last kernel message (a DATA frame of any channel but the
        #: heartbeat's) sent or received: bulk senders keep out of its way
        #: (:meth:`kernel_quiet`).
        self.kernel_at = 0.0

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
        """Take a freshly handshaken websocket and the peer's resume point.

        Nothing is sent yet: :meth:`serve` replays what the peer has not received.
        """
        self.detach()
        self._latest = ws
        self.tunnel.acknowledge(peer_received)

    def detach(self, ws: Connection | None = None) -> None:
        """Forget the websocket (only if it is still ``ws``, when given)."""
        if ws is None or self.ws is ws:
            self.ws = None
            self._acked.set()  # pumps waiting for acks go back to buffering

    async def serve(self, ws: Connection) -> None:
        """Replay, then carry live traffic on ``ws`` until it closes; returns after detaching.

        A protocol violation by the peer closes the websocket with a reason and ends only
        this connection; the session (and its kernel) waits for a resume.
        """
        replay = asyncio.create_task(self._replay(ws))
        flusher = asyncio.create_task(self._flush_acks(ws))
        failed = asyncio.create_task(self._failed.wait())
        receiver = asyncio.create_task(self._receive(ws))
        tasks = (replay, flusher, failed, receiver)
        try:
            await asyncio.wait({receiver, failed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                    await task
            self.detach(ws)
        if self.failure is not None:
            await ws.close(CloseCode.BUFFER_OVERFLOW, str(self.failure)[:120])

    async def _replay(self, ws: Connection) -> None:
        # Everything the peer has not acknowledged, including frames kept since attach().
        pending = self.tunnel.replay(self.tunnel.peer_acked)
        while pending:
            before = self.tunnel.sent
            for frame in pending:
                await ws.send(frame)
            produced = self.tunnel.sent - before
            # Frames made while we awaited were kept (no websocket): they are the newest.
            pending = self.tunnel.replay(self.tunnel.peer_acked)[-produced:] if produced else []
        if self._latest is ws:  # not replaced by a newer connection meanwhile
            self.ws = ws

    # -- sending ---------------------------------------------------------------------------

    async def send_control(self, kind: FrameKind, body: dict[str, Any] | None = None) -> None:
        """Send a reliable control frame now, or on the next attach if disconnected."""
        frame = self.tunnel.send_control(kind, body)
        await self._write(frame)

    async def send_chunk(self, parts: Sequence[bytes]) -> None:
        """Send one FILE_CHUNK now, or on the next attach if disconnected. Bulk senders
        call :meth:`wait_window` first."""
        frame = self.tunnel.send_chunk(parts)
        ws = self.ws
        if ws is None:
            return  # kept in the tunnel; replayed on the next attach
        try:
            await _send_frames(ws, [frame])  # one copy less than ws.send for 1 MB
        except ConnectionClosed:
            self.detach(ws)

    async def send_ack(self) -> None:
        """Acknowledge what arrived, now: a bulk receiver calls it once it has stored a
        chunk, so that the sender's window moves on that rather than on a timer."""
        ws = self.ws
        if ws is not None and self.tunnel.ack_pending:
            try:
                await ws.send(self.tunnel.ack_frame())
            except ConnectionClosed:
                self.detach(ws)

    def kernel_quiet(self, seconds: float) -> bool:
        """True when no kernel message (heartbeats aside) went either way in the last
        ``seconds``: a bulk sender may then use its whole window, and otherwise keeps to
        the least it needs so that the kernel's messages find the tunnel and both ends'
        CPUs free."""
        return asyncio.get_running_loop().time() - self.kernel_at >= seconds

    async def wait_window(self, limit: int) -> None:
        """Return once at most ``limit`` bytes of sent frames await acknowledgement: a bulk
        sender keeps at most that much queued ahead of the kernel's next message."""
        while self.tunnel.unacked_bytes > limit:
            self._window_limit = limit
            self._window.clear()
            await self._window.wait()

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
        # One awaited recv per wake-up, then drain what else is ready through a plain shadow
        # socket (no pyzmq future per message), and send the burst with one transport write.
        send_data = self.tunnel.send_data
        tunnel = self.tunnel
        raw: zmq.Socket[Any] = zmq.Socket.shadow(sock.underlying)
        recv_ready = raw.recv_multipart
        events: Callable[[int], int] = raw.getsockopt  # type: ignore[assignment]
        gate = self.gates.get(channel)
        held: list[bytes] | None = None
        loop = asyncio.get_running_loop()
        kernel = channel is not Channel.HB
        try:
            while True:
                if held is None:
                    parts = await sock.recv_multipart()
                    wait = gate(parts) if gate is not None else None
                    if wait is not None:
                        await wait
                else:
                    parts, held = held, None
                burst = [send_data(channel, parts)]
                size = len(burst[0])
                if kernel:
                    self.kernel_at = loop.time()
                # EVENTS before each recv: a message-less socket costs no zmq.Again raised.
                while (
                    len(burst) < _BURST and size < _BURST_BYTES and events(zmq.EVENTS) & zmq.POLLIN
                ):
                    try:
                        parts = recv_ready(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if gate is not None:
                        wait = gate(parts)
                        if wait is not None:
                            # Send what has its seqs first; the held message waits.
                            held = parts
                            break
                    burst.append(send_data(channel, parts))
                    size += len(burst[-1])
                ws = self.ws
                if ws is not None:
                    # Frames got their seqs above and are written before any await, so they
                    # leave in seq order (the websocket writes before it awaits drain).
                    try:
                        await _send_frames(ws, burst)
                    except ConnectionClosed:
                        self.detach(ws)
                    while self.ws is not None and tunnel.unacked_bytes > self._high_water:
                        self._acked.clear()
                        await self._acked.wait()
                if held is not None and wait is not None:
                    await wait
                if len(burst) == _BURST or size >= _BURST_BYTES:
                    await asyncio.sleep(0)  # a busy socket must not starve the event loop
        except JupyterIOError as exc:
            self._fail(exc)
        except (zmq.ZMQError, OSError) as exc:
            self._fail(JupyterIOError(f"{channel.name} socket failed: {exc}"))

    def _fail(self, exc: JupyterIOError) -> None:
        self.log.error("tunnel session failed: %s", exc)
        self.failure = exc
        self._failed.set()
        if self.on_failure is not None:
            self.on_failure(exc)

    # -- receiving -------------------------------------------------------------------------

    async def _receive(self, ws: Connection) -> None:
        receive = self.tunnel.receive
        tunnel = self.tunnel
        inbound = self.inbound
        loop = asyncio.get_running_loop()
        try:
            async for message in ws:
                if isinstance(message, str):
                    raise ProtocolError("text message on the tunnel; frames are binary")
                frame = receive(message, views=True)
                if not self._acked.is_set() and tunnel.unacked_bytes <= self._high_water:
                    self._acked.set()
                limit = self._window_limit
                if limit is not None and tunnel.unacked_bytes <= limit:
                    self._window_limit = None
                    self._window.set()
                if frame is None:
                    continue
                if frame.kind is FrameKind.DATA:
                    if frame.channel is not Channel.HB:
                        self.kernel_at = loop.time()
                    sock = inbound.get(frame.channel)
                    if sock is None:
                        raise ProtocolError(f"no {frame.channel.name} channel in this direction")
                    # Large parts go zero-copy (a view of the frame that libzmq releases later).
                    parts = frame.parts
                    await sock.send_multipart(parts, copy=len(parts[-1]) < VIEW_THRESHOLD)
                    tap = self.taps.get(frame.channel) if self.taps else None
                    if tap is not None:
                        tap(parts)
                else:
                    result = self.on_control(frame)
                    if result is not None:
                        await result
                if tunnel.ack_due:
                    await ws.send(tunnel.ack_frame())
                elif tunnel.ack_pending:
                    self._ack_wanted.set()
        except ProtocolError as exc:
            self.log.warning("closing tunnel connection: %s", exc)
            await ws.close(CloseCode.PROTOCOL_ERROR, str(exc)[:120])
        except ConnectionClosed:
            pass

    async def _flush_acks(self, ws: Connection) -> None:
        # Armed only when something arrived unacknowledged: idle sessions never wake up.
        while True:
            await self._ack_wanted.wait()
            await asyncio.sleep(self.ack_interval)
            self._ack_wanted.clear()
            if self.tunnel.ack_pending:
                try:
                    await ws.send(self.tunnel.ack_frame())
                except ConnectionClosed:
                    return
