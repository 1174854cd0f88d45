"""The coordinator under load: heartbeats absorbed per second, and relay vs direct echo.

1. **Heartbeats** (target >= 5,000/s on 2 cores). One ``jupyter io coordinator`` process
   (SQLite in a temporary directory, the default store) and, in a separate process, a load
   generator that links ``--providers`` simulated providers over real websockets on loopback
   (challenge signed, inventory published, as the contract says) and then sends heartbeats at
   ``--rates`` per provider per second, step by step. The coordinator's own counters
   (``GET /api/v1/status``) say how many it absorbed; each step prints the offered and absorbed
   rate (median and lowest of 1 s samples), the coordinator's CPU per heartbeat and its store
   flushes (rows and time per flush).
2. **Relay echo** (the relay should add little over the ~0.2 ms floor of a websocket hop). A
   500 B binary round trip, direct to a websockets echo server vs through the coordinator's
   relay to an echo peer dialled like a provider, interleaved A/B ``--echoes`` times; median,
   p99 and their ratio; and 1 MB messages one way, for throughput.

    python benchmarks/bench_coordinator.py                     # 1000 and 2000 providers
    python benchmarks/bench_coordinator.py --providers 2000 --rates 2.5 5 10 --seconds 10
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
from datetime import date
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from solders.keypair import Keypair
from solders.pubkey import Pubkey
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve

from jupyter_io.coordinator_client import CoordinatorClient
from jupyter_io.protocol import FrameKind, encode_control
from jupyter_io.signing import sign_provider_hello, sign_request

READY = re.compile(r"^jupyter-io coordinator listening on (http://\S+)$")
JUPYTER = str(Path(sys.executable).with_name("jupyter"))
GIB = 1 << 30


# --------------------------------------------------------------------------------------------
# The coordinator process


async def start_coordinator(data_dir: str, heartbeat_interval: float) -> tuple[Any, str]:
    proc = await asyncio.create_subprocess_exec(
        JUPYTER, "io", "coordinator", "--listen", "127.0.0.1:0", "--data-dir", data_dir,
        "--heartbeat-interval", str(heartbeat_interval), "--payments", "free",
        # The generator links 64 providers at a time, all from 127.0.0.1.
        "--CoordinatorConfig.max_unauthenticated_per_address=64",
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


# --------------------------------------------------------------------------------------------
# The load generator (a process of its own: `--role generator`)


def inventory(i: int) -> dict[str, Any]:
    model = ("RTX 4090", "RTX 3090", "A100 80GB", "L40S")[i % 4]
    return {
        "name": f"sim-{i}",
        "region": ("eu-west", "us-east", "ap-south")[i % 3],
        "reachable_url": None,
        "max_kernels": 4,
        "offers": [
            {
                "gpu": model,
                "vram_bytes": 24 * GIB,
                "count": 1 + i % 4,
                "gpu_indices": list(range(1 + i % 4)),
                "price_lamports_per_hour": 500_000 + 1_000 * (i % 500),
                "simulated": True,
                "driver": None,
                "cuda": None,
                "benchmark_tflops": None,
            }
        ],
    }


async def link(url: str, i: int) -> ClientConnection:
    ws = await connect(url, compression=None, open_timeout=120, ping_interval=None)
    challenge = json.loads(await ws.recv())
    keypair = Keypair()
    signature = sign_provider_hello(
        keypair, Pubkey.from_string(challenge["coordinator"]), bytes.fromhex(challenge["nonce"])
    )
    hello = {"type": "hello", "version": 1, "pubkey": str(keypair.pubkey()),
             "signature": signature, "inventory": inventory(i), "sessions": []}  # fmt: skip
    await ws.send(json.dumps(hello))
    welcome = json.loads(await ws.recv())
    if welcome["type"] != "welcome":
        raise SystemExit(f"link refused: {welcome}")
    return ws


async def generator(url: str, providers: int, rates: list[float], seconds: float) -> None:
    """Link providers, then heartbeat at each rate for ``seconds``; report on stdout."""
    link_url = url.replace("http", "ws", 1) + "/api/v1/providers/connect"
    started = time.perf_counter()
    gate = asyncio.Semaphore(64)

    async def one(i: int) -> ClientConnection:
        async with gate:
            return await link(link_url, i)

    linked: list[ClientConnection] = []

    async def one_and_keep(i: int) -> ClientConnection:
        ws = await one(i)
        linked.append(ws)
        return ws

    async def keep_alive() -> None:  # linking takes a while: heartbeat the early ones
        while True:
            await asyncio.sleep(1.0)
            for ws in list(linked):
                await ws.send('{"type":"heartbeat","load":0.1,"sessions":[]}')

    keeper = asyncio.create_task(keep_alive())
    links = await asyncio.gather(*(one_and_keep(i) for i in range(providers)))
    keeper.cancel()
    print(json.dumps({"linked": len(links), "seconds": time.perf_counter() - started}), flush=True)
    beat = json.dumps({"type": "heartbeat", "load": 0.1, "sessions": []})
    order = list(range(providers))
    random.shuffle(order)
    tick = 0.005
    for rate in rates:
        # Every tick, the providers whose turn it is send one heartbeat each, spread evenly.
        per_tick = providers * rate * tick
        sent = 0
        owed = 0.0
        cursor = 0
        print(json.dumps({"rate": rate, "start": True}), flush=True)
        deadline = time.perf_counter() + seconds
        next_tick = time.perf_counter()
        while time.perf_counter() < deadline:
            owed += per_tick
            while owed >= 1:
                ws = links[order[cursor]]
                cursor = (cursor + 1) % providers
                await ws.send(beat)
                sent += 1
                owed -= 1
            next_tick += tick
            delay = next_tick - time.perf_counter()
            await asyncio.sleep(max(0.0, delay))
        print(json.dumps({"rate": rate, "sent": sent, "seconds": seconds}), flush=True)
        await asyncio.sleep(1.5)  # let the coordinator drain before the next step
    await sys_stdin_closed()
    for ws in links:
        ws.transport.abort()


async def sys_stdin_closed() -> None:
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)


# --------------------------------------------------------------------------------------------
# Heartbeats, measured from the coordinator's counters


async def bench_heartbeats(url: str, pid: int, providers: int, rates: list[float],
                           seconds: float) -> list[dict[str, Any]]:  # fmt: skip
    gen = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--role", "generator", "--url", url,
        "--providers", str(providers), "--seconds", str(seconds),
        "--rates", *map(str, rates),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert gen.stdout is not None and gen.stdin is not None
    client = CoordinatorClient(url, timeout=30)
    results = []
    try:
        linked = json.loads(await asyncio.wait_for(gen.stdout.readline(), 600))
        print(f"  {linked['linked']} providers linked in {linked['seconds']:.1f} s")
        for rate in rates:
            json.loads(await asyncio.wait_for(gen.stdout.readline(), 60))  # step starts
            await asyncio.sleep(1.0)  # settle into the rate
            samples: list[float] = []
            status = await client.status()
            cpu = cpu_seconds(pid)
            first = dict(status)
            last_time = time.perf_counter()
            for _ in range(int(seconds) - 2):
                await asyncio.sleep(1.0)
                now_status = await client.status()
                now = time.perf_counter()
                absorbed = now_status["heartbeats"] - status["heartbeats"]
                samples.append(absorbed / (now - last_time))
                status, last_time = now_status, now
            used = cpu_seconds(pid) - cpu
            done = json.loads(await asyncio.wait_for(gen.stdout.readline(), 60))
            beats = status["heartbeats"] - first["heartbeats"]
            flushes = status["flushes"] - first["flushes"]
            rows = status["heartbeats_flushed"] - first["heartbeats_flushed"]
            flush_time = status["flush_seconds"] - first["flush_seconds"]
            row = {
                "providers": providers,
                "offered": providers * rate,
                "sent": done["sent"] / done["seconds"],
                "median": statistics.median(samples),
                "lowest": min(samples),
                "cpu_us": 1e6 * used / max(beats, 1),
                "rows_per_flush": rows / max(flushes, 1),
                "flush_ms": 1000 * flush_time / max(flushes, 1),
                "lost": status["providers_lost"],
            }
            results.append(row)
            print(
                f"  {providers} providers x {rate:g}/s: offered {row['offered']:,.0f}/s "
                f"(sent {row['sent']:,.0f}/s), absorbed median {row['median']:,.0f}/s, lowest "
                f"{row['lowest']:,.0f}/s; {row['cpu_us']:.0f} us coordinator CPU per heartbeat; "
                f"flush {row['rows_per_flush']:,.0f} rows in {row['flush_ms']:.1f} ms; "
                f"providers lost {row['lost']}",
                flush=True,
            )
    finally:
        client.close()
        gen.stdin.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(gen.wait(), 30)
        if gen.returncode is None:
            gen.kill()
            await gen.wait()
    return results


# --------------------------------------------------------------------------------------------
# Relay echo vs direct echo


async def echo(ws: ServerConnection | ClientConnection) -> None:
    with contextlib.suppress(Exception):
        async for message in ws:
            await ws.send(message)


async def bench_relay(url: str, echoes: int) -> dict[str, Any]:
    client = CoordinatorClient(url, Keypair(), timeout=30)
    link_url = url.replace("http", "ws", 1) + "/api/v1/providers/connect"
    provider = Keypair()
    ws_link = await connect(link_url, compression=None)
    challenge = json.loads(await ws_link.recv())
    await ws_link.send(json.dumps({
        "type": "hello", "version": 1, "pubkey": str(provider.pubkey()),
        "signature": sign_provider_hello(provider, Pubkey.from_string(challenge["coordinator"]),
                                         bytes.fromhex(challenge["nonce"])),
        "inventory": {"name": "echo", "region": "local", "reachable_url": None, "max_kernels": 1,
                      "offers": [{"gpu": "Echo GPU", "vram_bytes": GIB, "count": 1,
                                  "gpu_indices": [0], "price_lamports_per_hour": 1,
                                  "simulated": True}]},
        "sessions": [],
    }))  # fmt: skip
    assert json.loads(await ws_link.recv())["type"] == "welcome"

    async def heartbeats() -> None:
        with contextlib.suppress(Exception):
            while True:
                await ws_link.send('{"type":"heartbeat","load":0,"sessions":[]}')
                await asyncio.sleep(1.0)

    beating = asyncio.create_task(heartbeats())
    grant = await client.request_lease("Echo GPU")
    relayed = await connect(grant.tunnel_url, additional_headers=grant.relay_headers(),
                            compression=None, max_size=None)  # fmt: skip
    dial = json.loads(await ws_link.recv())
    parts = urlsplit(dial["url"])
    peer = await connect(
        dial["url"],
        additional_headers=sign_request(provider, "GET", f"{parts.path}?{parts.query}"),
        compression=None, max_size=None,
    )  # fmt: skip
    # A real provider host welcomes the client first; until then the relay holds both sides
    # to the tunnel handshake's small frames (issue 11).
    welcome = encode_control(FrameKind.WELCOME, {"session": "echo"})
    await peer.send(welcome)
    assert await relayed.recv() == welcome
    peer_task = asyncio.create_task(echo(peer))
    server = await serve(echo, "127.0.0.1", 0, compression=None, max_size=None)
    port = server.sockets[0].getsockname()[1]
    direct = await connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None)

    payload = os.urandom(500)
    times: dict[str, list[float]] = {"direct": [], "relay": []}
    for i in range(echoes + 200):
        for name, ws in (("direct", direct), ("relay", relayed)):
            t0 = time.perf_counter()
            await ws.send(payload)
            await ws.recv()
            if i >= 200:  # warm-up
                times[name].append(time.perf_counter() - t0)

    big = os.urandom(1 << 20)
    rates = {}
    for name, ws in (("direct", direct), ("relay", relayed)):
        t0 = time.perf_counter()
        for _ in range(100):
            await ws.send(big)
            await ws.recv()
        rates[name] = 2 * 100 / (time.perf_counter() - t0)  # MB/s, both directions counted

    result: dict[str, Any] = {}
    for name, samples in times.items():
        samples.sort()
        result[name] = {
            "median_ms": 1000 * statistics.median(samples),
            "p99_ms": 1000 * samples[int(0.99 * len(samples))],
            "mb_s": rates[name],
        }
    for ws in (relayed, direct, peer, ws_link):
        await ws.close()
    beating.cancel()
    peer_task.cancel()
    server.close()
    client.close()
    return result


# --------------------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> None:
    print(f"bench_coordinator {date.today()} on {platform.node()} ({os.cpu_count()} CPUs), "
          f"Python {platform.python_version()}")  # fmt: skip
    results = []
    for providers in args.providers:
        with tempfile.TemporaryDirectory(prefix="jupyter-io-bench-coord-") as data_dir:
            proc, url = await start_coordinator(data_dir, args.heartbeat_interval)
            try:
                print(f"heartbeats: coordinator pid {proc.pid} at {url}, SQLite store")
                results += await bench_heartbeats(
                    url, proc.pid, providers, args.rates, args.seconds
                )
            finally:
                proc.terminate()
                await asyncio.wait_for(proc.wait(), 60)
    relay: dict[str, Any] = {}
    if args.echoes:
        with tempfile.TemporaryDirectory(prefix="jupyter-io-bench-coord-") as data_dir:
            proc, url = await start_coordinator(data_dir, args.heartbeat_interval)
            try:
                relay = await bench_relay(url, args.echoes)
            finally:
                proc.terminate()
                await asyncio.wait_for(proc.wait(), 60)
    if relay:
        d, r = relay["direct"], relay["relay"]
        print(f"relay echo, 500 B, {args.echoes} round trips interleaved direct/relay "
              f"(a fresh coordinator, one linked provider):")  # fmt: skip
        print(f"  direct websocket   median {d['median_ms']:.3f} ms  p99 {d['p99_ms']:.3f} ms  "
              f"1 MB echo {d['mb_s']:.0f} MB/s")  # fmt: skip
        print(f"  through the relay  median {r['median_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms  "
              f"1 MB echo {r['mb_s']:.0f} MB/s")  # fmt: skip
        print(f"  relay / direct     median {r['median_ms'] / d['median_ms']:.2f}x  p99 "
              f"{r['p99_ms'] / d['p99_ms']:.2f}x; relay adds {r['median_ms'] - d['median_ms']:.3f}"
              f" ms median")  # fmt: skip
    best = max((row["median"] for row in results), default=0)
    print(f"best absorbed rate: {best:,.0f} heartbeats/s (target >= 5,000/s)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=["bench", "generator"], default="bench")
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--providers", type=int, nargs="+", default=[1000, 2000])
    parser.add_argument("--rates", type=float, nargs="+", default=[2.5, 5.0, 10.0],
                        help="heartbeats per provider per second, one step each")  # fmt: skip
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each step")
    parser.add_argument("--heartbeat-interval", type=float, default=2.0,
                        help="the coordinator's interval (loss after 3 missed)")  # fmt: skip
    parser.add_argument("--echoes", type=int, default=2000)
    args = parser.parse_args()
    if args.role == "generator":
        asyncio.run(generator(args.url, args.providers[0], args.rates, args.seconds))
    else:
        asyncio.run(main(args))
