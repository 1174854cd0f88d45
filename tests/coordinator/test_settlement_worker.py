"""The settlement worker's retries (``docs/payments-contract.md`` section 4): a row that keeps
failing waits twice as long each time up to ``settle_retry_max``, its provider linking again
makes it due at once, and ``GET /api/v1/status`` shows the worker's counters.

A real escrow coordinator (embedded ledger, real escrows), a :class:`FakeProvider` on a real
link. The backoff test stops the coordinator's own worker and drives one with a fake clock
through :meth:`~jupyter_io.coordinator.settlement.SettlementWorker.run_once`: no sleeps.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any

import pytest
from solders.keypair import Keypair
from solders.message import MessageV0, to_bytes_versioned
from solders.pubkey import Pubkey

from jupyter_io.coordinator.models import SettlementState
from jupyter_io.coordinator.server import CoordinatorServer
from jupyter_io.coordinator.settlement import SettlementWorker
from jupyter_io.coordinator_client import CoordinatorClient
from jupyter_io.payments.amounts import LAMPORTS_PER_SOL
from jupyter_io.payments.escrow import EscrowClient, EscrowTerms

from .conftest import WAIT, FakeProvider, Starter, gpu_offer

pytestmark = pytest.mark.timeout(90)

PRICE = 3_600_000  # lamports per hour


class Market:
    """An escrow coordinator, a linked provider, and a user who funds leases."""

    def __init__(self, server: CoordinatorServer, provider: FakeProvider) -> None:
        self.server = server
        self.provider = provider
        self.user = Keypair()
        self.api = CoordinatorClient(server.url, self.user, timeout=WAIT)
        self.escrow = EscrowClient.connect(server.solana_url)

    async def ended_lease(self) -> str:
        """A funded lease, ended by its user, whose provider then left (nothing can settle)."""
        await self.escrow.airdrop(self.user.pubkey(), LAMPORTS_PER_SOL)
        grant = await self.api._call("POST", "/api/v1/leases", {"gpu": "RTX 4090"}, sign=True)
        lease = grant["lease"]
        provider = Pubkey.from_string(self.provider.pubkey)
        arbiter = Pubkey.from_string(grant["escrow"]["arbiter"])
        await self.escrow.open_escrow(self.user, provider, arbiter, lease, PRICE // 60)
        await self.api._call("POST", f"/api/v1/leases/{lease}/escrow", {}, sign=True)
        await self.provider.close(1001)
        registry = self.server.registry
        assert registry is not None
        await registry.wait_for(
            lambda: (p := registry.provider(self.provider.pubkey)) is None or not p.linked, WAIT
        )
        await self.api._call("DELETE", f"/api/v1/leases/{lease}", sign=True)
        return str(lease)

    async def close(self) -> None:
        self.api.close()
        await self.escrow.close()


@pytest.fixture
async def market(
    start_coordinator: Starter, providers: list[FakeProvider]
) -> AsyncIterator[Market]:
    server = await start_coordinator(
        payments="escrow", settle_retry_interval=1.0, settle_retry_max=8.0
    )
    provider = FakeProvider(server.url, [gpu_offer(price=PRICE)])
    providers.append(provider)
    await provider.connect()
    made = Market(server, provider)
    try:
        yield made
    finally:
        await made.close()


def _utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=timezone.utc)


async def test_a_failing_settlement_backs_off_and_its_provider_linking_again_resets_it(
    market: Market,
) -> None:
    server = market.server
    store, registry, billing, own = (
        server.store,
        server.registry,
        server.billing,
        server.settlements,
    )
    assert store is not None and registry is not None and billing is not None and own is not None
    await own.stop()  # this test drives a worker itself, on a clock of its own
    now = [time.time()]
    worker = SettlementWorker(
        store, registry, billing, retry_interval=1.0, retry_max=8.0, final_report_grace=0.0,
        clock=lambda: now[0],
    )  # fmt: skip
    worker.listen()
    lease = await market.ended_lease()

    waits: list[float] = []
    for attempts in range(1, 7):
        if waits:
            now[0] += waits[-1] - 0.01
            await worker.run_once()  # not due yet: not attempted
            assert (await store.get_settlement(lease)).attempts == attempts - 1  # type: ignore[union-attr]
            now[0] += 0.01
        assert await worker.run_once() == 1
        row = await store.get_settlement(lease)
        assert row is not None and row.attempts == attempts, row
        assert "not linked" in (row.error or "")
        waits.append(round((row.next_attempt_at - _utc(now[0])).total_seconds(), 3))
    assert waits == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert worker.stats.failed_attempts == 6 and worker.stats.pending == 1
    assert worker.stats.last_error is not None and worker.stats.last_error[0] == lease

    # The provider links again: its row is due now (not 8 s later) and waits 1 s if it fails.
    await market.provider.connect()
    task = asyncio.create_task(worker.run_once())
    request = await market.provider.next_message("sign_settlement")
    assert request["lease"] == lease
    await market.provider.send(
        {"type": "settlement_refused", "lease": lease, "reason": "not now", "code": "refused"}
    )
    assert await asyncio.wait_for(task, WAIT) == 1
    assert worker.stats.backoffs_reset == 1 and worker.stats.refused == 1
    row = await store.get_settlement(lease)
    assert row is not None and row.attempts == 7
    assert (row.next_attempt_at - _utc(now[0])).total_seconds() == pytest.approx(1.0, abs=1e-3)

    # Next time it co-signs: the escrow closes, the row is done (the user got it all back:
    # nothing was served).
    await market.escrow.airdrop(market.provider.keypair.pubkey(), LAMPORTS_PER_SOL // 10)
    now[0] += 1.0
    task = asyncio.create_task(worker.run_once())
    request = await market.provider.next_message("sign_settlement")
    message = MessageV0.from_bytes(base64.b64decode(request["message"]))
    signature = market.provider.keypair.sign_message(to_bytes_versioned(message))
    await market.provider.send(
        {"type": "settlement_signature", "lease": lease, "signature": str(signature)}
    )
    assert await asyncio.wait_for(task, WAIT) == 0
    row = await store.get_settlement(lease)
    assert row is not None and row.state is SettlementState.DONE and row.amount_lamports == 0
    assert server.keypair is not None
    terms = EscrowTerms(
        market.user.pubkey(), market.provider.keypair.pubkey(), server.keypair.pubkey(), lease
    )
    assert await market.escrow.escrow_state(terms) is None
    assert worker.stats.done == worker.stats.settled == 1


async def test_status_shows_the_settlement_workers_counters(
    market: Market, start_coordinator: Starter
) -> None:
    lease = await market.ended_lease()
    status: dict[str, Any] = {}
    deadline = time.monotonic() + WAIT
    while not (status.get("settlements") or {}).get("failed_attempts"):
        assert time.monotonic() < deadline, status  # the worker's first attempt, 1 s after
        await asyncio.sleep(0.05)
        status = await market.api._call("GET", "/api/v1/status")
    block = status["settlements"]
    assert block["pending"] == 1 and block["done"] == 0 and block["attempts"] >= 1
    assert block["last_error"]["lease"] == lease and "not linked" in block["last_error"]["message"]
    assert isinstance(block["last_error"]["at"], float)

    free = await start_coordinator()
    api = CoordinatorClient(free.url, Keypair(), timeout=WAIT)
    try:
        assert (await api._call("GET", "/api/v1/status"))["settlements"] is None
    finally:
        api.close()
