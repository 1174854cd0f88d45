"""Failover (issue 16.2): provider killed -> a new kernel ready with its state restored.

A real escrow coordinator subprocess (its embedded ledger; default heartbeats: every 5 s, lost
after 3 misses) and two provider host subprocesses linked to it, each offering a simulated
RTX 4090 at the same price and reached directly (loopback). A kernel leased through the
io-remote provisioner with ``failover`` on (every other trait at its default) makes a
namespace of 100 MB of tensors (10 x 10 MB) and 1,000 small objects; once its journal is
complete on the user's side, its provider host is SIGKILLed. Measured from the kill, with the
provisioner's progress events: the loss detected (the tunnel's refused connections,
``refused_limit``, 3 s by default), the new lease granted and its escrow verified, the kernel
started on the other provider (files pushed), the journal restored (push + load), and the total. The
target is ≤ 10 s. The restore is split as well: staging (reading, vetting and listing the
journal on this side), the transfer to the new workspace, and the kernel's load (what
:func:`kernel_provisioner.journal.restore` reports). Not a pass/fail test; record results in
RESULTS.md.

    python benchmarks/bench_failover.py            # one kill, ~40 s
    python benchmarks/bench_failover.py --runs 3   # a fresh market per run
    python benchmarks/bench_failover.py --refused-limit 1   # detection tuned down
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _provider import ProviderHost
from bench_escrow_start import EscrowCoordinator, fund, host_pubkey, join
from bench_journal import BIG_NAMESPACE
from bench_relay import install_lease_spec
from bench_tunnel import machine
from jupyter_client.manager import AsyncKernelManager
from solders.keypair import Keypair

import kernel_provisioner.failover as failover_module
import kernel_provisioner.journal as journal_module
from jupyter_io.identity import write_keypair

GPU = "RTX 4090"
PHASES = (
    "detected",
    "leased + escrowed",
    "kernel started",
    "journal restored",
    "total",
    "restore: staging",
    "restore: transfer",
    "restore: kernel load",
)

#: What the failover's restore reported, and the seconds its staging took (this run).
_SEEN: dict[str, Any] = {}


def _instrument() -> None:
    """Record the restore's own phases (the same for any version of the restore that has a
    module-level ``_stage`` and returns a RestoreResult with push_s and load_s)."""
    stage, restore = journal_module._stage, failover_module.restore

    def timed_stage(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return stage(*args, **kwargs)
        finally:
            _SEEN["stage_s"] = time.perf_counter() - start

    async def recorded(*args: Any, **kwargs: Any) -> Any:
        result = await restore(*args, **kwargs)
        _SEEN["result"] = result
        return result

    journal_module._stage = timed_stage
    failover_module.restore = recorded


async def one_run(tmp: Path, refused_limit: float | None) -> dict[str, float]:
    spec_root = tmp / "jupyter"
    os.environ["JUPYTER_PATH"] = str(spec_root)
    os.environ["JUPYTER_DATA_DIR"] = str(tmp / "data")
    user_path = write_keypair(Keypair(), tmp / "user.json")
    user = Keypair.from_json(user_path.read_text()).pubkey()
    coordinator = EscrowCoordinator(tmp / "coordinator")
    hosts: dict[str, ProviderHost] = {}
    km: AsyncKernelManager | None = None
    try:
        for name in ("h1", "h2"):
            host = join(coordinator, tmp / name)
            hosts[str(host_pubkey(tmp / name))] = host
        coordinator.wait_for_offers(2)
        await fund(f"{coordinator.url}/solana", user, *(host_pubkey(tmp / n) for n in ("h1", "h2")))
        spec = install_lease_spec(spec_root, "bench-failover", coordinator.url, user_path, GPU)
        path = spec_root / "kernels" / spec / "kernel.json"
        doc = json.loads(path.read_text())
        config = doc["metadata"]["kernel_provisioner"]["config"]
        config["failover"] = True
        if refused_limit is not None:
            config["refused_limit"] = refused_limit
        path.write_text(json.dumps(doc))

        km = AsyncKernelManager(kernel_name=spec)
        await asyncio.wait_for(km.start_kernel(), 90)
        prov: Any = km.provisioner
        kc = km.client()
        kc.start_channels()
        await kc.wait_for_ready(timeout=60)
        reply = await kc.execute_interactive(BIG_NAMESPACE, timeout=120)
        assert reply["content"]["status"] == "ok", reply["content"]
        manifest = await prov.state_journal.sync(120)
        assert manifest is not None and len(manifest.vars) == 1010, manifest

        killed_at = time.time()
        hosts[prov.lease.grant.provider].proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(prov._failover.finished.wait(), 120)
        total = time.time() - killed_at
        assert prov._failover.done, [e.message for e in prov.progress[-3:]]
        facts = prov._failover.done[-1]
        assert len(facts["restored"]) == 1010, facts["missing"][:3]
        since = [e for e in prov.progress if e.at >= killed_at - 1]
        lost = next(e.at for e in since if e.details.get("phase") == "lost")
        escrowed = next(e.at for e in since if e.step.value == "escrowed")
        ready = next(e.at for e in since if e.step.value == "ready")
        check = await kc.execute_interactive(
            "assert abs(float(t3.sum())) >= 0 and k999['i'] == 999", timeout=60
        )
        assert check["content"]["status"] == "ok", check["content"]
        kc.stop_channels()
        restored = _SEEN.pop("result")
        staging = _SEEN.pop("stage_s")
        return {
            "detected": lost - killed_at,
            "leased + escrowed": escrowed - lost,
            "kernel started": ready - escrowed,
            "journal restored": killed_at + total - ready,
            "total": total,
            "restore: staging": staging,
            "restore: transfer": restored.push_s - staging,
            "restore: kernel load": restored.load_s,
        }
    finally:
        if km is not None:
            await asyncio.wait_for(km.shutdown_kernel(now=True), 60)
        for host in hosts.values():
            host.stop()
        coordinator.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1, help="kills, each on a fresh market")
    parser.add_argument(
        "--refused-limit", type=float, help="the provisioner's refused_limit (default: 3 s)"
    )
    args = parser.parse_args()
    _instrument()
    limit = "" if args.refused_limit is None else f" --refused-limit {args.refused_limit:g}"
    now = datetime.now(timezone.utc)
    print(f"# bench_failover --runs {args.runs}{limit} {now:%Y-%m-%d %H:%M} UTC")
    print(f"machine: {machine()}; load {os.getloadavg()[0]:.2f}")
    runs = []
    for _ in range(args.runs):
        tmp = Path(tempfile.mkdtemp(prefix="jio-bench-failover-"))
        try:
            runs.append(asyncio.run(one_run(tmp, args.refused_limit)))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print("  " + ", ".join(f"{k} {v:.2f} s" for k, v in runs[-1].items()), flush=True)
        print(f"  load {os.getloadavg()[0]:.2f}", flush=True)
    print("| from the kill | median | runs |")
    print("| --- | --- | --- |")
    for phase in PHASES:
        values = [r[phase] for r in runs]
        shown = ", ".join(f"{v:.2f}" for v in values)
        print(f"| {phase} | {statistics.median(values):.2f} s | {shown} |")
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
