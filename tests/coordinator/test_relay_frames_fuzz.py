"""Property-based tests of the relay's frame forwarder (hypothesis).

The contract (``jupyter_io.coordinator.relay_frames``): :meth:`FrameForwarder.feed` raises
only :class:`FrameError`; the frames it passes on are exactly what the ``websockets``
library would send for the frames it was given, unmasked, however the bytes were split; the
same input refused whole is refused with the same code when it arrives in pieces; and what
it buffers never exceeds one frame of ``max_size``.
"""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from websockets.frames import Frame, Opcode

from jupyter_io.coordinator.relay_frames import FrameError, FrameForwarder

MAX = 300  # small, so that the size limits are within the fuzzer's reach
CONTROL = st.sampled_from([Opcode.PING, Opcode.PONG])


@st.composite
def conversations(draw: st.DrawFn) -> list[Frame]:
    """A valid stream of client frames: whole and fragmented messages, control frames
    between fragments, perhaps a close at the end."""
    frames: list[Frame] = []
    for _ in range(draw(st.integers(0, 6))):
        opcode = draw(st.sampled_from([Opcode.TEXT, Opcode.BINARY]))
        pieces = draw(st.lists(st.binary(max_size=MAX // 4), min_size=1, max_size=4))
        for i, piece in enumerate(pieces):
            frames.append(Frame(opcode if i == 0 else Opcode.CONT, piece, len(pieces) == i + 1))
            if draw(st.integers(0, 4)) == 0:
                frames.append(Frame(draw(CONTROL), draw(st.binary(max_size=125))))
    if draw(st.booleans()):
        code = draw(st.integers(1000, 4999))
        reason = draw(st.binary(max_size=123))
        frames.append(Frame(Opcode.CLOSE, struct.pack("!H", code) + reason))
    return frames


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def run(chunks: list[bytes], max_size: int = MAX) -> tuple[bytes, tuple[int, str] | None, int]:
    """Feed ``chunks`` in order: what came out, the error if any, the most ever buffered."""
    forwarder = FrameForwarder(max_size)
    out: list[bytes] = []
    most = 0
    for chunk in chunks:
        try:
            out.append(forwarder.feed(chunk))
        except FrameError as exc:
            return b"".join(out), (exc.code, exc.reason), most
        most = max(most, len(forwarder._buffer))
    return b"".join(out), None, most


@given(conversations(), st.lists(st.integers(0, 10_000), max_size=8))
def test_valid_frames_come_out_as_websockets_would_send_them_however_split(
    frames: list[Frame], cuts: list[int]
) -> None:
    stream = b"".join(f.serialize(mask=True, extensions=None) for f in frames)
    expected = b"".join(f.serialize(mask=False, extensions=None) for f in frames)
    out, error, _ = run(split(stream, cuts))
    assert error is None and out == expected


@st.composite
def raw_frames(draw: st.DrawFn) -> bytes:
    """A frame header as anyone might write it, valid or not (any first byte, masked or
    not, minimal length encoding or not, lengths near the limits), and some payload."""
    first = draw(st.integers(0, 255))
    masked = draw(st.integers(0, 7)) > 0
    length = draw(
        st.sampled_from([0, 1, 125, 126, MAX, MAX + 1, 2**16, 2**63]) | st.integers(0, 200)
    )
    encoding = draw(st.sampled_from([7, 16, 64]))
    if encoding == 7 and length < 126:
        head = bytes((first, (0x80 if masked else 0) | length))
    elif encoding == 16 and length < 2**16:
        head = bytes((first, (0x80 if masked else 0) | 126)) + struct.pack("!H", length)
    else:
        head = bytes((first, (0x80 if masked else 0) | 127)) + struct.pack("!Q", length)
    body = draw(st.binary(max_size=4)) + bytes(min(length, 400))
    return head + (draw(st.binary(min_size=4, max_size=4)) if masked else b"") + body


@given(st.lists(raw_frames(), max_size=5).map(b"".join) | st.binary(max_size=200),
       st.lists(st.integers(0, 10_000), max_size=8))  # fmt: skip
@example(b"\x82\xff" + struct.pack("!Q", 2**63), [])
@example(b"\x89\xfe" + struct.pack("!H", 1000), [1])
def test_any_bytes_in_any_pieces_give_the_same_frames_or_the_same_error(
    data: bytes, cuts: list[int]
) -> None:
    whole = run([data])
    pieces = run(split(data, cuts))
    assert pieces[1] == whole[1]
    if whole[1] is None:
        assert pieces[0] == whole[0]
    assert pieces[2] <= MAX + 14 and whole[2] <= MAX + 14  # one frame, header and mask


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (bytes((0x89, 0x80 | 126)) + struct.pack("!H", 1000), "control frames"),
        (bytes((0x09, 0x80 | 10)), "control frames"),
        (bytes((0x83, 0x80 | 100)), "unknown opcode"),
        (bytes((0x80, 0x80 | 100)), "continuation frame without"),
    ],
)
def test_a_frame_the_header_condemns_is_refused_before_its_payload_is_waited_for(
    header: bytes, message: str
) -> None:
    """Found by fuzzing: these were refused only once their whole payload had arrived and
    been buffered (up to ``max_size`` for a ping that may carry 125 bytes)."""
    with pytest.raises(FrameError, match=message) as error:
        FrameForwarder(1 << 20).feed(header)
    assert error.value.code == 1002
