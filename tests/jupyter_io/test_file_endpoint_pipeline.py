"""The file channel's bulk path is a pipeline (issue 15's 1 GiB pull): the receiver checks
and writes chunks on its store thread as they arrive, whatever its event loop is doing, and
the sender reads and hashes chunks ahead of the one the window lets out."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from jupyter_io import file_endpoint
from jupyter_io.bridge import Bridge
from jupyter_io.content_store import ContentStore
from jupyter_io.file_endpoint import FileEndpoint
from jupyter_io.files import (
    CHUNK_SIZE,
    Done,
    FileEntry,
    Offer,
    Seal,
    Want,
    chunk_digests,
    content_hash,
    encode_chunk,
    parse_files_body,
    stream_key,
)
from jupyter_io.protocol import Frame, FrameKind, Tunnel, decode_frame, encode_control

ID = "ab" * 16


def _endpoint(root: Path, store: Path) -> tuple[FileEndpoint, Tunnel]:
    root.mkdir(parents=True)
    tunnel = Tunnel()
    bridge = Bridge(tunnel, outbound={}, inbound={}, on_control=lambda frame: None)
    return FileEndpoint(bridge, str(root), ContentStore(store)), tunnel


def _sent(tunnel: Tunnel) -> list[object]:
    frames = [decode_frame(f) for f in tunnel.replay(0)]
    return [parse_files_body(f.body) for f in frames if f.kind is FrameKind.FILES]


async def _control(endpoint: FileEndpoint, body: dict[str, Any], seq: int) -> None:
    await endpoint.handle(decode_frame(encode_control(FrameKind.FILES, body, seq=seq)))


async def test_chunks_are_stored_while_the_receivers_loop_is_held_up(tmp_path: Path) -> None:
    # The event loop of the notebook's side has more to do than store chunks (the kernel's
    # messages, acks, websocket reads); the store thread goes on checking and writing the
    # chunks that arrived meanwhile instead of waiting for the loop's turn between chunks.
    endpoint, tunnel = _endpoint(tmp_path / "local", tmp_path / "store")
    content = os.urandom(4 * CHUNK_SIZE)
    key = stream_key(ID, "model.pt")
    release = asyncio.Event()

    async def held_ack() -> None:
        await release.wait()  # the loop's worker is stuck after the first chunk

    endpoint.bridge.send_ack = held_ack  # type: ignore[method-assign]
    written = threading.Event()
    write = endpoint.store.write

    def watched(sha: str, offset: int, data: Any, digest: bytes) -> None:
        write(sha, offset, data, digest)
        if offset + len(data) == len(content):
            written.set()

    endpoint.store.write = watched  # type: ignore[method-assign]
    entry = {"path": "model.pt", "size": len(content), "mode": 0o644, "sha256": key}
    offer = {"op": "offer", "id": ID, "why": "pull", "files": [entry | {"stream": True}]}
    await _control(endpoint, offer, 1)
    for i, offset in enumerate(range(0, len(content), CHUNK_SIZE)):
        parts = tuple(encode_chunk(ID, key, offset, content[offset : offset + CHUNK_SIZE]))
        await endpoint.handle(Frame(FrameKind.FILE_CHUNK, seq=2 + i, parts=parts))
    # Every chunk is written while the first one's acknowledgement still waits.
    assert await asyncio.to_thread(written.wait, 20)
    assert not release.is_set()
    assert (endpoint.store.partial / key).stat().st_size == len(content)

    release.set()
    sha = content_hash(chunk_digests(content))
    await _control(endpoint, Seal(ID, ((key, sha, None),)).to_body(), 99)
    await asyncio.wait_for(endpoint.flush(), 20)
    [_, done] = _sent(tunnel)
    assert isinstance(done, Done) and done.written == ("model.pt",)
    assert (tmp_path / "local" / "model.pt").read_bytes() == content
    await endpoint.close()


@pytest.mark.parametrize("stream", [True, False])
async def test_a_sender_reads_chunks_ahead_of_the_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stream: bool
) -> None:
    # While the first chunk waits to go out (a full window, a busy loop), the next ones are
    # read (and, streamed, hashed) on the read thread: the sending never waits for a read.
    endpoint, tunnel = _endpoint(tmp_path / "remote", tmp_path / "store")
    content = os.urandom(8 * CHUNK_SIZE)
    (tmp_path / "remote" / "model.pt").write_bytes(content)
    os.utime(tmp_path / "remote" / "model.pt", ns=(1_000_000_000, 1_000_000_000))
    ahead = 1 + file_endpoint._CHUNKS_AHEAD
    reads: list[int] = []
    enough = threading.Event()
    pread = os.pread

    def counted(fd: int, size: int, offset: int) -> bytes:
        data = pread(fd, size, offset)
        if size == CHUNK_SIZE:
            reads.append(offset)
            if len(reads) >= ahead:
                enough.set()
        return data

    monkeypatch.setattr(os, "pread", counted)
    release = asyncio.Event()

    async def held_send(parts: Any) -> None:
        await release.wait()

    endpoint.bridge.send_chunk = held_send  # type: ignore[method-assign]
    offered = asyncio.Event()
    send_control = endpoint.bridge.send_control

    async def watched_control(kind: FrameKind, body: dict[str, Any] | None = None) -> None:
        await send_control(kind, body)  # no peer: the tunnel keeps the frame
        offered.set()

    endpoint.bridge.send_control = watched_control  # type: ignore[method-assign]
    sha = "0" * 64 if stream else content_hash(chunk_digests(content))
    entry = FileEntry("model.pt", len(content), 0o644, sha, stream=stream)
    sending = asyncio.ensure_future(endpoint.send([entry], "pull", ident=ID))
    await asyncio.wait_for(offered.wait(), 20)
    [offer] = _sent(tunnel)
    assert isinstance(offer, Offer)
    await _control(endpoint, Want(ID, ((offer.files[0].sha256, 0),)).to_body(), 1)
    assert await asyncio.to_thread(enough.wait, 20)
    assert sorted(reads[:ahead]) == [i * CHUNK_SIZE for i in range(ahead)]
    assert not release.is_set() and not sending.done()
    sending.cancel()  # the reads under way end before the file's descriptor is closed
    with pytest.raises(asyncio.CancelledError):
        await sending
    assert len(reads) <= ahead + 1  # nothing read after the transfer ended
    await endpoint.close()


async def test_a_stream_failing_mid_pipeline_leaves_nothing(tmp_path: Path) -> None:
    # Chunks queue on the store thread while the event loop learns that one before them
    # failed the transfer: the discard of the stream's partial object runs behind them on
    # that thread, and they find the transfer gone, so nothing is placed or kept (and no
    # descriptor is closed under a write). The next transfer goes through.
    endpoint, tunnel = _endpoint(tmp_path / "local", tmp_path / "store")
    content = os.urandom(6 * CHUNK_SIZE)
    key = stream_key(ID, "model.pt")
    entry = {"path": "model.pt", "size": len(content), "mode": 0o644, "sha256": key}
    offer = {"op": "offer", "id": ID, "why": "pull", "files": [entry | {"stream": True}]}
    await _control(endpoint, offer, 1)
    offsets = [0, CHUNK_SIZE, 3 * CHUNK_SIZE, 2 * CHUNK_SIZE, 4 * CHUNK_SIZE, 5 * CHUNK_SIZE]
    for i, offset in enumerate(offsets):  # the third one out of order
        parts = tuple(encode_chunk(ID, key, offset, content[offset : offset + CHUNK_SIZE]))
        await endpoint.handle(Frame(FrameKind.FILE_CHUNK, seq=2 + i, parts=parts))
    sha = content_hash(chunk_digests(content))
    await _control(endpoint, Seal(ID, ((key, sha, None),)).to_body(), 9)
    await asyncio.wait_for(endpoint.flush(), 20)
    [_, done] = _sent(tunnel)
    assert isinstance(done, Done) and done.written == ()
    assert "expected" in done.refused[0][1]
    assert not (tmp_path / "local" / "model.pt").exists()
    assert os.listdir(endpoint.store.partial) == [] and os.listdir(endpoint.store.objects) == []

    ident = "cd" * 16
    key = stream_key(ident, "model.pt")
    entry |= {"sha256": key}
    await _control(endpoint, {**offer, "id": ident, "files": [entry | {"stream": True}]}, 10)
    for i, offset in enumerate(range(0, len(content), CHUNK_SIZE)):
        parts = tuple(encode_chunk(ident, key, offset, content[offset : offset + CHUNK_SIZE]))
        await endpoint.handle(Frame(FrameKind.FILE_CHUNK, seq=11 + i, parts=parts))
    await _control(endpoint, Seal(ident, ((key, sha, None),)).to_body(), 20)
    await asyncio.wait_for(endpoint.flush(), 20)
    done = _sent(tunnel)[-1]
    assert isinstance(done, Done) and done.written == ("model.pt",)
    assert (tmp_path / "local" / "model.pt").read_bytes() == content
    await endpoint.close()
