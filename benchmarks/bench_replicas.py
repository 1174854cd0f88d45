"""Coordinator replicas on one PostgreSQL under load (issue 17's benchmarks).

A throwaway PostgreSQL 15 cluster (default durability: fsync on) and ``--replicas`` real
``jupyter io coordinator`` processes on it (one keypair, ``--payments free``,
``--no-gpu-checks``, offers listed on the providers' word), each on its own loopback port.

1. **Heartbeats.** ``--generators`` load-generator processes link ``--providers`` simulated
   providers (bench_coordinator's lightweight link clients: real websockets, real signed
   hellos, one offer each), provider ``i`` to replica ``i % R``, then heartbeat at each
   total rate of ``--rates`` (heartbeats per second, all providers together) for
   ``--seconds``. Per step: heartbeats absorbed per second (the replicas' own counters,
   ``GET /api/v1/status``), each replica's CPU per heartbeat (``/proc/PID/stat``),
   PostgreSQL's CPU (the postmaster and every backend, exited ones included) and write rate
   (``pg_stat_database`` commits, rows updated / inserted; ``pg_stat_wal`` bytes).
2. **Offer-view staleness**, measured during every step: a change made through replica A
   (a lease started, then ended, on a one-GPU probe provider; a new provider linking) until
   another replica B's scheduler index shows it (``GET /api/v1/offers/candidates``, which
   reads the index, polled every 10 ms; an upper bound by one poll).
3. **Lease starts**: ``--lease-rate`` lease requests a minute, round-robin over the
   replicas' REST (signed requests, free payments: the scheduling path, no escrow), for
   ``--lease-seconds``, on a pool of ``--pool-providers`` x 4 GPUs linked across the
   replicas, each lease ended after 0.3-1.7 s through the next replica; lease -> token
   median and p99, and a double-booking check read from the database: every 50 ms one
   snapshot of the live leases (no provider GPU index in two of them), and at the end.
4. **The change feed's transport**, a micro-benchmark on the same server: writers commit
   provider changes (one UPDATE of a fed column per transaction) while heartbeat flushes of
   5,000 rows run every 0.25 s, with the feed's trigger writing (a) the polled
   ``provider_changes`` table (what the code does), (b) ``pg_notify`` only, (c) both;
   commits per second, PostgreSQL CPU per commit, flush time and delivery latency (poll
   every 0.2 s vs LISTEN).

    python benchmarks/bench_replicas.py            # ~5 min: 4 replicas, 2,000 providers
    python benchmarks/bench_replicas.py --quick    # < 60 s smoke
    python benchmarks/bench_replicas.py --providers 8000 --rates 10000 20000 --seconds 10

The issue's target is 100,000 providers over 4 replicas (20,000 heartbeats/s at the default
5 s interval); a 2-core machine cannot hold 100,000 Python websockets, so the run scales the
providers down and offers the target's heartbeat rate instead (each provider beats more
often): what a replica and the database pay is per heartbeat and per change, not per socket.
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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import asyncpg
import psutil
from bench_coordinator import cpu_seconds, link
from bench_store_heartbeats import throwaway_postgres
from solders.keypair import Keypair
from solders.pubkey import Pubkey
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from jupyter_io.coordinator.store import ProviderProfile, Store
from jupyter_io.coordinator_client import CoordinatorClient, CoordinatorError, LeaseError
from jupyter_io.identity import write_keypair
from jupyter_io.signing import sign_provider_hello

JUPYTER_IO = [sys.executable, "-c", "from jupyter_io.app import main; main()"]
READY = re.compile(r"^jupyter-io coordinator listening on (http://\S+)$")
GIB = 1 << 30
BEAT = '{"type":"heartbeat","load":0.1,"sessions":[]}'
#: The issue's targets.
TARGET_PROVIDERS = 100_000
TARGET_INTERVAL = 5.0  # the coordinator's default heartbeat interval
TARGET_REPLICAS = 4
#: Candidate polls made by the staleness probes (a one-item list: a counter).
POLLS = [0]
#: Where the replicas' logs go (kept after the run).
LOGS = Path(tempfile.gettempdir()) / "bench_replicas_logs"


def p(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def machine() -> str:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"nproc {os.cpu_count()}, {model}, load average {load}; Python {platform.python_version()}"
    )


# --------------------------------------------------------------------------------------------
# PostgreSQL and the replicas


def postgres_processes(port: int) -> psutil.Process:
    """The postmaster listening on ``port`` (its command line names the port)."""
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmd = proc.info["cmdline"] or []
        if proc.info["name"] == "postgres" and "-p" in cmd and str(port) in cmd:
            return proc
    raise SystemExit(f"no postmaster found for port {port}")


def postgres_cpu(postmaster: psutil.Process) -> float:
    """CPU seconds of the postmaster, its live children and the children it has reaped."""
    times = postmaster.cpu_times()
    total = times.user + times.system + times.children_user + times.children_system
    for child in postmaster.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            t = child.cpu_times()
            total += t.user + t.system
    return total


async def pg_counters(conn: asyncpg.Connection) -> dict[str, float]:
    row = await conn.fetchrow(
        "SELECT d.xact_commit, d.tup_updated, d.tup_inserted, w.wal_bytes, w.wal_records "
        "FROM pg_stat_database d, pg_stat_wal w WHERE d.datname = current_database()"
    )
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    return {k: float(v) for k, v in dict(row).items()}


@dataclass
class Replica:
    proc: asyncio.subprocess.Process
    url: str
    client: CoordinatorClient

    @property
    def pid(self) -> int:
        return self.proc.pid


async def start_replica(
    root: Path, i: int, db: str, keypair: Path, heartbeat_interval: float
) -> Replica:
    data = root / f"replica{i}"
    log = (LOGS / f"replica{i}.log").open("w")
    proc = await asyncio.create_subprocess_exec(
        *JUPYTER_IO,
        "coordinator",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        str(data),
        "--db",
        db,
        "--keypair",
        str(keypair),
        "--payments",
        "free",
        "--no-gpu-checks",
        "--heartbeat-interval",
        str(heartbeat_interval),
        "--CoordinatorConfig.max_unauthenticated_per_address=256",
        "--CoordinatorConfig.offers_cache_ttl=0",
        stdout=asyncio.subprocess.PIPE,
        stderr=log,
    )
    assert proc.stdout is not None
    while True:
        line = (await asyncio.wait_for(proc.stdout.readline(), 90)).decode().strip()
        if not line:
            raise SystemExit(f"replica {i} exited before it was ready")
        if match := READY.match(line):
            url = match.group(1)
            return Replica(proc, url, CoordinatorClient(url, timeout=30))


async def stop_replica(replica: Replica) -> None:
    replica.client.close()
    if replica.proc.returncode is None:
        replica.proc.terminate()
        try:
            await asyncio.wait_for(replica.proc.wait(), 30)
        except asyncio.TimeoutError:
            replica.proc.kill()
            await replica.proc.wait()


# --------------------------------------------------------------------------------------------
# The load generator (a process of its own: `--role generator`)


async def generator(args: argparse.Namespace) -> None:
    """Link ``--count`` providers from ``--offset`` over the replicas; on "go" on stdin,
    heartbeat at each step's rate (this generator's share), then at the background rate
    until stdin closes."""
    urls = [u.replace("http", "ws", 1) + "/api/v1/providers/connect" for u in args.urls]
    gate = asyncio.Semaphore(16 * len(urls))
    links: list[ClientConnection] = []

    failed = 0

    async def one(i: int) -> None:
        nonlocal failed
        async with gate:
            for attempt in range(3):  # a handshake that hangs or fails is tried again
                try:
                    links.append(
                        await asyncio.wait_for(link(urls[(i + attempt) % len(urls)], i), 30)
                    )
                    return
                except (asyncio.TimeoutError, OSError, InvalidHandshake, ConnectionClosed):
                    failed += 1
                    await asyncio.sleep(0.5)

    async def keep_alive() -> None:  # linking takes a while: heartbeat the early ones
        while True:
            await asyncio.sleep(1.0)
            for ws in list(links):
                with contextlib.suppress(ConnectionClosed):
                    await ws.send(BEAT)

    started = time.perf_counter()
    keeper = asyncio.create_task(keep_alive())
    await asyncio.gather(*(one(i) for i in range(args.offset, args.offset + args.count)))
    seconds = time.perf_counter() - started
    print(json.dumps({"linked": len(links), "failed": failed, "seconds": seconds}), flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    await reader.readline()  # "go" (the other generators may still be linking till then)
    keeper.cancel()
    closed = asyncio.ensure_future(reader.read())
    random.shuffle(links)
    cursor = 0
    tick = 0.005

    async def send_at(rate: float, seconds: float | None) -> int:
        nonlocal cursor
        sent, owed = 0, 0.0
        deadline = None if seconds is None else time.perf_counter() + seconds
        next_tick = time.perf_counter()
        while (deadline is None or time.perf_counter() < deadline) and not closed.done():
            owed += rate * tick
            while owed >= 1:
                with contextlib.suppress(ConnectionClosed):  # lost: counted by the replicas
                    await links[cursor].send(BEAT)
                cursor = (cursor + 1) % len(links)
                sent += 1
                owed -= 1
            next_tick += tick
            await asyncio.sleep(max(0.0, next_tick - time.perf_counter()))
        return sent

    for rate in args.rates:
        sent = await send_at(rate, args.seconds)
        print(json.dumps({"rate": rate, "sent": sent}), flush=True)
        await send_at(args.background, 1.5)  # between steps, the background rate
    await send_at(args.background, None)
    for ws in links:
        ws.transport.abort()


# --------------------------------------------------------------------------------------------
# Link clients kept in this process: probe providers and the lease pool


class SimProvider:
    """A provider linked from this process that heartbeats every second and reads (and
    ignores) what the coordinator sends it (ends, dials)."""

    def __init__(self, ws: ClientConnection, pubkey: str) -> None:
        self.ws = ws
        self.pubkey = pubkey
        self.tasks = [asyncio.create_task(self._beat()), asyncio.create_task(self._drain())]

    async def _beat(self) -> None:
        with contextlib.suppress(Exception):
            while True:
                await self.ws.send(BEAT)
                await asyncio.sleep(1.0)

    async def _drain(self) -> None:
        with contextlib.suppress(Exception):
            async for _ in self.ws:
                pass

    async def close(self) -> None:
        """Close the link as a provider host stopping does (offline, not lost)."""
        for task in self.tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), 5)
        self.ws.transport.abort()


async def link_provider(url: str, name: str, model: str, gpus: int) -> SimProvider:
    ws = await connect(
        url.replace("http", "ws", 1) + "/api/v1/providers/connect",
        compression=None,
        open_timeout=60,
        ping_interval=None,
    )
    challenge = json.loads(await ws.recv())
    keypair = Keypair()
    signature = sign_provider_hello(
        keypair, Pubkey.from_string(challenge["coordinator"]), bytes.fromhex(challenge["nonce"])
    )
    offer = {
        "gpu": model,
        "vram_bytes": 24 * GIB,
        "count": gpus,
        "gpu_indices": list(range(gpus)),
        "price_lamports_per_hour": 1_000_000,
        "simulated": True,
        "driver": None,
        "cuda": None,
        "benchmark_tflops": None,
    }
    hello = {
        "type": "hello",
        "version": 1,
        "pubkey": str(keypair.pubkey()),
        "signature": signature,
        "sessions": [],
        "inventory": {
            "name": name,
            "region": "eu-west",
            "reachable_url": None,
            "max_kernels": gpus,
            "offers": [offer],
        },
    }
    await ws.send(json.dumps(hello))
    welcome = json.loads(await ws.recv())
    if welcome["type"] != "welcome":
        raise SystemExit(f"link refused: {welcome}")
    return SimProvider(ws, str(keypair.pubkey()))


# --------------------------------------------------------------------------------------------
# Staleness: a change through replica A until replica B's index shows it


@dataclass
class Staleness:
    samples: dict[str, list[float]] = field(
        default_factory=lambda: {"lease start": [], "lease end": [], "link": []}
    )
    timeouts: int = 0

    def add(self, kind: str, ms: float | None) -> None:
        if ms is None:
            self.timeouts += 1
        else:
            self.samples[kind].append(ms)

    def all(self) -> list[float]:
        return [x for values in self.samples.values() for x in values]


async def wait_view(
    client: CoordinatorClient, gpu: str, present: bool, since: float, timeout: float = 10.0
) -> float | None:
    """Poll ``client``'s candidates for ``gpu`` every 10 ms until it is (not) offered free;
    ms since ``since``, or None after ``timeout``."""
    while time.perf_counter() - since < timeout:
        POLLS[0] += 1
        found = await client.candidates(gpu, limit=1)
        if bool(found) == present:
            return 1000 * (time.perf_counter() - since)
        await asyncio.sleep(0.01)
    return None


async def probe_loop(
    replicas: list[Replica],
    probes: list[SimProvider],
    users: list[Keypair],
    out: Staleness,
    stop: asyncio.Event,
) -> None:
    """Until ``stop``: lease and end probe providers' GPU through one replica, watch another;
    every fourth round a new provider links at one replica and is watched for at another."""
    r = len(replicas)
    clients = [[CoordinatorClient(x.url, u, timeout=30) for x in replicas] for u in users]
    i = 0
    try:
        while not stop.is_set():
            a = i % r
            b = (a + 1 + (i // r) % (r - 1)) % r
            watcher = replicas[b].client
            if i % 4 == 3:
                model = f"Probe link {i}"
                sim = await link_provider(replicas[a].url, f"probe-link-{i}", model, 1)
                t0 = time.perf_counter()  # the welcome: the link is stored
                out.add("link", await wait_view(watcher, model, True, t0))
                await sim.close()
            else:
                k = i % len(probes)
                model = f"Probe {k}"
                client = clients[i % len(users)][a]
                if await wait_view(watcher, model, True, time.perf_counter()) is None:
                    out.timeouts += 1  # still held from a timed-out round
                    i += 1
                    continue
                grant = await client.request_lease(model)
                t0 = time.perf_counter()
                out.add("lease start", await wait_view(watcher, model, False, t0))
                await client.end_lease(grant.lease)
                t0 = time.perf_counter()
                out.add("lease end", await wait_view(watcher, model, True, t0))
            i += 1
    finally:
        for row in clients:
            for c in row:
                c.close()


# --------------------------------------------------------------------------------------------
# Heartbeat steps


@dataclass
class Step:
    rate: float
    absorbed: list[float]  # per 1 s sample, all replicas together
    per_replica: list[float]  # heartbeats/s of each replica over the step
    cpu_us: list[float]  # each replica's CPU per heartbeat
    cpu_share: list[float]  # each replica's CPU seconds per second
    pg_cpu: float  # PostgreSQL CPU seconds per second
    writes: dict[str, float]  # per second
    lag_ms: float  # the highest view_lag_ms seen
    sent: float = 0.0
    staleness: Staleness = field(default_factory=Staleness)
    gen_cpu: float = 0.0


async def sample_step(
    replicas: list[Replica], postmaster: psutil.Process, pg: asyncpg.Connection, seconds: float
) -> Step:
    statuses = [await x.client.status() for x in replicas]
    cpus = [cpu_seconds(x.pid) for x in replicas]
    pg_cpu0, pg0, t0 = postgres_cpu(postmaster), await pg_counters(pg), time.perf_counter()
    first = list(statuses)
    absorbed: list[float] = []
    lag = 0.0
    last = t0
    for _ in range(max(1, int(seconds))):
        await asyncio.sleep(1.0)
        now_statuses = [await x.client.status() for x in replicas]
        now = time.perf_counter()
        beats = sum(
            n["heartbeats"] - o["heartbeats"] for n, o in zip(now_statuses, statuses, strict=True)
        )
        absorbed.append(beats / (now - last))
        lag = max([lag, *(s["replica"]["view_lag_ms"] for s in now_statuses)])
        statuses, last = now_statuses, now
    elapsed = last - t0
    pg1 = await pg_counters(pg)
    per_beats = [s["heartbeats"] - f["heartbeats"] for s, f in zip(statuses, first, strict=True)]
    used = [cpu_seconds(x.pid) - c for x, c in zip(replicas, cpus, strict=True)]
    return Step(
        rate=0.0,
        absorbed=absorbed,
        per_replica=[b / elapsed for b in per_beats],
        cpu_us=[1e6 * u / max(b, 1) for u, b in zip(used, per_beats, strict=True)],
        cpu_share=[u / elapsed for u in used],
        pg_cpu=(postgres_cpu(postmaster) - pg_cpu0) / elapsed,
        writes={k: (pg1[k] - pg0[k]) / elapsed for k in pg0},
        lag_ms=lag,
    )


# --------------------------------------------------------------------------------------------
# Lease starts across replicas, and the double-booking check


LOCK_WAITS = """
SELECT a.query, (SELECT b.query FROM pg_stat_activity b
                 WHERE b.pid = (pg_blocking_pids(a.pid))[1]) AS blocker
FROM pg_stat_activity a WHERE a.wait_event_type = 'Lock'
"""
DOUBLE_BOOKED = """
SELECT l.provider_pubkey, g.idx, count(*) AS n
FROM leases l, json_array_elements_text(l.gpu_indices::json) AS g(idx)
WHERE l.state IN ('requested', 'active') AND l.gpu_model = $1
GROUP BY 1, 2 HAVING count(*) > 1
"""


async def lease_starts(
    replicas: list[Replica],
    users: list[Keypair],
    per_minute: float,
    seconds: float,
    pg: asyncpg.Connection,
    model: str,
) -> dict[str, Any]:
    r = len(replicas)
    clients = [[CoordinatorClient(x.url, u, timeout=30) for x in replicas] for u in users]
    times: list[float] = []
    refused: dict[str, int] = {}
    ended = 0
    snapshots = 0
    double: list[Any] = []
    stop = asyncio.Event()

    async def one(i: int) -> None:
        nonlocal ended
        client = clients[i % len(users)][i % r]
        t0 = time.perf_counter()
        try:
            grant = await client.request_lease(model)
        except (LeaseError, CoordinatorError) as exc:
            key = getattr(exc, "code", None) or str(exc)[:80]
            refused[key] = refused.get(key, 0) + 1
            return
        times.append(1000 * (time.perf_counter() - t0))
        assert grant.token, "a free lease's grant carries its token"
        await asyncio.sleep(random.uniform(0.3, 1.7))
        await clients[i % len(users)][(i + 1) % r].end_lease(grant.lease)
        ended += 1

    commit_ms: list[float] = []
    lock_waits: list[int] = []
    waiting_for: dict[str, int] = {}

    async def check() -> None:
        nonlocal snapshots
        while not stop.is_set():
            double.extend(await pg.fetch(DOUBLE_BOOKED, model))
            snapshots += 1
            waiting = await pg.fetch(LOCK_WAITS)
            lock_waits.append(len(waiting))
            for row in waiting:
                key = f"{row['query'][:70]} <- {(row['blocker'] or '?')[:70]}"
                waiting_for[key] = waiting_for.get(key, 0) + 1
            # A transaction with an id: its commit waits for the WAL's flush (fsync), as a
            # lease's does.
            t0 = time.perf_counter()
            await pg.fetchval("SELECT txid_current()")
            commit_ms.append(1000 * (time.perf_counter() - t0))
            await asyncio.sleep(0.05)

    checker = asyncio.create_task(check())
    interval = 60.0 / per_minute
    started = time.perf_counter()
    tasks = []
    n = int(seconds * per_minute / 60)
    for i in range(n):
        delay = started + i * interval - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    wall = time.perf_counter() - started
    await asyncio.gather(*tasks)
    stop.set()
    await checker
    double.extend(await pg.fetch(DOUBLE_BOOKED, model))
    for row in clients:
        for c in row:
            c.close()
    return {
        "requested": n,
        "per_minute": 60 * n / wall,
        "granted": len(times),
        "ended": ended,
        "refused": refused,
        "median_ms": statistics.median(times) if times else float("nan"),
        "p99_ms": p(times, 0.99),
        "max_ms": max(times, default=float("nan")),
        "snapshots": snapshots,
        "double_booked": len(double),
        "lock_waits_mean": statistics.fmean(lock_waits) if lock_waits else 0.0,
        "lock_waits_max": max(lock_waits, default=0),
        "waiting_for": sorted(waiting_for.items(), key=lambda kv: -kv[1])[:4],
        "commit_p50_ms": p(commit_ms, 0.5),
        "commit_p99_ms": p(commit_ms, 0.99),
        "commit_max_ms": max(commit_ms, default=float("nan")),
    }


# --------------------------------------------------------------------------------------------
# The change feed's transport: trigger into a table vs NOTIFY


FEED_FUNCTION = """
CREATE OR REPLACE FUNCTION jupyter_io_provider_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE key text;
BEGIN
    IF TG_TABLE_NAME = 'providers' THEN key := NEW.pubkey;
    ELSIF TG_OP = 'DELETE' THEN key := OLD.provider_pubkey;
    ELSE key := NEW.provider_pubkey;
    END IF;
    {body}
    RETURN NULL;
END
$$
"""
TABLE = "INSERT INTO provider_changes (pubkey) VALUES (key);"
NOTIFY = (
    "PERFORM pg_notify('provider_changes', "
    "key || ' ' || extract(epoch FROM clock_timestamp())::text);"
)
VARIANTS = {"table (the code)": TABLE, "notify": NOTIFY, "table + notify": TABLE + NOTIFY}


async def feed_transport(
    admin_url: str, postmaster: psutil.Process, seconds: float, writers: int, registered: int
) -> list[dict[str, Any]]:
    dsn = admin_url
    admin = await asyncpg.connect(dsn)
    await admin.execute("DROP DATABASE IF EXISTS feedbench")
    await admin.execute("CREATE DATABASE feedbench")
    await admin.close()
    db = dsn.rsplit("/", 1)[0] + "/feedbench"
    store = await Store.open(db)
    keys = [str(Keypair().pubkey()) for _ in range(registered)]
    at = datetime.now(timezone.utc)
    for i in range(0, len(keys), 10_000):
        await store.upsert_providers((ProviderProfile(k) for k in keys[i : i + 10_000]), at=at)
    results = []
    ddl = await asyncpg.connect(db)
    try:
        await ddl.execute(FEED_FUNCTION.replace("{body}", TABLE))
        flushes_alone = "heartbeat flushes alone"
        results.append(await _feed_run(flushes_alone, db, store, keys, postmaster, seconds, 0))
        for name, body in VARIANTS.items():
            await ddl.execute(FEED_FUNCTION.replace("{body}", body))
            await ddl.execute("TRUNCATE provider_changes")
            results.append(await _feed_run(name, db, store, keys, postmaster, seconds, writers))
        await ddl.execute(FEED_FUNCTION.replace("{body}", TABLE))
    finally:
        await ddl.close()
        await store.close()
    return results


async def _feed_run(
    name: str,
    db: str,
    store: Store,
    keys: list[str],
    postmaster: psutil.Process,
    seconds: float,
    writers: int,
) -> dict[str, Any]:
    stop = asyncio.Event()
    commits = 0
    latencies: list[float] = []
    flushes: list[float] = []
    conns = [await asyncpg.connect(db) for _ in range(writers)]
    listener = await asyncpg.connect(db)
    poller = await asyncpg.connect(db)

    async def write(conn: asyncpg.Connection) -> None:
        nonlocal commits
        while not stop.is_set():
            await conn.execute(
                "UPDATE providers SET online_since = clock_timestamp() WHERE pubkey = $1",
                random.choice(keys),
            )
            commits += 1

    async def flush() -> None:
        clock = datetime.now(timezone.utc)
        while not stop.is_set():
            clock += timedelta(seconds=1)
            t0 = time.perf_counter()
            await store.record_heartbeats({k: clock for k in random.sample(keys, 5000)})
            flushes.append(1000 * (time.perf_counter() - t0))
            await asyncio.sleep(max(0.0, 0.25 - (time.perf_counter() - t0)))

    async def poll() -> None:
        last = int(await poller.fetchval("SELECT coalesce(max(seq), 0) FROM provider_changes"))
        while not stop.is_set():
            await asyncio.sleep(0.2)
            rows = await poller.fetch(
                "SELECT seq, extract(epoch FROM clock_timestamp() - at) AS age "
                "FROM provider_changes WHERE seq > $1 ORDER BY seq LIMIT 20000",
                last,
            )
            if rows:
                last = rows[-1]["seq"]
                latencies.extend(1000 * float(row["age"]) for row in rows)

    def heard(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
        sent = float(payload.rsplit(" ", 1)[1])
        latencies.append(1000 * (time.time() - sent))

    notify = "notify" in name and "table" not in name
    if notify:
        await listener.add_listener("provider_changes", heard)
    tasks = [asyncio.create_task(write(c)) for c in conns] + [asyncio.create_task(flush())]
    if not notify:
        tasks.append(asyncio.create_task(poll()))
    await asyncio.sleep(1.0)  # warm up
    wal = "SELECT wal_bytes FROM pg_stat_wal"
    wal0, f0 = float(await listener.fetchval(wal)), len(flushes)
    cpu0, n0, t0 = postgres_cpu(postmaster), commits, time.perf_counter()
    await asyncio.sleep(seconds)
    cpu1, n1, t1 = postgres_cpu(postmaster), commits, time.perf_counter()
    wal1, f1 = float(await listener.fetchval(wal)), len(flushes)
    stop.set()
    await asyncio.gather(*tasks)
    for conn in [*conns, listener, poller]:
        await conn.close()
    rate = (n1 - n0) / (t1 - t0)
    return {
        "variant": name,
        "commits_s": rate,
        "pg_share": (cpu1 - cpu0) / (t1 - t0),
        "rows_s": 5000 * (f1 - f0) / (t1 - t0),
        "wal_b_s": (wal1 - wal0) / (t1 - t0),
        "flush_ms": statistics.median(flushes),
        "delivery_p50_ms": p(latencies, 0.5),
        "delivery_p99_ms": p(latencies, 0.99),
    }


# --------------------------------------------------------------------------------------------


async def cpu_rate(
    replicas: list[Replica], postmaster: psutil.Process, seconds: float
) -> tuple[list[float], float]:
    """Each replica's and PostgreSQL's CPU seconds per second over ``seconds``."""
    cpu0, pg0, t0 = [cpu_seconds(x.pid) for x in replicas], postgres_cpu(postmaster), time.time()
    await asyncio.sleep(seconds)
    elapsed = time.time() - t0
    return (
        [(cpu_seconds(x.pid) - c) / elapsed for x, c in zip(replicas, cpu0, strict=True)],
        (postgres_cpu(postmaster) - pg0) / elapsed,
    )


async def start_generators(args: argparse.Namespace, urls: list[str]) -> list[Any]:
    gens = []
    share = args.providers // args.generators
    for g in range(args.generators):
        count = share if g < args.generators - 1 else args.providers - share * g
        gens.append(
            await asyncio.create_subprocess_exec(
                sys.executable,
                __file__,
                "--role",
                "generator",
                "--urls",
                *urls,
                "--count",
                str(count),
                "--offset",
                str(g * share),
                "--seconds",
                str(args.seconds),
                "--background",
                str(args.background / args.generators),
                "--rates",
                *(str(rate / args.generators) for rate in args.rates),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
        )
    return gens


async def run_probes(
    replicas: list[Replica],
    probes: list[SimProvider],
    users: list[Keypair],
    body: Callable[[], Awaitable[Any]],
) -> tuple[Any, Staleness]:
    staleness = Staleness()
    stop = asyncio.Event()
    prober = asyncio.create_task(probe_loop(replicas, probes, users, staleness, stop))
    try:
        result = await body()
    finally:
        stop.set()
        await prober
    return result, staleness


def print_staleness(label: str, s: Staleness) -> None:
    every = s.all()
    parts = ", ".join(
        f"{k} {len(v)} (p50 {p(v, 0.5):.0f}, p99 {p(v, 0.99):.0f} ms)"
        for k, v in s.samples.items()
        if v
    )
    print(
        f"  offer-view staleness {label}: {len(every)} samples, p50 {p(every, 0.5):.0f} ms, "
        f"p99 {p(every, 0.99):.0f} ms, max {max(every, default=float('nan')):.0f} ms "
        f"({parts}; timed out {s.timeouts})",
        flush=True,
    )


async def main(args: argparse.Namespace) -> None:
    wall0 = time.perf_counter()
    LOGS.mkdir(exist_ok=True)
    print(
        f"bench_replicas {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.node()}: "
        f"{machine()}"
    )
    r = args.replicas
    target_rate = TARGET_PROVIDERS / TARGET_INTERVAL
    print(
        f"target: {TARGET_PROVIDERS:,} providers over {TARGET_REPLICAS} replicas, one "
        f"heartbeat every {TARGET_INTERVAL:g} s = {target_rate:,.0f} heartbeats/s; "
        f"1,000 lease starts a minute"
    )
    print(
        f"ran: {args.providers:,} providers over {r} replicas, {args.generators} generator "
        f"processes, heartbeat steps of {', '.join(f'{x:,.0f}' for x in args.rates)}/s "
        f"(each provider beating {', '.join(f'{x / args.providers:g}' for x in args.rates)}"
        f"/s), {args.seconds:g} s each; {args.lease_rate:g} lease starts a minute for "
        f"{args.lease_seconds:g} s"
    )
    with (
        tempfile.TemporaryDirectory(prefix="jupyter-io-bench-replicas-") as tmp,
        throwaway_postgres() as pg_url,
    ):
        if pg_url is None:
            raise SystemExit("PostgreSQL server binaries not found (apt-get install postgresql)")
        root = Path(tmp)
        port = int(pg_url.rsplit(":", 1)[1].split("/")[0])
        postmaster = postgres_processes(port)
        admin = await asyncpg.connect(pg_url)
        await admin.execute("CREATE DATABASE replicas")
        await admin.close()
        db_url = pg_url.rsplit("/", 1)[0] + "/replicas"
        pg = await asyncpg.connect(db_url)
        keypair = write_keypair(Keypair(), root / "coordinator.json")
        sa_url = db_url
        replicas = [await start_replica(root, 0, sa_url, keypair, args.heartbeat_interval)]
        replicas += await asyncio.gather(
            *(start_replica(root, i, sa_url, keypair, args.heartbeat_interval) for i in range(1, r))
        )
        gens: list[Any] = []
        probes: list[SimProvider] = []
        pool: list[SimProvider] = []
        try:
            urls = [x.url for x in replicas]
            print(f"replicas: {', '.join(urls)} on PostgreSQL at {pg_url} (fsync on)")
            probes = [
                await link_provider(urls[k % r], f"probe-{k}", f"Probe {k}", 1)
                for k in range(2 * r)
            ]
            pool = [
                await link_provider(urls[k % r], f"pool-{k}", "Bench A10", 4)
                for k in range(args.pool_providers)
            ]
            users = [Keypair() for _ in range(16)]
            idle, idle_pg = await cpu_rate(replicas, postmaster, 5.0)
            print(
                f"  idle (probe and pool providers linked, nothing asked): replicas "
                f"{', '.join(f'{100 * x:.1f}%' for x in idle)} of a core, PostgreSQL "
                f"{100 * idle_pg:.1f}%"
            )
            rss0 = [psutil.Process(x.pid).memory_info().rss for x in replicas]
            cpu0 = [cpu_seconds(x.pid) for x in replicas]
            pg_cpu0 = postgres_cpu(postmaster)
            gens = await start_generators(args, urls)
            t_link = time.perf_counter()
            failed = 0
            for gen in gens:
                done = json.loads(await asyncio.wait_for(gen.stdout.readline(), 900))
                failed += done["failed"]
            linked = time.perf_counter() - t_link
            link_cpu = sum(cpu_seconds(x.pid) for x in replicas) - sum(cpu0) - sum(idle) * linked
            link_pg = postgres_cpu(postmaster) - pg_cpu0 - idle_pg * linked
            gen_cpu = sum(cpu_seconds(g.pid) for g in gens)
            print(
                f"  {args.providers:,} providers linked in {linked:.1f} s "
                f"({args.providers / linked:,.0f} links/s over {r} replicas); per link: "
                f"{1000 * link_cpu / args.providers:.1f} ms replica CPU (all replicas), "
                f"{1000 * link_pg / args.providers:.1f} ms PostgreSQL CPU (idle subtracted), "
                f"{1000 * gen_cpu / args.providers:.1f} ms generator CPU"
            )
            statuses = [await x.client.status() for x in replicas]
            known = [s["replica"]["providers_known"] for s in statuses]
            print(
                f"  handshakes that failed or hung 30 s (tried again): {failed}; providers "
                f"marked lost while linking: {sum(s['providers_lost'] for s in statuses)}"
            )
            rss = [psutil.Process(x.pid).memory_info().rss for x in replicas]
            grew = (sum(rss) - sum(rss0)) / len(replicas)
            print(
                f"  providers known to each replica's index: {known}; replicas' memory "
                f"{', '.join(f'{x / 2**20:.0f}' for x in rss)} MiB (RSS), grown "
                f"{grew / 2**20:.0f} MiB each on average while linking: "
                f"{grew / (args.providers / r) / 1024:.1f} KiB per provider linked there "
                f"(every replica also indexes all {args.providers:,})"
            )
            for gen in gens:
                gen.stdin.write(b"go\n")
                await gen.stdin.drain()
            gen_cpu0 = sum(cpu_seconds(g.pid) for g in gens)
            steps: list[Step] = []
            for rate in args.rates:
                t_step = time.perf_counter()

                async def measure() -> Step:
                    await asyncio.sleep(1.0)  # settle into the rate
                    return await sample_step(replicas, postmaster, pg, args.seconds - 2)

                step, staleness = await run_probes(replicas, probes, users, measure)
                step.rate, step.staleness = rate, staleness
                sent = 0
                for gen in gens:
                    sent += json.loads(await asyncio.wait_for(gen.stdout.readline(), 120))["sent"]
                step.sent = sent / args.seconds
                gen_cpu1 = sum(cpu_seconds(g.pid) for g in gens)
                step.gen_cpu = (gen_cpu1 - gen_cpu0) / (time.perf_counter() - t_step)
                steps.append(step)
                report_step(step, r)
                await asyncio.sleep(1.5)  # the generators' pause between steps
                gen_cpu0 = sum(cpu_seconds(g.pid) for g in gens)
            if len(steps) > 1:
                lo, hi = steps[0], steps[-1]
                d_rate = statistics.median(hi.absorbed) - statistics.median(lo.absorbed)
                d_cpu = sum(hi.cpu_share) - sum(lo.cpu_share)
                print(
                    f"  marginal cost per heartbeat between the {lo.rate:,.0f}/s and "
                    f"{hi.rate:,.0f}/s steps: replicas {1e6 * d_cpu / d_rate:.1f} us CPU "
                    f"(all replicas together); PostgreSQL's rows updated stay at the providers "
                    f"that beat within each 1 s flush ({lo.writes['tup_updated']:,.0f} and "
                    f"{hi.writes['tup_updated']:,.0f}/s): its cost is per provider row flushed "
                    f"(the transport benchmark below measures it at 20,000 rows/s)",
                    flush=True,
                )
            lost = sum([(await x.client.status())["providers_lost"] for x in replicas])
            print(f"  providers lost during the steps (all replicas): {lost}")
            print(
                f"lease starts: {args.lease_rate:g}/min round-robin over {r} replicas for "
                f"{args.lease_seconds:g} s, free payments, {args.pool_providers} providers x "
                f"4 'Bench A10' GPUs; background heartbeats {args.background:,.0f}/s"
            )

            async def leases() -> dict[str, Any]:
                return await lease_starts(
                    replicas, users, args.lease_rate, args.lease_seconds, pg, "Bench A10"
                )

            # The background heartbeats alone, to subtract (the probes' polling is left in:
            # the figure per lease is an upper bound).
            base, base_pg = await cpu_rate(replicas, postmaster, 5.0)
            polls0 = POLLS[0]
            cpu0 = [cpu_seconds(x.pid) for x in replicas]
            pg_cpu0 = postgres_cpu(postmaster)
            t_phase = time.perf_counter()
            lags: list[float] = []
            watching = asyncio.Event()

            async def watch_lag() -> None:
                while not watching.is_set():
                    for x in replicas:
                        lags.append((await x.client.status())["replica"]["view_lag_ms"])
                    await asyncio.sleep(0.5)

            watcher = asyncio.create_task(watch_lag())
            result, staleness = await run_probes(replicas, probes, users, leases)
            watching.set()
            await watcher
            t_phase = time.perf_counter() - t_phase
            lease_cpu = sum(cpu_seconds(x.pid) for x in replicas) - sum(cpu0) - sum(base) * t_phase
            lease_pg = postgres_cpu(postmaster) - pg_cpu0 - base_pg * t_phase
            phase_share = (lease_cpu + sum(base) * t_phase) / t_phase
            phase_pg = (lease_pg + base_pg * t_phase) / t_phase
            print(
                f"  {result['requested']} requested ({result['per_minute']:,.0f}/min), "
                f"{result['granted']} granted, {result['ended']} ended, refused "
                f"{result['refused'] or 0}; lease -> token median {result['median_ms']:.1f} ms, "
                f"p99 {result['p99_ms']:.1f} ms, max {result['max_ms']:.1f} ms",
                flush=True,
            )
            granted = max(result["granted"], 1)
            print(
                f"  double booking: {result['double_booked']} GPU indices held by two live "
                f"leases in {result['snapshots']} database snapshots (every 50 ms + one at the "
                f"end); replicas used {100 * phase_share:.0f}% of a core together, PostgreSQL "
                f"{100 * phase_pg:.0f}%; per lease granted (its start and end; the background "
                f"heartbeats measured for 5 s before subtracted, the staleness probes' "
                f"{POLLS[0] - polls0:,} polls not: an upper bound) replicas "
                f"{1000 * lease_cpu / granted:.1f} ms, PostgreSQL "
                f"{1000 * lease_pg / granted:.1f} ms"
            )
            print(
                f"  a bare commit on the database meanwhile (every 50 ms): p50 "
                f"{result['commit_p50_ms']:.1f} ms, p99 {result['commit_p99_ms']:.1f} ms, max "
                f"{result['commit_max_ms']:.1f} ms; sessions waiting for a lock: mean "
                f"{result['lock_waits_mean']:.2f}, most {result['lock_waits_max']}"
            )
            for query, n in result["waiting_for"]:
                print(f"    waited {n} times: {' '.join(query.split())}")
            print_staleness("during the lease starts", staleness)
            print(
                f"  the replicas' own view_lag_ms meanwhile (every 0.5 s): p50 {p(lags, 0.5):.0f}, "
                f"p99 {p(lags, 0.99):.0f}, max {max(lags, default=float('nan')):.0f}"
            )
            sizes = []
            for table in ("providers", "offers", "leases", "provider_changes", "replicas"):
                row = await pg.fetchrow(
                    f"SELECT pg_total_relation_size('{table}') AS size, "
                    f"(SELECT count(*) FROM {table}) AS n"
                )
                sizes.append(
                    f"{table} {row['n']:,} rows, {row['size'] / 2**20:.1f} MiB "
                    f"({row['size'] / max(row['n'], 1):,.0f} B per row with indexes)"
                )
            print(f"  database: {'; '.join(sizes)}")
            every = Staleness()
            for step in [*steps]:
                for k, v in step.staleness.samples.items():
                    every.samples[k] += v
                every.timeouts += step.staleness.timeouts
            for k, v in staleness.samples.items():
                every.samples[k] += v
            every.timeouts += staleness.timeouts
            print_staleness("over the whole run", every)
        finally:
            for gen in gens:
                with contextlib.suppress(Exception):
                    gen.stdin.close()
            for gen in gens:
                try:
                    await asyncio.wait_for(gen.wait(), 30)
                except asyncio.TimeoutError:
                    gen.kill()
            for sim in [*probes, *pool]:
                await sim.close()
            await asyncio.gather(*(stop_replica(x) for x in replicas))
            await pg.close()
            errors = [
                sum(" ERROR]" in line or "Traceback" in line for line in log.open())
                for log in sorted(LOGS.glob("replica*.log"))
            ]
            print(f"  replicas' logs in {LOGS}: errors and tracebacks logged {errors}")

        print(
            f"change-feed transport: {args.feed_writers} writers committing provider changes "
            f"while 5,000-row heartbeat flushes run every 0.25 s (20,000 heartbeats/s), "
            f"{args.feed_seconds:g} s per variant"
        )
        if args.no_feed:
            return
        rows = await feed_transport(
            pg_url, postmaster, args.feed_seconds, args.feed_writers, args.feed_registered
        )
        alone, base = rows[0], rows[1]
        print(
            f"  {alone['variant']}: {alone['rows_s']:,.0f} rows/s, PostgreSQL "
            f"{100 * alone['pg_share']:.0f}% of a core "
            f"({1e6 * alone['pg_share'] / alone['rows_s']:.1f} us per row), "
            f"WAL {alone['wal_b_s'] / 1e6:.1f} MB/s "
            f"({alone['wal_b_s'] / alone['rows_s']:.0f} B per row), flush of 5,000 median "
            f"{alone['flush_ms']:.0f} ms",
            flush=True,
        )
        for row in rows[1:]:
            extra = (row["pg_share"] - alone["pg_share"]) / max(row["commits_s"], 1)
            print(
                f"  {row['variant']:<18} {row['commits_s']:>7,.0f} commits/s "
                f"({row['commits_s'] / base['commits_s']:.2f}x), PostgreSQL "
                f"{1e6 * extra:.0f} us CPU per commit (over the flushes alone), "
                f"WAL {row['wal_b_s'] / max(row['commits_s'], 1) / 1e3:.1f} kB per commit "
                f"(flushes included), heartbeat flush median {row['flush_ms']:.0f} ms, "
                f"delivery p50 {row['delivery_p50_ms']:.1f} ms, "
                f"p99 {row['delivery_p99_ms']:.1f} ms",
                flush=True,
            )
    print(
        f"done in {time.perf_counter() - wall0:.0f} s; load average now "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )


def report_step(step: Step, r: int) -> None:
    absorbed = statistics.median(step.absorbed)
    print(
        f"  step {step.rate:,.0f}/s offered ({step.sent:,.0f}/s sent): absorbed median "
        f"{absorbed:,.0f}/s, lowest 1 s {min(step.absorbed):,.0f}/s; per replica "
        f"{', '.join(f'{x:,.0f}' for x in step.per_replica)}/s; CPU per heartbeat "
        f"{', '.join(f'{x:.0f}' for x in step.cpu_us)} us (replicas "
        f"{', '.join(f'{100 * x:.0f}%' for x in step.cpu_share)} of a core); highest "
        f"view_lag_ms {step.lag_ms:.0f}",
        flush=True,
    )
    w = step.writes
    pg_us = 1e6 * step.pg_cpu / max(absorbed, 1)
    print(
        f"    PostgreSQL: {100 * step.pg_cpu:.0f}% of a core "
        f"({pg_us:.1f} us per heartbeat absorbed), "
        f"{w['xact_commit']:,.0f} commits/s, {w['tup_updated']:,.0f} rows updated/s, "
        f"{w['tup_inserted']:,.0f} inserted/s, WAL {w['wal_bytes'] / 1e6:.2f} MB/s "
        f"({w['wal_records']:,.0f} records/s); generators {100 * step.gen_cpu:.0f}% of a core",
        flush=True,
    )
    print_staleness("during the step", step.staleness)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=["bench", "generator"], default="bench")
    parser.add_argument("--urls", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--offset", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="a < 60 s smoke run")
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--providers", type=int, default=2000)
    parser.add_argument("--generators", type=int, default=2)
    parser.add_argument(
        "--rates",
        type=float,
        nargs="*",
        default=[5000, 10000, 20000],
        help="heartbeats per second offered, all providers together, one step each",
    )
    parser.add_argument(
        "--background",
        type=float,
        default=2000,
        help="heartbeats per second between steps and during the leases",
    )
    parser.add_argument("--seconds", type=float, default=12.0, help="length of each step")
    parser.add_argument("--heartbeat-interval", type=float, default=5.0)
    parser.add_argument("--lease-rate", type=float, default=1000.0, help="lease starts a minute")
    parser.add_argument("--lease-seconds", type=float, default=60.0)
    parser.add_argument("--pool-providers", type=int, default=12)
    parser.add_argument("--feed-seconds", type=float, default=8.0)
    parser.add_argument("--feed-writers", type=int, default=8)
    parser.add_argument("--feed-registered", type=int, default=20_000)
    parser.add_argument("--no-feed", action="store_true", help="skip the transport benchmark")
    args = parser.parse_args()
    if args.role == "generator":
        asyncio.run(generator(args))
    else:
        if args.quick:
            args.replicas, args.providers, args.rates, args.seconds = 2, 200, [2000], 5.0
            args.lease_seconds, args.feed_seconds, args.background = 6.0, 2.0, 400.0
            args.pool_providers, args.feed_registered = 4, 5000
        asyncio.run(main(args))
