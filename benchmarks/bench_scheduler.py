"""Scheduler decisions against 10k and 100k live offers (target: p99 <= 2 ms at 100k).

Builds a marketplace with a realistic mix (15 GPU models, 8 regions, 1-8 GPUs per host,
consumer cards far more common than data-centre ones, a third of hosts full), then runs
decisions interleaved with heartbeat capacity updates and reservations, as the coordinator
would (after 50 untimed warm-up decisions; the garbage collector stays on). Prints, per size:
index build time, decision median / p99 / max (failed decisions included: their error path is
timed too) in wall-clock and in this thread's CPU time (on a shared machine the difference is
other processes' doing), the cost of one capacity update, and a brute-force scan of every
offer decided side by side (interleaved) for the ratio.

    python benchmarks/bench_scheduler.py                 # 10k and 100k
    python benchmarks/bench_scheduler.py --sizes 100000 --decisions 5000
    python benchmarks/bench_scheduler.py --min-reliability-share 0.3   # 30 % ask for >= 0.9

``--min-reliability-share`` makes that share of requests ask for ``min_reliability=0.9`` and
one offer in ten unmeasured (a newcomer); it draws from its own random stream, so the default
run's marketplace and requests are unchanged.
"""

from __future__ import annotations

import argparse
import gc
import platform
import random
import statistics
import time
from dataclasses import replace
from datetime import date

from jupyter_io.coordinator.scheduler import (
    DEFAULT_CANDIDATES,
    LeaseRequest,
    Offer,
    OfferIndex,
    is_eligible,
    schedule,
    score,
)
from jupyter_io.errors import LeaseError

GIB = 1024**3
LAMPORTS_PER_SOL = 1_000_000_000
LAMPORTS_PER_USD = LAMPORTS_PER_SOL // 150  # ~150 USD per SOL

# (NVML-style name, VRAM bytes, typical USD per GPU-hour, share of hosts, TFLOP/s fp16-ish)
MODELS = [
    ("NVIDIA GeForce RTX 3060", 12 * GIB, 0.08, 8, 25.0),
    ("NVIDIA GeForce RTX 3080", 10 * GIB, 0.15, 9, 58.0),
    ("NVIDIA GeForce RTX 3090", 24 * GIB, 0.22, 12, 71.0),
    ("NVIDIA GeForce RTX 4070 Ti", 12 * GIB, 0.18, 7, 80.0),
    ("NVIDIA GeForce RTX 4080", 16 * GIB, 0.28, 8, 97.0),
    ("NVIDIA GeForce RTX 4090", 24 * GIB, 0.40, 16, 165.0),
    ("NVIDIA GeForce RTX 5090", 32 * GIB, 0.70, 5, 210.0),
    ("NVIDIA RTX A5000", 24 * GIB, 0.25, 4, 55.0),
    ("NVIDIA RTX A6000", 48 * GIB, 0.50, 5, 77.0),
    ("NVIDIA L4", 24 * GIB, 0.35, 4, 121.0),
    ("NVIDIA L40S", 48 * GIB, 0.85, 4, 362.0),
    ("NVIDIA A100-SXM4-40GB", 40 * GIB, 1.10, 4, 312.0),
    ("NVIDIA A100-SXM4-80GB", 80 * GIB, 1.50, 6, 312.0),
    ("NVIDIA H100 80GB HBM3", 80 * GIB, 2.50, 6, 989.0),
    ("NVIDIA H200", 141 * GIB, 3.50, 2, 989.0),
]
REGIONS = [
    ("us-east", 25),
    ("us-west", 15),
    ("eu-west", 18),
    ("eu-central", 14),
    ("ap-northeast", 10),
    ("ap-south", 8),
    ("sa-east", 6),
    ("af-south", 4),
]
# What users type: NVML names, short names, dashes.
SPELLINGS = ["{short}", "{nvml}", "{dashed}"]


def make_offers(n: int, rng: random.Random) -> list[Offer]:
    shares = [m[3] for m in MODELS]
    region_names = [r for r, _ in REGIONS]
    region_shares = [w for _, w in REGIONS]
    offers = []
    for i in range(n):
        name, vram, usd, _, tflops = rng.choices(MODELS, shares)[0]
        total = rng.choices([1, 2, 4, 8], [55, 20, 15, 10])[0]
        free = 0 if rng.random() < 0.33 else rng.randint(1, total)
        price = int(usd * LAMPORTS_PER_USD * rng.lognormvariate(0, 0.25))
        measured = rng.random() < 0.2
        offers.append(
            Offer(
                provider=f"prov{i:07d}",
                gpu=name,
                vram_bytes=vram - rng.choice((0, 12 * 1024**2)),
                gpus_total=total,
                gpus_free=free,
                price_lamports_per_hour=price,
                region=rng.choices(region_names, region_shares)[0],
                reliability=min(1.0, rng.betavariate(9, 1)),
                load=rng.random(),
                latency_ms=rng.uniform(5, 250) if measured else None,
                benchmark_tflops=tflops * rng.uniform(0.8, 1.05) if rng.random() < 0.7 else None,
                simulated=rng.random() < 0.01,
            )
        )
    return offers


def make_request(rng: random.Random) -> LeaseRequest:
    name, _, usd, _, _ = rng.choices(MODELS, [m[3] for m in MODELS])[0]
    short = name.replace("NVIDIA ", "").replace("GeForce ", "")
    gpu = rng.choice(SPELLINGS).format(
        short=short, nvml=name, dashed=short.lower().replace(" ", "-")
    )
    kind = rng.random()
    cap = int(usd * LAMPORTS_PER_USD * rng.uniform(0.7, 1.6)) if rng.random() < 0.7 else None
    if kind < 0.10:  # by VRAM only
        return LeaseRequest(min_vram_bytes=rng.choice((24, 40, 48, 80)) * 10**9)
    region = rng.choice(REGIONS)[0] if kind < 0.30 else None
    gpus = rng.choices([1, 2, 4, 8], [85, 8, 5, 2])[0]
    max_latency = rng.choice((50.0, 100.0)) if kind > 0.95 else None
    return LeaseRequest(
        gpu=gpu, gpus=gpus, max_price_lamports_per_hour=cap, region=region,
        max_latency_ms=max_latency,
    )  # fmt: skip


def brute_force(offers: list[Offer], request: LeaseRequest) -> Offer | None:
    """The same decision by scanning every offer: what the index saves."""
    eligible = [o for o in offers if is_eligible(o, request)]
    if not eligible:
        return None
    eligible.sort(key=lambda o: (o.price_lamports_per_hour, o.provider, o.gpu_key))
    found = eligible[:DEFAULT_CANDIDATES]
    cheapest = found[0].price_lamports_per_hour
    return max(found, key=lambda o: score(o, request, cheapest_price=cheapest))


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(
    size: int,
    decisions: int,
    updates_per_decision: int,
    baseline: int,
    seed: int,
    min_reliability_share: float = 0.0,
) -> None:
    rng = random.Random(seed)
    offers = make_offers(size, rng)
    extra = random.Random(seed + 1)  # its own stream: the default run stays as it was
    if min_reliability_share:
        offers = [
            replace(o, reliability_measured=False) if extra.random() < 0.1 else o for o in offers
        ]
    gc.collect()
    t0 = time.perf_counter()
    index = OfferIndex(offers)
    build_s = time.perf_counter() - t0
    requests = [make_request(rng) for _ in range(decisions)]
    if min_reliability_share:
        requests = [
            replace(r, min_reliability=0.9) if extra.random() < min_reliability_share else r
            for r in requests
        ]
    keys = [(o.provider, o.gpu) for o in offers]
    for request in requests[:50]:  # warm the name caches, as a running coordinator has
        try:
            schedule(index, request)
        except LeaseError:
            pass
    gc.collect()

    decide_ms: list[float] = []
    decide_cpu_ms: list[float] = []
    update_us: list[float] = []
    brute_ms: list[float] = []
    paired_ms: list[float] = []
    failed = 0
    brute_every = max(1, decisions // baseline) if baseline else 0
    for i, request in enumerate(requests):
        for _ in range(updates_per_decision):  # heartbeats: capacity moves up and down
            provider, gpu = keys[rng.randrange(size)]
            total = index.get(provider, gpu).gpus_total  # type: ignore[union-attr]
            t = time.perf_counter_ns()
            index.set_capacity(provider, gpu, rng.randint(0, total))
            update_us.append((time.perf_counter_ns() - t) / 1e3)
        cpu = time.thread_time_ns()
        t = time.perf_counter_ns()
        try:
            offer = schedule(index, request)
        except LeaseError:
            offer = None
            failed += 1
        elapsed = (time.perf_counter_ns() - t) / 1e6
        decide_cpu_ms.append((time.thread_time_ns() - cpu) / 1e6)
        decide_ms.append(elapsed)
        if offer is not None:
            index.reserve(offer.provider, offer.gpu, request.gpus)
        if brute_every and i % brute_every == 0:
            live = list(index)
            t = time.perf_counter_ns()
            brute_force(live, request)
            brute_ms.append((time.perf_counter_ns() - t) / 1e6)
            paired_ms.append(elapsed)

    print(f"\n{size:,} live offers ({len(index.summary())} GPU types)")
    print(f"  index build        {build_s * 1e3:9.1f} ms  ({build_s / size * 1e6:.2f} us/offer)")
    print(
        f"  decision           median {statistics.median(decide_ms):.3f} ms   "
        f"p99 {percentile(decide_ms, 0.99):.3f} ms   max {max(decide_ms):.3f} ms   "
        f"({decisions} decisions, {failed} refused with LeaseError)"
    )
    print(
        f"  decision CPU time  median {statistics.median(decide_cpu_ms):.3f} ms   "
        f"p99 {percentile(decide_cpu_ms, 0.99):.3f} ms   max {max(decide_cpu_ms):.3f} ms   "
        f"(this thread only: excludes time other processes took the core)"
    )
    print(
        f"  capacity update    median {statistics.median(update_us):.2f} us   "
        f"p99 {percentile(update_us, 0.99):.2f} us   ({len(update_us)} updates)"
    )
    if brute_ms:
        ratio = statistics.median(brute_ms) / statistics.median(paired_ms)
        print(
            f"  brute-force scan   median {statistics.median(brute_ms):.1f} ms "
            f"({len(brute_ms)} interleaved; indexed decision {ratio:,.0f}x faster)"
        )
    t = time.perf_counter_ns()
    index.summary()
    print(f"  offers summary     {(time.perf_counter_ns() - t) / 1e6:.3f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--decisions", type=int, default=3000)
    parser.add_argument("--updates-per-decision", type=int, default=3)
    parser.add_argument("--baseline", type=int, default=20, help="brute-force scans per size")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--min-reliability-share",
        type=float,
        default=0.0,
        help="share of requests with min_reliability=0.9 (and 10 %% of offers unmeasured)",
    )
    args = parser.parse_args()
    print(f"bench_scheduler {date.today()} python {platform.python_version()} {platform.node()}")
    for size in args.sizes:
        run(
            size,
            args.decisions,
            args.updates_per_decision,
            args.baseline,
            args.seed,
            args.min_reliability_share,
        )


if __name__ == "__main__":
    main()
