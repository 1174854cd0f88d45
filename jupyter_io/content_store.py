"""A content-addressed store of file objects, keyed by sha256, bounded in bytes.

The receiving end of a file transfer (:mod:`jupyter_io.file_endpoint`) writes incoming
content here first: ``partial/<sha256>`` grows chunk by chunk (hashed as it grows), and
becomes ``objects/<sha256>`` once its whole hash checks out. What the store holds never
travels again: a restarted kernel, or a second session of the same user, finds it here.
An interrupted transfer resumes from the partial object's size.

The provider host keeps one store per user (``data_dir/files/<pubkey>``, never visible to
kernels); the local end keeps one in Jupyter's data directory. Past ``max_bytes`` the
objects used least recently are deleted (:meth:`ContentStore.evict`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from .errors import ProtocolError
from .files import CHUNK_SIZE, content_hash

__all__ = ["ContentStore"]

_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass
class _Writer:
    fd: int
    offset: int
    digests: list[bytes]


class ContentStore:
    """Objects by sha256 under ``root`` (created 0700), at most ``max_bytes`` (0: no bound)."""

    def __init__(self, root: str | os.PathLike[str], max_bytes: int = 0) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.objects = self.root / "objects"
        self.partial = self.root / "partial"
        for directory in (self.root, self.objects, self.partial):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._writers: dict[str, _Writer] = {}

    @staticmethod
    def _check(sha: str) -> str:
        if not _SHA256.fullmatch(sha):
            raise ProtocolError(f"{sha[:70]!r} is not a sha256")
        return sha

    def held(self, sha: str, size: int) -> int:
        """Bytes of object ``sha`` (of ``size``) held: ``size`` when whole, the partial
        object's length when a transfer was interrupted, else 0."""
        self._check(sha)
        with contextlib.suppress(OSError):
            if os.stat(self.objects / sha).st_size == size:
                return size
        writer = self._writers.get(sha)
        if writer is not None:
            return writer.offset
        try:
            held = min(os.stat(self.partial / sha).st_size, size)
        except OSError:
            return 0
        return held - held % CHUNK_SIZE  # a torn last chunk is written again

    def write(self, sha: str, offset: int, data: bytes | memoryview, digest: bytes) -> None:
        """Append chunk ``data`` (its checked sha256 ``digest``) at ``offset`` of the partial
        object ``sha`` (the caller checked the order: :class:`jupyter_io.files.Incoming`)."""
        writer = self._writers.get(sha)
        if writer is None or writer.offset != offset:
            writer = self._open(sha, offset)
        os.pwrite(writer.fd, data, offset)
        writer.digests.append(digest)
        writer.offset = offset + len(data)

    def _open(self, sha: str, offset: int) -> _Writer:
        self._check(sha)
        self.close(sha)
        fd = os.open(self.partial / sha, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, offset)
            digests = []
            done = 0
            while done < offset:  # a resumed object: hash what it holds already
                block = os.pread(fd, min(CHUNK_SIZE, offset - done), done)
                if not block:
                    raise OSError(f"partial object {sha[:12]} is shorter than {offset}")
                digests.append(hashlib.sha256(block).digest())
                done += len(block)
        except BaseException:
            os.close(fd)
            raise
        writer = self._writers[sha] = _Writer(fd, offset, digests)
        return writer

    def finish(self, sha: str) -> bool:
        """Make the partial object ``sha`` whole if its content hashes to ``sha``; else
        delete it. Returns whether it is whole now."""
        writer = self._writers.pop(sha, None)
        if writer is None:
            try:
                writer = self._open(sha, os.stat(self.partial / sha).st_size)
            except FileNotFoundError:
                return (self.objects / sha).exists()
            self._writers.pop(sha, None)
        try:
            good = content_hash(writer.digests) == sha
        finally:
            os.close(writer.fd)
        if good:
            os.replace(self.partial / sha, self.objects / sha)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.partial / sha)
        return good

    def finish_as(self, key: str, sha: str) -> bool:
        """Make the partial object ``key`` (a streamed file's per-transfer key) whole object
        ``sha`` if its content hashes to ``sha``; else delete it. Returns whether it is
        whole now (already held under ``sha``: the partial one is dropped)."""
        self._check(sha)
        writer = self._writers.pop(self._check(key), None)
        if writer is None:
            try:
                writer = self._open(key, os.stat(self.partial / key).st_size)
            except FileNotFoundError:
                return False
            self._writers.pop(key, None)
        try:
            good = content_hash(writer.digests) == sha
        finally:
            os.close(writer.fd)
        if good and not (self.objects / sha).exists():
            os.replace(self.partial / key, self.objects / sha)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.partial / key)
        return good

    def discard(self, key: str) -> None:
        """Close and delete the partial object ``key`` (a streamed file that will not be
        placed: torn, refused, or its transfer failed)."""
        self.close(self._check(key))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.partial / key)

    def put(self, sha: str, data: bytes) -> None:
        """Keep ``data`` as whole object ``sha`` (the caller checked it hashes to ``sha``);
        written beside its name and renamed, so a reader never sees part of it."""
        final = self.objects / self._check(sha)
        if final.exists():
            return
        temp = self.objects / f".{sha}.{secrets.token_hex(4)}"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        os.close(fd)
        os.replace(temp, final)

    def path(self, sha: str) -> str:
        """Where whole object ``sha`` lies (whether or not it is there): a caller that
        moves it out takes it from the store."""
        return str(self.objects / self._check(sha))

    def open(self, sha: str) -> int:
        """A read descriptor of whole object ``sha`` (marked used); FileNotFoundError."""
        path = self.objects / self._check(sha)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        with contextlib.suppress(OSError):
            os.utime(path)
        return fd

    def close(self, sha: str | None = None) -> None:
        """Close the partial object ``sha`` (all when None), keeping what it holds."""
        for key in [sha] if sha is not None else list(self._writers):
            writer = self._writers.pop(key, None) if key is not None else None
            if writer is not None:
                os.close(writer.fd)

    def size(self) -> int:
        total = 0
        for directory in (self.objects, self.partial):
            with os.scandir(directory) as entries:
                for entry in entries:
                    with contextlib.suppress(OSError):
                        total += entry.stat(follow_symlinks=False).st_size
        return total

    def evict(self, keep: frozenset[str] = frozenset()) -> int:
        """Delete the least recently used objects (partial ones first) until the store is
        within ``max_bytes``, never those in ``keep`` or being written; bytes freed."""
        if self.max_bytes <= 0:
            return 0
        entries = []
        for rank, directory in enumerate((self.partial, self.objects)):
            with os.scandir(directory) as found:
                for entry in found:
                    with contextlib.suppress(OSError):
                        info = entry.stat(follow_symlinks=False)
                        entries.append(
                            (rank, info.st_mtime_ns, entry.name, entry.path, info.st_size)
                        )
        total = sum(e[4] for e in entries)
        freed = 0
        for _, _, name, path, size in sorted(entries):
            if total - freed <= self.max_bytes:
                break
            if name in keep or name in self._writers:
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                freed += size
        return freed
