"""The time a session's memory cgroup adds to a sandboxed kernel's start (issue 11, part 2).

The same measurement as ``bench_sandbox.py`` (LAUNCH → first ``kernel_info_reply`` of a fresh
session over the real tunnel, then END), between two sandboxed hosts in this process: one
whose sessions get a memory cgroup (``session_memory_limit`` auto: the kernel joins it between
fork and exec) and one without (``session_memory_limit=0``). N starts each, interleaved, one
warm-up each. The cgroup is created when the session opens and removed when it ends, outside
the timed window; both are timed separately (``create`` / ``remove``, N each). The floor
beside it: ``python -c pass`` started with a ``preexec_fn`` that joins a cgroup (as the
kernel's does) and with one that does nothing, interleaved, N each. Needs a host
that may create cgroups (root here). Not a pass/fail test; record results in RESULTS.md.

    python benchmarks/bench_cgroup.py -n 20
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_sandbox import one_start, p99
from bench_tunnel import machine
from solders.keypair import Keypair

from jupyter_io.identity import write_keypair
from provider_host.cgroups import SessionCgroup
from provider_host.config import ProviderConfig
from provider_host.server import ProviderServer

MODES = {"no cgroup": "0", "cgroup": "auto"}


def exec_floor(cgroup: SessionCgroup, n: int) -> dict[str, list[float]]:
    """Seconds to run ``python -c pass`` joining ``cgroup`` before exec, and not."""
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    fd = cgroup.open_procs()
    preexec = {"no cgroup": lambda: None, "cgroup": lambda: os.write(fd, b"0") and None}
    try:
        for i in range(n + 1):
            for mode in list(MODES) if i % 2 == 0 else list(MODES)[::-1]:
                began = time.perf_counter()
                subprocess.run([sys.executable, "-c", "pass"], check=True, preexec_fn=preexec[mode])
                if i:  # the first round warms up
                    times[mode].append(time.perf_counter() - began)
    finally:
        os.close(fd)
    return times


def row(what: str, times: dict[str, list[float]]) -> list[str]:
    off, on = times["no cgroup"], times["cgroup"]
    diffs = [b - a for a, b in zip(off, on, strict=True)]
    med_off, med_on = statistics.median(off) * 1e3, statistics.median(on) * 1e3
    tail_off, tail_on = p99(off) * 1e3, p99(on) * 1e3
    return [
        f"| {what}, median | {med_off:.1f} | {med_on:.1f} | {med_on / med_off:.3f} | "
        f"{statistics.median(diffs) * 1e3:.1f} |",
        f"| {what}, p99 | {tail_off:.1f} | {tail_on:.1f} | {tail_on / tail_off:.3f} | |",
    ]


async def run(n: int) -> tuple[dict[str, list[float]], ...]:
    user = Keypair()
    with tempfile.TemporaryDirectory(prefix="bench-cgroup-") as scratch:
        root = Path(scratch)
        host_key = write_keypair(Keypair(), root / "host.json")
        servers = {}
        for mode, limit in MODES.items():
            config = ProviderConfig(
                listen="127.0.0.1:0",
                allow=[str(user.pubkey())],
                keypair_path=str(host_key),
                workspace_root=str(root / f"ws-{limit}"),
                session_memory_limit=limit,
            )
            servers[mode] = ProviderServer(config, stdout=io.StringIO())
            await servers[mode].startup()
        tree = servers["cgroup"].cgroups
        if tree is None:
            raise SystemExit("this host cannot create cgroups: nothing to measure")
        try:
            for server in servers.values():
                await one_start(server, user)
            times: dict[str, list[float]] = {mode: [] for mode in MODES}
            for i in range(n):
                for mode in list(MODES) if i % 2 == 0 else list(MODES)[::-1]:
                    times[mode].append(await one_start(servers[mode], user))
            churn: dict[str, list[float]] = {"create": [], "remove": []}
            for i in range(n):
                began = time.perf_counter()
                cgroup = tree.create(f"bench-{i}")
                churn["create"].append(time.perf_counter() - began)
                began = time.perf_counter()
                cgroup.remove()
                churn["remove"].append(time.perf_counter() - began)
            cgroup = tree.create("bench-floor")
            try:
                floor = await asyncio.to_thread(exec_floor, cgroup, n)
            finally:
                cgroup.remove()
        finally:
            for server in servers.values():
                await server.shutdown()
    return times, floor, churn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=20, help="starts per mode (default 20)")
    args = parser.parse_args()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    print(f"machine: {machine()}")
    print(f"commit {commit}, euid {os.geteuid()}, n={args.n} per mode")
    times, floor, churn = asyncio.run(run(args.n))
    print("| metric | no cgroup (ms) | cgroup (ms) | ratio | added, median of pairs (ms) |")
    print("| --- | --- | --- | --- | --- |")
    print("\n".join(row("launch -> first kernel_info_reply", times)))
    print("\n".join(row("floor: `python -c pass`, preexec joins a cgroup or not", floor)))
    for what, values in churn.items():
        print(
            f"cgroup {what} (at session open/end, untimed above): median "
            f"{statistics.median(values) * 1e3:.2f} ms, p99 {p99(values) * 1e3:.2f} ms"
        )
    print(f"load after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
