"""Kernels leased by GPU type through a real coordinator: AsyncKernelManager and the io-remote
provisioner, a coordinator subprocess, and provider host subprocesses linked to it (one
reached through the coordinator's relay, one directly), all on loopback.

The module shares one marketplace (``market``): a relayed provider with one RTX 4090 at
0.12 SOL/h, and a direct one with an RTX 4090 at 0.2 and an A100 at 0.9. The relay sits behind
a cuttable proxy. Each test leaves no lease behind.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from typing import Any

import pytest
from jupyter_client.manager import AsyncKernelManager

from jupyter_io.errors import KernelLaunchError, LeaseError
from kernel_provisioner.lease import LeaseRefused
from kernel_provisioner.progress import PROGRESS_ATTR
from kernel_provisioner.provisioner import RemoteKernelProvisioner

RTX_PRICE = 120_000_000  # 0.12 SOL in lamports


async def lease_state(market: Any, lease_id: str, wanted: str, timeout: float = 15) -> str:
    """The lease's state at the coordinator, once it is ``wanted`` (or ``timeout`` passes:
    the provider reports a session's start asynchronously, so "active" may lag a moment)."""
    client = market.client()
    try:
        deadline = time.monotonic() + timeout
        while True:
            state = str((await client.get_lease(lease_id)).state)
            if state == wanted or time.monotonic() > deadline:
                return state
            await asyncio.sleep(0.05)
    finally:
        client.close()


async def test_a_kernel_leased_by_gpu_type_runs_through_the_relay_and_its_end_ends_the_lease(
    market: Any,
    kernelspecs: Any,
    start_kernel: Any,
    cells: Any,
    processes: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    name = kernelspecs.install_lease(
        "leased-rtx", market.coordinator.url, market.user_keypair_path, gpu="rtx-4090"
    )
    with caplog.at_level(logging.INFO, logger="traitlets"):
        km = await start_kernel(name)
    prov = km.provisioner
    assert isinstance(prov, RemoteKernelProvisioner)
    grant = prov.lease.grant
    # The cheapest RTX 4090 is the relayed provider's: no public URL, so the relay it is.
    assert grant.provider == market.relayed.pubkey
    assert (grant.gpu, grant.price_lamports_per_hour, grant.relay) == ("RTX 4090", RTX_PRICE, True)
    assert grant.tunnel_url.startswith(
        market.coordinator.public_url.replace("http", "ws", 1) + f"/relay/{grant.lease}?"
    )
    kc = await cells.connect(km)
    try:
        ex = await cells.run(kc, "1 + 1")
        assert ex.status == "ok"
        assert ex.of_type("execute_result")[0]["content"]["data"]["text/plain"] == "2"
    finally:
        kc.stop_channels()

    # Progress: each step once, in order, as structured records a server could publish.
    steps = ["queued", "leased", "launching", "ready"]
    assert [event.step.value for event in prov.progress] == steps
    published = [getattr(r, PROGRESS_ATTR) for r in caplog.records if hasattr(r, PROGRESS_ATTR)]
    assert [event["step"] for event in published] == steps
    leased = published[1]
    assert leased["lease"] == grant.lease and leased["provider"] == market.relayed.pubkey
    assert leased["relay"] is True and leased["price_lamports_per_hour"] == RTX_PRICE
    assert all(event["kernel_id"] == km.kernel_id for event in published)

    info = await prov.get_provisioner_info()
    assert info["coordinator_url"] == market.coordinator.url
    assert info["lease"]["lease"] == grant.lease and info["lease"]["token"] == grant.token
    assert await lease_state(market, grant.lease, "active") == "active"

    pid = prov.kernel_pid
    await asyncio.wait_for(km.shutdown_kernel(), 30)
    assert await processes.wait_gone(pid, 10)
    # Ended at the coordinator by the time shutdown returns: metering stops with the kernel.
    assert await lease_state(market, grant.lease, "ended", timeout=0) == "ended"
    assert prov.lease is None


async def test_a_provider_with_a_public_url_is_reached_directly(
    market: Any, kernelspecs: Any, start_kernel: Any, cells: Any
) -> None:
    name = kernelspecs.install_lease(
        "leased-a100", market.coordinator.url, market.user_keypair_path, gpu="A100",
        max_price_per_hour="1",
    )  # fmt: skip
    km = await start_kernel(name)
    grant = km.provisioner.lease.grant
    assert grant.provider == market.direct.pubkey and not grant.relay
    assert grant.tunnel_url == market.direct.url
    kc = await cells.connect(km)
    try:
        assert (await cells.run(kc, "print(6 * 7)")).stream() == "42\n"
    finally:
        kc.stop_channels()


async def test_a_price_cap_below_every_offer_names_the_cheapest_and_leaves_no_lease(
    market: Any, kernelspecs: Any
) -> None:
    name = kernelspecs.install_lease(
        "too-cheap", market.coordinator.url, market.user_keypair_path, gpu="RTX 4090",
        max_price_per_hour="0.05",
    )  # fmt: skip
    before = market.status()["live_leases"]
    km = AsyncKernelManager(kernel_name=name)
    with pytest.raises(LeaseRefused) as refused:
        await asyncio.wait_for(km.start_kernel(), 30)
    message = str(refused.value)
    assert "cheapest available RTX 4090 is 0.12 SOL/h" in message
    assert "cap of 0.05 SOL/h" in message
    # Both kinds of caller can catch it.
    assert isinstance(refused.value, KernelLaunchError) and isinstance(refused.value, LeaseError)
    prov = km.provisioner
    assert [e.step.value for e in prov.progress] == ["queued", "failed"]
    assert prov.lease is None and prov.tunnel is None
    assert market.status()["live_leases"] == before == 0


async def test_an_unknown_gpu_type_is_refused_with_the_types_on_offer(
    market: Any, kernelspecs: Any
) -> None:
    name = kernelspecs.install_lease(
        "no-such-gpu", market.coordinator.url, market.user_keypair_path, gpu="TPU v9"
    )
    km = AsyncKernelManager(kernel_name=name)
    with pytest.raises(LeaseRefused, match="no provider offers a GPU called 'TPU v9'") as refused:
        await asyncio.wait_for(km.start_kernel(), 30)
    assert "A100" in str(refused.value) and "RTX 4090" in str(refused.value)
    assert market.status()["live_leases"] == 0


async def test_a_provider_at_capacity_is_not_chosen(
    market: Any, kernelspecs: Any, start_kernel: Any, cells: Any
) -> None:
    name = kernelspecs.install_lease(
        "two-rtx", market.coordinator.url, market.user_keypair_path, gpu="RTX 4090"
    )
    first = await start_kernel(name)
    # The relayed provider's only RTX 4090 is taken: the dearer one of the other provider
    # gets the second lease, though its price is higher.
    second = await start_kernel(name)
    first_grant, second_grant = first.provisioner.lease.grant, second.provisioner.lease.grant
    assert first_grant.provider == market.relayed.pubkey
    assert second_grant.provider == market.direct.pubkey
    assert second_grant.price_lamports_per_hour == 200_000_000 and not second_grant.relay
    for km, expected in ((first, "first\n"), (second, "second\n")):
        kc = await cells.connect(km)
        try:
            assert (await cells.run(kc, f"print({expected.strip()!r})")).stream() == expected
        finally:
            kc.stop_channels()


async def test_a_restart_keeps_the_lease_provider_and_session(
    market: Any, kernelspecs: Any, start_kernel: Any, cells: Any
) -> None:
    name = kernelspecs.install_lease(
        "restart-rtx", market.coordinator.url, market.user_keypair_path, gpu="RTX 4090"
    )
    km = await start_kernel(name)
    prov = km.provisioner
    grant, session, old_pid = prov.lease.grant, prov.session_id, prov.kernel_pid
    kc = await cells.connect(km)
    try:
        assert (await cells.run(kc, "x = 'before'")).status == "ok"
        await asyncio.wait_for(km.restart_kernel(), 60)
        assert prov.lease.grant.lease == grant.lease, "a restart must keep the lease"
        assert prov.session_id == session and prov.kernel_pid != old_pid
        await kc.wait_for_ready(timeout=30)
        assert (await cells.run(kc, "x")).status == "error"  # a fresh kernel
        assert (await cells.run(kc, "print('again')")).stream() == "again\n"
    finally:
        kc.stop_channels()
    # One lease request in all: the restart went straight to launching.
    assert [e.step.value for e in prov.progress].count("queued") == 1
    assert await lease_state(market, grant.lease, "active") == "active"


async def test_a_restart_after_the_provider_was_lost_leases_anew(
    start_market: Any, kernelspecs: Any, start_kernel: Any, cells: Any
) -> None:
    # Heartbeats every 0.5 s: a silent provider is lost, and its leases failed, in 1.5 s.
    market = start_market("--heartbeat-interval", "0.5")
    name = kernelspecs.install_lease(
        "lost-rtx", market.coordinator.url, market.user_keypair_path, gpu="RTX 4090"
    )
    km = await start_kernel(name)
    prov = km.provisioner
    first = prov.lease.grant
    assert first.provider == market.relayed.pubkey
    market.relayed.proc.kill()
    # The lease fails at the coordinator, the relay refuses the resume: the kernel is dead.
    assert await prov.tunnel.wait_exited(timeout=20) is not None
    assert await lease_state(market, first.lease, "failed", timeout=0) == "failed"

    # A restart cannot reuse a lease whose session is gone: it leases again, elsewhere.
    await asyncio.wait_for(km.restart_kernel(now=True), 60)
    second = prov.lease.grant
    assert second.lease != first.lease and second.provider == market.direct.pubkey
    kc = await cells.connect(km)
    try:
        assert (await cells.run(kc, "print('elsewhere')")).stream() == "elsewhere\n"
    finally:
        kc.stop_channels()
    assert [e.step.value for e in prov.progress].count("leased") == 2


async def test_a_failed_first_launch_ends_its_lease(
    market: Any, kernelspecs: Any, processes: Any
) -> None:
    # The direct provider stops answering (SIGSTOP): it still looks linked to the
    # coordinator, which leases its A100, but the tunnel cannot open.
    name = kernelspecs.install_lease(
        "frozen-a100", market.coordinator.url, market.user_keypair_path, gpu="A100",
        connect_timeout=1.0,
    )  # fmt: skip
    km = AsyncKernelManager(kernel_name=name)
    os.kill(market.direct.proc.pid, signal.SIGSTOP)
    try:
        with pytest.raises(KernelLaunchError, match="cannot open a tunnel"):
            await asyncio.wait_for(km.start_kernel(), 30)
    finally:
        os.kill(market.direct.proc.pid, signal.SIGCONT)
    prov = km.provisioner
    leased = [e for e in prov.progress if e.step.value == "leased"]
    assert len(leased) == 1 and prov.progress[-1].step.value == "failed"
    lease_id = leased[0].details["lease"]
    assert await lease_state(market, lease_id, "ended", timeout=0) == "ended"
    assert prov.lease is None and prov.tunnel is None
    assert market.status()["live_leases"] == 0


async def test_an_abandoned_start_ends_its_lease(market: Any, kernelspecs: Any) -> None:
    # Whoever started the kernel gives up waiting (a timeout around start_kernel): the
    # lease taken for it must not outlive the attempt.
    name = kernelspecs.install_lease(
        "abandoned-a100", market.coordinator.url, market.user_keypair_path, gpu="A100"
    )
    km = AsyncKernelManager(kernel_name=name)
    os.kill(market.direct.proc.pid, signal.SIGSTOP)  # the tunnel will hang
    try:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(km.start_kernel(), 2)
    finally:
        os.kill(market.direct.proc.pid, signal.SIGCONT)
    prov = km.provisioner
    (leased,) = [e for e in prov.progress if e.step.value == "leased"]
    assert prov.progress[-1].step.value == "failed"
    assert await lease_state(market, leased.details["lease"], "ended", timeout=0) == "ended"
    assert prov.lease is None and prov.tunnel is None


async def test_another_process_reattaches_to_a_relayed_lease(
    market: Any, kernelspecs: Any, start_kernel: Any, cells: Any, processes: Any
) -> None:
    # Only the relayed provider's RTX 4090 is under this cap: the test is about the relay
    # (without a cap, the scheduler's latency and reliability terms may prefer the direct one).
    name = kernelspecs.install_lease(
        "reattach-rtx", market.coordinator.url, market.user_keypair_path, gpu="RTX 4090",
        max_price_per_hour="0.15",
    )  # fmt: skip
    km = await start_kernel(name)
    prov = km.provisioner
    kc = await cells.connect(km)
    assert (await cells.run(kc, "survivor = 'kept'")).status == "ok"
    kc.stop_channels()
    info = json.loads(json.dumps(await prov.get_provisioner_info()))
    lease_id, pid = info["lease"]["lease"], prov.kernel_pid
    assert info["lease"]["relay"] is True

    # The old provisioner lets go, leaving session and lease; a new one takes both over,
    # through the relay, with the saved token.
    await prov.detach()
    km2 = AsyncKernelManager(kernel_name=name)
    prov2 = RemoteKernelProvisioner(
        kernel_id=info["kernel_id"],
        kernel_spec=km2.kernel_spec,
        keypair_path=str(market.user_keypair_path),
    )
    await prov2.load_provisioner_info(info)
    try:
        assert prov2.lease.grant.lease == lease_id and prov2.session_id == info["session_id"]
        assert prov2.has_process and await prov2.poll() is None
        km2.provisioner = prov2
        km2.load_connection_info(prov2.connection_info)
        kc2 = await cells.connect(km2)
        try:
            assert (await cells.run(kc2, "print(survivor)")).stream() == "kept\n"
        finally:
            kc2.stop_channels()
    finally:
        await prov2.cleanup(restart=False)
    assert await processes.wait_gone(pid, 10)
    assert await lease_state(market, lease_id, "ended", timeout=0) == "ended"
    km.provisioner = None  # nothing left for the fixture to shut down


async def test_a_lease_ended_at_the_coordinator_ends_the_kernel(
    market: Any, kernelspecs: Any, start_kernel: Any, processes: Any
) -> None:
    name = kernelspecs.install_lease(
        "ended-rtx", market.coordinator.url, market.user_keypair_path, gpu="RTX 4090"
    )
    km = await start_kernel(name)
    prov = km.provisioner
    pid, lease_id = prov.kernel_pid, prov.lease.grant.lease
    client = market.client()
    try:
        await client.end_lease(lease_id)  # the user, from elsewhere (another device, say)
    finally:
        client.close()
    # Reported dead soon, not after the whole grace period of resume attempts.
    tunnel = prov.tunnel
    assert await tunnel.wait_exited(timeout=15) is not None, tunnel.dead_reason
    # The relay refuses the resume (410: the lease is over), or the provider ended it first.
    assert tunnel.ended or "is ended" in (tunnel.dead_reason or ""), tunnel.dead_reason
    assert not await km.is_alive()
    assert await processes.wait_gone(pid, 10)


COUNTER = "import time\nfor i in range(30):\n    print(i, flush=True)\n    time.sleep(0.1)\n"


async def test_output_resumes_exactly_once_after_a_cut_in_front_of_the_relay(
    market: Any, kernelspecs: Any, start_kernel: Any, cells: Any
) -> None:
    # Only the relayed provider's RTX 4090 is under this cap: the test is about the relay
    # (without a cap, the scheduler's latency and reliability terms may prefer the direct one).
    name = kernelspecs.install_lease(
        "cut-rtx", market.coordinator.url, market.user_keypair_path, gpu="RTX 4090",
        max_price_per_hour="0.15",
    )  # fmt: skip
    km = await start_kernel(name)
    prov = km.provisioner
    tunnel = prov.tunnel
    assert prov.lease.grant.relay
    kc = await cells.connect(km)
    try:
        assert (await cells.run(kc, "x = 'kept'")).status == "ok"
        ex = cells.execution(kc.execute(COUNTER))
        collecting = asyncio.ensure_future(cells.collect(kc, ex.msg_id, timeout=60, into=ex))
        await ex.wait_until(lambda: ex.stream().count("\n") >= 3, 15)
        market.proxy.cut()  # both legs of the relayed connection drop
        try:
            assert await tunnel.wait_for(lambda: not tunnel.connected, 5), "cut went unnoticed"
            # Hold the cut for a second (the partition under test), checking what Jupyter
            # sees meanwhile: unknown, never dead. The kernel keeps printing.
            held_until = time.monotonic() + 1.0
            while time.monotonic() < held_until:
                assert await prov.poll() is None and await km.is_alive()
                await asyncio.sleep(0.1)
            during = ex.stream().count("\n")
        finally:
            market.proxy.restore()
        restored_at = time.monotonic()
        await collecting
        assert ex.status == "ok"
        assert ex.stream() == "".join(f"{i}\n" for i in range(30)), "lost or repeated output"
        after = sum(
            m["content"]["text"].count("\n")
            for t, m in zip(ex.arrivals, ex.iopub, strict=True)
            if m["msg_type"] == "stream" and t >= restored_at
        )
        assert during < 30 and after >= 5, (during, after)  # printed during the cut, replayed
        assert tunnel.resumes >= 1 and tunnel.connected
        assert (await cells.run(kc, "print(x)")).stream() == "kept\n"
    finally:
        market.proxy.restore()
        kc.stop_channels()


async def test_usage_is_acknowledged_only_while_the_tunnel_is_up_and_a_resume_covers_the_gap(
    market: Any, kernelspecs: Any, start_kernel: Any
) -> None:
    interval = 0.2
    name = kernelspecs.install_lease(
        "ack-cut-rtx", market.coordinator.url, market.user_keypair_path, gpu="RTX 4090",
        usage_ack_interval=interval,
    )  # fmt: skip
    km = await start_kernel(name)
    prov = km.provisioner
    tunnel, lease = prov.tunnel, prov.lease
    assert lease.grant.relay

    async def until(predicate: Any, what: str) -> None:
        deadline = time.monotonic() + 15
        while not predicate():
            assert time.monotonic() < deadline, f"not {what} in 15 s"
            await asyncio.sleep(0.05)

    await until(lambda: lease.acked_seconds >= 1, "acknowledged")  # the coordinator took it
    market.proxy.cut()  # the tunnel drops; the coordinator itself stays reachable
    try:
        assert await tunnel.wait_for(lambda: not tunnel.connected, 5), "cut went unnoticed"
        # Hold the cut for several intervals: nothing is acknowledged meanwhile (but the one
        # that may have left just before the cut was noticed).
        taken, acked = lease.acks_taken + 1, lease.acked_seconds
        held_until = time.monotonic() + 8 * interval
        while time.monotonic() < held_until:
            assert lease.acks_taken <= taken, "acknowledged while the tunnel was down"
            await asyncio.sleep(interval / 2)
    finally:
        market.proxy.restore()
    assert await tunnel.wait_connected(15)
    # Back: the next acknowledgement counts from READY, the cut included.
    await until(lambda: lease.acks_taken > taken, "acknowledged after the resume")
    assert lease.acked_seconds >= acked + 1


async def test_a_coordinator_restart_keeps_direct_sessions_and_relayed_ones_resume(
    start_market: Any, kernelspecs: Any, start_kernel: Any, cells: Any
) -> None:
    # Tokens live 4 s here, so the relayed session's token has expired by the time it
    # resumes: it must renew it at the restarted coordinator.
    market = start_market("--token-ttl", "4")
    url, user = market.coordinator.url, market.user_keypair_path
    relayed = await start_kernel(kernelspecs.install_lease("r-rtx", url, user, gpu="RTX 4090"))
    direct = await start_kernel(kernelspecs.install_lease("d-a100", url, user, gpu="A100"))
    relayed_lease, direct_lease = relayed.provisioner.lease, direct.provisioner.lease
    assert relayed_lease.grant.relay and not direct_lease.grant.relay
    relayed_kc = await cells.connect(relayed)
    direct_kc = await cells.connect(direct)
    try:
        for kc in (relayed_kc, direct_kc):
            assert (await cells.run(kc, "state = 'intact'")).status == "ok"
        for km in (relayed, direct):  # in use, so the coordinator keeps them past the token
            assert await lease_state(market, km.provisioner.lease.grant.lease, "active") == "active"
        relayed_tunnel = relayed.provisioner.tunnel
        first_expiry = relayed_lease.grant.expires_at

        market.coordinator.stop()
        assert await relayed_tunnel.wait_for(lambda: not relayed_tunnel.connected, 10)
        # The direct session never needed the coordinator.
        assert (await cells.run(direct_kc, "print(state)")).stream() == "intact\n"
        assert await relayed.is_alive(), "a coordinator outage is not a dead kernel"
        await asyncio.sleep(max(0.0, first_expiry - time.time()))  # let the token expire

        market.coordinator.start()  # same port, same database
        assert await relayed_tunnel.wait_connected(30), relayed_tunnel.dead_reason
        assert (await cells.run(relayed_kc, "print(state)", timeout=30)).stream() == "intact\n"
        assert relayed_tunnel.resumes >= 1
        assert relayed_lease.grant.expires_at > first_expiry, "the token was not renewed"
        assert direct.provisioner.tunnel.resumes == 0
        assert (await cells.run(direct_kc, "print(state)")).stream() == "intact\n"
    finally:
        relayed_kc.stop_channels()
        direct_kc.stop_channels()
    # Both leases are still live at the restarted coordinator.
    for km in (relayed, direct):
        assert await lease_state(market, km.provisioner.lease.grant.lease, "active") == "active"
