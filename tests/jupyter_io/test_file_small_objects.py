"""Small files are placed from memory and kept in the store after their transfer's DONE
(one file creation on a cold start's path, not two), within a memory budget; what the
workspace does to a placed file never reaches the stored object. A real
:class:`FileEndpoint` over a real :class:`Bridge` and :class:`Tunnel`, and a real
:class:`ContentStore` on disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from jupyter_io import file_endpoint
from jupyter_io.bridge import Bridge
from jupyter_io.content_store import ContentStore
from jupyter_io.file_endpoint import FileEndpoint
from jupyter_io.files import Done, Want, chunk_digests, content_hash, encode_chunk, parse_files_body
from jupyter_io.protocol import Frame, FrameKind, Tunnel, decode_frame, encode_control

ID = "ab" * 16


class _Watched(ContentStore):
    """The real store, noting which objects went through its partial (chunk) path."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.chunked: list[str] = []

    def write(self, sha: str, offset: int, data: bytes | memoryview, digest: bytes) -> None:
        self.chunked.append(sha)
        super().write(sha, offset, data, digest)


def _endpoint(tmp_path: Path, name: str) -> tuple[FileEndpoint, Tunnel, Path]:
    root = tmp_path / name
    root.mkdir()
    tunnel = Tunnel()
    bridge = Bridge(tunnel, outbound={}, inbound={}, on_control=lambda frame: None)
    store = _Watched(tmp_path / "store")
    return FileEndpoint(bridge, str(root), store, conflict="aside"), tunnel, root


def _sent(tunnel: Tunnel) -> list[object]:
    frames = [decode_frame(f) for f in tunnel.replay(0)]
    return [parse_files_body(f.body) for f in frames if f.kind is FrameKind.FILES]


async def _transfer(endpoint: FileEndpoint, files: dict[str, bytes], ident: str = ID) -> None:
    entries, shas = [], {}
    for path, content in files.items():
        sha = shas[path] = content_hash(chunk_digests(content))
        entries.append({"path": path, "size": len(content), "mode": 0o644, "sha256": sha})
    body = {"op": "offer", "id": ident, "files": entries}
    await endpoint.handle(decode_frame(encode_control(FrameKind.FILES, body, seq=1)))
    for i, (path, content) in enumerate(files.items()):
        parts = tuple(encode_chunk(ident, shas[path], 0, content))
        await endpoint.handle(Frame(FrameKind.FILE_CHUNK, seq=2 + i, parts=parts))
    await endpoint.flush()


async def test_small_files_are_placed_first_and_kept_after(tmp_path: Path) -> None:
    endpoint, tunnel, root = _endpoint(tmp_path, "ws1")
    files = {f"d/f{i}.bin": os.urandom(10_000) for i in range(5)}
    await _transfer(endpoint, files)
    [_, done] = _sent(tunnel)
    assert isinstance(done, Done) and sorted(done.written) == sorted(files)
    for path, content in files.items():
        assert (root / path).read_bytes() == content
    store = endpoint.store
    assert isinstance(store, _Watched) and store.chunked == []  # no partial object on the way
    await endpoint.close()  # waits for the objects to reach the store
    for content in files.values():
        sha = content_hash(chunk_digests(content))
        assert store.held(sha, len(content)) == len(content)

    # A second session of the same user: nothing travels.
    second, tunnel2, root2 = _endpoint(tmp_path, "ws2")
    first_path, first = next(iter(files.items()))
    sha = content_hash(chunk_digests(first))
    entry = {"path": first_path, "size": len(first), "mode": 0o644, "sha256": sha}
    body = {"op": "offer", "id": "cd" * 16, "files": [entry]}
    await second.handle(decode_frame(encode_control(FrameKind.FILES, body, seq=1)))
    await second.flush()  # the placement runs beside the tunnel
    [want, done2] = _sent(tunnel2)
    assert isinstance(want, Want) and want.want == ()
    assert isinstance(done2, Done) and done2.written == (first_path,)
    assert (root2 / first_path).read_bytes() == first


async def test_the_workspace_cannot_change_a_stored_object(tmp_path: Path) -> None:
    # Placed files are copies, never links to the store: a kernel writing to its file in
    # place (as open(..., "w") does) leaves the next session's content as it was.
    endpoint, _, root = _endpoint(tmp_path, "ws1")
    content = b"x,y\n1,2\n"
    await _transfer(endpoint, {"data.csv": content})
    await endpoint.close()
    assert os.stat(root / "data.csv").st_nlink == 1
    fd = os.open(root / "data.csv", os.O_WRONLY)  # in place: no new file, no rename
    os.write(fd, b"pwned!!!")
    os.close(fd)
    second, _, root2 = _endpoint(tmp_path, "ws2")
    await _transfer(second, {"data.csv": content}, "cd" * 16)
    assert (root2 / "data.csv").read_bytes() == content


async def test_small_objects_past_the_budget_go_to_the_store_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(file_endpoint, "_SMALL_BUDGET", 15_000)
    endpoint, tunnel, root = _endpoint(tmp_path, "ws1")
    files = {"a.bin": os.urandom(10_000), "b.bin": os.urandom(10_000)}
    await _transfer(endpoint, files)
    [_, done] = _sent(tunnel)
    assert isinstance(done, Done) and sorted(done.written) == ["a.bin", "b.bin"]
    store = endpoint.store
    assert isinstance(store, _Watched)
    assert store.chunked == [content_hash(chunk_digests(files["b.bin"]))]
    assert endpoint._small_bytes <= 15_000
    await endpoint.close()
    assert endpoint._small == {}
    for path, content in files.items():
        assert (root / path).read_bytes() == content
