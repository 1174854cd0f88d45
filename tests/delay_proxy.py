"""The benchmarks' delaying TCP proxy (``benchmarks/_latency_proxy.py``) for tests, and a
*black hole*: a server that accepts connections and never answers (a provider that is gone
without a reset). Import relatively: ``from ..delay_proxy import LatencyProxy, black_hole``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
from collections.abc import AsyncIterator
from pathlib import Path

__all__ = ["LatencyProxy", "black_hole"]

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "_latency_proxy.py"
_spec = importlib.util.spec_from_file_location("_latency_proxy", _PATH)
assert _spec is not None and _spec.loader is not None
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
LatencyProxy = _module.LatencyProxy


@contextlib.asynccontextmanager
async def black_hole() -> AsyncIterator[str]:
    """A ``ws://127.0.0.1:PORT/tunnel`` URL whose server reads and never writes."""
    held: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        with contextlib.suppress(OSError):
            while await reader.read(4096):
                pass

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"ws://127.0.0.1:{port}/tunnel"
    finally:
        for writer in held:
            writer.transport.abort()
        server.close()
        await server.wait_closed()
