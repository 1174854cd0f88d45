"""File access confined beneath a root directory, for both ends of the file channel.

Every path handed here has passed :func:`jupyter_io.files.check_path` (relative, no ``..``);
this module makes sure a *link* cannot take it out of its root either: each directory on
the way is opened relative to its parent with ``O_NOFOLLOW``, files are read only when they
are regular files with a single link (a hard link could point at a file outside), and a
file is written by creating a temporary file in its directory and renaming it over the
name, which replaces a planted link instead of writing through it.

Start with :func:`scan` (what a tree holds), :func:`open_beneath` (read one file) and
:func:`place` (write one file from a source descriptor).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .files import CHUNK_SIZE, UnsafePath, content_hash

__all__ = [
    "HashCache",
    "Scanned",
    "copy_fd",
    "hash_fd",
    "open_beneath",
    "open_parent",
    "place",
    "scan",
]

_SHA256 = re.compile(r"[0-9a-f]{64}")
_HASHES_VERSION = 2
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ = CHUNK_SIZE


def open_parent(
    root: str, path: str, *, create: bool = False, owner: tuple[int, int] | None = None
) -> tuple[int, str]:
    """A descriptor of ``path``'s directory beneath ``root`` and the file's name in it.

    ``create`` makes missing directories (0755, owned by ``owner`` when given). Raises
    :class:`UnsafePath` when a component on the way is a link or not a directory; the caller
    closes the descriptor.
    """
    *dirs, name = path.split("/")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in dirs:
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                made = False
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=fd)
                    made = True
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                if made and owner is not None:
                    os.fchown(child, *owner)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafePath(f"{path!r}: {part!r} is a link or not a directory") from None
                raise
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd, name


def open_beneath(root: str, path: str) -> tuple[int, os.stat_result]:
    """Open ``path`` beneath ``root`` for reading: a regular file with one link only.

    Raises :class:`UnsafePath` for a link, a device, a FIFO, a hard-linked file;
    :class:`FileNotFoundError` when it is gone.
    """
    parent, name = open_parent(root, path)
    try:
        try:
            fd = os.open(
                name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=parent
            )
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafePath(f"{path!r} is a symbolic link; links are not followed") from None
            raise
    finally:
        os.close(parent)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        what = "has other hard links" if stat.S_ISREG(info.st_mode) else "is not a plain file"
        raise UnsafePath(f"{path!r} {what}; it is not sent")
    return fd, info


#: Files of at least this many bytes are hashed by several threads, each its own stripe of
#: chunks (sha256 and pread release the GIL): the digests are per chunk, so the stripes are
#: independent and the result is the same as one pass.
_PARALLEL_BYTES = 16 * CHUNK_SIZE
_HASH_THREADS = max(1, min(4, os.cpu_count() or 1))


def _hash_chunks(fd: int, first: int, last: int, out: list[bytes]) -> None:
    """sha256 of chunks ``first``..``last - 1`` of ``fd`` into ``out`` (same indices)."""
    for index in range(first, last):
        block = os.pread(fd, CHUNK_SIZE, index * CHUNK_SIZE)
        out[index] = hashlib.sha256(block).digest()


def hash_fd(fd: int) -> tuple[str, list[bytes]]:
    """The :func:`~jupyter_io.files.content_hash` of everything in ``fd`` from offset 0, and
    its chunks' sha256 digests. A large file is hashed by up to four threads at once."""
    size = os.fstat(fd).st_size
    if size >= _PARALLEL_BYTES and _HASH_THREADS > 1:
        count = -(-size // CHUNK_SIZE)
        digests = [b""] * count
        bounds = [count * i // _HASH_THREADS for i in range(_HASH_THREADS + 1)]
        failures: list[BaseException] = []

        def stripe(i: int) -> None:
            try:
                _hash_chunks(fd, bounds[i], bounds[i + 1], digests)
            except BaseException as exc:  # re-raised below, in the caller's thread
                failures.append(exc)

        workers = [
            threading.Thread(target=stripe, args=(i,), daemon=True) for i in range(1, _HASH_THREADS)
        ]
        for worker in workers:
            worker.start()
        stripe(0)
        for worker in workers:
            worker.join()
        if failures:
            raise failures[0]
        if os.fstat(fd).st_size == size:
            return content_hash(digests), digests
        # The file changed size meanwhile: hash what it holds now, in one pass.
    digests = []
    offset = 0
    while True:
        block = os.pread(fd, CHUNK_SIZE, offset)
        if not block:
            return content_hash(digests), digests
        digests.append(hashlib.sha256(block).digest())
        offset += len(block)


def copy_fd(source: int, target: int, size: int) -> None:
    """Copy ``size`` bytes from ``source`` (offset 0) to ``target`` (in the kernel when it can)."""
    offset = 0
    while offset < size:
        try:
            n = os.copy_file_range(source, target, size - offset, offset, offset)
        except OSError:
            n = 0
        if n <= 0:  # not supported across these filesystems: read and write
            block = os.pread(source, _READ, offset)
            if not block:
                raise OSError(f"source ended at {offset} of {size} bytes")
            n = os.pwrite(target, block, offset)
        offset += n


def place(
    root: str,
    path: str,
    source: int | bytes | str,
    size: int,
    mode: int,
    *,
    owner: tuple[int, int] | None = None,
) -> os.stat_result:
    """Write ``size`` bytes of ``source`` (a descriptor, read from offset 0, or the bytes
    themselves) as ``path`` beneath ``root``; return its stat. A ``str`` source is the
    absolute path of a file of ``size`` bytes that is *moved* there (renamed: no copy; it
    must be on the same filesystem, else :class:`OSError` and nothing changed).

    The file is created beside its final name and renamed over it: a link planted under
    that name is replaced, never written through, and a reader never sees half a file.
    ``mode`` keeps its rwx bits for the owner only plus read for others (no set-id bits).
    Raises :class:`UnsafePath` when a directory on the way is a link, or the name is a
    directory.
    """
    parent, name = open_parent(root, path, create=True, owner=owner)
    temp = f".{name[:200]}.jio-{secrets.token_hex(4)}"
    try:
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISDIR(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode):
                raise UnsafePath(f"{path!r} is a directory here; the file is not written")
        if isinstance(source, str):
            os.rename(source, temp, dst_dir_fd=parent)
            fd = os.open(temp, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        else:
            fd = os.open(
                temp,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=parent,
            )
        try:
            if isinstance(source, str):
                if os.fstat(fd).st_size != size:
                    raise OSError(f"{source} holds other than {size} bytes")
            elif isinstance(source, int):
                copy_fd(source, fd, size)
            else:
                if len(source) != size:
                    raise OSError(f"{len(source)} bytes given for a file of {size}")
                view = memoryview(source)
                while view:
                    view = view[os.write(fd, view) :]
            os.fchmod(fd, (mode & 0o755) | 0o600)
            if owner is not None:
                os.fchown(fd, *owner)
            info = os.fstat(fd)
        finally:
            os.close(fd)
        os.replace(temp, name, src_dir_fd=parent, dst_dir_fd=parent)
        # The rename changed its ctime: the stat a later scan compares with is this one.
        with contextlib.suppress(OSError):
            final = os.stat(name, dir_fd=parent, follow_symlinks=False)
            if final.st_ino == info.st_ino:
                info = final
        return info
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp, dir_fd=parent)
        raise
    finally:
        os.close(parent)


@dataclass(frozen=True, slots=True)
class Scanned:
    """One regular file a scan found."""

    path: str
    size: int
    mode: int
    mtime_ns: int
    ino: int
    #: Changes with any write, and no tool sets it back (unlike mtime).
    ctime_ns: int = 0


def scan(
    root: str,
    skip: Callable[[str, bool], bool],
    refused: list[tuple[str, str]] | None = None,
) -> Iterator[Scanned]:
    """Every regular, singly linked file beneath ``root``, links never followed.

    ``skip(relpath, is_dir)`` prunes (a skipped directory is not entered). What is not a
    plain file (links, devices, FIFOs, sockets, hard-linked files) is left out and, when
    ``refused`` is given, listed there with the reason.
    """
    stack = [""]
    while stack:
        prefix = stack.pop()
        try:
            entries = list(os.scandir(os.path.join(root, prefix) if prefix else root))
        except OSError:
            continue
        for entry in sorted(entries, key=lambda e: e.name):
            rel = f"{prefix}/{entry.name}" if prefix else entry.name
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(info.st_mode):
                if not skip(rel, True):
                    stack.append(rel)
                continue
            if skip(rel, False):
                continue
            if not stat.S_ISREG(info.st_mode):
                if refused is not None:
                    kind = "a symbolic link" if stat.S_ISLNK(info.st_mode) else "not a plain file"
                    refused.append((rel, f"{kind}; not sent"))
                continue
            if info.st_nlink != 1:
                if refused is not None:
                    refused.append((rel, "has other hard links; not sent"))
                continue
            yield Scanned(
                rel,
                info.st_size,
                info.st_mode & 0o777,
                info.st_mtime_ns,
                info.st_ino,
                info.st_ctime_ns,
            )


class HashCache:
    """Content hashes of files by path (and their chunk digests), recomputed only when
    size, mtime, inode or ctime changed."""

    def __init__(self) -> None:
        self._known: dict[str, tuple[int, int, int, int, str, list[bytes] | None]] = {}
        #: True when something was hashed since the last :meth:`save` or :meth:`load`.
        self.dirty = False

    def save(self, path: str, *, settle_ns: int = 2_000_000_000) -> None:
        """Keep the hashes in the file ``path`` (JSON, 0600, written beside it and renamed)
        for a later :meth:`load`, e.g. by the next session of the same directory. Files
        modified within ``settle_ns`` of now are left out: a change within the clock's
        granularity keeps size and mtime alike ("racily clean", as git says)."""
        horizon = time.time_ns() - settle_ns
        files = {
            name: [size, mtime, ino, ctime, sha]
            # A copy: a placement thread may add an entry while this runs.
            for name, (size, mtime, ino, ctime, sha, _) in list(self._known.items())
            if mtime < horizon and ctime < horizon
        }
        directory = os.path.dirname(path)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        temp = f"{path}.{secrets.token_hex(4)}"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"version": _HASHES_VERSION, "files": files}, f, separators=(",", ":"))
            os.replace(temp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        self.dirty = False

    def load(self, path: str) -> int:
        """Take the hashes :meth:`save` kept in ``path`` (what is malformed is skipped; a
        missing or unreadable file gives none); the number taken. A hash is used only while
        its file's size, mtime and inode are still those it was taken with."""
        try:
            with open(path, encoding="utf-8") as f:
                kept = json.load(f)
            files = kept.get("files") if kept.get("version") == _HASHES_VERSION else None
        except (OSError, ValueError, AttributeError):
            return 0
        taken = 0
        for name, item in files.items() if isinstance(files, dict) else ():
            if (
                isinstance(item, list)
                and len(item) == 5
                and all(type(x) is int for x in item[:4])
                and isinstance(item[4], str)
                and _SHA256.fullmatch(item[4])
                and name not in self._known
            ):
                self._known[name] = (item[0], item[1], item[2], item[3], item[4], None)
                taken += 1
        return taken

    def get(self, item: Scanned) -> str | None:
        known = self._known.get(item.path)
        if known is not None and known[:4] == (item.size, item.mtime_ns, item.ino, item.ctime_ns):
            return known[4]
        return None

    def digests(self, path: str, info: os.stat_result, sha: str) -> list[bytes] | None:
        """The chunk digests of ``path`` as hashed, if it is still that file with ``sha``."""
        known = self._known.get(path)
        key = (info.st_size, info.st_mtime_ns, info.st_ino, info.st_ctime_ns, sha)
        if known is None or known[:5] != key:
            return None
        return known[5]

    def put(
        self,
        path: str,
        info: os.stat_result | Scanned,
        sha: str,
        digests: list[bytes] | None = None,
    ) -> None:
        self.dirty = True
        if isinstance(info, Scanned):
            self._known[path] = (info.size, info.mtime_ns, info.ino, info.ctime_ns, sha, digests)
        else:
            self._known[path] = (
                info.st_size,
                info.st_mtime_ns,
                info.st_ino,
                info.st_ctime_ns,
                sha,
                digests,
            )

    def hash(self, root: str, item: Scanned) -> str:
        """The file's sha256 (cached); :class:`UnsafePath`/:class:`OSError` as
        :func:`open_beneath`."""
        sha = self.get(item)
        if sha is not None:
            return sha
        fd, info = open_beneath(root, item.path)
        try:
            sha, digests = hash_fd(fd)
        finally:
            os.close(fd)
        self.put(item.path, info, sha, digests)
        return sha
