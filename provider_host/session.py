"""One kernel session: its workspace, its kernel, and the provider end of its tunnel.

A :class:`KernelSession` is created by the server after a successful HELLO for a new session
and lives until END, grace expiry or host shutdown, across any number of websocket
connections. It owns:

- a working directory under ``workspace_root`` (the kernel's cwd and HOME, locked while the
  session lives: :mod:`provider_host.workspaces`), and a short private runtime directory
  (``/tmp/jio-*``, mode 0700) for the connection file and IPC sockets (unix socket paths must
  stay under ~100 characters); with a sandbox (:mod:`provider_host.sandbox`) both belong to
  the session's own uid (a root host) and are the only host paths its kernel sees. The host
  connects to the kernel's sockets through hard links in a directory of its own
  (``/tmp/jio-*``, the host's only), made once each socket exists and is the kernel's: a
  link the kernel plants in its runtime directory leads the host nowhere;
- ZMQ sockets connected to the kernel's IPC endpoints: DEALER for shell, control and stdin
  (shell and stdin share one identity so input_request finds its way back), DEALER to the
  heartbeat, SUB to iopub; they stay across kernel restarts, but each restart drops the
  requests still queued for the old kernel;
- a :class:`~jupyter_io.protocol.Tunnel` and a :class:`~jupyter_io.bridge.Bridge` that keep
  output while no websocket is attached and replay it on resume;
- the current :class:`~provider_host.kernel.KernelProcess`, watched so that EXITED goes out
  whenever it ends.

A session whose lease names a course environment (the token's ``env``) has it built or
found (:mod:`provider_host.environments`) before its first kernel starts, in the background
(the tunnel goes on meanwhile), telling the client with PROGRESS frames; its kernels then run
that environment's interpreter, which their sandbox shows read-only.

Call :meth:`KernelSession.open`, then :meth:`KernelSession.serve` with each handshaken
websocket (accepted by the host's endpoint or dialled to the coordinator's relay: both are
``websockets`` connections), and :meth:`KernelSession.end` to finish it. ``on_started`` hears
of every kernel start (metering starts at the first), ``on_end`` of the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import stat
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
from solders.pubkey import Pubkey
from websockets.asyncio.connection import Connection
from websockets.exceptions import ConnectionClosed

from jupyter_io.bridge import Bridge
from jupyter_io.errors import JupyterIOError, KernelLaunchError, ProtocolError
from jupyter_io.file_endpoint import FileEndpoint
from jupyter_io.protocol import (
    Channel,
    CloseCode,
    Frame,
    FrameKind,
    Progress,
    Tunnel,
    encode_control,
)

from .activity import SessionActivity
from .cgroups import CgroupTree, SessionCgroup
from .config import ProviderConfig
from .environments import Environment, EnvironmentCache
from .files import session_files
from .isolation import kernel_env
from .kernel import KERNEL_PORTS, KernelProcess, kernel_endpoints
from .sandbox import Sandbox
from .userpool import SessionUser
from .warm_pool import WarmKernel
from .workspaces import create_workspace, disk_usage, remove_tree, remove_workspace

__all__ = ["ENVIRONMENT_FETCH_TIMEOUT", "KernelSession"]

#: Bytes a kernel started in a workspace over its limit may still write at start-up (IPython
#: creates its history database in HOME) before the workspace watch counts it as growing.
STARTUP_SLACK = 256 * 1024

# ZMQ's default high-water mark (1000 messages) is far too low here: the kernel's PUB drops
# iopub messages once its queue to us is full, which a burst of prints does while the host is
# busy replaying, and the tunnel promises no output is lost. Unlimited would let a kernel
# printing faster than the network carries it grow the host's memory without bound.
_HWM = 100_000

# Unix socket paths are limited to ~107 bytes; the longest we make is <runtime>/kernel-ipc-N.
_MAX_RUNTIME_DIR = 80

#: Seconds the host waits for the coordinator to send a course environment's requirements.
ENVIRONMENT_FETCH_TIMEOUT = 60.0


class KernelSession:
    """One client's kernel session on this host (see the module docstring)."""

    def __init__(
        self,
        *,
        owner: Pubkey,
        config: ProviderConfig,
        context: zmq.asyncio.Context,
        gpus: tuple[int, ...],
        on_end: Callable[[KernelSession], None],
        log: logging.Logger | None = None,
        lease_id: str | None = None,
        on_started: Callable[[KernelSession], None] | None = None,
        sandbox: Sandbox | None = None,
        cgroups: CgroupTree | None = None,
        environment: str | None = None,
        environments: EnvironmentCache | None = None,
        fetch_requirements: Callable[[str], Awaitable[str]] | None = None,
        warm: WarmKernel | None = None,
    ) -> None:
        """``sandbox``: run each kernel in it (None: as the host's own user); ``cgroups``:
        give the session a memory cgroup there, which its kernels join (None: no limit).
        ``environment``: the sha256 of the course environment its kernels run in (the lease
        token's ``env``), built from ``environments`` with the text ``fetch_requirements``
        gets (the coordinator's) before the first kernel starts; None: the host's Python.
        ``warm``: a warm kernel (:meth:`provider_host.warm_pool.WarmPool.take`) whose id,
        sandbox and process become the session's, claimed by the first LAUNCH."""
        self.id = secrets.token_urlsafe(16) if warm is None else warm.id
        self._warm = warm
        #: True once the first LAUNCH claimed the warm kernel (it was not started cold).
        self.warm_claimed = False
        self.owner = owner
        self.gpus = gpus
        #: The coordinator's lease this session serves (None without a coordinator).
        self.lease_id = lease_id
        self.config = config
        self.workspace = Path(config.workspace_root).expanduser().resolve() / self.id
        self.runtime_dir: Path | None = None
        self._socket_dir: Path | None = None
        self.sandbox = sandbox
        #: The uid the session's kernels run as (a sandbox on a root host), after open().
        self.user: SessionUser | None = None
        self._workspace_lock: int | None = None
        self._cgroups = cgroups
        #: The session's memory cgroup (after open(); None without cgroups).
        self.cgroup: SessionCgroup | None = None
        self.log = logging.LoggerAdapter(log or logging.getLogger(__name__), {"session": self.id})
        #: Kernel generation: 0 before the first LAUNCH, +1 per (re)start.
        self.generation = 0
        self.state = "none"
        self.exit_code: int | None = None
        self.kernel: KernelProcess | None = None
        #: Set once the session has ended and its resources are gone.
        self.ended = asyncio.Event()
        self.tunnel = Tunnel(
            max_frame_size=config.max_frame_size, max_unacked_bytes=config.max_unacked_bytes
        )
        self._context = context
        self._on_end = on_end
        self._on_started = on_started
        self._sockets: dict[Channel, zmq.asyncio.Socket] = {}
        self._endpoints: dict[Channel, str] = {}
        self._bridge: Bridge | None = None
        self._ws: Connection | None = None
        self._ending = False
        self._grace: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._kernel_lock = asyncio.Lock()
        self._background: set[asyncio.Task[Any]] = set()
        #: The course environment's hash (None: the host's own Python).
        self.environment = environment
        self._environments = environments
        self._fetch_requirements = fetch_requirements
        #: The built course environment, once ready (held from eviction until the end).
        self._environment: Environment | None = None
        self._environment_hold: int | None = None
        self._preparing: asyncio.Task[None] | None = None
        #: The file channel: the notebook's directory mirrored into the workspace (open()).
        self.files: FileEndpoint | None = None
        #: When the kernel last executed anything (a class's idle timeout: provider_host.activity).
        self.activity = SessionActivity()

    # -- lifecycle -------------------------------------------------------------------------

    def open(self) -> None:
        """Create the workspace, runtime directory and kernel sockets; start pumping.

        On failure nothing is left behind and the error propagates.
        """
        try:
            self._open()
        except BaseException:
            if self._warm is not None:
                self._warm.kernel.kill_group()  # its sandbox's files are removed below
            for sock in self._sockets.values():
                sock.close(linger=0)
            self._remove_files()
            raise

    def _open(self) -> None:
        warm = self._warm
        if warm is not None:  # its sandbox, fresh and never a tenant's, is this session's
            self.user, self.cgroup, self.runtime_dir = warm.user, warm.cgroup, warm.runtime_dir
            self._workspace_lock = warm.workspace_lock
            if warm.environment is not None and warm.sha256 == self.environment:
                self._environment, self._environment_hold = warm.environment, warm.environment_hold
                warm.environment_hold = None
            owner = None if self.user is None else (self.user.uid, self.user.gid)
            runtime = warm.runtime_dir
        else:
            users = self.sandbox.users if self.sandbox is not None else None
            if users is not None:
                self.user = users.acquire()
            owner = None if self.user is None else (self.user.uid, self.user.gid)
            if self._cgroups is not None:
                self.cgroup = self._cgroups.create(self.id)
            self._workspace_lock = create_workspace(self.workspace, owner)
            runtime = Path(tempfile.mkdtemp(prefix="jio-"))
            if len(str(runtime)) > _MAX_RUNTIME_DIR:
                runtime.rmdir()
                runtime = Path(tempfile.mkdtemp(prefix="jio-", dir="/tmp"))
            self.runtime_dir = runtime
            if owner is not None:
                os.chown(runtime, *owner)  # mkdtemp made it 0700: the host (root) and the kernel
        # Same filesystem (hard links) and same path length as the runtime directory.
        self._socket_dir = Path(tempfile.mkdtemp(prefix="jio-", dir=runtime.parent))
        endpoints = self._endpoints = kernel_endpoints(self._socket_dir)
        identity = f"jio-{self.id}".encode()
        for channel in Channel:
            kind = zmq.SUB if channel is Channel.IOPUB else zmq.DEALER
            sock = self._context.socket(kind)
            sock.linger = 0
            sock.rcvhwm = sock.sndhwm = _HWM
            # Kernels (re)start often; find them fast rather than at the default 100 ms.
            sock.reconnect_ivl = 20
            if channel in (Channel.SHELL, Channel.STDIN):
                sock.identity = identity
            if channel is Channel.IOPUB:
                sock.subscribe(b"")
            sock.connect(endpoints[channel])
            self._sockets[channel] = sock
        inbound: dict[Channel, zmq.asyncio.Socket] = {
            ch: s for ch, s in self._sockets.items() if ch is not Channel.IOPUB
        }
        self._bridge = Bridge(
            self.tunnel,
            outbound=self._sockets,
            inbound=inbound,
            on_control=self._on_control,
            on_failure=self._bridge_failed,
            log=self.log,
        )
        self.files = session_files(
            bridge=self._bridge,
            workspace=self.workspace,
            store_root=self.config.file_store_path(self.owner),
            store_max_bytes=self.config.file_store_max_bytes,
            max_workspace_bytes=self.config.max_workspace_bytes,
            owner=owner,
            log=self.log,
            window=self.config.file_window,
        )
        self.activity.watch(self._bridge)
        self._bridge.start()

    @property
    def bridge(self) -> Bridge:
        """The session's bridge (after :meth:`open`)."""
        assert self._bridge is not None, "open() first"
        return self._bridge

    def kernel_info(self) -> dict[str, Any]:
        """The WELCOME ``kernel`` field."""
        return {"state": self.state, "generation": self.generation, "exit_code": self.exit_code}

    @property
    def attached(self) -> bool:
        """True while a websocket is connected to this session."""
        return self._ws is not None

    async def serve(self, ws: Connection, peer_received: int, *, resumed: bool) -> None:
        """Send WELCOME on ``ws``, replay, and pump until it closes; then start the grace timer.

        A newer connection to the same session replaces an older one (closed with 1000).
        """
        old = self._ws
        if old is not None:
            self.bridge.detach(old)
            self._spawn(old.close(CloseCode.NORMAL, "replaced by a newer connection"))
        if self._ending:
            reason = "this session is ending; its kernel is gone"
            await ws.send(
                encode_control(FrameKind.ERROR, {"code": "unknown_session", "reason": reason})
            )
            await ws.close(CloseCode.UNKNOWN_SESSION, reason)
            return
        self._cancel_grace()
        self._ws = ws
        try:
            await ws.send(
                encode_control(
                    FrameKind.WELCOME,
                    {
                        "session": self.id,
                        "received": self.tunnel.received,
                        "resumed": resumed,
                        "kernel": self.kernel_info(),
                        "features": ["files"],
                    },
                )
            )
            await self.bridge.attach(ws, peer_received)
            await self.bridge.serve(ws)
        except ConnectionClosed:
            pass
        finally:
            self.bridge.detach(ws)
            if self._ws is ws:
                self._ws = None
                if not self._ending:
                    self.log.info("connection lost; keeping the kernel %.0f s", self._grace_s)
                    self._grace = asyncio.create_task(self._grace_expiry())

    async def end(self, code: int = CloseCode.SESSION_ENDED, reason: str = "session ended") -> None:
        """Kill the kernel, close the websocket with ``code``, delete the workspace. Idempotent."""
        if self._ending:
            await self.ended.wait()
            return
        self._ending = True
        self._cancel_grace()
        preparing = self._preparing
        if preparing is not None and not preparing.done():
            preparing.cancel()  # a build others wait for goes on; this session stops waiting
        try:
            async with self._kernel_lock:
                warm, self._warm = self._warm, None
                if warm is not None:  # never claimed
                    await warm.discard()
                await self._stop_kernel()
            if self.files is not None:
                await self.files.close()
            if self._bridge is not None:
                await self._bridge.stop()
            ws = self._ws
            self._ws = None
            if ws is not None:
                self.bridge.detach(ws)
                with contextlib.suppress(Exception):
                    await ws.close(code, reason)
            for sock in self._sockets.values():
                sock.close(linger=0)
            self._remove_files()
            self.log.info("session ended: %s", reason)
        finally:
            self.ended.set()
            self._on_end(self)

    def _remove_files(self) -> None:
        """Delete the workspace, runtime directory and cgroup, then give the session's uid
        back (every process that ran as it is gone by now: its sandbox died with its kernel,
        and the cgroup's removal kills anything left in it)."""
        if self._workspace_lock is not None:
            remove_workspace(self.workspace, self._workspace_lock)
            self._workspace_lock = None
        for directory in (self.runtime_dir, self._socket_dir):
            if directory is not None:
                remove_tree(directory)
        if self.cgroup is not None:
            if not self.cgroup.remove():
                self.log.warning("could not remove the session's cgroup %s", self.cgroup.path)
            self.cgroup = None
        if self.user is not None and self.sandbox is not None and self.sandbox.users is not None:
            self.sandbox.users.release(self.user)
        if self._environment_hold is not None:
            EnvironmentCache.release(self._environment_hold)
            self._environment_hold = None

    # -- control frames from the client ----------------------------------------------------

    async def _on_control(self, frame: Frame) -> None:
        kind = frame.kind
        if kind is FrameKind.LAUNCH:
            if self.environment is not None and self._environment is None:
                # A build may take minutes: the tunnel goes on reading (END, acks) meanwhile.
                self._preparing = task = asyncio.ensure_future(self._launch_prepared(frame.body))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
            else:
                await self._launch(frame.body)
        elif kind is FrameKind.FILES or kind is FrameKind.FILE_CHUNK:
            if self.files is not None:
                await self.files.handle(frame)
        elif kind is FrameKind.SIGNAL:
            self._signal(frame.body)
        elif kind is FrameKind.END:
            await self.end()
        else:
            raise ProtocolError(f"{kind.name} frames do not travel from client to host")

    async def _launch_prepared(self, body: dict[str, Any]) -> None:
        """LAUNCH once the session's course environment is ready (built, or found built)."""
        try:
            await self._prepare_environment()
        except KernelLaunchError as exc:
            refusal: str | None = str(exc)
        except Exception as exc:  # the client must hear of it, not wait out its timeout
            self.log.exception("preparing course environment %s failed", self.environment)
            refusal = f"the provider could not prepare the course environment: {exc}"
        else:
            refusal = None
        if self._preparing is asyncio.current_task():
            self._preparing = None  # end() may cancel the wait, never a kernel's start
        await self._launch(body, refusal=refusal)

    async def _prepare_environment(self) -> None:
        cache, sha256, fetch = self._environments, self.environment, self._fetch_requirements
        if self._environment is not None or sha256 is None:
            return
        if cache is None or fetch is None:
            raise KernelLaunchError(
                f"this lease asks for course environment {sha256[:12]}, and this host builds "
                f"course environments only when joined to a coordinator"
            )

        async def requirements() -> str:
            return await fetch(sha256)

        async def progress(state: str, message: str) -> None:
            timeout = self.config.environment_build_timeout + ENVIRONMENT_FETCH_TIMEOUT
            step = Progress("environment", state, message, timeout if state == "building" else None)
            await self._send(FrameKind.PROGRESS, step.to_body())

        for _ in range(2):  # once more if another host process evicted it in between
            env = await cache.get(sha256, requirements, progress)
            hold = await asyncio.to_thread(cache.hold, env)
            if await asyncio.to_thread(cache.cached, sha256) is not None:
                self._environment, self._environment_hold = env, hold
                return
            EnvironmentCache.release(hold)
        raise KernelLaunchError(f"course environment {sha256[:12]} was deleted as it was built")

    async def _launch(self, body: dict[str, Any], refusal: str | None = None) -> None:
        async with self._kernel_lock:
            if self._ending:
                return
            await self._stop_kernel()
            self._forget_sockets()
            if self.generation:
                self._drop_queued_requests()
            self.generation += 1
            generation = self.generation
            try:
                if refusal is not None:
                    raise KernelLaunchError(refusal)
                kernel, refused = await self._start_kernel(generation, body)
            except KernelLaunchError as exc:
                self.state, self.exit_code = "exited", None
                self.log.warning("kernel generation %d failed to start: %s", generation, exc)
                await self._send(
                    FrameKind.EXITED,
                    {"generation": generation, "exit_code": None, "error": str(exc)},
                )
                return
            self.kernel = kernel
            self._spawn(self._link_sockets(kernel))
            self.state, self.exit_code = "running", None
            self.activity.kernel_changed()
            # STARTED is sequenced before the watcher can ever queue this kernel's EXITED.
            started: dict[str, Any] = {"generation": generation, "pid": kernel.pid}
            if refused:
                started["ignored_env"] = refused  # so the client can tell its user
            await self._send(FrameKind.STARTED, started)
            self._watcher = asyncio.create_task(self._watch(kernel))
            if self.config.max_workspace_bytes > 0:
                self._spawn(self._watch_workspace(kernel))
            if self._on_started is not None:
                self._on_started(self)

    async def _start_kernel(
        self, generation: int, body: dict[str, Any]
    ) -> tuple[KernelProcess, list[str]]:
        key = body.get("key")
        scheme = body.get("signature_scheme", "hmac-sha256")
        requested = body.get("env") or {}
        if not isinstance(key, str) or not isinstance(scheme, str):
            raise KernelLaunchError("LAUNCH needs a string 'key' and 'signature_scheme'")
        if not isinstance(requested, dict):
            raise KernelLaunchError("LAUNCH 'env' must be an object of strings")
        env, refused = kernel_env(
            host_env=os.environ,
            client_env=requested,
            gpus=self.gpus,
            workspace=str(self.workspace),
            keep=self.config.env_keep,
            user=None if self.user is None else self.user.name,
        )
        if refused:
            self.log.warning("ignored environment variables the client may not set: %s", refused)
        if body.get("journal") is False:  # the kernelspec's opt-out of the state journal
            env["JUPYTER_IO_JOURNAL"] = "off"
        elif self.config.max_workspace_bytes > 0:  # the journal lives in the workspace
            env["JUPYTER_IO_JOURNAL_MAX_BYTES"] = str(self.config.max_workspace_bytes // 2)
        assert self.runtime_dir is not None, "open() first"
        user = self.user
        warm, self._warm = self._warm, None
        if warm is not None:
            python = None if self._environment is None else str(self._environment.python)
            refusal = warm.refusal(env, python)
            if refusal is None:
                try:
                    await warm.claim(key=key, signature_scheme=scheme, env=env)
                except KernelLaunchError as exc:
                    refusal = str(exc)
                else:
                    self.warm_claimed = True
                    warm.kernel.generation = generation
                    self.log.info("kernel generation %d: warm, pid %d", generation, warm.kernel.pid)
                    return warm.kernel, refused
            self.log.info("warm kernel not used (%s): starting a cold one", refusal)
            await warm.discard()
        sandbox = None
        environment = self._environment
        if self.sandbox is not None:
            sandbox = self.sandbox.argv(
                workspace=self.workspace,
                runtime_dir=self.runtime_dir,
                gpus=self.gpus,
                user=user,
                read_only=() if environment is None else (environment.path,),
            )
        kernel = KernelProcess(
            generation=generation,
            runtime_dir=self.runtime_dir,
            context=self._context,
            log=self.log,
            sandbox=sandbox,
            owner=None if user is None else (user.uid, user.gid),
            cgroup=self.cgroup,
            python=None if environment is None else str(environment.python),
        )
        await kernel.start(
            key=key,
            signature_scheme=scheme,
            env=env,
            cwd=str(self.workspace),
            limits=self.config.resource_limits(),
        )
        self.log.info("kernel generation %d started, pid %d", generation, kernel.pid)
        return kernel, refused

    def _signal(self, body: dict[str, Any]) -> None:
        signum = body.get("signum")
        if not isinstance(signum, int) or isinstance(signum, bool):
            raise ProtocolError("SIGNAL needs an integer 'signum'")
        try:
            valid = signum in {int(s) for s in signal.valid_signals()}
        except ValueError:
            valid = False
        if not valid:
            self.log.warning("ignoring SIGNAL with invalid signal number %d", signum)
            return
        if self.kernel is None or self.state != "running":
            self.log.info("ignoring signal %d: no kernel is running", signum)
            return
        self.kernel.signal(signum)

    # -- the kernel process ----------------------------------------------------------------

    async def _watch(self, kernel: KernelProcess) -> None:
        code = await kernel.wait()
        kernel.kill_group()  # whatever it spawned dies with it
        if self.kernel is kernel:
            self.state, self.exit_code = "exited", code
            self.activity.kernel_changed()
        if not kernel.killed and code == 0:
            # A clean exit (a shutdown_request, exit()): its output is no diagnosis, and
            # ipykernel shut down in a busy cell prints a ZMQError traceback of its own.
            self.log.info("kernel generation %d exited with 0", kernel.generation)
        elif not kernel.killed:
            self.log.warning(
                "kernel generation %d exited with %d; its last output:\n%s",
                kernel.generation,
                code,
                kernel.log_tail(),
            )
        exited: dict[str, Any] = {"generation": kernel.generation, "exit_code": code}
        if kernel.kill_reason is not None:
            exited["reason"] = kernel.kill_reason
        await self._send(FrameKind.EXITED, exited)

    async def _watch_workspace(self, kernel: KernelProcess) -> None:
        """Kill ``kernel`` once the workspace is over ``max_workspace_bytes`` and has grown
        since the last measurement (a kernel started over the limit may still delete). The
        first measurement allows :data:`STARTUP_SLACK` on top of the size at launch: the
        kernel's own start writes to HOME (IPython's history), and a kernel relaunched in a
        full workspace must live long enough to delete files."""
        limit = self.config.max_workspace_bytes
        last = await asyncio.to_thread(disk_usage, self.workspace) + STARTUP_SLACK
        while True:
            await asyncio.sleep(self.config.workspace_check_interval)
            if self.kernel is not kernel or kernel.exit_code is not None or self._ending:
                return
            used = await asyncio.to_thread(disk_usage, self.workspace)
            if used > limit and used > last:
                break
            last = used
        reason = (
            f"the workspace holds {used:,} bytes, over this host's limit of {limit:,}; the "
            f"kernel was stopped: LAUNCH again and delete files to continue"
        )
        async with self._kernel_lock:
            if self.kernel is kernel and kernel.exit_code is None and not self._ending:
                self.log.warning("kernel generation %d killed: %s", kernel.generation, reason)
                kernel.kill_reason = reason
                await kernel.kill()

    def _forget_sockets(self) -> None:
        """Remove the previous kernel's socket files and the host's links to them, so that
        only sockets the next kernel binds are linked (the kernel is dead: no race)."""
        assert self.runtime_dir is not None and self._socket_dir is not None
        for directory in (self.runtime_dir, self._socket_dir):
            for name in _socket_names():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(directory / name)

    async def _link_sockets(self, kernel: KernelProcess) -> None:
        """Link each socket ``kernel`` binds into the host's socket directory, as it appears.

        ZMQ (re)connects by path and follows links; the runtime directory is the kernel's
        to write, so the host never connects there: :func:`os.link` without following
        links takes whatever inode bears the name, and only a socket owned by the kernel's
        uid is put where the host connects.
        """
        assert self.runtime_dir is not None and self._socket_dir is not None
        uid = self.user.uid if self.user is not None else os.geteuid()
        pending = set(_socket_names())
        refused: set[str] = set()
        delay = 0.002
        while pending:
            if self.kernel is not kernel or kernel.exit_code is not None or self._ending:
                return
            for name in sorted(pending):
                outcome = _link_socket(self.runtime_dir / name, self._socket_dir / name, uid)
                if outcome:
                    pending.discard(name)
                elif outcome is None and name not in refused:
                    refused.add(name)
                    self.log.warning("%s in the runtime directory is not the kernel's socket", name)
            if pending:
                await asyncio.sleep(delay)  # no event tells when a kernel has bound
                delay = min(delay * 2, 0.02)

    def _drop_queued_requests(self) -> None:
        """Forget requests still queued for the previous kernel.

        The DEALERs stay connected across restarts, and ZMQ keeps what it could not deliver
        (a kernel killed before it bound its sockets read nothing) for the next peer on the
        endpoint: the new kernel would get the old one's shutdown_request and exit.
        Reconnecting with linger 0 discards those pipes; every frame received after LAUNCH
        goes to fresh ones, so nothing meant for the new kernel is lost.
        """
        for channel, sock in self._sockets.items():
            if channel is Channel.IOPUB:
                continue
            endpoint = self._endpoints[channel]
            with contextlib.suppress(zmq.ZMQError):
                sock.disconnect(endpoint)
            sock.connect(endpoint)

    async def _stop_kernel(self) -> None:
        """Kill the current kernel (if any) and wait until its EXITED is queued."""
        kernel, watcher = self.kernel, self._watcher
        if kernel is None:
            return
        await kernel.kill()
        if watcher is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        self._watcher = None
        self.kernel = None

    # -- helpers ---------------------------------------------------------------------------

    async def _send(self, kind: FrameKind, body: dict[str, Any]) -> None:
        try:
            await self.bridge.send_control(kind, body)
        except JupyterIOError as exc:
            self._bridge_failed(exc)

    def _bridge_failed(self, exc: JupyterIOError) -> None:
        if not self._ending:
            self._spawn(self.end(CloseCode.BUFFER_OVERFLOW, str(exc)[:120]))

    @property
    def _grace_s(self) -> float:
        return self.config.grace_period

    async def _grace_expiry(self) -> None:
        await asyncio.sleep(self._grace_s)
        self._grace = None  # end() must not cancel the task running it
        await self.end(CloseCode.GOING_AWAY, "grace period expired")

    def _cancel_grace(self) -> None:
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _socket_names() -> list[str]:
    """The kernel's socket file names (see :func:`provider_host.kernel.kernel_endpoints`)."""
    return [f"kernel-ipc-{port}" for port in KERNEL_PORTS.values()]


def _link_socket(source: Path, target: Path, uid: int) -> bool | None:
    """Hard-link ``source`` to ``target`` if it is a socket owned by ``uid``: True when done,
    False while it does not exist yet, None when something else bears its name."""
    staging = target.with_name(target.name + ".new")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(staging)
    try:
        os.link(source, staging, follow_symlinks=False)
    except FileNotFoundError:
        return False
    except OSError:
        return None  # e.g. a directory by that name
    info = os.lstat(staging)
    if not stat.S_ISSOCK(info.st_mode) or info.st_uid != uid:
        os.unlink(staging)
        return None
    os.replace(staging, target)
    return True
