"""The file channel keeps out of the kernel's way, and does its own work once: a transfer
yields to kernel messages (one chunk in flight, paced) and uses its window when the kernel
is quiet; an offer whose content is held is placed beside the tunnel, not on its path;
large files are hashed in stripes to the same digests; a directory's hashes outlive the
session. Real :class:`Bridge` ends over a loopback websocket, real ZMQ sockets for the
kernel's messages, real files."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio

from jupyter_io import confine, file_endpoint
from jupyter_io.bridge import Bridge
from jupyter_io.confine import hash_fd
from jupyter_io.content_store import ContentStore
from jupyter_io.file_endpoint import FileEndpoint
from jupyter_io.files import (
    CHUNK_SIZE,
    FileEntry,
    chunk_digests,
    content_hash,
)
from jupyter_io.protocol import Channel, FrameKind, Tunnel, decode_frame, encode_control
from kernel_provisioner.files import NotebookFiles

from .file_links import linked_endpoints

MiB = 1024 * 1024


class _Ends:
    """Two bridges on a loopback websocket, a file endpoint on each; the kernel's shell
    messages go from ``kernel_in`` through the sender's bridge to ``kernel_out``."""

    sender: FileEndpoint
    receiver: FileEndpoint
    kernel_in: zmq.asyncio.Socket
    kernel_out: zmq.asyncio.Socket
    #: (loop time, the sender's unacknowledged bytes) right after each chunk went.
    sent: list[tuple[float, int]]


@pytest.fixture
async def ends(tmp_path: Path) -> AsyncIterator[_Ends]:
    ctx = zmq.asyncio.Context()
    socks = [ctx.socket(zmq.PAIR) for _ in range(4)]
    feed, pumped, delivered, drain = socks
    feed.bind("inproc://kernel-in")
    pumped.connect("inproc://kernel-in")
    delivered.bind("inproc://kernel-out")
    drain.connect("inproc://kernel-out")

    async def drained() -> None:
        while True:
            await drain.recv_multipart()

    async with linked_endpoints(
        tmp_path,
        a_outbound={Channel.SHELL: pumped},
        b_inbound={Channel.SHELL: delivered},
        window=8 * MiB,
    ) as (a, b):
        out = _Ends()
        out.sender, out.receiver = a, b
        out.kernel_in, out.kernel_out = feed, drain
        out.sent = []
        loop = asyncio.get_running_loop()
        original = a.bridge.send_chunk

        async def watched(parts: Any) -> None:
            await original(parts)
            out.sent.append((loop.time(), a.bridge.tunnel.unacked_bytes))

        a.bridge.send_chunk = watched  # type: ignore[method-assign]
        sink = asyncio.create_task(drained())
        try:
            yield out
        finally:
            sink.cancel()
            with contextlib.suppress(BaseException):
                await sink
    for sock in socks:
        sock.close(linger=0)
    ctx.term()


def _read(root: str, name: str) -> tuple[bytes, int]:
    """A file's content and its number of links."""
    path = Path(root, name)
    return path.read_bytes(), path.stat().st_nlink


def _big(root: str, name: str, size: int) -> FileEntry:
    data = os.urandom(size)
    Path(root, name).write_bytes(data)
    return FileEntry(name, size, 0o644, content_hash(chunk_digests(data)))


async def test_a_transfer_yields_to_the_kernel_and_takes_its_window_when_quiet(
    ends: _Ends,
) -> None:
    sender = ends.sender
    sender.busy_rate = 64 * MiB  # 16 ms a chunk while the kernel talks
    entry = _big(sender.root, "busy.bin", 8 * MiB)
    talking = True

    async def kernel() -> None:
        while talking:  # an execute's messages every 5 ms, as a client's 1+1 loop
            await ends.kernel_in.send_multipart([b"<IDS|MSG>", b"sig", b"{}", b"{}"])
            await asyncio.sleep(0.005)

    chatter = asyncio.create_task(kernel())
    await asyncio.sleep(0.05)  # the first messages have gone through
    started = time.monotonic()
    transfer = await asyncio.wait_for(sender.send([entry], "push"), 30)
    took = time.monotonic() - started
    talking = False
    await chatter
    assert transfer.bytes == 8 * MiB
    assert transfer.written == ["busy.bin"]
    # One chunk at a time (with room for the kernel's small frames), paced at busy_rate.
    assert max(unacked for _, unacked in ends.sent) <= CHUNK_SIZE + 256 * 1024 + 4096
    assert took >= 7 * CHUNK_SIZE / sender.busy_rate

    # Quiet: the window is used (several chunks in flight), no pacing.
    await asyncio.sleep(0.3)
    ends.sent.clear()
    entry = _big(sender.root, "quiet.bin", 16 * MiB)
    transfer = await asyncio.wait_for(sender.send([entry], "push"), 30)
    assert transfer.bytes == 16 * MiB
    assert max(unacked for _, unacked in ends.sent) > 2 * CHUNK_SIZE


async def test_an_offer_of_held_content_is_placed_beside_the_tunnel(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    root.mkdir()
    tunnel = Tunnel()
    bridge = Bridge(tunnel, outbound={}, inbound={}, on_control=lambda frame: None)
    store = ContentStore(tmp_path / "store")
    content = b"held already\n"
    sha = content_hash(chunk_digests(content))
    store.put(sha, content)
    endpoint = FileEndpoint(bridge, str(root), store)
    release = threading.Event()
    placing = threading.Event()

    def slow(path: str) -> None:  # called as each file is placed, in the placing thread
        placing.set()
        release.wait(10)

    endpoint.refuse_path = slow  # type: ignore[assignment]
    entry = {"path": "a.txt", "size": len(content), "mode": 0o644, "sha256": sha}
    offer = {"op": "offer", "id": "cd" * 16, "files": [entry]}
    try:
        # handle() returns while the placement is still under way: the frames after the
        # offer (a LAUNCH, the kernel's messages) are not held behind the files' writes.
        await asyncio.wait_for(
            endpoint.handle(decode_frame(encode_control(FrameKind.FILES, offer, seq=1))), 5
        )
        assert await asyncio.to_thread(placing.wait, 5)
        assert not (root / "a.txt").exists()
    finally:
        release.set()
    await asyncio.wait_for(endpoint.flush(), 10)
    assert [t.written for t in endpoint.history] == [["a.txt"]]
    assert (root / "a.txt").read_bytes() == content
    await endpoint.close()


@pytest.mark.parametrize("size", [16 * MiB, 16 * MiB + 7, 21 * MiB - 1])
def test_a_large_file_hashed_in_stripes_has_its_one_pass_digests(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        sha, digests = hash_fd(fd)
    finally:
        os.close(fd)
    assert digests == chunk_digests(data)
    assert sha == content_hash(chunk_digests(data))


def test_an_unchanged_directory_is_not_hashed_again_by_the_next_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nb = tmp_path / "nb"
    nb.mkdir()
    for i in range(20):
        (nb / f"f{i}.txt").write_text(f"file {i}\n")

    def session() -> NotebookFiles:
        files = NotebookFiles(
            str(nb),
            max_bytes=0,
            pull_max_size=1 << 24,
            store_root=str(tmp_path / "store"),
            store_max_bytes=0,
            window=MiB,
        )
        files.check()
        return files

    first = session()
    hashes = {item.path: first.hashes.hash(first.root, item) for item in first.scan()}
    # Just written: "racily clean" (a change within the clock's tick keeps size, mtime and
    # ctime), so the default save keeps none of them; once they are older, all.
    first._keep_hashes()
    assert session().hashes.load(first.hash_file) == 0
    first.hashes.save(first.hash_file, settle_ns=0)
    assert Path(first.hash_file).stat().st_mode & 0o777 == 0o600

    hashed: list[int] = []
    real = confine.hash_fd

    def counting(fd: int) -> tuple[str, list[bytes]]:
        hashed.append(fd)
        return real(fd)

    monkeypatch.setattr(confine, "hash_fd", counting)
    (nb / "f3.txt").write_text("changed since\n")
    os.utime(nb / "f7.txt")  # touched, same content: hashed again, same hash
    second = session()
    again = {item.path: second.hashes.hash(second.root, item) for item in second.scan()}
    assert len(hashed) == 2
    assert again["f3.txt"] != hashes["f3.txt"]
    assert {p: s for p, s in again.items() if p != "f3.txt"} == {
        p: s for p, s in hashes.items() if p != "f3.txt"
    }


async def test_the_notebook_side_moves_a_large_file_into_place_the_provider_copies(
    ends: _Ends, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(file_endpoint, "_MOVE_BYTES", 2 * MiB)
    receiver = ends.receiver
    sizes = {"moved.bin": 3 * MiB + 5, "copied.bin": 3 * MiB + 9}
    for name, size in sizes.items():
        receiver.move_large = name == "moved.bin"
        entry = _big(ends.sender.root, name, size)
        transfer = await asyncio.wait_for(ends.sender.send([entry], "push"), 30)
        assert transfer.written == [name] and transfer.bytes == size
        content, links = _read(receiver.root, name)
        assert content == _read(ends.sender.root, name)[0]
        assert links == 1  # a plain file of its own: it can travel back
        held = receiver.store.held(entry.sha256, size)
        assert held == (0 if receiver.move_large else size)
