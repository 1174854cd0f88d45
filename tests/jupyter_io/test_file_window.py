"""A receiver acknowledges large file chunks as they arrive while its store keeps up, so the
sender's window bounds what is on its way, not what waits to be written: two real
:class:`FileEndpoint` over real :class:`Bridge` on a loopback websocket."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from websockets.asyncio.client import connect
from websockets.asyncio.server import serve

from jupyter_io.bridge import Bridge
from jupyter_io.confine import HashCache, scan
from jupyter_io.content_store import ContentStore
from jupyter_io.file_endpoint import FileEndpoint
from jupyter_io.files import CHUNK_SIZE, FileEntry
from jupyter_io.protocol import Frame, FrameKind, Tunnel


class _Held(ContentStore):
    """The real store, whose first chunk write waits until the test lets it go."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.release = threading.Event()

    def write(self, sha: str, offset: int, data: bytes | memoryview, digest: bytes) -> None:
        if not self.release.wait(30):
            raise OSError("never released")
        super().write(sha, offset, data, digest)


class _Receiver(FileEndpoint):
    """Notes each chunk as it arrives, before it is stored."""

    chunks = 0
    arrived: asyncio.Event

    async def handle(self, frame: Frame) -> None:
        if frame.kind is FrameKind.FILE_CHUNK:
            self.chunks += 1
            if self.chunks >= 4:
                self.arrived.set()
        await super().handle(frame)


def _endpoint(
    root: Path, store: ContentStore, window: int, kind: type[FileEndpoint] = FileEndpoint
) -> FileEndpoint:
    holder: list[FileEndpoint] = []

    def on_control(frame: Frame) -> Any:
        if frame.kind in (FrameKind.FILES, FrameKind.FILE_CHUNK):
            return holder[0].handle(frame)
        return None

    # No timed acks: only what the file channel itself acknowledges moves the window.
    bridge = Bridge(Tunnel(), outbound={}, inbound={}, on_control=on_control, ack_interval=60)
    holder.append(kind(bridge, str(root), store, window=window))
    return holder[0]


@contextlib.asynccontextmanager
async def _pair(tmp_path: Path, window: int) -> AsyncIterator[tuple[FileEndpoint, FileEndpoint]]:
    (tmp_path / "src").mkdir()
    (tmp_path / "dst").mkdir()
    receiver = _endpoint(tmp_path / "dst", _Held(tmp_path / "rstore"), window, _Receiver)
    assert isinstance(receiver, _Receiver)
    receiver.arrived = asyncio.Event()
    sender = _endpoint(tmp_path / "src", ContentStore(tmp_path / "sstore"), window)

    async def handler(ws: Any) -> None:
        await receiver.bridge.attach(ws, 0)
        await receiver.bridge.serve(ws)

    async with serve(handler, "127.0.0.1", 0, compression=None, max_size=None) as server:
        port = server.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None) as ws:
            await sender.bridge.attach(ws, 0)
            serving = asyncio.ensure_future(sender.bridge.serve(ws))
            try:
                yield sender, receiver
            finally:
                serving.cancel()
                with contextlib.suppress(BaseException):
                    await serving
                await receiver.close()
                await sender.close()


async def test_chunks_are_acknowledged_on_arrival(tmp_path: Path) -> None:
    window = 2 * CHUNK_SIZE
    async with _pair(tmp_path, window) as (sender, receiver):
        content = os.urandom(6 * CHUNK_SIZE)
        (tmp_path / "src" / "big.bin").write_bytes(content)
        hashes = HashCache()
        sender.hashes = hashes
        [item] = scan(str(tmp_path / "src"), lambda p, d: False)
        entry = FileEntry(item.path, item.size, item.mode, hashes.hash(str(tmp_path / "src"), item))
        sending = asyncio.ensure_future(sender.send([entry], "push"))
        store = receiver.store
        assert isinstance(store, _Held) and isinstance(receiver, _Receiver)
        try:
            # The first chunk's write is held: were chunks acknowledged only once stored,
            # the sender would stop at one window (2 chunks); acknowledged on arrival while
            # no more than a window waits to be stored, 2 more are on their way.
            await asyncio.wait_for(receiver.arrived.wait(), 10)
        finally:
            store.release.set()
        transfer = await asyncio.wait_for(sending, 30)
        assert transfer.bytes == len(content) and transfer.written == ["big.bin"]
        assert (tmp_path / "dst" / "big.bin").read_bytes() == content
