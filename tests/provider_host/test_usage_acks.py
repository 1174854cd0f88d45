"""Neither party meters alone, with a real provider host, a real escrow coordinator on its
embedded ledger and a real kernel (``docs/payments-contract.md``, "Neither party meters
alone"): a user whose client never acknowledges its usage is billed at most the grace, and
its lease ends once the acknowledgements are overdue, so a kernel cannot be had for the
price of the grace; funds are conserved."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from jupyter_io.coordinator.server import CoordinatorServer
from jupyter_io.usage_acks import NOT_ACKNOWLEDGED

from .conftest import DEFAULT_TIMEOUT, CoordinatorStarter, HostFactory
from .test_settlement import (
    PER_SECOND,
    Users,
    paid_through_the_escrow,
    provider_host,
    settled,
)

pytestmark = pytest.mark.timeout(120)

GRACE = 1
TIMEOUT = 3


@pytest.fixture
async def coordinator(start_coordinator: CoordinatorStarter) -> CoordinatorServer:
    """An escrow coordinator that bills GRACE s past the last acknowledgement and ends a
    lease with none for TIMEOUT s."""
    return await start_coordinator(
        payments="escrow",
        settle_retry_interval=0.2,
        min_deposit_seconds=1,
        usage_ack_grace=GRACE,
        usage_ack_timeout=TIMEOUT,
    )


@pytest.fixture
async def users(coordinator: CoordinatorServer) -> AsyncIterator[Users]:
    made = Users(coordinator)
    try:
        yield made
    finally:
        await made.close()


async def test_a_client_that_never_acknowledges_gets_the_grace_and_its_lease_ends(
    coordinator: CoordinatorServer, market_host: HostFactory, users: Users
) -> None:
    await provider_host(market_host, coordinator)
    session = await users.fund(60)
    started = time.monotonic()
    client = await users.run_kernel(session)  # a client of its own: no acknowledgements
    registry, store = coordinator.registry, coordinator.store
    assert registry is not None and store is not None

    async def use_the_kernel() -> None:
        # Busy all along, until the session ends under it: the provider serves and reports.
        with contextlib.suppress(Exception):
            while True:
                await client.execute("import time; time.sleep(0.5)")

    busy = asyncio.ensure_future(use_the_kernel())
    try:

        def over() -> bool:
            return all(session.lease not in state.leases for state in registry.providers())

        await registry.wait_for(over, DEFAULT_TIMEOUT)
    finally:
        busy.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await busy
    ended_after = time.monotonic() - started
    assert ended_after < 60 / 2, "ended for its silence, long before its budget"
    row = await settled(coordinator, session.lease)
    record: Any = await session.api._call("GET", f"/api/v1/leases/{session.lease}", sign=True)
    assert record["state"] == "ended" and record["end_reason"] == NOT_ACKNOWLEDGED
    billing = record["billing"]
    assert billing["acknowledged_seconds"] == 0
    assert billing["reported_seconds"] >= TIMEOUT > GRACE, billing  # the provider served
    assert billing["billed_seconds"] == GRACE
    assert row.amount_lamports == GRACE * PER_SECOND
    await paid_through_the_escrow(session, row)
