"""What measuring latency costs (issue 18): the client's cold start, and the host per ping.

1. **Cold start.** A coordinator and ``--candidates`` provider hosts (simulated GPUs of one
   type, each reached directly: its public URL is its own) in this process, on loopback.
   Each round does what the provisioner does before a lease: ``GET /api/v1/offers/
   candidates`` then :meth:`LatencyProber.measure` of them all, with a fresh prober
   (*cold*: every provider pinged) and again with the same one (*cached*: nothing pinged).
   Beside them the floor: the candidates request alone.
2. **Host cost per ping.** A provider host as a process of its own, pinged ``--pings``
   times one after the other; its CPU time (``/proc``: user + system) per ping, and the
   bytes each way, against the floor of as many bare TCP connections opened and closed (a
   cost the endpoint pays for any stranger).

    python benchmarks/bench_probe.py                    # ~20 s
    python benchmarks/bench_probe.py --candidates 8 --rounds 30 --pings 3000
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from solders.keypair import Keypair

from jupyter_io.coordinator.config import CoordinatorConfig
from jupyter_io.coordinator.server import CoordinatorServer
from jupyter_io.coordinator_client import CoordinatorClient
from jupyter_io.identity import write_keypair
from jupyter_io.latency import Candidate, LatencyProber, ping
from jupyter_io.ping import build_ping_request, ping_target
from provider_host.config import ProviderConfig
from provider_host.server import ProviderServer

TICK = os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def cold_start(root: Path, candidates: int, rounds: int) -> dict[str, float]:
    coordinator = CoordinatorServer(
        CoordinatorConfig(
            listen="127.0.0.1:0",
            data_dir=str(root / "coordinator"),
            payments="free",
            offers_cache_ttl=0,
        ),
        stdout=io.StringIO(),
    )
    await coordinator.startup()
    hosts: list[ProviderServer] = []
    try:
        for n in range(candidates):
            port = _free_port()
            host = ProviderServer(
                ProviderConfig(
                    listen=f"127.0.0.1:{port}",
                    public_url=f"ws://127.0.0.1:{port}/tunnel",
                    keypair_path=str(write_keypair(Keypair(), root / f"host-{n}.json")),
                    workspace_root=str(root / f"ws-{n}"),
                    coordinator_url=coordinator.url,
                    simulate_gpu=["RTX 4090:24"],
                    price=f"0.{100 + n}",
                    benchmark=False,
                    ping_rate=1000.0,
                ),
                stdout=io.StringIO(),
            )
            await host.startup()
            hosts.append(host)
            assert host.coordinator_link is not None
            await asyncio.wait_for(host.coordinator_link.wait_linked(), 30)
        client = CoordinatorClient(coordinator.url, timeout=10)
        cold: list[float] = []
        cached: list[float] = []
        floor: list[float] = []
        pinged = 0
        try:
            rows = await client.candidates("RTX 4090", limit=candidates)
            assert len(rows) == candidates, rows
            for _ in range(rounds):
                began = time.perf_counter()
                await client.candidates("RTX 4090", limit=candidates)
                floor.append((time.perf_counter() - began) * 1000)

                prober = LatencyProber(probes=candidates)
                began = time.perf_counter()
                rows = await client.candidates("RTX 4090", limit=candidates)
                found = await prober.measure([Candidate.from_json(r) for r in rows])
                cold.append((time.perf_counter() - began) * 1000)
                assert all(m.latency_ms is not None for m in found.values()), found

                sent = prober.pings_sent
                began = time.perf_counter()
                rows = await client.candidates("RTX 4090", limit=candidates)
                await prober.measure([Candidate.from_json(r) for r in rows])
                cached.append((time.perf_counter() - began) * 1000)
                pinged += prober.pings_sent - sent
                await asyncio.sleep(0.05)  # within the hosts' per-address ping rate
        finally:
            client.close()
        return {
            "cold_median_ms": statistics.median(cold),
            "cold_p90_ms": _pct(cold, 0.9),
            "cached_median_ms": statistics.median(cached),
            "cached_pings": pinged,
            "floor_median_ms": statistics.median(floor),
            "probing_added_median_ms": statistics.median(cold) - statistics.median(floor),
        }
    finally:
        for host in hosts:
            await host.shutdown()
        await coordinator.shutdown()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


async def host_cost(root: Path, pings: int) -> dict[str, float]:
    user = Keypair()
    proc = subprocess.Popen(  # noqa: ASYNC220 - once, before anything is timed
        [sys.executable, "-m", "provider_host", "--listen", "127.0.0.1:0",
         "--keypair", str(write_keypair(Keypair(), root / "host.json")),
         "--allow", str(user.pubkey()), "--workspace", str(root / "ws"),
         "--ProviderConfig.isolation=none", "--ProviderConfig.ping_rate=100000",
         "--ProviderConfig.benchmark=False"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        url = ""
        for line in proc.stdout:
            if match := re.search(r"listening on (ws://\S+)", line):
                url = match.group(1)
                break
        target = ping_target(url)
        request = build_ping_request(target, os.urandom(16))
        reader, writer = await asyncio.open_connection(target.host, target.port)
        writer.write(request)
        reply = await reader.read()
        writer.close()
        # The limiter allows 500 pings a second from all addresses together: stay under.
        spacing = 1 / 400

        async def run(job: str) -> float:
            before = _cpu_seconds(proc.pid)
            for _ in range(pings):
                began = time.perf_counter()
                if job == "ping":
                    await ping(url, timeout=5)
                else:
                    _, w = await asyncio.open_connection(target.host, target.port)
                    w.transport.abort()
                left = spacing - (time.perf_counter() - began)
                if left > 0:
                    await asyncio.sleep(left)
            await asyncio.sleep(0.2)  # the host finishes the last ones
            return (_cpu_seconds(proc.pid) - before) / pings * 1e6

        await asyncio.sleep(1.0)  # the host's start-up work is over
        bare = await run("connect")
        per_ping = await run("ping")
        return {
            "host_cpu_us_per_ping": per_ping,
            "host_cpu_us_per_bare_connection": bare,
            "request_bytes": len(request),
            "reply_bytes": len(reply),
        }
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--pings", type=int, default=2000)
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cold = asyncio.run(cold_start(root / "cold", args.candidates, args.rounds))
        (root / "host").mkdir()
        cost = asyncio.run(host_cost(root / "host", args.pings))
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    cpu = platform.processor() or platform.machine()
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}, commit {commit}, "
          f"{platform.node()} ({os.cpu_count()} CPUs, {cpu}), "
          f"load average {load_before[0]:.2f} -> {os.getloadavg()[0]:.2f}")  # fmt: skip
    print(f"cold start, {args.candidates} candidates over loopback, {args.rounds} rounds:")
    print(f"  candidates + probes (cold)   median {cold['cold_median_ms']:.1f} ms, "
          f"p90 {cold['cold_p90_ms']:.1f} ms  (target <= 150 ms added)")  # fmt: skip
    print(f"  candidates request alone     median {cold['floor_median_ms']:.1f} ms (floor)")
    print(f"  probing added                median {cold['probing_added_median_ms']:.1f} ms")
    print(f"  cached                       median {cold['cached_median_ms']:.1f} ms, "
          f"{cold['cached_pings']} pings sent (target 0)")  # fmt: skip
    print(f"host cost, {args.pings} pings one after the other:")
    bare = cost["host_cpu_us_per_bare_connection"]
    print(f"  CPU per ping                 {cost['host_cpu_us_per_ping']:.0f} us "
          f"(bare TCP connect + close: {bare:.0f} us)")  # fmt: skip
    print(f"  bytes                        {cost['request_bytes']} in, "
          f"{cost['reply_bytes']} out")  # fmt: skip


if __name__ == "__main__":
    main()
