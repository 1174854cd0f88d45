"""GPU challenges between a real coordinator and real provider hosts on loopback (the CPU
path: simulated GPUs and the CPU offer multiply with numpy on the CPU and say so).

An honest host passes and its offers show ``verified: true``; hosts that lie (a wrong
product, a product of a smaller matrix, rows that are not the committed ones, no answer in
the model's time) are delisted with the reason, and the verdict is in the provider's record
(``gpu_checks``). Only the challenge's arithmetic is replaced in the liars: the link, the
coordinator and the host are the real ones.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from solders.keypair import Keypair

from jupyter_io.coordinator.challenges import GpuChallenges
from jupyter_io.coordinator.server import CoordinatorServer
from jupyter_io.coordinator_client import CoordinatorClient
from jupyter_io.gpu_challenge import matrix_rows
from jupyter_io.identity import write_keypair
from provider_host import server as host_module
from provider_host.challenge import (
    ChallengeResponder,
    Product,
    commit_product,
    driver_information,
    multiply,
    open_row,
    product_of,
)
from provider_host.server import LISTENING_PREFIX, ProviderServer

from .conftest import DEFAULT_TIMEOUT, CoordinatorStarter, HostFactory, free_port

torch = pytest.importorskip("torch")  # imported here: not in a worker thread mid-test

pytestmark = pytest.mark.timeout(90)

N = 256
OVERHEAD = 3.0


@pytest.fixture
async def coordinator(start_coordinator: CoordinatorStarter) -> CoordinatorServer:
    """A coordinator that challenges at each link (never at random), n = 256 on the CPU."""
    return await start_coordinator(
        gpu_checks=True,
        gpu_check_interval=0.0,
        gpu_check_cpu_n=N,
        gpu_check_overhead=OVERHEAD,
        gpu_check_reveal_timeout=10.0,
        offers_cache_ttl=0.0,
    )


def pubkey(host: ProviderServer) -> str:
    assert host.host_keypair is not None
    return str(host.host_keypair.pubkey())


def checks_of(coordinator: CoordinatorServer) -> GpuChallenges:
    assert coordinator.gpu_checks is not None
    return coordinator.gpu_checks


async def judged(coordinator: CoordinatorServer, count: int) -> None:
    checks, registry = checks_of(coordinator), coordinator.registry
    assert registry is not None
    await registry.wait_for(lambda: checks.judged >= count, DEFAULT_TIMEOUT)


async def offer_rows(coordinator: CoordinatorServer) -> dict[tuple[str, str], dict[str, Any]]:
    async with CoordinatorClient(coordinator.url) as client:
        offers = await client.offers()
    return {(row["provider"], row["gpu"]): row for row in offers["providers"]}


async def test_honest_hosts_pass_on_the_cpu_path_and_show_verified(
    coordinator: CoordinatorServer, market_host: HostFactory
) -> None:
    gamer = await market_host(simulate_gpu=["RTX 4090:24"])
    cpu = await market_host(max_sessions=2)
    await judged(coordinator, 3)  # one simulated GPU, two CPU slots

    rows = await offer_rows(coordinator)
    for key in ((pubkey(gamer), "RTX 4090"), (pubkey(cpu), "cpu (no GPU)")):
        assert rows[key]["verified"] is True
        assert rows[key]["verified_at"] is not None
    store = coordinator.store
    assert store is not None
    (check,) = await store.gpu_checks(pubkey(gamer))
    assert (check.ok, check.gpu_model, check.gpu_index, check.n) == (True, "RTX 4090", 0, N)
    assert "simulated, not checked" in check.reason and check.seconds is not None
    cpu_checks = await store.gpu_checks(pubkey(cpu))
    assert sorted(c.gpu_index for c in cpu_checks) == [0, 1] and all(c.ok for c in cpu_checks)
    assert gamer.challenges is not None and gamer.challenges.committed == 1


# -- liars ---------------------------------------------------------------------------------


class WrongProduct(ChallengeResponder):
    """Commits to (and opens) a product that is off by one everywhere."""

    def compute(self, seed: bytes, n: int, device: str) -> Product:
        return product_of(multiply(seed, n, device) + 1)


class SmallerMatrix(ChallengeResponder):
    """Multiplies only the top-left quarter of the matrices (1/64 of the work)."""

    def compute(self, seed: bytes, n: int, device: str) -> Product:
        m = n // 4
        rows = torch.arange(m, dtype=torch.int64)[:, None]
        cols = torch.arange(m, dtype=torch.int64)[None, :]
        a = matrix_rows(seed, "A", n, rows, cols).float()
        b = matrix_rows(seed, "B", n, rows, cols).float()
        product = torch.zeros((n, n), dtype=torch.float32)
        product[:m, :m] = a @ b
        return product_of(product)


class UncommittedRows(ChallengeResponder):
    """Commits to nothing it computed, then opens the true rows (each costs only n**2 once
    the rows are named) with the paths of what it committed."""

    def compute(self, seed: bytes, n: int, device: str) -> Product:
        self.truth = commit_product(seed, n, device)  # a cheat would compute only the rows
        return product_of(torch.zeros((n, n), dtype=torch.float32))

    def row(self, product: Product, index: int) -> bytes:
        return open_row(self.truth, index)


class Stalled(ChallengeResponder):
    """Answers only once the test lets it (long after the model's time)."""

    release = threading.Event()

    def compute(self, seed: bytes, n: int, device: str) -> Product:
        self.release.wait(DEFAULT_TIMEOUT)
        return commit_product(seed, n, device)


@pytest.fixture
def stalled() -> Iterator[type[Stalled]]:
    Stalled.release.clear()
    yield Stalled
    Stalled.release.set()


@pytest.mark.parametrize(
    ("liar", "reason"),
    [
        (WrongProduct, "wrong product: row"),
        (SmallerMatrix, "wrong product: row"),
        (UncommittedRows, "does not match the commitment"),
    ],
)
async def test_a_provider_that_lies_about_the_product_is_delisted_with_the_reason(
    coordinator: CoordinatorServer,
    market_host: HostFactory,
    monkeypatch: pytest.MonkeyPatch,
    liar: type[ChallengeResponder],
    reason: str,
) -> None:
    monkeypatch.setattr(host_module, "ChallengeResponder", liar)
    host = await market_host(simulate_gpu=["RTX 4090:24"])
    await judged(coordinator, 1)

    key = pubkey(host)
    verdict = checks_of(coordinator).verdict(key, "RTX 4090")
    assert verdict.ok is False and reason in verdict.reason
    assert (key, "RTX 4090") not in await offer_rows(coordinator)  # delisted
    assert coordinator.index.get(key, "RTX 4090") is None  # never scheduled
    store = coordinator.store
    assert store is not None
    (check,) = await store.gpu_checks(key)
    assert not check.ok and check.reason == verdict.reason
    # A restarted coordinator's service reads the failure back: still not listed.
    assert coordinator.registry is not None
    fresh = GpuChallenges(coordinator.registry)
    assert fresh.listed(key, "RTX 4090")
    await fresh.restore(key)
    assert not fresh.listed(key, "RTX 4090")
    assert fresh.verdict(key, "RTX 4090").reason == verdict.reason


async def test_a_provider_too_slow_for_its_model_is_listed_unverified_then_delisted(
    coordinator: CoordinatorServer,
    market_host: HostFactory,
    monkeypatch: pytest.MonkeyPatch,
    stalled: type[Stalled],
) -> None:
    monkeypatch.setattr(host_module, "ChallengeResponder", stalled)
    host = await market_host(simulate_gpu=["RTX 4090:24"])
    key = pubkey(host)
    # Listed while its first challenge runs, marked unverified.
    row = (await offer_rows(coordinator))[(key, "RTX 4090")]
    assert (row["verified"], row["verified_at"]) == (None, None)

    await judged(coordinator, 1)
    verdict = checks_of(coordinator).verdict(key, "RTX 4090")
    assert verdict.ok is False and verdict.reason.startswith("too slow: no commitment within")
    assert (key, "RTX 4090") not in await offer_rows(coordinator)
    store = coordinator.store
    assert store is not None
    (check,) = await store.gpu_checks(key)
    assert (check.ok, check.seconds) == (False, None)

    # The late answer is ignored; a later challenge that passes lists the offer again.
    stalled.release.set()
    assert host.challenges is not None
    await asyncio.wait_for(host.challenges.drain(), DEFAULT_TIMEOUT)
    checks = checks_of(coordinator)
    monkeypatch.setattr(host.challenges, "compute", lambda s, n, d: commit_product(s, n, d))
    again = await asyncio.wait_for(checks.challenge(key, "RTX 4090", 0), DEFAULT_TIMEOUT)
    assert again is not None and again.ok is True
    assert (await offer_rows(coordinator))[(key, "RTX 4090")]["verified"] is True


async def test_a_quick_honest_answer_passes_whatever_the_links_round_trip_measured(
    coordinator: CoordinatorServer, market_host: HostFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The round trip the link measured last (here 5 s: one taken while the machine was
    # loaded) is taken off the time for the upper bound only; the lower bound ("faster than
    # any card of the model") sees the whole time, so a small product answered at once passes.
    assert coordinator.registry is not None
    monkeypatch.setattr(coordinator.registry, "relay_hop_ms", lambda pubkey: 5000.0)
    host = await market_host(simulate_gpu=["RTX 4090:24"])
    await judged(coordinator, 1)
    verdict = checks_of(coordinator).verdict(pubkey(host), "RTX 4090")
    assert verdict.ok is True, verdict.reason


def test_the_host_finds_the_drivers_listing_of_nvmls_bus_id(tmp_path: Path) -> None:
    listing = tmp_path / "0000:01:00.0"
    listing.mkdir()
    (listing / "information").write_text("Model: \t NVIDIA GeForce RTX 4090\n")
    # NVML pads the PCI domain to eight digits; the driver's directory has four.
    assert driver_information("00000000:01:00.0", root=str(tmp_path)) == (
        "Model: \t NVIDIA GeForce RTX 4090\n"
    )
    assert driver_information("00000000:02:00.0", root=str(tmp_path)) is None
    assert driver_information(None, root=str(tmp_path)) is None


# Stands in for torch's first import on a busy or cold machine: loading its shared libraries
# holds the GIL (0.2-0.6 s measured here on a warm page cache, seconds on a cold one). One C
# call (no bytecode boundary, so no GIL hand-off) for ~1.5 s, then an import error.
_SLOW_TORCH = """
import time
_started = time.perf_counter()
sum(range(1_000_000))
_per = (time.perf_counter() - _started) / 1_000_000
sum(range(int(1.5 / max(_per, 1e-9))))
raise ImportError("a stand-in for torch's slow import")
"""


async def test_heartbeats_keep_their_time_while_a_challenge_computes(
    start_coordinator: CoordinatorStarter,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    jupyter_env: Path,
) -> None:
    """A provider process linked with 0.1 s heartbeats is challenged on its simulated GPU
    with a product that takes it most of a second; the coordinator's clock on its heartbeats
    shows no gap beyond jitter from the challenge's sending to its verdict. Its ``torch``
    holds the GIL for 1.5 s when imported: before the challenge's work moved to its own
    thread, importing only numpy on the CPU path and whatever a GPU needs before the link,
    the first challenge imported torch on the host mid-link and stalled its heartbeats."""
    interval = 0.1
    coordinator = await start_coordinator(
        gpu_checks=True,
        gpu_check_interval=0.0,
        gpu_check_cpu_n=2048,
        gpu_check_overhead=60.0,
        heartbeat_interval=interval,
        heartbeat_misses=100,  # the measure is the gaps, not the loss rule
    )
    registry, checks = coordinator.registry, checks_of(coordinator)
    assert registry is not None
    beats: list[float] = []
    spans: list[tuple[float, float]] = []
    heartbeat, challenge = registry.heartbeat, checks.challenge

    def record_beat(*args: Any) -> None:
        beats.append(time.monotonic())
        heartbeat(*args)

    async def record_span(*args: Any) -> Any:
        started = time.monotonic()
        try:
            return await challenge(*args)
        finally:
            spans.append((started, time.monotonic()))

    monkeypatch.setattr(registry, "heartbeat", record_beat)
    monkeypatch.setattr(checks, "challenge", record_span)
    standin = tmp_path / "standin"
    standin.mkdir()
    (standin / "torch.py").write_text(_SLOW_TORCH)
    path = os.pathsep.join(p for p in (str(standin), os.environ.get("PYTHONPATH")) if p)
    port, keypair = free_port(), Keypair()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "provider_host",
        "--coordinator", coordinator.url,
        "--listen", f"127.0.0.1:{port}",
        "--public-url", f"ws://127.0.0.1:{port}/tunnel",
        "--keypair", str(write_keypair(keypair, tmp_path / "provider.json")),
        "--workspace", str(tmp_path / "ws"),
        "--simulate-gpu", "RTX 4090:24",
        "--max-sessions", "1",
        "--no-benchmark",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": path},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        while not (await asyncio.wait_for(proc.stdout.readline(), 30)).startswith(
            LISTENING_PREFIX.encode()
        ):
            pass
        await registry.wait_for(lambda: checks.judged >= 1 and len(spans) >= 1, 60)
        ((started, ended),) = spans
        assert ended - started > 0.4, "the challenge was too quick to measure anything"
        await registry.wait_for(lambda: beats[-1] > ended, 10)  # the beat that closes the span
        # From the challenge's sending (at the link, before the first beat) to the first
        # beat after its verdict: every interval between two events.
        points = [started, *(t for t in beats if started < t <= ended)]
        points.append(next(t for t in beats if t > ended))
        gaps = [b - a for a, b in itertools.pairwise(points)]
        assert max(gaps) < interval + 0.4, f"heartbeat gaps {gaps} during the challenge"
        assert len(gaps) >= 4  # the challenge spanned several beats
        assert checks.verdict(str(keypair.pubkey()), "RTX 4090").ok is True
    finally:
        proc.kill()
        await proc.wait()
