"""How many heartbeats per second the coordinator's store absorbs.

The coordinator batches heartbeats in memory and flushes them about once a second with
:meth:`jupyter_io.coordinator.store.Store.record_heartbeats`; the target is >= 5,000
heartbeats/s on 2 cores. This registers ``--registered`` providers, then times flushes of
``--batch`` heartbeats (a random sample of the providers, fresh timestamps each time),
interleaving SQLite and PostgreSQL run by run so both see the same machine noise, and prints
the median and p99 rate of each.

    python benchmarks/bench_store_heartbeats.py                      # SQLite + throwaway PG
    python benchmarks/bench_store_heartbeats.py --registered 100000  # bigger table
    python benchmarks/bench_store_heartbeats.py --postgres-url postgresql://u@host/db

PostgreSQL: ``--postgres-url`` (the database is used as is, its coordinator tables must be
empty or absent), else a throwaway cluster from ``/usr/lib/postgresql/*/bin`` with default
durability settings (fsync on), else SQLite only. SQLite runs with the store's own settings
(WAL, synchronous=NORMAL) in a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import pwd
import random
import secrets
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

from solders.pubkey import Pubkey

from jupyter_io.coordinator.store import ProviderProfile, Store


@contextlib.contextmanager
def throwaway_postgres() -> Iterator[str | None]:
    """A PostgreSQL cluster in a temporary directory, or None without the binaries."""
    initdbs = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not initdbs:
        yield None
        return
    bindir = initdbs[-1].parent
    root = Path(tempfile.mkdtemp(prefix="jupyter-io-bench-pg-"))
    data, sockets = root / "data", root / "socket"
    sockets.mkdir()
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root
        postgres = pwd.getpwnam("postgres")
        for path in (root, sockets):
            os.chown(path, postgres.pw_uid, postgres.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    pg_ctl = [*as_user, str(bindir / "pg_ctl"), "-D", str(data)]
    try:
        subprocess.run(
            [*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {sockets}"
        subprocess.run(
            [*pg_ctl, "-l", str(root / "log"), "-o", options, "-w", "start"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*pg_ctl, "-m", "fast", "-w", "stop"], capture_output=True, check=False)
        shutil.rmtree(root, ignore_errors=True)


async def prepare(url: str, pubkeys: list[str]) -> Store:
    store = await Store.open(url)
    start = datetime.now(timezone.utc)
    for i in range(0, len(pubkeys), 10_000):
        await store.upsert_providers(
            (ProviderProfile(k) for k in pubkeys[i : i + 10_000]), at=start
        )
    return store


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=5_000, help="heartbeats per flush")
    parser.add_argument("--registered", type=int, default=5_000, help="providers in the table")
    parser.add_argument("--runs", type=int, default=9, help="timed flushes per backend")
    parser.add_argument("--postgres-url", help="use this PostgreSQL database")
    parser.add_argument("--no-postgres", action="store_true", help="SQLite only")
    args = parser.parse_args()
    registered = max(args.registered, args.batch)
    pubkeys = [str(Pubkey(secrets.token_bytes(32))) for _ in range(registered)]

    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        urls = {"sqlite": f"sqlite+aiosqlite:///{tmp / 'bench.db'}"}
        if not args.no_postgres:
            pg = args.postgres_url or stack.enter_context(throwaway_postgres())
            if pg:
                urls["postgresql"] = pg
            else:
                print("PostgreSQL: no server binaries (apt-get install postgresql); skipped")

        stores = {name: await prepare(url, pubkeys) for name, url in urls.items()}
        rates: dict[str, list[float]] = {name: [] for name in stores}
        clock = datetime.now(timezone.utc)
        try:
            for run in range(args.runs + 1):  # run 0 warms up
                for name, store in stores.items():
                    clock += timedelta(seconds=1)
                    sample = random.sample(pubkeys, args.batch)
                    batch = {k: clock for k in sample}
                    started = time.perf_counter()
                    updated = await store.record_heartbeats(batch)
                    elapsed = time.perf_counter() - started
                    assert updated == args.batch, (name, updated)
                    if run:
                        rates[name].append(args.batch / elapsed)
        finally:
            for store in stores.values():
                await store.close()

    print(
        f"record_heartbeats: {args.batch} heartbeats per flush, {registered} providers "
        f"registered, {args.runs} flushes per backend (interleaved), {os.cpu_count()} CPUs"
    )
    for name, values in rates.items():
        print(
            f"  {name:<10} median {statistics.median(values):>9,.0f} heartbeats/s   "
            f"p99 (slowest) {percentile(values, 0.01):>9,.0f}/s   "
            f"flush {args.batch / statistics.median(values) * 1000:6.1f} ms"
        )


if __name__ == "__main__":
    asyncio.run(main())
