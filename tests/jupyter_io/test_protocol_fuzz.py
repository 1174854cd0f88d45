"""Property-based tests of the tunnel codec and the session state machine (hypothesis).

What the peer controls: every byte of every frame. The contract (``jupyter_io.protocol``'s
docstrings): decoding raises only :class:`ProtocolError` (``FrameTooLarge`` included), a frame
that decodes re-encodes to the very same bytes, and a :class:`Tunnel` delivers every reliable
frame exactly once and in order, whatever reconnects lose in flight.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from jupyter_io.errors import FrameTooLarge, ProtocolError
from jupyter_io.protocol import (
    HEADER,
    MAX_CONTROL_SIZE,
    UNSEQUENCED,
    Channel,
    Frame,
    FrameKind,
    Tunnel,
    decode_frame,
    encode_control,
    encode_frame,
)

from ..fuzzing import hostile_json

U64 = st.integers(0, 2**64 - 1)
PARTS = st.lists(st.binary(max_size=64), max_size=8)


@st.composite
def frames(draw: st.DrawFn) -> Frame:
    """A valid frame of any kind: sequenced or not as its kind says, DATA with >= 1 part,
    FILE_CHUNK with 2, control frames with at most one."""
    kind = draw(st.sampled_from(FrameKind))
    seq = 0 if kind in UNSEQUENCED else draw(st.integers(1, 2**64 - 1))
    if kind is FrameKind.DATA:
        parts = draw(st.lists(st.binary(max_size=64), min_size=1, max_size=8))
    elif kind is FrameKind.FILE_CHUNK:  # a chunk header and its bytes
        parts = draw(st.lists(st.binary(max_size=64), min_size=2, max_size=2))
    else:
        parts = draw(st.lists(st.binary(max_size=64), max_size=1))
    return Frame(kind, draw(st.sampled_from(Channel)), seq, draw(U64), tuple(parts))


def encode(frame: Frame) -> bytes:
    return encode_frame(
        frame.kind, frame.parts, channel=frame.channel, seq=frame.seq, ack=frame.ack
    )


def reencode(data: bytes) -> bytes | None:
    """The bytes of the frame ``data`` decodes to, or None if it is refused."""
    try:
        frame = decode_frame(data, max_size=1 << 16)
    except ProtocolError:
        return None
    return encode(frame)


@given(frames())
def test_every_valid_frame_round_trips(frame: Frame) -> None:
    data = encode(frame)
    assert decode_frame(data) == frame
    assert [bytes(p) for p in decode_frame(data, views=True).parts] == list(frame.parts)


@given(st.binary(max_size=256))
@example(b"")
@example(HEADER.pack(FrameKind.DATA, 0, 0xFFFF, 1, 0))  # a table beyond MAX_PARTS
@example(HEADER.pack(FrameKind.DATA, 0, 1, 1, 0) + struct.pack("<I", 0xFFFFFFFF))
def test_decoding_any_bytes_raises_only_protocol_error_and_what_decodes_reencodes_identically(
    data: bytes,
) -> None:
    out = reencode(data)
    assert out is None or out == data


@given(frames(), st.data())
def test_a_damaged_frame_is_refused_or_reencodes_identically(frame: Frame, data: st.DataObject
                                                             ) -> None:  # fmt: skip
    """Truncate, extend or overwrite a valid frame anywhere: never an undocumented error,
    never a frame that would re-encode to other bytes."""
    raw = bytearray(encode(frame))
    how = data.draw(st.sampled_from(["cut", "extend", "overwrite"]))
    if how == "cut":
        del raw[data.draw(st.integers(0, len(raw) - 1)) :]
    elif how == "extend":
        raw += data.draw(st.binary(min_size=1, max_size=16))
    else:
        at = data.draw(st.integers(0, len(raw) - 1))
        chunk = data.draw(st.binary(min_size=1, max_size=8))
        raw[at : at + len(chunk)] = chunk
    out = reencode(bytes(raw))
    assert out is None or out == bytes(raw)


def control(body: bytes) -> bytes:
    return encode_frame(FrameKind.LAUNCH, [body], seq=1)


@given(hostile_json() | st.text(max_size=100).map(str.encode))
@example(b"[" * 100_000)  # found by fuzzing: RecursionError escaped
@example(b'{"a":' * 50_000)
@example(b"1" * 5_000)  # found by fuzzing: ValueError (int digit limit) escaped
@example(b'{"signum":' + b"9" * 4_301 + b"}")
@example("\udcff".encode("utf-8", "surrogatepass"))
@example(b"\xff\xfe{\x00}\x00")  # UTF-16 with a BOM: json detects the encoding
def test_a_control_body_is_a_json_object_or_a_protocol_error(body: bytes) -> None:
    frame = decode_frame(control(body))
    try:
        value = frame.body
    except ProtocolError as exc:
        assert str(exc).startswith("LAUNCH frame body")
    else:
        assert isinstance(value, dict)


@given(st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=8), max_size=6))
def test_control_bodies_round_trip(body: dict[str, object]) -> None:
    assert decode_frame(encode_control(FrameKind.SIGNAL, body, seq=3)).body == body


# -- the state machine -------------------------------------------------------------------------


@given(st.lists(st.binary(max_size=64) | frames().map(encode), max_size=20))
def test_a_tunnel_fed_anything_raises_only_protocol_error_and_keeps_its_counters(
    messages: list[bytes],
) -> None:
    tunnel = Tunnel(max_frame_size=1 << 16)
    tunnel.send_data(Channel.SHELL, [b"x"])
    tunnel.send_data(Channel.IOPUB, [b"y"])
    for data in messages:
        received, acked = tunnel.received, tunnel.peer_acked
        try:
            frame = tunnel.receive(data)
        except ProtocolError:
            continue
        assert tunnel.received >= received and tunnel.peer_acked >= acked
        assert tunnel.peer_acked <= tunnel.sent
        assert tunnel.unacked_frames == tunnel.sent - tunnel.peer_acked
        if frame is not None and frame.kind not in UNSEQUENCED:
            assert frame.seq == tunnel.received


ACTIONS = st.lists(
    st.one_of(
        st.tuples(st.just("send"), st.binary(min_size=1, max_size=32)),
        st.tuples(st.just("deliver"), st.integers(1, 5)),
        st.tuples(st.just("ack"), st.none()),
        st.tuples(st.just("reconnect"), st.none()),
        st.tuples(st.just("stale_replay"), st.none()),
    ),
    max_size=40,
)


@given(ACTIONS)
def test_every_message_arrives_once_and_in_order_across_lossy_reconnects(
    actions: list[tuple[str, object]],
) -> None:
    """A sends DATA to B over a link that loses whatever is in flight when it drops; after
    each reconnect A replays from what B says it received (sometimes from an older point, as
    a WELCOME racing an ack would). B must see each message exactly once, in order."""
    a, b = Tunnel(), Tunnel()
    sent: list[bytes] = []
    got: list[bytes] = []
    in_flight: list[bytes] = []

    def deliver(count: int) -> None:
        for data in in_flight[:count]:
            frame = b.receive(data)
            if frame is not None:
                got.append(bytes(frame.parts[0]))
        del in_flight[:count]

    for action, arg in actions:
        if action == "send":
            assert isinstance(arg, bytes)
            sent.append(arg)
            in_flight.append(a.send_data(Channel.SHELL, [arg]))
        elif action == "deliver":
            assert isinstance(arg, int)
            deliver(arg)
        elif action == "ack":
            assert a.receive(b.ack_frame()) is None
        elif action == "reconnect":
            in_flight[:] = a.replay(b.received)
        else:
            in_flight.extend(a.replay(a.peer_acked))
    in_flight[:] = a.replay(b.received)
    deliver(len(in_flight))
    assert got == sent
    a.receive(b.ack_frame())
    assert a.unacked_frames == 0 and a.unacked_bytes == 0


def test_bodies_past_the_json_parsers_limits_are_protocol_errors() -> None:
    """Found by fuzzing: ``Frame.body`` let RecursionError out (a HELLO of ``[[[...`` took the
    provider host's handshake down with an internal error instead of close 1002), and
    ValueError for an integer of more than 4300 digits."""
    frame = decode_frame(encode_frame(FrameKind.HELLO, [b"[" * 100_000]))
    with pytest.raises(ProtocolError, match="nests too deeply"):
        _ = frame.body
    frame = decode_frame(control(b'{"signum":' + b"9" * 4_301 + b"}"))
    with pytest.raises(ProtocolError, match="not JSON"):
        _ = frame.body


def test_a_control_body_is_bounded_before_it_is_parsed() -> None:
    """Parsed, JSON costs ~25x its size in objects: a 64 MiB LAUNCH of ``[{},{},...]`` from
    a peer cost its receiver ~1.6 GB. Control bodies are now refused above 1 MiB, before
    they are copied or parsed; DATA parts keep the full frame size."""
    body = b"[" + b"{}," * (MAX_CONTROL_SIZE // 3) + b"{}]"
    with pytest.raises(FrameTooLarge, match="LAUNCH body"):
        decode_frame(encode_frame(FrameKind.LAUNCH, [body], seq=1))
    with pytest.raises(FrameTooLarge, match="a kernel's environment"):
        Tunnel().send_control(FrameKind.LAUNCH, {"env": {"BIG": "x" * MAX_CONTROL_SIZE}})
    assert decode_frame(encode_frame(FrameKind.DATA, [body], seq=1)).parts == (body,)
    fits = {"env": {"BIG": "x" * (MAX_CONTROL_SIZE - 100)}}
    assert decode_frame(Tunnel().send_control(FrameKind.LAUNCH, fits)).body == fits
