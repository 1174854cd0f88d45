"""The wallet endpoints: the keypair's address, and the balance from a real Solana JSON-RPC
endpoint (the embedded ledger, served on loopback)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from solders.pubkey import Pubkey

from jupyter_io.coordinator.embedded_ledger import EmbeddedLedger
from jupyter_io.coordinator.ledger_rpc import serve_ledger
from jupyter_io.identity import load_keypair


@pytest.fixture
def io_config(market: Any, user_keypair_path: Path, request: pytest.FixtureRequest) -> Any:
    config = {"coordinator_url": market.url, "keypair_path": str(user_keypair_path)}
    config.update(getattr(request, "param", {}))
    if config.pop("ledger", False):
        config["solana_rpc_url"] = request.getfixturevalue("ledger_url")
    return config


async def test_the_wallet_shows_the_keypair_address_and_says_why_there_is_no_balance(
    fetch_json: Any, user_keypair_path: Path
) -> None:
    status, body = await fetch_json("jupyter-io", "wallet")
    assert status == 200
    assert body["address"] == str(load_keypair(user_keypair_path).pubkey())
    assert body["balance_lamports"] is None and body["balance"] is None
    assert "solana_rpc_url" in body["note"]

    status, body = await fetch_json("jupyter-io", "wallet", "airdrop", method="POST", body={})
    assert status == 409
    assert "no Solana RPC URL is configured" in body["message"]


@pytest.mark.parametrize("io_config", [{"keypair_path": "/nonexistent/id.json"}], indirect=True)
async def test_a_missing_keypair_is_said_plainly(fetch_json: Any) -> None:
    status, body = await fetch_json("jupyter-io", "wallet")
    assert status == 200
    assert body["address"] is None
    assert "keypair file /nonexistent/id.json does not exist" in body["note"]


@pytest.fixture
async def ledger_url() -> Any:
    ledger = await EmbeddedLedger.open()
    server = await serve_ledger(ledger)
    try:
        yield server.url
    finally:
        await server.stop()
        await ledger.close()


@pytest.mark.parametrize("io_config", [{"ledger": True}], indirect=True)
async def test_the_balance_comes_from_the_ledger_and_an_airdrop_adds_to_it(
    fetch_json: Any, user_keypair_path: Path
) -> None:
    status, body = await fetch_json("jupyter-io", "wallet")
    assert status == 200, body
    assert (body["balance_lamports"], body["balance"], body["note"]) == (0, "0 SOL", None)

    status, body = await fetch_json(
        "jupyter-io", "wallet", "airdrop", method="POST", body={"lamports": 250_000_000}
    )
    assert status == 200, body
    assert (body["balance_lamports"], body["balance"]) == (250_000_000, "0.25 SOL")
    assert body["signature"]
    Pubkey.from_string(body["address"])

    for bad in ({"lamports": 0}, {"lamports": 10**12}, {"lamports": "1"}, {"lamports": True}):
        status, body = await fetch_json("jupyter-io", "wallet", "airdrop", method="POST", body=bad)
        assert status == 400 and "lamports" in body["message"]
