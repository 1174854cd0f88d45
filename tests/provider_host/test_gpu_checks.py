"""GPU challenges between a real coordinator and real provider hosts on loopback (the CPU
path: simulated GPUs and the CPU offer multiply with torch on the CPU and say so).

An honest host passes and its offers show ``verified: true``; hosts that lie (a wrong
product, a product of a smaller matrix, rows that are not the committed ones, no answer in
the model's time) are delisted with the reason, and the verdict is in the provider's record
(``gpu_checks``). Only the challenge's arithmetic is replaced in the liars: the link, the
coordinator and the host are the real ones.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jupyter_io.coordinator.challenges import GpuChallenges
from jupyter_io.coordinator.server import CoordinatorServer
from jupyter_io.coordinator_client import CoordinatorClient
from jupyter_io.gpu_challenge import matrix_rows
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
from provider_host.server import ProviderServer

from .conftest import DEFAULT_TIMEOUT, CoordinatorStarter, HostFactory

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
