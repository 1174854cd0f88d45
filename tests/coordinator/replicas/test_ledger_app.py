"""``jupyter io ledger``: the embedded ledger as a process of its own, which coordinator
replicas share through ``--solana-url``.

A coordinator pointed at it runs an escrowed lease end to end (a real provider host, a real
kernel, the escrow opened, the lease settled, the books balanced on-chain) with no ledger of
its own; the ledger's accounts survive its restart; a second ledger on the same data
directory is refused with the URL of the one serving it.
"""

from __future__ import annotations

import asyncio
from asyncio.subprocess import PIPE
from pathlib import Path

import pytest

from jupyter_io.coordinator.server import CoordinatorServer

from ...provider_host.conftest import (  # the fixtures the in-process provider host needs
    HostFactory,
    client_keypair,  # noqa: F401
    host_keypair_file,  # noqa: F401
    make_host,  # noqa: F401
    market_host_of,
    workspace_root,  # noqa: F401
)
from ...provider_host.test_settlement import Users, paid_through_the_escrow, provider_host, settled
from .conftest import JUPYTER_IO, LedgerProcess

pytestmark = pytest.mark.timeout(90)


async def test_a_coordinator_settles_an_escrowed_lease_on_the_ledger_process_it_shares(
    ledger_process: LedgerProcess,
    start_coordinator: object,
    make_host: HostFactory,  # noqa: F811
    tmp_path: Path,
) -> None:
    coordinator: CoordinatorServer = await start_coordinator(  # type: ignore[operator]
        payments="escrow",
        solana_url=ledger_process.url,
        settle_retry_interval=0.2,
        min_deposit_seconds=1,
    )
    assert coordinator.ledger is None, "no ledger of its own: the process serves it"
    assert coordinator.solana_url == ledger_process.url
    host = await provider_host(market_host_of(make_host, coordinator, tmp_path), coordinator)
    users = Users(coordinator)
    try:
        session = await users.fund(60)
        await users.run_kernel(session, busy=1.0)
        ended = await session.api._call("DELETE", f"/api/v1/leases/{session.lease}", sign=True)
        assert ended["state"] == "ended"
        row = await settled(coordinator, session.lease)
        assert row.amount_lamports > 0
        await paid_through_the_escrow(session, row)
        paid = await session.escrow.wsol_balance(session.terms.provider)
    finally:
        await users.close()
    assert host.settlements is not None and session.lease in host.settlements

    # The accounts are the ledger process's, in its file: a restart keeps every lamport.
    ledger_process.stop()
    ledger_process.start()
    async with ledger_process.escrow() as escrow:
        assert await escrow.wsol_balance(session.terms.provider) == paid
        assert await escrow.escrow_state(session.terms) is None

    # One ledger per data directory: a second would fork the chain; it is told the first's URL.
    second = await asyncio.create_subprocess_exec(
        *JUPYTER_IO, "ledger", "--listen", "127.0.0.1:0", "--data-dir",
        str(ledger_process.data_dir), stdout=PIPE, stderr=PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(second.communicate(), 60)
    assert second.returncode == 1
    assert f"a ledger serving {ledger_process.url}" in err.decode()
    assert "--data-dir" in err.decode()
