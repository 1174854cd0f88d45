"""The coordinator as a daemon: ``jupyter io coordinator`` as a real process (ready line, its
own keypair, signals), TLS, configuration errors, a restart on the same database (SQLite and
PostgreSQL) that keeps every lease, and two coordinator processes sharing one database."""

from __future__ import annotations

import asyncio
import io
import os
import re
import signal
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from solders.keypair import Keypair
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from jupyter_io.coordinator.config import CoordinatorConfig
from jupyter_io.coordinator.models import LeaseState, ProviderStatus
from jupyter_io.coordinator.server import CoordinatorServer
from jupyter_io.coordinator_client import CoordinatorClient
from jupyter_io.errors import AuthError, ConfigError, LeaseError
from jupyter_io.identity import load_keypair
from jupyter_io.protocol import FrameKind, encode_control

from .conftest import WAIT, FakeProvider, Starter, gpu_offer

pytestmark = pytest.mark.timeout(90)

JUPYTER = str(Path(sys.executable).with_name("jupyter"))
READY = re.compile(r"^jupyter-io coordinator listening on (http://127\.0\.0\.1:(\d+))$")
KEY = re.compile(r"^jupyter-io coordinator key (\w+)$")


class Process:
    """``jupyter io coordinator`` running as a child process."""

    def __init__(self, proc: asyncio.subprocess.Process, lines: list[str]) -> None:
        self.proc = proc
        self.lines = lines
        ready = READY.match(lines[-1])
        assert ready is not None, lines
        self.url = ready.group(1)
        keys = [m.group(1) for line in lines if (m := KEY.match(line))]
        assert len(keys) == 1, lines
        self.key = keys[0]

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        return await asyncio.wait_for(self.proc.wait(), 30)


@pytest.fixture
async def start_process() -> AsyncIterator[Callable[..., Any]]:
    """Start ``jupyter io coordinator ARGS`` and wait for its ready line; killed at the end."""
    started: list[Process] = []

    async def start(*args: str) -> Process:
        proc = await asyncio.create_subprocess_exec(
            JUPYTER, "io", "coordinator", "--listen", "127.0.0.1:0", "--payments", "free", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None
        lines: list[str] = []
        while not lines or not READY.match(lines[-1]):
            raw = await asyncio.wait_for(proc.stdout.readline(), 60)
            if not raw:
                err = await proc.stderr.read() if proc.stderr else b""
                raise AssertionError(f"coordinator exited before it was ready: {lines} {err!r}")
            lines.append(raw.decode().rstrip("\n"))
        process = Process(proc, lines)
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in started:
            if process.proc.returncode is None:
                process.proc.kill()
                await process.proc.wait()


async def wait_until(check: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    """Poll ``check`` (an async callable) until it returns something truthy: for state in
    another process, where there is no event to wait on."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


# ---- the process --------------------------------------------------------------------------


async def test_the_cli_prints_its_ready_line_keeps_its_own_key_and_stops_on_signals(
    tmp_path: Path, start_process: Callable[..., Any]
) -> None:
    data_dir = tmp_path / "coordinator"
    first = await start_process("--data-dir", str(data_dir))
    keyfile = data_dir / "coordinator-keypair.json"
    assert stat.S_IMODE(keyfile.stat().st_mode) == 0o600
    assert str(load_keypair(keyfile).pubkey()) == first.key
    assert (data_dir / "coordinator.db").is_file()
    client = CoordinatorClient(first.url)
    try:
        assert (await client.info())["coordinator"] == first.key
    finally:
        client.close()
    assert await first.stop(signal.SIGTERM) == 0
    err = await first.proc.stderr.read()  # type: ignore[union-attr]
    assert b"Traceback" not in err

    second = await start_process("--data-dir", str(data_dir))
    assert second.key == first.key  # the same identity across restarts
    assert await second.stop(signal.SIGINT) == 0


def test_help_lists_the_coordinator_and_offers_commands() -> None:
    result = subprocess.run(
        [JUPYTER, "io", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0
    assert "\ncoordinator\n" in result.stdout and "\noffers\n" in result.stdout


async def test_serve_captures_signals_and_restores_the_previous_handlers(
    tmp_path: Path,
) -> None:
    def mine(signum: int, frame: object) -> None:
        raise AssertionError("the coordinator should have caught this signal")

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        server = CoordinatorServer(
            CoordinatorConfig(listen="127.0.0.1:0", data_dir=str(tmp_path), payments="free"),
            stdout=io.StringIO(),
        )
        serving = asyncio.create_task(server.serve())
        await asyncio.wait_for(server.started.wait(), WAIT)
        assert signal.getsignal(signal.SIGTERM) not in (mine, previous)  # its own handler
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(serving, WAIT)
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


async def test_tls_serves_https_and_wss_and_relays_over_it(
    certificate: tuple[Path, Path], start_coordinator: Starter, providers: list[FakeProvider]
) -> None:
    cert, key = certificate
    server = await start_coordinator(certfile=str(cert), keyfile=str(key))
    assert server.url.startswith("https://127.0.0.1:")
    context = ssl.create_default_context(cafile=str(cert))
    client = CoordinatorClient(server.url, Keypair(), ca_certs=str(cert), timeout=WAIT)
    try:
        info = await client.info()
        assert info["relay"].startswith("wss://127.0.0.1:")
        provider = FakeProvider(server.url, [gpu_offer()], ssl=context)
        providers.append(provider)
        await provider.connect()
        grant = await client.request_lease("RTX 4090")
        assert grant.tunnel_url.startswith("wss://") and grant.relay
        user_side = await connect(
            grant.tunnel_url, additional_headers=grant.relay_headers(), ssl=context,
            max_size=None, open_timeout=WAIT,
        )  # fmt: skip
        dial = await provider.next_message("dial")
        provider_side = await connect(
            dial["url"], additional_headers=provider.relay_headers(dial["url"]), ssl=context,
            max_size=None, open_timeout=WAIT,
        )  # fmt: skip
        # Large messages pass once the provider has welcomed the client (the tunnel's WELCOME).
        welcome = encode_control(FrameKind.WELCOME, {"session": "s"})
        await provider_side.send(welcome)
        assert await asyncio.wait_for(user_side.recv(), WAIT) == welcome
        up, down = os.urandom(2 << 20), os.urandom(3 << 20)
        await user_side.send(up)
        await provider_side.send(down)
        await provider_side.send("and text")
        assert await asyncio.wait_for(provider_side.recv(), WAIT) == up
        assert await asyncio.wait_for(user_side.recv(), WAIT) == down
        assert await asyncio.wait_for(user_side.recv(), WAIT) == "and text"
        await provider_side.close(4004, "unknown session")
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(user_side.recv(), WAIT)
        assert (user_side.close_code, user_side.close_reason) == (4004, "unknown session")
    finally:
        client.close()


@pytest.mark.parametrize(
    ("traits", "message"),
    [
        ({"listen": "127.0.0.1:1"}, "cannot listen"),
        ({"keyfile": "k.pem"}, "certfile is not"),
        ({"certfile": "/nonexistent.pem"}, "cannot load TLS"),
        ({"keypair_path": "/nonexistent/id.json"}, "does not exist"),
        ({"db": "sqlite:///:memory:"}, "in-memory"),
    ],
)
async def test_configuration_errors_name_the_setting(
    tmp_path: Path, traits: dict[str, str], message: str
) -> None:
    if traits.get("listen") == "127.0.0.1:1" and os.geteuid() == 0:
        traits = {"listen": "256.0.0.1:80"}
        message = "cannot listen"
    config = CoordinatorConfig(
        data_dir=str(tmp_path), **{"listen": "127.0.0.1:0", "payments": "free", **traits}
    )
    server = CoordinatorServer(config, stdout=io.StringIO())
    with pytest.raises(ConfigError, match=message):
        await server.startup()


# ---- restarts and replicas -------------------------------------------------------------------


async def test_a_restart_keeps_every_lease_and_reconnecting_providers_keep_theirs(
    store_url: str, tmp_path: Path, start_coordinator: Starter, providers: list[FakeProvider]
) -> None:
    traits = {"db": store_url, "data_dir": str(tmp_path / "c"), "heartbeat_interval": 0.3}
    first = await start_coordinator(**traits)
    staying = FakeProvider(first.url, [gpu_offer(count=2)])
    leaving = FakeProvider(first.url, [gpu_offer("A100", vram_gb=80)], reachable_url="ws://h:1/t")
    providers += [staying, leaving]
    await staying.connect()
    await leaving.connect()
    user = CoordinatorClient(first.url, Keypair(), timeout=WAIT)
    active = await user.request_lease("RTX 4090")
    ended = await user.request_lease("RTX 4090")
    waiting = await user.request_lease("A100")
    await staying.session(active.lease, "active")
    staying.hosted.add(active.lease)
    await user.end_lease(ended.lease)
    registry = first.registry
    assert registry is not None
    await registry.wait_for(
        lambda: (
            registry.provider(staying.pubkey).leases[active.lease].state  # type: ignore[union-attr]
            is LeaseState.ACTIVE
        ),
        WAIT,
    )
    before = {g.lease: await user.get_lease(g.lease) for g in (active, ended, waiting)}
    user.close()
    await first.shutdown()
    for provider in (staying, leaving):
        assert provider.ws is not None
        await asyncio.wait_for(provider.ws.wait_closed(), WAIT)
        assert provider.ws.close_code == 1001  # "coordinator restarting": reconnect
        await provider.close()

    second = await start_coordinator(**traits)
    assert second.keypair is not None and first.keypair is not None
    assert second.keypair.pubkey() == first.keypair.pubkey()
    user = CoordinatorClient(second.url, user.keypair, timeout=WAIT)
    try:
        after = {lease: await user.get_lease(lease) for lease in before}
        for lease, record in before.items():  # every lease, its state and its times
            assert (after[lease].state, after[lease].requested_at, after[lease].active_at) == (
                record.state,
                record.requested_at,
                record.active_at,
            )
            assert after[lease].ended_at == record.ended_at
        # The index is back before anyone reconnects: capacity counts the live leases.
        offers = {o.gpu: o for o in second.index}
        assert (offers["RTX 4090"].gpus_free, offers["A100"].gpus_free) == (1, 0)

        # One provider comes back listing its session; the other never does.
        staying = FakeProvider(second.url, [gpu_offer(count=2)], keypair=staying.keypair)
        providers.append(staying)
        await staying.connect(sessions=[active.lease])
        registry = second.registry
        assert registry is not None
        await registry.wait_for(lambda: registry.provider(leaving.pubkey) is None, WAIT)
        store = second.store
        assert store is not None
        assert (await store.get_provider(leaving.pubkey)).status is ProviderStatus.LOST  # type: ignore[union-attr]
        assert (await user.get_lease(waiting.lease)).state == "failed"
        # The other one's restart window passed too, and it is still there with its lease.
        assert registry.provider(staying.pubkey) is not None
        assert (await user.get_lease(active.lease)).state == "active"
        # The token issued before the restart still opens the relay; the provider is dialled.
        client = await connect(
            active.tunnel_url.replace(first.url.split("//")[1], second.url.split("//")[1]),
            additional_headers=active.relay_headers(),
            open_timeout=WAIT,
        )
        dial = await staying.next_message("dial")
        assert dial["lease"] == active.lease
        await client.close()
    finally:
        user.close()


async def test_two_coordinator_processes_share_one_database(
    store_url: str,
    tmp_path: Path,
    start_coordinator: Starter,
    start_process: Callable[..., Any],
    providers: list[FakeProvider],
) -> None:
    first = await start_coordinator(
        db=store_url, data_dir=str(tmp_path / "a"), heartbeat_interval=0.2, reconcile_interval=0.3
    )
    provider = FakeProvider(first.url, [gpu_offer(count=1)])
    providers.append(provider)
    await provider.connect()
    # A replica: its own process, the same database and the same signing key.
    second = await start_process(
        "--db", store_url, "--data-dir", str(tmp_path / "b"),
        "--keypair", str(tmp_path / "a" / "coordinator-keypair.json"),
        "--heartbeat-interval", "0.2",
    )  # fmt: skip
    assert first.keypair is not None and second.key == str(first.keypair.pubkey())
    alice = CoordinatorClient(first.url, Keypair(), timeout=WAIT)
    bob = CoordinatorClient(second.url, Keypair(), timeout=WAIT)
    try:
        # Both know the one GPU (the replica from the store); both race for it: one wins.
        assert (await bob.offers())["types"][0]["available"] == 1
        results = await asyncio.gather(
            alice.request_lease("RTX 4090"), bob.request_lease("RTX 4090"), return_exceptions=True
        )
        grants = [r for r in results if not isinstance(r, BaseException)]
        errors = [r for r in results if isinstance(r, BaseException)]
        assert len(grants) == 1 and len(errors) == 1, results
        assert isinstance(errors[0], LeaseError)
        assert first.store is not None
        assert len(await first.store.live_leases()) == 1

        # The replica never fails the provider linked to the other coordinator. On SQLite it
        # sees fresh heartbeats in the database and stops watching it after its window; on
        # PostgreSQL (the change feed) it keeps it in its view as linked at the other one.
        if store_url.startswith("postgresql"):
            await asyncio.sleep(3 * 0.2 * 2)  # twice the replica's loss window: nothing fails it
            replica = (await bob.status())["replica"]
            assert (replica["providers_known"], replica["linked_here"]) == (1, 0)
        else:

            async def replica_let_go() -> bool:
                return (await bob.status())["providers_watched"] == 0

            await wait_until(replica_let_go, "the replica to stop watching the provider")
        record = await first.store.get_provider(provider.pubkey)
        assert record is not None and record.status is ProviderStatus.ONLINE
        (grant,) = grants
        owner = alice if results[0] is grant else bob
        lease = await owner.get_lease(grant.lease)
        assert lease.state == "requested"

        # A lease ended through either coordinator reaches the provider (here, through the
        # one it is linked to, at its next reconcile) and frees the GPU for both.
        await owner.end_lease(grant.lease)
        end = await provider.next_message("end")
        assert end["lease"] == grant.lease
        again = await alice.request_lease("RTX 4090")
        assert again.provider == provider.pubkey
        with pytest.raises(AuthError):  # owner only, whichever coordinator answers
            await bob.get_lease(again.lease)
    finally:
        alice.close()
        bob.close()
    assert await second.stop() == 0
