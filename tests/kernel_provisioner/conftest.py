"""Fixtures for the provisioner's end-to-end tests: a real provider host subprocess, io-remote
kernelspecs in a temporary JUPYTER_PATH, kernels started through jupyter_client's
AsyncKernelManager, a loopback proxy the test can cut, and helpers that run cells through a
real AsyncKernelClient. Nothing is mocked: every test talks to real processes over loopback.

For leases: :func:`start_coordinator_process` runs ``jupyter io coordinator`` as a subprocess
(:class:`CoordinatorProcess`, which can restart on the same port and database),
:func:`start_provider_host` with ``--ProviderConfig.coordinator_url`` joins a provider to it,
:func:`wait_for_offers` waits until the coordinator lists a provider's offers, and
:class:`ThreadedProxy` is a :class:`CuttableProxy` on a thread of its own, for module-scoped
setups whose proxy must outlive one test's event loop.

The suite runs with ``--import-mode=importlib``, so test modules cannot import from here:
helpers reach them as fixtures (``cells``, ``processes``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
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

from jupyter_io.coordinator_client import CoordinatorClient
from jupyter_io.identity import write_keypair

HOST_READY_TIMEOUT = 30.0
LISTENING = "jupyter-io provider listening on "
COORDINATOR_LISTENING = "jupyter-io coordinator listening on "
#: Runs ``jupyter io coordinator`` with the arguments that follow (no console script needed).
COORDINATOR_COMMAND = [
    sys.executable,
    "-c",
    "from jupyter_io.coordinator.app import CoordinatorApp; CoordinatorApp.launch_instance()",
]


@dataclass
class ProviderHost:
    """A running ``python -m provider_host`` and the user key it allows."""

    proc: subprocess.Popen[str]
    url: str
    port: int
    user_keypair_path: Path
    workspace: Path
    stderr_lines: list[str] = field(default_factory=list)
    #: The host's own public key (base58).
    pubkey: str = ""

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


def start_provider_host(
    tmp: Path,
    extra_args: list[str],
    listen: str = "127.0.0.1:0",
    env: dict[str, str] | None = None,
) -> ProviderHost:
    tmp.mkdir(parents=True, exist_ok=True)
    user_key = Keypair()
    user_path = write_keypair(user_key, tmp / "user.json")
    host_key = Keypair()
    host_path = write_keypair(host_key, tmp / "host.json")
    workspace = tmp / "workspace"
    workspace.mkdir(exist_ok=True)
    if not any("warm" in arg for arg in extra_args):
        # These tests tell a session's kernel by the processes new since it started; the
        # spare warm kernel armed for the next lease would be one more (warm kernels are
        # tested in tests/provider_host/test_warm_kernels.py and test_provisioner.py).
        extra_args = [*extra_args, "--no-warm-kernels"]
    cmd = [
        sys.executable,
        "-m",
        "provider_host",
        "--listen",
        listen,
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
        env={**os.environ, **env} if env else None,
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
    return ProviderHost(proc, url, port, user_path, workspace, stderr_lines, str(host_key.pubkey()))


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


def free_port() -> int:
    """A TCP port nothing listens on right now (for a server that must know its port first)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class CoordinatorProcess:
    """A ``jupyter io coordinator`` subprocess; :meth:`restart` brings it back on the same
    port and database (a coordinator restart, as an operator's upgrade does)."""

    data_dir: Path
    args: list[str]
    proc: subprocess.Popen[str] | None = None
    #: ``http://127.0.0.1:PORT``: where it listens (REST calls and the provider link).
    url: str = ""
    #: The URL it advertises (its ``--public-url``, else :attr:`url`): the relay's base.
    public_url: str = ""
    port: int = 0
    stderr_lines: list[str] = field(default_factory=list)

    def start(self) -> None:
        listen = f"127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [*COORDINATOR_COMMAND, "--listen", listen, "--data-dir", str(self.data_dir),
             *self.args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )  # fmt: skip
        found = _read_ready_line(self.proc, COORDINATOR_LISTENING, self.stderr_lines)
        if found is None:
            self.stop()
            pytest.fail(f"coordinator did not start:\n{''.join(self.stderr_lines[-60:])}")
        self.public_url = found
        if not self.port:
            # Where it really listens: the port it bound (--public-url may name a proxy).
            self.port = _listening_port(self.proc.pid)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self, sig: int = signal.SIGTERM) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def stderr(self) -> str:
        return "".join(self.stderr_lines[-60:])


def _read_ready_line(
    proc: subprocess.Popen[str], prefix: str, stderr_lines: list[str]
) -> str | None:
    """Wait for ``prefix`` on ``proc``'s stdout (keep draining both pipes afterwards);
    return the rest of that line, or None if the process ended or took too long."""
    ready = threading.Event()
    found: list[str] = []

    def read_stdout() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if not found and line.startswith(prefix):
                found.append(line[len(prefix) :].strip())
                ready.set()
        ready.set()

    def read_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            stderr_lines.append(line)

    threading.Thread(target=read_stdout, daemon=True).start()
    threading.Thread(target=read_stderr, daemon=True).start()
    ready.wait(HOST_READY_TIMEOUT)
    return found[0] if found else None


def _listening_port(pid: int) -> int:
    ports = [
        c.laddr.port
        for c in psutil.Process(pid).net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN
    ]
    assert len(ports) == 1, f"coordinator listens on {ports}"
    return int(ports[0])


def start_coordinator_process(
    data_dir: Path, *args: str, public_url: str = ""
) -> CoordinatorProcess:
    """Start a coordinator on a free loopback port with its SQLite database in ``data_dir``.

    The offers list is not cached (tests look at it right after a change); ``public_url``
    makes it advertise another address (a proxy in front of it) for its relay. Leases are
    free (``payments=free``) unless ``args`` name the payments mode.
    """
    extra = ["--CoordinatorConfig.offers_cache_ttl=0", *args]
    if not any("gpu_check" in arg for arg in args):  # challenges on, of the smallest size
        extra += [
            "--CoordinatorConfig.gpu_check_cpu_n=64",
            "--CoordinatorConfig.gpu_check_max_n=64",
        ]
    if not any(arg.startswith(("--CoordinatorConfig.payments", "--payments")) for arg in args):
        # Tests not about payments lease for free; traitlets refuses a trait given twice.
        extra.insert(1, "--CoordinatorConfig.payments=free")
    if public_url:
        extra += ["--public-url", public_url]
    coordinator = CoordinatorProcess(data_dir, extra)
    coordinator.start()
    return coordinator


def get_json(url: str, context: ssl.SSLContext | None = None) -> Any:
    with urllib.request.urlopen(url, timeout=10, context=context) as response:
        return json.loads(response.read())


def wait_for_offers(
    coordinator_url: str,
    provider: str,
    timeout: float = 30.0,
    context: ssl.SSLContext | None = None,
) -> list[Any]:
    """Poll the coordinator's offers (it publishes no event a test could await) until
    ``provider`` has linked and offers something; return that provider's offer rows
    (``context``: the TLS context for an https coordinator)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = [
            row
            for row in get_json(f"{coordinator_url}/api/v1/offers", context)["providers"]
            if row["provider"] == provider
        ]
        if rows:
            return rows
        if time.monotonic() > deadline:
            raise TimeoutError(f"provider {provider} did not link within {timeout} s")
        time.sleep(0.05)


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

    def install_lease(
        self, name: str, coordinator_url: str, keypair_path: Path | str, **config: Any
    ) -> str:
        """A kernelspec that leases through the coordinator (``gpu=``, ``max_price_per_hour=``,
        ... as provisioner traits)."""
        spec_dir = self.root / "kernels" / name
        spec_dir.mkdir(parents=True, exist_ok=True)
        spec = {
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": f"Leased ({name})",
            "language": "python",
            "interrupt_mode": "signal",
            "metadata": {
                "kernel_provisioner": {
                    "provisioner_name": "io-remote",
                    "config": {
                        "coordinator_url": coordinator_url,
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


class ThreadedProxy:
    """A :class:`CuttableProxy` served by an event loop on its own thread, so it outlives the
    event loop of any one test (module-scoped fixtures). Same :meth:`cut` / :meth:`restore`."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._proxy = CuttableProxy("127.0.0.1", 0)
        self._call(self._proxy.start())
        self.port = self._proxy.port

    def _call(self, coro: Awaitable[Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)  # type: ignore[arg-type]

    @property
    def url(self) -> str:
        """The tunnel URL through this proxy."""
        return f"ws://127.0.0.1:{self.port}/tunnel"

    def forward_to(self, port: int) -> None:
        """Send what arrives from now on to 127.0.0.1:``port``."""
        self._proxy.upstream = ("127.0.0.1", port)

    @property
    def connections_accepted(self) -> int:
        return self._proxy.connections_accepted

    def cut(self) -> None:
        async def cut() -> None:
            self._proxy.cut()

        self._call(cut())

    def restore(self) -> None:
        async def restore() -> None:
            self._proxy.restore()

        self._call(restore())

    def close(self) -> None:
        self._call(self._proxy.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


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
def threaded_proxy_to() -> Iterator[Callable[[ProviderHost], ThreadedProxy]]:
    """:func:`proxy_to` for tests that run no event loop (the blocking jupyter_client APIs):
    each proxy serves from a thread of its own. Its ``url`` is the tunnel URL through it."""
    proxies: list[ThreadedProxy] = []

    def start(host: ProviderHost) -> ThreadedProxy:
        p = ThreadedProxy()
        p.forward_to(host.port)
        proxies.append(p)
        return p

    yield start
    for p in proxies:
        p.close()


@pytest.fixture
def cells() -> Cells:
    return Cells()


@pytest.fixture
def processes() -> Processes:
    return Processes()


# -- a marketplace: a coordinator and providers linked to it ----------------------------------

#: Provider flags for the lease tests: no benchmark before linking (it imports torch, seconds
#: the tests need not spend), relink quickly after a coordinator restart.
MARKET_PROVIDER_ARGS = ["--no-benchmark", "--ProviderConfig.link_backoff_max=0.5"]


def join_provider(
    tmp: Path, coordinator: CoordinatorProcess, *args: str, public: bool = False
) -> ProviderHost:
    """A provider host linked to ``coordinator``; ``public``: it advertises its tunnel URL
    (clients connect directly), else clients come through the coordinator's relay. Returns
    once the coordinator lists its offers."""
    extra = [*MARKET_PROVIDER_ARGS, "--coordinator", coordinator.url, *args]
    listen = "127.0.0.1:0"
    if public:
        port = free_port()
        listen = f"127.0.0.1:{port}"
        extra += ["--public-url", f"ws://{listen}/tunnel"]
    host = start_provider_host(tmp, extra, listen)
    try:
        wait_for_offers(coordinator.url, host.pubkey)
    except TimeoutError as exc:
        stop_provider_host(host)
        pytest.fail(f"{exc}\nprovider:\n{host.stderr()}\ncoordinator:\n{coordinator.stderr()}")
    return host


@dataclass
class Market:
    """A coordinator, the providers linked to it, and a user's keypair."""

    coordinator: CoordinatorProcess
    #: No public URL: reached through the relay. Offers one RTX 4090 at 0.12 SOL/h.
    relayed: ProviderHost
    #: Reached directly: one RTX 4090 at 0.2 SOL/h and one A100 at 0.9 SOL/h.
    direct: ProviderHost
    user_keypair_path: Path
    user: Keypair
    #: In front of the coordinator's relay (its advertised URL), or None.
    proxy: ThreadedProxy | None = None

    def client(self) -> CoordinatorClient:
        """A coordinator client signing as the user (close it after use)."""
        return CoordinatorClient(self.coordinator.url, self.user, timeout=15)

    def status(self) -> dict[str, Any]:
        return get_json(f"{self.coordinator.url}/api/v1/status")  # type: ignore[no-any-return]

    def stop(self) -> None:
        for host in (self.relayed, self.direct):
            with contextlib.suppress(Exception):
                stop_provider_host(host)
        self.coordinator.stop()
        if self.proxy is not None:
            self.proxy.close()


def build_market(tmp: Path, *coordinator_args: str, proxy: bool) -> Market:
    """Start a coordinator (behind a :class:`ThreadedProxy` for its relay when ``proxy``)
    and two providers linked to it (see :class:`Market`)."""
    front = ThreadedProxy() if proxy else None
    public_url = f"http://127.0.0.1:{front.port}" if front is not None else ""
    coordinator = start_coordinator_process(
        tmp / "coordinator", *coordinator_args, public_url=public_url
    )
    if front is not None:
        front.forward_to(coordinator.port)
    user = Keypair()
    user_path = write_keypair(user, tmp / "user.json")
    relayed = direct = None
    try:
        relayed = join_provider(
            tmp / "relayed", coordinator, "--simulate-gpu", "RTX 4090:24", "--price", "0.12"
        )
        direct = join_provider(
            tmp / "direct", coordinator, "--simulate-gpu", "RTX 4090:24",
            "--simulate-gpu", "A100:80", "--price", "0.9", "--gpu-price", "RTX 4090=0.2",
            public=True,
        )  # fmt: skip
    except BaseException:
        for host in (relayed, direct):
            if host is not None:
                stop_provider_host(host)
        coordinator.stop()
        if front is not None:
            front.close()
        raise
    return Market(coordinator, relayed, direct, user_path, user, front)


@pytest.fixture(scope="module")
def market(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Market]:
    """One marketplace for a module's lease tests, its relay behind a cuttable proxy.
    Tests must leave no lease behind (the start_kernel fixture shuts kernels down)."""
    built = build_market(tmp_path_factory.mktemp("market"), proxy=True)
    try:
        yield built
    finally:
        built.stop()


def _market_starter(new_dir: Callable[[], Path]) -> Iterator[Callable[..., Market]]:
    """Yield a ``start(*coordinator_args, proxy=False)`` that builds marketplaces in fresh
    directories from ``new_dir``; stop them all afterwards."""
    built: list[Market] = []

    def start(*coordinator_args: str, proxy: bool = False) -> Market:
        market = build_market(new_dir(), *coordinator_args, proxy=proxy)
        built.append(market)
        return market

    try:
        yield start
    finally:
        for market in built:
            market.stop()


@pytest.fixture
def start_market(tmp_path: Path) -> Iterator[Callable[..., Market]]:
    """Start a marketplace of the test's own (to restart its coordinator, say):
    ``start_market("--token-ttl", "4", proxy=False)``; coordinator flags as arguments."""
    numbers = itertools.count()
    yield from _market_starter(lambda: tmp_path / f"market{next(numbers)}")


@pytest.fixture(scope="module")
def start_module_market(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., Market]]:
    """``start_market`` for a whole module's tests (coordinator flags as arguments): for
    modules whose marketplace needs flags of its own (payments, heartbeats)."""
    yield from _market_starter(lambda: tmp_path_factory.mktemp("market"))
