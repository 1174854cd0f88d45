"""Session workspaces on disk: created private, held while the session lives, wiped after.

Each session's workspace is a directory ``<workspace_root>/<session id>`` (mode 0700, owned by
the session's uid when it has one). The host holds an exclusive ``flock`` on the directory for
the session's whole life, so a workspace whose lock is free belongs to no live session: its
host was killed before it could delete it. :func:`wipe_orphaned_workspaces`, called at
startup, deletes those, and never a workspace of another host sharing the root that is
still alive.

Call :func:`create_workspace` when a session opens (it returns the lock) and
:func:`remove_workspace` when it ends.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import stat
from pathlib import Path
from typing import Any

__all__ = [
    "create_workspace",
    "disk_usage",
    "remove_tree",
    "remove_workspace",
    "wipe_orphaned_workspaces",
]


def create_workspace(path: Path, owner: tuple[int, int] | None = None) -> int:
    """Create ``path`` (and ``path/.tmp``) 0700 for ``owner`` (uid, gid); lock it.

    Returns the descriptor holding the lock: give it to :func:`remove_workspace`.
    Raises :class:`OSError` (nothing is left behind).
    """
    path.mkdir(mode=0o700, parents=True)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            (path / ".tmp").mkdir(mode=0o700)
            if owner is not None:
                for directory in (path, path / ".tmp"):
                    os.chown(directory, *owner)
        except BaseException:
            os.close(fd)
            raise
    except BaseException:
        remove_tree(path)
        raise
    return fd


def remove_workspace(path: Path, lock_fd: int | None) -> None:
    """Delete the workspace, then release its lock."""
    remove_tree(path)
    if lock_fd is not None:
        with contextlib.suppress(OSError):
            os.close(lock_fd)


def remove_tree(path: Path) -> None:
    """Delete ``path`` recursively, also where a tenant took the write bit off a directory."""

    def make_writable_and_retry(function: Any, failed: str, _exc: Any) -> None:
        with contextlib.suppress(OSError):
            parent = os.path.dirname(failed)
            os.chmod(parent, stat.S_IRWXU)
            if os.path.isdir(failed) and not os.path.islink(failed):
                os.chmod(failed, stat.S_IRWXU)
            function(failed)

    if path.is_symlink() or path.is_file():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    shutil.rmtree(path, onerror=make_writable_and_retry)  # onexc= is Python 3.12+


def disk_usage(path: Path) -> int:
    """Bytes of disk the tree at ``path`` occupies (allocated blocks: sparse files count what
    they use; hard links once). Blocking: call it in a thread."""
    seen: set[tuple[int, int]] = set()
    total = 0
    stack = [str(path)]
    while stack:
        directory = stack.pop()
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    try:
                        info = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    if stat.S_ISDIR(info.st_mode):
                        stack.append(entry.path)
                    elif info.st_nlink > 1:
                        if (info.st_dev, info.st_ino) in seen:
                            continue
                        seen.add((info.st_dev, info.st_ino))
                    total += info.st_blocks * 512
        except OSError:
            continue
    return total


def wipe_orphaned_workspaces(root: str | os.PathLike[str], log: logging.Logger) -> list[str]:
    """Delete every workspace under ``root`` that no live session holds; return their names.

    Also makes ``root`` 0700 when this process owns it: a uid handed out again after a host
    died must not reach, from another host's sandbox, the files that host left there.
    """
    wiped: list[str] = []
    path = Path(root).expanduser()
    try:
        if path.stat().st_uid == os.geteuid():
            path.chmod(0o700)
        entries = list(path.iterdir())
    except FileNotFoundError:
        return wiped
    for entry in entries:
        if entry.is_symlink() or not entry.is_dir():
            continue
        try:
            fd = os.open(entry, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live session of another host
        else:
            remove_tree(entry)
            wiped.append(entry.name)
        finally:
            os.close(fd)
    if wiped:
        log.warning(
            "wiped %d workspace(s) left by a host that did not shut down: %s",
            len(wiped),
            ", ".join(sorted(wiped)),
        )
    return wiped
