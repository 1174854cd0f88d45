"""Fixtures for the coordinator's tests: a database URL on SQLite and on a real PostgreSQL,
and, for the service tests, running coordinators (``start_coordinator``, ``coordinator``),
a signed user client (``user_client``) and :class:`FakeProvider`, a provider's side of the
link over a real websocket.

``store_url`` is parametrized: each test that takes it runs once on a fresh SQLite file and
once on a fresh PostgreSQL database. The PostgreSQL server is, in order of preference:

* the one ``JUPYTER_IO_TEST_POSTGRES_URL`` points at (a role allowed to CREATE DATABASE);
* a throwaway cluster started once per test session from the Debian ``postgresql`` package's
  binaries (``/usr/lib/postgresql/*/bin``), in a temporary directory, listening on
  127.0.0.1 only, trust authentication, stopped and deleted at the end;
* otherwise the PostgreSQL cases are skipped, except when the ``CI`` environment variable is
  set: CI must really run them, so there they fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from solders.keypair import Keypair
from solders.pubkey import Pubkey
from sqlalchemy.engine import make_url
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from jupyter_io.coordinator.config import CoordinatorConfig
from jupyter_io.coordinator.server import CoordinatorServer
from jupyter_io.coordinator_client import CoordinatorClient
from jupyter_io.gpu_challenge import GpuIdentity
from jupyter_io.provider_link import GpuChallenge, GpuReveal, LinkMessage, parse_message
from jupyter_io.signing import sign_provider_hello, sign_request, sign_usage
from provider_host.challenge import CPU_MAX_N, ChallengeDevice, ChallengeResponder

POSTGRES_URL_ENV = "JUPYTER_IO_TEST_POSTGRES_URL"
BACKENDS = ("sqlite", "postgresql")


@dataclass(frozen=True)
class PostgresServer:
    """A PostgreSQL server the tests may create databases on."""

    #: libpq-style URL of a maintenance database (``postgresql://user@host:port/postgres``).
    admin_url: str

    def url_for(self, database: str) -> str:
        """An asyncpg URL for ``database`` on this server."""
        url = make_url(self.admin_url).set(drivername="postgresql+asyncpg", database=database)
        return url.render_as_string(hide_password=False)

    def execute(self, sql: str) -> None:
        """Run one statement on the maintenance database (outside any event loop)."""
        import asyncpg

        dsn = make_url(self.admin_url).set(drivername="postgresql")

        async def run() -> None:
            conn = await asyncpg.connect(dsn.render_as_string(hide_password=False), timeout=10)
            try:
                await conn.execute(sql, timeout=30)
            finally:
                await conn.close()

        # A thread of its own: the test's event loop may be running in this one.
        with ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, run()).result(timeout=60)


def _postgres_bindir() -> Path | None:
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda path: int(path.parent.parent.name) if path.parent.parent.name.isdigit() else 0,
    )
    return candidates[-1].parent if candidates else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def _throwaway_cluster(bindir: Path) -> Iterator[str]:
    """initdb + pg_ctl start in a temporary directory; yields the admin URL."""
    root = Path(tempfile.mkdtemp(prefix="jupyter-io-pg-"))
    data, socket_dir, log = root / "data", root / "socket", root / "server.log"
    socket_dir.mkdir()
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        postgres = pwd.getpwnam("postgres")
        for path in (root, socket_dir):
            os.chown(path, postgres.pw_uid, postgres.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]

    def run(*argv: str) -> None:
        result = subprocess.run(
            [*as_user, *argv], capture_output=True, text=True, timeout=120, check=False
        )
        if result.returncode != 0:
            server_log = log.read_text() if log.exists() else ""
            raise RuntimeError(f"{argv[0]} failed:\n{result.stdout}{result.stderr}{server_log}")

    try:
        run(
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--no-sync",
        )
        for attempt in range(3):
            port = _free_port()
            # fsync off: the tests exercise PostgreSQL's locking and SQL, not crash recovery.
            options = (
                f"-c listen_addresses=127.0.0.1 -p {port} -k {socket_dir} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                "-c max_connections=200"
            )
            try:
                run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options,
                    "-w", "-t", "60", "start")  # fmt: skip
                break
            except RuntimeError:
                if attempt == 2:
                    raise
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        if (data / "postmaster.pid").exists():
            with contextlib.suppress(Exception):
                run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The session's PostgreSQL server (see the module docstring)."""
    given = os.environ.get(POSTGRES_URL_ENV)
    if given:
        yield PostgresServer(given)
        return
    bindir = _postgres_bindir()
    if bindir is None:
        message = (
            "PostgreSQL server binaries not found under /usr/lib/postgresql: "
            f"`apt-get install postgresql`, or set {POSTGRES_URL_ENV}"
        )
        if os.environ.get("CI"):
            pytest.fail(message + " (CI must run the PostgreSQL tests)")
        pytest.skip(message)
    with _throwaway_cluster(bindir) as admin_url:
        yield PostgresServer(admin_url)


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL of an empty database: a SQLite file, or a fresh database on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'coordinator.db'}"
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    database = f"test_{uuid.uuid4().hex[:16]}"
    server.execute(f'CREATE DATABASE "{database}"')
    try:
        yield server.url_for(database)
    finally:
        server.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


# --------------------------------------------------------------------------------------------
# A running coordinator, and providers and users that talk to it (added for the service tests)

#: Bound on every wait in the service tests.
WAIT = 15.0
GIB = 1 << 30


def gpu_offer(
    gpu: str = "RTX 4090",
    *,
    count: int = 1,
    price: int = 1_000_000,
    vram_gb: int = 24,
    first_index: int = 0,
    simulated: bool = True,
    benchmark: float | None = None,
) -> dict[str, Any]:
    """One inventory offer group as a provider sends it."""
    return {
        "gpu": gpu,
        "vram_bytes": vram_gb * GIB,
        "count": count,
        "gpu_indices": list(range(first_index, first_index + count)),
        "price_lamports_per_hour": price,
        "simulated": simulated,
        "driver": None,
        "cuda": None,
        "benchmark_tflops": benchmark,
    }


class LinkRefused(Exception):
    """The coordinator refused the hello: its error message and close code."""

    def __init__(self, error: dict[str, Any] | None, code: int | None, reason: str) -> None:
        super().__init__(f"refused: {error} close {code} {reason!r}")
        self.error = error
        self.code = code
        self.reason = reason


class _FakeGpuAnswers(ChallengeResponder):
    """The real responder, computing on the CPU for every offer of a :class:`FakeProvider`;
    for an offer it calls real, NVML and the driver listing name the offered model."""

    def identify(self, index: int) -> tuple[GpuIdentity | None, str | None]:
        name = self.names.get(index, "")
        return GpuIdentity(name, None, None), f"Model: \t {name}\n"

    names: dict[int, str]


class FakeProvider:
    """A provider's side of the link over a real websocket (no kernels): says hello,
    heartbeats, reports sessions and usage, and records what the coordinator sends.

    GPU challenges are answered honestly on the CPU (the real responder of
    :mod:`provider_host.challenge`) and not recorded, unless :attr:`answer_challenges` is
    false; the coordinators of these tests keep them small (``gpu_check_*_n`` = 64).
    """

    def __init__(
        self,
        coordinator_url: str,
        offers: list[dict[str, Any]] | None = None,
        *,
        keypair: Keypair | None = None,
        region: str = "eu-west",
        reachable_url: str | None = None,
        max_kernels: int = 8,
        name: str = "test rig",
        ssl: Any = None,
    ) -> None:
        self.url = coordinator_url.replace("http", "ws", 1) + "/api/v1/providers/connect"
        #: An ``ssl.SSLContext`` trusting the coordinator's certificate (wss://), or None.
        self.ssl = ssl
        self.keypair = keypair or Keypair()
        self.pubkey = str(self.keypair.pubkey())
        self.inventory = {
            "name": name,
            "region": region,
            "reachable_url": reachable_url,
            "max_kernels": max_kernels,
            "offers": offers if offers is not None else [gpu_offer()],
        }
        self.ws: ClientConnection | None = None
        self.welcome: dict[str, Any] | None = None
        self.coordinator_key: str | None = None
        self.messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None
        self._beats: asyncio.Task[None] | None = None
        #: Lease ids the automatic heartbeats list as hosted.
        self.hosted: set[str] = set()
        #: Answer the coordinator's GPU challenges (else they are recorded like the rest).
        self.answer_challenges = True
        self._challenges: _FakeGpuAnswers | None = None
        self._challenges_ws: ClientConnection | None = None

    async def connect(
        self,
        sessions: list[str] | None = None,
        *,
        sign_with: Keypair | None = None,
        heartbeats: bool = True,
    ) -> dict[str, Any]:
        """Open the link and complete the handshake; returns the welcome. Then heartbeat
        twice per interval the welcome names, listing :attr:`hosted`, unless ``heartbeats``
        is false (tests of silence, or of exact heartbeat counts).

        Raises :class:`LinkRefused` when the coordinator answers with an error and closes.
        """
        ws = await connect(self.url, compression=None, open_timeout=WAIT, ssl=self.ssl)
        challenge = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
        assert challenge["type"] == "challenge" and challenge["version"] == 1
        self.coordinator_key = challenge["coordinator"]
        signature = sign_provider_hello(
            sign_with or self.keypair,
            Pubkey.from_string(challenge["coordinator"]),
            bytes.fromhex(challenge["nonce"]),
        )
        await ws.send(
            json.dumps(
                {
                    "type": "hello",
                    "version": 1,
                    "pubkey": self.pubkey,
                    "signature": signature,
                    "inventory": self.inventory,
                    "sessions": sessions or [],
                }
            )
        )
        try:
            answer = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
        except ConnectionClosed as exc:
            raise LinkRefused(None, exc.rcvd.code if exc.rcvd else None, "") from None
        if answer["type"] == "error":
            try:
                await asyncio.wait_for(ws.recv(), WAIT)
            except ConnectionClosed as exc:
                rcvd = exc.rcvd
                raise LinkRefused(
                    answer, rcvd.code if rcvd else None, rcvd.reason if rcvd else ""
                ) from None
            raise AssertionError("the coordinator sent more after an error")
        assert answer["type"] == "welcome", answer
        self.ws = ws
        self.welcome = answer
        self.hosted.update(sessions or ())
        self._reader = asyncio.create_task(self._read(ws))
        if heartbeats:
            self.start_heartbeats(answer["heartbeat_interval"] / 2)
        return answer

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for text in ws:
                message = json.loads(text)
                if self.answer_challenges and message.get("type") in (
                    "gpu_challenge",
                    "gpu_reveal",
                ):
                    self._answer_challenge(ws, text)
                else:
                    await self.messages.put(message)
        except ConnectionClosed:
            pass

    def _answer_challenge(self, ws: ClientConnection, text: str | bytes) -> None:
        message = parse_message(text)
        assert isinstance(message, (GpuChallenge, GpuReveal))
        if self._challenges is None or self._challenges_ws is not ws:
            self._challenges_ws = ws
            devices: dict[int, ChallengeDevice] = {}
            names: dict[int, str] = {}
            for offer in self.inventory["offers"]:
                for index in offer["gpu_indices"]:
                    devices[index] = ChallengeDevice(index, "cpu", offer["simulated"], CPU_MAX_N)
                    names[index] = offer["gpu"]

            def send(answer: LinkMessage) -> None:
                task = asyncio.ensure_future(ws.send(answer.to_json()))
                task.add_done_callback(lambda t: t.cancelled() or t.exception())

            self._challenges = _FakeGpuAnswers(send, device_of=devices.get, busy=lambda _: False)
            self._challenges.names = names
        self._challenges.handle(message)

    async def next_message(self, kind: str | None = None, timeout: float = WAIT) -> dict[str, Any]:
        """The next message from the coordinator (of type ``kind`` if given)."""
        while True:
            message = await asyncio.wait_for(self.messages.get(), timeout)
            if kind is None or message["type"] == kind:
                return message

    async def send(self, body: dict[str, Any]) -> None:
        assert self.ws is not None
        await self.ws.send(json.dumps(body))

    async def heartbeat(self, load: float = 0.0, sessions: list[str] | None = None) -> None:
        await self.send({"type": "heartbeat", "load": load, "sessions": sessions or []})

    def start_heartbeats(self, interval: float) -> None:
        """Heartbeat every ``interval`` seconds until :meth:`stop_heartbeats`."""

        async def beat() -> None:
            with contextlib.suppress(ConnectionClosed):
                while True:
                    await self.heartbeat(sessions=sorted(self.hosted))
                    await asyncio.sleep(interval)

        self.stop_heartbeats()
        self._beats = asyncio.create_task(beat())

    def stop_heartbeats(self) -> None:
        if self._beats is not None:
            self._beats.cancel()
            self._beats = None

    async def session(self, lease: str, state: str) -> None:
        await self.send({"type": "session", "lease": lease, "state": state, "at": time.time()})

    async def usage(
        self, lease: str, seq: int, seconds: int, *, sign_with: Keypair | None = None
    ) -> None:
        fields = {
            "type": "usage",
            "lease": lease,
            "seq": seq,
            "seconds": seconds,
            "gpu_utilisation": 0.5,
            "at": time.time(),
        }
        await self.send(sign_usage(sign_with or self.keypair, fields))

    def relay_headers(self, url: str) -> dict[str, str]:
        """Signed headers for the provider side of the relay at ``url``."""
        parts = urlsplit(url)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        return sign_request(self.keypair, "GET", path)

    async def close(self, code: int = 1000) -> None:
        self.stop_heartbeats()
        if self._challenges is not None:
            await self._challenges.close()
            self._challenges = None
        if self.ws is not None:
            await self.ws.close(code)
            self.ws = None
        if self._reader is not None:
            await asyncio.wait_for(self._reader, WAIT)
            self._reader = None

    def drop(self) -> None:
        """Cut the TCP connection without a close frame (a crash or a network cut)."""
        self.stop_heartbeats()
        if self.ws is not None:
            self.ws.transport.abort()
            self.ws = None


Starter = Callable[..., Awaitable[CoordinatorServer]]


@pytest.fixture
async def start_coordinator(tmp_path: Path) -> AsyncIterator[Starter]:
    """Start coordinators in this process: ``await start_coordinator(db=URL, **traits)``.

    Defaults: loopback on a free port, a SQLite file in ``tmp_path``, heartbeats every 0.5 s
    (3 misses: lost after 1.5 s of silence). Every coordinator started is shut down at the end
    of the test.
    """
    servers: list[CoordinatorServer] = []

    async def start(**traits: Any) -> CoordinatorServer:
        traits.setdefault("listen", "127.0.0.1:0")
        traits.setdefault("data_dir", str(tmp_path / "coordinator"))
        traits.setdefault("heartbeat_interval", 0.5)
        traits.setdefault("heartbeat_misses", 3)
        traits.setdefault("flush_interval", 0.2)
        traits.setdefault("payments", "free")  # test_billing.py is about payments
        # GPU challenges (on by default) of the smallest size: cheap for every link.
        traits.setdefault("gpu_check_cpu_n", 64)
        traits.setdefault("gpu_check_max_n", 64)
        config = CoordinatorConfig(**traits)
        server = CoordinatorServer(config, stdout=_Discard())
        await server.startup()
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for server in reversed(servers):
            if server.store is not None:
                await server.shutdown()


class _Discard:
    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


@pytest.fixture
async def coordinator(start_coordinator: Starter) -> CoordinatorServer:
    """One coordinator on a SQLite file."""
    return await start_coordinator()


@pytest.fixture
async def user_client(coordinator: CoordinatorServer) -> AsyncIterator[CoordinatorClient]:
    """A signed client of ``coordinator`` with a fresh user keypair."""
    client = CoordinatorClient(coordinator.url, Keypair(), timeout=WAIT)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
async def providers() -> AsyncIterator[list[FakeProvider]]:
    """Append FakeProviders here; they are closed at the end of the test."""
    made: list[FakeProvider] = []
    try:
        yield made
    finally:
        for provider in made:
            with contextlib.suppress(Exception):
                await provider.close()
