"""``jupyter io wallet history --json`` carries the coordinator's lease record (end reason,
settlement fee, ...), and ``--solana-url`` of a coordinator's embedded ledger is enough to
find that coordinator. A real escrow coordinator, a real refund through the wallet CLI."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from solders.keypair import Keypair
from solders.pubkey import Pubkey

from jupyter_io.coordinator_client import CoordinatorClient
from jupyter_io.identity import write_keypair
from jupyter_io.payments.amounts import LAMPORTS_PER_SOL
from jupyter_io.payments.escrow import EscrowClient

from .conftest import WAIT, FakeProvider, Starter, gpu_offer

pytestmark = pytest.mark.timeout(120)

JUPYTER_IO = str(Path(sys.executable).with_name("jupyter-io"))
PRICE = 3_600_000


async def wallet(*args: str) -> tuple[int, str, str]:
    """``jupyter io wallet ARGS`` in a subprocess (the coordinator runs in this loop)."""
    proc = await asyncio.create_subprocess_exec(
        JUPYTER_IO, "wallet", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def same_as_record(row: dict[str, Any], record: dict[str, Any]) -> None:
    """Every field of the REST record is in the history row with the same value."""
    for key, value in record.items():
        mine = row["escrow_offer"] if key == "escrow" else row[key]
        assert mine == value, (key, mine, value)


async def test_history_json_carries_the_lease_record_and_finds_the_coordinator_by_its_ledger(
    start_coordinator: Starter, providers: list[FakeProvider], tmp_path: Path
) -> None:
    server = await start_coordinator(payments="escrow")
    provider = FakeProvider(server.url, [gpu_offer(price=PRICE)])
    providers.append(provider)
    await provider.connect()
    user = Keypair()
    key_file = str(write_keypair(user, tmp_path / "user.json"))
    escrow = EscrowClient.connect(server.solana_url)
    try:
        await escrow.airdrop(user.pubkey(), LAMPORTS_PER_SOL)
        async with CoordinatorClient(server.url, user, timeout=WAIT) as client:
            grant = await client.request_lease("RTX 4090")
            assert grant.escrow is not None and grant.escrow.arbiter is not None
            receipt = await escrow.open_escrow(
                user, Pubkey.from_string(grant.provider),
                Pubkey.from_string(grant.escrow.arbiter), grant.lease, PRICE // 60,
            )  # fmt: skip
            await client.fund_lease(grant.lease, str(receipt.signature))
            await client.end_lease(grant.lease)  # never served: the user refunds it all
    finally:
        await escrow.close()
    common = ("--keypair", key_file, "--lamports")
    code, out, err = await wallet("refund", grant.lease, "--coordinator", server.url, *common)
    assert code == 0, err

    # The coordinator's record, as its REST API gives it.
    async with CoordinatorClient(server.url, user, timeout=WAIT) as client:
        raw = await client._call("GET", "/api/v1/leases?limit=20", sign=True)
    (record,) = raw["leases"]
    assert record["end_reason"] and record["billing"]["settlement"]["fee_lamports"] > 0

    # Without --coordinator: the coordinator whose embedded ledger --solana-url names.
    code, out, err = await wallet("history", "--json", "--solana-url", server.solana_url, *common)
    assert code == 0, err
    (row,) = json.loads(out)
    same_as_record(row, record)
    assert row["fee_lamports"] == record["billing"]["settlement"]["fee_lamports"]
    assert row["why_ended"] == record["end_reason"]
    assert row["escrow"] == record["billing"]["escrow"]  # the address, as before

    code, out, err = await wallet("history", "--solana-url", server.solana_url, *common)
    assert code == 0, err
    fee = record["billing"]["settlement"]["fee_lamports"]
    assert f"fee {fee}" in out and f"ended     {record['end_reason']}" in out

    # A ledger that is no coordinator's: said plainly, with what to give instead.
    other = f"{server.url}/not-a-ledger"
    code, out, err = await wallet("history", "--solana-url", other, *common)
    assert code == 1 and out == ""
    assert "is not a coordinator's embedded ledger" in err and "--coordinator" in err
    assert "Traceback" not in err
