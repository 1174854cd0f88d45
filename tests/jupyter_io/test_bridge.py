"""Bridge._pump: a burst of ready ZMQ messages leaves in order, whole, in sequence."""

from __future__ import annotations

import asyncio

import zmq
import zmq.asyncio
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from jupyter_io.bridge import Bridge
from jupyter_io.protocol import Channel, FrameKind, Tunnel


async def test_pump_sends_a_burst_in_order(tmp_path) -> None:
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
                received.append((frame.seq, list(frame.parts)))
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
    try:
        async with serve(sink, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            async with connect(f"ws://127.0.0.1:{port}") as ws:
                await bridge.attach(ws, 0)
                serving = asyncio.create_task(bridge.serve(ws))
                for i in range(count):  # all queued before the pump first wakes up
                    await push.send_multipart([b"id", str(i).encode(), b"x" * (i % 7)])
                bridge.start()
                await asyncio.wait_for(got_all.wait(), 10)
                await ws.close()
                await serving
    finally:
        await bridge.stop()
        push.close(0)
        pull.close(0)
        ctx.term()
    assert [seq for seq, _ in received] == list(range(1, count + 1))
    assert [parts for _, parts in received] == [
        [b"id", str(i).encode(), b"x" * (i % 7)] for i in range(count)
    ]
    assert bridge.failure is None
