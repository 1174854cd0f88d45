"""The tunnel's file channel: a sans-I/O contract both ends import.

The notebook's directory (local) and the session's workspace (provider) are kept alike by
transfers over the kernel tunnel. A transfer goes one way, from a *sender* to a *receiver*,
in the tunnel's own reliable frames, so it is sequenced, acknowledged and replayed after a
reconnect like every other frame:

1. sender → FILES ``{"op": "offer", "id", "files": [entry...], "why"}``: these files should
   exist at these paths with this content (an entry: ``{"path", "size", "mode", "sha256"}``,
   ``sha256`` being the :func:`content_hash`: the sha256 of the chunks' sha256 digests);
2. receiver → FILES ``{"op": "want", "id", "want": [{"sha256", "offset"}...]}``: the content
   it does not hold yet, each from the offset it already holds (a partial object left by an
   earlier, interrupted transfer resumes there) — content the receiver holds travels never;
3. sender → FILE_CHUNK frames (:func:`encode_chunk`): the wanted bytes in chunks of
   :data:`CHUNK_SIZE` (the last one shorter), each with its own sha256, in order per object;
4. receiver → FILES ``{"op": "done", "id", "written", "conflicts", "refused", "received"}``.

The local end asks the provider for what the kernel wrote with FILES ``{"op": "pull", "id",
"paths": [...] | null, "max_size", "stream"?}``; the provider answers with an offer under the
same id (``paths`` null: every file changed since the last transfer, each at most ``max_size``).

**Streamed entries** (a pull with ``"stream": true`` only, so an older receiver never meets
them): a large file whose content hash the sender does not know yet (:data:`STREAM_MIN` or
more: a file the kernel just wrote) is offered with ``"stream": true`` and, as its
``sha256``, a per-transfer key (:func:`stream_key`) instead of its content hash. The receiver
wants it whole from offset 0; the sender reads each chunk once, hashes it and sends it (one
pass over the file instead of two), then, after the transfer's last chunk, sends FILES
``{"op": "seal", "id", "sealed": [{"key", "sha256"} | {"key", "torn": why}]}``: each streamed
object's content hash, or why it is not sent whole (the file changed while it was read).
The receiver places nothing of a streamed object before its seal, checks the sealed hash
against the chunk digests it checked itself (:meth:`Incoming.seal`), and keeps the content
under that hash only if they agree; a torn or mismatched object is discarded and refused.

Every path that crosses is checked by :func:`check_path` on both ends, and a chunk is
checked against its own hash and its object's expected offset before a byte is written.
Start with :class:`Outgoing` (sender) and :class:`Incoming` (receiver); the I/O around them
(reading, writing beneath a root) is :mod:`jupyter_io.confine`.
"""

from __future__ import annotations

import enum
import hashlib
import posixpath
import re
import struct
import unicodedata
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import ProtocolError

__all__ = [
    "CHUNK_HEADER",
    "CHUNK_SIZE",
    "CONFLICT_TAG",
    "DEFAULT_WINDOW",
    "MAX_ENTRIES",
    "MAX_PATH_BYTES",
    "STREAM_MIN",
    "Chunk",
    "Done",
    "FileEntry",
    "FileOp",
    "Incoming",
    "Offer",
    "Outgoing",
    "Pull",
    "Resolution",
    "Seal",
    "UnsafePath",
    "Want",
    "check_path",
    "chunk_digests",
    "conflict_name",
    "content_hash",
    "decode_chunk",
    "encode_chunk",
    "new_transfer_id",
    "parse_files_body",
    "resolve",
    "stream_key",
]

#: Largest chunk of content in one FILE_CHUNK frame.
CHUNK_SIZE = 1024 * 1024
#: Default bytes of file frames a sender lets await acknowledgement before it sends more,
#: while the kernel is quiet; while kernel messages flow a sender keeps one chunk in flight
#: (:data:`jupyter_io.file_endpoint.KERNEL_QUIET`), so they never queue behind more.
DEFAULT_WINDOW = 16 * 1024 * 1024
#: Most entries one offer (or want) may list; an offer must also fit a control frame.
MAX_ENTRIES = 5000
#: Longest relative path (UTF-8 bytes) and longest component accepted.
MAX_PATH_BYTES = 1024
_MAX_COMPONENT = 255
#: Files this large whose content hash is not known yet are streamed (hashed as they are
#: sent, the hash sealed after) when the receiver accepts streams: reading a GiB the kernel
#: just wrote only to hash it costs 1.6-5.5 s before its first byte travels on this
#: project's VM; below this the hash-first offer (content addressing) costs little.
STREAM_MIN = 64 * 1024 * 1024
#: What marks the remote copy of a file both ends changed.
CONFLICT_TAG = ".remote-conflict"
#: FILE_CHUNK's first part: transfer id, object sha256, offset, chunk sha256.
CHUNK_HEADER = struct.Struct("<16s32sQ32s")

_SHA256 = re.compile(r"[0-9a-f]{64}")
_ID = re.compile(r"[0-9a-f]{32}")
#: A control character or a backslash (one regex search per path: an offer lists up to
#: MAX_ENTRIES of them, parsed on the provider's event loop).
_UNSAFE_CHAR = re.compile(r"[\x00-\x1f\x7f\\]")


class UnsafePath(ProtocolError):
    """A path that would leave its root, or names something that is not a plain file."""


def check_path(name: object) -> str:
    """The normalised relative POSIX path ``name`` stands for, or :class:`UnsafePath`.

    Refused: anything not a non-empty string, absolute paths, ``..`` components, NUL or
    control characters, backslashes (a Windows separator on the other end), components
    that are empty or ``.`` after normalisation, over-long names. Names are NFC-normalised
    so one file has one name on both ends. Both ends call it on every path they send and
    every path they receive; what it returns is still joined beneath the root without
    following links (:mod:`jupyter_io.confine`), since a link can leave a root too.
    """
    if not isinstance(name, str) or not name:
        raise UnsafePath(f"a file path must be a non-empty string, not {name!r}")
    text = unicodedata.normalize("NFC", name)
    if _UNSAFE_CHAR.search(text):
        raise UnsafePath(f"file path {name!r} holds a control character or a backslash")
    if text.startswith("/"):
        raise UnsafePath(f"file path {name!r} is absolute; only paths inside the root travel")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if not parts:
        raise UnsafePath(f"file path {name!r} names no file")
    if ".." in parts:
        raise UnsafePath(f"file path {name!r} climbs out of its root with '..'")
    if any(len(p.encode()) > _MAX_COMPONENT for p in parts):
        raise UnsafePath(f"file path {name[:80]!r}... has a component over 255 bytes")
    path = "/".join(parts)
    if len(path.encode()) > MAX_PATH_BYTES:
        raise UnsafePath(f"file path {name[:80]!r}... is over {MAX_PATH_BYTES} bytes")
    return path


def conflict_name(path: str) -> str:
    """Where the remote copy of ``path`` goes when both ends changed it:
    ``dir/model.remote-conflict.pt`` for ``dir/model.pt``."""
    head, tail = posixpath.split(path)
    stem, ext = posixpath.splitext(tail)
    if not stem:  # ".bashrc": no extension to keep
        stem, ext = tail, ""
    return posixpath.join(head, f"{stem}{CONFLICT_TAG}{ext}")


def content_hash(digests: Iterable[bytes]) -> str:
    """A file's content hash (hex): the sha256 of its chunks' sha256 digests, back to back
    (chunks of :data:`CHUNK_SIZE` from offset 0). Equal content, equal hash; and a receiver
    that checked each chunk's digest as it arrived checks the whole file with no second
    pass over its bytes."""
    return hashlib.sha256(b"".join(digests)).hexdigest()


def chunk_digests(data: bytes | memoryview) -> list[bytes]:
    """The per-chunk sha256 digests of ``data`` (for tests and small files)."""
    view = memoryview(data)
    return [
        hashlib.sha256(view[i : i + CHUNK_SIZE]).digest() for i in range(0, len(view), CHUNK_SIZE)
    ]


def stream_key(transfer: str, path: str) -> str:
    """The key (64 hex digits) a streamed entry of transfer ``transfer`` at ``path`` goes by
    until its seal: derived, so it can never name real content (a sender cannot make a
    streamed object pass for content the receiver holds or writes)."""
    return hashlib.sha256(f"jupyter-io stream\0{transfer}\0{path}".encode()).hexdigest()


def new_transfer_id() -> str:
    """A fresh transfer id (32 hex digits)."""
    return uuid.uuid4().hex


class FileOp(str, enum.Enum):
    """The ``op`` of a FILES frame."""

    OFFER = "offer"
    WANT = "want"
    DONE = "done"
    PULL = "pull"
    SEAL = "seal"


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One file of an offer: where it goes and what it holds (``stream``: ``sha256`` is its
    :func:`stream_key`, the content hash comes in the transfer's :class:`Seal`)."""

    path: str
    size: int
    mode: int
    sha256: str
    stream: bool = False

    @classmethod
    def parse(cls, raw: object) -> FileEntry:
        """Check one offered entry; :class:`ProtocolError` (:class:`UnsafePath`) if bad."""
        if not isinstance(raw, dict):
            raise ProtocolError("a file entry must be an object")
        path = check_path(raw.get("path"))
        size, mode, sha = raw.get("size"), raw.get("mode"), raw.get("sha256")
        if type(size) is not int or size < 0 or size > 1 << 50:
            raise ProtocolError(f"file entry {path!r}: 'size' must be bytes, 0 to 2**50")
        if type(mode) is not int or not 0 <= mode <= 0o777:
            raise ProtocolError(f"file entry {path!r}: 'mode' must be permission bits")
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            raise ProtocolError(f"file entry {path!r}: 'sha256' must be 64 lowercase hex digits")
        stream = raw.get("stream", False)
        if type(stream) is not bool or (stream and size == 0):
            raise ProtocolError(f"file entry {path!r}: 'stream' must be a boolean (size > 0)")
        return cls(path, size, mode, sha, stream)

    def to_json(self) -> dict[str, Any]:
        body = {"path": self.path, "size": self.size, "mode": self.mode, "sha256": self.sha256}
        if self.stream:
            body["stream"] = True
        return body


def _check_id(raw: object) -> str:
    if not isinstance(raw, str) or not _ID.fullmatch(raw):
        raise ProtocolError("a transfer 'id' must be 32 lowercase hex digits")
    return raw


def _list(body: Mapping[str, Any], name: str) -> list[Any]:
    value = body.get(name)
    if not isinstance(value, list):
        raise ProtocolError(f"FILES {body.get('op')} needs a list '{name}'")
    if len(value) > MAX_ENTRIES:
        raise ProtocolError(f"FILES {body.get('op')} lists over {MAX_ENTRIES} '{name}'")
    return value


@dataclass(frozen=True, slots=True)
class Offer:
    id: str
    files: tuple[FileEntry, ...]
    #: Why it is sent: "sync" (kernel start), "push" (asked), "changed" (local edits),
    #: "pull" (an answer to :class:`Pull`).
    why: str = "push"

    def to_body(self) -> dict[str, Any]:
        return {
            "op": FileOp.OFFER.value,
            "id": self.id,
            "why": self.why,
            "files": [e.to_json() for e in self.files],
        }


@dataclass(frozen=True, slots=True)
class Want:
    id: str
    #: (sha256, offset already held) for each object the receiver lacks.
    want: tuple[tuple[str, int], ...]

    def to_body(self) -> dict[str, Any]:
        return {
            "op": FileOp.WANT.value,
            "id": self.id,
            "want": [{"sha256": s, "offset": o} for s, o in self.want],
        }


@dataclass(frozen=True, slots=True)
class Done:
    id: str
    written: tuple[str, ...] = ()
    #: (path, where the remote copy was kept).
    conflicts: tuple[tuple[str, str], ...] = ()
    #: (path, why it was not written).
    refused: tuple[tuple[str, str], ...] = ()
    #: Content bytes that travelled for this transfer.
    received: int = 0

    def to_body(self) -> dict[str, Any]:
        return {
            "op": FileOp.DONE.value,
            "id": self.id,
            "written": list(self.written),
            "conflicts": [list(c) for c in self.conflicts],
            "refused": [list(r) for r in self.refused],
            "received": self.received,
        }


@dataclass(frozen=True, slots=True)
class Pull:
    id: str
    #: Paths asked for (None: whatever changed since the last transfer).
    paths: tuple[str, ...] | None
    #: With ``paths`` None: largest file sent (larger ones wait for a pull by name).
    max_size: int
    #: The asker takes streamed entries and their :class:`Seal`.
    stream: bool = False

    def to_body(self) -> dict[str, Any]:
        body = {
            "op": FileOp.PULL.value,
            "id": self.id,
            "paths": None if self.paths is None else list(self.paths),
            "max_size": self.max_size,
        }
        if self.stream:
            body["stream"] = True
        return body


@dataclass(frozen=True, slots=True)
class Seal:
    """The content hashes of a transfer's streamed objects, sent after their last chunk:
    ``(key, sha256, None)`` for one sent whole, ``(key, None, why)`` for one the sender
    could not send whole (changed while it was read)."""

    id: str
    sealed: tuple[tuple[str, str | None, str | None], ...]

    def to_body(self) -> dict[str, Any]:
        items: list[dict[str, str]] = []
        for key, sha, why in self.sealed:
            items.append(
                {"key": key, "sha256": sha}
                if sha is not None
                else {"key": key, "torn": why or "torn"}
            )
        return {"op": FileOp.SEAL.value, "id": self.id, "sealed": items}


FilesMessage = Offer | Want | Done | Pull | Seal


def _pairs(raw: list[Any], what: str) -> tuple[tuple[str, str], ...]:
    out = []
    for item in raw:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not all(isinstance(x, str) and len(x) <= 4 * MAX_PATH_BYTES for x in item)
        ):
            raise ProtocolError(f"FILES done '{what}' must be pairs of strings")
        out.append((item[0], item[1]))
    return tuple(out)


def parse_files_body(body: Mapping[str, Any]) -> FilesMessage:
    """The typed message of a FILES frame body; :class:`ProtocolError` naming what is wrong."""
    op = body.get("op")
    ident = _check_id(body.get("id"))
    if op == FileOp.OFFER:
        files = tuple(FileEntry.parse(e) for e in _list(body, "files"))
        why = body.get("why", "push")
        if not isinstance(why, str) or len(why) > 16:
            raise ProtocolError("FILES offer 'why' must be a short string")
        if len({e.path for e in files}) != len(files):
            raise ProtocolError("FILES offer names a path twice")
        for entry in files:
            if entry.stream and entry.sha256 != stream_key(ident, entry.path):
                raise ProtocolError(f"FILES offer streams {entry.path!r} under a key not its own")
            if entry.stream and why != "pull":
                raise ProtocolError("FILES offer streams a file outside an answer to a pull")
        return Offer(ident, files, why)
    if op == FileOp.WANT:
        wants = []
        for item in _list(body, "want"):
            sha = item.get("sha256") if isinstance(item, dict) else None
            offset = item.get("offset") if isinstance(item, dict) else None
            if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
                raise ProtocolError("FILES want entries need a 'sha256' of 64 hex digits")
            if type(offset) is not int or offset < 0:
                raise ProtocolError("FILES want entries need an 'offset' of 0 or more")
            wants.append((sha, offset))
        return Want(ident, tuple(wants))
    if op == FileOp.DONE:
        written = _list(body, "written")
        if not all(isinstance(p, str) for p in written):
            raise ProtocolError("FILES done 'written' must be paths")
        received = body.get("received", 0)
        if type(received) is not int or received < 0:
            raise ProtocolError("FILES done 'received' must be bytes")
        return Done(
            ident,
            tuple(written),
            _pairs(_list(body, "conflicts"), "conflicts"),
            _pairs(_list(body, "refused"), "refused"),
            received,
        )
    if op == FileOp.PULL:
        raw_paths = body.get("paths")
        paths = None if raw_paths is None else tuple(check_path(p) for p in _list(body, "paths"))
        max_size = body.get("max_size")
        if type(max_size) is not int or max_size < 0:
            raise ProtocolError("FILES pull needs a 'max_size' of 0 or more bytes")
        stream = body.get("stream", False)
        if type(stream) is not bool:
            raise ProtocolError("FILES pull 'stream' must be a boolean")
        return Pull(ident, paths, max_size, stream)
    if op == FileOp.SEAL:
        sealed: list[tuple[str, str | None, str | None]] = []
        for item in _list(body, "sealed"):
            key = item.get("key") if isinstance(item, dict) else None
            if not isinstance(key, str) or not _SHA256.fullmatch(key):
                raise ProtocolError("FILES seal entries need a 'key' of 64 hex digits")
            sha, torn = item.get("sha256"), item.get("torn")
            if isinstance(sha, str) and _SHA256.fullmatch(sha) and torn is None:
                sealed.append((key, sha, None))
            elif sha is None and isinstance(torn, str) and 0 < len(torn) <= 4 * MAX_PATH_BYTES:
                sealed.append((key, None, torn))
            else:
                raise ProtocolError("FILES seal entries need a 'sha256' or a short 'torn' reason")
        return Seal(ident, tuple(sealed))
    raise ProtocolError(f"unknown FILES op {op!r}; one of offer, want, done, pull, seal")


@dataclass(frozen=True, slots=True)
class Chunk:
    """One decoded FILE_CHUNK: ``data`` of object ``sha256`` from ``offset``, whose own
    sha256 ``digest`` was checked."""

    id: str
    sha256: str
    offset: int
    data: bytes | memoryview
    digest: bytes


def encode_chunk(
    transfer: str,
    sha256: str,
    offset: int,
    data: bytes | memoryview,
    digest: bytes | None = None,
) -> list[bytes]:
    """The two parts of a FILE_CHUNK frame carrying ``data`` (its sha256 ``digest``, hashed
    here when not given)."""
    if digest is None:
        digest = hashlib.sha256(data).digest()
    head = CHUNK_HEADER.pack(bytes.fromhex(transfer), bytes.fromhex(sha256), offset, digest)
    return [head, data]  # type: ignore[list-item]


def decode_chunk(parts: Sequence[bytes | memoryview]) -> Chunk:
    """Check a FILE_CHUNK's parts: the header's shape, the size, the chunk's own hash."""
    if len(parts) != 2 or len(parts[0]) != CHUNK_HEADER.size:
        raise ProtocolError("a FILE_CHUNK frame has a 88-byte header part and a data part")
    transfer, sha, offset, digest = CHUNK_HEADER.unpack(bytes(parts[0]))
    data = parts[1]
    if not 0 < len(data) <= CHUNK_SIZE:
        raise ProtocolError(f"a FILE_CHUNK carries 1 to {CHUNK_SIZE} bytes, not {len(data)}")
    if hashlib.sha256(data).digest() != digest:
        raise ProtocolError(f"a chunk of {sha.hex()[:12]} at {offset} does not match its hash")
    return Chunk(transfer.hex(), sha.hex(), offset, data, digest)


# -- the two ends of a transfer -------------------------------------------------------------


class Outgoing:
    """The sender's side of one transfer: the offer, then what to send for a want.

    Entries marked ``stream`` are offered under their :func:`stream_key` (whatever
    ``sha256`` they came with); :attr:`streams` maps each key to its entry."""

    def __init__(self, entries: Iterable[FileEntry], why: str = "push", ident: str | None = None):
        self.id = ident or new_transfer_id()
        self.files = tuple(
            FileEntry(e.path, e.size, e.mode, stream_key(self.id, e.path), True) if e.stream else e
            for e in entries
        )
        self.why = why
        self._sizes = {e.sha256: e.size for e in self.files}
        self.streams = {e.sha256: e for e in self.files if e.stream}

    def offer(self) -> Offer:
        return Offer(self.id, self.files, self.why)

    def plan(self, want: Want) -> list[tuple[str, int, int]]:
        """``(sha256, offset, end)`` ranges to send, from a want; :class:`ProtocolError`
        when it asks for content this transfer never offered or past its end."""
        ranges = []
        for sha, offset in want.want:
            size = self._sizes.get(sha)
            if size is None:
                raise ProtocolError(
                    f"want names {sha[:12]}, which transfer {self.id} never offered"
                )
            if offset and sha in self.streams:
                raise ProtocolError(f"want asks streamed {sha[:12]} from {offset}, not from 0")
            if offset > size or (offset % CHUNK_SIZE and offset != size):
                raise ProtocolError(
                    f"want asks {sha[:12]} from {offset}: past its {size} bytes or not at a "
                    f"chunk boundary"
                )
            if offset < size:
                ranges.append((sha, offset, size))
        return ranges


@dataclass
class _Object:
    size: int
    offset: int
    #: The checked digests of a streamed object's chunks (to check its seal against).
    digests: list[bytes] | None = None


@dataclass
class Incoming:
    """The receiver's side of one transfer.

    ``held(sha256, size)`` says how many bytes of an object the receiver already holds
    (``size``: all of it; a partial object resumes at what it returns). Call :meth:`want`
    once, then :meth:`accept` for each chunk, and :meth:`seal` for the transfer's
    :class:`Seal` when it streams; :attr:`complete` once every object is whole (and every
    streamed one sealed), then place :meth:`entries`.
    """

    offer: Offer
    held: Callable[[str, int], int]
    _objects: dict[str, _Object] = field(default_factory=dict, init=False)
    #: Content bytes accepted so far.
    received: int = field(default=0, init=False)
    #: Streamed objects not sealed yet: key -> entry.
    _unsealed: dict[str, FileEntry] = field(default_factory=dict, init=False)
    #: Streamed objects' digests once whole (key -> chunk digests), until sealed.
    _streamed: dict[str, list[bytes]] = field(default_factory=dict, init=False)
    #: Sealed streamed objects: key -> content hash, checked.
    sealed: dict[str, str] = field(default_factory=dict, init=False)
    #: (path, why) of streamed files not sent whole, or whose seal did not match.
    torn: list[tuple[str, str]] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        for entry in self.offer.files:
            if entry.stream:  # a per-transfer key: never held, wanted whole from 0
                self._unsealed[entry.sha256] = entry
                self._objects[entry.sha256] = _Object(entry.size, 0, [])
                continue
            if entry.sha256 in self._objects:
                continue
            have = min(max(self.held(entry.sha256, entry.size), 0), entry.size)
            if have < entry.size:
                have -= have % CHUNK_SIZE  # resume at a chunk boundary
            if have < entry.size:
                self._objects[entry.sha256] = _Object(entry.size, have)

    def want(self) -> Want:
        return Want(self.offer.id, tuple((s, o.offset) for s, o in self._objects.items()))

    @property
    def complete(self) -> bool:
        return not self._objects and not self._unsealed

    def is_stream(self, key: str) -> bool:
        """Whether ``key`` names a streamed object of this transfer."""
        return key in self._unsealed or key in self.sealed

    def entries(self) -> tuple[FileEntry, ...]:
        """The offer's files to place: streamed ones under their sealed content hash, the
        torn ones left out."""
        out = []
        for entry in self.offer.files:
            if not entry.stream:
                out.append(entry)
            elif entry.sha256 in self.sealed:
                out.append(FileEntry(entry.path, entry.size, entry.mode, self.sealed[entry.sha256]))
        return tuple(out)

    def seal(self, seal: Seal) -> list[str]:
        """Take the transfer's seal; the keys whose content is to be discarded (torn by the
        sender, or whose chunks do not hash to the sealed content hash: then
        :attr:`torn` says why). :class:`ProtocolError` for a seal of another transfer, of
        an object not streamed here or sealed already, or of one sealed whole before its
        last chunk (nothing of the transfer may be placed then)."""
        if seal.id != self.offer.id:
            raise ProtocolError(f"seal of {seal.id} given to transfer {self.offer.id}")
        discard = []
        for key, sha, why in seal.sealed:
            entry = self._unsealed.pop(key, None)
            if entry is None:
                raise ProtocolError(f"seal names {key[:12]}, not an unsealed stream of {seal.id}")
            if sha is None:
                self._objects.pop(key, None)
                self._streamed.pop(key, None)
                self.torn.append((entry.path, f"not sent whole: {why}; pull it again"))
                discard.append(key)
                continue
            digests = self._streamed.pop(key, None)
            if digests is None:
                raise ProtocolError(f"seal of {entry.path!r} before its last chunk")
            if content_hash(digests) != sha:
                self.torn.append(
                    (entry.path, f"its chunks do not hash to the sealed sha256 {sha[:12]}")
                )
                discard.append(key)
                continue
            self.sealed[key] = sha
        return discard

    @property
    def wanted_bytes(self) -> int:
        return sum(o.size - o.offset for o in self._objects.values())

    def accept(self, chunk: Chunk) -> bool:
        """Check ``chunk`` follows what was received of its object; True when the object
        is now whole. :class:`ProtocolError` for content not wanted, out of order, or past
        the object's size (nothing of it may be written then)."""
        obj = self._objects.get(chunk.sha256)
        if chunk.id != self.offer.id or obj is None:
            raise ProtocolError(f"chunk of {chunk.sha256[:12]} was not wanted by {self.offer.id}")
        if chunk.offset != obj.offset:
            raise ProtocolError(
                f"chunk of {chunk.sha256[:12]} at {chunk.offset}, expected {obj.offset}"
            )
        end = chunk.offset + len(chunk.data)
        if len(chunk.data) != min(CHUNK_SIZE, obj.size - chunk.offset):
            # Chunks are whole CHUNK_SIZE pieces from offset 0: the content hash is theirs.
            raise ProtocolError(
                f"chunk of {chunk.sha256[:12]} at {chunk.offset} holds {len(chunk.data)} "
                f"bytes, not {min(CHUNK_SIZE, obj.size - chunk.offset)}"
            )
        obj.offset = end
        self.received += len(chunk.data)
        if obj.digests is not None:
            obj.digests.append(chunk.digest)
        if end == obj.size:
            del self._objects[chunk.sha256]
            if obj.digests is not None:
                self._streamed[chunk.sha256] = obj.digests
            return True
        return False


class Resolution(str, enum.Enum):
    """What the receiver does with one offered file (:func:`resolve`)."""

    WRITE = "write"
    SAME = "same"
    CONFLICT = "conflict"


def resolve(local: str | None, base: str | None, remote: str) -> Resolution:
    """Decide one incoming file: ``local`` its current hash here (None: absent), ``base``
    the hash both ends agreed on at the last transfer (None: never transferred), ``remote``
    the offered hash. Unchanged here since the last transfer (or absent): WRITE. Changed
    here to the same content: SAME. Changed here to other content: CONFLICT (keep both)."""
    if local == remote:
        return Resolution.SAME
    if local is None or local == base:
        return Resolution.WRITE
    return Resolution.CONFLICT
