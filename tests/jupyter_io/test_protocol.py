"""Byte-level tests of the tunnel codec and the sequencing state machine (no sockets)."""

from __future__ import annotations

import json
import struct

import pytest

from jupyter_io.errors import BufferOverflow, FrameTooLarge, ProtocolError
from jupyter_io.protocol import (
    HEADER,
    MAX_PARTS,
    VIEW_THRESHOLD,
    Channel,
    Frame,
    FrameKind,
    Progress,
    Tunnel,
    decode_frame,
    encode_control,
    encode_frame,
)

JUPYTER_MSG = [b"client-x", b"<IDS|MSG>", b"0123abcd", b'{"msg_id":"1"}', b"{}", b"{}", b"{}"]


def test_data_frame_layout_byte_for_byte() -> None:
    data = encode_frame(FrameKind.DATA, [b"ab", b"", b"xyz"], channel=Channel.STDIN, seq=7, ack=3)
    expected = (
        bytes([0, 2])  # kind DATA, channel STDIN
        + (3).to_bytes(2, "little")  # nparts
        + (7).to_bytes(8, "little")  # seq
        + (3).to_bytes(8, "little")  # ack
        + struct.pack("<3I", 2, 0, 3)
        + b"abxyz"
    )
    assert data == expected


def test_round_trip_keeps_zmq_parts_untouched() -> None:
    data = encode_frame(FrameKind.DATA, JUPYTER_MSG, channel=Channel.SHELL, seq=1)
    frame = decode_frame(data)
    assert frame == Frame(FrameKind.DATA, Channel.SHELL, 1, 0, tuple(JUPYTER_MSG))


def test_large_data_parts_decode_as_views_of_the_message_when_asked() -> None:
    big = bytes(range(256)) * (VIEW_THRESHOLD // 256 + 1)
    data = encode_frame(FrameKind.DATA, [b"id", b"<IDS|MSG>", big, b"x"], seq=1)
    parts = decode_frame(data, views=True).parts
    assert [bytes(p) for p in parts] == [b"id", b"<IDS|MSG>", big, b"x"]
    assert isinstance(parts[2], memoryview) and parts[2].obj is data  # not copied
    assert all(type(p) is bytes for p in (parts[0], parts[1], parts[3]))
    assert all(type(p) is bytes for p in decode_frame(data).parts)  # copies by default
    received = Tunnel().receive(data, views=True)
    assert received is not None and isinstance(received.parts[2], memoryview)


def test_large_control_body_is_still_bytes() -> None:
    body = {"env": {"PAD": "x" * VIEW_THRESHOLD}}
    frame = decode_frame(encode_control(FrameKind.LAUNCH, body, seq=1), views=True)
    assert type(frame.parts[0]) is bytes
    assert frame.body == body


def test_control_frame_carries_json_body() -> None:
    data = encode_control(FrameKind.SIGNAL, {"signum": 2}, seq=4, ack=9)
    frame = decode_frame(data)
    assert frame.kind is FrameKind.SIGNAL
    assert (frame.seq, frame.ack) == (4, 9)
    assert frame.body == {"signum": 2}
    assert json.loads(frame.parts[0]) == {"signum": 2}


def test_ack_frame_has_no_parts() -> None:
    frame = decode_frame(encode_frame(FrameKind.ACK, ack=12))
    assert frame.kind is FrameKind.ACK and frame.ack == 12 and frame.parts == ()
    assert frame.body == {}


@pytest.mark.parametrize("cut", [0, 1, HEADER.size - 1, HEADER.size + 3, HEADER.size + 12])
def test_truncated_input_is_a_protocol_error(cut: int) -> None:
    data = encode_frame(FrameKind.DATA, [b"abc", b"defgh"], seq=1)
    with pytest.raises(ProtocolError):
        decode_frame(data[:cut])


def test_trailing_bytes_are_a_protocol_error() -> None:
    data = encode_frame(FrameKind.DATA, [b"abc"], seq=1)
    with pytest.raises(ProtocolError, match="length mismatch"):
        decode_frame(data + b"!")


def test_lengths_pointing_past_the_end_do_not_read_beyond() -> None:
    head = HEADER.pack(FrameKind.DATA, Channel.SHELL, 1, 1, 0)
    data = head + struct.pack("<I", 0xFFFFFFFF) + b"tiny"
    with pytest.raises(ProtocolError, match="length mismatch"):
        decode_frame(data)


@pytest.mark.parametrize(
    ("kind", "channel", "match"),
    [(200, 0, "unknown frame kind 200"), (0, 9, "unknown channel 9")],
)
def test_unknown_kind_or_channel(kind: int, channel: int, match: str) -> None:
    data = HEADER.pack(kind, channel, 0, 1, 0)
    with pytest.raises(ProtocolError, match=match):
        decode_frame(data)


def test_too_many_parts_declared() -> None:
    data = HEADER.pack(FrameKind.DATA, 0, MAX_PARTS + 1, 1, 0)
    with pytest.raises(ProtocolError, match="parts"):
        decode_frame(data)
    with pytest.raises(FrameTooLarge):
        encode_frame(FrameKind.DATA, [b""] * (MAX_PARTS + 1), seq=1)


def test_oversize_frame_is_refused_before_parsing() -> None:
    data = encode_frame(FrameKind.DATA, [b"x" * 1000], seq=1)
    with pytest.raises(FrameTooLarge, match="exceeds the maximum of 100 bytes"):
        decode_frame(data, max_size=100)


def test_sequencing_rules_are_enforced() -> None:
    with pytest.raises(ProtocolError, match="unsequenced"):
        decode_frame(HEADER.pack(FrameKind.ACK, 0, 0, 5, 0))
    with pytest.raises(ProtocolError, match="without a sequence number"):
        decode_frame(encode_frame(FrameKind.DATA, [b"x"]))


def test_data_frame_without_parts_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="DATA frame with no parts"):
        decode_frame(encode_frame(FrameKind.DATA, [], channel=Channel.SHELL, seq=1))


def test_control_frames_have_at_most_one_part() -> None:
    data = encode_frame(FrameKind.LAUNCH, [b"{}", b"{}"], seq=1)
    with pytest.raises(ProtocolError, match="at most one part"):
        decode_frame(data)


@pytest.mark.parametrize("body", [b"\xff\xfe", b"not json", b"[1, 2]"])
def test_control_body_must_be_a_json_object(body: bytes) -> None:
    frame = decode_frame(encode_frame(FrameKind.LAUNCH, [body], seq=1))
    with pytest.raises(ProtocolError):
        _ = frame.body


def test_tunnel_delivers_in_order_and_drops_replayed_duplicates() -> None:
    a, b = Tunnel(), Tunnel()
    frames = [a.send_data(Channel.IOPUB, [b"%d" % i]) for i in range(3)]
    got = [b.receive(f) for f in frames]
    assert [f.parts for f in got if f] == [(b"0",), (b"1",), (b"2",)]
    assert b.received == 3
    # A replay overlap after reconnect: already-received frames are dropped silently.
    assert all(b.receive(f) is None for f in frames)


def test_sequence_gap_is_a_protocol_error() -> None:
    a, b = Tunnel(), Tunnel()
    a.send_data(Channel.SHELL, [b"lost"])
    second = a.send_data(Channel.SHELL, [b"second"])
    with pytest.raises(ProtocolError, match="sequence gap"):
        b.receive(second)


def test_acks_release_kept_frames_cumulatively() -> None:
    a, b = Tunnel(), Tunnel()
    for i in range(5):
        b.receive(a.send_data(Channel.SHELL, [b"x" * 10, b"%d" % i]))
    assert a.unacked_frames == 5
    assert b.ack_pending
    a.receive(b.ack_frame())
    assert (a.unacked_frames, a.unacked_bytes, a.peer_acked) == (0, 0, 5)
    assert not b.ack_pending


def test_acks_piggyback_on_outgoing_frames() -> None:
    a, b = Tunnel(), Tunnel()
    b.receive(a.send_data(Channel.SHELL, [b"request"]))
    reply = b.send_data(Channel.SHELL, [b"reply"])
    assert not b.ack_pending
    a.receive(reply)
    assert a.unacked_frames == 0


def test_ack_beyond_what_was_sent_is_refused() -> None:
    a = Tunnel()
    with pytest.raises(ProtocolError, match="only 0 were sent"):
        a.receive(encode_frame(FrameKind.ACK, ack=3))


def test_ack_due_after_enough_frames_or_bytes() -> None:
    a, b = Tunnel(), Tunnel(ack_every_frames=4, ack_every_bytes=1 << 30)
    for _ in range(3):
        b.receive(a.send_data(Channel.IOPUB, [b"x"]))
    assert not b.ack_due
    b.receive(a.send_data(Channel.IOPUB, [b"x"]))
    assert b.ack_due
    c = Tunnel(ack_every_frames=1000, ack_every_bytes=1000)
    c.receive(Tunnel().send_data(Channel.IOPUB, [b"y" * 2000]))
    assert c.ack_due


def test_replay_after_reconnect_resends_exactly_the_missing_frames() -> None:
    host, client = Tunnel(), Tunnel()
    sent = [host.send_data(Channel.IOPUB, [b"out-%d" % i]) for i in range(6)]
    for frame in sent[:2]:  # the connection drops after two frames arrive
        client.receive(frame)
    replay = host.replay(client.handshake_state()["received"])
    assert replay == sent[2:]
    received = [client.receive(f) for f in replay]
    assert [f.parts[0] for f in received if f] == [b"out-%d" % i for i in range(2, 6)]
    assert host.unacked_frames == 4  # still kept until acknowledged


def test_control_frames_are_sequenced_with_data() -> None:
    a, b = Tunnel(), Tunnel()
    b.receive(a.send_data(Channel.SHELL, [b"x"]))
    frame = b.receive(a.send_control(FrameKind.SIGNAL, {"signum": 2}))
    assert frame is not None and frame.seq == 2 and frame.body == {"signum": 2}
    with pytest.raises(ValueError):
        a.send_control(FrameKind.ACK)


def test_buffer_bound_raises_and_keeps_existing_frames() -> None:
    a = Tunnel(max_unacked_bytes=1000)
    a.send_data(Channel.IOPUB, [b"x" * 600])
    with pytest.raises(BufferOverflow, match="bound of 1000"):
        a.send_data(Channel.IOPUB, [b"x" * 600])
    assert (a.sent, a.unacked_frames) == (1, 1)


def test_message_larger_than_frame_size_is_refused_on_send() -> None:
    a = Tunnel(max_frame_size=100)
    with pytest.raises(FrameTooLarge):
        a.send_data(Channel.SHELL, [b"x" * 200])
    assert a.sent == 0


def test_progress_frames_are_sequenced_byte_for_byte_and_checked() -> None:
    a, b = Tunnel(), Tunnel()
    step = Progress("environment", "building", "building the course environment", 1800.0)
    data = a.send_control(FrameKind.PROGRESS, step.to_body())
    body = json.dumps(step.to_body(), separators=(",", ":")).encode()
    assert data == HEADER.pack(11, 0, 1, 1, 0) + struct.pack("<I", len(body)) + body
    frame = b.receive(data)
    assert frame is not None and frame.kind is FrameKind.PROGRESS and frame.seq == 1
    assert Progress.parse(frame.body) == step
    ready = Progress("environment", "ready", "ready")
    assert "timeout" not in ready.to_body() and Progress.parse(ready.to_body()) == ready
    for bad, match in [
        ({"step": "pip", "state": "ready", "message": ""}, "'step'"),
        ({"step": "environment", "state": "done", "message": ""}, "'state'"),
        ({"step": "environment", "state": "ready", "message": 3}, "'message'"),
        ({"step": "environment", "state": "ready", "message": "", "timeout": -1}, "'timeout'"),
        ({"step": "environment", "state": "ready", "message": "", "timeout": True}, "'timeout'"),
    ]:
        with pytest.raises(ProtocolError, match=match):
            Progress.parse(bad)
