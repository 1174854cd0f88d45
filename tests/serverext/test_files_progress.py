"""``GET /jupyter-io/files`` says, of an incoming transfer in progress, which files it carries
and how many bytes it moves in all (Lab's progress notification shows a percent of it): two
real :class:`FileEndpoint` over real :class:`Bridge` on a loopback websocket, the receiver's
store held at its first chunk so that the transfer is surely in progress when asked."""

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
from jupyter_io.serverext.files import kernel_state


class _Held(ContentStore):
    """The real store, whose first write waits until the test lets it go."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.release = threading.Event()
        self.waiting = threading.Event()

    def write(self, sha: str, offset: int, data: bytes | memoryview, digest: bytes) -> None:
        self.waiting.set()
        if not self.release.wait(30):
            raise OSError("never released")
        super().write(sha, offset, data, digest)


class _NotebookSide:
    """What the handlers read of the notebook's side (``NotebookFiles``): its endpoint, and
    a status with the transfers in progress."""

    def __init__(self, endpoint: FileEndpoint) -> None:
        self.endpoint = endpoint

    def status(self) -> dict[str, Any]:
        return {"active": [t.to_json() for t in self.endpoint.active.values()]}


def _endpoint(root: Path, store: ContentStore) -> FileEndpoint:
    holder: list[FileEndpoint] = []

    def on_control(frame: Frame) -> Any:
        if frame.kind in (FrameKind.FILES, FrameKind.FILE_CHUNK):
            return holder[0].handle(frame)
        return None

    bridge = Bridge(Tunnel(), outbound={}, inbound={}, on_control=on_control)
    holder.append(FileEndpoint(bridge, str(root), store, window=2 * CHUNK_SIZE))
    return holder[0]


@contextlib.asynccontextmanager
async def _pair(tmp_path: Path) -> AsyncIterator[tuple[FileEndpoint, FileEndpoint]]:
    (tmp_path / "kernel").mkdir()
    (tmp_path / "notebook").mkdir()
    receiver = _endpoint(tmp_path / "notebook", _Held(tmp_path / "store"))
    sender = _endpoint(tmp_path / "kernel", ContentStore(tmp_path / "kstore"))

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


async def test_an_incoming_transfer_says_its_files_and_its_total(tmp_path: Path) -> None:
    async with _pair(tmp_path) as (sender, receiver):
        content = os.urandom(3 * CHUNK_SIZE + 1000)
        (tmp_path / "kernel" / "model.pt").write_bytes(content)
        [item] = scan(str(tmp_path / "kernel"), lambda p, d: False)
        sha = HashCache().hash(str(tmp_path / "kernel"), item)
        sending = asyncio.ensure_future(
            sender.send([FileEntry(item.path, item.size, item.mode, sha)], "pull")
        )
        store = receiver.store
        assert isinstance(store, _Held)
        try:
            assert await asyncio.to_thread(store.waiting.wait, 10)
            [transfer] = kernel_state(_NotebookSide(receiver))["active"]
        finally:
            store.release.set()
        assert transfer["direction"] == "received"
        assert transfer["paths"] == ["model.pt"]
        assert transfer["total_bytes"] == len(content)
        assert 0 <= transfer["bytes"] < len(content)
        done = await asyncio.wait_for(sending, 30)
        assert done.written == ["model.pt"]
        assert kernel_state(_NotebookSide(receiver))["active"] == []
        assert (tmp_path / "notebook" / "model.pt").read_bytes() == content
