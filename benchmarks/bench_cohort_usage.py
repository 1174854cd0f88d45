"""What reading a cohort's usage costs the coordinator's store (issue 14).

Every cohort lease request (the quota check), every queued ticket (its fair-share key) and
every cohort funding read one student's GPU-seconds this week with
:meth:`~jupyter_io.coordinator.store.Store.cohort_usage`; the dashboard reads the whole
class's week and term. This fills a store with a class of ``--students`` (300) students
with ``--leases`` (20) ended one-GPU leases each, spread over the last ``--weeks`` (10)
weeks (``--weeks 1``: all this week), then times, interleaved run by run:

* ``floor``: ``is_member(cohort, s)`` (a one-row read: what any store read costs);
* ``student``: ``cohort_usage(cohort, week_start, student=s)`` (one request's quota check);
* ``class``: ``cohort_usage(cohort, week_start)`` (every student's week);
* ``term``: ``cohort_leases_since(cohort, created_at)`` (what the dashboard's term spend
  read each time before ``cohort_tally``);
* ``tally``: ``FinishedLeaseTally.cost_since(cohort, created_at, now)`` once warm (what it
  reads now while no lease finished in between: the live leases and the finished ids).

    python benchmarks/bench_cohort_usage.py                 # SQLite + throwaway PostgreSQL
    python benchmarks/bench_cohort_usage.py --weeks 1       # every lease in this week

PostgreSQL: a throwaway cluster as in ``bench_store_heartbeats.py`` (skipped without the
binaries). Prints the median and p95 milliseconds of each read (each kind timed in its
own loop).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import secrets
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import sqlalchemy as sa
from bench_store_heartbeats import throwaway_postgres
from solders.pubkey import Pubkey

from jupyter_io.cohorts import CohortSettings, week_start
from jupyter_io.coordinator.cohort_tally import FinishedLeaseTally
from jupyter_io.coordinator.store import ProviderProfile, Store
from jupyter_io.coordinator.store.leases import _leases


async def fill(url: str, students: int, leases: int, weeks: int) -> tuple[Store, str, list[str]]:
    """A store with one cohort whose students each ran ``leases`` leases over ``weeks``."""
    store = await Store.open(url)
    provider = str(Pubkey.new_unique())
    await store.upsert_provider(ProviderProfile(provider, "bench", "eu", None))
    now = datetime.now(timezone.utc)
    term_start = now - timedelta(weeks=weeks)
    cohort_id = "c_" + secrets.token_urlsafe(12)
    settings = CohortSettings(
        name="bench",
        gpu_types=("T4",),
        max_price_lamports_per_hour=10**7,
        term_ends_at=(now + timedelta(days=60)).timestamp(),
    )
    await store.create_cohort(
        instructor=str(Pubkey.new_unique()), settings=settings, cohort_id=cohort_id,
        at=term_start,
    )  # fmt: skip
    keys = [str(Pubkey.new_unique()) for _ in range(students)]
    await store.add_members(cohort_id, keys, at=term_start)
    since = week_start(now) if weeks == 1 else term_start
    span = (now - since).total_seconds() - 3 * 3600
    rows = []
    rng = random.Random(1)
    for key in keys:
        for _ in range(leases):
            start = since + timedelta(seconds=rng.uniform(0, span))
            end = start + timedelta(seconds=rng.uniform(600, 3 * 3600))
            rows.append(
                {
                    "id": "l_" + secrets.token_urlsafe(12),
                    "user_pubkey": key,
                    "provider_pubkey": provider,
                    "gpu_model": "Tesla T4",
                    "gpu_indices": [0],
                    "price_lamports_per_hour": 1_000_000,
                    "state": "ended",
                    "requested_at": start,
                    "active_at": start,
                    "ended_at": end,
                    "end_of_service": end,
                    "end_reason": "ended by the user",
                    "relay": False,
                    "acked_seconds": 0,
                    "cohort_id": cohort_id,
                }
            )
    async with store.engine.begin() as conn:
        for chunk in range(0, len(rows), 1000):
            await conn.execute(sa.insert(_leases), rows[chunk : chunk + 1000])
    return store, cohort_id, keys


async def time_reads(
    store: Store, cohort_id: str, keys: list[str], runs: int
) -> dict[str, list[float]]:
    """Milliseconds of each read, ``runs`` times; each kind in its own loop (a big read's
    garbage must not land on the small one's clock)."""
    cohort = await store.get_cohort(cohort_id)
    assert cohort is not None
    since = week_start(datetime.now(timezone.utc))
    rng = random.Random(2)
    tally = FinishedLeaseTally(store)
    now = datetime.now(timezone.utc)
    await tally.cost_since(cohort_id, cohort.created_at, now)  # reads every finished row once
    reads: dict[str, Callable[[], Awaitable[object]]] = {
        "floor": lambda: store.is_member(cohort_id, rng.choice(keys)),
        "student": lambda: store.cohort_usage(cohort_id, since, student=rng.choice(keys)),
        "class": lambda: store.cohort_usage(cohort_id, since),
        "term": lambda: store.cohort_leases_since(cohort_id, cohort.created_at),
        "tally": lambda: tally.cost_since(cohort_id, cohort.created_at, now),
    }
    timings: dict[str, list[float]] = {}
    for name, read in reads.items():
        values = timings[name] = []
        for _ in range(runs):
            t0 = time.perf_counter()
            await read()
            values.append((time.perf_counter() - t0) * 1000)
    return timings


def summary(values: list[float]) -> str:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    return f"median {statistics.median(ordered):7.2f} ms  p95 {p95:7.2f} ms"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--students", type=int, default=300)
    parser.add_argument("--leases", type=int, default=20)
    parser.add_argument("--weeks", type=int, default=10)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--sqlite-only", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, throwaway_postgres() as pg:
        urls = {"sqlite": f"sqlite+aiosqlite:///{Path(tmp) / 'bench.db'}"}
        if pg is not None and not args.sqlite_only:
            urls["postgresql"] = pg
        for name, url in urls.items():
            store, cohort_id, keys = await fill(url, args.students, args.leases, args.weeks)
            try:
                await time_reads(store, cohort_id, keys, 5)  # warm
                timings = await time_reads(store, cohort_id, keys, args.runs)
            finally:
                await store.close()
            print(
                f"{name}: {args.students} students x {args.leases} leases over {args.weeks} week(s)"
            )
            for what, values in timings.items():
                print(f"  {what:<8} {summary(values)}")


if __name__ == "__main__":
    asyncio.run(main())
