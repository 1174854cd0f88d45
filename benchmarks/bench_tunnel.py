"""The kernel tunnel against a local ipykernel, side by side in one run (issue 2's targets).

Starts a real provider host subprocess on loopback and, in this process, a local ipykernel
(``AsyncKernelManager``, the usual local provisioner) and a tunnelled one (the same
``AsyncKernelManager`` with the ``io-remote`` provisioner: local ZMQ facade → websocket →
provider host → ipykernel over IPC). Every figure is measured on both, interleaved
(local, tunnel, tunnel, local, ...), with the same lean client (``_wire_client.py``, raw ZMQ:
its own cost is small and the same on both sides):

1. ``1+1`` execute_request → execute_reply and → iopub idle: median, p99, ratio; beside
   them the floors measured in the same loop (websocket echo and pyzmq echo between two
   processes: the least a facade + websocket + provider hop can add), then the local kernel
   against itself through two C-level forwarders (libzmq's ``zmq_proxy``, one in this
   process and one in another: the tunnel's shape with no Python per message).
2. iopub throughput: bulk stdout (1 MB writes, MB/s) and many small stream messages
   (``print(i, flush=True)``, msgs/s), with the CPU each process spent per MB / per message
   and a check that every printed line arrived before the idle status.
3. binary comm buffers from the kernel (100 MB in 1 MB buffers, MB/s), with raw websockets
   throughput between two processes as the floor.
4. cold start: ``start_kernel()`` → first kernel_info_reply (a new tunnel session each time).
5. provider host RSS per idle session (a fresh host; 10 sessions), and the kernels' own RSS.
6. WAN: the tunnel through an in-process proxy adding 25 ms each way (50 ms RTT): an
   execute should cost one RTT more than locally; a cold start shows its round trips.

It prints a table (figures, ratio, target, met?). Not a pass/fail test. The machines are
shared: repeat a run that was obviously disturbed, and record results with date and machine
in ``benchmarks/RESULTS.md``.

    python benchmarks/bench_tunnel.py            # full, ~1.5 min
    python benchmarks/bench_tunnel.py --quick    # ~30 s
    python benchmarks/bench_tunnel.py --only rtt,comm --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ipykernel
import jupyter_client
import psutil
import websockets
import zmq
import zmq.asyncio
from _floors import EchoPeers, ProxyChain, WsSender
from _latency_proxy import LatencyProxy
from _provider import (
    LOCAL_SPEC,
    ProviderHost,
    install_remote_spec,
    install_specs,
    start_host,
)
from _wire_client import Execution, IopubCounter, WireClient
from jupyter_client.manager import AsyncKernelManager

MB = 1024 * 1024
BENCHES = ("rtt", "iopub", "comm", "wan", "cold", "memory")


@dataclass(frozen=True)
class Sizes:
    rtt: int
    bulk_mb: int
    bulk_reps: int
    small_msgs: int
    small_reps: int
    comm_mb: int
    comm_reps: int
    cold_reps: int
    sessions: int
    wan_execs: int
    wan_cold: int


FULL = Sizes(1000, 50, 7, 10_000, 5, 100, 7, 7, 10, 40, 3)
QUICK = Sizes(100, 20, 2, 3_000, 2, 100, 2, 2, 3, 15, 1)


@dataclass
class Row:
    """One line of the result table."""

    bench: str
    metric: str
    unit: str
    local: float | None
    tunnel: float
    target: str = ""
    ok: bool | None = None
    ratio: float | None = None

    def __post_init__(self) -> None:
        if self.ratio is None and self.local:
            self.ratio = self.tunnel / self.local


# -- statistics ----------------------------------------------------------------------------


def p99(values: Sequence[float]) -> float:
    """The 99th percentile (nearest rank)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


def ms(seconds: float) -> float:
    return seconds * 1000.0


# -- kernels -------------------------------------------------------------------------------


@dataclass
class Kernel:
    km: AsyncKernelManager
    client: WireClient


async def start_kernel(name: str, ctx: zmq.asyncio.Context) -> Kernel:
    km = AsyncKernelManager(kernel_name=name)
    await asyncio.wait_for(km.start_kernel(stderr=subprocess.DEVNULL), 90)
    client = WireClient(km.get_connection_info(), ctx)
    await client.wait_ready()
    return Kernel(km, client)


async def stop_kernel(kernel: Kernel) -> None:
    kernel.client.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(kernel.km.shutdown_kernel(now=True), 30)


async def interleave(
    n: int, local: Callable[[], Awaitable[Any]], tunnel: Callable[[], Awaitable[Any]]
) -> tuple[list[Any], list[Any]]:
    """Run local and tunnel ``n`` times each, alternating which goes first."""
    a: list[Any] = []
    b: list[Any] = []
    for i in range(n):
        if i % 2 == 0:
            a.append(await local())
            b.append(await tunnel())
        else:
            b.append(await tunnel())
            a.append(await local())
    return a, b


# -- 1. execute round trip -----------------------------------------------------------------


async def bench_rtt(local: Kernel, remote: Kernel, ctx: zmq.asyncio.Context, n: int) -> list[Row]:
    floors = EchoPeers()
    try:
        await floors.open()
        for _ in range(20):  # warm-up: imports, caches, TCP windows
            await local.client.execute("1+1")
            await remote.client.execute("1+1")
        ls: list[Execution] = []
        ts: list[Execution] = []
        ws: list[float] = []
        zs: list[float] = []

        async def step(which: int) -> None:
            if which == 0:
                ls.append(await local.client.execute("1+1"))
            elif which == 1:
                ts.append(await remote.client.execute("1+1"))
            elif which == 2:
                ws.append(await floors.ws_rtt())
            else:
                zs.append(await floors.zmq_rtt())

        for i in range(n):  # rotate the order: A B C D, B C D A, ...
            for j in range(4):
                await step((i + j) % 4)
    finally:
        await floors.close()
    rows = []
    for what, attr in (("-> reply", "reply"), ("-> idle", "idle")):
        lv = [getattr(e, attr) for e in ls]
        tv = [getattr(e, attr) for e in ts]
        lm, tm = statistics.median(lv), statistics.median(tv)
        lp, tp = p99(lv), p99(tv)
        rows.append(
            Row("1 rtt", f"1+1 {what} median", "ms", ms(lm), ms(tm), "≤1.10x", tm / lm <= 1.10)
        )
        rows.append(
            Row("1 rtt", f"1+1 {what} p99", "ms", ms(lp), ms(tp), "≤1.20x", tp / lp <= 1.20)
        )
    lm = statistics.median(e.reply for e in ls)
    added = statistics.median(t.reply - lc.reply for lc, t in zip(ls, ts, strict=True))
    wm, zm = statistics.median(ws), statistics.median(zs)
    rows += [
        Row("1 rtt", "added per reply (median of pairs)", "ms", None, ms(added)),
        Row("1 rtt", "  floor: websocket echo RTT, 500 B", "ms", None, ms(wm)),
        Row("1 rtt", "  floor: pyzmq asyncio DEALER/ROUTER echo RTT", "ms", None, ms(zm)),
        Row(
            "1 rtt",
            "  floor: least the tunnel can add (ws + zmq); best ratio",
            "ms",
            None,
            ms(wm + zm),
            ratio=(lm + wm + zm) / lm,
        ),
    ]
    return rows + await bench_forwarders(local, ctx, n // 2)


async def bench_forwarders(
    local: Kernel, ctx: zmq.asyncio.Context, n: int, processes: int = 1, bench: str = "1 rtt"
) -> list[Row]:
    """The local kernel directly vs the same kernel through C-level forwarders: one in this
    process and ``processes`` more in a chain (:class:`_floors.ProxyChain`).

    Run after the tunnel's round trips, not among them: iopub is broadcast, so while the
    chain is connected every message of either client also travels the other's path. The
    chain's forwarding of the direct client's messages (cheap, in C) lands on the direct
    side's time, so the ratio errs low: a lower bound for any bridge of that shape.
    """
    chain = ProxyChain(local.km.get_connection_info(), processes)
    chained = WireClient(chain.info, ctx)
    try:
        await chained.wait_ready()
        for _ in range(20):
            await local.client.execute("1+1")
            await chained.execute("1+1")
        ds, cs = await interleave(
            n, lambda: local.client.execute("1+1"), lambda: chained.execute("1+1")
        )
    finally:
        chained.close()
        chain.close()
    return [
        Row(
            bench,
            f"  floor: {metric} via C forwarders (zmq_proxy x{processes + 1}), same kernel",
            "ms",
            ms(stat([e.reply for e in ds])),
            ms(stat([e.reply for e in cs])),
        )
        for metric, stat in (("median", statistics.median), ("p99", p99))
    ]


# -- 2. iopub throughput -------------------------------------------------------------------


@dataclass
class Throughput:
    """One throughput run: seconds, what arrived, and CPU seconds each process spent."""

    elapsed: float
    counter: IopubCounter
    cpu: dict[str, float]
    #: stream lines that arrived after the request's idle status
    late_lines: int = 0


def cpu_seconds(procs: dict[str, psutil.Process]) -> dict[str, float]:
    out = {}
    for name, proc in procs.items():
        times = proc.cpu_times()
        out[name] = times.user + times.system
    return out


def kernel_process(kernel: Kernel) -> psutil.Process:
    """The kernel's process (the provider host's child for a tunnelled kernel)."""
    provisioner = kernel.km.provisioner
    pid = getattr(provisioner, "kernel_pid", None) or provisioner.pid  # type: ignore[union-attr]
    return psutil.Process(pid)


async def bench_iopub(local: Kernel, remote: Kernel, host: ProviderHost, sizes: Sizes) -> list[Row]:
    setup = "import sys\n_chunk = 'x' * (1 << 20)\n"
    for k in (local, remote):
        await k.client.execute(setup)
    bulk = f"for _ in range({sizes.bulk_mb}):\n    sys.stdout.write(_chunk); sys.stdout.flush()\n"
    small = f"for _i in range({sizes.small_msgs}):\n    print(_i, flush=True)\n"
    me = psutil.Process()
    local_procs = {"kernel": kernel_process(local), "client": me}
    remote_procs = {"kernel": kernel_process(remote), "client": me, "host": host.process}

    def runner(
        k: Kernel, code: str, procs: dict[str, psutil.Process]
    ) -> Callable[[], Awaitable[Throughput]]:
        async def run() -> Throughput:
            counter = IopubCounter()
            before = cpu_seconds(procs)
            ex = await k.client.execute(code, counter, timeout=300)
            after = cpu_seconds(procs)
            late = await k.client.late_stream_lines(0.3)  # output after idle: late, not lost
            return Throughput(ex.idle, counter, {n: after[n] - before[n] for n in procs}, late)

        return run

    def cpu_rows(
        ls: list[Throughput], ts: list[Throughput], unit: str, amount: Callable[[Throughput], float]
    ) -> list[Row]:
        rows = []
        for name, label in (
            ("kernel", "kernel"),
            ("client", "this process: client (+ facade when tunnelled)"),
            ("host", "provider host (bridge)"),
        ):
            lv = [r.cpu[name] / amount(r) * 1e6 for r in ls] if name != "host" else None
            tv = [r.cpu[name] / amount(r) * 1e6 for r in ts]
            rows.append(
                Row(
                    "2 iopub",
                    f"  CPU per {unit}: {label}",
                    "us",
                    statistics.median(lv) if lv else None,
                    statistics.median(tv),
                )
            )
        return rows

    ls, ts = await interleave(
        sizes.bulk_reps, runner(local, bulk, local_procs), runner(remote, bulk, remote_procs)
    )
    for r in ls + ts:
        assert r.counter.stream_bytes >= sizes.bulk_mb * MB, r.counter
    lr = statistics.median(r.counter.stream_bytes / MB / r.elapsed for r in ls)
    tr = statistics.median(r.counter.stream_bytes / MB / r.elapsed for r in ts)
    rows = [
        Row(
            "2 iopub",
            f"bulk stdout {sizes.bulk_mb} MB (1 MB writes)",
            "MB/s",
            lr,
            tr,
            "≥0.95x",
            tr / lr >= 0.95,
        ),
        *cpu_rows(ls, ts, "MB", lambda r: r.counter.stream_bytes / MB),
    ]

    ls, ts = await interleave(
        sizes.small_reps, runner(local, small, local_procs), runner(remote, small, remote_procs)
    )
    lr = statistics.median(r.counter.stream_messages / r.elapsed for r in ls)
    tr = statistics.median(r.counter.stream_messages / r.elapsed for r in ts)
    msgs = statistics.median(r.counter.stream_messages for r in ls + ts)
    rows += [
        Row(
            "2 iopub",
            f"small stream msgs ({msgs:.0f}/run)",
            "msg/s",
            lr,
            tr,
            "≥0.95x",
            tr / lr >= 0.95,
        ),
        *cpu_rows(ls, ts, "msg", lambda r: r.counter.stream_messages),
        Row(
            "2 iopub",
            f"  printed lines missing at idle, all {sizes.small_reps} runs",
            "lines",
            sum(sizes.small_msgs - r.counter.stream_lines for r in ls),
            sum(sizes.small_msgs - r.counter.stream_lines for r in ts),
            "0",
            all(r.counter.stream_lines == sizes.small_msgs for r in ls + ts),
            ratio=0.0,
        ),
        Row(
            "2 iopub",
            "  ... of which arrived after idle (late)",
            "lines",
            sum(r.late_lines for r in ls),
            sum(r.late_lines for r in ts),
            ratio=0.0,
        ),
    ]
    return rows


# -- 3. comm buffers -----------------------------------------------------------------------


async def bench_comm(local: Kernel, remote: Kernel, sizes: Sizes) -> list[Row]:
    setup = (
        "import os\nfrom comm import create_comm\n"
        "_buf = os.urandom(1 << 20)\n_comm = create_comm(target_name='jio_bench')\n"
    )
    for k in (local, remote):
        await k.client.execute(setup)
    code = f"for _ in range({sizes.comm_mb}):\n    _comm.send(data={{}}, buffers=[_buf])\n"

    def runner(k: Kernel) -> Callable[[], Awaitable[tuple[float, IopubCounter]]]:
        async def run() -> tuple[float, IopubCounter]:
            counter = IopubCounter()
            ex = await k.client.execute(code, counter, timeout=300)
            assert counter.buffer_bytes == sizes.comm_mb * MB, counter
            return ex.idle, counter

        return run

    floor = WsSender(MB, sizes.comm_mb)
    try:
        await runner(local)()  # warm-up
        await runner(remote)()
        await floor.measure()
        ls: list[tuple[float, IopubCounter]] = []
        ts: list[tuple[float, IopubCounter]] = []
        fs: list[float] = []
        run_local, run_remote = runner(local), runner(remote)

        async def step(which: int) -> None:
            if which == 0:
                ls.append(await run_local())
            elif which == 1:
                ts.append(await run_remote())
            else:
                fs.append(await floor.measure())

        for i in range(sizes.comm_reps):  # rotate the order: A B C, B C A, C A B, ...
            for j in range(3):
                await step((i + j) % 3)
    finally:
        floor.close()
    lr = statistics.median(c.buffer_bytes / MB / t for t, c in ls)
    tr = statistics.median(c.buffer_bytes / MB / t for t, c in ts)
    tmin = min(c.buffer_bytes / MB / t for t, c in ts)
    fr = statistics.median(fs)
    return [
        Row(
            "3 comm",
            f"{sizes.comm_mb} MB in 1 MB buffers, median",
            "MB/s",
            lr,
            tr,
            "≥300 MB/s",
            tr >= 300,
        ),
        Row("3 comm", "  same, slowest run", "MB/s", None, tmin),
        Row(
            "3 comm",
            "  floor: raw websockets 1 MB msgs, process→process",
            "MB/s",
            None,
            fr,
            ratio=tr / fr,
        ),
    ]


# -- 4. cold start -------------------------------------------------------------------------


async def cold_start(name: str, ctx: zmq.asyncio.Context) -> tuple[float, float]:
    """Seconds until ``start_kernel()`` returned, and until the first kernel_info_reply."""
    start = time.perf_counter()
    km = AsyncKernelManager(kernel_name=name)
    await asyncio.wait_for(km.start_kernel(stderr=subprocess.DEVNULL), 90)
    started = time.perf_counter() - start
    client = WireClient(km.get_connection_info(), ctx)
    try:
        await client.kernel_info(timeout=60)
        return started, time.perf_counter() - start
    finally:
        client.close()
        await asyncio.wait_for(km.shutdown_kernel(now=True), 30)


async def bench_cold(remote_spec: str, ctx: zmq.asyncio.Context, reps: int) -> list[Row]:
    await cold_start(LOCAL_SPEC, ctx)  # warm-up: imports, disk cache
    await cold_start(remote_spec, ctx)
    ls, ts = await interleave(
        reps, lambda: cold_start(LOCAL_SPEC, ctx), lambda: cold_start(remote_spec, ctx)
    )
    lm, tm = statistics.median(x[1] for x in ls), statistics.median(x[1] for x in ts)
    return [
        Row(
            "4 cold",
            f"start_kernel → kernel_info, median of {reps}",
            "ms",
            ms(lm),
            ms(tm),
            "≤1.5x",
            tm / lm <= 1.5,
        ),
        Row(
            "4 cold", "  same, slowest", "ms", ms(max(x[1] for x in ls)), ms(max(x[1] for x in ts))
        ),
        Row(
            "4 cold",
            "  of which start_kernel() returned, median",
            "ms",
            ms(statistics.median(x[0] for x in ls)),
            ms(statistics.median(x[0] for x in ts)),
        ),
    ]


# -- 5. provider memory per idle session ---------------------------------------------------


def rss(proc: psutil.Process) -> int:
    return int(proc.memory_info().rss)


async def settle() -> None:
    await asyncio.sleep(1.0)


async def bench_memory(tmp: Path, spec_root: Path, ctx: zmq.asyncio.Context, n: int) -> list[Row]:
    host = start_host(tmp / "host-mem")
    try:
        spec = install_remote_spec(spec_root, "bench-mem", host.url, host.user_keypair)
        proc = host.process
        fresh = rss(proc)
        # One session opened and ended first, so lazy imports and first-use caches of the
        # host are not charged to the sessions measured.
        await stop_kernel(await start_kernel(spec, ctx))
        await settle()
        before = rss(proc)
        kernels = []
        for _ in range(n):
            kernels.append(await start_kernel(spec, ctx))
        for k in kernels:  # every session has carried traffic
            await k.client.execute("1+1")
        await settle()
        after = rss(proc)
        kernel_procs = host.kernels()
        kernel_rss = [rss(p) for p in kernel_procs]
        # What idle sessions cost in CPU: timers, keepalives (the kernels' own, apart).
        idle_s = 3.0
        host_cpu = cpu_seconds({"host": proc})["host"]
        kernels_cpu = sum(cpu_seconds({"k": p})["k"] for p in kernel_procs)
        await asyncio.sleep(idle_s)
        host_idle = (cpu_seconds({"host": proc})["host"] - host_cpu) / idle_s
        kernels_idle = (
            sum(cpu_seconds({"k": p})["k"] for p in kernel_procs) - kernels_cpu
        ) / idle_s
        for k in kernels:
            await stop_kernel(k)
        await settle()
        ended = rss(proc)
    finally:
        host.stop()
    per = (after - before) / n / MB
    return [
        Row(
            "5 memory",
            f"provider RSS per idle session ({n} sessions)",
            "MB",
            None,
            per,
            "≤2 MB",
            per <= 2.0,
        ),
        Row(
            "5 memory",
            f"  provider RSS: fresh {fresh / MB:.0f}, before {before / MB:.0f}, "
            f"after end {ended / MB:.0f}; with sessions",
            "MB",
            None,
            after / MB,
        ),
        Row(
            "5 memory",
            f"provider CPU with {n} idle sessions (% of a core; kernels apart: "
            f"{100 * kernels_idle:.1f}%)",
            "%",
            None,
            100 * host_idle,
        ),
        Row(
            "5 memory",
            f"kernel RSS, median of {len(kernel_rss)} (not the bridge's)",
            "MB",
            None,
            statistics.median(kernel_rss) / MB if kernel_rss else float("nan"),
        ),
    ]


# -- 6. WAN --------------------------------------------------------------------------------


async def ws_rtt(kernel: Kernel, n: int = 10) -> float:
    """Median websocket ping RTT of a tunnelled kernel's connection."""
    ws = kernel.km.provisioner.tunnel.bridge.ws  # type: ignore[union-attr]
    values = []
    for _ in range(n):
        pong = await ws.ping()
        values.append(await pong)
    return statistics.median(values)


async def bench_wan(
    host: ProviderHost, spec_root: Path, local: Kernel, ctx: zmq.asyncio.Context, sizes: Sizes
) -> list[Row]:
    proxy = LatencyProxy(("127.0.0.1", host.port), one_way=0.025)
    await proxy.start()
    spec = install_remote_spec(spec_root, "bench-wan", proxy.url, host.user_keypair)
    try:
        wan = await start_kernel(spec, ctx)
        try:
            rtt = await ws_rtt(wan)
            for _ in range(5):
                await wan.client.execute("1+1")
            ls, ts = await interleave(
                sizes.wan_execs,
                lambda: local.client.execute("1+1"),
                lambda: wan.client.execute("1+1"),
            )
        finally:
            await stop_kernel(wan)
        rows = [Row("6 WAN", "websocket ping RTT through the proxy", "ms", None, ms(rtt))]
        for what, attr in (("reply", "reply"), ("idle", "idle")):
            lm = statistics.median(getattr(e, attr) for e in ls)
            tm = statistics.median(getattr(e, attr) for e in ts)
            trips = (tm - lm) / rtt
            rows.append(
                Row(
                    "6 WAN",
                    f"1+1 → {what}: local / WAN / (WAN-local)/RTT",
                    "ms",
                    ms(lm),
                    ms(tm),
                    "≈1 RTT",
                    trips <= 1.2,
                    ratio=trips,
                )
            )
        if sizes.wan_cold:
            lc, tc = await interleave(
                sizes.wan_cold,
                lambda: cold_start(LOCAL_SPEC, ctx),
                lambda: cold_start(spec, ctx),
            )
            for i, what in ((0, "start_kernel() returned"), (1, "first kernel_info_reply")):
                lm = statistics.median(x[i] for x in lc)
                tm = statistics.median(x[i] for x in tc)
                rows.append(
                    Row(
                        "6 WAN",
                        f"cold: {what}: local / WAN / (WAN-local)/RTT",
                        "ms",
                        ms(lm),
                        ms(tm),
                        "info",
                        None,
                        ratio=(tm - lm) / rtt,
                    )
                )
        return rows
    finally:
        await proxy.close()


# -- output --------------------------------------------------------------------------------


def machine() -> str:
    model = platform.processor() or "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{os.cpu_count()} cores ({model}), load {load}; Python {platform.python_version()}, "
        f"ipykernel {ipykernel.__version__}, jupyter_client {jupyter_client.__version__}, "
        f"pyzmq {zmq.__version__} (libzmq {zmq.zmq_version()}), websockets {websockets.__version__}"
    )


def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return ""
    if isinstance(value, int):
        return f"{value:,}"
    if unit in ("ms", "MB") or abs(value) < 100:
        return f"{value:.2f}"
    return f"{value:,.0f}"


def render(rows: list[Row]) -> str:
    header = ("bench", "metric", "unit", "local", "tunnel", "ratio", "target", "met")
    table = [header]
    for r in rows:
        ratio = "" if r.ratio in (None, 0.0) else f"{r.ratio:.2f}"
        met = "" if r.ok is None else ("yes" if r.ok else "NO")
        table.append(
            (
                r.bench,
                r.metric,
                r.unit,
                fmt(r.local, r.unit),
                fmt(r.tunnel, r.unit),
                ratio,
                r.target,
                met,
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = []
    for j, row in enumerate(table):
        cells = [
            c.ljust(w) if i < 3 or i > 5 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("| " + " | ".join(cells) + " |")
        if j == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


# -- main ----------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> list[Row]:
    sizes = QUICK if args.quick else FULL
    only = set(args.only.split(",")) if args.only else set(BENCHES)
    tmp = Path(tempfile.mkdtemp(prefix="jio-bench-"))
    spec_root = tmp / "jupyter"
    install_specs(spec_root)
    os.environ["JUPYTER_PATH"] = os.pathsep.join(
        [str(spec_root), *filter(None, [os.environ.get("JUPYTER_PATH")])]
    )
    ctx = zmq.asyncio.Context()
    rows: list[Row] = []
    host = start_host(tmp / "host")
    try:
        remote_spec = install_remote_spec(spec_root, "bench-remote", host.url, host.user_keypair)
        if only & {"rtt", "iopub", "comm", "wan"}:
            local = await start_kernel(LOCAL_SPEC, ctx)
            remote = await start_kernel(remote_spec, ctx)
            try:
                steps: list[tuple[str, Callable[[], Awaitable[list[Row]]]]] = [
                    ("rtt", lambda: bench_rtt(local, remote, ctx, sizes.rtt)),
                    ("iopub", lambda: bench_iopub(local, remote, host, sizes)),
                    ("comm", lambda: bench_comm(local, remote, sizes)),
                    ("wan", lambda: bench_wan(host, spec_root, local, ctx, sizes)),
                ]
                for name, step in steps:
                    if name in only:
                        t0 = time.perf_counter()
                        new = await step()
                        rows += new
                        print(
                            f"[{name}: {time.perf_counter() - t0:.0f} s]\n{render(new)}", flush=True
                        )
            finally:
                await stop_kernel(remote)
                await stop_kernel(local)
        if "cold" in only:
            t0 = time.perf_counter()
            new = await bench_cold(remote_spec, ctx, sizes.cold_reps)
            rows += new
            print(f"[cold: {time.perf_counter() - t0:.0f} s]\n{render(new)}", flush=True)
    finally:
        host.stop()
    if "memory" in only:
        t0 = time.perf_counter()
        new = await bench_memory(tmp, spec_root, ctx, sizes.sessions)
        rows += new
        print(f"[memory: {time.perf_counter() - t0:.0f} s]\n{render(new)}", flush=True)
    ctx.destroy(linger=0)
    shutil.rmtree(tmp, ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (< 1 min)")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {BENCHES}")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON here")
    args = parser.parse_args()
    started = time.perf_counter()
    print(
        f"# bench_tunnel {'--quick ' if args.quick else ''}"
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC\n# {machine()}",
        flush=True,
    )
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the provider host is stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    gc.collect()
    rows = asyncio.run(run(args))
    print(f"\n## all figures ({time.perf_counter() - started:.0f} s)\n{render(rows)}")
    print(f"# load after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))


if __name__ == "__main__":
    main()
