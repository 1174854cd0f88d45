"""A short torch matmul benchmark: what a GPU (or the CPU) really delivers, in TFLOP/s.

Fake or throttled GPUs are the marketplace's oldest fraud, so the host measures instead of
quoting a datasheet, and the figure is published with its offer (``benchmark_tflops``).
:func:`measure_inventory` is what the server calls before joining a coordinator: one
measurement per real GPU model (half precision, on the model's first device), or one of the
CPU (single precision) when the host offers no GPU; simulated GPUs are never measured.

Each measurement runs in a child process (``python -m provider_host.benchmark DEVICE``, see
:func:`run_benchmark`): the host itself then never holds a CUDA context, which would take
VRAM on GPUs it rents out, and a broken CUDA install or a hung driver can only fail (or time
out) the measurement, never the host.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import sys
import time
from typing import Any

from .inventory import CPU_LABEL, Inventory

__all__ = ["BENCHMARK_TIMEOUT_S", "measure", "measure_inventory", "run_benchmark"]

#: Longest a measurement may take, importing torch included.
BENCHMARK_TIMEOUT_S = 120.0

log = logging.getLogger(__name__)


def measure(device: str, *, size: int | None = None, seconds: float = 1.0) -> float:
    """Best matmul throughput on ``device`` (``"cpu"`` or ``"cuda"``), TFLOP/s.

    Square matrices of ``size`` (default 8192 on a GPU, in float16, where tensor cores do the
    work; 1024 on the CPU, in float32), timed for about ``seconds`` after one warm-up; the best
    timed block counts. Imports torch; call it in a child process (:func:`run_benchmark`).
    """
    import torch

    on_gpu = device.startswith("cuda")
    n = size or (8192 if on_gpu else 1024)
    dtype = torch.float16 if on_gpu else torch.float32
    # Several products per timed block on a GPU: one takes about a millisecond there.
    per_block = 10 if on_gpu else 1

    def sync() -> None:
        if on_gpu:
            torch.cuda.synchronize()

    with torch.no_grad():
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        torch.matmul(a, b)
        sync()
        best = 0.0
        blocks = 0
        deadline = time.perf_counter() + seconds
        while blocks < 3 or time.perf_counter() < deadline:
            start = time.perf_counter()
            for _ in range(per_block):
                torch.matmul(a, b)
            sync()
            elapsed = time.perf_counter() - start
            best = max(best, 2.0 * n**3 * per_block / elapsed)
            blocks += 1
    return best / 1e12


async def run_benchmark(
    gpu_index: int | None, *, seconds: float = 0.5, timeout: float = BENCHMARK_TIMEOUT_S
) -> float | None:
    """Measure GPU ``gpu_index`` (an NVML index), or the CPU for None, in a child process,
    for about ``seconds`` after torch is imported.

    Returns TFLOP/s, or None when torch is missing, the device is unusable or the child
    fails or outlives ``timeout`` (it is killed then); the reason is logged.
    """
    if importlib.util.find_spec("torch") is None:
        return None
    env = dict(os.environ)
    if gpu_index is None:
        device = "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        device = "cuda"
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # NVML's numbering
        env["CUDA_VISIBLE_DEVICES"] = str(gpu_index)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "provider_host.benchmark",
        device,
        "--seconds",
        str(seconds),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        log.warning("benchmark of %s took longer than %g s; publishing none", device, timeout)
        return None
    finally:
        if proc.returncode is None:  # timed out, or the host is shutting down
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.shield(proc.wait())
    what = "the CPU" if gpu_index is None else f"GPU {gpu_index}"
    try:
        if proc.returncode != 0:
            raise ValueError(stderr.decode(errors="replace").strip()[-500:])
        tflops = float(json.loads(stdout)["tflops"])
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("benchmark of %s failed (publishing none): %s", what, exc)
        return None
    log.info("benchmark of %s: %.2f TFLOP/s", what, tflops)
    return tflops


async def measure_inventory(inventory: Inventory, *, offers_cpu: bool) -> dict[str, float]:
    """Benchmarks by model for :func:`~provider_host.inventory.offer_groups`.

    Each real GPU model is measured once, on its first device; the CPU (as
    :data:`~provider_host.inventory.CPU_LABEL`) only when ``offers_cpu``. Models whose
    measurement failed are left out.
    """
    first: dict[str, int] = {}
    for device in inventory.devices:
        if device.kind == "gpu" and not device.simulated:
            first.setdefault(device.model, device.index)
    results: dict[str, float] = {}
    for model, index in first.items():
        tflops = await run_benchmark(index)
        if tflops is not None:
            results[model] = round(tflops, 2)
    if offers_cpu:
        tflops = await run_benchmark(None)
        if tflops is not None:
            results[CPU_LABEL] = round(tflops, 3)
    return results


def main(argv: list[str] | None = None) -> None:
    """``python -m provider_host.benchmark cpu|cuda``: print ``{"device", "tflops"}``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("device", help="cpu, or cuda (the one CUDA_VISIBLE_DEVICES shows)")
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args(argv)
    result: dict[str, Any] = {"device": args.device}
    result["tflops"] = measure(args.device, seconds=args.seconds)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
