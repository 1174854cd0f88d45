"""The kernel tunnel's wire protocol: a sans-I/O codec and session state machine.

Nothing here touches a socket or an event loop. Both ends of the tunnel (the provisioner's
local facade and the provider host) and the byte-copying relay import this module; they only
move the bytes it produces and act on the frames it returns.

One websocket binary message carries exactly one frame. All integers are little-endian::

    offset  size  field
    0       1     kind      FrameKind
    1       1     channel   Channel (DATA frames; 0 otherwise)
    2       2     nparts    number of parts that follow (at most MAX_PARTS)
    4       8     seq       sequence number of a reliable frame, 0 for unsequenced frames
    12      8     ack       cumulative ack: highest in-order seq the sender has received
    20      4*n   lengths   byte length of each part
    ...           parts     the parts, back to back

This is the shape of Jupyter's ``v1.kernel.websocket.jupyter.org`` framing (an offset table,
a channel, the raw parts), extended with what a resumable tunnel needs. DATA parts are the raw
ZMQ multipart frames of a Jupyter message, routing identities, ``<IDS|MSG>`` delimiter and
HMAC signature included: they are never re-serialised. Control frames carry a single part, a
UTF-8 JSON object; they are rare and not on the hot path.

The handshake (CHALLENGE → HELLO → WELCOME, or ERROR) and ACK frames are unsequenced. Every
other frame is *reliable*: it gets the next sequence number, is kept by the sender until the
peer acknowledges it, and is replayed after a reconnect. Acks are cumulative and piggy-backed
on every frame; a receiver with nothing to send emits a standalone ACK when
:attr:`Tunnel.ack_due` says so (and the I/O layer flushes pending acks on a short timer).

Start with :class:`Tunnel`: ``send_data()`` / ``send_control()`` to produce bytes,
``receive()`` to consume them, ``replay()`` after a reconnect.
"""

from __future__ import annotations

import enum
import json
import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import BufferOverflow, FrameTooLarge, ProtocolError

__all__ = [
    "BINARY_KINDS",
    "DEFAULT_MAX_FRAME_SIZE",
    "HANDSHAKE_MAX_FRAME_SIZE",
    "HEADER",
    "MAX_CONTROL_SIZE",
    "MAX_PARTS",
    "PROGRESS_STATES",
    "PROGRESS_STEPS",
    "PROTOCOL_VERSION",
    "SUBPROTOCOL",
    "TUNNEL_PATH",
    "VIEW_THRESHOLD",
    "Channel",
    "CloseCode",
    "Frame",
    "FrameKind",
    "Progress",
    "Tunnel",
    "decode_frame",
    "encode_control",
    "encode_frame",
]

#: Version spoken in CHALLENGE and HELLO. Bump on any incompatible change.
PROTOCOL_VERSION = 1
#: Websocket subprotocol both ends request.
SUBPROTOCOL = "jupyter-io.tunnel.v1"
#: The HTTP path a provider host serves its tunnel websocket on.
TUNNEL_PATH = "/tunnel"
#: Default largest frame accepted (a 10 MB comm buffer fits many times over).
DEFAULT_MAX_FRAME_SIZE = 64 * 1024 * 1024
#: Largest websocket message the host (and the coordinator's relay) accepts before WELCOME; a
#: HELLO with the longest lease token fits. Until the host has verified HELLO it reads no more
#: than this, so an unauthenticated peer costs it a few KB; a client pipelines behind HELLO
#: only frames that fit (the others go in the replay after WELCOME).
HANDSHAKE_MAX_FRAME_SIZE = 8 * 1024
#: A Jupyter message has a handful of parts plus buffers; this bounds the offset table.
MAX_PARTS = 4096
#: Largest control frame body (JSON). Parsed, JSON costs ~25x its size in Python objects, so
#: a 64 MiB LAUNCH would cost its receiver gigabytes; a kernel's environment, the largest body,
#: cannot pass 2 MiB anyway (Linux's ARG_MAX share for exec).
MAX_CONTROL_SIZE = 1024 * 1024

HEADER = struct.Struct("<BBHQQ")
#: DATA parts at least this large are decoded as memoryviews when asked (``views``).
VIEW_THRESHOLD = 64 * 1024


class FrameKind(enum.IntEnum):
    """What a frame is. Unsequenced kinds: CHALLENGE, HELLO, WELCOME, ACK, ERROR."""

    DATA = 0
    """Raw ZMQ multipart frames of one Jupyter message on ``channel``. Both directions."""
    CHALLENGE = 1
    """host → client, first frame: ``{"version", "nonce", "host"}`` (nonce hex, host pubkey)."""
    HELLO = 2
    """client → host: ``{"version", "pubkey", "signature", "session", "received", ...}``.

    ``session`` is None for a new session or the id to resume; ``received`` is the highest
    seq the client has received from the host in that session (0 for a new session)."""
    WELCOME = 3
    """host → client: ``{"session", "received", "resumed", "kernel"}``; the client then
    replays its unacked frames above ``received``."""
    ACK = 4
    """Standalone cumulative ack (``ack`` header field), no parts."""
    LAUNCH = 5
    """client → host: start (or restart) the kernel: ``{"key", "signature_scheme", "env"}``."""
    SIGNAL = 6
    """client → host: deliver ``{"signum"}`` to the kernel's process group."""
    STARTED = 7
    """host → client: a kernel is running: ``{"generation", "pid"}``."""
    EXITED = 8
    """host → client: the kernel process ended: ``{"generation", "exit_code"}``."""
    END = 9
    """client → host: end the session: stop the kernel, delete its workspace, close."""
    ERROR = 10
    """Either way, then close: ``{"code", "reason"}``. Unsequenced."""
    PROGRESS = 11
    """host → client: a step of a LAUNCH the host is working on before STARTED/EXITED:
    ``{"step", "state", "message"}``, :data:`PROGRESS_STEPS` and :data:`PROGRESS_STATES`
    (``{"step": "environment", "state": "building", "timeout"}``: the host is building the
    lease's course environment and may take up to ``timeout`` more seconds). Sent only for
    a lease that asks for such a step (a cohort's environment), so older clients never
    meet it."""
    FILES = 12
    """Either way: a message of the file channel (:mod:`jupyter_io.files`): ``{"op": "offer"
    | "want" | "done" | "pull" | "seal", "id", ...}`` (``seal``: a streamed file's whole
    digest after its last chunk, only to a pull that asked for streams). Sent only to a host
    whose WELCOME lists ``"files"`` in its ``features``."""
    FILE_CHUNK = 13
    """Either way: content of a file transfer, two parts: a header
    (:data:`jupyter_io.files.CHUNK_HEADER`) and up to 1 MiB of bytes."""


#: Kinds whose parts are raw bytes, not one JSON body.
BINARY_KINDS = frozenset({FrameKind.DATA, FrameKind.FILE_CHUNK})

#: PROGRESS ``step`` values.
PROGRESS_STEPS = frozenset({"environment"})
#: PROGRESS ``state`` values.
PROGRESS_STATES = frozenset({"building", "ready", "failed"})

UNSEQUENCED = frozenset(
    {FrameKind.CHALLENGE, FrameKind.HELLO, FrameKind.WELCOME, FrameKind.ACK, FrameKind.ERROR}
)


class Channel(enum.IntEnum):
    """The five Jupyter channels."""

    SHELL = 0
    IOPUB = 1
    STDIN = 2
    CONTROL = 3
    HB = 4


class CloseCode(enum.IntEnum):
    """Websocket close codes the tunnel uses (RFC 6455 plus private 4xxx codes)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    POLICY_VIOLATION = 1008
    TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    UNKNOWN_SESSION = 4004
    VERSION_MISMATCH = 4005
    BUFFER_OVERFLOW = 4006
    SESSION_ENDED = 4010


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame. ``parts`` are bytes (DATA) or a single JSON part (control);
    large DATA parts are memoryviews when decoded with ``views`` (see :func:`decode_frame`).
    """

    kind: FrameKind
    channel: Channel = Channel.SHELL
    seq: int = 0
    ack: int = 0
    parts: Sequence[bytes] = field(default_factory=tuple)

    @property
    def body(self) -> dict[str, Any]:
        """The JSON object of a control frame (``{}`` when it has no part).

        Raises :class:`ProtocolError` when the part is not a UTF-8 JSON object, nests
        deeper than Python's recursion limit, or holds an integer of more than 4300 digits.
        """
        if not self.parts:
            return {}
        try:
            value = json.loads(self.parts[0])
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, huge integers
            raise ProtocolError(f"{self.kind.name} frame body is not JSON: {exc}") from None
        except RecursionError:
            raise ProtocolError(f"{self.kind.name} frame body nests too deeply") from None
        if not isinstance(value, dict):
            raise ProtocolError(f"{self.kind.name} frame body must be a JSON object")
        return value


@dataclass(frozen=True, slots=True)
class Progress:
    """The body of a PROGRESS frame (see :attr:`FrameKind.PROGRESS`)."""

    step: str
    state: str
    message: str
    #: With ``state == "building"``: the most seconds the step may still take.
    timeout: float | None = None

    @classmethod
    def parse(cls, body: dict[str, Any]) -> Progress:
        """Check a PROGRESS body; :class:`ProtocolError` naming what is wrong."""
        step, state, message = body.get("step"), body.get("state"), body.get("message")
        if step not in PROGRESS_STEPS:
            raise ProtocolError(f"PROGRESS 'step' must be one of {sorted(PROGRESS_STEPS)}")
        if state not in PROGRESS_STATES:
            raise ProtocolError(f"PROGRESS 'state' must be one of {sorted(PROGRESS_STATES)}")
        if not isinstance(message, str):
            raise ProtocolError("PROGRESS 'message' must be a string")
        timeout = body.get("timeout")
        if timeout is not None and (type(timeout) not in (int, float) or not 0 <= timeout <= 1e9):
            raise ProtocolError("PROGRESS 'timeout' must be seconds between 0 and 1e9")
        return cls(step, state, message, None if timeout is None else float(timeout))

    def to_body(self) -> dict[str, Any]:
        """The JSON object to send with ``send_control(FrameKind.PROGRESS, ...)``."""
        body: dict[str, Any] = {"step": self.step, "state": self.state, "message": self.message}
        if self.timeout is not None:
            body["timeout"] = self.timeout
        return body


def encode_frame(
    kind: FrameKind,
    parts: Sequence[bytes] = (),
    *,
    channel: Channel = Channel.SHELL,
    seq: int = 0,
    ack: int = 0,
) -> bytes:
    """Serialise one frame. ``parts`` may be bytes, bytearray or memoryview objects."""
    n = len(parts)
    if n > MAX_PARTS:
        raise FrameTooLarge(f"a frame carries at most {MAX_PARTS} parts, not {n}")
    head = HEADER.pack(kind, channel, n, seq, ack)
    lengths = struct.pack(f"<{n}I", *map(len, parts))
    return b"".join((head, lengths, *parts))


def encode_control(
    kind: FrameKind, body: dict[str, Any] | None = None, *, seq: int = 0, ack: int = 0
) -> bytes:
    """Serialise a control frame whose single part is ``body`` as compact JSON.

    Raises :class:`FrameTooLarge` when the JSON exceeds :data:`MAX_CONTROL_SIZE`.
    """
    parts = () if body is None else (json.dumps(body, separators=(",", ":")).encode(),)
    if parts and len(parts[0]) > MAX_CONTROL_SIZE:
        raise FrameTooLarge(
            f"{kind.name} body of {len(parts[0])} bytes exceeds the {MAX_CONTROL_SIZE} bytes a "
            f"control frame may carry; a kernel's environment must be smaller than that"
        )
    return encode_frame(kind, parts, seq=seq, ack=ack)


def decode_frame(
    data: bytes, max_size: int = DEFAULT_MAX_FRAME_SIZE, *, views: bool = False
) -> Frame:
    """Parse one frame, checking every length against ``data``.

    With ``views``, DATA parts of :data:`VIEW_THRESHOLD` bytes or more are returned as
    read-only memoryviews into ``data`` instead of copies: for a caller that only hands the
    parts on (``zmq.Socket.send_multipart`` takes them), not one that parses them.

    Raises :class:`FrameTooLarge` above ``max_size`` (or a control body above
    :data:`MAX_CONTROL_SIZE`) and :class:`ProtocolError` for anything truncated, trailing, or
    naming an unknown kind or channel. Never reads past ``data``.
    """
    size = len(data)
    if size > max_size:
        raise FrameTooLarge(f"frame of {size} bytes exceeds the maximum of {max_size} bytes")
    if size < HEADER.size:
        raise ProtocolError(f"truncated frame: {size} bytes, the header alone is {HEADER.size}")
    raw_kind, raw_channel, n, seq, ack = HEADER.unpack_from(data)
    try:
        kind = FrameKind(raw_kind)
    except ValueError:
        raise ProtocolError(f"unknown frame kind {raw_kind}") from None
    try:
        channel = Channel(raw_channel)
    except ValueError:
        raise ProtocolError(f"unknown channel {raw_channel}") from None
    if n > MAX_PARTS:
        raise ProtocolError(f"frame declares {n} parts, the maximum is {MAX_PARTS}")
    if kind in UNSEQUENCED and seq:
        raise ProtocolError(f"{kind.name} frames are unsequenced but carry seq {seq}")
    if kind not in UNSEQUENCED and not seq:
        raise ProtocolError(f"{kind.name} frame without a sequence number")
    table_end = HEADER.size + 4 * n
    if size < table_end:
        raise ProtocolError(f"truncated frame: the table of {n} part lengths is cut off")
    lengths = struct.unpack_from(f"<{n}I", data, HEADER.size)
    if table_end + sum(lengths) != size:
        raise ProtocolError(
            f"frame length mismatch: parts add up to {table_end + sum(lengths)} bytes, "
            f"the frame has {size}"
        )
    if kind is FrameKind.FILE_CHUNK and n != 2:
        raise ProtocolError(f"FILE_CHUNK frame must have 2 parts, not {n}")
    if kind not in BINARY_KINDS and n and lengths[0] > MAX_CONTROL_SIZE:
        raise FrameTooLarge(
            f"{kind.name} body of {lengths[0]} bytes exceeds the maximum of {MAX_CONTROL_SIZE}"
        )
    view = memoryview(data)
    parts: list[bytes] = []
    pos = table_end
    views = views and kind in BINARY_KINDS
    for length in lengths:
        # Large DATA parts (comm buffers, bulk output) stay views of ``data``: the copy is
        # cheap, the fresh pages a megabyte-sized copy needs are not.
        part = view[pos : pos + length]
        large = views and length >= VIEW_THRESHOLD
        parts.append(part if large else part.tobytes())  # type: ignore[arg-type]
        pos += length
    if kind is FrameKind.DATA and not parts:
        raise ProtocolError(f"{channel.name} DATA frame with no parts")
    if kind not in BINARY_KINDS and len(parts) > 1:
        raise ProtocolError(f"{kind.name} frame must have at most one part, not {len(parts)}")
    return Frame(kind, channel, seq, ack, tuple(parts))


class Tunnel:
    """Sequencing, acknowledgement and replay for one end of one tunnel session.

    The object outlives websocket connections: keep it for the whole session, call
    :meth:`replay` after each reconnect, and feed it every received message with
    :meth:`receive`. It holds every reliable frame it sent until the peer acknowledges it,
    bounded by ``max_unacked_bytes``; exceeding the bound raises :class:`BufferOverflow`,
    which ends the session (data that cannot be kept must not be silently dropped).
    """

    def __init__(
        self,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        max_unacked_bytes: int = 256 * 1024 * 1024,
        ack_every_frames: int = 64,
        ack_every_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        self.max_frame_size = max_frame_size
        self.max_unacked_bytes = max_unacked_bytes
        self.ack_every_frames = ack_every_frames
        self.ack_every_bytes = ack_every_bytes
        #: Last sequence number this end assigned.
        self.sent = 0
        #: Highest in-order sequence number received from the peer.
        self.received = 0
        #: Highest of our sequence numbers the peer acknowledged.
        self.peer_acked = 0
        self._unacked: deque[tuple[int, bytes]] = deque()
        self._unacked_bytes = 0
        self._ack_sent = 0
        self._bytes_since_ack = 0

    # -- sending ---------------------------------------------------------------------------

    def send_data(self, channel: Channel, parts: Sequence[bytes]) -> bytes:
        """Sequence the ZMQ ``parts`` of one message on ``channel``; return the frame bytes."""
        return self._keep(
            encode_frame(
                FrameKind.DATA, parts, channel=channel, seq=self.sent + 1, ack=self.received
            )
        )

    def send_chunk(self, parts: Sequence[bytes]) -> bytes:
        """Sequence one FILE_CHUNK (parts from :func:`jupyter_io.files.encode_chunk`)."""
        return self._keep(
            encode_frame(FrameKind.FILE_CHUNK, parts, seq=self.sent + 1, ack=self.received)
        )

    def send_control(self, kind: FrameKind, body: dict[str, Any] | None = None) -> bytes:
        """Sequence a reliable control frame (LAUNCH, SIGNAL, STARTED, EXITED, END)."""
        if kind in UNSEQUENCED or kind in BINARY_KINDS:
            raise ValueError(f"{kind.name} is not a reliable control frame")
        return self._keep(encode_control(kind, body, seq=self.sent + 1, ack=self.received))

    def _keep(self, frame: bytes) -> bytes:
        if len(frame) > self.max_frame_size:
            raise FrameTooLarge(
                f"message of {len(frame)} bytes exceeds the tunnel's maximum frame size of "
                f"{self.max_frame_size} bytes"
            )
        if self._unacked_bytes + len(frame) > self.max_unacked_bytes:
            raise BufferOverflow(
                f"{self._unacked_bytes + len(frame)} bytes await acknowledgement, more than the "
                f"bound of {self.max_unacked_bytes}; the peer is gone or too slow"
            )
        self.sent += 1
        self._unacked.append((self.sent, frame))
        self._unacked_bytes += len(frame)
        self._ack_sent = self.received
        self._bytes_since_ack = 0
        return frame

    def ack_frame(self) -> bytes:
        """A standalone ACK for everything received so far."""
        self._ack_sent = self.received
        self._bytes_since_ack = 0
        return encode_frame(FrameKind.ACK, ack=self.received)

    @property
    def ack_due(self) -> bool:
        """True when enough arrived unacknowledged that a standalone ACK should go now."""
        return (
            self.received - self._ack_sent >= self.ack_every_frames
            or self._bytes_since_ack >= self.ack_every_bytes
        )

    @property
    def ack_pending(self) -> bool:
        """True when anything received has not been acknowledged yet (flush on a timer)."""
        return self.received > self._ack_sent

    @property
    def unacked_bytes(self) -> int:
        """Bytes of sent frames the peer has not acknowledged."""
        return self._unacked_bytes

    @property
    def unacked_frames(self) -> int:
        """Number of sent frames the peer has not acknowledged."""
        return len(self._unacked)

    # -- receiving -------------------------------------------------------------------------

    def receive(self, data: bytes, *, views: bool = False) -> Frame | None:
        """Decode one message from the peer (``views``: see :func:`decode_frame`).

        Applies its ack, and returns the frame, or None for a standalone ACK or a reliable
        frame already received (a replay overlap). A gap in sequence numbers is a protocol
        error: the transport is ordered, so a gap means a broken peer.
        """
        frame = decode_frame(data, self.max_frame_size, views=views)
        self.acknowledge(frame.ack)
        if frame.kind in UNSEQUENCED:
            return None if frame.kind is FrameKind.ACK else frame
        if frame.seq <= self.received:
            return None
        if frame.seq != self.received + 1:
            raise ProtocolError(
                f"sequence gap: expected frame {self.received + 1}, got {frame.seq}"
            )
        self.received = frame.seq
        self._bytes_since_ack += len(data)
        return frame

    def acknowledge(self, ack: int) -> None:
        """Drop every kept frame up to ``ack`` (cumulative; stale acks are ignored)."""
        if ack <= self.peer_acked:
            return
        if ack > self.sent:
            raise ProtocolError(f"peer acknowledges frame {ack}, only {self.sent} were sent")
        self.peer_acked = ack
        unacked = self._unacked
        while unacked and unacked[0][0] <= ack:
            self._unacked_bytes -= len(unacked.popleft()[1])

    # -- reconnecting ----------------------------------------------------------------------

    def replay(self, peer_received: int) -> list[bytes]:
        """Frames to resend after a reconnect, given the peer's last received seq.

        The peer's ``received`` acknowledges everything up to it; the rest is returned in
        order (their embedded acks are stale, which cumulative acks tolerate).
        """
        self.acknowledge(peer_received)
        return [frame for _, frame in self._unacked]

    def handshake_state(self) -> dict[str, int]:
        """What this end reports in HELLO/WELCOME so the peer knows where to resume."""
        return {"received": self.received}
