"""Course environments: the Python packages a cohort's kernels run with, built once per hash.

A cohort names the packages its notebooks need in a requirements text; a lease token for
one of its sessions carries that text's sha256 (:attr:`jupyter_io.leases.LeaseClaims.env`),
and the host fetches the text over its link (:meth:`provider_host.coordinator_link.
CoordinatorLink.environment`, checked against the hash). :class:`EnvironmentCache` turns a
hash into a virtual environment under ``<data_dir>/environments/<sha256>``:

* ``python -m venv --system-site-packages --without-pip`` from the host's own interpreter,
  plus a ``.pth`` file that adds the host's site directories after the environment's own,
  so ipykernel and the kernel launcher are there and the course's packages win;
* ``python -m pip install -r requirements.txt`` with pip taken from the host, the
  provider's ``environment_pip_args`` (``--no-index --find-links DIR`` on an air-gapped
  host), no cache, a time cap (``environment_build_timeout``) and a size cap
  (``environment_max_bytes``).

Both steps run in the session sandbox (:mod:`provider_host.sandbox`): the host's state
hidden and its key masked, the environment's directory the only host path it may write,
on a root host as a uid of the pool (never root), with a network namespace of its own
unless ``environment_network`` allows pip the network. Pip arguments that name existing
absolute paths (a ``--find-links`` directory) are shown to the build read-only. After the
build the host takes the files back (a root host chowns them to itself, links not
followed), so no later session's uid can change an environment others run; kernels see it
read-only.

One build per hash at a time: concurrent sessions in this process wait for the same build,
other processes sharing the data directory wait on its ``<sha256>.lock`` (``flock``). A build
that fails leaves nothing behind and is not remembered: the error (:class:`
EnvironmentBuildError`) carries pip's last lines, and the next session tries again.
Each session holds its environment with a shared ``flock`` (:meth:`EnvironmentCache.hold`)
while its kernels may run; past ``environment_cache_count`` environments the least recently
used ones that nobody holds are deleted.

Call :meth:`EnvironmentCache.get` before a kernel starts, then :meth:`EnvironmentCache.hold`;
:meth:`EnvironmentCache.close` when the host shuts down.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import json
import logging
import os
import re
import signal
import site
import stat
import sys
import sysconfig
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from jupyter_io.errors import KernelLaunchError

from .isolation import ResourceLimits, limits_preexec
from .sandbox import Sandbox
from .workspaces import disk_usage, remove_tree

__all__ = [
    "COMPLETE_MARKER",
    "Environment",
    "EnvironmentBuildError",
    "EnvironmentCache",
    "check_requirements",
]

#: The file whose presence (host-owned, written last) says an environment is built.
COMPLETE_MARKER = ".complete"
#: Bytes of pip's output kept for the error of a failed build.
_TAIL_BYTES = 4000
_SHA256_HEX = re.compile(r"[0-9a-f]{64}\Z")
_HOST_PTH = "_jupyter_io_host.pth"
# Lock polling: builds take seconds to minutes; a waiter need not hear of the end sooner.
_LOCK_POLL = 0.1
# Seconds a step's output may still take to drain once it has exited.
_READ_AFTER_EXIT = 5.0

Progress = Callable[[str, str], Awaitable[None]]
"""``progress(state, message)``: ``state`` is ``"building"``, ``"ready"`` or ``"failed"``."""


class EnvironmentBuildError(KernelLaunchError):
    """A course environment could not be built (pip failed, a cap was hit, bad text)."""


@dataclass(frozen=True, slots=True)
class Environment:
    """A built course environment."""

    sha256: str
    path: Path
    """``<root>/<sha256>``: what the kernel's sandbox shows read-only."""

    @property
    def python(self) -> Path:
        """The interpreter kernels of this environment start with."""
        return self.path / "venv" / "bin" / "python"


def check_requirements(text: str) -> None:
    """Refuse what this host will not pass to ``pip install -r``: option lines (``-r``,
    ``-c``, ``-e``, ``--index-url``, ``--find-links``...), which would read other files or
    choose where packages come from; that is the provider's choice
    (``environment_pip_args``). Raises :class:`EnvironmentBuildError` naming the line."""
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("-"):
            raise EnvironmentBuildError(
                f"line {number} of the course's requirements is a pip option ({stripped[:60]!r}); "
                f"a course environment lists packages only (the provider chooses the index): "
                f"ask the instructor to remove it"
            )


def host_site_dirs() -> list[str]:
    """This interpreter's site directories (its venv's, then the system's): what a course
    environment adds after its own so the host's ipykernel imports there."""
    dirs: list[str] = []
    candidates = [*site.getsitepackages(), sysconfig.get_path("purelib")]
    candidates.append(sysconfig.get_path("platlib"))
    for path in candidates:
        if path and os.path.isdir(path) and path not in dirs:
            dirs.append(path)
    return dirs


class EnvironmentCache:
    """The course environments of one host (see the module docstring)."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        sandbox: Sandbox | None,
        pip_args: Sequence[str] = (),
        network: bool = True,
        keep: int = 8,
        build_timeout: float = 1800.0,
        max_bytes: int = 0,
        limits: ResourceLimits | None = None,
        host_env: Mapping[str, str] | None = None,
        env_keep: Iterable[str] = (),
        log: logging.Logger | logging.LoggerAdapter[Any] | None = None,
    ) -> None:
        """``root``: where environments live (created 0700); ``sandbox``: the host's (None:
        builds run as the host's user, only with ``isolation = "none"``); ``keep``: most
        environments kept; ``max_bytes``: largest environment and largest file in it (0: no
        cap); ``limits``: the build's other rlimits (the kernels'); ``env_keep``:
        host variables the build inherits besides PATH and the locale (a proxy, say)."""
        self.root = Path(root).expanduser()
        self.sandbox = sandbox
        self.pip_args = list(pip_args)
        self.network = network
        self.keep = max(1, keep)
        self.build_timeout = build_timeout
        self.max_bytes = max_bytes
        # A course's files are no workspace's: the largest one is bounded by max_bytes alone.
        self.limits = replace(limits or ResourceLimits(), file_size=max(0, max_bytes))
        self.host_env = dict(os.environ if host_env is None else host_env)
        self.env_keep = set(env_keep)
        self.log = log or logging.getLogger("provider_host")
        #: pip runs started by this cache (a cached environment starts none).
        self.builds = 0
        self._building: dict[str, asyncio.Task[Environment]] = {}

    # -- the public calls -----------------------------------------------------------------

    def cached(self, sha256: str) -> Environment | None:
        """The environment ``sha256`` when it is built (marking it used), else None."""
        env = Environment(_checked_hash(sha256), self.root / sha256)
        marker = env.path / COMPLETE_MARKER
        try:
            info = os.lstat(marker)
        except FileNotFoundError:
            return None
        if not _is_regular(info.st_mode) or info.st_uid != os.geteuid():
            return None
        with contextlib.suppress(OSError):
            os.utime(marker, follow_symlinks=False)  # least recently used goes first
        return env

    async def get(
        self,
        sha256: str,
        requirements: Callable[[], Awaitable[str]],
        progress: Progress | None = None,
    ) -> Environment:
        """The built environment ``sha256``, building it first when needed.

        ``requirements()`` fetches the text (called only for a build; it must raise
        :class:`KernelLaunchError` when it cannot); ``progress`` hears "building" before a
        build this caller waits for, then "ready" or "failed". Concurrent callers share one
        build. Raises :class:`EnvironmentBuildError` (pip's last lines in its message) or
        the fetch's :class:`KernelLaunchError`.
        """
        env = await asyncio.to_thread(self.cached, sha256)
        if env is not None:
            return env
        task = self._building.get(sha256)
        if task is None:
            task = asyncio.create_task(self._build_once(sha256, requirements))
            self._building[sha256] = task
            task.add_done_callback(lambda _t: self._building.pop(sha256, None))
        if progress is not None:
            await progress(
                "building",
                f"building the course environment {sha256[:12]} (pip install -r; up to "
                f"{self.build_timeout:g} s)",
            )
        started = time.monotonic()
        try:
            env = await asyncio.shield(task)
        except KernelLaunchError as exc:
            if progress is not None:
                await progress("failed", str(exc))
            raise
        if progress is not None:
            took = time.monotonic() - started
            await progress("ready", f"course environment {sha256[:12]} ready ({took:.1f} s)")
        return env

    def hold(self, env: Environment) -> int:
        """Keep ``env`` from eviction while a session may run it: a shared lock, returned as
        a descriptor to give to :meth:`release`."""
        fd = os.open(self._lock_path(env.sha256), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # only an eviction holds it exclusively, briefly
        except BaseException:
            os.close(fd)
            raise
        return fd

    async def close(self) -> None:
        """Stop the builds in progress (their processes killed, their directories removed):
        the host is shutting down."""
        tasks = list(self._building.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @staticmethod
    def release(fd: int) -> None:
        """Let go of an environment held with :meth:`hold`."""
        with contextlib.suppress(OSError):
            os.close(fd)

    # -- building ---------------------------------------------------------------------------

    def _lock_path(self, sha256: str) -> Path:
        return self.root / f"{sha256}.lock"

    async def _build_once(
        self, sha256: str, requirements: Callable[[], Awaitable[str]]
    ) -> Environment:
        await asyncio.to_thread(self._make_root)
        fd = os.open(self._lock_path(sha256), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            while True:  # another host process sharing the data dir may be building it
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await asyncio.sleep(_LOCK_POLL)
            env = await asyncio.to_thread(self.cached, sha256)
            if env is not None:
                return env
            text = await requirements()
            check_requirements(text)
            env = await self._build(sha256, text)
        finally:
            os.close(fd)  # releases the lock
        await asyncio.to_thread(self._evict, keep_hash=sha256)
        return env

    def _make_root(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)

    async def _build(self, sha256: str, text: str) -> Environment:
        env = Environment(sha256, self.root / sha256)
        self.builds += 1
        self.log.info("building course environment %s", sha256)
        started = time.monotonic()
        users = self.sandbox.users if self.sandbox is not None else None
        user = users.acquire() if users is not None else None
        try:
            await asyncio.to_thread(self._prepare_dir, env, text, user)
            prefix = self._sandbox_prefix(env, user)
            venv = [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip"]
            await self._run(env, [*prefix, *venv, str(env.path / "venv")], "creating the venv")
            # No tenant code has run yet: the venv is only what the venv module made.
            await asyncio.to_thread(self._link_host_packages, env)
            pip = [str(env.python), "-m", "pip", "install", "--no-cache-dir", "--no-input"]
            pip += ["--disable-pip-version-check", "--progress-bar", "off", *self.pip_args]
            pip += ["-r", str(env.path / "requirements.txt")]
            await self._run(env, [*prefix, *pip], "pip install")
            await asyncio.to_thread(self._finish, env, text, time.monotonic() - started)
        except OSError as exc:
            await asyncio.shield(asyncio.to_thread(remove_tree, env.path))
            raise EnvironmentBuildError(
                f"the provider could not build the course environment: {exc}"
            ) from None
        except BaseException:
            await asyncio.shield(asyncio.to_thread(remove_tree, env.path))
            raise
        finally:
            if user is not None and users is not None:
                users.release(user)
        self.log.info("course environment %s built in %.1f s", sha256, time.monotonic() - started)
        return env

    def _prepare_dir(self, env: Environment, text: str, user: Any) -> None:
        if env.path.exists() or env.path.is_symlink():
            remove_tree(env.path)  # what a killed build left
        env.path.mkdir(mode=0o755)
        (env.path / ".tmp").mkdir(mode=0o700)
        requirements = env.path / "requirements.txt"
        with open(requirements, "x", encoding="utf-8") as f:
            f.write(text)
        os.chmod(requirements, 0o644)
        if user is not None:
            for path in (env.path, env.path / ".tmp"):
                os.chown(path, user.uid, user.gid)

    def _sandbox_prefix(self, env: Environment, user: Any) -> list[str]:
        if self.sandbox is None:
            return []
        shown = [Path(arg) for arg in self.pip_args if os.path.isabs(arg) and os.path.exists(arg)]
        return self.sandbox.argv(
            workspace=env.path,
            runtime_dir=env.path / ".tmp",
            gpus=(),
            user=user,
            read_only=shown,
            network=self.network,
        )

    def _build_env(self, env: Environment) -> dict[str, str]:
        names = {"PATH", "LANG", "LANGUAGE", "TZ"} | self.env_keep
        variables = {k: v for k, v in self.host_env.items() if k in names or k.startswith("LC_")}
        variables.setdefault("PATH", os.defpath)
        variables.update(
            {
                "HOME": str(env.path),
                "TMPDIR": str(env.path / ".tmp"),
                "PIP_NO_INPUT": "1",
                "PYTHONNOUSERSITE": "1",
            }
        )
        return variables

    async def _run(self, env: Environment, argv: list[str], what: str) -> None:
        """Run one build step; raise :class:`EnvironmentBuildError` with its output's tail."""
        base = limits_preexec(self.limits)

        def preexec() -> None:
            base()
            os.umask(0o022)  # kernels of other uids read the environment

        tail: collections.deque[bytes] = collections.deque()
        size = 0
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                cwd=str(env.path),
                env=self._build_env(env),
                preexec_fn=preexec,
                start_new_session=True,
            )
        except OSError as exc:
            raise EnvironmentBuildError(f"could not start {what}: {exc}") from None

        async def read() -> None:
            nonlocal size
            assert process.stdout is not None
            while chunk := await process.stdout.read(65536):
                tail.append(chunk)
                size += len(chunk)
                while size - len(tail[0]) >= _TAIL_BYTES:
                    size -= len(tail.popleft())

        reader = asyncio.ensure_future(read())
        try:
            await asyncio.wait_for(process.wait(), self.build_timeout)
        except asyncio.TimeoutError:
            raise EnvironmentBuildError(
                f"building the course environment took longer than this provider allows "
                f"({self.build_timeout:g} s, environment_build_timeout); it was stopped"
            ) from None
        finally:
            # Whatever of the step still runs (all of it, on a timeout or a cancellation;
            # a straggler it left, after an exit) goes now, which also ends its output.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            if process.returncode is None:
                await asyncio.shield(process.wait())
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(reader, _READ_AFTER_EXIT)
        if process.returncode != 0:
            said = b"".join(tail).decode(errors="replace")[-_TAIL_BYTES:].strip()
            raise EnvironmentBuildError(
                f"building the course environment failed ({what} exited with "
                f"{process.returncode}); its last output:\n{said}"
            )

    def _link_host_packages(self, env: Environment) -> None:
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        target = env.path / "venv" / "lib" / version / "site-packages"
        lines = "".join(f"import site; site.addsitedir({d!r})\n" for d in host_site_dirs())
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with os.fdopen(os.open(target / _HOST_PTH, flags, 0o644), "w") as f:
            f.write(lines)

    def _finish(self, env: Environment, text: str, seconds: float) -> None:
        """Take the files back, check the size, then mark the environment complete."""
        remove_tree(env.path / ".tmp")
        if self.sandbox is not None and self.sandbox.users is not None:
            _chown_tree(env.path, os.geteuid(), os.getegid())
        if self.max_bytes > 0:
            used = disk_usage(env.path)
            if used > self.max_bytes:
                raise EnvironmentBuildError(
                    f"the course environment takes {used:,} bytes, more than this provider "
                    f"allows ({self.max_bytes:,}, environment_max_bytes); ask the instructor "
                    f"for fewer packages"
                )
        marker = env.path / COMPLETE_MARKER
        with contextlib.suppress(FileNotFoundError):
            os.unlink(marker)  # whatever the build put there under that name
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with os.fdopen(os.open(marker, flags, 0o644), "w") as f:
            json.dump({"sha256": env.sha256, "seconds": round(seconds, 3)}, f)

    # -- eviction ---------------------------------------------------------------------------

    def _evict(self, keep_hash: str) -> list[str]:
        """Delete the least recently used environments beyond :attr:`keep` that no session
        holds; return their hashes."""
        built: list[tuple[float, str]] = []
        for entry in self.root.iterdir():
            if not _SHA256_HEX.match(entry.name) or entry.name == keep_hash:
                continue
            try:
                built.append((os.lstat(entry / COMPLETE_MARKER).st_mtime, entry.name))
            except OSError:
                continue
        excess = len(built) + 1 - self.keep
        evicted: list[str] = []
        for _, sha256 in sorted(built):
            if len(evicted) >= excess:
                break
            fd = os.open(self._lock_path(sha256), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue  # a session runs it, or a build of it waits
            try:
                remove_tree(self.root / sha256)
                evicted.append(sha256)
            finally:
                os.close(fd)
        if evicted:
            self.log.info("evicted course environment(s) %s", ", ".join(evicted))
        return evicted


def _checked_hash(sha256: str) -> str:
    if not isinstance(sha256, str) or _SHA256_HEX.match(sha256) is None:
        raise EnvironmentBuildError(f"{sha256!r:.80} is not the sha256 of a course environment")
    return sha256


def _is_regular(mode: int) -> bool:
    return stat.S_ISREG(mode)


def _take_back(path: str, uid: int, gid: int) -> None:
    info = os.lstat(path)
    os.chown(path, uid, gid, follow_symlinks=False)
    if not stat.S_ISLNK(info.st_mode):
        # Nobody else may write it, and nothing in it runs as anyone in particular.
        os.chmod(path, stat.S_IMODE(info.st_mode) & ~0o7022)


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    """Give everything under ``root`` to ``uid``:``gid``, without group/other write and
    set-id bits (links themselves, never what they point at)."""
    _take_back(str(root), uid, gid)
    for directory, dirs, files in os.walk(root, followlinks=False):
        for name in (*dirs, *files):
            with contextlib.suppress(FileNotFoundError):
                _take_back(os.path.join(directory, name), uid, gid)
