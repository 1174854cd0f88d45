"""A hostile other end of the file channel cannot write outside its root, and a scan sends
nothing that is not a plain file of the tree: a real :class:`FileEndpoint` over a real
:class:`Bridge` and :class:`Tunnel`, fed the frames a malicious peer would send."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from jupyter_io.bridge import Bridge
from jupyter_io.confine import scan
from jupyter_io.content_store import ContentStore
from jupyter_io.file_endpoint import FileEndpoint
from jupyter_io.files import (
    Offer,
    Want,
    chunk_digests,
    content_hash,
    encode_chunk,
    parse_files_body,
)
from jupyter_io.protocol import Frame, FrameKind, Tunnel, decode_frame, encode_control

ID = "ab" * 16


def _endpoint(tmp_path: Path, conflict: str = "beside") -> tuple[FileEndpoint, Tunnel, Path]:
    root = tmp_path / "root"
    root.mkdir()
    tunnel = Tunnel()
    bridge = Bridge(tunnel, outbound={}, inbound={}, on_control=lambda frame: None)
    store = ContentStore(tmp_path / "store")
    return FileEndpoint(bridge, str(root), store, conflict=conflict), tunnel, root


def _sent(tunnel: Tunnel) -> list[Any]:
    """The FILES messages the endpoint answered with (kept by the detached tunnel)."""
    frames = [decode_frame(f) for f in tunnel.replay(0)]
    return [parse_files_body(f.body) for f in frames if f.kind is FrameKind.FILES]


def _files_frame(body: dict[str, Any]) -> Frame:
    return decode_frame(encode_control(FrameKind.FILES, body, seq=1))


async def _offer_and_send(endpoint: FileEndpoint, path: str, content: bytes) -> None:
    sha = content_hash(chunk_digests(content))
    entry = {"path": path, "size": len(content), "mode": 0o644, "sha256": sha}
    await endpoint.handle(_files_frame({"op": "offer", "id": ID, "files": [entry]}))
    chunk = Frame(FrameKind.FILE_CHUNK, seq=2, parts=tuple(encode_chunk(ID, sha, 0, content)))
    await endpoint.handle(chunk)
    await endpoint.flush()


@pytest.mark.parametrize("path", ["../escaped.txt", "/tmp/escaped.txt", "a/../../escaped.txt"])
async def test_an_offer_out_of_the_root_is_refused(tmp_path: Path, path: str) -> None:
    endpoint, tunnel, root = _endpoint(tmp_path)
    await _offer_and_send(endpoint, path, b"pwned")
    [done] = _sent(tunnel)
    assert done.refused and done.written == ()
    assert not (tmp_path / "escaped.txt").exists()
    assert list(root.iterdir()) == []


async def test_a_link_in_the_root_is_not_written_through(tmp_path: Path) -> None:
    endpoint, tunnel, root = _endpoint(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    target = outside / "file.txt"
    target.write_text("precious")
    (root / "dir").symlink_to(outside)
    (root / "file.txt").symlink_to(target)
    await _offer_and_send(endpoint, "dir/new.txt", b"pwned")
    [want, done] = _sent(tunnel)
    assert isinstance(want, Want) and done.written == ()
    assert "link or not a directory" in done.refused[0][1]
    assert sorted(p.name for p in outside.iterdir()) == ["file.txt"]

    global ID
    ID, first = "cd" * 16, ID
    try:
        await _offer_and_send(endpoint, "file.txt", b"pwned")
    finally:
        ID = first
    assert target.read_text() == "precious"  # the local end refuses a link it would follow
    assert (root / "file.txt").is_symlink()


async def test_the_provider_moves_a_planted_link_aside(tmp_path: Path) -> None:
    endpoint, tunnel, root = _endpoint(tmp_path, conflict="aside")
    target = tmp_path / "secret.txt"
    target.write_text("precious")
    (root / "data.csv").symlink_to(target)  # what a tenant's kernel could plant
    await _offer_and_send(endpoint, "data.csv", b"x,y\n")
    [_, done] = _sent(tunnel)
    assert done.written == ("data.csv",)
    assert target.read_text() == "precious"
    assert (root / "data.csv").read_bytes() == b"x,y\n" and not (root / "data.csv").is_symlink()
    assert (root / "data.remote-conflict.csv").is_symlink()  # moved, never followed


async def test_a_forged_object_is_not_placed(tmp_path: Path) -> None:
    endpoint, tunnel, root = _endpoint(tmp_path)
    entry = {"path": "a.txt", "size": 5, "mode": 0o644, "sha256": "0" * 64}
    await endpoint.handle(_files_frame({"op": "offer", "id": ID, "files": [entry]}))
    chunk = Frame(FrameKind.FILE_CHUNK, seq=2, parts=tuple(encode_chunk(ID, "0" * 64, 0, b"pwned")))
    await endpoint.handle(chunk)
    await endpoint.flush()
    [_, done] = _sent(tunnel)
    assert "does not match its sha256" in done.refused[0][1]
    assert not (root / "a.txt").exists()
    assert os.listdir(endpoint.store.objects) == []


def test_a_scan_sends_plain_files_only(tmp_path: Path) -> None:
    root = tmp_path / "nb"
    root.mkdir()
    (root / "data.csv").write_text("ok")
    (root / "passwd").symlink_to("/etc/passwd")
    (root / "etc").symlink_to("/etc")
    os.mkfifo(root / "fifo")
    outside = tmp_path / "outside.txt"
    outside.write_text("not mine")
    os.link(outside, root / "hard.txt")
    refused: list[tuple[str, str]] = []
    found = [f.path for f in scan(str(root), lambda p, d: False, refused)]
    assert found == ["data.csv"]
    assert sorted(p for p, _ in refused) == ["etc", "fifo", "hard.txt", "passwd"]


def test_offer_round_trip() -> None:
    offer = Offer(ID, (), "sync")
    assert parse_files_body(offer.to_body()) == offer


async def test_a_sender_ignoring_its_window_is_held_back(tmp_path: Path) -> None:
    endpoint, _, root = _endpoint(tmp_path)
    endpoint.window = 1024 * 1024
    content = os.urandom(12 * 1024 * 1024)
    digests = chunk_digests(content)
    sha = content_hash(digests)
    entry = {"path": "big.bin", "size": len(content), "mode": 0o644, "sha256": sha}
    await endpoint.handle(_files_frame({"op": "offer", "id": ID, "files": [entry]}))
    most = 0
    for i, offset in enumerate(range(0, len(content), 1024 * 1024)):
        parts = encode_chunk(ID, sha, offset, content[offset : offset + 1024 * 1024], digests[i])
        # All sent at once, no ack awaited: the endpoint itself must stop taking them.
        await endpoint.handle(Frame(FrameKind.FILE_CHUNK, seq=2 + i, parts=tuple(parts)))
        most = max(most, endpoint.queued_bytes)
    await endpoint.flush()
    assert most <= 4 * 1024 * 1024 + 1024 * 1024
    assert (root / "big.bin").read_bytes() == content
