"""One kernel process: launched through jupyter_client, signalled, watched and killed.

:class:`KernelProcess` is one *generation* of a session's kernel: a LAUNCH creates one, a
restart kills it and creates the next. It uses jupyter_client's ``AsyncKernelManager`` with the
IPC transport, so the kernel's five sockets are unix sockets in the session's private runtime
directory at fixed names (:func:`kernel_endpoints`): the session's ZMQ sockets stay connected
across restarts, exactly as a local Jupyter client's do.

With a sandbox (:mod:`provider_host.sandbox`) the process the host starts, signals and waits
for is bubblewrap, whose sandbox holds the kernel: bwrap passes signals it receives through its
process group on to the kernel (it ignores them itself, and the launcher restores them), exits
with the kernel's status, and takes the whole sandbox down when it is killed.

Call :meth:`KernelProcess.start`, then await :meth:`KernelProcess.wait` (it returns the exit
code whenever the process ends), :meth:`KernelProcess.signal` to interrupt, and
:meth:`KernelProcess.kill` to end it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

import zmq.asyncio
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from traitlets import TraitError

from jupyter_io.errors import KernelLaunchError
from jupyter_io.protocol import Channel

from .cgroups import SessionCgroup
from .isolation import FORWARDED_SIGNALS, ResourceLimits, limits_preexec
from .kernel_launcher import WARM_FLAG

__all__ = ["KERNEL_PORTS", "KernelProcess", "kernel_endpoints"]

#: Fixed IPC "ports" (socket file suffixes) of every kernel generation.
KERNEL_PORTS = {
    Channel.SHELL: 1,
    Channel.IOPUB: 2,
    Channel.STDIN: 3,
    Channel.CONTROL: 4,
    Channel.HB: 5,
}
_PORT_TRAITS = {
    Channel.SHELL: "shell_port",
    Channel.IOPUB: "iopub_port",
    Channel.STDIN: "stdin_port",
    Channel.CONTROL: "control_port",
    Channel.HB: "hb_port",
}


def kernel_endpoints(runtime_dir: str | os.PathLike[str]) -> dict[Channel, str]:
    """The ZMQ endpoints of the kernel whose connection file lives in ``runtime_dir``."""
    base = Path(runtime_dir) / "kernel-ipc"
    return {channel: f"ipc://{base}-{port}" for channel, port in KERNEL_PORTS.items()}


class _ProviderKernelSpecs(KernelSpecManager):
    """Always this interpreter's ipykernel (or a course environment's interpreter, which
    imports it from here), whatever kernelspecs the host has installed, behind the
    sandbox's command prefix (if any)."""

    def __init__(
        self, prefix: list[str], python: str | None = None, warm: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.prefix = prefix
        self.python = python or sys.executable
        self.warm = warm

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        # Lossless iopub: see provider_host.kernel_launcher.
        launch = [self.python, "-m", "provider_host.kernel_launcher", "-f", "{connection_file}"]
        if self.warm:
            launch.append(WARM_FLAG)
        return KernelSpec(
            argv=[*self.prefix, *launch],
            display_name="Python 3 (jupyter-io)",
            language="python",
            interrupt_mode="signal",
        )


class _KernelManager(AsyncKernelManager):
    """Hands the connection file to the kernel's uid between writing it and launching."""

    #: (uid, gid) the sandboxed kernel runs as; None when it runs as the host.
    owner: tuple[int, int] | None = None

    async def _async_launch_kernel(self, kernel_cmd: list[str], **kw: Any) -> None:
        if self.owner is not None:
            # It stays 0600. Never through a link: the directory is the kernel's too.
            os.chown(self.connection_file, *self.owner, follow_symlinks=False)
        await super()._async_launch_kernel(kernel_cmd, **kw)


class KernelProcess:
    """One generation of a session's kernel process."""

    def __init__(
        self,
        *,
        generation: int,
        runtime_dir: Path,
        context: zmq.asyncio.Context,
        log: logging.Logger | logging.LoggerAdapter[Any],
        sandbox: list[str] | None = None,
        owner: tuple[int, int] | None = None,
        cgroup: SessionCgroup | None = None,
        python: str | None = None,
        warm: bool = False,
    ) -> None:
        """``sandbox`` is the command prefix that sandboxes the kernel
        (:meth:`provider_host.sandbox.Sandbox.argv`; None: run it directly as the host's
        user); ``owner`` the (uid, gid) it runs as there, which must read the connection
        file; ``cgroup`` the session's memory cgroup, which the process joins before exec;
        ``python`` the interpreter (a course environment's; None: the host's own); ``warm``:
        a warm kernel (:mod:`provider_host.warm_pool`), which imports ipykernel and waits for
        :meth:`claim` before it reads its connection file."""
        self.generation = generation
        self.runtime_dir = runtime_dir
        self.log = log
        self.sandboxed = sandbox is not None
        self.cgroup = cgroup
        self._oom_kills_before: int | None = None
        self._manager = _KernelManager(
            transport="ipc",
            connection_file=str(runtime_dir / "kernel.json"),
            kernel_spec_manager=_ProviderKernelSpecs(sandbox or [], python, warm),
            context=context,
            log=log,
            **{trait: KERNEL_PORTS[channel] for channel, trait in _PORT_TRAITS.items()},
        )
        self._manager.owner = owner
        self.warm = warm
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: Path = runtime_dir / f"kernel-{generation}.log"
        self.exit_code: int | None = None
        #: True once :meth:`kill` was called: the exit was the host's doing, not the kernel's.
        self.killed = False
        #: Why the host (or its memory limit) killed it, for the client (EXITED ``reason``),
        #: when not asked to.
        self.kill_reason: str | None = None

    def _open_log(self) -> IO[bytes]:
        # The kernel's stdout/stderr go to a file: inherited, they would pollute the host's
        # stdout (which launchers parse) or block on a pipe nobody reads. The runtime
        # directory is the sandboxed kernel's too, and an earlier generation may have left a
        # link here to a file of the host's: never open an existing name, never follow one.
        with contextlib.suppress(FileNotFoundError):
            self._log_file.unlink()
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
        return os.fdopen(os.open(self._log_file, flags, 0o600), "ab")

    @property
    def pid(self) -> int:
        """The kernel's process id (also its process group id); sandboxed, bwrap's."""
        assert self._process is not None, "start() first"
        return self._process.pid

    async def start(
        self,
        *,
        key: str,
        signature_scheme: str,
        env: dict[str, str],
        cwd: str,
        limits: ResourceLimits,
    ) -> None:
        """Write the connection file with the client's ``key`` and start the kernel.

        Returns once the process exists (not when the kernel answers). Raises
        :class:`KernelLaunchError` with what went wrong.
        """
        session = self._manager.session
        try:
            session.signature_scheme = signature_scheme
        except TraitError:
            raise KernelLaunchError(
                f"unsupported signature_scheme {signature_scheme!r}; use 'hmac-sha256'"
            ) from None
        session.key = key.encode()
        join: list[int] = []
        with self._open_log() as out:
            try:
                if self.cgroup is not None:
                    self._oom_kills_before = self.cgroup.oom_kills()
                    join.append(self.cgroup.open_procs())
                await self._manager.start_kernel(
                    env=env,
                    cwd=cwd,
                    # Sandboxed, bwrap must outlive the signals meant for the kernel.
                    preexec_fn=limits_preexec(
                        limits, ignore=FORWARDED_SIGNALS if self.sandboxed else (), join=join
                    ),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    # A warm kernel's claim comes this way (kept open; jupyter_client closes
                    # the pipe it makes by default).
                    **({"stdin": subprocess.PIPE} if self.warm else {}),
                )
            except Exception as exc:
                raise KernelLaunchError(f"could not start the kernel: {exc}") from exc
            finally:
                for fd in join:
                    os.close(fd)
        provisioner = self._manager.provisioner
        process = getattr(provisioner, "process", None)
        if not isinstance(process, subprocess.Popen):
            raise KernelLaunchError("jupyter_client started no local kernel process")
        self._process = process

    @property
    def running(self) -> bool:
        """True while the process started by :meth:`start` has not exited."""
        return self._process is not None and self._process.poll() is None

    async def claim(self, *, key: str, signature_scheme: str, env: dict[str, str]) -> None:
        """Hand a warm kernel (started with ``warm=True``) to its tenant: write the connection
        file with the tenant's ``key``, then tell the waiting process its environment; from
        here it starts as a cold kernel does. Raises :class:`KernelLaunchError` when the
        process is gone or the scheme is not supported."""
        process = self._process
        assert self.warm and process is not None and process.stdin is not None, "warm start()"
        manager = self._manager
        try:
            manager.session.signature_scheme = signature_scheme
        except TraitError:
            raise KernelLaunchError(
                f"unsupported signature_scheme {signature_scheme!r}; use 'hmac-sha256'"
            ) from None
        manager.session.key = key.encode()
        # Written again: the one written at start held a throwaway key nobody reads.
        manager._connection_file_written = False
        manager.write_connection_file()
        if manager.owner is not None:
            os.chown(manager.connection_file, *manager.owner, follow_symlinks=False)
        self.warm = False
        claim = json.dumps({"env": env}).encode()
        try:
            # In a thread: a claim over the pipe's buffer waits until the process reads it.
            await asyncio.to_thread(_write_and_close, process.stdin, claim)
        except OSError as exc:  # BrokenPipeError: it died while warm
            raise KernelLaunchError(f"the warm kernel is gone: {exc}") from None

    async def wait(self) -> int:
        """Wait until the kernel process ends; return its exit code (negative: signal).

        A kernel ended by its session's memory limit gets a :attr:`kill_reason` that says so.

        bwrap reports a kernel killed by signal N as exit status 128 + N; that is given back
        as -N, as for an unsandboxed kernel (a kernel calling ``exit(128 + N)`` reads the same).
        """
        process = self._process
        assert process is not None, "start() first"
        if process.returncode is None:
            await _process_exited(process)
        code = process.wait()
        if self.sandboxed and 128 < code < 128 + signal.NSIG:
            code = 128 - code
        if self.exit_code is None and self.kill_reason is None and self._out_of_memory():
            assert self.cgroup is not None
            self.kill_reason = self.cgroup.oom_reason()
        self.exit_code = code
        return code

    def _out_of_memory(self) -> bool:
        """True when the OOM killer ended a process of the session since this kernel started
        (the kernel itself, or a child whose loss it did not survive)."""
        if self.cgroup is None or self._oom_kills_before is None:
            return False
        kills = self.cgroup.oom_kills()
        return kills is not None and kills > self._oom_kills_before

    def signal(self, signum: int) -> None:
        """Deliver ``signum`` to the kernel's process group (its children included)."""
        if self._process is None or self._process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._process.pid, signum)

    def kill_group(self) -> None:
        """SIGKILL whatever is left of the kernel's process group (children it left behind)."""
        if self._process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._process.pid, signal.SIGKILL)

    async def kill(self) -> int | None:
        """Kill the kernel and its process group now, wait for it, clean up its files."""
        self.killed = True
        self.kill_group()
        if self._process is not None and self._process.stdin is not None:
            with contextlib.suppress(OSError):
                self._process.stdin.close()  # a warm kernel's, never claimed
        with contextlib.suppress(Exception):
            await self._manager.shutdown_kernel(now=True)
        if self._process is None:
            return None
        return await self.wait()

    def log_tail(self, lines: int = 20) -> str:
        """The end of the kernel's stdout/stderr (for the host's log when it dies)."""
        try:
            fd = os.open(self._log_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as log:
                log.seek(max(0, os.fstat(fd).st_size - 8192))
                text = log.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _write_and_close(pipe: IO[bytes], data: bytes) -> None:
    try:
        pipe.write(data)
    finally:
        with contextlib.suppress(OSError):
            pipe.close()


async def _process_exited(process: subprocess.Popen[bytes]) -> None:
    """Return when ``process`` has exited (without reaping it)."""
    try:
        fd = os.pidfd_open(process.pid)
    except (AttributeError, OSError):
        # No pidfd (not Linux, or already reaped): poll, the way jupyter_client does.
        while process.poll() is None:  # noqa: ASYNC110 - no event exists to await here
            await asyncio.sleep(0.1)
        return
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await exited
    finally:
        loop.remove_reader(fd)
        os.close(fd)
