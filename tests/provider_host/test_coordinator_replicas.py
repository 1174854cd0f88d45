"""A provider host given its coordinator's replicas as a list of URLs: when the replica it is
linked to is killed (SIGKILL, real ``jupyter io coordinator`` processes on one database) it
links to another within the 10 s the contract allows; and it follows a ``dial`` only to a
relay on a configured coordinator or on the linked one's host, never to any host a
coordinator names."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from solders.keypair import Keypair

from jupyter_io.coordinator.server import LISTENING_PREFIX, CoordinatorServer
from jupyter_io.identity import write_keypair
from jupyter_io.provider_link import Dial

from .conftest import DEFAULT_TIMEOUT, CoordinatorStarter, HostFactory

pytestmark = pytest.mark.timeout(90)

#: How soon a provider must be linked to another replica after its own dies (issue 17).
RELINK_BUDGET_S = 10.0
_COMMAND = [
    sys.executable,
    "-c",
    "from jupyter_io.coordinator.app import CoordinatorApp; CoordinatorApp.launch_instance()",
]

Replica = tuple[asyncio.subprocess.Process, str]


@pytest.fixture
async def start_replica() -> AsyncIterator[Callable[[Path], Awaitable[Replica]]]:
    """``await start_replica(data_dir)``: a ``jupyter io coordinator`` process on a free
    loopback port with its database (and key) in ``data_dir``; returns it and its URL."""
    started: list[asyncio.subprocess.Process] = []
    drains: list[asyncio.Task[bytes]] = []

    async def start(data_dir: Path) -> Replica:
        proc = await asyncio.create_subprocess_exec(
            *_COMMAND,
            "--listen=127.0.0.1:0",
            f"--data-dir={data_dir}",
            "--CoordinatorConfig.payments=free",
            "--CoordinatorConfig.heartbeat_interval=0.5",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        started.append(proc)
        assert proc.stdout is not None
        url = ""
        while not url:
            line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
            assert line, "the coordinator exited before it listened"
            if line.startswith(LISTENING_PREFIX):
                url = line[len(LISTENING_PREFIX) :].split()[0]
        drains.append(asyncio.ensure_future(proc.stdout.read()))  # never let its pipe fill
        return proc, url

    yield start
    for proc in started:
        if proc.returncode is None:
            proc.terminate()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(proc.wait(), 15)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    for task in drains:
        task.cancel()


async def test_a_provider_links_to_another_replica_within_10_s_of_a_kill(
    start_replica: Callable[[Path], Awaitable[Replica]],
    make_host: HostFactory,
    tmp_path: Path,
) -> None:
    data = tmp_path / "coordinator"  # one database and one coordinator key for both
    first = await start_replica(data)
    second = await start_replica(data)
    by_url = {url: proc for proc, url in (first, second)}
    host = await make_host(
        coordinator_url=f"{first[1]}, {second[1]}",
        keypair_path=str(write_keypair(Keypair(), tmp_path / "host.json")),
        benchmark=False,
        allow=[],
    )
    link = host.coordinator_link
    assert link is not None
    await asyncio.wait_for(link.wait_linked(), DEFAULT_TIMEOUT)
    linked = link.url.split("/api/")[0].replace("ws://", "http://")
    other = next(url for url in by_url if url != linked)
    key = link.coordinator

    killed_at = time.monotonic()
    os.kill(by_url[linked].pid, signal.SIGKILL)
    await asyncio.wait_for(link.wait_linked(2), RELINK_BUDGET_S)
    took = time.monotonic() - killed_at

    assert took < RELINK_BUDGET_S
    assert link.url.startswith(other.replace("http://", "ws://"))
    assert link.coordinator == key  # the same pinned key, proven again by the other replica
    assert link.links == 2


async def test_a_dial_to_a_host_no_coordinator_is_on_is_not_followed(
    coordinator: CoordinatorServer,
    market_host: HostFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """127.0.0.2 is loopback too, but no configured coordinator's host: a coordinator (or
    whoever writes its messages) cannot send the provider's signed connections there. A dial
    to the linked coordinator's host (another port: a replica's own) is followed."""
    host = await market_host()
    assert host.host_keypair is not None and coordinator.registry is not None
    pubkey = str(host.host_keypair.pubkey())
    reached: dict[str, asyncio.Event] = {"evil": asyncio.Event(), "replica": asyncio.Event()}

    def recorder(name: str) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], None]:
        def accepted(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            reached[name].set()
            writer.transport.abort()

        return accepted

    evil = await asyncio.start_server(recorder("evil"), "127.0.0.2", 0)
    replica = await asyncio.start_server(recorder("replica"), "127.0.0.1", 0)
    try:
        evil_port = evil.sockets[0].getsockname()[1]
        replica_port = replica.sockets[0].getsockname()[1]
        lease = "lease-evil"
        caplog.set_level(logging.WARNING, logger="provider_host")
        for url in (
            f"ws://127.0.0.2:{evil_port}/relay/{lease}?side=provider&conn=1",
            f"ws://127.0.0.1:{replica_port}/relay/{lease}?side=provider&conn=2",
        ):
            assert coordinator.registry.deliver(pubkey, Dial(lease, url), ttl=1.0)
        await asyncio.wait_for(reached["replica"].wait(), DEFAULT_TIMEOUT)
        # Dials are handled in order, the refused one first: had it been followed, its
        # connection would have been under way before the second's.
        assert not reached["evil"].is_set()
        assert any(
            f"127.0.0.2:{evil_port}" in r.getMessage() and "refusing to connect" in r.getMessage()
            for r in caplog.records
        )
    finally:
        for server in (evil, replica):
            server.close()
            await server.wait_closed()


async def test_within_10_s_of_a_drop_the_link_tries_at_least_every_second(
    start_coordinator: CoordinatorStarter, make_host: HostFactory, tmp_path: Path
) -> None:
    """Every replica down for 6.5 s, then one back: linked again before the 10 s are out
    (the plain backoff, 0.1 s doubling to 5 s, would next try at 11.3 s)."""
    replica = await start_coordinator()
    host = await make_host(
        coordinator_url=replica.url,
        keypair_path=str(write_keypair(Keypair(), tmp_path / "host.json")),
        benchmark=False,
        allow=[],
    )
    link = host.coordinator_link
    assert link is not None and link.backoff_max == 5.0
    await asyncio.wait_for(link.wait_linked(), DEFAULT_TIMEOUT)
    await replica.shutdown()
    dropped_at = time.monotonic()
    await asyncio.sleep(6.5)  # the outage itself, not a wait for an event
    await start_coordinator(listen=replica.url.removeprefix("http://"))
    await asyncio.wait_for(link.wait_linked(2), RELINK_BUDGET_S - 6.5)
    assert time.monotonic() - dropped_at < RELINK_BUDGET_S


async def test_every_replica_must_present_the_pinned_key(
    start_coordinator: CoordinatorStarter, make_host: HostFactory, tmp_path: Path
) -> None:
    """A listed URL whose coordinator holds another key is refused, however the list is
    ordered: the key the first welcome pinned (or coordinator_pubkey) is insisted on at
    every replica, so one wrong entry cannot take the provider over."""
    replica = await start_coordinator()
    stranger = await start_coordinator(data_dir=str(tmp_path / "another-coordinator"))
    assert replica.keypair is not None
    host = await make_host(
        coordinator_url=f"{stranger.url},{replica.url}",
        coordinator_pubkey=str(replica.keypair.pubkey()),
        keypair_path=str(write_keypair(Keypair(), tmp_path / "host.json")),
        benchmark=False,
        allow=[],
    )
    link = host.coordinator_link
    assert link is not None
    await asyncio.wait_for(link.wait_linked(), DEFAULT_TIMEOUT)
    assert link.url.startswith(replica.url.replace("http://", "ws://"))
    await replica.shutdown()  # only the stranger is left
    await asyncio.wait_for(
        link.wait_for(lambda: "presents coordinator key" in (link.last_error or "")),
        DEFAULT_TIMEOUT,
    )
    assert not link.linked.is_set() and link.links == 1
    assert link.coordinator == replica.keypair.pubkey()
    assert stranger.registry is not None and host.host_keypair is not None
    assert stranger.registry.provider(str(host.host_keypair.pubkey())) is None
