"""Fixtures for the provisioner's end-to-end tests: a real provider host subprocess, io-remote
kernelspecs in a temporary JUPYTER_PATH, kernels started through jupyter_client's
AsyncKernelManager, a loopback proxy the test can cut, and helpers that run cells through a
real AsyncKernelClient. Nothing is mocked: every test talks to real processes over loopback.

The suite runs with ``--import-mode=importlib``, so test modules cannot import from here:
helpers reach them as fixtures (``cells``, ``processes``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty
from typing import Any

import psutil
import pytest
from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_client.manager import AsyncKernelManager
from solders.keypair import Keypair

from jupyter_io.identity import write_keypair

HOST_READY_TIMEOUT = 30.0
LISTENING = "jupyter-io provider listening on "


@dataclass
class ProviderHost:
    """A running ``python -m provider_host`` and the user key it allows."""

    proc: subprocess.Popen[str]
    url: str
    port: int
    user_keypair_path: Path
    workspace: Path
    stderr_lines: list[str] = field(default_factory=list)

    def descendants(self) -> list[psutil.Process]:
        """Every live process the host started (its kernels, and theirs)."""
        try:
            return [p for p in psutil.Process(self.proc.pid).children(recursive=True) if _alive(p)]
        except psutil.NoSuchProcess:
            return []

    def stderr(self) -> str:
        return "".join(self.stderr_lines[-60:])


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_gone_sync(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return [p for p in alive if _alive(p)]


def start_provider_host(tmp: Path, extra_args: list[str]) -> ProviderHost:
    tmp.mkdir(parents=True, exist_ok=True)
    user_key = Keypair()
    user_path = write_keypair(user_key, tmp / "user.json")
    host_path = write_keypair(Keypair(), tmp / "host.json")
    workspace = tmp / "workspace"
    workspace.mkdir(exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "provider_host",
        "--listen",
        "127.0.0.1:0",
        "--allow",
        str(user_key.pubkey()),
        "--keypair",
        str(host_path),
        "--workspace",
        str(workspace),
        *extra_args,
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(Path(__file__).resolve().parents[2]),
        start_new_session=True,
    )
    ready = threading.Event()
    found: list[str] = []
    stderr_lines: list[str] = []

    def read_stdout() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if not found and line.startswith(LISTENING):
                found.append(line[len(LISTENING) :].strip())
                ready.set()
        ready.set()

    def read_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            stderr_lines.append(line)

    threading.Thread(target=read_stdout, daemon=True).start()
    threading.Thread(target=read_stderr, daemon=True).start()
    if not ready.wait(HOST_READY_TIMEOUT) or not found:
        proc.kill()
        proc.wait()
        pytest.fail(
            f"provider host did not print its listening line within {HOST_READY_TIMEOUT} s "
            f"(exit {proc.returncode}):\n{''.join(stderr_lines)}"
        )
    url = found[0]
    port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
    return ProviderHost(proc, url, port, user_path, workspace, stderr_lines)


def stop_provider_host(host: ProviderHost) -> None:
    kernels = host.descendants()
    if host.proc.poll() is None:
        host.proc.send_signal(signal.SIGTERM)
        try:
            host.proc.wait(10)
        except subprocess.TimeoutExpired:
            host.proc.kill()
            host.proc.wait()
    survivors = _wait_gone_sync(kernels, 10.0)
    for p in survivors:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    assert not survivors, f"kernels outlived the provider host: {survivors}\n{host.stderr()}"


@dataclass
class KernelSpecs:
    """Writes io-remote kernelspecs into a temporary JUPYTER_PATH."""

    root: Path

    def install(
        self,
        name: str,
        provider_url: str,
        keypair_path: Path | str,
        *,
        interrupt_mode: str = "signal",
        **config: Any,
    ) -> str:
        spec_dir = self.root / "kernels" / name
        spec_dir.mkdir(parents=True, exist_ok=True)
        spec = {
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": f"Remote ({name})",
            "language": "python",
            "interrupt_mode": interrupt_mode,
            "metadata": {
                "kernel_provisioner": {
                    "provisioner_name": "io-remote",
                    "config": {
                        "provider_url": provider_url,
                        "keypair_path": str(keypair_path),
                        **config,
                    },
                }
            },
        }
        (spec_dir / "kernel.json").write_text(json.dumps(spec))
        return name


class CuttableProxy:
    """A loopback TCP proxy to a provider host that a test can cut and restore.

    Cutting closes every piped connection at once (both ends see the TCP connection drop,
    as when a laptop changes networks) and, until :meth:`restore`, accepts new connections
    only to close them straight away, so resume attempts fail the way a broken path fails.
    """

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self.cut_active = False
        self.connections_accepted = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/tunnel"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def cut(self) -> None:
        self.cut_active = True
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def restore(self) -> None:
        self.cut_active = False

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections_accepted += 1
        if self.cut_active:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        pipes = [
            asyncio.ensure_future(self._pipe(reader, up_writer)),
            asyncio.ensure_future(self._pipe(up_reader, writer)),
        ]
        await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        for w in (writer, up_writer):
            w.transport.abort()
            self._writers.discard(w)
        for task in pipes:
            task.cancel()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@dataclass
class Execution:
    """The iopub messages and the execute_reply of one execute_request."""

    msg_id: str
    iopub: list[dict[str, Any]] = field(default_factory=list)
    reply: dict[str, Any] | None = None
    #: monotonic arrival time of each iopub message (parallel to ``iopub``)
    arrivals: list[float] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def stream(self, name: str = "stdout") -> str:
        return "".join(
            m["content"]["text"]
            for m in self.iopub
            if m["msg_type"] == "stream" and m["content"]["name"] == name
        )

    def of_type(self, msg_type: str) -> list[dict[str, Any]]:
        return [m for m in self.iopub if m["msg_type"] == msg_type]

    @property
    def status(self) -> str:
        assert self.reply is not None
        return str(self.reply["content"]["status"])

    def record(self, msg: dict[str, Any]) -> None:
        self.iopub.append(msg)
        self.arrivals.append(time.monotonic())
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_until(self, predicate: Callable[[], bool], timeout: float) -> None:
        """Wait, message by message, until ``predicate()`` holds; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"condition not met within {timeout} s: {self.stream()!r}")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)


class Processes:
    """Checks on processes of the provider machine (here: this machine, over loopback)."""

    @staticmethod
    def gone(pid: int) -> bool:
        """True when no live process has ``pid`` (a zombie awaiting its reaper counts as gone)."""
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    @staticmethod
    async def wait_gone(pid: int, timeout: float) -> bool:
        """Poll the process table (no event exists for another process's death) until
        ``pid`` is gone or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while not Processes.gone(pid):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True


class Cells:
    """Run cells through a real AsyncKernelClient and gather what comes back."""

    @staticmethod
    async def connect(
        km: Any, timeout: float = 30, *, own_session: bool = False
    ) -> AsyncKernelClient:
        """A started, ready client of ``km``'s kernel.

        ``own_session``: a client with its own session id (so its own ZMQ identity), as a
        second frontend in another process would be; ``km.client()`` clones the manager's.
        """
        if own_session:
            kc = AsyncKernelClient()
            kc.load_connection_info(km.get_connection_info())
        else:
            kc = km.client()
        kc.start_channels()
        await kc.wait_for_ready(timeout=timeout)
        return kc

    @staticmethod
    def execution(msg_id: str) -> Execution:
        """An empty :class:`Execution` to pass as ``collect(..., into=)``."""
        return Execution(msg_id)

    @staticmethod
    async def collect(
        kc: AsyncKernelClient, msg_id: str, timeout: float = 30, into: Execution | None = None
    ) -> Execution:
        """Gather iopub output and the shell reply of ``msg_id`` until the kernel is idle.

        Pass ``into`` to watch the output arrive (``Execution.wait_until``) meanwhile.
        """
        ex = into if into is not None else Execution(msg_id)
        deadline = time.monotonic() + timeout
        idle = False
        while not idle or ex.reply is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"no {'idle status' if not idle else 'execute_reply'} for {msg_id} within "
                    f"{timeout} s; got {[m['msg_type'] for m in ex.iopub]}"
                )
            if not idle:
                try:
                    msg = await kc.get_iopub_msg(timeout=min(remaining, 1.0))
                except Empty:
                    continue
                if msg["parent_header"].get("msg_id") != msg_id:
                    continue
                ex.record(msg)
                if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                    idle = True
            else:
                reply = await kc.get_shell_msg(timeout=remaining)
                if reply["parent_header"].get("msg_id") == msg_id:
                    ex.reply = reply
        return ex

    @staticmethod
    async def run(kc: AsyncKernelClient, code: str, timeout: float = 30) -> Execution:
        """Execute ``code`` and return everything it produced."""
        return await Cells.collect(kc, kc.execute(code), timeout)

    @staticmethod
    async def next_iopub(
        kc: AsyncKernelClient, msg_id: str, msg_type: str, timeout: float = 30
    ) -> dict[str, Any]:
        """The next iopub message of ``msg_type`` whose parent is ``msg_id``."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {msg_type} for {msg_id} within {timeout} s")
            try:
                msg = await kc.get_iopub_msg(timeout=remaining)
            except Empty:
                continue
            if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == msg_type:
                return msg


@pytest.fixture(scope="module")
def provider_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProviderHost]:
    """One provider host for a module's tests; teardown asserts no kernel survives it."""
    host = start_provider_host(tmp_path_factory.mktemp("host"), [])
    try:
        yield host
    finally:
        stop_provider_host(host)


@pytest.fixture
def start_host(tmp_path: Path) -> Iterator[Callable[..., ProviderHost]]:
    """Start a provider host of the test's own (``start_host("--grace-period", "2")``)."""
    hosts: list[ProviderHost] = []

    def start(*extra_args: str) -> ProviderHost:
        host = start_provider_host(tmp_path / f"host{len(hosts)}", list(extra_args))
        hosts.append(host)
        return host

    yield start
    for host in hosts:
        stop_provider_host(host)


@pytest.fixture
def kernelspecs(jupyter_env: Path) -> KernelSpecs:
    """Install io-remote kernelspecs on the JUPYTER_PATH of an isolated Jupyter environment
    (this process and the servers it starts)."""
    return KernelSpecs(jupyter_env / "share" / "jupyter")


@pytest.fixture
def remote_spec(kernelspecs: KernelSpecs, provider_host: ProviderHost) -> str:
    """The name of a kernelspec that runs its kernel on the module's provider host."""
    return kernelspecs.install("io-remote-test", provider_host.url, provider_host.user_keypair_path)


@pytest.fixture
async def start_kernel() -> AsyncIterator[Callable[..., Any]]:
    """Start kernels through AsyncKernelManager; teardown shuts each down and checks that
    its process is gone from the provider."""
    managers: list[AsyncKernelManager] = []

    async def start(kernel_name: str) -> AsyncKernelManager:
        km = AsyncKernelManager(kernel_name=kernel_name)
        managers.append(km)
        await asyncio.wait_for(km.start_kernel(), 60)
        return km

    yield start
    for km in managers:
        pid = km.provisioner.kernel_pid if km.provisioner is not None else None
        if km.has_kernel:
            await asyncio.wait_for(km.shutdown_kernel(now=True), 30)
        elif km.provisioner is not None:
            await km.provisioner.cleanup(restart=False)
        if pid is not None:
            assert await Processes.wait_gone(pid, 10), f"kernel {pid} survived its shutdown"


@pytest.fixture
async def proxy_to() -> AsyncIterator[Callable[[ProviderHost], Awaitable[CuttableProxy]]]:
    """Start loopback TCP proxies to provider hosts that the test can cut."""
    proxies: list[CuttableProxy] = []

    async def start(host: ProviderHost) -> CuttableProxy:
        p = CuttableProxy("127.0.0.1", host.port)
        await p.start()
        proxies.append(p)
        return p

    yield start
    for p in proxies:
        await p.close()


@pytest.fixture
def cells() -> Cells:
    return Cells()


@pytest.fixture
def processes() -> Processes:
    return Processes()
