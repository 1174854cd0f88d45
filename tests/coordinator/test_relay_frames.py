"""The relay's frame forwarder, byte for byte and without sockets: masked client frames in,
the same frames unmasked out, whatever way the bytes are split; violations refused."""

from __future__ import annotations

import os
import struct

import pytest
from websockets.frames import Frame, Opcode
from websockets.utils import apply_mask

from jupyter_io.coordinator.relay_frames import (
    FrameError,
    FrameForwarder,
    encode_close,
    encode_frame,
)

MAX = 1 << 20


def masked(opcode: int, payload: bytes, *, fin: bool = True, rsv1: bool = False) -> bytes:
    """A frame as a websocket client sends it, valid or not (RFC 6455 section 5.2)."""
    mask = os.urandom(4)
    first = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    size = len(payload)
    if size < 126:
        head = bytes((first, 0x80 | size))
    elif size < 1 << 16:
        head = bytes((first, 0x80 | 126)) + struct.pack("!H", size)
    else:
        head = bytes((first, 0x80 | 127)) + struct.pack("!Q", size)
    return head + mask + apply_mask(payload, mask)


def unmasked_frames(data: bytes) -> list[tuple[bool, int, bytes]]:
    """Parse server frames: ``(fin, opcode, payload)`` each; a masked one fails."""
    frames = []
    i = 0
    while i < len(data):
        first, second = data[i], data[i + 1]
        assert not second & 0x80, "a server frame must not be masked"
        size = second & 0x7F
        i += 2
        if size == 126:
            size = struct.unpack_from("!H", data, i)[0]
            i += 2
        elif size == 127:
            size = struct.unpack_from("!Q", data, i)[0]
            i += 8
        frames.append((bool(first & 0x80), first & 0x0F, data[i : i + size]))
        i += size
    assert i == len(data), "truncated frame"
    return frames


def test_the_test_frames_are_what_websockets_clients_send() -> None:
    payload = os.urandom(70_000)
    ours = FrameForwarder(MAX).feed(masked(0x2, payload))
    theirs = Frame(Opcode.BINARY, payload).serialize(mask=True, extensions=None)
    assert FrameForwarder(MAX).feed(theirs) == ours


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 300_000])
def test_a_masked_frame_comes_out_unmasked_with_the_same_payload(size: int) -> None:
    payload = os.urandom(size)
    out = FrameForwarder(MAX).feed(masked(0x2, payload))
    assert out == encode_frame(0x2, payload)
    assert unmasked_frames(out) == [(True, 0x2, payload)]


def test_frames_split_anywhere_come_out_whole_and_in_order() -> None:
    messages = [
        masked(0x1, "ünïcode text".encode()),
        masked(0x2, os.urandom(70_000)),
        masked(0x9, b"ping"),
        masked(0x2, b"part one ", fin=False),
        masked(0xA, b"pong between fragments"),
        masked(0x0, b"part two ", fin=False),
        masked(0x0, b"end", fin=True),
    ]
    stream = b"".join(messages)
    expected = FrameForwarder(MAX).feed(stream)
    for chunk in (1, 2, 3, 7, 1000, 65_536):
        forwarder = FrameForwarder(MAX)
        out = b"".join(forwarder.feed(stream[i : i + chunk]) for i in range(0, len(stream), chunk))
        assert out == expected, chunk
    frames = unmasked_frames(expected)
    assert [(fin, opcode) for fin, opcode, _ in frames] == [
        (True, 0x1), (True, 0x2), (True, 0x9), (False, 0x2), (True, 0xA), (False, 0x0), (True, 0x0),
    ]  # fmt: skip
    assert frames[0][2].decode() == "ünïcode text"
    assert (
        b"".join(payload for _, _, payload in frames[3:] if payload != b"pong between fragments")
        == b"part one part two end"
    )


def test_a_close_frame_passes_with_its_code_and_nothing_after_it() -> None:
    forwarder = FrameForwarder(MAX)
    close = masked(0x8, struct.pack("!H", 4010) + b"session ended")
    out = forwarder.feed(masked(0x2, b"last") + close + masked(0x2, b"too late"))
    assert out == encode_frame(0x2, b"last") + encode_close(4010, "session ended")
    assert forwarder.closed and forwarder.close_code == 4010
    assert forwarder.close_reason == "session ended"
    assert forwarder.feed(masked(0x2, b"more")) == b""
    empty = FrameForwarder(MAX)
    assert empty.feed(masked(0x8, b"")) == encode_frame(0x8, b"")  # 1005: passed as is
    assert empty.closed and empty.close_code is None


@pytest.mark.parametrize(
    ("data", "code", "message"),
    [
        (encode_frame(0x2, b"unmasked"), 1002, "masked"),
        (masked(0x2, b"x", rsv1=True), 1002, "reserved"),
        (masked(0x3, b"x"), 1002, "opcode"),
        (masked(0x0, b"x"), 1002, "continuation"),
        (masked(0x2, b"a", fin=False) + masked(0x2, b"b"), 1002, "inside a fragmented"),
        (masked(0x9, b"x", fin=False), 1002, "control"),
        (masked(0x8, b"\x03"), 1002, "one byte"),
        (masked(0x2, bytes(MAX + 1)), 1009, "larger"),
        (masked(0x2, bytes(MAX), fin=False) + masked(0x0, b"!"), 1009, "larger"),
    ],
)
def test_framing_violations_say_how_to_close(data: bytes, code: int, message: str) -> None:
    with pytest.raises(FrameError, match=message) as error:
        FrameForwarder(MAX).feed(data)
    assert error.value.code == code


def test_an_oversized_frame_is_refused_from_its_header_before_it_is_buffered() -> None:
    header = masked(0x2, bytes(MAX + 1))[:14]  # header + mask only: nothing of the payload
    with pytest.raises(FrameError) as error:
        FrameForwarder(MAX).feed(header)
    assert error.value.code == 1009


def test_close_reasons_are_cut_to_fit_a_control_frame() -> None:
    frame = encode_close(1000, "x" * 500)
    assert len(frame) == 2 + 2 + 123
    ((fin, opcode, payload),) = unmasked_frames(frame)
    assert fin and opcode == 0x8 and len(payload) == 125
