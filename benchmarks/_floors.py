"""The floors under the tunnel's figures: raw websockets and pyzmq between two processes.

The tunnel adds, to a local kernel's path, one websocket round trip (facade ↔ provider host)
and one extra ZMQ round trip (client ↔ facade, besides provider ↔ kernel). Measured in the
same run as the tunnel, these floors say how much of the gap is the libraries and the
machine, and how much is the bridge's own code:

- :class:`WsSender`: a subprocess sends ``count`` binary messages of ``size`` bytes over one
  websocket (``compression=None``, as the tunnel); :meth:`WsSender.measure` returns MB/s.
- :class:`EchoPeers`: a subprocess echoing on a websocket and on an asyncio ZMQ ROUTER;
  :meth:`EchoPeers.ws_rtt` and :meth:`EchoPeers.zmq_rtt` time one 500-byte round trip each.
"""

from __future__ import annotations

import subprocess
import sys
import time

import zmq
import zmq.asyncio
from websockets.asyncio.client import ClientConnection, connect

__all__ = ["EchoPeers", "WsSender"]

MB = 1024 * 1024

_SENDER = """
import asyncio, os, sys
from websockets.asyncio.server import serve
size, count = int(sys.argv[1]), int(sys.argv[2])
payload = os.urandom(size)
async def handler(ws):
    for _ in range(count):
        await ws.send(payload)
    await ws.close()
async def main():
    async with serve(handler, "127.0.0.1", 0, compression=None, max_size=None) as server:
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.get_running_loop().create_future()
asyncio.run(main())
"""

_ECHO = """
import asyncio
import zmq, zmq.asyncio
from websockets.asyncio.server import serve
async def ws_echo(ws):
    async for message in ws:
        await ws.send(message)
async def zmq_echo(sock):
    while True:
        await sock.send_multipart(await sock.recv_multipart())
async def main():
    ctx = zmq.asyncio.Context()
    router = ctx.socket(zmq.ROUTER)
    zport = router.bind_to_random_port("tcp://127.0.0.1")
    async with serve(ws_echo, "127.0.0.1", 0, compression=None) as server:
        print(server.sockets[0].getsockname()[1], zport, flush=True)
        await zmq_echo(router)
asyncio.run(main())
"""


def _spawn(code: str, *args: str) -> tuple[subprocess.Popen[str], list[int]]:
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, [int(x) for x in proc.stdout.readline().split()]


class WsSender:
    """Bulk websocket sender in a subprocess (see the module docstring)."""

    def __init__(self, size: int, count: int) -> None:
        self.size = size
        self.count = count
        self.proc, (self.port,) = _spawn(_SENDER, str(size), str(count))

    async def measure(self) -> float:
        """MB/s of one run of ``count`` messages."""
        received = 0
        url = f"ws://127.0.0.1:{self.port}/"
        async with connect(url, compression=None, max_size=None) as ws:
            start = time.perf_counter()
            async for message in ws:
                received += len(message)
        elapsed = time.perf_counter() - start
        assert received == self.size * self.count, received
        return received / MB / elapsed

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


class EchoPeers:
    """A websocket echo and a ZMQ ROUTER echo in one subprocess; call :meth:`open` first."""

    def __init__(self) -> None:
        self.proc, (self.ws_port, self.zmq_port) = _spawn(_ECHO)
        self.payload = b"x" * 500
        self._ws: ClientConnection | None = None
        self._ctx = zmq.asyncio.Context()
        self._dealer = self._ctx.socket(zmq.DEALER)
        self._dealer.linger = 0
        self._dealer.connect(f"tcp://127.0.0.1:{self.zmq_port}")

    async def open(self) -> None:
        url = f"ws://127.0.0.1:{self.ws_port}/"
        self._ws = await connect(url, compression=None)
        for _ in range(20):  # warm-up, and the ZMQ connection is up
            await self.ws_rtt()
            await self.zmq_rtt()

    async def ws_rtt(self) -> float:
        assert self._ws is not None
        start = time.perf_counter()
        await self._ws.send(self.payload)
        await self._ws.recv()
        return time.perf_counter() - start

    async def zmq_rtt(self) -> float:
        start = time.perf_counter()
        await self._dealer.send_multipart([b"<IDS|MSG>", self.payload])
        await self._dealer.recv_multipart()
        return time.perf_counter() - start

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        self._dealer.close(linger=0)
        self._ctx.term()
        self.proc.kill()
        self.proc.wait()
