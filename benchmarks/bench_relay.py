"""Execute round trip through the coordinator's relay vs direct tunnel vs local (issue 3).

Starts a real coordinator subprocess (``jupyter io coordinator``, SQLite in a temporary
directory) and two provider host subprocesses linked to it: one with no public URL, offering
a simulated RTX 4090 (a lease of it is reached through the coordinator's relay, as a PC
behind a home router would be), and one advertising its tunnel URL, offering a simulated
A100 (reached directly). A host linked to a coordinator admits lease tokens only, so both
remote kernels are leased the same way and differ only by the relay hop. In this process it
starts three kernels with ``AsyncKernelManager``:

- local: a plain local ipykernel (the usual local provisioner);
- direct: the ``io-remote`` provisioner in lease mode (``coordinator_url``, ``gpu="A100"``):
  the grant names the host's own tunnel URL (bench_tunnel.py's tunnelled path, plus a lease);
- relay: the same with ``gpu="RTX 4090"``: the grant sends the tunnel through the
  coordinator's ``/relay/<lease>``.

Then ``1+1`` execute_request → execute_reply and → iopub idle, N times each, interleaved
with a rotating order (L D R, D R L, R L D, ...), with the same lean raw-ZMQ client
(``_wire_client.py``) on all three; beside them, in the same loop, websocket ping RTT of the
direct and relayed tunnels' own connections (the relay forwards pings end to end, so the
difference is the floor of the extra hop). Then, after that loop, the local kernel against
itself through C-level forwarders (libzmq's ``zmq_proxy``) in the shape of each path: one in
this process and one (direct) or two (relay) more processes, the least any bridge of that
shape adds here. Prints median, p99, ratios vs local and relay - direct. Not a pass/fail
test; record results in RESULTS.md.

    python benchmarks/bench_relay.py            # N=300, ~30 s
    python benchmarks/bench_relay.py -n 100 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import zmq
import zmq.asyncio
from _provider import LOCAL_SPEC, REPO, ProviderHost, _write_spec, install_specs, start_host
from _wire_client import Execution
from bench_tunnel import (
    Kernel,
    Row,
    bench_forwarders,
    machine,
    ms,
    p99,
    render,
    start_kernel,
    stop_kernel,
)

COORDINATOR_LISTENING = "jupyter-io coordinator listening on "
COORDINATOR_COMMAND = [
    sys.executable,
    "-c",
    "from jupyter_io.coordinator.app import CoordinatorApp; CoordinatorApp.launch_instance()",
]
GPU = "RTX 4090"  # the relayed host's
DIRECT_GPU = "A100"  # the direct host's


class Coordinator:
    """``jupyter io coordinator`` on a free loopback port, its database under ``data_dir``."""

    def __init__(self, data_dir: Path, timeout: float = 30.0) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.stderr_lines: list[str] = []
        self.proc = subprocess.Popen(
            [*COORDINATOR_COMMAND, "--listen", "127.0.0.1:0", "--data-dir", str(data_dir),
             "--CoordinatorConfig.offers_cache_ttl=0", "--CoordinatorConfig.payments=free"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=str(REPO),
            start_new_session=True,
        )  # fmt: skip
        ready = threading.Event()
        found: list[str] = []

        def read_stdout() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                if not found and line.startswith(COORDINATOR_LISTENING):
                    found.append(line[len(COORDINATOR_LISTENING) :].strip())
                    ready.set()
            ready.set()

        def read_stderr() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.stderr_lines.append(line)
                del self.stderr_lines[:-200]

        threading.Thread(target=read_stdout, daemon=True).start()
        threading.Thread(target=read_stderr, daemon=True).start()
        if not ready.wait(timeout) or not found:
            self.stop()
            raise RuntimeError(f"coordinator did not start:\n{''.join(self.stderr_lines)}")
        self.url = found[0].rstrip("/")

    def offers(self) -> list[Any]:
        with urllib.request.urlopen(f"{self.url}/api/v1/offers", timeout=10) as response:
            return list(json.loads(response.read())["providers"])

    def wait_for_offers(self, providers: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while len({row["provider"] for row in self.offers()}) < providers:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no provider linked:\n{''.join(self.stderr_lines)}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def link_args(coordinator_url: str, gpu: str) -> list[str]:
    """Provider flags: join the coordinator offering one simulated ``gpu``, no benchmark."""
    return ["--no-benchmark", "--coordinator", coordinator_url, "--simulate-gpu", f"{gpu}:24",
            "--price", "0.12"]  # fmt: skip


def install_lease_spec(root: Path, name: str, coordinator_url: str, keypair: Path, gpu: str) -> str:
    """An io-remote spec in lease mode: the kernel is leased by GPU type from the coordinator."""
    _write_spec(
        root,
        name,
        {
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": f"Leased ({name})",
            "language": "python",
            "interrupt_mode": "signal",
            "metadata": {
                "kernel_provisioner": {
                    "provisioner_name": "io-remote",
                    "config": {
                        "coordinator_url": coordinator_url,
                        "keypair_path": str(keypair),
                        "gpu": gpu,
                    },
                }
            },
        },
    )
    return name


async def ws_ping(kernel: Kernel) -> float:
    """One websocket ping RTT on a tunnelled kernel's own connection (seconds)."""
    ws = kernel.km.provisioner.tunnel.bridge.ws  # type: ignore[union-attr]
    pong = await ws.ping()
    return float(await pong)


async def bench(local: Kernel, direct: Kernel, relay: Kernel, n: int) -> list[Row]:
    for _ in range(20):  # warm-up
        for k in (local, direct, relay):
            await k.client.execute("1+1")
    runs: dict[str, list[Execution]] = {"local": [], "direct": [], "relay": []}
    pings: dict[str, list[float]] = {"direct": [], "relay": []}
    kernels = {"local": local, "direct": direct, "relay": relay}
    order = ("local", "direct", "relay")
    for i in range(n):  # rotate the order: L D R, D R L, R L D, ...
        for j in range(3):
            name = order[(i + j) % 3]
            ex = await kernels[name].client.execute("1+1")
            assert ex.status == "ok", ex
            runs[name].append(ex)
        if i % 3 == 0:
            for name in ("direct", "relay") if i % 2 == 0 else ("relay", "direct"):
                pings[name].append(await ws_ping(kernels[name]))
    rows: list[Row] = []
    for what in ("reply", "idle"):
        vals = {k: [getattr(e, what) for e in v] for k, v in runs.items()}
        lm, lp = statistics.median(vals["local"]), p99(vals["local"])
        for path, target_med in (("direct", 1.10), ("relay", 1.15)):
            tm, tp = statistics.median(vals[path]), p99(vals[path])
            rows.append(
                Row(
                    f"{path}",
                    f"1+1 -> {what} median",
                    "ms",
                    ms(lm),
                    ms(tm),
                    f"≤{target_med:.2f}x",
                    tm / lm <= target_med,
                )
            )
            rows.append(
                Row(
                    f"{path}",
                    f"1+1 -> {what} p99",
                    "ms",
                    ms(lp),
                    ms(tp),
                    "≤1.20x" if path == "direct" else "",
                    tp / lp <= 1.20 if path == "direct" else None,
                )
            )
        pairs_d = [d - lc for lc, d in zip(vals["local"], vals["direct"], strict=True)]
        pairs_r = [r - lc for lc, r in zip(vals["local"], vals["relay"], strict=True)]
        pairs_rd = [r - d for d, r in zip(vals["direct"], vals["relay"], strict=True)]
        rows += [
            Row("added", f"direct - local per {what} (median of pairs)", "ms", None,
                ms(statistics.median(pairs_d))),
            Row("added", f"relay - local per {what} (median of pairs)", "ms", None,
                ms(statistics.median(pairs_r))),
            Row("added", f"relay - direct per {what} (median of pairs)", "ms", None,
                ms(statistics.median(pairs_rd))),
            Row("added", f"relay / direct, {what} median", "x", None,
                statistics.median(vals["relay"]) / statistics.median(vals["direct"]), ratio=0.0),
        ]  # fmt: skip
    dm, rm = statistics.median(pings["direct"]), statistics.median(pings["relay"])
    rows += [
        Row("floor", f"tunnel ws ping RTT, direct (median of {len(pings['direct'])})", "ms", None,
            ms(dm)),
        Row("floor", "tunnel ws ping RTT, through the relay", "ms", None, ms(rm)),
        Row("floor", "  relay - direct ws ping (the relay hop's own cost)", "ms", None,
            ms(rm - dm)),
    ]  # fmt: skip
    return rows


async def run(args: argparse.Namespace) -> list[Row]:
    tmp = Path(tempfile.mkdtemp(prefix="jio-bench-relay-"))
    spec_root = tmp / "jupyter"
    install_specs(spec_root)
    os.environ["JUPYTER_PATH"] = os.pathsep.join(
        [str(spec_root), *filter(None, [os.environ.get("JUPYTER_PATH")])]
    )
    ctx = zmq.asyncio.Context()
    coordinator = Coordinator(tmp / "coordinator")
    hosts: list[ProviderHost] = []
    kernels: list[Kernel] = []
    try:
        # Linked to a coordinator, a host admits lease tokens only (its allow-list is
        # ignored), so the direct kernel is leased too: from a second host that advertises
        # its tunnel URL (another GPU name picks it). Same lease path, minus the relay.
        port = free_port()
        direct_host = start_host(
            tmp / "direct-host", *link_args(coordinator.url, DIRECT_GPU),
            "--public-url", f"ws://127.0.0.1:{port}/tunnel", listen=f"127.0.0.1:{port}",
        )  # fmt: skip
        hosts.append(direct_host)
        host = start_host(tmp / "relay-host", *link_args(coordinator.url, GPU))
        hosts.append(host)
        coordinator.wait_for_offers(2)
        direct_spec = install_lease_spec(
            spec_root, "bench-direct", coordinator.url, host.user_keypair, DIRECT_GPU
        )
        lease_spec = install_lease_spec(
            spec_root, "bench-lease", coordinator.url, host.user_keypair, GPU
        )
        t0 = time.perf_counter()
        local = await start_kernel(LOCAL_SPEC, ctx)
        kernels.append(local)
        direct = await start_kernel(direct_spec, ctx)
        kernels.append(direct)
        relay = await start_kernel(lease_spec, ctx)
        kernels.append(relay)
        grant = relay.km.provisioner.lease.grant  # type: ignore[union-attr]
        assert grant.relay and "/relay/" in grant.tunnel_url, grant
        dgrant = direct.km.provisioner.lease.grant  # type: ignore[union-attr]
        assert not dgrant.relay and dgrant.tunnel_url == direct_host.url, dgrant
        print(
            f"# kernels up in {time.perf_counter() - t0:.1f} s; relay tunnel "
            f"{grant.tunnel_url.split('?')[0]}",
            flush=True,
        )
        t0 = time.perf_counter()
        rows = await bench(local, direct, relay, args.n)
        # The least a bridge of each shape adds with no Python per message: a forwarder
        # beside the client and one more process (direct) or two (relay, then host).
        for processes in (1, 2):
            rows += await bench_forwarders(local, ctx, args.n // 2, processes, "floor")
        print(f"[rtt: {time.perf_counter() - t0:.0f} s, n={args.n} each]", flush=True)
        return rows
    finally:
        for k in reversed(kernels):
            await stop_kernel(k)
        for h in hosts:
            h.stop()
        coordinator.stop()
        ctx.destroy(linger=0)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=300, help="round trips per kernel (300)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON here")
    args = parser.parse_args()
    started = time.perf_counter()
    print(
        f"# bench_relay -n {args.n} {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC\n# {machine()}",
        flush=True,
    )
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    rows = asyncio.run(run(args))
    print(f"\n## relay vs direct vs local ({time.perf_counter() - started:.0f} s)\n{render(rows)}")
    print(f"# load after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
