"""The time the session sandbox adds to a kernel's start (issue 11).

Starts two provider hosts in this process, on loopback, in the same run: one with
``isolation=sandbox`` (the default: bubblewrap, and a uid of its own per session when run as
root) and one with ``isolation=none`` (the kernel runs as the host's user, as before issue 11).
Then, N times each, interleaved (sandbox, none, none, sandbox, ...), a client opens a session
over the real tunnel, sends LAUNCH and at once a ``kernel_info_request``, and times LAUNCH →
the first ``kernel_info_reply`` (the host writes the connection file, starts the kernel —
bwrap, setpriv and the interpreter for the sandbox — and ipykernel binds its sockets and
answers); then it ENDs the session (kernel killed, workspace deleted, uid released) before the
next start. One warm-up start per mode first. Prints median, p99, the sandbox/none ratio and
the added time (median of the interleaved pairs' differences). Beside it, the floor: the same
interpreter running ``pass`` directly and inside the sandbox host's bwrap command (the exec
cost of bwrap and setpriv alone), interleaved as well. Not a pass/fail test; record
results in RESULTS.md (target: the sandbox adds at most 50 ms).

    python benchmarks/bench_sandbox.py            # N=20 each, ~1 min on 2 cores
    python benchmarks/bench_sandbox.py -n 5 --json out.json
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_tunnel import machine
from solders.keypair import Keypair

from jupyter_io.identity import write_keypair
from jupyter_io.protocol import Channel, FrameKind
from provider_host.config import ProviderConfig
from provider_host.server import ProviderServer
from tests.provider_host.conftest import TunnelClient

MODES = ("sandbox", "none")


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


async def start_host(mode: str, root: Path, user: Keypair, host_key: Path) -> ProviderServer:
    config = ProviderConfig(
        listen="127.0.0.1:0",
        allow=[str(user.pubkey())],
        keypair_path=str(host_key),
        workspace_root=str(root / f"ws-{mode}"),
        isolation=mode,
    )
    server = ProviderServer(config, stdout=io.StringIO())
    await server.startup()
    return server


async def one_start(server: ProviderServer, user: Keypair) -> float:
    """Seconds from LAUNCH to the first kernel_info_reply of a fresh session."""
    client = TunnelClient(server.url, user)
    await client.connect()
    try:
        began = time.perf_counter()
        await client.send_control(
            FrameKind.LAUNCH, {"key": client.key, "signature_scheme": "hmac-sha256", "env": {}}
        )
        msg_id = await client.request(Channel.SHELL, "kernel_info_request", {})
        await client.message(
            Channel.SHELL, lambda m: m["parent_header"].get("msg_id") == msg_id, 60
        )
        elapsed = time.perf_counter() - began
        await client.send_control(FrameKind.END, {})
        await client.wait_closed(30)
        return elapsed
    finally:
        await client.disconnect()


def exec_floor(server: ProviderServer, root: Path, n: int) -> dict[str, list[float]]:
    """Seconds to run ``python -c pass`` directly and in the sandbox's bwrap command."""
    sandbox = server.sandbox
    assert sandbox is not None
    user = sandbox.users.acquire() if sandbox.users is not None else None
    workspace, runtime = root / "floor-ws", root / "floor-rt"
    for path in (workspace, runtime):
        path.mkdir()
        if user is not None:
            os.chown(path, user.uid, user.gid)
    prefix = sandbox.argv(workspace=workspace, runtime_dir=runtime, gpus=(), user=user)
    command = [sys.executable, "-c", "pass"]
    times: dict[str, list[float]] = {"sandbox": [], "none": []}
    try:
        for i in range(n + 1):
            for mode in MODES if i % 2 == 0 else MODES[::-1]:
                argv = [*prefix, *command] if mode == "sandbox" else command
                began = time.perf_counter()
                subprocess.run(argv, check=True, cwd=workspace, env={"PATH": os.defpath})
                if i:  # the first round warms up
                    times[mode].append(time.perf_counter() - began)
    finally:
        if user is not None and sandbox.users is not None:
            sandbox.users.release(user)
    return times


def summary(times: dict[str, list[float]]) -> dict[str, object]:
    diffs = [s - u for s, u in zip(times["sandbox"], times["none"], strict=True)]
    return {
        "n": len(diffs),
        "median_ms": {m: statistics.median(t) * 1e3 for m, t in times.items()},
        "p99_ms": {m: p99(t) * 1e3 for m, t in times.items()},
        "ratio": statistics.median(times["sandbox"]) / statistics.median(times["none"]),
        "added_ms_median_of_pairs": statistics.median(diffs) * 1e3,
        "samples_ms": {m: [round(x * 1e3, 2) for x in t] for m, t in times.items()},
    }


async def run(n: int) -> dict[str, object]:
    user = Keypair()
    with tempfile.TemporaryDirectory(prefix="bench-sandbox-") as scratch:
        root = Path(scratch)
        host_key = write_keypair(Keypair(), root / "host.json")
        servers = {mode: await start_host(mode, root, user, host_key) for mode in MODES}
        try:
            for mode in MODES:  # warm-up: page cache, imports
                await one_start(servers[mode], user)
            times: dict[str, list[float]] = {mode: [] for mode in MODES}
            for i in range(n):
                order = MODES if i % 2 == 0 else MODES[::-1]
                for mode in order:
                    times[mode].append(await one_start(servers[mode], user))
            floor = await asyncio.to_thread(exec_floor, servers["sandbox"], root, n)
        finally:
            for server in servers.values():
                await server.shutdown()
    return {"kernel_start": summary(times), "exec_floor": summary(floor)}


def render(result: dict[str, dict[str, object]]) -> str:
    lines = [
        "| metric | none (ms) | sandbox (ms) | ratio | added, median of pairs (ms) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for key, what in (
        ("kernel_start", "launch -> first kernel_info_reply"),
        ("exec_floor", "floor: `python -c pass`, direct vs in bwrap + setpriv"),
    ):
        figures = result[key]
        med, tail = figures["median_ms"], figures["p99_ms"]
        assert isinstance(med, dict) and isinstance(tail, dict)
        added = figures["added_ms_median_of_pairs"]
        lines.append(
            f"| {what}, median | {med['none']:.1f} | {med['sandbox']:.1f} | "
            f"{med['sandbox'] / med['none']:.3f} | {added:.1f} |"
        )
        lines.append(
            f"| {what}, p99 | {tail['none']:.1f} | {tail['sandbox']:.1f} | "
            f"{tail['sandbox'] / tail['none']:.3f} | |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=20, help="starts per mode (default 20)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    print(f"machine: {machine()}")
    print(f"commit {commit}, euid {os.geteuid()}, n={args.n} per mode")
    result = asyncio.run(run(args.n))
    print(render(result))
    print(f"load after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
