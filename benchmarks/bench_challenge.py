"""What a GPU challenge costs (issue 16 part 5), on the CPU path: the provider's side and the
coordinator's check, for ``--n`` x ``--n`` matrices (4096 by default).

1. **Provider** (:mod:`provider_host.challenge`, numpy on the CPU as for a simulated GPU or
   the CPU offer since 2026-12-06 21:30 UTC, torch before; torch with ``--device cuda:N``):
   generating A and B from the seed, the float32 product, hashing the rows
   into the Merkle tree; beside it the floor: torch's float32 product of two random matrices
   of the same size (the work the challenge exists to prove).
2. **Coordinator** (:class:`jupyter_io.gpu_challenge.Verifier`): ``B @ R`` for ``--vectors``
   secret vectors (streamed) and Freivalds' check of ``--rows`` opened rows, with its
   operation counts, and the Merkle paths checked.
3. **Round trip**: a real coordinator and a real provider host in this process on loopback,
   one challenge from sending to verdict (``--no-loopback`` skips it).

    python benchmarks/bench_challenge.py             # ~1 min on 2 cores
    python benchmarks/bench_challenge.py --n 2048 --repeat 3
    python benchmarks/bench_challenge.py --device cuda:0 --n 16384 --no-loopback   # a GPU
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from solders.keypair import Keypair

from jupyter_io.coordinator.config import CoordinatorConfig
from jupyter_io.coordinator.server import CoordinatorServer
from jupyter_io.gpu_challenge import Verifier, merkle_proof, merkle_verify, row_leaf
from jupyter_io.identity import write_keypair
from provider_host.challenge import multiply, open_row, product_of
from provider_host.config import ProviderConfig
from provider_host.server import ProviderServer


def _best(label: str, runs: list[float]) -> str:
    return f"{label}: best {min(runs):.3f} s, median {sorted(runs)[len(runs) // 2]:.3f} s"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def provider_side(n: int, repeat: int, device: str) -> tuple[list[float], list[float], list[float]]:
    seed = os.urandom(32)
    products, hashes, floors = [], [], []
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    for _ in range(repeat):
        started = time.perf_counter()
        matrix = multiply(seed, n, device)
        _sync(device)
        products.append(time.perf_counter() - started)
        started = time.perf_counter()
        product_of(matrix)
        hashes.append(time.perf_counter() - started)
        del matrix
        a, b = torch.rand(n, n, device=device), torch.rand(n, n, device=device)
        _sync(device)
        started = time.perf_counter()
        a @ b
        _sync(device)
        floors.append(time.perf_counter() - started)
        del a, b
    return products, hashes, floors


def coordinator_side(
    n: int, vectors: int, rows: int, repeat: int, device: str
) -> dict[str, object]:
    seed = os.urandom(32)
    product = product_of(multiply(seed, n, device))
    opened = [int(i) for i in np.random.default_rng().choice(n, rows, replace=False)]
    openings = {i: (open_row(product, i), merkle_proof(product.levels, i)) for i in opened}
    root = product.levels[-1][0]
    prepares, checks = [], []
    verifier = None
    for _ in range(repeat):
        r = np.random.default_rng().integers(0, 2, size=(n, vectors), dtype=np.uint8)
        verifier = Verifier(seed, n, r)
        started = time.perf_counter()
        verifier.prepare()
        prepares.append(time.perf_counter() - started)
        started = time.perf_counter()
        for i, (values, proof) in openings.items():
            assert merkle_verify(root, row_leaf(i, values), i, proof, n)
            assert verifier.check_row(i, values) is None
        checks.append(time.perf_counter() - started)
    assert verifier is not None
    return {"prepare": prepares, "check": checks, "ops": verifier.ops}


async def round_trip(n: int) -> tuple[float, str]:
    with tempfile.TemporaryDirectory() as tmp:
        coordinator = CoordinatorServer(
            CoordinatorConfig(
                listen="127.0.0.1:0",
                data_dir=f"{tmp}/coordinator",
                payments="free",
                gpu_checks=True,
                gpu_check_interval=0.0,
                gpu_check_cpu_n=n,
            ),
            stdout=io.StringIO(),
        )
        await coordinator.startup()
        key = write_keypair(Keypair(), Path(tmp) / "host.json")
        host = ProviderServer(
            ProviderConfig(
                listen="127.0.0.1:0",
                coordinator_url=coordinator.url,
                keypair_path=str(key),
                workspace_root=f"{tmp}/workspaces",
                data_dir=f"{tmp}/host",
                simulate_gpu=["RTX 4090:24"],
                benchmark=False,
                allow=[],
            ),
            stdout=io.StringIO(),
        )
        checks, registry = coordinator.gpu_checks, coordinator.registry
        assert checks is not None and registry is not None
        checks.settings = type(checks.settings)(**{**_fields(checks.settings), "at_join": False})
        await host.startup()
        try:
            assert host.coordinator_link is not None and host.host_keypair is not None
            await asyncio.wait_for(host.coordinator_link.wait_linked(), 30)
            started = time.perf_counter()
            verdict = await checks.challenge(str(host.host_keypair.pubkey()), "RTX 4090", 0)
            elapsed = time.perf_counter() - started
            assert verdict is not None
            return elapsed, verdict.reason
        finally:
            await host.shutdown()
            await coordinator.shutdown()


def _fields(settings: object) -> dict[str, object]:
    return {name: getattr(settings, name) for name in settings.__dataclass_fields__}  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--vectors", type=int, default=16)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-loopback", action="store_true")
    parser.add_argument("--device", default="cpu", help="torch device of the provider side")
    args = parser.parse_args()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line),
        platform.processor(),
    )
    print(
        f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit}, "
        f"nproc {os.cpu_count()}, {cpu}, Python {platform.python_version()}, torch "
        f"{torch.__version__} ({torch.get_num_threads()} threads), numpy {np.__version__}, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    n = args.n
    flops = 2.0 * n**3
    products, hashes, floors = provider_side(n, args.repeat, args.device)
    if args.device.startswith("cuda"):
        print(f"device {torch.cuda.get_device_name(args.device)}")
    print(f"provider, n = {n} ({args.device}):")
    print(f"  {_best('generate A, B + float32 product', products)}"
          f" ({flops / min(products) / 1e9:.1f} GFLOP/s)")  # fmt: skip
    print(f"  {_best('hash rows into the Merkle tree', hashes)}")
    print(f"  {_best('floor: torch product of random matrices', floors)}"
          f" ({flops / min(floors) / 1e9:.1f} GFLOP/s)")  # fmt: skip
    side = coordinator_side(n, args.vectors, args.rows, args.repeat, args.device)
    print(f"coordinator, k = {args.vectors} vectors, {args.rows} rows opened:")
    print(f"  {_best('B @ R (streamed)', side['prepare'])}")  # type: ignore[arg-type]
    print(f"  {_best('Merkle paths + Freivalds per opened row, all', side['check'])}")  # type: ignore[arg-type]
    print(f"  ops: {side['ops']} (n**2 = {n * n:,}; a product would be {n**3:,})")
    if not args.no_loopback:
        elapsed, reason = asyncio.run(round_trip(n))
        print(f"round trip on loopback (real coordinator + provider host): {elapsed:.3f} s")
        print(f"  verdict: {reason}")
    print(f"load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
