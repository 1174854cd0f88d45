"""``jupyter io demo``: a whole jupyter-io setup on this machine, in one command.

The demo is an ordered list of :class:`Service` objects, started in order and stopped in
reverse (so JupyterLab shuts its kernels down while their provider still runs):

1. :class:`ProviderService`: a provider host (``python -m provider_host``) on loopback that
   accepts only the demo user's key, with demo keypairs and a workspace in the data dir;
2. :class:`KernelspecService`: the ``jupyter-io-demo`` kernelspec pointing at it, installed in
   ``sys.prefix`` so the Jupyter of this environment finds it, removed again on the way out;
3. :class:`LabService`: JupyterLab on loopback (left out with ``--no-lab``).

Later steps of the product (coordinator, ledger, GPU picker) join as more services in this
list. Ctrl-C or SIGTERM stops everything; a second Ctrl-C kills what is still running at once.
Build a :class:`Demo` (a traitlets Configurable) and ``await demo.run()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import importlib.util
import os
import re
import shutil
import signal
import sys
from collections import Counter
from collections.abc import Awaitable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from jupyter_core.paths import jupyter_data_dir
from traitlets import Bool, Float, Int, List, Unicode, default
from traitlets.config import LoggingConfigurable

from .errors import ConfigError, JupyterIOError
from .identity import load_or_create_keypair
from .kernelspec import install_kernelspec

__all__ = [
    "READY_LINE",
    "Demo",
    "KernelspecService",
    "LabService",
    "ProviderService",
    "Service",
]

#: The demo prints this line (then details) once every service is up.
READY_LINE = "jupyter-io demo ready"

# What the provider host prints on stdout before it accepts tunnels: its inventory, one
# device a line ("  gpu 0: MODEL, 80.0 GiB VRAM" or "  cpu: cpu (no GPU), 2 cores"), then the
# listening line, whose URL the kernelspec needs.
_LISTENING = re.compile(r"^jupyter-io provider listening on (?P<url>wss?://\S+)")
_DEVICE = re.compile(r"^\s+(?P<kind>cpu|gpu \d+): (?P<model>.+), [^,]+$")


class Service:
    """One step of the demo. :meth:`start` brings it up; :meth:`stop` must be safe to call
    whether or not :meth:`start` finished (the demo stops what it began, in reverse)."""

    name = "service"
    #: Whether the service ending by itself is a normal way for the demo to end.
    may_end_demo = False

    def describe(self) -> list[str]:
        """Lines for the demo's ready message, once started."""
        return []

    async def start(self) -> None:
        """Bring the service up; return once it is usable."""

    async def stop(self, hurry: asyncio.Event) -> None:
        """Take it down. When ``hurry`` is set (a second Ctrl-C), stop waiting and kill."""

    async def ended(self) -> int:
        """Return (an exit code) only if the service ends by itself; most never do."""
        await asyncio.Future()
        raise AssertionError("unreachable")


class _Process(Service):
    """A child process in its own session, so the terminal's Ctrl-C reaches only the demo
    and the demo decides the order in which children stop."""

    def __init__(self, argv: Sequence[str], *, stop_timeout: float, log: Any) -> None:
        self.argv = list(argv)
        self.stop_timeout = stop_timeout
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None

    async def spawn(self, **kwargs: Any) -> asyncio.subprocess.Process:
        self.log.debug("%s: starting %s", self.name, " ".join(self.argv))
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,
            **kwargs,
        )
        return self.proc

    async def ended(self) -> int:
        assert self.proc is not None
        return await self.proc.wait()

    async def stop(self, hurry: asyncio.Event) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        self.log.info("%s: stopping (pid %d)", self.name, proc.pid)
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        if not await _first(proc.wait(), hurry.wait(), timeout=self.stop_timeout):
            self.log.warning("%s: did not stop in time, killing it", self.name)
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # its session is its own process group
            # Dead now; on Python 3.11 wait() also waits for its pipes, which a stray
            # grandchild could hold, so don't wait on them forever.
            await _first(proc.wait(), timeout=5)


class ProviderService(_Process):
    """A provider host on loopback. After :meth:`start`, :attr:`url` is its tunnel URL and
    :attr:`offer` what its inventory lists (e.g. ``cpu (no GPU)``, ``2 x A100``)."""

    name = "provider"

    def __init__(
        self,
        argv: Sequence[str],
        *,
        start_timeout: float,
        stop_timeout: float,
        log: Any,
        echo: TextIO | None = None,
    ) -> None:
        super().__init__(argv, stop_timeout=stop_timeout, log=log)
        self.start_timeout = start_timeout
        self.echo = echo or sys.stdout
        self.url = ""
        self.offer = ""
        self._pump: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # Only stdout is piped, to find the listening line; the host's logs (stderr) go
        # straight to the terminal.
        proc = await self.spawn(stdout=asyncio.subprocess.PIPE)
        assert proc.stdout is not None
        try:
            await asyncio.wait_for(self._read_until_listening(proc.stdout), self.start_timeout)
        except asyncio.TimeoutError:
            raise JupyterIOError(
                f"the provider host did not report listening within {self.start_timeout:g} s "
                f"(raise Demo.provider_start_timeout if this machine is slow): "
                f"{' '.join(self.argv)}"
            ) from None
        # Keep draining its stdout, or it would block once the pipe fills.
        self._pump = asyncio.create_task(self._echo_rest(proc.stdout))

    def describe(self) -> list[str]:
        offer = f" offering {self.offer}" if self.offer else ""
        return [f"  provider:   {self.url}{offer}"]

    async def _read_until_listening(self, stream: asyncio.StreamReader) -> None:
        devices: list[tuple[bool, str]] = []  # (is the CPU, model)
        while True:
            raw = await stream.readline()
            if not raw:
                code = await self.ended()
                raise JupyterIOError(
                    f"the provider host exited with code {code} before listening; its "
                    f"messages are above. Command: {' '.join(self.argv)}"
                )
            line = raw.decode(errors="replace")
            self.echo.write(line)
            self.echo.flush()
            if device := _DEVICE.match(line):
                devices.append((device["kind"] == "cpu", device["model"]))
            if listening := _LISTENING.match(line):
                self.url = listening["url"]
                self.offer = _describe_offer(devices)
                return

    async def _echo_rest(self, stream: asyncio.StreamReader) -> None:
        while raw := await stream.readline():
            self.echo.write(raw.decode(errors="replace"))
            self.echo.flush()

    async def stop(self, hurry: asyncio.Event) -> None:
        await super().stop(hurry)
        if self._pump is not None:
            # EOF comes once the host is gone (and any kernel that inherited the pipe, which
            # dies with its host); don't wait forever on a straggler.
            await _first(self._pump, hurry.wait(), timeout=5)


class KernelspecService(Service):
    """Installs the kernelspec for ``provider`` on start and removes exactly that directory
    on stop."""

    name = "kernelspec"

    def __init__(
        self,
        provider: ProviderService,
        *,
        kernel_name: str,
        keypair_path: Path,
        provider_pubkey: str,
        prefix: str,
        log: Any,
    ) -> None:
        self.provider = provider
        self.kernel_name = kernel_name
        self.keypair_path = keypair_path
        self.provider_pubkey = provider_pubkey
        self.prefix = prefix
        self.log = log
        self.display_name = ""
        self.installed: str | None = None

    def describe(self) -> list[str]:
        return [
            f"  kernelspec: {self.kernel_name} ({self.display_name!r}) in {self.installed}",
            f"  user key:   {self.keypair_path}",
        ]

    async def start(self) -> None:
        offer = f" ({self.provider.offer})" if self.provider.offer else ""
        self.display_name = f"Python 3 · jupyter-io demo provider{offer}"
        self.installed = install_kernelspec(
            self.kernel_name,
            self.provider.url,
            self.keypair_path,
            display_name=self.display_name,
            provider_pubkey=self.provider_pubkey,
            prefix=self.prefix,
        )

    async def stop(self, hurry: asyncio.Event) -> None:
        if self.installed is not None:
            shutil.rmtree(self.installed, ignore_errors=True)
            self.log.info("kernelspec: removed %s", self.installed)
            self.installed = None


class LabService(_Process):
    """JupyterLab, its output straight on the terminal. Ends the demo if it exits itself
    (File → Shut Down)."""

    name = "jupyterlab"
    may_end_demo = True

    async def start(self) -> None:
        await self.spawn()


class Demo(LoggingConfigurable):
    """Runs the demo's services; see the module docstring. Configure with ``c.Demo.*``."""

    data_dir = Unicode(
        help="Where the demo keeps its keypairs and the provider's workspace "
        "(default: JUPYTER_DATA_DIR/io/demo).",
    ).tag(config=True)

    @default("data_dir")
    def _data_dir_default(self) -> str:
        return str(Path(jupyter_data_dir(), "io", "demo"))

    lab = Bool(
        True,
        help="Start JupyterLab. Without it, run only the provider and the kernelspec until Ctrl-C.",
    ).tag(config=True)
    port = Int(8888, help="JupyterLab's port (it tries the next ones if taken).").tag(config=True)
    provider_port = Int(0, help="The provider host's port on 127.0.0.1 (0: any free one).").tag(
        config=True
    )
    kernel_name = Unicode("jupyter-io-demo", help="Name of the kernelspec the demo installs.").tag(
        config=True
    )
    kernelspec_prefix = Unicode(
        help="Prefix the kernelspec is installed under (PREFIX/share/jupyter/kernels); "
        "default sys.prefix, where this environment's Jupyter looks.",
    ).tag(config=True)

    @default("kernelspec_prefix")
    def _kernelspec_prefix_default(self) -> str:
        return sys.prefix

    lab_args = List(Unicode(), help="Extra command-line arguments for JupyterLab.").tag(config=True)
    provider_command = List(
        Unicode(),
        help="How to run the provider host; the demo appends --listen, --allow, --keypair, "
        "--workspace and provider_args. Default: this Python's `-m provider_host`.",
    ).tag(config=True)

    @default("provider_command")
    def _provider_command_default(self) -> list[str]:
        return [sys.executable, "-m", "provider_host"]

    provider_args = List(Unicode(), help="Extra command-line arguments for the provider host.").tag(
        config=True
    )
    provider_start_timeout = Float(
        120.0, help="Seconds to wait for the provider host to listen (it probes the GPU first)."
    ).tag(config=True)
    stop_timeout = Float(
        30.0, help="Seconds each process gets to stop cleanly before it is killed."
    ).tag(config=True)

    def services(self) -> list[Service]:
        """The demo's services, in start order. Creates the data dir and demo keypairs."""
        data = Path(self.data_dir).expanduser().absolute()
        data.mkdir(parents=True, exist_ok=True, mode=0o700)
        user_key = data / "user-keypair.json"
        provider_key = data / "provider-keypair.json"
        user = load_or_create_keypair(user_key)
        host = load_or_create_keypair(provider_key)
        workspace = data / "workspace"
        workspace.mkdir(exist_ok=True)

        provider = ProviderService(
            [
                *self.provider_command,
                "--listen",
                f"127.0.0.1:{self.provider_port}",
                "--allow",
                str(user.pubkey()),
                "--keypair",
                str(provider_key),
                "--workspace",
                str(workspace),
                *self.provider_args,
            ],
            start_timeout=self.provider_start_timeout,
            stop_timeout=self.stop_timeout,
            log=self.log,
        )
        services: list[Service] = [
            provider,
            KernelspecService(
                provider,
                kernel_name=self.kernel_name,
                keypair_path=user_key,
                provider_pubkey=str(host.pubkey()),
                prefix=self.kernelspec_prefix,
                log=self.log,
            ),
        ]
        if self.lab:
            services.append(
                LabService(self.lab_argv(), stop_timeout=self.stop_timeout, log=self.log)
            )
        return services

    def lab_argv(self) -> list[str]:
        """JupyterLab's command line: loopback only, plus :attr:`lab_args`."""
        argv = [
            sys.executable,
            "-m",
            "jupyterlab",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={self.port}",
        ]
        if os.name == "posix" and os.geteuid() == 0:
            # Jupyter Server refuses to run as root without it; the demo binds loopback only.
            argv.append("--allow-root")
        return argv + list(self.lab_args)

    async def run(self) -> int:
        """Start the services, wait for Ctrl-C/SIGTERM (or one ending by itself), stop them in
        reverse. Returns the exit status: 0 after a requested stop or Lab's own shutdown."""
        if self.lab and importlib.util.find_spec("jupyterlab") is None:
            raise ConfigError(
                "JupyterLab is not installed here: `pip install -e '.[lab]'`, or run "
                "`jupyter io demo --no-lab` for the provider and kernelspec alone"
            )
        stop = asyncio.Event()
        hurry = asyncio.Event()
        started: list[Service] = []
        status = 0
        with _signals_set(stop, hurry, self.log):
            try:
                for service in self.services():
                    started.append(service)
                    if not await _first(service.start(), stop.wait()):
                        break  # asked to stop while starting
                else:
                    self._announce(started)
                    status = await self._wait(started, stop)
            finally:
                for service in reversed(started):
                    try:
                        await service.stop(hurry)
                    except Exception:
                        self.log.exception("%s: failed to stop cleanly", service.name)
        self.log.info("jupyter-io demo stopped")
        return status

    async def _wait(self, services: list[Service], stop: asyncio.Event) -> int:
        """Until a stop is asked for (0) or a service ends by itself (Lab: 0, else 1)."""
        stopping = asyncio.ensure_future(stop.wait())
        ended = {asyncio.ensure_future(s.ended()): s for s in services}
        try:
            done, _ = await asyncio.wait([stopping, *ended], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in [stopping, *ended]:
                task.cancel()
        for task in done:
            if task in ended:
                service = ended[task]
                code = task.result()
                if service.may_end_demo:
                    self.log.info("%s exited (code %s); stopping the demo", service.name, code)
                    return 0
                self.log.error(
                    "%s exited unexpectedly (code %s); stopping the demo", service.name, code
                )
                return 1
        return 0

    def _announce(self, services: list[Service]) -> None:
        lines = [READY_LINE]
        for service in services:
            lines.extend(service.describe())
        lines.append(
            "Open the URL JupyterLab prints and pick the kernel above. Ctrl-C stops everything."
            if self.lab
            else "Running without JupyterLab; Ctrl-C stops everything."
        )
        print("\n".join(lines), flush=True)


def _describe_offer(devices: list[tuple[bool, str]]) -> str:
    """``2 x A100, RTX 4090`` for GPUs; the CPU's label only when there is no GPU."""
    gpus = Counter(model for is_cpu, model in devices if not is_cpu)
    if not gpus:
        return ", ".join(model for _, model in devices)
    return ", ".join(f"{n} x {model}" if n > 1 else model for model, n in gpus.items())


async def _first(
    awaitable: Awaitable[Any], *others: Awaitable[Any], timeout: float | None = None
) -> bool:
    """Await ``awaitable`` unless one of ``others`` (or the timeout) comes first; then cancel
    it. True when ``awaitable`` finished (its exception, if any, is raised)."""
    main = asyncio.ensure_future(awaitable)
    rest = [asyncio.ensure_future(o) for o in others]
    try:
        await asyncio.wait([main, *rest], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in rest:
            task.cancel()
        if not main.done():
            main.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await main
    if main.cancelled():
        return False
    main.result()
    return True


@contextlib.contextmanager
def _signals_set(stop: asyncio.Event, hurry: asyncio.Event, log: Any) -> Iterator[None]:
    """SIGINT/SIGTERM set ``stop``; a second one sets ``hurry``. Restores the old handlers."""
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("killing what is still running")
            hurry.set()
        else:
            log.info("%s: stopping the demo (again to kill at once)", signal.Signals(signum).name)
            stop.set()

    signums = (signal.SIGINT, signal.SIGTERM)
    for signum in signums:
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        yield
    finally:
        for signum in signums:
            loop.remove_signal_handler(signum)


_PR_SET_PDEATHSIG = 1
_libc = (
    ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if sys.platform == "linux" else None
)


def _die_with_parent() -> None:
    """In the child, before exec: on Linux, ask for SIGTERM if the demo dies without stopping
    us (``kill -9``), so no provider or Lab outlives it. A no-op elsewhere."""
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
