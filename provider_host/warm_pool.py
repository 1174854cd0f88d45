"""Warm kernels: a sandboxed kernel started ahead of each free slot's next lease.

With ``ProviderConfig.warm_kernels`` on, the host keeps one :class:`WarmKernel` per free slot
(each real GPU; on a host without real GPUs one slot, ``()``) and course environment: a
fresh session user, workspace, runtime directory and cgroup, and in them the sandboxed
kernel process with ipykernel imported, waiting on its stdin. Nothing about a tenant is
known then: the process holds no key and has run no code but the launcher's.

:meth:`WarmPool.take` hands a slot's warm kernel to a new session (its id, workspace, uid and
cgroup become the session's); the session's first LAUNCH then :meth:`claims
<provider_host.kernel.KernelProcess.claim>` it with the tenant's key and environment, unless
the LAUNCH asks for an environment the interpreter reads at its start
(:func:`start_env_differs`): then it is killed and a cold kernel starts in the same sandbox.
A warm kernel of the wrong environment, or of a GPU a multi-GPU lease takes, is discarded.
:meth:`WarmPool.release` re-arms a slot once its session has ended (the CPU slot right after
a take). :meth:`WarmPool.close` kills them all. The reasons are in docs/architecture.md,
"Warm kernels".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq.asyncio

from jupyter_io.errors import KernelLaunchError

from .cgroups import CgroupTree, SessionCgroup
from .config import ProviderConfig
from .environments import Environment, EnvironmentCache
from .isolation import kernel_env
from .kernel import KernelProcess
from .sandbox import Sandbox
from .userpool import SessionUser
from .workspaces import create_workspace, remove_tree, remove_workspace

__all__ = ["WarmKernel", "WarmPool", "WarmStats", "private_runtime_dir", "start_env_differs"]

# Unix socket paths are limited to ~107 bytes; the longest made is <runtime>/kernel-ipc-N.
_MAX_RUNTIME_DIR = 80
# Read by the interpreter (or libc) once, at the process's start: a warm kernel started
# without the tenant's value would not behave as a cold one with it.
_READ_AT_START_PREFIXES = ("PYTHON", "LC_", "LD_", "MALLOC_")
# Spares of a slot that may exit unused in a row before the slot waits for a lease's end.
_MAX_DEATHS = 3
_READ_AT_START = frozenset({"LANG", "LANGUAGE", "TZ", "PATH", "HOME", "TMPDIR", "PWD"})


def private_runtime_dir() -> Path:
    """A new private (0700) runtime directory whose socket paths fit a unix address."""
    runtime = Path(tempfile.mkdtemp(prefix="jio-"))
    if len(str(runtime)) > _MAX_RUNTIME_DIR:
        runtime.rmdir()
        runtime = Path(tempfile.mkdtemp(prefix="jio-", dir="/tmp"))
    return runtime


def start_env_differs(warm: Mapping[str, str], wanted: Mapping[str, str]) -> list[str]:
    """The names, read at an interpreter's start, whose values differ between the
    environment a warm kernel started with and the one its LAUNCH asks for (sorted)."""
    names = set(warm) | set(wanted)
    return sorted(
        name
        for name in names
        if (name in _READ_AT_START or name.startswith(_READ_AT_START_PREFIXES))
        and warm.get(name) != wanted.get(name)
    )


@dataclass
class WarmStats:
    """What the pool did (for tests and the host's log; never timing)."""

    armed: int = 0
    """Warm kernels started."""
    taken: int = 0
    """Handed to a new session by :meth:`WarmPool.take`."""
    claimed: int = 0
    """Claimed by their session's LAUNCH: the tenant's kernel was a warm one."""
    discarded: int = 0
    """Killed unused: wrong environment, a LAUNCH that needs a cold start, shutdown."""
    failed: int = 0
    """Could not be started (the host logs why)."""


@dataclass
class WarmKernel:
    """One warm kernel and the sandbox it waits in (a session's, once taken)."""

    id: str
    gpus: tuple[int, ...]
    environment: Environment | None
    env: dict[str, str]
    user: SessionUser | None
    cgroup: SessionCgroup | None
    workspace: Path
    workspace_lock: int
    runtime_dir: Path
    kernel: KernelProcess
    environment_hold: int | None = None
    pool: WarmPool | None = field(default=None, repr=False)

    @property
    def sha256(self) -> str | None:
        """The course environment it runs (None: the host's Python)."""
        return None if self.environment is None else self.environment.sha256

    def refusal(self, env: Mapping[str, str], python: str | None) -> str | None:
        """Why this warm kernel cannot be the tenant's kernel launched with ``env`` and
        interpreter ``python`` (None: it can)."""
        mine = None if self.environment is None else str(self.environment.python)
        if python != mine:
            return "another interpreter"
        if not self.kernel.running:
            return "it exited while warm"
        differs = start_env_differs(self.env, env)
        if differs:
            return f"LAUNCH sets {', '.join(differs)}, read at the interpreter's start"
        return None

    async def claim(self, *, key: str, signature_scheme: str, env: dict[str, str]) -> None:
        """Make it the tenant's kernel (see :meth:`KernelProcess.claim`)."""
        await self.kernel.claim(key=key, signature_scheme=signature_scheme, env=env)
        if self.pool is not None:
            self.pool.stats.claimed += 1

    async def discard(self) -> None:
        """Kill the process unused (its sandbox's files stay: they are the session's)."""
        await self.kernel.kill()
        if self.pool is not None:
            self.pool.stats.discarded += 1


class WarmPool:
    """The host's warm kernels, one per free slot (see the module docstring)."""

    def __init__(
        self,
        *,
        config: ProviderConfig,
        context: zmq.asyncio.Context,
        gpu_indices: Sequence[int],
        sandbox: Sandbox | None,
        cgroups: CgroupTree | None,
        environments: EnvironmentCache | None,
        log: logging.Logger,
    ) -> None:
        self.config = config
        self.stats = WarmStats()
        self._context = context
        self._sandbox = sandbox
        self._cgroups = cgroups
        self._environments = environments
        self._log = log
        #: The slots kept warm: each real GPU, or the CPU slot () on a host without any.
        self.slots: tuple[tuple[int, ...], ...] = tuple((i,) for i in gpu_indices) or ((),)
        self._warm: dict[tuple[int, ...], WarmKernel] = {}
        self._arming: dict[tuple[int, ...], asyncio.Task[None]] = {}
        self._in_use: set[int] = set()
        self._unclaimed: set[str] = set()  # ids of kernels made or being made, not yet taken
        self._closing = False
        self._disposing: set[asyncio.Task[Any]] = set()
        self._watchers: set[asyncio.Task[None]] = set()
        self._deaths: dict[tuple[int, ...], int] = {}  # spares in a row that exited unused

    # -- the host's calls -------------------------------------------------------------------

    def start(self) -> None:
        """Arm every slot (in the background)."""
        for slot in self.slots:
            self._arm(slot, None)

    def warm(self, slot: tuple[int, ...]) -> WarmKernel | None:
        """The warm kernel waiting on ``slot``, if any."""
        return self._warm.get(slot)

    def spare_workspaces(self) -> set[Path]:
        """The workspaces of warm kernels no session has taken (being started included):
        every other workspace under ``workspace_root`` is a session's."""
        root = _workspace_root(self.config)
        return {root / ident for ident in self._unclaimed}

    def take(self, gpus: tuple[int, ...], environment: str | None) -> WarmKernel | None:
        """The warm kernel for a new session on ``gpus`` whose lease names course environment
        ``environment`` (None: the host's Python), or None: start cold. A warm kernel of
        another environment on those GPUs is discarded; each GPU is armed again by
        :meth:`release`, the CPU slot at once."""
        if self._closing:
            return None
        self._in_use.update(gpus)
        taken: WarmKernel | None = None
        for slot in self._slots_of(gpus):
            warm = self._warm.pop(slot, None)
            if warm is None:
                continue
            if slot == gpus and warm.sha256 == environment and warm.kernel.running:
                taken = warm
            else:
                self._spawn(self._dispose(warm))
        if taken is not None:
            self._deaths.pop(gpus, None)
            self._unclaimed.discard(taken.id)
            self.stats.taken += 1
        if gpus == ():
            self._arm((), self._cached(environment))
        return taken

    def release(self, gpus: tuple[int, ...], environment: str | None) -> None:
        """A session on ``gpus`` (of course environment ``environment``) ended: arm its slots
        again, for the same environment when it is built (the next lease is likely the same
        course's)."""
        self._in_use.difference_update(gpus)
        for slot in self._slots_of(gpus):
            if slot not in self._warm:
                self._arm(slot, self._cached(environment) if slot == gpus else None)

    async def close(self) -> None:
        """Stop arming and kill every warm kernel no session took, its sandbox's files
        removed. Call it before ending the sessions (their ends would arm slots again)."""
        self._closing = True
        # Not cancelled: a start cut short could leave its process unknown to anyone; each
        # arming disposes of its kernel itself once it sees the pool closing.
        await asyncio.gather(*self._arming.values(), return_exceptions=True)
        for watcher in list(self._watchers):  # taken kernels' too: their sessions watch them
            watcher.cancel()
        warm, self._warm = list(self._warm.values()), {}
        await asyncio.gather(
            *(self._dispose(w) for w in warm), *self._disposing, return_exceptions=True
        )

    # -- arming ------------------------------------------------------------------------------

    def _slots_of(self, gpus: tuple[int, ...]) -> list[tuple[int, ...]]:
        if gpus == ():
            return [()] if () in self.slots else []
        return [(i,) for i in gpus if (i,) in self.slots]

    def _cached(self, environment: str | None) -> str | None:
        """``environment`` when it is built here (a warm kernel never waits for a build)."""
        if environment is None or self._environments is None:
            return None
        with contextlib.suppress(Exception):
            if self._environments.cached(environment) is not None:
                return environment
        return None

    def _arm(self, slot: tuple[int, ...], environment: str | None) -> None:
        if self._closing or slot in self._arming or any(i in self._in_use for i in slot):
            return
        task = asyncio.ensure_future(self._arm_slot(slot, environment))
        self._arming[slot] = task
        task.add_done_callback(lambda _t: self._arming.pop(slot, None))

    async def _arm_slot(self, slot: tuple[int, ...], environment: str | None) -> None:
        try:
            warm = await self._start(slot, environment)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.stats.failed += 1
            self._log.warning("could not start a warm kernel for slot %s: %s", list(slot), exc)
            return
        if self._closing or slot in self._warm or any(i in self._in_use for i in slot):
            await self._dispose(warm)  # taken or closed while it started
            return
        self._warm[slot] = warm
        self._log.info("warm kernel armed for slot %s, pid %d", list(slot), warm.kernel.pid)
        watcher = asyncio.ensure_future(self._watch(slot, warm))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)

    async def _watch(self, slot: tuple[int, ...], warm: WarmKernel) -> None:
        """Replace a spare that exits while it waits (killed, out of memory)."""
        code = await warm.kernel.wait()
        if self._warm.get(slot) is not warm:
            return  # taken (its session watches it now) or discarded
        del self._warm[slot]
        await self._dispose(warm)
        deaths = self._deaths[slot] = self._deaths.get(slot, 0) + 1
        if deaths > _MAX_DEATHS:  # a crash loop (a broken interpreter): the next lease's end
            self._log.warning("the warm kernels for slot %s keep exiting; not arming", slot)
            return
        self._log.warning("the warm kernel for slot %s exited (%d); arming another", slot, code)
        self._arm(slot, warm.sha256)

    async def _start(self, slot: tuple[int, ...], sha256: str | None) -> WarmKernel:
        """Make a fresh sandbox (uid, workspace, runtime directory, cgroup) and start the
        kernel in it, exactly as a session's first kernel but waiting for its claim."""
        ident = secrets.token_urlsafe(16)
        self._unclaimed.add(ident)
        users = self._sandbox.users if self._sandbox is not None else None
        user = users.acquire() if users is not None else None
        owner = None if user is None else (user.uid, user.gid)
        cgroup: SessionCgroup | None = None
        lock: int | None = None
        runtime: Path | None = None
        hold: int | None = None
        workspace = _workspace_root(self.config) / ident
        try:
            environment: Environment | None = None
            if sha256 is not None and self._environments is not None:
                environment = await asyncio.to_thread(self._environments.cached, sha256)
                if environment is None:
                    raise KernelLaunchError(f"course environment {sha256[:12]} is not built")
                hold = await asyncio.to_thread(self._environments.hold, environment)
            if self._cgroups is not None:
                cgroup = self._cgroups.create(ident)
            lock = create_workspace(workspace, owner)
            runtime = private_runtime_dir()
            if owner is not None:
                os.chown(runtime, *owner)
            env, _ = kernel_env(
                host_env=os.environ,
                client_env={},
                gpus=slot,
                workspace=str(workspace),
                keep=self.config.env_keep,
                user=None if user is None else user.name,
            )
            prefix = None
            if self._sandbox is not None:
                prefix = self._sandbox.argv(
                    workspace=workspace,
                    runtime_dir=runtime,
                    gpus=slot,
                    user=user,
                    read_only=() if environment is None else (environment.path,),
                )
            kernel = KernelProcess(
                generation=1,
                runtime_dir=runtime,
                context=self._context,
                log=self._log,
                sandbox=prefix,
                owner=owner,
                cgroup=cgroup,
                python=None if environment is None else str(environment.python),
                warm=True,
            )
            # A throwaway key in the connection file nobody reads: claim() writes the real one.
            await kernel.start(
                key=secrets.token_hex(32),
                signature_scheme="hmac-sha256",
                env=env,
                cwd=str(workspace),
                limits=self.config.resource_limits(),
            )
        except BaseException:
            _remove(workspace, lock, runtime, cgroup, user, self._sandbox, hold)
            self._unclaimed.discard(ident)
            raise
        self.stats.armed += 1
        return WarmKernel(
            id=ident,
            gpus=slot,
            environment=environment,
            env=env,
            user=user,
            cgroup=cgroup,
            workspace=workspace,
            workspace_lock=lock,
            runtime_dir=runtime,
            kernel=kernel,
            environment_hold=hold,
            pool=self,
        )

    async def _dispose(self, warm: WarmKernel) -> None:
        """Kill an untaken warm kernel and remove its sandbox's files."""
        with contextlib.suppress(Exception):
            await warm.discard()
        _remove(
            warm.workspace,
            warm.workspace_lock,
            warm.runtime_dir,
            warm.cgroup,
            warm.user,
            self._sandbox,
            warm.environment_hold,
        )
        self._unclaimed.discard(warm.id)

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._disposing.add(task)
        task.add_done_callback(self._disposing.discard)


def _workspace_root(config: ProviderConfig) -> Path:
    return Path(config.workspace_root).expanduser().resolve()


def _remove(
    workspace: Path,
    lock: int | None,
    runtime: Path | None,
    cgroup: SessionCgroup | None,
    user: SessionUser | None,
    sandbox: Sandbox | None,
    hold: int | None,
) -> None:
    """Undo :meth:`WarmPool._start` (its process is dead: the uid goes back last)."""
    if lock is not None:
        remove_workspace(workspace, lock)
    if runtime is not None:
        remove_tree(runtime)
    if cgroup is not None:
        cgroup.remove()
    if user is not None and sandbox is not None and sandbox.users is not None:
        sandbox.users.release(user)
    if hold is not None:
        EnvironmentCache.release(hold)
