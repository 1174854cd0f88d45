"""Fixtures for the provider host tests: a real host in-process and a raw tunnel client.

:class:`TunnelClient` speaks the tunnel protocol directly (``jupyter_io.protocol.Tunnel`` over a
``websockets`` client) and signs Jupyter messages with ``jupyter_client.session.Session``, so
tests execute code through the host without the provisioner; give it a lease token for a host
that joined a coordinator. :func:`start_coordinator` runs a real marketplace coordinator
in-process on loopback with a SQLite file, and :func:`make_market_host` provider hosts linked
to it. Nothing is mocked: kernels are real ipykernel processes, sockets are real.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.session import Session
from solders.keypair import Keypair
from solders.pubkey import Pubkey
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from jupyter_io.coordinator.config import CoordinatorConfig
from jupyter_io.coordinator.server import CoordinatorServer
from jupyter_io.coordinator_client import CoordinatorClient
from jupyter_io.identity import sign_challenge, write_keypair
from jupyter_io.protocol import (
    SUBPROTOCOL,
    Channel,
    Frame,
    FrameKind,
    Tunnel,
    decode_frame,
    encode_control,
)
from provider_host.config import ProviderConfig
from provider_host.server import ProviderServer

CLIENT_ID = b"test-client"
DEFAULT_TIMEOUT = 20.0


class Refused(Exception):
    """The host refused the handshake: ERROR body (if any) and the close code/reason."""

    def __init__(self, error: dict[str, Any] | None, code: int | None, reason: str) -> None:
        super().__init__(f"refused: {error} close {code} {reason!r}")
        self.error = error
        self.code = code
        self.reason = reason


class TunnelClient:
    """A minimal client end of the tunnel, for tests."""

    Refused = Refused

    def __init__(
        self, url: str, keypair: Keypair, *, token: str | None = None, **connect_kwargs: Any
    ) -> None:
        self.url = url
        self.keypair = keypair
        #: The coordinator's lease token, sent in every HELLO (None: no token).
        self.token = token
        self.connect_kwargs = connect_kwargs
        self.tunnel = Tunnel()
        self.session_id: str | None = None
        self.ws: ClientConnection | None = None
        self.key = os.urandom(16).hex()
        self.jsession = Session(key=self.key.encode(), username="test")
        #: Every raw frame received on the current connection (before dedup), for seq checks.
        self.raw: list[Frame] = []
        self._inbox: list[Frame] = []
        #: What broke the reader (a protocol violation by the host), if anything.
        self.error: Exception | None = None
        self._decoded: dict[int, dict[str, Any]] = {}
        self._arrived = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._flusher: asyncio.Task[None] | None = None

    # -- connection ------------------------------------------------------------------------

    async def open_ws(self) -> ClientConnection:
        ws = await connect(
            self.url,
            subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
            compression=None,
            open_timeout=DEFAULT_TIMEOUT,
            **self.connect_kwargs,
        )
        return ws

    async def connect(
        self,
        *,
        resume: bool = False,
        hello: dict[str, Any] | None = None,
        signer: Keypair | None = None,
    ) -> dict[str, Any]:
        """Handshake; return the WELCOME body or raise :class:`Refused`."""
        ws = await self.open_ws()
        challenge = decode_frame(await asyncio.wait_for(ws.recv(), DEFAULT_TIMEOUT))
        assert challenge.kind is FrameKind.CHALLENGE
        nonce = bytes.fromhex(challenge.body["nonce"])
        host = Pubkey.from_string(challenge.body["host"])
        signature = sign_challenge(signer or self.keypair, nonce, host)
        body = {
            "version": 1,
            "pubkey": str(self.keypair.pubkey()),
            "signature": str(signature),
            "session": self.session_id if resume else None,
            "received": self.tunnel.received if resume else 0,
            "token": self.token,
        }
        body.update(hello or {})
        await ws.send(encode_control(FrameKind.HELLO, body))
        try:
            answer = decode_frame(await asyncio.wait_for(ws.recv(), DEFAULT_TIMEOUT))
        except ConnectionClosed as exc:
            rcvd = exc.rcvd
            raise Refused(None, rcvd.code if rcvd else None, rcvd.reason if rcvd else "") from None
        if answer.kind is FrameKind.ERROR:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(ws.wait_closed(), DEFAULT_TIMEOUT)
            raise Refused(answer.body, ws.close_code, ws.close_reason or "")
        assert answer.kind is FrameKind.WELCOME, answer
        welcome = answer.body
        self.session_id = welcome["session"]
        self.ws = ws
        self.raw = []
        # Replay what the host has not received (the base Tunnel keeps our unacked frames).
        for frame in self.tunnel.replay(welcome["received"]):
            await ws.send(frame)
        self._reader = asyncio.create_task(self._read(ws))
        self._flusher = asyncio.create_task(self._flush(ws))
        return welcome

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for message in ws:
                assert isinstance(message, bytes)
                self.raw.append(decode_frame(message))
                frame = self.tunnel.receive(message)
                if frame is not None:
                    if frame.kind is FrameKind.DATA and frame.channel is not Channel.HB:
                        # Decode (and check the signature of) every message exactly once.
                        self._decoded[id(frame)] = self._decode(frame)
                    self._inbox.append(frame)
                    self._arrived.set()
        except ConnectionClosed:
            pass
        except Exception as exc:  # e.g. a sequence gap: fail the waiting test at once
            self.error = exc
        self._arrived.set()

    async def _flush(self, ws: ClientConnection) -> None:
        while True:
            await asyncio.sleep(0.05)
            if self.tunnel.ack_pending:
                try:
                    await ws.send(self.tunnel.ack_frame())
                except ConnectionClosed:
                    return

    async def disconnect(self) -> None:
        """Close the websocket (the session stays on the host for a resume)."""
        ws = self.ws
        self.ws = None
        for task in (self._reader, self._flusher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if ws is not None:
            await ws.close()

    async def wait_closed(self, timeout: float = DEFAULT_TIMEOUT) -> tuple[int | None, str]:
        """Wait until the host closes the websocket; return (code, reason)."""
        assert self.ws is not None
        await asyncio.wait_for(self.ws.wait_closed(), timeout)
        return self.ws.close_code, self.ws.close_reason or ""

    # -- frames ----------------------------------------------------------------------------

    async def send_control(self, kind: FrameKind, body: dict[str, Any] | None = None) -> None:
        frame = self.tunnel.send_control(kind, body)
        if self.ws is not None:
            await self.ws.send(frame)

    async def send_data(self, channel: Channel, parts: list[bytes]) -> None:
        frame = self.tunnel.send_data(channel, parts)
        if self.ws is not None:
            await self.ws.send(frame)

    async def next_frame(
        self, match: Callable[[Frame], bool], timeout: float = DEFAULT_TIMEOUT
    ) -> Frame:
        """The first received frame (kept in order) for which ``match`` is true; removes it."""
        deadline = time.monotonic() + timeout
        while True:
            for i, frame in enumerate(self._inbox):
                if match(frame):
                    del self._inbox[i]
                    return frame
            if self.error is not None:
                raise AssertionError(f"the host broke the protocol: {self.error}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise asyncio.TimeoutError(f"no matching frame within {timeout} s")
            self._arrived.clear()
            await asyncio.wait_for(self._arrived.wait(), remaining)

    async def control(self, kind: FrameKind, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        """Body of the next control frame of ``kind``."""
        frame = await self.next_frame(lambda f: f.kind is kind, timeout)
        return frame.body

    # -- kernel ----------------------------------------------------------------------------

    async def launch(self, env: dict[str, str] | None = None) -> dict[str, Any]:
        """LAUNCH and return the STARTED body."""
        await self.send_control(
            FrameKind.LAUNCH,
            {"key": self.key, "signature_scheme": "hmac-sha256", "env": env or {}},
        )
        frame = await self.next_frame(
            lambda f: (
                f.kind is FrameKind.STARTED or (f.kind is FrameKind.EXITED and "error" in f.body)
            )
        )
        assert frame.kind is FrameKind.STARTED, frame.body
        return frame.body

    async def request(self, channel: Channel, msg_type: str, content: dict[str, Any]) -> str:
        """Send a signed Jupyter request; return its msg_id."""
        msg = self.jsession.msg(msg_type, content)
        parts = self.jsession.serialize(msg, ident=CLIENT_ID)
        await self.send_data(channel, parts)
        return str(msg["header"]["msg_id"])

    def decode(self, frame: Frame) -> dict[str, Any]:
        """The Jupyter message a DATA frame carries (decoded on arrival)."""
        return self._decoded[id(frame)]

    def _decode(self, frame: Frame) -> dict[str, Any]:
        idents, msg_list = self.jsession.feed_identities(list(frame.parts))
        msg = self.jsession.deserialize(msg_list)
        msg["idents"] = idents
        return msg

    async def message(
        self,
        channel: Channel,
        match: Callable[[dict[str, Any]], bool] = lambda m: True,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> dict[str, Any]:
        """The next Jupyter message on ``channel`` for which ``match`` is true."""

        def matches(frame: Frame) -> bool:
            return (
                frame.kind is FrameKind.DATA
                and frame.channel is channel
                and match(self.decode(frame))
            )

        frame = await self.next_frame(matches, timeout)
        return self._decoded.pop(id(frame))

    async def wait_ready(self, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        """kernel_info until the kernel answers on shell (it may still be starting)."""
        msg_id = await self.request(Channel.SHELL, "kernel_info_request", {})
        return await self.message(
            Channel.SHELL, lambda m: m["parent_header"].get("msg_id") == msg_id, timeout
        )

    async def execute(
        self,
        code: str,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        wait: bool = True,
        stop_on_error: bool = True,
    ) -> tuple[str, dict[str, Any] | None]:
        """Run ``code``; return its msg_id and (when ``wait``) the execute_reply.

        Pass ``stop_on_error=False`` for code expected to fail when more requests follow at
        once: otherwise ipykernel aborts requests that arrive right after the error.
        """
        msg_id = await self.request(
            Channel.SHELL,
            "execute_request",
            {
                "code": code,
                "silent": False,
                "store_history": True,
                "allow_stdin": True,
                "stop_on_error": stop_on_error,
            },
        )
        if not wait:
            return msg_id, None
        reply = await self.message(
            Channel.SHELL, lambda m: m["parent_header"].get("msg_id") == msg_id, timeout
        )
        return msg_id, reply

    async def outputs(self, msg_id: str, timeout: float = DEFAULT_TIMEOUT) -> list[dict[str, Any]]:
        """iopub messages for ``msg_id`` up to its ``status: idle`` (status messages left out)."""
        collected = []
        while True:
            msg = await self.message(
                Channel.IOPUB, lambda m: m["parent_header"].get("msg_id") == msg_id, timeout
            )
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                return collected
            if msg["msg_type"] != "status":
                collected.append(msg)

    async def evaluate(self, expr: str, timeout: float = DEFAULT_TIMEOUT) -> Any:
        """The value of a Python expression in the kernel (via JSON on stdout)."""
        msg_id, reply = await self.execute(f"import json as _j; print(_j.dumps({expr}))", timeout)
        assert reply is not None and reply["content"]["status"] == "ok", reply
        text = "".join(
            m["content"]["text"]
            for m in await self.outputs(msg_id, timeout)
            if m["msg_type"] == "stream"
        )
        return json.loads(text)


async def wait_until(
    predicate: Callable[[], bool], timeout: float = DEFAULT_TIMEOUT, what: str = "condition"
) -> None:
    """Poll ``predicate`` (for state with no event to await, e.g. a process being gone)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def sandbox_processes(pid: int) -> list[tuple[int, list[str]]]:
    """Host pid and argv of every live descendant of ``pid`` (a kernel's sandbox, whose
    processes see pids of their own namespace)."""
    parents: dict[int, int] = {}
    argvs: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        if fields[0] != "Z":
            parents[int(entry)] = int(fields[1])
            argvs[int(entry)] = argv
    found: list[tuple[int, list[str]]] = []
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent:
                found.append((child, argvs[child]))
                frontier.append(child)
    return found


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def client_keypair() -> Keypair:
    return Keypair()


@pytest.fixture
def host_keypair_file(tmp_path: Path) -> Path:
    return write_keypair(Keypair(), tmp_path / "host-id.json")


@pytest.fixture
def workspace_root(tmp_path: Path) -> Path:
    return tmp_path / "workspaces"


HostFactory = Callable[..., Awaitable[ProviderServer]]


@pytest.fixture
async def make_host(
    client_keypair: Keypair, host_keypair_file: Path, workspace_root: Path
) -> AsyncIterator[HostFactory]:
    """Start in-process provider hosts (shut down at the end of the test)."""
    servers: list[ProviderServer] = []

    async def make(**overrides: Any) -> ProviderServer:
        settings: dict[str, Any] = {
            "listen": "127.0.0.1:0",
            "allow": [str(client_keypair.pubkey())],
            "keypair_path": str(host_keypair_file),
            "workspace_root": str(workspace_root),
            "grace_period": 60.0,
        }
        settings.update(overrides)
        server = ProviderServer(ProviderConfig(**settings), stdout=io.StringIO())
        await server.startup()
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.shutdown()


@pytest.fixture
async def host(make_host: HostFactory) -> ProviderServer:
    return await make_host()


ClientFactory = Callable[..., TunnelClient]


@pytest.fixture
async def make_client(client_keypair: Keypair) -> AsyncIterator[ClientFactory]:
    clients: list[TunnelClient] = []

    def make(server: ProviderServer, keypair: Keypair | None = None, **kw: Any) -> TunnelClient:
        client = TunnelClient(server.url, keypair or client_keypair, **kw)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.disconnect()


@pytest.fixture
async def client(host: ProviderServer, make_client: ClientFactory) -> TunnelClient:
    return make_client(host)


# -- the marketplace -----------------------------------------------------------------------

CoordinatorStarter = Callable[..., Awaitable[CoordinatorServer]]


def free_port() -> int:
    """A TCP port free on loopback now (for a host whose public URL must be known up front)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def start_coordinator(tmp_path: Path) -> AsyncIterator[CoordinatorStarter]:
    """Start coordinators in this process: ``await start_coordinator(**traits)``.

    Loopback on a free port, a SQLite file in ``tmp_path``, heartbeats every 0.5 s (lost after
    3 missed: 1.5 s). Every coordinator started is shut down at the end of the test.
    """
    servers: list[CoordinatorServer] = []

    async def start(**traits: Any) -> CoordinatorServer:
        traits.setdefault("listen", "127.0.0.1:0")
        traits.setdefault("data_dir", str(tmp_path / "coordinator"))
        traits.setdefault("heartbeat_interval", 0.5)
        traits.setdefault("heartbeat_misses", 3)
        traits.setdefault("flush_interval", 0.2)
        traits.setdefault("payments", "free")  # not about payments (test_settlement.py is)
        # GPU challenges (on by default) of the smallest size: cheap for every link.
        traits.setdefault("gpu_check_cpu_n", 64)
        traits.setdefault("gpu_check_max_n", 64)
        server = CoordinatorServer(CoordinatorConfig(**traits), stdout=io.StringIO())
        await server.startup()
        servers.append(server)
        return server

    yield start
    for server in reversed(servers):
        if server.store is not None:
            await server.shutdown()


@pytest.fixture
async def coordinator(start_coordinator: CoordinatorStarter) -> CoordinatorServer:
    """One coordinator on a SQLite file."""
    return await start_coordinator()


@pytest.fixture
async def market_host(
    make_host: HostFactory, coordinator: CoordinatorServer, tmp_path: Path
) -> AsyncIterator[HostFactory]:
    """Start provider hosts linked to ``coordinator``; returns once each is welcomed.

    Each gets its own keypair; no benchmark (tests time it apart), usage every 0.2 s.
    ``direct=True`` gives the host a public URL (clients connect to it directly), else clients
    go through the relay. Other keyword arguments are ProviderConfig traits.
    """
    yield market_host_of(make_host, coordinator, tmp_path)


def market_host_of(
    make_host: HostFactory, coordinator: CoordinatorServer, tmp_path: Path
) -> HostFactory:
    """The ``market_host`` factory for any coordinator (see that fixture)."""
    count = 0

    async def make(*, direct: bool = False, **traits: Any) -> ProviderServer:
        nonlocal count
        count += 1
        traits.setdefault("coordinator_url", coordinator.url)
        traits.setdefault("benchmark", False)
        traits.setdefault("usage_interval", 0.2)
        traits.setdefault("allow", [])
        traits.setdefault(
            "keypair_path", str(write_keypair(Keypair(), tmp_path / f"market-host-{count}.json"))
        )
        if direct:
            port = free_port()
            traits.setdefault("listen", f"127.0.0.1:{port}")
            traits.setdefault("public_url", f"ws://127.0.0.1:{port}/tunnel")
        server = await make_host(**traits)
        assert server.coordinator_link is not None
        await asyncio.wait_for(server.coordinator_link.wait_linked(), DEFAULT_TIMEOUT)
        return server

    return make


UserFactory = Callable[[], CoordinatorClient]


@pytest.fixture
async def make_user(coordinator: CoordinatorServer) -> AsyncIterator[UserFactory]:
    """Signed REST clients of ``coordinator``, each with a fresh user keypair."""
    clients: list[CoordinatorClient] = []

    def make() -> CoordinatorClient:
        client = CoordinatorClient(coordinator.url, Keypair(), timeout=DEFAULT_TIMEOUT)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()
