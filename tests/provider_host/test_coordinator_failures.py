"""Failures between a provider host and its coordinator: a provider process that dies stops
heartbeating and its lease fails at the coordinator; a coordinator that restarts on the same
database finds the provider relinked with its lease still live and its kernel running."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

import pytest
from solders.keypair import Keypair

from jupyter_io.coordinator.models import LeaseState
from jupyter_io.coordinator.server import CoordinatorServer
from jupyter_io.coordinator_client import CoordinatorClient
from jupyter_io.identity import write_keypair
from provider_host.server import JOINING_PREFIX, LISTENING_PREFIX

from .conftest import (
    DEFAULT_TIMEOUT,
    CoordinatorStarter,
    HostFactory,
    TunnelClient,
    UserFactory,
    free_port,
    pid_alive,
    wait_until,
)

pytestmark = pytest.mark.timeout(90)


async def start_provider_process(*args: str) -> tuple[asyncio.subprocess.Process, list[str]]:
    """``python -m provider_host ARGS``; returns once it prints its listening line."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "provider_host",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    while not lines or not lines[-1].startswith(LISTENING_PREFIX):
        raw = await asyncio.wait_for(proc.stdout.readline(), 30)
        if not raw:
            raise AssertionError(f"the provider exited before listening: {lines}")
        lines.append(raw.decode().rstrip("\n"))
    return proc, lines


async def test_a_killed_provider_stops_heartbeating_and_its_lease_fails(
    coordinator: CoordinatorServer, make_user: UserFactory, tmp_path: Path, jupyter_env: Path
) -> None:
    registry, store = coordinator.registry, coordinator.store
    assert registry is not None and store is not None
    keypair = Keypair()
    port = free_port()
    public_url = f"ws://127.0.0.1:{port}/tunnel"
    proc, lines = await start_provider_process(
        "--coordinator", coordinator.url,
        "--listen", f"127.0.0.1:{port}",
        "--public-url", public_url,
        "--keypair", str(write_keypair(keypair, tmp_path / "provider.json")),
        "--workspace", str(tmp_path / "ws"),
        "--simulate-gpu", "RTX 4090:24",
        "--price", "0.5",
        "--no-benchmark",
    )  # fmt: skip
    client: TunnelClient | None = None
    try:
        assert (
            f"{JOINING_PREFIX}{coordinator.url} (clients connect direct at {public_url})" in lines
        )
        assert re.fullmatch(rf"{LISTENING_PREFIX}ws://127\.0\.0\.1:{port}/tunnel", lines[-1])
        key = str(keypair.pubkey())
        await registry.wait_for(
            lambda: (state := registry.provider(key)) is not None and state.linked,
            DEFAULT_TIMEOUT,
        )
        user = make_user()
        grant = await user.request_lease("RTX 4090", max_price_lamports_per_hour=500_000_000)
        assert grant.provider == key and grant.tunnel_url == public_url
        client = TunnelClient(grant.tunnel_url, user.keypair, token=grant.token)
        await client.connect()
        started = await client.launch()
        await client.wait_ready()

        def active() -> bool:
            state = registry.provider(key)
            lease = state.leases.get(grant.lease) if state is not None else None
            return lease is not None and lease.state is LeaseState.ACTIVE

        await registry.wait_for(active, DEFAULT_TIMEOUT)

        proc.kill()  # no goodbye, no more heartbeats
        await proc.wait()
        await registry.wait_for(lambda: registry.stats.providers_lost == 1, DEFAULT_TIMEOUT)
        lease = await store.get_lease(grant.lease)
        assert lease is not None and lease.state is LeaseState.FAILED
        assert lease.end_of_service is not None and lease.ended_at is not None
        assert lease.end_of_service <= lease.ended_at
        assert "lost" in (lease.failure_reason or "")
        await wait_until(lambda: not pid_alive(started["pid"]), 10, "the kernel to die")
    finally:
        if client is not None:
            await client.disconnect()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_a_coordinator_restart_keeps_the_lease_and_the_session_runs_on(
    start_coordinator: CoordinatorStarter, make_host: HostFactory, tmp_path: Path
) -> None:
    listen = f"127.0.0.1:{free_port()}"
    first = await start_coordinator(listen=listen)
    port = free_port()
    host = await make_host(
        coordinator_url=first.url,
        listen=f"127.0.0.1:{port}",
        public_url=f"ws://127.0.0.1:{port}/tunnel",
        keypair_path=str(write_keypair(Keypair(), tmp_path / "restart-host.json")),
        simulate_gpu=["RTX 4090:24"],
        allow=[],
        benchmark=False,
        usage_interval=0.2,
        link_backoff_max=0.3,
    )
    link = host.coordinator_link
    assert link is not None
    await asyncio.wait_for(link.wait_linked(), DEFAULT_TIMEOUT)
    user = CoordinatorClient(first.url, Keypair(), timeout=DEFAULT_TIMEOUT)
    client = TunnelClient(f"ws://127.0.0.1:{port}/tunnel", user.keypair)
    try:
        grant = await user.request_lease("RTX 4090")
        client.token = grant.token
        await client.connect()
        await client.launch()
        await client.wait_ready()
        assert first.registry is not None
        registry = first.registry
        assert host.host_keypair is not None
        key = str(host.host_keypair.pubkey())
        await registry.wait_for(
            lambda: (
                (state := registry.provider(key)) is not None
                and (lease := state.leases.get(grant.lease)) is not None
                and lease.state is LeaseState.ACTIVE
            ),
            DEFAULT_TIMEOUT,
        )

        await first.shutdown()
        second = await start_coordinator(listen=listen)
        assert second.registry is not None and second.store is not None
        await asyncio.wait_for(link.wait_linked(links=2), DEFAULT_TIMEOUT)
        registry = second.registry
        stored = registry.stats.usage_stored
        await registry.wait_for(lambda: registry.stats.usage_stored > stored, DEFAULT_TIMEOUT)
        lease = await second.store.get_lease(grant.lease)
        assert lease is not None and lease.state is LeaseState.ACTIVE
        _, reply = await client.execute("6 * 7")
        assert reply is not None and reply["content"]["status"] == "ok"
        assert len(host.sessions) == 1
    finally:
        await client.disconnect()
        user.close()
