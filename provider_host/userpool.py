"""Per-session Unix users for sandboxed kernels, allocated and recycled like systemd's DynamicUser.

A host running as root gives every session a uid of its own from a fixed range
(``ProviderConfig.sandbox_first_uid``, ``sandbox_uid_count``); the session's kernel drops to it
inside its sandbox (:mod:`provider_host.sandbox`). As with DynamicUser, nothing is written to
``/etc/passwd``: a uid is taken by holding an exclusive ``flock`` on a lock file named after it
in a root-only directory, so hosts sharing a machine never hand out the same uid, and a uid
comes back to the pool the moment its session ends or its host dies (the kernel dies with the
host; the lock goes with its file descriptor). Uids that name a user in the passwd database
are skipped.

Call :meth:`UserPool.acquire` when a session opens and :meth:`UserPool.release` once its
kernel is dead and its workspace deleted.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import secrets
from dataclasses import dataclass
from pathlib import Path

from jupyter_io.errors import ConfigError

__all__ = ["DEFAULT_LOCK_DIR", "SessionUser", "UserPool"]

#: Where the uid locks live (root-only, 0700); under /run so a reboot clears it.
DEFAULT_LOCK_DIR = "/run/jupyter-io/uids"


@dataclass(frozen=True, slots=True)
class SessionUser:
    """A uid (and a gid of the same number) held by one session."""

    uid: int
    gid: int
    #: ``USER``/``LOGNAME`` in the kernel's environment (no passwd entry exists).
    name: str


class UserPool:
    """Hands out uids from ``[first_uid, first_uid + count)`` (see the module docstring)."""

    def __init__(self, first_uid: int, count: int, lock_dir: str | os.PathLike[str]) -> None:
        if first_uid < 1000 or count < 1 or first_uid + count > 2**32 - 2:
            raise ConfigError(
                f"sandbox uid range {first_uid}+{count} is unusable; pick unprivileged uids no "
                f"user owns, e.g. sandbox_first_uid=1500000000"
            )
        self.first_uid = first_uid
        self.count = count
        self.lock_dir = Path(lock_dir)
        self._locks: dict[int, int] = {}  # uid -> the fd holding its flock

    def prepare(self) -> None:
        """Create the lock directory (0700). Raises :class:`ConfigError` when it cannot."""
        try:
            self.lock_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.lock_dir, 0o700)
        except OSError as exc:
            raise ConfigError(f"cannot create the sandbox uid lock directory: {exc}") from None

    def acquire(self) -> SessionUser:
        """A uid no live session on this machine holds. Raises :class:`ConfigError` when the
        range is exhausted."""
        # Start anywhere: hosts starting together would otherwise all probe the same locks.
        start = secrets.randbelow(self.count)
        for step in range(self.count):
            uid = self.first_uid + (start + step) % self.count
            if _has_passwd_entry(uid):
                continue
            fd = os.open(
                self.lock_dir / f"{uid}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self._locks[uid] = fd
            return SessionUser(uid, uid, f"jio-{uid}")
        raise ConfigError(
            f"all {self.count} sandbox uids from {self.first_uid} are in use; raise "
            f"ProviderConfig.sandbox_uid_count"
        )

    def release(self, user: SessionUser) -> None:
        """Give ``user``'s uid back (call once no process of its session is left). Idempotent."""
        fd = self._locks.pop(user.uid, None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


def _has_passwd_entry(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True
