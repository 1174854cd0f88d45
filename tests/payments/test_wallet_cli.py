"""``jupyter io wallet`` run as a user runs it, against an embedded ledger on 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path

import pytest
from solders.keypair import Keypair

from jupyter_io.identity import write_keypair
from jupyter_io.payments.amounts import LAMPORTS_PER_SOL

from .conftest import Chain, Parties

JUPYTER_IO = str(Path(sys.executable).with_name("jupyter-io"))


async def wallet(*args: str) -> tuple[int, str, str]:
    """Run ``jupyter io wallet ARGS`` without blocking the loop that serves the ledger."""
    proc = await asyncio.create_subprocess_exec(
        JUPYTER_IO,
        "wallet",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
def keypair(tmp_path: Path) -> tuple[Keypair, str]:
    key = Keypair()
    return key, str(write_keypair(key, tmp_path / "id.json"))


async def test_address_needs_no_ledger(keypair: tuple[Keypair, str]) -> None:
    key, path = keypair
    code, out, err = await wallet("address", "--keypair", path)
    assert code == 0, err
    assert out.strip() == str(key.pubkey())


async def test_balance_before_and_after_an_airdrop(
    chain: Chain, keypair: tuple[Keypair, str]
) -> None:
    key, path = keypair
    common = ("--keypair", path, "--solana-url", chain.url)

    code, out, err = await wallet("balance", *common)
    assert (code, out.strip()) == (0, "0 SOL"), err

    code, out, err = await wallet("airdrop", "1.5", *common)
    assert code == 0, err
    assert f"Airdropped 1.5 SOL to {key.pubkey()}" in out
    assert out.strip().endswith("balance now 1.5 SOL")
    assert await chain.balance(key.pubkey()) == 3 * LAMPORTS_PER_SOL // 2

    code, out, err = await wallet("balance", "--lamports", *common)
    assert (code, out.strip()) == (0, "1500000000"), err

    code, out, err = await wallet(*common)
    assert (code, out.strip()) == (0, f"{key.pubkey()}\t1.5 SOL"), err


async def test_a_provider_unwraps_its_earnings(
    chain: Chain, parties: Parties, tmp_path: Path
) -> None:
    path = str(write_keypair(parties.provider, tmp_path / "provider.json"))
    common = ("--keypair", path, "--solana-url", chain.url, "--lamports")
    code, out, err = await wallet("unwrap", *common)
    assert code == 0 and "nothing to unwrap" in out, err

    terms = parties.terms("unwrap-me")
    await chain.escrow.open_escrow(
        parties.user, terms.provider, terms.arbiter, terms.session_id, 1_000_000
    )
    await chain.escrow.settle(terms, 400_000, arbiter=parties.arbiter, provider=parties.provider)
    wsol = await chain.balance(terms.provider_wsol)  # earnings plus the account's rent
    before = await chain.balance(terms.provider)
    code, out, err = await wallet("unwrap", *common)
    assert code == 0, err
    assert f"Unwrapped {wsol} (wSOL earnings" in out
    assert await chain.balance(terms.provider_wsol) == 0
    assert await chain.balance(terms.provider) == before + wsol - 5_000  # one signature's fee


async def test_unreachable_rpc_is_a_clear_error(keypair: tuple[Keypair, str]) -> None:
    _, path = keypair
    with socket.socket() as sock:  # a port nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/"
    code, out, err = await wallet("balance", "--keypair", path, "--solana-url", url)
    assert code == 1 and out == ""
    assert f"cannot reach the Solana RPC at {url}" in err
    assert "Traceback" not in err


async def test_bad_usage_is_explained(keypair: tuple[Keypair, str], tmp_path: Path) -> None:
    _, path = keypair
    code, _, err = await wallet("airdrop", "--keypair", path)
    assert code == 1 and "usage: jupyter io wallet airdrop AMOUNT" in err
    code, _, err = await wallet("spend", "--keypair", path)
    assert code == 1 and "unknown wallet action 'spend'" in err
    code, _, err = await wallet("address", "--keypair", str(tmp_path / "missing.json"))
    assert code == 1 and "does not exist" in err
