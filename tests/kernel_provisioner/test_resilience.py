"""The tunnel under failure: a 5 s network cut mid-execution loses and duplicates nothing and
never reads as a dead kernel; a provider host that dies, or a partition longer than the
grace period, is reported as a dead kernel and leaves nothing running."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

from kernel_provisioner.connection import LOST_EXIT_CODE

COUNTER = "import time\nfor i in range(40):\n    print(i, flush=True)\n    time.sleep(0.2)\n"
CUT_SECONDS = 5.0


def _lines(text: str) -> int:
    return text.count("\n")


async def test_cut_mid_execution_resumes_without_loss_or_duplicates(
    provider_host: Any, kernelspecs: Any, proxy_to: Any, start_kernel: Any, cells: Any
) -> None:
    proxy = await proxy_to(provider_host)
    name = kernelspecs.install("io-remote-proxied", proxy.url, provider_host.user_keypair_path)
    km = await start_kernel(name)
    prov = km.provisioner
    tunnel = prov.tunnel
    kc = await cells.connect(km)
    try:
        assert (await cells.run(kc, "x = 'set before the cut'")).status == "ok"

        from_kernel = cells.execution(kc.execute(COUNTER))
        collecting = asyncio.ensure_future(
            cells.collect(kc, from_kernel.msg_id, timeout=60, into=from_kernel)
        )
        await from_kernel.wait_until(lambda: _lines(from_kernel.stream()) >= 3, 15)

        proxy.cut()
        assert await tunnel.wait_for(lambda: not tunnel.connected, 5), "the cut went unnoticed"
        # Sample what Jupyter would see throughout the cut.
        polls, alive, connected = [], [], []
        cut_ends = time.monotonic() + CUT_SECONDS
        while time.monotonic() < cut_ends:
            polls.append(await prov.poll())
            alive.append(await km.is_alive())
            connected.append(tunnel.connected)
            await asyncio.sleep(0.25)
        lines_before_resume = _lines(from_kernel.stream())
        proxy.restore()

        ex = await collecting
        resumed_at = min(
            t
            for t, m in zip(ex.arrivals, ex.iopub, strict=True)
            if m["msg_type"] == "stream" and t >= cut_ends
        )
        lines_after_resume = sum(
            _lines(m["content"]["text"])
            for t, m in zip(ex.arrivals, ex.iopub, strict=True)
            if m["msg_type"] == "stream" and t >= resumed_at
        )
    finally:
        proxy.restore()

    try:
        assert polls and all(p is None for p in polls), f"poll() during the cut: {polls}"
        assert all(alive), "is_alive() turned False during the cut"
        assert not any(connected), "the tunnel claimed to be connected during the cut"
        assert ex.status == "ok"
        # In order, exactly once: the whole counter, nothing missing, nothing repeated.
        assert ex.stream() == "".join(f"{i}\n" for i in range(40))
        # The kernel kept printing during the cut; that output came after the resume.
        assert lines_before_resume < 40 - 10
        assert lines_after_resume >= 10
        assert tunnel.resumes >= 1
        assert (await cells.run(kc, "print(x)")).stream() == "set before the cut\n"
    finally:
        kc.stop_channels()


async def test_killed_provider_is_reported_dead_and_leaves_nothing(
    start_host: Any, kernelspecs: Any, start_kernel: Any, cells: Any, processes: Any
) -> None:
    host = start_host()
    name = kernelspecs.install("io-remote-doomed", host.url, host.user_keypair_path)
    km = await start_kernel(name)
    prov = km.provisioner
    pid = prov.kernel_pid
    kc = await cells.connect(km)
    kc.stop_channels()
    assert await prov.poll() is None

    host.proc.send_signal(signal.SIGKILL)
    host.proc.wait(10)
    killed_at = time.monotonic()
    await prov.tunnel.wait_exited(timeout=10)
    detected_after = time.monotonic() - killed_at
    assert await prov.poll() == LOST_EXIT_CODE
    assert detected_after < 10
    assert not await km.is_alive()
    assert "refuses connections" in (prov.tunnel.dead_reason or "")
    # Its kernel died with the host (ipykernel's parent poller), not kept running unseen.
    assert await processes.wait_gone(pid, 10)


async def test_partition_longer_than_grace_declares_the_kernel_dead(
    start_host: Any,
    kernelspecs: Any,
    proxy_to: Any,
    start_kernel: Any,
    processes: Any,
) -> None:
    host = start_host("--grace-period", "2")
    proxy = await proxy_to(host)
    name = kernelspecs.install(
        "io-remote-short-grace", proxy.url, host.user_keypair_path, grace_period=1.5
    )
    km = await start_kernel(name)
    prov = km.provisioner
    pid = prov.kernel_pid
    proxy.cut()  # and never restored
    cut_at = time.monotonic()
    assert await prov.poll() is None
    await prov.tunnel.wait_exited(timeout=10)
    assert time.monotonic() - cut_at >= 1.5, "declared dead before the grace period ran out"
    assert await prov.poll() == LOST_EXIT_CODE
    assert "grace period" in (prov.tunnel.dead_reason or "")
    # The host's own grace period ends the orphaned kernel.
    assert await processes.wait_gone(pid, 10)
