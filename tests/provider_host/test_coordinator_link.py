"""Provider hosts join a real coordinator on loopback: inventory into the offers, the
coordinator's key pinned, heartbeats, and relinking after the link drops while a kernel runs."""

from __future__ import annotations

import asyncio

import pytest
from solders.keypair import Keypair

from jupyter_io.coordinator.models import LeaseState
from jupyter_io.coordinator.server import CoordinatorServer
from jupyter_io.coordinator_client import CoordinatorClient
from provider_host.inventory import CPU_LABEL
from provider_host.server import ProviderServer

from .conftest import DEFAULT_TIMEOUT, HostFactory, TunnelClient, UserFactory

pytestmark = pytest.mark.timeout(90)

GIB = 1 << 30


def pubkey(host: ProviderServer) -> str:
    assert host.host_keypair is not None
    return str(host.host_keypair.pubkey())


async def test_providers_publish_their_inventory_and_show_in_the_offers(
    coordinator: CoordinatorServer, market_host: HostFactory
) -> None:
    gamer = await market_host(
        simulate_gpu=["RTX 4090:24", "RTX 4090:24"],
        price="0.25",
        region="eu-west",
        name="gamer rig",
        max_sessions=4,
    )
    lab = await market_host(
        simulate_gpu=["A100:80"],
        model_prices=["a100=1.5"],
        region="us-east",
        direct=True,
    )
    cpu = await market_host(price="0.000000001", max_sessions=3)
    async with CoordinatorClient(coordinator.url) as client:
        offers = await client.offers()

    types = {row["gpu"]: row for row in offers["types"]}
    assert set(types) == {"rtx4090", "a100", "cpu"}
    assert types["cpu"]["display"] == "cpu (no GPU)"  # never passed off as a GPU
    rtx, a100 = types["rtx4090"], types["a100"]
    assert (rtx["available"], rtx["total"], rtx["simulated"]) == (2, 2, True)
    assert (rtx["price_min"], rtx["regions"]) == (250_000_000, ["eu-west"])
    assert rtx["vram_bytes"] == 24 * GIB
    assert (a100["price_min"], a100["simulated"], a100["total"]) == (1_500_000_000, True, 1)
    assert rtx["benchmark_tflops"] is None and a100["benchmark_tflops"] is None

    rows = {row["provider"]: row for row in offers["providers"]}
    assert rows[pubkey(gamer)]["reachable"] is False  # no public URL: through the relay
    assert rows[pubkey(lab)]["reachable"] is True
    cpu_row = rows[pubkey(cpu)]
    assert cpu_row["gpu"] == CPU_LABEL
    assert (cpu_row["simulated"], cpu_row["count"], cpu_row["price_lamports_per_hour"]) == (
        False,
        3,
        1,
    )

    store = coordinator.store
    assert store is not None
    record = await store.get_provider(pubkey(gamer))
    assert record is not None
    assert (record.display_name, record.region, record.reachable_url) == (
        "gamer rig",
        "eu-west",
        None,
    )
    (group,) = await store.provider_offers(pubkey(gamer))
    assert (group.gpu_model, group.count, group.gpu_indices, group.max_kernels) == (
        "RTX 4090",
        2,
        (0, 1),
        4,
    )
    assert (group.driver_version, group.cuda_version) == (None, None)  # simulated
    lab_record = await store.get_provider(pubkey(lab))
    assert lab_record is not None and lab_record.reachable_url == lab.config.public_url


async def test_a_coordinator_with_another_key_is_refused(
    coordinator: CoordinatorServer, make_host: HostFactory
) -> None:
    expected = Keypair().pubkey()
    host = await make_host(
        coordinator_url=coordinator.url,
        coordinator_pubkey=str(expected),
        benchmark=False,
        allow=[],
    )
    link = host.coordinator_link
    assert link is not None
    await asyncio.wait_for(link.wait_for(lambda: link.last_error is not None), DEFAULT_TIMEOUT)
    assert str(expected) in (link.last_error or "")
    assert link.links == 0 and link.coordinator == expected
    registry = coordinator.registry
    assert registry is not None and registry.provider(pubkey(host)) is None
    # Nor does it take tokens from that coordinator: the pinned key decides.
    assert host.lease_gate is not None and host.lease_gate.coordinator == expected


async def test_the_configured_coordinator_key_links_and_is_pinned(
    coordinator: CoordinatorServer, market_host: HostFactory
) -> None:
    assert coordinator.keypair is not None
    key = coordinator.keypair.pubkey()
    host = await market_host(coordinator_pubkey=str(key))
    assert host.coordinator_link is not None and host.coordinator_link.coordinator == key
    assert host.lease_gate is not None and host.lease_gate.coordinator == key


async def test_heartbeats_report_load_and_the_hosted_leases(
    coordinator: CoordinatorServer, market_host: HostFactory, make_user: UserFactory
) -> None:
    host = await market_host(simulate_gpu=["RTX 4090:24"], direct=True, max_sessions=2)
    registry = coordinator.registry
    assert registry is not None
    user = make_user()
    grant = await user.request_lease("RTX 4090")
    client = TunnelClient(grant.tunnel_url, user.keypair, token=grant.token)
    try:
        await client.connect()
        key = pubkey(host)

        def reported() -> bool:
            state = registry.provider(key)
            return state is not None and state.sessions == frozenset({grant.lease})

        await registry.wait_for(reported, DEFAULT_TIMEOUT)
        await registry.wait_for(
            lambda: registry.provider(key) is not None and registry.provider(key).load == 0.5,  # type: ignore[union-attr]
            DEFAULT_TIMEOUT,
        )
    finally:
        await client.disconnect()


async def test_a_relink_in_time_keeps_the_lease_live_and_the_kernel_running(
    coordinator: CoordinatorServer, market_host: HostFactory, make_user: UserFactory
) -> None:
    host = await market_host(simulate_gpu=["RTX 4090:24"], direct=True)
    registry, store = coordinator.registry, coordinator.store
    assert registry is not None and store is not None
    user = make_user()
    grant = await user.request_lease("RTX 4090")
    client = TunnelClient(grant.tunnel_url, user.keypair, token=grant.token)
    try:
        await client.connect()
        started = await client.launch()
        await client.wait_ready()
        key = pubkey(host)

        def active() -> bool:
            state = registry.provider(key)
            lease = state.leases.get(grant.lease) if state is not None else None
            return lease is not None and lease.state is LeaseState.ACTIVE

        await registry.wait_for(active, DEFAULT_TIMEOUT)

        link = host.coordinator_link
        assert link is not None and link.connection is not None
        link.connection.transport.abort()  # the network cuts the link: no close frame
        await asyncio.wait_for(link.wait_linked(links=2), DEFAULT_TIMEOUT)
        state = registry.provider(key)
        assert state is not None and state.linked and state.sessions == {grant.lease}
        assert registry.stats.providers_lost == 0

        lease = await store.get_lease(grant.lease)
        assert lease is not None and lease.state is LeaseState.ACTIVE
        session = next(iter(host.sessions.values()))
        assert session.kernel is not None and session.kernel.pid == started["pid"]
        _, reply = await client.execute("21 * 2")
        assert reply is not None and reply["content"]["status"] == "ok"
        # It heartbeats on the new link, past the loss window of the old one.
        beats = registry.stats.heartbeats
        await registry.wait_for(lambda: registry.stats.heartbeats >= beats + 4, DEFAULT_TIMEOUT)
        lease = await store.get_lease(grant.lease)
        assert lease is not None and lease.state is LeaseState.ACTIVE
    finally:
        await client.disconnect()


async def test_a_cpu_host_with_torch_publishes_a_measured_cpu_benchmark(
    coordinator: CoordinatorServer, market_host: HostFactory
) -> None:
    pytest.importorskip("torch")
    host = await market_host(benchmark=True)  # waits for the benchmark, then the link
    assert set(host.benchmarks) == {CPU_LABEL} and host.benchmarks[CPU_LABEL] > 0
    async with CoordinatorClient(coordinator.url) as client:
        offers = await client.offers()
    (row,) = offers["types"]
    assert row["benchmark_tflops"] == host.benchmarks[CPU_LABEL]
    assert row["simulated"] is False
