"""Replicas of one marketplace, as an operator runs them: real processes, one PostgreSQL.

:class:`Cluster` is ``jupyter io ledger`` (the shared embedded ledger, a subprocess) plus N
``jupyter io coordinator`` subprocesses on one fresh PostgreSQL database (the session's
``postgres_server``), sharing one keypair (``--keypair``) and the ledger (``--solana-url``,
through a :class:`LedgerGate` that can hold a settlement transaction), each on a port of its
own. Provider hosts (``python -m provider_host``, as the provisioner's
end-to-end tests run them) are given the comma-separated list of every replica's URL; users
lease through the same list. :meth:`Replica.kill` is ``kill -9``; :meth:`Cluster.heal`
brings every dead replica back on its port.

The ``cluster`` fixture is one cluster shared by this directory's tests (starting three
coordinators costs seconds on two cores), healed before each test and stopped after the
directory's last; tests must leave no lease running.
What the database says (who holds a provider's link, a settlement's claim) is read with
:meth:`Cluster.query`.

The suite runs with ``--import-mode=importlib``: test modules reach the helpers here through
the fixtures (``cluster``, ``ledger_process``, ``kernels``) or by relative import.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import pytest
from jupyter_client.manager import AsyncKernelManager
from solders.keypair import Keypair
from solders.pubkey import Pubkey
from sqlalchemy.engine import make_url
from tornado import web
from tornado.httpclient import AsyncHTTPClient
from tornado.httpserver import HTTPServer
from tornado.iostream import StreamClosedError
from tornado.netutil import bind_sockets

from jupyter_io.identity import write_keypair
from jupyter_io.payments.escrow import EscrowClient

from ...kernel_provisioner.conftest import (
    KernelSpecs,
    ProviderHost,
    free_port,
    get_json,
    start_provider_host,
    stop_provider_host,
)
from ..conftest import PostgresServer

#: ``jupyter io ...`` through the package's entry point (no console script needed).
JUPYTER_IO = [sys.executable, "-c", "from jupyter_io.app import main; main()"]
LEDGER_READY = "jupyter-io ledger listening on "
COORDINATOR_READY = "jupyter-io coordinator listening on "
#: Bound on a process's start (three coordinators start at once on two busy cores).
START_TIMEOUT = 45.0
#: Replicas in the session's cluster.
REPLICAS = 3
#: Every replica's flags: escrow payments on the shared ledger, heartbeats every 0.5 s (a
#: silent provider lost after 5 s: a test freezes one for a second or two on purpose),
#: settlements retried briskly, escrows accepted from one second's worth, offers uncached.
REPLICA_ARGS = (
    "--payments", "escrow",
    "--heartbeat-interval", "0.5",
    "--heartbeat-misses", "10",
    "--CoordinatorConfig.flush_interval=0.2",
    "--CoordinatorConfig.offers_cache_ttl=0",
    "--CoordinatorConfig.settle_retry_interval=0.2",
    "--CoordinatorConfig.min_deposit_seconds=1",
)  # fmt: skip
#: Provider flags: no benchmark before linking, relink briskly after a replica's death.
PROVIDER_ARGS = ("--no-benchmark", "--ProviderConfig.link_backoff_max=0.5")


class _Output:
    """Drain a process's stdout and stderr on threads; :meth:`wait_line` for a prefix."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._found: dict[str, str] = {}
        self._changed = threading.Condition()
        for pipe in (proc.stdout, proc.stderr):
            threading.Thread(target=self._read, args=(pipe,), daemon=True).start()
        self._open = 2

    def _read(self, pipe: Any) -> None:
        for line in pipe:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._open -= 1
            self._changed.notify_all()

    def wait_line(self, prefix: str, timeout: float) -> str | None:
        """The rest of the first line starting with ``prefix`` (None: exited or too slow)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines:
                    if line.startswith(prefix):
                        return line[len(prefix) :].strip()
                left = deadline - time.monotonic()
                if left <= 0 or self._open == 0:
                    return None
                self._changed.wait(left)

    def tail(self, n: int = 60) -> str:
        return "".join(self.lines[-n:])


def _spawn(args: list[str]) -> tuple[subprocess.Popen[str], _Output]:
    proc = subprocess.Popen(
        [*JUPYTER_IO, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    return proc, _Output(proc)


def _terminate(proc: subprocess.Popen[str] | None, timeout: float = 15.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class LedgerProcess:
    """A running ``jupyter io ledger``; :attr:`url` is its JSON-RPC URL."""

    data_dir: Path
    proc: subprocess.Popen[str] | None = None
    output: _Output | None = None
    url: str = ""
    port: int = 0

    def start(self) -> None:
        listen = f"127.0.0.1:{self.port}"
        self.proc, self.output = _spawn(
            ["ledger", "--listen", listen, "--data-dir", str(self.data_dir)]
        )
        found = self.output.wait_line(LEDGER_READY, START_TIMEOUT)
        if found is None:
            _terminate(self.proc)
            pytest.fail(f"jupyter io ledger did not start:\n{self.output.tail()}")
        self.url = found
        self.port = int(urlsplit(found).port or 0)

    def stop(self) -> None:
        _terminate(self.proc)

    def escrow(self) -> EscrowClient:
        """A ledger client (close it after use)."""
        return EscrowClient.connect(self.url)

    async def airdrop(self, *pubkeys: Pubkey | str, lamports: int) -> None:
        async with self.escrow() as escrow:
            for pubkey in pubkeys:
                key = Pubkey.from_string(pubkey) if isinstance(pubkey, str) else pubkey
                await escrow.airdrop(key, lamports)


def start_ledger(data_dir: Path) -> LedgerProcess:
    """``jupyter io ledger`` on a free loopback port with its accounts in ``data_dir``."""
    ledger = LedgerProcess(data_dir)
    ledger.start()
    return ledger


class LedgerGate:
    """The replicas' way to the ledger: a JSON-RPC pass-through on a thread of its own that
    can hold the next ``sendTransaction`` (:meth:`hold`) and, once the test has done what it
    wanted meanwhile (kill the replica that sent it), forward it late or drop it
    (:meth:`release`), as a network that delivered a request after its sender died would."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        #: Set when a held ``sendTransaction`` arrived; :attr:`forwarded` when it went on.
        self.held = threading.Event()
        self.forwarded = threading.Event()
        #: The ledger's answer to the held request, once forwarded.
        self.answer: bytes | None = None
        self._holding = False
        self._decision: asyncio.Future[bool] | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server: HTTPServer | None = None
        self.port = int(self._call(self._start()))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _start(self) -> int:
        gate = self

        class Handler(web.RequestHandler):
            def check_xsrf_cookie(self) -> None:
                return None

            async def post(self) -> None:
                body = self.request.body
                if gate._holding and b'"sendTransaction"' in body:
                    gate._holding = False
                    gate._decision = asyncio.get_running_loop().create_future()
                    gate.held.set()
                    if not await gate._decision:
                        self.request.connection.close()  # type: ignore[union-attr]
                        return
                    gate.answer = await gate._forward(body)
                    gate.forwarded.set()
                    with contextlib.suppress(StreamClosedError):
                        self.finish(gate.answer)  # its sender is gone: nobody reads this
                    return
                self.set_header("Content-Type", "application/json")
                self.finish(await gate._forward(body))

        sockets = bind_sockets(0, "127.0.0.1", family=socket.AF_INET)
        self._server = HTTPServer(web.Application([(r"/.*", Handler)]))
        self._server.add_sockets(sockets)
        return int(sockets[0].getsockname()[1])

    async def _forward(self, body: bytes) -> bytes:
        response = await AsyncHTTPClient().fetch(
            self.upstream, method="POST", body=body, raise_error=False, request_timeout=30,
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        return bytes(response.body or b"")

    def hold(self) -> None:
        """Hold the next ``sendTransaction`` (only that one)."""
        self.held.clear()
        self.forwarded.clear()
        self.answer = None

        async def arm() -> None:
            self._holding = True

        self._call(arm())

    def release(self, *, forward: bool) -> None:
        """Let the held request go on to the ledger (``forward``) or drop it."""

        async def decide() -> None:
            self._holding = False
            if self._decision is not None and not self._decision.done():
                self._decision.set_result(forward)

        self._call(decide())

    def close(self) -> None:
        if self._loop.is_closed() or not self._thread.is_alive():
            return
        self.release(forward=False)

        async def stop() -> None:
            if self._server is not None:
                self._server.stop()

        self._call(stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@dataclass
class Replica:
    """One ``jupyter io coordinator`` of a cluster; it keeps its port across restarts."""

    name: str
    port: int
    args: list[str]
    data_dir: Path
    proc: subprocess.Popen[str] | None = None
    output: _Output | None = None
    #: When :meth:`kill` sent SIGKILL (monotonic), or None.
    killed_at: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spawn(self) -> None:
        self.killed_at = None
        listen = f"127.0.0.1:{self.port}"
        self.proc, self.output = _spawn(
            ["coordinator", "--listen", listen, "--data-dir", str(self.data_dir), *self.args]
        )

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        assert self.output is not None
        if self.output.wait_line(COORDINATOR_READY, timeout) is None:
            _terminate(self.proc)
            pytest.fail(f"replica {self.name} did not start:\n{self.output.tail()}")

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """``kill -9``: no goodbye to providers, relays, the database or the ledger."""
        assert self.proc is not None and self.alive, f"replica {self.name} is not running"
        self.killed_at = time.monotonic()
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        _terminate(self.proc)

    def status(self) -> dict[str, Any]:
        return get_json(f"{self.url}/api/v1/status")  # type: ignore[no-any-return]

    def tail(self) -> str:
        return self.output.tail() if self.output is not None else ""


@dataclass
class Cluster:
    """A ledger and N replicas on one PostgreSQL database (see the module docstring)."""

    root: Path
    db_url: str
    keypair_path: Path
    ledger: LedgerProcess
    #: Between the replicas and the ledger (their ``--solana-url``).
    gate: LedgerGate
    replicas: list[Replica]
    providers: list[ProviderHost] = field(default_factory=list)

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.replicas]

    @property
    def coordinator_url(self) -> str:
        """Every replica, as clients take them: ``http://a:1,http://b:2,...``."""
        return ",".join(self.urls)

    @property
    def alive(self) -> list[Replica]:
        return [r for r in self.replicas if r.alive]

    def replica_at(self, url: str) -> Replica:
        """The replica whose port ``url`` names (a tunnel or relay URL, say)."""
        port = urlsplit(url).port
        for replica in self.replicas:
            if replica.port == port:
                return replica
        raise AssertionError(f"{url} names no replica of {self.urls}")

    def heal(self) -> None:
        """Start every replica that is not running (killed by a test), on its port."""
        dead = [r for r in self.replicas if not r.alive]
        for replica in dead:
            replica.spawn()
        for replica in dead:
            replica.wait_ready()

    def stop(self) -> None:
        for host in self.providers:
            with contextlib.suppress(Exception):
                stop_provider_host(host)
        self.providers.clear()
        for replica in self.replicas:
            replica.stop()
        self.gate.close()
        self.ledger.stop()

    # -- providers --------------------------------------------------------------------------

    def start_provider(
        self, tmp: Path, *args: str, public: bool = False, coordinator: str | None = None
    ) -> ProviderHost:
        """A provider host (``python -m provider_host``) given ``coordinator`` (default: every
        replica's URL); ``public``: clients reach it directly, else through a relay. Returns
        once a replica lists its offers."""
        extra = [*PROVIDER_ARGS, "--coordinator", coordinator or self.coordinator_url, *args]
        listen = "127.0.0.1:0"
        if public:
            listen = f"127.0.0.1:{free_port()}"
            extra += ["--public-url", f"ws://{listen}/tunnel"]
        host = start_provider_host(tmp, extra, listen)
        self.providers.append(host)
        try:
            self.wait_offered(host.pubkey)
        except TimeoutError as exc:
            pytest.fail(f"{exc}\nprovider:\n{host.stderr()}")
        return host

    def wait_offered(self, pubkey: str, timeout: float = 30.0) -> None:
        """Poll the live replicas' offers (no event to await across processes) until every
        one lists ``pubkey``: the replica it linked to at once, the others once their change
        feed brought it (a lease asked of a replica before then is rightly refused)."""
        deadline = time.monotonic() + timeout
        while True:
            missing = []
            for replica in self.alive:
                rows: list[dict[str, Any]] = []
                with contextlib.suppress(OSError):
                    rows = get_json(f"{replica.url}/api/v1/offers")["providers"]
                if not any(row["provider"] == pubkey for row in rows):
                    missing.append(replica)
            if not missing:
                return
            if time.monotonic() > deadline:
                names = ", ".join(replica.name for replica in missing)
                raise TimeoutError(f"provider {pubkey} not offered by {names} in {timeout} s")
            time.sleep(0.05)

    def stop_provider(self, host: ProviderHost) -> None:
        with contextlib.suppress(ValueError):
            self.providers.remove(host)
        stop_provider_host(host)

    # -- the database -----------------------------------------------------------------------

    async def query(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        """Rows of one read on the cluster's database (asyncpg, a connection of its own)."""
        import asyncpg

        conn = await asyncpg.connect(self.dsn, timeout=10)
        try:
            return [dict(row) for row in await conn.fetch(sql, *args, timeout=10)]
        finally:
            await conn.close()

    @property
    def dsn(self) -> str:
        return (
            make_url(self.db_url).set(drivername="postgresql").render_as_string(hide_password=False)
        )

    async def replica_named(self, replica_id: str) -> Replica:
        """The replica whose id (``replicas.id``, as in ``settlements.claimed_by``) this is."""
        rows = await self.query("SELECT url FROM replicas WHERE id = $1", replica_id)
        assert rows, f"no replica {replica_id!r} in the database"
        return self.replica_at(rows[0]["url"])

    async def link_holder(self, pubkey: str) -> Replica | None:
        """The live replica holding ``pubkey``'s provider link, by the database's word
        (``providers.replica_id`` → ``replicas.url``), or None."""
        rows = await self.query(
            "SELECT r.url FROM providers p JOIN replicas r ON r.id = p.replica_id "
            "WHERE p.pubkey = $1",
            pubkey,
        )
        if not rows:
            return None
        replica = self.replica_at(rows[0]["url"])
        return replica if replica.alive else None

    async def wait_link_holder(
        self, pubkey: str, timeout: float, *, other_than: Replica | None = None
    ) -> Replica:
        """Poll until a live replica (not ``other_than``) holds ``pubkey``'s link."""
        deadline = time.monotonic() + timeout
        while True:
            holder = await self.link_holder(pubkey)
            if holder is not None and holder is not other_than:
                return holder
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"provider {pubkey} linked to no live replica "
                    f"{'but ' + other_than.name + ' ' if other_than else ''}within {timeout} s "
                    f"(database says {holder.name if holder else None})"
                )
            await asyncio.sleep(0.05)

    # -- users ------------------------------------------------------------------------------

    def user(self, tmp: Path) -> tuple[Keypair, Path]:
        """A fresh user keypair and its file (fund it with :meth:`LedgerProcess.airdrop`)."""
        key = Keypair()
        return key, write_keypair(key, tmp / f"user-{key.pubkey()}.json")

    def arbiter(self) -> Pubkey:
        """The marketplace's arbiter (every replica's, one keypair)."""
        info = get_json(f"{self.alive[0].url}/api/v1/info")
        return Pubkey.from_string(info["arbiter"])


def start_cluster(root: Path, server: PostgresServer, n: int = REPLICAS) -> Cluster:
    """A ledger and ``n`` replicas on a fresh database of ``server`` (started at once)."""
    database = f"replicas_{uuid.uuid4().hex[:12]}"
    server.execute(f'CREATE DATABASE "{database}"')
    db_url = server.url_for(database)
    keypair_path = write_keypair(Keypair(), root / "coordinator-keypair.json")
    ledger = start_ledger(root / "ledger")
    gate = LedgerGate(ledger.url)
    args = [
        "--db", db_url, "--keypair", str(keypair_path), "--solana-url", gate.url,
        *REPLICA_ARGS,
    ]  # fmt: skip
    replicas = [Replica(f"r{i}", free_port(), args, root / f"replica{i}") for i in range(n)]
    cluster = Cluster(root, db_url, keypair_path, ledger, gate, replicas)
    try:
        # One first, so the schema's migration is not raced three times over; then the rest.
        replicas[0].spawn()
        replicas[0].wait_ready()
        cluster.heal()
    except BaseException:
        cluster.stop()
        raise
    return cluster


#: The clusters this session started, stopped once the last test of this directory ran.
_RUNNING: list[Cluster] = []
_HERE = Path(__file__).resolve().parent


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """The session's cluster serves this directory's tests only: stop its processes when
    the next test is elsewhere, rather than keep three coordinators busy all session."""
    if nextitem is not None and _HERE in Path(nextitem.path).resolve().parents:
        return
    while _RUNNING:
        _RUNNING.pop().stop()


class _Clusters:
    """The session's clusters: one runs at a time, started when a test asks for it."""

    def __init__(self, tmp: pytest.TempPathFactory, server: PostgresServer) -> None:
        self.tmp = tmp
        self.server = server
        self.started: list[Cluster] = []

    def running(self) -> Cluster:
        if not _RUNNING:  # none yet, or stopped after the directory's last test so far
            cluster = start_cluster(self.tmp.mktemp("replicas"), self.server)
            self.started.append(cluster)
            _RUNNING.append(cluster)
        return _RUNNING[-1]

    def close(self) -> None:
        for cluster in self.started:
            cluster.stop()
            database = make_url(cluster.db_url).database
            with contextlib.suppress(Exception):
                self.server.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


@pytest.fixture(scope="session")
def replica_clusters(
    tmp_path_factory: pytest.TempPathFactory, postgres_server: PostgresServer
) -> Iterator[_Clusters]:
    """The session's clusters (use ``cluster``)."""
    clusters = _Clusters(tmp_path_factory, postgres_server)
    try:
        yield clusters
    finally:
        clusters.close()


@pytest.fixture
def cluster(replica_clusters: _Clusters) -> Iterator[Cluster]:
    """The running cluster with every replica up (one is started for this directory's
    tests, stopped after its last); the test's providers are stopped after it."""
    running = replica_clusters.running()
    running.heal()
    before = list(running.providers)
    yield running
    for host in [h for h in running.providers if h not in before]:
        with contextlib.suppress(Exception):
            running.stop_provider(host)


@pytest.fixture
def ledger_process(tmp_path: Path) -> Iterator[LedgerProcess]:
    """A ``jupyter io ledger`` of the test's own, stopped after it."""
    ledger = start_ledger(tmp_path / "ledger")
    try:
        yield ledger
    finally:
        ledger.stop()


@pytest.fixture
def kernelspecs(jupyter_env: Path) -> KernelSpecs:
    """io-remote kernelspecs on the JUPYTER_PATH of an isolated Jupyter environment."""
    return KernelSpecs(jupyter_env / "share" / "jupyter")


@pytest.fixture
async def kernels() -> AsyncIterator[Callable[[str], AsyncKernelManager]]:
    """Kernel managers; teardown shuts down what is still running (ends its lease)."""
    made: list[AsyncKernelManager] = []

    def make(name: str) -> AsyncKernelManager:
        km = AsyncKernelManager(kernel_name=name)
        made.append(km)
        return km

    yield make
    for km in made:
        with contextlib.suppress(Exception):
            if km.has_kernel:
                await asyncio.wait_for(km.shutdown_kernel(now=True), 30)


def provider_connections(host: ProviderHost) -> set[int]:
    """Remote ports of the provider process's established TCP connections."""
    with contextlib.suppress(psutil.NoSuchProcess):
        return {
            c.raddr.port
            for c in psutil.Process(host.proc.pid).net_connections(kind="tcp")
            if c.status == psutil.CONN_ESTABLISHED and c.raddr
        }
    return set()
