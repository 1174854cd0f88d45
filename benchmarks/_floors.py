"""The floors under the tunnel's figures: raw websockets and pyzmq between two processes.

The tunnel adds, to a local kernel's path, one websocket round trip (facade ↔ provider host)
and one extra ZMQ round trip (client ↔ facade, besides provider ↔ kernel). Measured in the
same run as the tunnel, these floors say how much of the gap is the libraries and the
machine, and how much is the bridge's own code:

- :class:`WsSender`: a subprocess sends ``count`` binary messages of ``size`` bytes over one
  websocket (``compression=None``, as the tunnel); :meth:`WsSender.measure` returns MB/s.
- :class:`EchoPeers`: a subprocess echoing on a websocket and on an asyncio ZMQ ROUTER;
  :meth:`EchoPeers.ws_rtt` and :meth:`EchoPeers.zmq_rtt` time one 500-byte round trip each.
- :class:`ProxyChain`: the tunnel's shape with no Python on the path: libzmq's own forwarder
  (``zmq_proxy``, a C loop) in threads of this process, in front of another in a
  subprocess, in front of a kernel. A client's round trip through it, against the same
  kernel reached directly, is the least *any* bridge of that shape (a forwarder beside the
  client, one in a second process) can add on this machine, whatever its code.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

import zmq
import zmq.asyncio
from _wire_client import endpoint
from websockets.asyncio.client import ClientConnection, connect

__all__ = ["EchoPeers", "ProxyChain", "WsSender"]

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


# Shell (ROUTER in front, DEALER behind) and iopub (XPUB in front, XSUB behind: subscriptions
# travel up): the two channels an execute uses. Each pair runs zmq_proxy in a thread of its own.
_PROXY = """
import sys, threading, zmq
ctx = zmq.Context()
ports, pairs = [], []
for front_kind, back_kind, upstream in (
    (zmq.ROUTER, zmq.DEALER, sys.argv[1]), (zmq.XPUB, zmq.XSUB, sys.argv[2])
):
    front, back = ctx.socket(front_kind), ctx.socket(back_kind)
    ports.append(front.bind_to_random_port("tcp://127.0.0.1"))
    back.connect(upstream)
    pairs.append((front, back))
threading.Thread(target=zmq.proxy, args=pairs[1], daemon=True).start()
print(*ports, flush=True)
zmq.proxy(*pairs[0])
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


class ProxyChain:
    """C-level ZMQ forwarders between a client and a kernel (see the module docstring).

    ``info`` is the kernel's connection info; :attr:`info` is the same with the ports of the
    forwarder in this process, for a client of the chain. ``processes``: how many forwarding
    processes stand between this one and the kernel (1: the provider host; 2: the relay and
    the host). Shell and iopub only.
    """

    def __init__(self, info: Mapping[str, Any], processes: int = 1) -> None:
        shell, iopub = endpoint(info, "shell_port"), endpoint(info, "iopub_port")
        self.procs: list[subprocess.Popen[str]] = []
        for _ in range(processes):  # each one connects to the one before, the first to the kernel
            proc, (shell_port, iopub_port) = _spawn(_PROXY, shell, iopub)
            self.procs.append(proc)
            shell = f"tcp://127.0.0.1:{shell_port}"
            iopub = f"tcp://127.0.0.1:{iopub_port}"
        self._ctx = zmq.Context()
        self._threads: list[threading.Thread] = []
        ports = []
        for front_kind, back_kind, upstream in (
            (zmq.ROUTER, zmq.DEALER, shell),
            (zmq.XPUB, zmq.XSUB, iopub),
        ):
            front, back = self._ctx.socket(front_kind), self._ctx.socket(back_kind)
            ports.append(front.bind_to_random_port("tcp://127.0.0.1"))
            back.connect(upstream)
            thread = threading.Thread(target=self._forward, args=(front, back), daemon=True)
            thread.start()
            self._threads.append(thread)
        self.info = {
            **info,
            "transport": "tcp",
            "ip": "127.0.0.1",
            "shell_port": ports[0],
            "iopub_port": ports[1],
        }

    @staticmethod
    def _forward(front: zmq.Socket[Any], back: zmq.Socket[Any]) -> None:
        # Returns when close() terminates the context (ETERM); the sockets close here, in
        # the thread that used them, which lets the context's term() finish.
        with contextlib.suppress(zmq.ZMQError):
            zmq.proxy(front, back)
        front.close(linger=0)
        back.close(linger=0)

    def close(self) -> None:
        self._ctx.term()
        for thread in self._threads:
            thread.join(5)
        for proc in self.procs:
            proc.kill()
            proc.wait()
