"""A kernel started through Jupyter Server acknowledges its usage (``docs/payments-contract.md``,
"Neither party meters alone"): against an escrow coordinator that ends a paid lease after
:data:`TIMEOUT` s without an acknowledgement, the kernel outlives that many times over, and
its bill is the provider's own figure once Jupyter Server shut it down."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from jupyter_io.coordinator_client import CoordinatorClient
from jupyter_io.identity import load_keypair
from jupyter_io.payments.amounts import LAMPORTS_PER_SOL
from jupyter_io.payments.escrow import EscrowClient
from jupyter_io.usage_acks import NOT_ACKNOWLEDGED

from .conftest import Market, running_market
from .test_escrow import airdrop, start

GRACE = 2
TIMEOUT = 3
INTERVAL = 0.3


@pytest.fixture
async def market(tmp_path: Path) -> AsyncIterator[Market]:
    """An escrow coordinator billing GRACE s past the last acknowledgement and ending a lease
    after TIMEOUT s without one; one provider host, its key funded (it pays the fees)."""
    async with running_market(
        tmp_path,
        {"RTX 4090": "0.12"},
        payments="escrow",
        min_deposit_seconds=1,
        settle_retry_interval=0.2,
        usage_ack_grace=GRACE,
        usage_ack_timeout=TIMEOUT,
    ) as market:
        assert market.provider.host_keypair is not None
        ledger = EscrowClient.connect(market.coordinator.solana_url)
        try:
            await ledger.airdrop(market.provider.host_keypair.pubkey(), LAMPORTS_PER_SOL)
        finally:
            await ledger.close()
        yield market


@pytest.fixture
def jp_server_config(io_config: dict[str, Any]) -> dict[str, Any]:
    return {
        "ServerApp": {"jpserver_extensions": {"jupyter_io": True}},
        "JupyterIOExtension": io_config,
        "RemoteKernelProvisioner": {"usage_ack_interval": INTERVAL},
    }


async def test_a_kernel_started_through_jupyter_server_acknowledges_its_usage(
    fetch_json: Any, jp_serverapp: Any, market: Market, user_keypair_path: Path
) -> None:
    await airdrop(market, user_keypair_path, LAMPORTS_PER_SOL)
    store = market.coordinator.store
    assert store is not None
    kernel_id, km = await start(fetch_json, jp_serverapp)
    try:
        await asyncio.wait_for(km.ready, 60)
        lease_id = km.provisioner.lease.grant.lease
        # Twice the coordinator's patience: only acknowledgements keep the lease.
        deadline = time.monotonic() + 30
        while (lease := await store.get_lease(lease_id)) is None or (
            lease.acked_seconds or 0
        ) < 2 * TIMEOUT:
            assert time.monotonic() < deadline, lease
            assert lease is not None and lease.live, f"the lease ended: {lease}"
            await asyncio.sleep(0.1)
    finally:
        status, _ = await fetch_json("api", "kernels", kernel_id, method="DELETE")
    assert status == 204
    deadline = time.monotonic() + 30  # the provisioner ends the lease as the kernel goes
    while (lease := await store.get_lease(lease_id)) is not None and lease.live:
        assert time.monotonic() < deadline, lease
        await asyncio.sleep(0.1)
    worker = market.coordinator.settlements
    assert worker is not None
    while (row := await store.get_settlement(lease_id)) is None or row.state.value != "done":
        assert time.monotonic() < deadline, row
        await asyncio.wait_for(worker.wait_idle(), 30)
        await asyncio.sleep(0.1)
    client = CoordinatorClient(market.url, load_keypair(user_keypair_path), timeout=15)
    try:
        info = await client.get_lease(lease_id)
    finally:
        client.close()
    # Ended by its shutdown (the session's end reaches the coordinator first), not for want of
    # acknowledgements.
    assert info.state == "ended" and info.end_reason != NOT_ACKNOWLEDGED, info
    billing = info.billing
    assert billing is not None and billing.settlement is not None, info
    assert billing.settlement.state == "done"
    # The last acknowledgement covered the session to its end: the provider's figure.
    assert billing.billed_seconds == billing.reported_seconds >= 2 * TIMEOUT
