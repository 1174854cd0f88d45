"""What the state journal (issue 16.1) costs, in one run.

1. Kernel side, in a real IPython shell (the journal's own code, no network): a cell that
   changes 10 MB (``x = torch.randn(1280, 2048) @ w``: a 10 MB tensor from a matmul with a
   16 MB weight made beforehand) run back to back, journal on against off, interleaved; the
   cell's wall time (the next cell runs while the writer saves the last one: the writer's
   competition for the CPU counts) and the time post_run_cell spends on the execution path.
   Target: ≤ 5 %. A cell that changes nothing (``1 + 1``) in a namespace of 10 variables and
   in one of 100 MB of tensors + 1,000 small objects: post_run_cell's time. Target ≤ 1 ms.
2. End to end, real provider hosts on loopback: a namespace of 100 MB of tensors (10 x 10
   MB) and 1,000 small objects made in one cell; the time from its execute_reply until the
   journal is complete on the user's side (snapshot + carried back), then the provider
   killed and a kernel on a second provider restored from it (push + load).

    python benchmarks/bench_journal.py            # ~1 min
    python benchmarks/bench_journal.py --reps 10  # fewer cells per side in part 1
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _provider import install_remote_spec, start_host
from bench_tunnel import machine

BIG_NAMESPACE = (
    "import torch\n"
    "tensors = [torch.randn(2560, 1024) for _ in range(10)]\n"  # 10 x 10 MB
    "small = {f'k{i}': {'i': i, 's': str(i) * 5, 'l': [i, i + 1]} for i in range(1000)}\n"
    "for i, t_ in enumerate(tensors):\n    globals()[f't{i}'] = t_\n"
    "for k, v in small.items():\n    globals()[k] = v\n"
    "del t_, k, v, i, tensors, small"
)


def part1(reps: int) -> list[str]:
    import torch
    from IPython.core.interactiveshell import InteractiveShell

    from jupyter_io.journal.kernel_ext import Journal

    torch.set_num_threads(1)  # the 2-core machine: one for the cell, one for the writer
    shell = InteractiveShell.instance()
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        journal = Journal(shell, tmp)
        shell.run_cell("import torch\nw = torch.randn(2048, 2048)\nx = None")
        cell = "x = torch.randn(1280, 2048) @ w"
        on: list[float] = []
        off: list[float] = []
        checks: list[float] = []
        for i in range(2 * reps + 2):
            enabled = i % 2 == 0
            if enabled:
                shell.events.register("post_run_cell", journal.post_run_cell)
            start = time.perf_counter()
            result = shell.run_cell(cell)
            elapsed = time.perf_counter() - start
            assert result.success
            if enabled:
                shell.events.unregister("post_run_cell", journal.post_run_cell)
                checks.append(journal.last_check_s)
            if i >= 2:  # the first of each: warm-up
                (on if enabled else off).append(elapsed)
        journal.flush(60)
        med_on, med_off = statistics.median(on), statistics.median(off)
        lines.append(
            f"| cell changing 10 MB (`{cell}`), median of {reps} | {med_off * 1e3:.1f} ms | "
            f"{med_on * 1e3:.1f} ms | {100 * (med_on - med_off) / med_off:+.1f} % | "
            f"post_run_cell {statistics.median(checks) * 1e3:.2f} ms |"
        )
        shell.events.register("post_run_cell", journal.post_run_cell)
        writer: list[float] = []
        for _ in range(reps):  # the writer's own time: the cell, then wait for the snapshot
            shell.run_cell(cell)
            start = time.perf_counter()
            journal.flush(60)
            writer.append(time.perf_counter() - start)
        lines.append(
            f"| the writer's time for that snapshot (waited for after the cell), median of "
            f"{reps} | | {statistics.median(writer) * 1e3:.1f} ms | | in the background |"
        )
        for label, setup in (
            ("10 variables", "v = list(range(10))\n" + "\n".join(f"a{i} = {i}" for i in range(9))),
            ("100 MB of tensors + 1,000 small objects", BIG_NAMESPACE),
        ):
            shell.run_cell(setup)
            journal.flush(120)
            times = []
            for _ in range(20):
                shell.run_cell("1 + 1;")
                times.append(journal.last_check_s)
            lines.append(
                f"| cell changing nothing (`1 + 1;`), {label}, median of 20 | | | | "
                f"post_run_cell {statistics.median(times) * 1e3:.3f} ms "
                f"(max {max(times) * 1e3:.3f}) |"
            )
        shell.events.unregister("post_run_cell", journal.post_run_cell)
        journal.close()
        shell.reset(new_session=True)
    return lines


async def part2(tmp: Path) -> list[str]:
    from jupyter_client.manager import AsyncKernelManager

    from kernel_provisioner.journal import restore

    spec_root = tmp / "specs"
    os.environ["JUPYTER_PATH"] = str(spec_root)
    os.environ["JUPYTER_DATA_DIR"] = str(tmp / "data")
    first = start_host(tmp / "h1")
    second = start_host(tmp / "h2")
    lines = []
    try:
        spec1 = install_remote_spec(spec_root, "j1", first.url, first.user_keypair)
        spec2 = install_remote_spec(spec_root, "j2", second.url, second.user_keypair)
        km = AsyncKernelManager(kernel_name=spec1)
        await km.start_kernel()
        kc = km.client()
        kc.start_channels()
        await kc.wait_for_ready(timeout=60)
        journal = km.provisioner.state_journal  # type: ignore[union-attr]
        reply = await kc.execute_interactive(BIG_NAMESPACE, timeout=120)
        assert reply["content"]["status"] == "ok", reply["content"]
        start = time.perf_counter()
        manifest = await journal.sync(120)
        carried = time.perf_counter() - start
        assert manifest is not None and len(manifest.vars) == 1010, len(manifest.vars)
        lines.append(
            f"| 100 MB of tensors + 1,000 small objects: execute_reply → journal complete on "
            f"the user's side (snapshot + carried back) | {carried:.2f} s | "
            f"{manifest.total / 1e6:.0f} MB in {len(manifest.objects())} objects |"
        )
        kc.stop_channels()
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
        km2 = AsyncKernelManager(kernel_name=spec2)
        await km2.start_kernel()
        kc2 = km2.client()
        kc2.start_channels()
        await kc2.wait_for_ready(timeout=60)
        start = time.perf_counter()
        result = await restore(
            km2.provisioner.state_journal,  # type: ignore[union-attr]
            kc2,
            source=journal.directory,
        )
        total = time.perf_counter() - start
        assert len(result.restored) == 1010, len(result.restored)
        lines.append(
            f"| the same restored into a kernel on a second provider (push + load) | "
            f"{total:.2f} s | push {result.push_s:.2f} s ({result.pushed_bytes / 1e6:.0f} MB), "
            f"load {result.load_s:.2f} s |"
        )
        kc2.stop_channels()
        await km2.shutdown_kernel(now=True)
        with_cleanup: Any = km.provisioner
        await with_cleanup.cleanup(restart=False)
    finally:
        first.stop()
        second.stop()
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    print(f"machine: {machine()}; load {os.getloadavg()[0]:.2f}")
    print("| what | journal off | journal on | overhead | on the execution path |")
    print("|---|---|---|---|---|")
    for line in part1(args.reps):
        print(line)
    print()
    print("| what | time | detail |")
    print("|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for line in asyncio.run(part2(Path(tmp))):
            print(line)
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
