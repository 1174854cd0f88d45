"""Two file endpoints linked by real bridges on a loopback websocket, for the file channel's
tests: :func:`linked_endpoints` yields ``(a, b)``, the endpoint on each end (``a`` dials,
``b`` serves), with files under ``root / "a"`` and ``root / "b"`` and a content store each.
Import it relatively (``from .file_links import linked_endpoints``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from jupyter_io.bridge import Bridge
from jupyter_io.content_store import ContentStore
from jupyter_io.file_endpoint import FileEndpoint
from jupyter_io.protocol import Frame, FrameKind, Tunnel


@asynccontextmanager
async def linked_endpoints(
    root: Path,
    *,
    a_outbound: dict[Any, Any] | None = None,
    b_inbound: dict[Any, Any] | None = None,
    **options: Any,
) -> AsyncIterator[tuple[FileEndpoint, FileEndpoint]]:
    """``a_outbound`` / ``b_inbound``: the kernel sockets of ``a``'s and ``b``'s bridges;
    ``options``: passed to both :class:`FileEndpoint`\\ s (``window=``, ...)."""
    endpoints: dict[str, FileEndpoint] = {}

    def route(name: str) -> Any:
        def on_control(frame: Frame) -> Any:
            if frame.kind in (FrameKind.FILES, FrameKind.FILE_CHUNK):
                return endpoints[name].handle(frame)
            return None

        return on_control

    a = Bridge(Tunnel(), outbound=a_outbound or {}, inbound={}, on_control=route("a"))
    b = Bridge(Tunnel(), outbound={}, inbound=b_inbound or {}, on_control=route("b"))
    for name, bridge in (("a", a), ("b", b)):
        (root / name).mkdir()
        endpoints[name] = FileEndpoint(
            bridge, str(root / name), ContentStore(root / f"store-{name}"), **options
        )
    ready = asyncio.Event()

    async def handler(ws: ServerConnection) -> None:
        await b.attach(ws, 0)
        ready.set()
        await b.serve(ws)

    async with serve(handler, "127.0.0.1", 0, compression=None, max_size=None) as server:
        port = server.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None) as ws:
            await a.attach(ws, 0)
            serving = asyncio.create_task(a.serve(ws))
            a.start()
            await asyncio.wait_for(ready.wait(), 10)
            try:
                yield endpoints["a"], endpoints["b"]
            finally:
                serving.cancel()
                with contextlib.suppress(BaseException):
                    await serving
                await a.stop()
                for endpoint in endpoints.values():
                    await endpoint.close()
