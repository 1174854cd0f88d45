"""An in-process TCP proxy that delays each direction by a fixed time: a WAN on loopback.

:class:`LatencyProxy` forwards every connection to an upstream ``(host, port)`` and holds each
chunk for ``one_way`` seconds before writing it on, in order, with no bandwidth limit: a
round trip through it costs ``2 * one_way`` plus the event loop's timer slack (about 1 ms).
Start it with :meth:`LatencyProxy.start`, point clients at :attr:`LatencyProxy.url`, and
:meth:`LatencyProxy.close` it at the end. Run as a script (``python _latency_proxy.py
HOST:PORT ONE_WAY_SECONDS``) it serves until killed and prints ``latency proxy listening on
URL`` once it accepts connections.
"""

from __future__ import annotations

import asyncio
import contextlib

__all__ = ["LatencyProxy"]


class LatencyProxy:
    """Delays both directions of every connection by ``one_way`` seconds."""

    def __init__(self, upstream: tuple[str, int], one_way: float) -> None:
        self.upstream = upstream
        self.one_way = one_way
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/tunnel"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            self._tasks.discard(task)
            return
        pipes = [
            asyncio.ensure_future(self._pipe(reader, up_writer)),
            asyncio.ensure_future(self._pipe(up_reader, writer)),
        ]
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task_ in pipes:
                task_.cancel()
            for w in (writer, up_writer):
                w.transport.abort()
            self._tasks.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()

        sender = asyncio.ensure_future(deliver())
        try:
            while True:
                data = await reader.read(1 << 20)
                queue.put_nowait((loop.time() + self.one_way, data))
                if not data:
                    break
            await sender
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            sender.cancel()


async def _serve(upstream: tuple[str, int], one_way: float) -> None:
    proxy = LatencyProxy(upstream, one_way)
    await proxy.start()
    print(f"latency proxy listening on {proxy.url}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await proxy.close()


if __name__ == "__main__":
    # python benchmarks/_latency_proxy.py HOST:PORT ONE_WAY_SECONDS: a proxy as a process of
    # its own (the browser tests put one in front of each provider host).
    import sys

    host, _, port = sys.argv[1].rpartition(":")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve((host, int(port)), float(sys.argv[2])))
