"""Property-based tests of the file channel's contract (``jupyter_io.files``, hypothesis).

What the other end controls: every path, every FILES body and every chunk. The contract:
:func:`check_path` returns only normalised relative paths that stay beneath any root (or
raises :class:`UnsafePath`), parsing a FILES body raises only :class:`ProtocolError`, and
a receiver accepts exactly the bytes it wanted, in order, checked against their hashes.
"""

from __future__ import annotations

import os
import posixpath

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from jupyter_io.errors import ProtocolError
from jupyter_io.files import (
    CHUNK_SIZE,
    FileEntry,
    Incoming,
    Outgoing,
    UnsafePath,
    check_path,
    chunk_digests,
    content_hash,
    decode_chunk,
    encode_chunk,
    parse_files_body,
)

from ..fuzzing import hostile_json

PATH_TEXT = st.lists(
    st.sampled_from(["..", ".", "", "a", "b.txt", "/", "\\", "\x00", "é", "e\u0301", "~", " "]),
    max_size=8,
).map("/".join) | st.text(max_size=40)


@given(PATH_TEXT)
@example("../etc/passwd")
@example("/etc/passwd")
@example("a/../../x")
@example("a/./b//c/")
@example("..\\x")
def test_check_path_stays_beneath_any_root(name: str) -> None:
    try:
        path = check_path(name)
    except UnsafePath:
        return
    assert path and not path.startswith("/")
    assert ".." not in path.split("/") and "" not in path.split("/") and "." not in path.split("/")
    assert posixpath.normpath(path) == path
    root = "/srv/root"
    assert posixpath.normpath(posixpath.join(root, path)).startswith(root + "/")
    assert check_path(path) == path  # idempotent: both ends agree on one name


def test_check_path_refuses_the_escapes() -> None:
    for name in ["../x", "/abs", "a/../../b", "..", "a/\x00", "a\\..\\b", "", ".", "./"]:
        with pytest.raises(UnsafePath):
            check_path(name)
    assert check_path("a/./b//c/") == "a/b/c"
    assert check_path("e\u0301") == "\u00e9"  # NFC: one file, one name


def test_check_path_refuses_every_control_character_and_only_those() -> None:
    for code in [*range(32), 0x7F]:
        with pytest.raises(UnsafePath, match="control character"):
            check_path(f"a{chr(code)}b")
    with pytest.raises(UnsafePath, match="backslash"):
        check_path("a\\b")
    for code in range(32, 0x7F):
        if chr(code) not in "/\\":
            assert check_path(f"a{chr(code)}b") == f"a{chr(code)}b"
    assert check_path("\u0080\u00e9\u2028x") == "\u0080\u00e9\u2028x"  # not ASCII controls


@given(hostile_json())
def test_files_bodies_raise_only_protocol_errors(body: object) -> None:
    if not isinstance(body, dict):
        body = {"op": "offer", "id": "0" * 32, "files": [body]}
    try:
        parse_files_body(body)
    except ProtocolError:
        pass


@given(
    st.sampled_from(["offer", "want", "done", "pull"]),
    st.dictionaries(
        st.sampled_from(["files", "want", "written", "paths", "max_size"]),
        st.lists(
            st.dictionaries(st.text(max_size=8), st.integers() | st.text()) | st.text(max_size=8),
            max_size=3,
        ),
    ),
)
def test_each_op_checks_its_fields(op: str, fields: dict[str, object]) -> None:
    try:
        parse_files_body({"op": op, "id": "ab" * 16, **fields})
    except ProtocolError:
        pass


SIZES = st.sampled_from([1, 100, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 2 * CHUNK_SIZE + 5])


@given(SIZES, st.integers(0, 3 * CHUNK_SIZE), st.binary(min_size=1, max_size=16))
def test_a_receiver_takes_exactly_what_it_wanted(size: int, held: int, seed: bytes) -> None:
    content = (seed * (size // len(seed) + 1))[:size]
    sha = content_hash(chunk_digests(content))
    entry = FileEntry("a/model.pt", len(content), 0o644, sha)
    out = Outgoing([entry, FileEntry("copy.pt", len(content), 0o600, sha)])
    incoming = Incoming(out.offer(), lambda s, n: held)
    want = incoming.want()
    if held >= size:
        assert incoming.complete and want.want == ()
        return
    start = held - held % CHUNK_SIZE  # a partial object resumes at a chunk boundary
    assert want.want == ((sha, start),)  # one object, once, from what is held
    [(_, first, end)] = out.plan(want)
    assert (first, end) == (start, size)
    received = bytearray(content[:start])
    for offset in range(start, end, CHUNK_SIZE):
        decoded = decode_chunk(
            encode_chunk(out.id, sha, offset, content[offset : offset + CHUNK_SIZE])
        )
        whole = incoming.accept(decoded)
        received += decoded.data
        assert whole == (offset + CHUNK_SIZE >= end)
    assert bytes(received) == content and incoming.complete
    assert content_hash(chunk_digests(bytes(received))) == sha


def test_a_chunk_out_of_order_or_forged_is_refused() -> None:
    content = os.urandom(100)
    sha = content_hash(chunk_digests(content))
    out = Outgoing([FileEntry("x", 100, 0o644, sha)])
    incoming = Incoming(out.offer(), lambda s, size: 0)
    with pytest.raises(ProtocolError, match="expected 0"):
        incoming.accept(decode_chunk(encode_chunk(out.id, sha, 50, content[50:])))
    with pytest.raises(ProtocolError, match="holds 50 bytes, not 100"):
        incoming.accept(decode_chunk(encode_chunk(out.id, sha, 0, content[:50])))
    head, data = encode_chunk(out.id, sha, 0, content)
    with pytest.raises(ProtocolError, match="does not match its hash"):
        decode_chunk([head, b"X" + data[1:]])
    with pytest.raises(ProtocolError, match="not wanted"):
        other = content_hash(chunk_digests(b"other"))
        incoming.accept(decode_chunk(encode_chunk(out.id, other, 0, b"other")))
    with pytest.raises(ProtocolError, match="1 to"):
        decode_chunk(encode_chunk(out.id, sha, 0, b"\0" * (CHUNK_SIZE + 1)))
    with pytest.raises(ProtocolError, match="never offered"):
        from jupyter_io.files import Want

        out.plan(Want(out.id, ((content_hash(chunk_digests(b"?")), 0),)))
