"""A class at the deadline rush: 300 students, 50 GPUs, one coordinator (issue 14).

One ``jupyter io coordinator`` process (``--payments free``, SQLite in a temporary directory)
and, in this process, an instructor who creates a class (one GPU type, T4) and imports a
roster of ``--students`` keys; ``--providers`` simulated providers (real websockets, signed
hellos, heartbeats) offering ``--gpus`` T4s in all, which report a session active as soon as
its lease is granted (what a provider host does when the kernel starts); and one lightweight
client per student signing real requests (``CoordinatorClient``, one HTTP connection each).

Every student presses start at a random moment within ``--rush`` seconds, then **keeps
asking**: holds the kernel for a random session of ``--session-min`` to ``--session-max``
seconds, ends it, thinks 0-1 s and asks again, until the run ends. A student whose request
is queued (202) polls its ticket every second, as the provisioner does. Time is compressed:
the rush is real time (60 s), a session of about an hour is played in 4-8 s (some 600x), so
one run shows several rounds of the queue.

Reported (targets from the issue):

* time to kernel-or-queue-place per request (the POST's round trip to a 201 or a 202 with
  place and estimate): p50 / p99 / max, the rush's first presses and all requests (<= 2 s);
* idle GPUs while anyone queues: every 100 ms the coordinator's free T4 count
  (``GET /api/v1/offers``, uncached) against the students who hold a 202 and have not been
  served; samples with both non-zero, and the longest such stretch (target 0);
* Jain's index of GPU time across the students (all keep asking) in the window after the
  rush: ``(sum x)^2 / (n * sum x^2)`` (target >= 0.9);
* the coordinator's CPU per request (all requests: lease POSTs, ticket polls, lease ends).

    python benchmarks/bench_cohort_rush.py                       # 300 students, 50 GPUs
    python benchmarks/bench_cohort_rush.py --students 100 --rush 20 --measure 30
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import re
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from datetime import date
from pathlib import Path
from typing import Any

from solders.keypair import Keypair
from solders.pubkey import Pubkey
from websockets.asyncio.client import ClientConnection, connect

from jupyter_io.cohort_client import CohortClient
from jupyter_io.coordinator_client import CoordinatorClient, LeaseGrant, LeaseQueued
from jupyter_io.queue_tickets import POLL_SECONDS
from jupyter_io.signing import sign_provider_hello

READY = re.compile(r"^jupyter-io coordinator listening on (http://\S+)$")
JUPYTER = str(Path(sys.executable).with_name("jupyter"))
GIB = 1 << 30
GPU = "Tesla T4"
PRICE = 100_000  # lamports per GPU-hour (free payments: nothing is paid)


async def start_coordinator(data_dir: str) -> tuple[Any, str]:
    proc = await asyncio.create_subprocess_exec(
        JUPYTER, "io", "coordinator", "--listen", "127.0.0.1:0", "--data-dir", data_dir,
        "--payments", "free", "--heartbeat-interval", "2",
        "--CoordinatorConfig.max_unauthenticated_per_address=64",
        "--CoordinatorConfig.offers_cache_ttl=0",
        "--CoordinatorConfig.claim_window=120",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.stdout is not None
    while True:
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode().strip()
        if not line:
            raise SystemExit("the coordinator exited before it was ready")
        match = READY.match(line)
        if match:
            return proc, match.group(1)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class SimProvider:
    """A provider's side of the link: hello, heartbeats, session events on demand."""

    def __init__(self, url: str, i: int, gpus: int) -> None:
        self.url = url.replace("http", "ws", 1) + "/api/v1/providers/connect"
        self.keypair = Keypair()
        self.pubkey = str(self.keypair.pubkey())
        self.i = i
        self.gpus = gpus
        self.ws: ClientConnection | None = None
        self.hosted: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []

    async def link(self) -> None:
        ws = await connect(self.url, compression=None, open_timeout=60, ping_interval=None)
        challenge = json.loads(await ws.recv())
        signature = sign_provider_hello(
            self.keypair,
            Pubkey.from_string(challenge["coordinator"]),
            bytes.fromhex(challenge["nonce"]),
        )
        offer = {
            "gpu": GPU,
            "vram_bytes": 16 * GIB,
            "count": self.gpus,
            "gpu_indices": list(range(self.gpus)),
            "price_lamports_per_hour": PRICE,
            "simulated": True,
            "driver": None,
            "cuda": None,
            "benchmark_tflops": None,
        }
        hello = {"type": "hello", "version": 1, "pubkey": self.pubkey, "signature": signature,
                 "inventory": {"name": f"sim-{self.i}", "region": "eu-west",
                               "reachable_url": None, "max_kernels": self.gpus,
                               "offers": [offer]},
                 "sessions": []}  # fmt: skip
        await ws.send(json.dumps(hello))
        welcome = json.loads(await ws.recv())
        if welcome["type"] != "welcome":
            raise SystemExit(f"link refused: {welcome}")
        self.ws = ws
        self._tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._beat())]

    async def _read(self) -> None:
        assert self.ws is not None
        with contextlib.suppress(Exception):
            async for text in self.ws:
                message = json.loads(text)
                if message.get("type") == "end":
                    self.hosted.discard(message.get("lease"))

    async def _beat(self) -> None:
        assert self.ws is not None
        with contextlib.suppress(Exception):
            while True:
                beat = {"type": "heartbeat", "load": 0.1, "sessions": sorted(self.hosted)}
                await self.ws.send(json.dumps(beat))
                await asyncio.sleep(1.0)

    async def activate(self, lease: str) -> None:
        assert self.ws is not None
        self.hosted.add(lease)
        event = {"type": "session", "lease": lease, "state": "active", "at": time.time()}
        await self.ws.send(json.dumps(event))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.ws is not None:
            self.ws.transport.abort()


class Rush:
    """The students, their numbers, and the sampler."""

    def __init__(self, args: argparse.Namespace, url: str, cohort: str) -> None:
        self.args = args
        self.url = url
        self.cohort = cohort
        self.providers: dict[str, SimProvider] = {}
        self.first_answer: list[float] = []  # the rush's first presses
        self.answer: list[float] = []  # every lease request
        self.queued_first = 0
        self.waiting: set[int] = set()
        self.requests = 0
        self.polls = 0
        self.served_from_queue = 0
        self.expired = 0
        self.errors: list[str] = []
        self.held: dict[int, list[tuple[float, float]]] = defaultdict(list)
        self.idle_samples = 0
        self.samples = 0
        self.longest_idle = 0
        self.waits: list[float] = []  # seconds in the queue until served

    async def student(self, n: int, keypair: Keypair, start: float, end: float) -> None:
        args = self.args
        rng = random.Random(n)
        client = CoordinatorClient(self.url, keypair, timeout=60)
        try:
            await asyncio.sleep(max(0.0, start + rng.uniform(0, args.rush) - time.monotonic()))
            first = True
            while time.monotonic() < end:
                t0 = time.perf_counter()
                self.requests += 1
                try:
                    grant: LeaseGrant = await client.request_lease(GPU, cohort=self.cohort)
                except LeaseQueued as queued:
                    answered = time.perf_counter() - t0
                    self.waiting.add(n)
                    got = await self._wait(client, queued, end)
                    self.waiting.discard(n)
                    if got is None:
                        return
                    self.waits.append(time.perf_counter() - t0)
                    grant = got
                    self.served_from_queue += 1
                    if first:
                        self.queued_first += 1
                else:
                    answered = time.perf_counter() - t0
                self.answer.append(answered)
                if first:
                    self.first_answer.append(answered)
                    first = False
                await self.providers[grant.provider].activate(grant.lease)
                began = time.monotonic()
                hold = rng.uniform(args.session_min, args.session_max)
                await asyncio.sleep(max(0.0, min(hold, end - began)))
                self.requests += 1
                await client.end_lease(grant.lease)
                self.held[n].append((began, time.monotonic()))
                await asyncio.sleep(rng.uniform(0, 1))
        except Exception as exc:  # counted and shown
            self.errors.append(f"student {n}: {type(exc).__name__}: {exc}")
        finally:
            self.waiting.discard(n)
            client.close()

    async def _wait(
        self, client: CoordinatorClient, queued: LeaseQueued, end: float
    ) -> LeaseGrant | None:
        place = queued.place
        while time.monotonic() < end:
            await asyncio.sleep(POLL_SECONDS)
            self.requests += 1
            self.polls += 1
            try:
                answer = await client.queue_ticket(place)
            except Exception as exc:  # an expired ticket: counted
                self.expired += 1
                self.errors.append(f"queue: {exc}")
                return None
            if isinstance(answer, LeaseGrant):
                return answer
            place = answer
        with contextlib.suppress(Exception):
            await client.cancel_queue_ticket(place)
        return None

    async def sampler(self, end: float) -> None:
        client = CoordinatorClient(self.url, timeout=30)
        stretch = 0
        try:
            while time.monotonic() < end:
                await asyncio.sleep(0.1)
                waiting = len(self.waiting)
                offers = await client.offers()
                free = sum(
                    row.get("gpus_available", 0)
                    for row in offers.get("gpu_types", offers.get("types", []))
                    if isinstance(row, dict)
                )
                self.samples += 1
                if waiting and free:
                    self.idle_samples += 1
                    stretch += 1
                    self.longest_idle = max(self.longest_idle, stretch)
                else:
                    stretch = 0
        finally:
            client.close()


def jain(values: list[float]) -> float:
    total = sum(values)
    squares = sum(v * v for v in values)
    return total * total / (len(values) * squares) if squares else 1.0


def quantiles(samples: list[float]) -> str:
    if not samples:
        return "none"
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return (
        f"p50 {1000 * statistics.median(ordered):.0f} ms  p99 {1000 * p99:.0f} ms  "
        f"max {1000 * ordered[-1]:.0f} ms  (n={len(ordered)})"
    )


async def main(args: argparse.Namespace) -> None:
    print(
        f"bench_cohort_rush {date.today()} on {platform.node()} ({os.cpu_count()} CPUs), "
        f"Python {platform.python_version()}"
    )
    with tempfile.TemporaryDirectory(prefix="jupyter-io-bench-rush-") as data_dir:
        proc, url = await start_coordinator(data_dir)
        providers: list[SimProvider] = []
        try:
            per = args.gpus // args.providers
            counts = [
                per + (1 if i < args.gpus % args.providers else 0) for i in range(args.providers)
            ]
            providers = [SimProvider(url, i, c) for i, c in enumerate(counts)]
            await asyncio.gather(*(p.link() for p in providers))
            instructor = CohortClient(url, Keypair(), timeout=60)
            view = await instructor.create(
                name="rush",
                gpu_types=[GPU],
                max_price_lamports_per_hour=PRICE,
                term_ends_at=time.time() + 7 * 86400,
                quota_gpu_seconds_per_week=100 * 3600,
                max_concurrent_per_student=1,
                queue_max_wait_seconds=3600,
            )
            cohort = view.id
            keys = [Keypair() for _ in range(args.students)]
            for chunk in range(0, len(keys), 300):
                await instructor.add_students(
                    cohort, [str(k.pubkey()) for k in keys[chunk : chunk + 300]]
                )
            instructor.close()
            rush = Rush(args, url, cohort)
            rush.providers = {p.pubkey: p for p in providers}
            print(
                f"coordinator pid {proc.pid} at {url}; {args.providers} providers with "
                f"{args.gpus} T4s; class {cohort} of {args.students} students; rush "
                f"{args.rush:g} s, then {args.measure:g} s measured; sessions "
                f"{args.session_min:g}-{args.session_max:g} s"
            )
            start = time.monotonic()
            end = start + args.rush + args.measure
            cpu0 = cpu_seconds(proc.pid)
            await asyncio.gather(
                rush.sampler(end),
                *(rush.student(n, k, start, end) for n, k in enumerate(keys)),
            )
            used = cpu_seconds(proc.pid) - cpu0
        finally:
            for provider in providers:
                await provider.close()
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 60)

    def gpu_time(since: float) -> list[float]:
        return [
            sum(max(0.0, min(b, end) - max(a, since)) for a, b in rush.held.get(n, []))
            for n in range(args.students)
        ]

    whole, after = gpu_time(start), gpu_time(start + args.rush)
    print(f"time to kernel-or-queue-place, first press in the rush: {quantiles(rush.first_answer)}")
    print(f"  ({rush.queued_first} of {len(rush.first_answer)} first presses were queued)")
    print(f"time to kernel-or-queue-place, every request:          {quantiles(rush.answer)}")
    print(f"time in the queue until served:                        {quantiles(rush.waits)}")
    print(
        f"idle GPUs while someone queued: {rush.idle_samples} of {rush.samples} samples "
        f"(every 100 ms), longest stretch {rush.longest_idle} sample(s)"
    )
    for label, times, seconds in (
        ("the whole run", whole, args.rush + args.measure),
        ("after the rush only", after, args.measure),
    ):
        print(
            f"Jain's index of GPU time, {label} ({args.students} students, all kept asking): "
            f"{jain(times):.3f}; per student min {min(times):.1f} s, median "
            f"{statistics.median(times):.1f} s, max {max(times):.1f} s; GPU use "
            f"{sum(times) / (args.gpus * seconds):.1%} of {args.gpus} GPUs"
        )
    print(
        f"coordinator CPU: {used:.1f} s for {rush.requests} requests = "
        f"{1e6 * used / max(rush.requests, 1):.0f} us per request ({len(rush.answer)} lease "
        f"requests, {rush.polls} ticket polls, the rest lease ends); served from the queue "
        f"{rush.served_from_queue}, expired {rush.expired}, errors {len(rush.errors)}"
    )
    for line in rush.errors[:5]:
        print("  error:", line)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--students", type=int, default=300)
    parser.add_argument("--gpus", type=int, default=50)
    parser.add_argument("--providers", type=int, default=25)
    parser.add_argument("--rush", type=float, default=60.0, help="seconds all press start in")
    parser.add_argument("--measure", type=float, default=90.0, help="seconds after the rush")
    parser.add_argument("--session-min", type=float, default=4.0)
    parser.add_argument("--session-max", type=float, default=8.0)
    asyncio.run(main(parser.parse_args()))
