"""One process at a time on a data directory: an advisory lock that dies with its holder.

``jupyter io demo`` keeps a database, keys and a ledger in its data directory; two demos on
one directory would share them and undo each other's work. :class:`DataDirLock` holds an
exclusive ``flock`` on a lock file in the directory for as long as the process lives (the
kernel releases it when the process ends, however it ends: no stale lock after a crash or a
``kill -9``), and keeps in the file what a second process should be told: the holder's pid and
the URLs it serves (:meth:`DataDirLock.update`). :meth:`DataDirLock.acquire` refuses at once
with :class:`DataDirBusy`, which carries that record.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["LOCK_FILE", "DataDirBusy", "DataDirLock"]

#: The lock file's name in the data directory.
LOCK_FILE = "demo.lock"
#: The most of a lock file read back (it holds a few URLs).
_MAX_RECORD = 64 * 1024


class DataDirBusy(ConfigError):
    """Another live process holds the directory's lock; :attr:`holder` is what it recorded
    (``pid``, ``lab_url``, ``coordinator_url``, ... ; empty if it recorded nothing yet)."""

    def __init__(self, message: str, directory: Path, holder: dict[str, Any]) -> None:
        super().__init__(message)
        self.directory = directory
        self.holder = holder


class DataDirLock:
    """The lock of ``directory`` (its file is ``directory / name``). Not reentrant; one per
    process and directory. Use :meth:`acquire`, :meth:`update`, :meth:`release`, or ``with``."""

    def __init__(self, directory: str | os.PathLike[str], name: str = LOCK_FILE) -> None:
        self.directory = Path(directory).expanduser().absolute()
        self.path = self.directory / name
        self._fd: int | None = None
        self._record: dict[str, Any] = {}

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, **record: Any) -> None:
        """Take the lock without waiting and record ``record`` (JSON values) in its file.
        Raises :class:`DataDirBusy` when another process holds it (or this one, through
        another :class:`DataDirLock`)."""
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already locked by this object")
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Not inherited by children (PEP 446): the lock is this process's, not a child's.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise DataDirBusy(
                f"{self.directory} is in use by process {holder.get('pid', '?')}",
                self.directory,
                holder,
            ) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._record = {}
        self.update(**record)

    def update(self, **fields: Any) -> None:
        """Add ``fields`` to the record a refused process is shown (rewrites the file)."""
        if self._fd is None:
            raise RuntimeError(f"{self.path} is not locked by this object")
        self._record.update(fields)
        data = json.dumps(self._record).encode()
        # Write, then cut: the record only grows, so a reader never sees an empty file.
        os.pwrite(self._fd, data, 0)
        os.ftruncate(self._fd, len(data))

    def holder(self) -> dict[str, Any]:
        """What the current holder recorded ({} when unlocked or unreadable)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return {}
        try:
            return _read(fd)
        finally:
            os.close(fd)

    def release(self) -> None:
        """Give the lock up (idempotent). The file stays: removing it would let two
        processes lock two different files of one name."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # closing the last descriptor releases the flock

    def __enter__(self) -> DataDirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read(fd: int) -> dict[str, Any]:
    try:
        raw = os.pread(fd, _MAX_RECORD, 0)
        record = json.loads(raw) if raw else {}
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}
