"""Websocket frames as the relay passes them on: unmasked and re-framed, payloads untouched.

Both sides of a relayed connection are websocket *clients* of the coordinator, so each sends
masked frames (RFC 6455 section 5.3) and expects unmasked ones. A :class:`FrameForwarder`
per direction turns the bytes one side sends into the bytes the other side must receive:
for every frame, the same FIN bit, opcode and payload, without the mask. Nothing else is
read: no UTF-8 check of text, no reassembly of fragmented messages, no reaction to pings
(they travel end to end, and so do pongs and close frames, whose code is therefore passed on
exactly). Sans-I/O: :meth:`FrameForwarder.feed` takes bytes and returns bytes; the relay's
pumps (:mod:`jupyter_io.coordinator.relay`) do the reading and writing.

Protocol violations that would make the forwarded stream invalid (an unmasked frame, reserved
bits, an unknown opcode, a fragmented or long control frame, a stray continuation, a message
over the size limit) raise :class:`FrameError` with the close code to send.
"""

from __future__ import annotations

import struct

try:  # websockets' C implementation; the pure-Python one is 100x slower on large frames
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - a build without the C extension
    from websockets.utils import apply_mask

__all__ = [
    "OP_BINARY",
    "OP_CLOSE",
    "OP_CONTINUATION",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "FrameError",
    "FrameForwarder",
    "encode_close",
    "encode_frame",
]

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA
_DATA = frozenset({OP_CONTINUATION, OP_TEXT, OP_BINARY})
_CONTROL = frozenset({OP_CLOSE, OP_PING, OP_PONG})

_FIN = 0x80
_RSV = 0x70
_MASK = 0x80
_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")


class FrameError(Exception):
    """The peer broke the websocket framing; close it with ``code`` (1002 or 1009)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _header(first: int, length: int) -> bytes:
    if length < 126:
        return bytes((first, length))
    if length < 1 << 16:
        return bytes((first, 126)) + _U16.pack(length)
    return bytes((first, 127)) + _U64.pack(length)


def encode_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """One unmasked frame, as a server sends it."""
    return _header((_FIN if fin else 0) | opcode, len(payload)) + payload


def encode_close(code: int, reason: str = "") -> bytes:
    """An unmasked close frame with ``code`` and up to 123 bytes of ``reason``."""
    text = reason.encode()[:123]
    return encode_frame(OP_CLOSE, _U16.pack(code) + text)


class FrameForwarder:
    """Re-frames one direction of a relayed connection (see the module docstring).

    Call :meth:`feed` with whatever bytes arrived; send what it returns to the other side.
    Once a close frame has passed, :attr:`closed` is true, :attr:`close_code` and
    :attr:`close_reason` say what it carried, and further input is ignored.
    """

    __slots__ = ("_buffer", "_fragmented", "_full_size", "_message_size", "_until",
                 "close_code", "close_reason", "closed", "max_size")  # fmt: skip

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.closed = False
        self.close_code: int | None = None
        self.close_reason = ""
        self._buffer = bytearray()
        self._fragmented = False
        self._message_size = 0
        self._full_size = max_size
        self._until: bytes | None = None

    @property
    def held(self) -> bool:
        """True between :meth:`hold` and :meth:`lift`."""
        return self._until is not None or self.max_size < self._full_size

    def hold(self, max_size: int, *, until_kind: int | None = None) -> None:
        """Accept messages of at most ``max_size`` bytes until :meth:`lift`; with
        ``until_kind``, also until a binary message whose first payload byte is that value
        has passed (the tunnel's WELCOME: frames behind it in the same read get the full
        limit). The relay holds both sides this way until the tunnel handshake is over."""
        self.max_size = min(max_size, self._full_size)
        self._until = None if until_kind is None else bytes((until_kind,))

    def lift(self) -> None:
        """Back to the size given at construction."""
        self.max_size = self._full_size
        self._until = None

    def feed(self, data: bytes) -> bytes:
        """The frames ``data`` completes, re-framed for the other side (``b""`` if none)."""
        if self.closed:
            return b""
        buffer = self._buffer
        if buffer:
            buffer += data
            view: bytes | bytearray = buffer
        else:
            view = data
        size = len(view)
        offset = 0
        out: list[bytes] = []
        while size - offset >= 2:
            first, second = view[offset], view[offset + 1]
            if first & _RSV:
                raise FrameError(1002, "reserved bits set (no extension was negotiated)")
            if not second & _MASK:
                raise FrameError(1002, "a client frame must be masked")
            opcode = first & 0x0F
            length = second & 0x7F
            start = offset + 2
            if length == 126:
                if size - start < 2:
                    break
                length = _U16.unpack_from(view, start)[0]
                start += 2
            elif length == 127:
                if size - start < 8:
                    break
                length = _U64.unpack_from(view, start)[0]
                start += 8
            # The header alone decides, before any of the payload is waited for and buffered.
            message_size = self._check(first, opcode, length)
            end = start + 4 + length
            if size < end:
                break
            if opcode not in _CONTROL:  # control frames may come between fragments
                self._message_size = message_size
                self._fragmented = not first & _FIN
            payload = apply_mask(view[start + 4 : end], view[start : start + 4])
            if self._until is not None and opcode == OP_BINARY and payload[:1] == self._until:
                self.lift()
            out.append(_header(first, length))
            out.append(payload)
            offset = end
            if opcode == OP_CLOSE:
                self._closing(payload)
                break
        if offset:
            if view is buffer:
                del buffer[:offset]
            else:
                buffer += data[offset:]
        elif view is data:
            buffer += data
        if self.closed:
            buffer.clear()
        return b"".join(out)

    def _check(self, first: int, opcode: int, length: int) -> int:
        """Judge a frame by its header; return the size of its message so far (changes
        nothing: the frame counts once it is complete)."""
        if opcode in _CONTROL:
            if not first & _FIN or length > 125:
                raise FrameError(1002, "control frames must be final and at most 125 bytes")
            return self._message_size
        if opcode not in _DATA:
            raise FrameError(1002, f"unknown opcode {opcode:#x}")
        if opcode == OP_CONTINUATION:
            if not self._fragmented:
                raise FrameError(1002, "continuation frame without a message to continue")
            size = self._message_size + length
        else:
            if self._fragmented:
                raise FrameError(1002, "a new message started inside a fragmented one")
            size = length
        if size > self.max_size:
            raise FrameError(1009, f"message larger than {self.max_size} bytes")
        return size

    def _closing(self, payload: bytes) -> None:
        self.closed = True
        if len(payload) >= 2:
            self.close_code = _U16.unpack_from(payload)[0]
            self.close_reason = payload[2:].decode(errors="replace")
        elif payload:
            raise FrameError(1002, "a close frame's payload cannot be one byte")
