"""Click -> first output with warm kernels vs a local cold start (issue 16, part 3).

Three ways to get the output of ``print(1)`` from a kernel that did not exist a moment ago,
timed in the same run, interleaved (warm, remote cold, local cold, then rotated):

- **warm**: a provider host in this process (sandboxed: bubblewrap, a uid of its own per
  session when run as root) with ``warm_kernels`` on. A client opens a session over the real
  tunnel on loopback (HELLO signed), sends LAUNCH and at once a ``kernel_info_request``, and
  once answered an ``execute_request`` for ``print(1)``; the clock stops at the stream
  message carrying ``1``. Then END; before the next click the slot is armed again and its
  process idle (its CPU time unchanged for 150 ms), as it is when leases do not come
  back to back.
- **remote cold**: the same against a second host with ``warm_kernels`` off.
- **local cold**: ``jupyter_client.AsyncKernelManager`` starting a local ipykernel (no
  sandbox, no tunnel), ``wait_for_ready``, ``execute("print(1)")``, clock stopped at the
  stream message: what Jupyter does for a local kernel.

The host's counters confirm every warm click claimed a warm kernel. Prints medians and p90
per way; not a pass/fail test: record in RESULTS.md (target: warm faster than local cold).

    python benchmarks/bench_warm.py            # N=10 each, ~1 min on 2 cores
    python benchmarks/bench_warm.py -n 5 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil
from bench_tunnel import machine
from jupyter_client.manager import AsyncKernelManager
from solders.keypair import Keypair

from jupyter_io.identity import write_keypair
from jupyter_io.protocol import Channel, FrameKind
from provider_host.config import ProviderConfig
from provider_host.server import ProviderServer
from tests.provider_host.conftest import TunnelClient

WAYS = ("warm", "remote_cold", "local_cold")
_TIMEOUT = 60.0


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


async def start_host(warm: bool, root: Path, user: Keypair, host_key: Path) -> ProviderServer:
    config = ProviderConfig(
        listen="127.0.0.1:0",
        allow=[str(user.pubkey())],
        keypair_path=str(host_key),
        workspace_root=str(root / f"ws-{int(warm)}"),
        warm_kernels=warm,
    )
    server = ProviderServer(config, stdout=io.StringIO())
    await server.startup()
    return server


async def settled(server: ProviderServer) -> None:
    """Until the host's CPU slot holds a warm kernel whose processes have gone idle."""
    pool = server.warm
    if pool is None:
        return
    deadline = time.monotonic() + _TIMEOUT
    last, steady = -1.0, 0
    while time.monotonic() < deadline:
        warm = pool.warm(())
        if warm is not None:
            try:
                root = psutil.Process(warm.kernel.pid)
                procs = [root, *root.children(recursive=True)]
                spent = sum(sum(p.cpu_times()[:2]) for p in procs)
            except psutil.Error:
                spent = -1.0
            steady = steady + 1 if spent == last and len(procs) > 1 else 0
            if steady >= 3:
                return
            last = spent
        await asyncio.sleep(0.05)
    raise TimeoutError("the warm kernel did not settle")


async def remote_click(server: ProviderServer, user: Keypair) -> float:
    """Seconds from opening the session to the output of ``print(1)``."""
    client = TunnelClient(server.url, user)
    try:
        began = time.perf_counter()
        await client.connect()
        await client.send_control(
            FrameKind.LAUNCH, {"key": client.key, "signature_scheme": "hmac-sha256", "env": {}}
        )
        await client.wait_ready(_TIMEOUT)
        msg_id, _ = await client.execute("print(1)", wait=False)
        await client.message(
            Channel.IOPUB,
            lambda m: (
                m["parent_header"].get("msg_id") == msg_id
                and m["msg_type"] == "stream"
                and m["content"]["text"] == "1\n"
            ),
            _TIMEOUT,
        )
        elapsed = time.perf_counter() - began
        await client.send_control(FrameKind.END, {})
        await client.wait_closed(_TIMEOUT)
        return elapsed
    finally:
        await client.disconnect()


async def local_click() -> float:
    """Seconds from ``start_kernel`` to the output of ``print(1)`` of a local ipykernel."""
    manager = AsyncKernelManager(kernel_name="python3")
    began = time.perf_counter()
    await manager.start_kernel(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kc = manager.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=_TIMEOUT)
        msg_id = kc.execute("print(1)")
        while True:
            msg: dict[str, Any] = await kc.get_iopub_msg(timeout=_TIMEOUT)
            if (
                msg["parent_header"].get("msg_id") == msg_id
                and msg["msg_type"] == "stream"
                and msg["content"]["text"] == "1\n"
            ):
                return time.perf_counter() - began
    finally:
        kc.stop_channels()
        await manager.shutdown_kernel(now=True)


async def run(n: int) -> dict[str, Any]:
    user = Keypair()
    with tempfile.TemporaryDirectory(prefix="bench-warm-") as scratch:
        root = Path(scratch)
        host_key = write_keypair(Keypair(), root / "host.json")
        hosts = {
            "warm": await start_host(True, root, user, host_key),
            "remote_cold": await start_host(False, root, user, host_key),
        }

        async def click(way: str) -> float:
            if way == "local_cold":
                return await local_click()
            await settled(hosts[way])
            return await remote_click(hosts[way], user)

        try:
            for way in WAYS:  # warm-up: page cache, imports
                await click(way)
            claimed_before = hosts["warm"].warm.stats.claimed  # type: ignore[union-attr]
            times: dict[str, list[float]] = {way: [] for way in WAYS}
            for i in range(n):
                order = WAYS[i % 3 :] + WAYS[: i % 3]
                for way in order:
                    times[way].append(await click(way))
            stats = hosts["warm"].warm.stats  # type: ignore[union-attr]
            claimed = stats.claimed - claimed_before
        finally:
            for server in hosts.values():
                await server.shutdown()
    return {
        "n": n,
        "warm_claimed": claimed,
        "median_ms": {w: statistics.median(t) * 1e3 for w, t in times.items()},
        "p90_ms": {w: quantile(t, 0.9) * 1e3 for w, t in times.items()},
        "warm_over_local_median": statistics.median(times["warm"])
        / statistics.median(times["local_cold"]),
        "samples_ms": {w: [round(x * 1e3, 1) for x in t] for w, t in times.items()},
    }


def render(result: dict[str, Any]) -> str:
    lines = ["| way | median (ms) | p90 (ms) |", "| --- | --- | --- |"]
    for way in WAYS:
        lines.append(f"| {way} | {result['median_ms'][way]:.0f} | {result['p90_ms'][way]:.0f} |")
    lines.append(
        f"\nwarm / local cold (medians): {result['warm_over_local_median']:.2f}; "
        f"warm clicks that claimed a warm kernel: {result['warm_claimed']} of {result['n']}"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=10, help="clicks per way (default 10)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    print(f"machine: {machine()}")
    print(f"commit {commit}, euid {os.geteuid()}, n={args.n} per way")
    result = asyncio.run(run(args.n))
    print(render(result))
    print(f"load after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
