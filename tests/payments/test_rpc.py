"""The JSON-RPC endpoint speaks Solana's protocol: methods, encodings and error codes."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from solana.rpc.async_api import AsyncClient
from solana.rpc.core import RPCException
from solders.keypair import Keypair
from solders.message import Message, MessageV0
from solders.pubkey import Pubkey
from solders.signature import Signature
from solders.system_program import TransferParams, transfer
from solders.transaction import VersionedTransaction
from tornado import httpclient, httpserver, web
from tornado.netutil import bind_sockets

from jupyter_io.coordinator.embedded_ledger import EmbeddedLedger
from jupyter_io.coordinator.ledger_rpc import LedgerRpc, _b58encode, ledger_handlers
from jupyter_io.payments.amounts import LAMPORTS_PER_SOL
from jupyter_io.payments.token_accounts import NATIVE_MINT

from .conftest import Chain, Parties


async def _post(url: str, body: Any) -> Any:
    client = httpclient.AsyncHTTPClient()
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = await client.fetch(url, method="POST", body=payload, raise_error=False)
    assert response.code == 200
    assert response.headers["Content-Type"] == "application/json"
    return json.loads(response.body)


def _request(method: str, *params: Any, request_id: Any = 1) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "method": method, "params": list(params)}


async def test_unknown_method_is_method_not_found(chain: Chain) -> None:
    reply = await _post(chain.url, _request("getClusterNodes", request_id="abc"))
    assert reply == {
        "jsonrpc": "2.0",
        "error": {"code": -32601, "message": "Method not found"},
        "id": "abc",
    }
    with pytest.raises(RPCException, match="MethodNotFound"):
        await chain.client.get_cluster_nodes()


async def test_protocol_errors_and_batches(chain: Chain) -> None:
    assert (await _post(chain.url, b"{not json"))["error"]["code"] == -32700
    assert (await _post(chain.url, {"jsonrpc": "2.0", "id": 3}))["error"]["code"] == -32600
    assert (await _post(chain.url, []))["error"]["code"] == -32600
    bad_params = await _post(chain.url, _request("getBalance", "not-a-key"))
    assert bad_params["error"]["code"] == -32602 and "not-a-key" in bad_params["error"]["message"]
    batch = await _post(
        chain.url, [_request("getHealth", request_id=1), _request("nope", request_id=2)]
    )
    assert [r["id"] for r in batch] == [1, 2]
    assert batch[0]["result"] == "ok" and batch[1]["error"]["code"] == -32601


async def test_malformed_transactions_are_invalid_params(chain: Chain, parties: Parties) -> None:
    not_base64 = await _post(chain.url, _request("sendTransaction", "@@@", {"encoding": "base64"}))
    assert not_base64["error"]["code"] == -32602
    garbage = base64.b64encode(b"\x01" + bytes(70)).decode()
    reply = await _post(chain.url, _request("sendTransaction", garbage, {"encoding": "base64"}))
    assert reply["error"]["code"] == -32602
    assert "failed to deserialize" in reply["error"]["message"]
    with pytest.raises(RPCException, match="InvalidParams"):
        await chain.client.send_raw_transaction(b"\x02\x00garbage")

    # Well-formed but signed by the wrong key: the signature check refuses it (-32003).
    user = parties.user
    blockhash = (await chain.client.get_latest_blockhash()).value.blockhash
    ix = transfer(TransferParams(from_pubkey=user.pubkey(), to_pubkey=Pubkey.default(), lamports=1))
    message = MessageV0.try_compile(user.pubkey(), [ix], [], blockhash)
    forged = VersionedTransaction.populate(message, [Keypair().sign_message(bytes(message))])
    reply = await _post(
        chain.url,
        _request(
            "sendTransaction", base64.b64encode(bytes(forged)).decode(), {"encoding": "base64"}
        ),
    )
    assert reply["error"]["code"] == -32003

    # Base58, the method's default encoding, works too.
    signed = VersionedTransaction(
        MessageV0.try_compile(
            user.pubkey(),
            [
                transfer(
                    TransferParams(
                        from_pubkey=user.pubkey(), to_pubkey=parties.arbiter.pubkey(), lamports=7
                    )
                )
            ],
            [],
            blockhash,
        ),
        [user],
    )
    reply = await _post(chain.url, _request("sendTransaction", _b58encode(bytes(signed))))
    assert reply["result"] == str(signed.signatures[0])


async def test_accounts_in_every_encoding(chain: Chain, parties: Parties) -> None:
    terms = parties.terms("encodings")
    receipt = await chain.escrow.open_escrow(
        parties.user, terms.provider, terms.arbiter, terms.session_id, 1_000_000
    )
    parsed = (await chain.client.get_account_info_json_parsed(terms.escrow)).value
    assert parsed is not None
    info = parsed.data.parsed["info"]  # type: ignore[union-attr]
    assert parsed.data.parsed["type"] == "account"  # type: ignore[union-attr]
    assert info["owner"] == str(terms.multisig) and info["mint"] == str(NATIVE_MINT)
    assert info["isNative"] is True and info["tokenAmount"]["amount"] == "1000000"
    assert info["rentExemptReserve"]["amount"] == str(receipt.escrow_rent)
    multisig = (await chain.client.get_account_info_json_parsed(terms.multisig)).value
    assert multisig is not None
    assert multisig.data.parsed["info"]["numRequiredSigners"] == 2  # type: ignore[union-attr]
    balance = (await chain.client.get_token_account_balance(terms.escrow)).value
    assert balance.amount == "1000000" and balance.decimals == 9
    assert balance.ui_amount_string == "0.001"
    with pytest.raises(RPCException, match="not a Token account"):
        await chain.client.get_token_account_balance(terms.user)

    raw = (await chain.client.get_account_info(terms.escrow)).value
    assert raw is not None and len(raw.data) == 165
    sliced = await _post(
        chain.url,
        _request("getAccountInfo", str(terms.escrow), {"encoding": "base64",
                 "dataSlice": {"offset": 32, "length": 32}}),
    )  # fmt: skip
    owner = base64.b64decode(sliced["result"]["value"]["data"][0])
    assert Pubkey.from_bytes(owner) == terms.multisig
    base58 = await _post(
        chain.url, _request("getAccountInfo", str(NATIVE_MINT), {"encoding": "base58"})
    )
    assert base58["result"]["value"]["data"][1] == "base58"
    system = (await chain.client.get_account_info_json_parsed(terms.user)).value
    assert system is not None and system.lamports > 0  # no parser: falls back to base64
    many = (await chain.client.get_multiple_accounts([terms.escrow, Keypair().pubkey()])).value
    assert many[0] is not None and many[1] is None


async def test_cluster_methods(chain: Chain, parties: Parties) -> None:
    client = chain.client
    assert await client.is_connected()
    assert (await client.get_version()).value.solana_core
    assert (await client.get_minimum_balance_for_rent_exemption(0)).value == 890_880
    latest = (await client.get_latest_blockhash()).value
    slot = (await client.get_slot()).value
    assert latest.last_valid_block_height == slot + 150
    assert (await client.get_block_height()).value == slot
    assert (await client.get_epoch_info()).value.absolute_slot == slot
    valid = await _post(chain.url, _request("isBlockhashValid", str(latest.blockhash)))
    assert valid["result"]["value"] is True
    user = parties.user
    ix = transfer(TransferParams(from_pubkey=user.pubkey(), to_pubkey=Pubkey.default(), lamports=1))
    message = MessageV0.try_compile(user.pubkey(), [ix], [], latest.blockhash)
    assert (await client.get_fee_for_message(message)).value == 5_000
    legacy = Message.new_with_blockhash([ix], user.pubkey(), latest.blockhash)
    fee = await _post(
        chain.url,
        _request("getFeeForMessage", base64.b64encode(bytes(legacy)).decode()),
    )
    assert fee["result"]["value"] == 5_000
    with pytest.raises(RPCException):
        await client.request_airdrop(user.pubkey(), 10**9 * LAMPORTS_PER_SOL)


async def test_simulate_and_get_transaction(chain: Chain, parties: Parties) -> None:
    client, user = chain.client, parties.user
    dest = Keypair().pubkey()
    latest = (await client.get_latest_blockhash()).value
    ix = transfer(TransferParams(from_pubkey=user.pubkey(), to_pubkey=dest, lamports=10**6))
    tx = VersionedTransaction(
        MessageV0.try_compile(user.pubkey(), [ix], [], latest.blockhash), [user]
    )
    sim = (await client.simulate_transaction(tx, accounts_addresses=[dest])).value
    assert sim.err is None and sim.accounts is not None
    assert sim.accounts[0] is not None and sim.accounts[0].lamports == 10**6
    assert await chain.balance(dest) == 0  # simulation changes nothing

    signature = (await client.send_transaction(tx)).value
    json_tx = (
        await client.get_transaction(signature, "json", max_supported_transaction_version=0)
    ).value
    assert json_tx is not None and json_tx.transaction.meta is not None
    meta = json_tx.transaction.meta
    assert meta.fee == 5_000 and meta.err is None
    assert meta.post_balances[1] - meta.pre_balances[1] == 10**6
    missing_version = await _post(chain.url, _request("getTransaction", str(signature)))
    assert missing_version["error"]["code"] == -32015
    assert (await client.get_transaction(Signature.default())).value is None

    replaced = (await client.simulate_transaction(tx, replace_recent_blockhash=True)).value
    assert replaced.replacement_blockhash is not None


async def test_mounts_into_another_tornado_app() -> None:
    ledger = await EmbeddedLedger.open()
    app = web.Application(ledger_handlers(ledger, "/solana"))
    sockets = bind_sockets(0, "127.0.0.1")
    server = httpserver.HTTPServer(app)
    server.add_sockets(sockets)
    url = f"http://127.0.0.1:{sockets[0].getsockname()[1]}/solana"
    try:
        async with AsyncClient(url) as client:
            assert await client.is_connected()
            assert (await client.get_genesis_hash()).value == ledger.genesis_hash
    finally:
        server.stop()
        await ledger.close()


async def test_dispatch_without_http() -> None:
    ledger = await EmbeddedLedger.open()
    rpc = LedgerRpc(ledger)
    assert {"sendTransaction", "getLatestBlockhash", "requestAirdrop"} <= rpc.methods
    reply = json.loads(await rpc.handle(json.dumps(_request("getSlot", request_id=9))))
    assert reply == {"jsonrpc": "2.0", "result": ledger.slot, "id": 9}
    await ledger.close()
