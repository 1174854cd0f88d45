"""A large pull is one pass over the file on the provider: a streamed entry is hashed as it
is sent and its content hash sealed after its last chunk; the receiver checks the seal
against the chunks it checked and places nothing unsealed, torn or forged. Real
:class:`Bridge` ends over a loopback websocket (or a real :class:`Tunnel` fed by hand for
the lying sender), real :class:`ContentStore` on disk, real files."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from jupyter_io.bridge import Bridge
from jupyter_io.confine import HashCache, scan
from jupyter_io.content_store import ContentStore
from jupyter_io.errors import ProtocolError
from jupyter_io.file_endpoint import FileEndpoint
from jupyter_io.files import (
    CHUNK_SIZE,
    Chunk,
    Done,
    FileEntry,
    Incoming,
    Offer,
    Pull,
    Seal,
    Want,
    chunk_digests,
    content_hash,
    encode_chunk,
    parse_files_body,
    stream_key,
)
from jupyter_io.protocol import Frame, FrameKind, Tunnel, decode_frame, encode_control
from provider_host.files import changed_files

from .file_links import linked_endpoints

ID = "ab" * 16
SIZE = 3 * CHUNK_SIZE + 12345  # four chunks, the last one short


class _Pair:
    sender: FileEndpoint
    receiver: FileEndpoint
    #: Called after each chunk the sender sends (index from 0).
    after_chunk: Any = None


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[_Pair]:
    async with linked_endpoints(tmp_path) as (a, b):
        out = _Pair()
        out.sender, out.receiver = a, b
        original = a.bridge.send_chunk
        count = 0

        async def watched(parts: Any) -> None:
            nonlocal count
            await original(parts)
            if out.after_chunk is not None:
                out.after_chunk(count)
            count += 1

        a.bridge.send_chunk = watched  # type: ignore[method-assign]
        yield out


def _stored(store: ContentStore) -> tuple[list[str], list[str]]:
    return sorted(os.listdir(store.objects)), sorted(os.listdir(store.partial))


def _write(root: str, name: str, data: bytes) -> str:
    path = os.path.join(root, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def _read(root: str, name: str) -> bytes | None:
    path = os.path.join(root, name)
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        return f.read()


async def test_a_streamed_pull_places_the_right_bytes(pair: _Pair) -> None:
    content = os.urandom(SIZE)
    _write(pair.sender.root, "model.pt", content)
    entry = FileEntry("model.pt", SIZE, 0o644, "0" * 64, stream=True)
    transfer = await asyncio.wait_for(pair.sender.send([entry], "pull"), 20)
    sha = content_hash(chunk_digests(content))
    assert transfer.written == ["model.pt"] and transfer.bytes == SIZE
    assert _read(pair.receiver.root, "model.pt") == content
    # Both ends agree on the content hash, which neither computed before it travelled.
    assert pair.sender.baseline["model.pt"] == sha == pair.receiver.baseline["model.pt"]
    # The receiver keeps it under its content hash, never under the per-transfer key.
    assert _stored(pair.receiver.store) == ([sha], [])
    # The sender hashed while it read: the next scan of the unchanged file hashes nothing.
    [item] = scan(pair.sender.root, lambda p, d: False)
    assert pair.sender.hashes.get(item) == sha


async def test_a_file_changed_mid_stream_is_not_placed_torn(pair: _Pair) -> None:
    path = _write(pair.sender.root, "model.pt", os.urandom(SIZE))
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))  # any write now moves its mtime

    def kernel_writes(index: int) -> None:
        if index == 0:  # the kernel rewrites the file's tail while its head is on the way
            with open(path, "r+b") as f:
                f.seek(SIZE - 10)
                f.write(b"0123456789")

    pair.after_chunk = kernel_writes
    entry = FileEntry("model.pt", SIZE, 0o644, "0" * 64, stream=True)
    transfer = await asyncio.wait_for(pair.sender.send([entry], "pull"), 20)
    assert transfer.written == []
    [(refused, why)] = transfer.refused
    assert refused == "model.pt" and "changed while it was sent" in why
    assert _read(pair.receiver.root, "model.pt") is None
    assert _stored(pair.receiver.store) == ([], [])  # nothing of it kept either
    assert "model.pt" not in pair.sender.baseline


def _receiver(tmp_path: Path) -> tuple[FileEndpoint, Tunnel, Path]:
    root = tmp_path / "local"
    root.mkdir(parents=True)
    tunnel = Tunnel()
    bridge = Bridge(tunnel, outbound={}, inbound={}, on_control=lambda frame: None)
    return FileEndpoint(bridge, str(root), ContentStore(tmp_path / "store")), tunnel, root


def _sent(tunnel: Tunnel) -> list[object]:
    frames = [decode_frame(f) for f in tunnel.replay(0)]
    return [parse_files_body(f.body) for f in frames if f.kind is FrameKind.FILES]


async def _lying_stream(endpoint: FileEndpoint, content: bytes, sealed_as: str) -> None:
    key = stream_key(ID, "model.pt")
    entry = {"path": "model.pt", "size": len(content), "mode": 0o644, "sha256": key}
    offer = {"op": "offer", "id": ID, "why": "pull", "files": [entry | {"stream": True}]}
    await endpoint.handle(decode_frame(encode_control(FrameKind.FILES, offer, seq=1)))
    for i, offset in enumerate(range(0, len(content), CHUNK_SIZE)):
        parts = tuple(encode_chunk(ID, key, offset, content[offset : offset + CHUNK_SIZE]))
        await endpoint.handle(Frame(FrameKind.FILE_CHUNK, seq=2 + i, parts=parts))
    seal = Seal(ID, ((key, sealed_as, None),)).to_body()
    await endpoint.handle(decode_frame(encode_control(FrameKind.FILES, seal, seq=99)))
    await endpoint.flush()


async def test_a_forged_seal_is_refused_and_nothing_placed(tmp_path: Path) -> None:
    # The provider streams one content and seals it as another (which the notebook's side
    # would then trust as that content's object, and place).
    endpoint, tunnel, root = _receiver(tmp_path)
    content, other = os.urandom(SIZE), os.urandom(SIZE)
    forged = content_hash(chunk_digests(other))
    await _lying_stream(endpoint, content, forged)
    [want, done] = _sent(tunnel)
    assert isinstance(want, Want) and want.want == ((stream_key(ID, "model.pt"), 0),)
    assert isinstance(done, Done) and done.written == ()
    [(path, why)] = done.refused
    assert path == "model.pt" and "do not hash to the sealed sha256" in why
    assert not (root / "model.pt").exists()
    assert _stored(endpoint.store) == ([], [])
    await endpoint.close()

    # The same stream sealed truthfully is placed (the check is the seal, not the stream).
    endpoint, tunnel, root = _receiver(tmp_path / "honest")
    await _lying_stream(endpoint, content, content_hash(chunk_digests(content)))
    [_, done] = _sent(tunnel)
    assert isinstance(done, Done) and done.written == ("model.pt",)
    assert (root / "model.pt").read_bytes() == content
    await endpoint.close()


async def test_a_stream_key_must_be_the_transfers_own(tmp_path: Path) -> None:
    # A streamed entry keyed by a real content hash would write chunks over that object's
    # partial: refused before anything is wanted.
    endpoint, tunnel, _ = _receiver(tmp_path)
    sha = content_hash(chunk_digests(b"x" * 10))
    entry = {"path": "a.bin", "size": 10, "mode": 0o644, "sha256": sha, "stream": True}
    offer = {"op": "offer", "id": ID, "why": "pull", "files": [entry]}
    await endpoint.handle(decode_frame(encode_control(FrameKind.FILES, offer, seq=1)))
    [done] = _sent(tunnel)
    assert isinstance(done, Done) and "under a key not its own" in done.refused[0][1]
    # Streams answer pulls only: a push (the provider's inbound side) hashes first.
    ident = "cd" * 16
    entry |= {"sha256": stream_key(ident, "a.bin")}
    offer = {"op": "offer", "id": ident, "why": "push", "files": [entry]}
    await endpoint.handle(decode_frame(encode_control(FrameKind.FILES, offer, seq=2)))
    [_, done] = _sent(tunnel)
    assert isinstance(done, Done) and "outside an answer to a pull" in done.refused[0][1]
    await endpoint.close()


def test_the_provider_streams_large_unhashed_files_to_a_pull_that_takes_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "big.bin").write_bytes(b"b" * (2 * CHUNK_SIZE))
    (tmp_path / "small.txt").write_bytes(b"s" * 100)
    hashes = HashCache()
    # An older client (no "stream"): hashed first, as before.
    entries, _ = changed_files(str(tmp_path), {}, hashes, Pull(ID, ("big.bin",), 0), CHUNK_SIZE)
    assert [e.stream for e in entries] == [False]
    # A client that takes streams: the large file is not read here at all.
    fresh = HashCache()
    monkeypatch.setattr(fresh, "hash", lambda root, item: pytest.fail(f"hashed {item.path}"))
    pull = Pull(ID, ("big.bin",), 0, stream=True)
    [big] = changed_files(str(tmp_path), {}, fresh, pull, CHUNK_SIZE)[0]
    assert big.stream and big.size == 2 * CHUNK_SIZE
    # Its hash known (unchanged since it was last hashed): the hash-first offer again.
    [known] = changed_files(str(tmp_path), {}, hashes, pull, CHUNK_SIZE)[0]
    assert not known.stream and known.sha256 == entries[0].sha256


def test_a_seal_must_follow_its_whole_stream() -> None:
    # The contract alone: a seal before the object's last chunk, or twice, fails the transfer.
    content = os.urandom(CHUNK_SIZE + 10)
    key = stream_key(ID, "m.pt")
    offer = Offer(ID, (FileEntry("m.pt", len(content), 0o644, key, True),), "pull")
    incoming = Incoming(offer, lambda sha, size: size)  # "held" is never asked of a stream
    assert incoming.want().want == ((key, 0),)
    digests = chunk_digests(content)
    incoming.accept(Chunk(ID, key, 0, content[:CHUNK_SIZE], digests[0]))
    sha = content_hash(digests)
    with pytest.raises(ProtocolError, match="before its last chunk"):
        incoming.seal(Seal(ID, ((key, sha, None),)))
    incoming = Incoming(offer, lambda sha, size: 0)
    incoming.accept(Chunk(ID, key, 0, content[:CHUNK_SIZE], digests[0]))
    assert not incoming.complete
    incoming.accept(Chunk(ID, key, CHUNK_SIZE, content[CHUNK_SIZE:], digests[1]))
    assert not incoming.complete  # whole, not sealed: nothing may be placed yet
    assert incoming.seal(Seal(ID, ((key, sha, None),))) == []
    assert incoming.complete and incoming.entries()[0].sha256 == sha
    with pytest.raises(ProtocolError, match="not an unsealed stream"):
        incoming.seal(Seal(ID, ((key, sha, None),)))
