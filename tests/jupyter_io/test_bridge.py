"""Bridge._pump: a burst of ready ZMQ messages leaves in order, whole, in sequence, with
the bridge on either side of the websocket (a client's frames are masked), and the
websocket frames it writes itself are the ones websockets would write."""

from __future__ import annotations

import asyncio
import os

import pytest
import zmq
import zmq.asyncio
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from jupyter_io.bridge import Bridge, _wire_bytes
from jupyter_io.protocol import Channel, FrameKind, Tunnel


def _parse_all(wire: bytes, *, mask: bool) -> list[Frame]:
    """Parse back-to-back websocket frames with websockets' own parser."""
    reader = StreamReader()
    reader.feed_data(wire)
    frames = []
    while reader.buffer:
        parser = Frame.parse(reader.read_exact, mask=mask)
        try:
            while True:
                next(parser)
        except StopIteration as done:
            frames.append(done.value)
    return frames


@pytest.mark.parametrize("length", [0, 1, 125, 126, 65535, 65536, 300_000])
def test_unmasked_frames_are_byte_for_byte_what_websockets_writes(length: int) -> None:
    payload = os.urandom(length)
    expected = Frame(Opcode.BINARY, payload).serialize(mask=False)
    assert _wire_bytes([payload], masked=False) == expected


def test_masked_frames_parse_back_to_the_payloads() -> None:
    payloads = [os.urandom(n) for n in (0, 5, 126, 70_000)]
    wire = _wire_bytes(payloads, masked=True)
    frames = _parse_all(wire, mask=True)
    assert [(f.opcode, f.fin, f.data) for f in frames] == [
        (Opcode.BINARY, True, p) for p in payloads
    ]
    assert payloads[2] not in wire  # really masked


def _message(i: int) -> list[bytes]:
    # Mostly small messages; every 25th carries a 300 kB buffer, so bursts are also cut by
    # size (about 1 MB), not only by count (64).
    return [b"id", str(i).encode(), b"x" * (i % 7) if i % 25 else bytes([i % 256]) * 300_000]


@pytest.mark.parametrize("bridge_side", ["client", "server"])
async def test_pump_sends_a_burst_in_order(tmp_path, bridge_side: str) -> None:
    count = 300  # more than one drain (64 messages) per wake-up
    received: list[tuple[int, list[bytes]]] = []
    got_all = asyncio.Event()
    peer = Tunnel()

    async def sink(ws: ServerConnection) -> None:
        async for message in ws:
            assert isinstance(message, bytes)
            frame = peer.receive(message)
            if frame is not None and frame.kind is FrameKind.DATA:
                assert frame.channel is Channel.IOPUB
                received.append((frame.seq, [bytes(p) for p in frame.parts]))
                if len(received) == count:
                    got_all.set()
            if peer.ack_due:
                await ws.send(peer.ack_frame())

    ctx = zmq.asyncio.Context()
    pull = ctx.socket(zmq.PULL)
    push = ctx.socket(zmq.PUSH)
    endpoint = f"ipc://{tmp_path}/pump.ipc"
    pull.bind(endpoint)
    push.connect(endpoint)
    bridge = Bridge(Tunnel(), outbound={Channel.IOPUB: pull}, inbound={}, on_control=lambda f: None)

    async def run_bridge(ws) -> None:  # type: ignore[no-untyped-def]
        await bridge.attach(ws, 0)
        serving = asyncio.create_task(bridge.serve(ws))
        for i in range(count):  # all queued before the pump first wakes up
            await push.send_multipart(_message(i))
        bridge.start()
        await asyncio.wait_for(got_all.wait(), 10)
        await ws.close()
        await serving

    try:
        if bridge_side == "client":
            async with serve(sink, "127.0.0.1", 0, compression=None) as server:
                port = server.sockets[0].getsockname()[1]
                async with connect(f"ws://127.0.0.1:{port}", compression=None) as ws:
                    await run_bridge(ws)
        else:
            done = asyncio.Event()

            async def handler(ws: ServerConnection) -> None:
                await run_bridge(ws)
                done.set()

            async with serve(handler, "127.0.0.1", 0, compression=None) as server:
                port = server.sockets[0].getsockname()[1]
                async with connect(f"ws://127.0.0.1:{port}", compression=None) as ws:
                    await sink(ws)  # type: ignore[arg-type]
                await asyncio.wait_for(done.wait(), 10)
    finally:
        await bridge.stop()
        push.close(0)
        pull.close(0)
        ctx.term()
    assert [seq for seq, _ in received] == list(range(1, count + 1))
    assert [parts for _, parts in received] == [_message(i) for i in range(count)]
    assert bridge.failure is None
