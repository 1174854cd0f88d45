"""The time a lease's escrow adds to a kernel's start (issue 4).

Starts two real coordinator subprocesses in the same run: one with ``payments=free`` (the
lease's token comes at once) and one with ``payments=escrow`` (the default: its embedded
ledger, LiteSVM behind ``{coordinator}/solana``), each with one provider host subprocess
linked to it that advertises its tunnel URL (reached directly, no relay), offering a
simulated RTX 4090. The user's and the provider's wallets are airdropped on the escrow
coordinator's ledger. Then, N times each, interleaved (free, escrow, escrow, free, ...), a
kernel is started in this process with ``AsyncKernelManager`` and the io-remote provisioner
in lease mode (the same kernelspec but for the coordinator's URL), and shut down (which ends
the lease; the escrow coordinator then settles in the background, on its own process).

Measured per start: the wall time of ``start_kernel()`` (lease → escrow → token → tunnel →
the provider's ipykernel → ready), and, from the provisioner's progress events, the time
from the lease request to a lease with its token (``queued`` → ``leased`` for free, ``queued``
→ ``escrowed`` for escrow: the escrow's setup transaction, its on-chain verification by the
coordinator, the token). Prints medians, p90, the escrow/free ratio and the added time
(median of the interleaved pairs). Not a pass/fail test; record results in RESULTS.md.

    python benchmarks/bench_escrow_start.py          # N=15 each, ~1 min
    python benchmarks/bench_escrow_start.py -n 5 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _provider import ProviderHost, start_host
from bench_relay import COORDINATOR_COMMAND, Coordinator, free_port, install_lease_spec, link_args
from bench_tunnel import Row, machine, ms, render
from jupyter_client.manager import AsyncKernelManager
from solders.keypair import Keypair
from solders.pubkey import Pubkey

from jupyter_io.identity import write_keypair
from jupyter_io.payments.amounts import LAMPORTS_PER_SOL
from jupyter_io.payments.escrow import EscrowClient

GPU = "RTX 4090"


class EscrowCoordinator(Coordinator):
    """:class:`bench_relay.Coordinator` (which runs ``payments=free``) in escrow mode: the
    same process, its ``payments=free`` argument turned into ``payments=escrow`` before the
    app parses its command line."""

    COMMAND = [
        *COORDINATOR_COMMAND[:2],
        "import sys; sys.argv[1:] = [a.replace('payments=free', 'payments=escrow') "
        "for a in sys.argv[1:]]; " + COORDINATOR_COMMAND[2],
    ]

    def __init__(self, data_dir: Path, timeout: float = 30.0) -> None:
        import bench_relay

        saved = bench_relay.COORDINATOR_COMMAND
        bench_relay.COORDINATOR_COMMAND = self.COMMAND
        try:
            super().__init__(data_dir, timeout)
        finally:
            bench_relay.COORDINATOR_COMMAND = saved


def table(rows: list[Row]) -> str:
    """bench_tunnel's table, its columns named for this benchmark (free | escrow)."""
    lines = render(rows).splitlines()
    cells = lines[0].split("|")
    for index, name in ((4, "free"), (5, "escrow")):  # were local, tunnel
        cells[index] = f" {name.rjust(len(cells[index]) - 2)} "
    lines[0] = "|".join(cells)
    return "\n".join(lines)


def p90(values: Sequence[float]) -> float:
    """The 90th percentile (nearest rank)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]


def join(coordinator: Coordinator, tmp: Path) -> ProviderHost:
    """A provider linked to ``coordinator`` that advertises its own tunnel URL."""
    port = free_port()
    return start_host(
        tmp, *link_args(coordinator.url, GPU), "--public-url", f"ws://127.0.0.1:{port}/tunnel",
        listen=f"127.0.0.1:{port}",
    )  # fmt: skip


def host_pubkey(host_dir: Path) -> Pubkey:
    return Keypair.from_json((host_dir / "host.json").read_text()).pubkey()


async def fund(solana_url: str, *wallets: Pubkey) -> None:
    async with EscrowClient.connect(solana_url) as escrow:
        for wallet in wallets:
            await escrow.airdrop(wallet, 2 * LAMPORTS_PER_SOL)


async def one_start(spec: str, token_step: str) -> tuple[float, float]:
    """Start and shut down one leased kernel; (start wall time, lease request → token)."""
    km = AsyncKernelManager(kernel_name=spec)
    t0 = time.perf_counter()
    await asyncio.wait_for(km.start_kernel(stderr=subprocess.DEVNULL), 90)
    wall = time.perf_counter() - t0
    prov: Any = km.provisioner
    at = {event.step.value: event.at for event in prov.progress}
    assert token_step in at, [event.step.value for event in prov.progress]
    to_token = at[token_step] - at["queued"]
    await asyncio.wait_for(km.shutdown_kernel(now=True), 30)
    return wall, to_token


async def bench(free_spec: str, escrow_spec: str, n: int) -> list[Row]:
    await one_start(free_spec, "leased")  # warm-up: imports, first connections, multisig
    await one_start(escrow_spec, "escrowed")
    walls: dict[str, list[float]] = {"free": [], "escrow": []}
    tokens: dict[str, list[float]] = {"free": [], "escrow": []}
    for i in range(n):
        order = ("free", "escrow") if i % 2 == 0 else ("escrow", "free")
        for mode in order:
            spec, step = (free_spec, "leased") if mode == "free" else (escrow_spec, "escrowed")
            wall, to_token = await one_start(spec, step)
            walls[mode].append(wall)
            tokens[mode].append(to_token)
    rows: list[Row] = []
    for what, values in (("start_kernel() wall", walls), ("lease request -> token", tokens)):
        free, escrow = values["free"], values["escrow"]
        added = [e - f for f, e in zip(free, escrow, strict=True)]
        rows += [
            Row("escrow", f"{what} median", "ms", ms(statistics.median(free)),
                ms(statistics.median(escrow))),
            Row("escrow", f"{what} p90", "ms", ms(p90(free)), ms(p90(escrow))),
            Row("added", f"{what}: escrow - free (median of pairs)", "ms", None,
                ms(statistics.median(added))),
        ]  # fmt: skip
    return rows


async def run(args: argparse.Namespace) -> list[Row]:
    tmp = Path(tempfile.mkdtemp(prefix="jio-bench-escrow-start-"))
    spec_root = tmp / "jupyter"
    os.environ["JUPYTER_PATH"] = os.pathsep.join(
        [str(spec_root), *filter(None, [os.environ.get("JUPYTER_PATH")])]
    )
    user_path = write_keypair(Keypair(), tmp / "user.json")
    user = Keypair.from_json(user_path.read_text()).pubkey()
    coordinators: list[Coordinator] = []
    hosts: list[ProviderHost] = []
    try:
        free = Coordinator(tmp / "free-coordinator")
        coordinators.append(free)
        escrow = EscrowCoordinator(tmp / "escrow-coordinator")
        coordinators.append(escrow)
        hosts.append(join(free, tmp / "free-host"))
        hosts.append(join(escrow, tmp / "escrow-host"))
        free.wait_for_offers(1)
        escrow.wait_for_offers(1)
        await fund(f"{escrow.url}/solana", user, host_pubkey(tmp / "escrow-host"))
        free_spec = install_lease_spec(spec_root, "bench-free", free.url, user_path, GPU)
        escrow_spec = install_lease_spec(spec_root, "bench-escrow", escrow.url, user_path, GPU)
        t0 = time.perf_counter()
        rows = await bench(free_spec, escrow_spec, args.n)
        print(f"[starts: {time.perf_counter() - t0:.0f} s, n={args.n} each]", flush=True)
        return rows
    finally:
        for host in hosts:
            host.stop()
        for coordinator in coordinators:
            coordinator.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=15, help="starts per mode (15)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON here")
    args = parser.parse_args()
    started = time.perf_counter()
    print(
        f"# bench_escrow_start -n {args.n} {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC\n"
        f"# {machine()}",
        flush=True,
    )
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    rows = asyncio.run(run(args))
    print(
        f"\n## escrow vs free kernel start ({time.perf_counter() - started:.0f} s)\n{table(rows)}"
    )
    print(f"# load after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
