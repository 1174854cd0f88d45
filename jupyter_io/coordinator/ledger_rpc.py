"""A Solana JSON-RPC endpoint for the embedded ledger, so clients need no special path.

solana-py's ``AsyncClient`` (and any other Solana client) talks to this endpoint exactly as to
devnet or mainnet: same methods, same JSON, same error codes. It implements what jupyter-io's
flows use — blockhashes, sending/simulating transactions, statuses, accounts (``base64``,
``base58``, ``jsonParsed`` for SPL Token), balances, rent, fees, slots, health, version,
genesis hash — plus ``requestAirdrop``, which exists on the embedded ledger only. Anything
else is answered with JSON-RPC error -32601, as a node answers an unknown method.

Mount it into a tornado app with ``app.add_handlers(".*", ledger_handlers(ledger, "/solana"))``
or run it on its own with ``server = await serve_ledger(ledger)`` (127.0.0.1, a free port)
and point ``AsyncClient(server.url)`` at it; ``await server.stop()`` when done.
The protocol logic lives in :class:`LedgerRpc` (bytes in, bytes out), testable without HTTP.
"""

from __future__ import annotations

import base64
import binascii
import json
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from solders.account import Account
from solders.hash import Hash
from solders.message import MessageV0, from_bytes_versioned
from solders.pubkey import Pubkey
from solders.signature import Signature
from solders.transaction import VersionedTransaction
from spl.token.constants import TOKEN_PROGRAM_ID
from tornado import httpserver, web
from tornado.netutil import bind_sockets

from ..payments.token_accounts import (
    NATIVE_DECIMALS,
    NATIVE_MINT,
    decode_mint,
    decode_multisig,
    decode_token_account,
    mint_json,
    multisig_json,
    token_account_json,
    ui_token_amount,
)
from .embedded_ledger import EmbeddedLedger, TransactionRecord, TransactionRejected, error_json

__all__ = [
    "SOLANA_CORE_VERSION",
    "LedgerRpc",
    "LedgerServer",
    "SolanaRpcHandler",
    "ledger_handlers",
    "serve_ledger",
]

#: What ``getVersion`` reports: the Solana line whose runtime LiteSVM embeds.
SOLANA_CORE_VERSION = "2.2.0"

_MAX_MULTIPLE_ACCOUNTS = 100
_MAX_SIGNATURE_STATUSES = 256
_B58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58_ALPHABET)}


class _RpcError(Exception):
    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data


def _invalid(message: str) -> _RpcError:
    return _RpcError(-32602, message)


def _b58encode(raw: bytes) -> str:
    number = int.from_bytes(raw, "big")
    out = []
    while number:
        number, rem = divmod(number, 58)
        out.append(_B58_ALPHABET[rem])
    pad = len(raw) - len(raw.lstrip(b"\0"))
    return "1" * pad + "".join(reversed(out))


def _b58decode(text: str) -> bytes:
    number = 0
    for char in text:
        if char not in _B58_INDEX:
            raise ValueError(f"invalid base58 character {char!r}")
        number = number * 58 + _B58_INDEX[char]
    pad = len(text) - len(text.lstrip("1"))
    body = number.to_bytes((number.bit_length() + 7) // 8, "big") if number else b""
    return b"\0" * pad + body


def _pubkey(value: Any) -> Pubkey:
    try:
        return Pubkey.from_string(value)
    except (ValueError, TypeError):
        raise _invalid(f"Invalid param: {value!r} is not a base58 public key") from None


def _signature(value: Any) -> Signature:
    try:
        return Signature.from_string(value)
    except (ValueError, TypeError):
        raise _invalid(f"Invalid param: {value!r} is not a base58 signature") from None


def _config(params: list[Any], index: int) -> dict[str, Any]:
    value = params[index] if len(params) > index else None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _invalid(f"Invalid params: expected a configuration object, got {value!r}")
    return value


def _decode_wire(value: Any, encoding: str) -> bytes:
    if not isinstance(value, str):
        raise _invalid("Invalid params: the transaction must be an encoded string")
    try:
        if encoding == "base64":
            return base64.b64decode(value, validate=True)
        if encoding == "base58":
            return _b58decode(value)
    except (ValueError, binascii.Error) as exc:
        raise _invalid(f"invalid transaction: {encoding} decoding failed ({exc})") from None
    raise _invalid(f"Invalid params: unsupported encoding {encoding!r}")


def _transaction(params: list[Any], default_encoding: str) -> tuple[VersionedTransaction, Any]:
    if not params:
        raise _invalid("Invalid params: a transaction is required")
    config = _config(params, 1)
    raw = _decode_wire(params[0], config.get("encoding") or default_encoding)
    try:
        tx = VersionedTransaction.from_bytes(raw)
    except Exception as exc:
        raise _invalid(
            f"failed to deserialize solana_sdk::transaction::versioned::VersionedTransaction: {exc}"
        ) from None
    return tx, config


class LedgerRpc:
    """JSON-RPC 2.0 over an :class:`EmbeddedLedger`: ``await rpc.handle(body) -> bytes``.

    Batches (JSON arrays) are answered in order. Transport-independent; the tornado
    :class:`SolanaRpcHandler` is a thin shell around it.
    """

    def __init__(self, ledger: EmbeddedLedger) -> None:
        self.ledger = ledger
        self._methods: dict[str, Callable[[list[Any]], Awaitable[Any]]] = {
            "getAccountInfo": self.get_account_info,
            "getBalance": self.get_balance,
            "getBlockHeight": self.get_block_height,
            "getEpochInfo": self.get_epoch_info,
            "getFeeForMessage": self.get_fee_for_message,
            "getGenesisHash": self.get_genesis_hash,
            "getHealth": self.get_health,
            "getLatestBlockhash": self.get_latest_blockhash,
            "getMinimumBalanceForRentExemption": self.get_minimum_balance_for_rent_exemption,
            "getMultipleAccounts": self.get_multiple_accounts,
            "getSignatureStatuses": self.get_signature_statuses,
            "getSlot": self.get_slot,
            "getTokenAccountBalance": self.get_token_account_balance,
            "getTransaction": self.get_transaction,
            "getTransactionCount": self.get_transaction_count,
            "getVersion": self.get_version,
            "isBlockhashValid": self.is_blockhash_valid,
            "requestAirdrop": self.request_airdrop,
            "sendTransaction": self.send_transaction,
            "simulateTransaction": self.simulate_transaction,
        }

    @property
    def methods(self) -> frozenset[str]:
        """The JSON-RPC method names this endpoint answers."""
        return frozenset(self._methods)

    async def handle(self, body: bytes | str) -> bytes:
        """Answer one JSON-RPC request or batch; always returns a JSON-RPC response body."""
        try:
            request = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return self._encode(self._error(None, _RpcError(-32700, "Parse error")))
        if isinstance(request, list):
            if not request:
                return self._encode(self._error(None, _RpcError(-32600, "Invalid request")))
            return self._encode([await self._one(item) for item in request])
        return self._encode(await self._one(request))

    @staticmethod
    def _encode(payload: Any) -> bytes:
        return json.dumps(payload, separators=(",", ":")).encode()

    @staticmethod
    def _error(request_id: Any, error: _RpcError) -> dict[str, Any]:
        body: dict[str, Any] = {"code": error.code, "message": error.message}
        if error.data is not None:
            body["data"] = error.data
        return {"jsonrpc": "2.0", "error": body, "id": request_id}

    async def _one(self, request: Any) -> dict[str, Any]:
        if not isinstance(request, dict) or not isinstance(request.get("method"), str):
            return self._error(None, _RpcError(-32600, "Invalid request"))
        request_id = request.get("id")
        method = self._methods.get(request["method"])
        if method is None:
            return self._error(request_id, _RpcError(-32601, "Method not found"))
        params = request.get("params") or []
        if not isinstance(params, list):
            return self._error(request_id, _invalid("Invalid params: params must be an array"))
        try:
            result = await method(params)
        except _RpcError as exc:
            return self._error(request_id, exc)
        except TransactionRejected as exc:
            return self._error(request_id, _RpcError(exc.code, exc.message, exc.data))
        except (IndexError, KeyError, TypeError, ValueError) as exc:
            return self._error(request_id, _invalid(f"Invalid params: {exc}"))
        return {"jsonrpc": "2.0", "result": result, "id": request_id}

    def _context(self, value: Any) -> dict[str, Any]:
        return {
            "context": {"apiVersion": SOLANA_CORE_VERSION, "slot": self.ledger.slot},
            "value": value,
        }

    # -- accounts ------------------------------------------------------------------------------

    async def _render_account(self, account: Account | None, config: dict[str, Any]) -> Any:
        if account is None:
            return None
        encoding = config.get("encoding") or "base64"
        raw = bytes(account.data)
        data: Any
        parsed = await self._parsed(account, raw) if encoding == "jsonParsed" else None
        if parsed is not None:
            data = parsed
        else:
            sliced = raw
            data_slice = config.get("dataSlice")
            if data_slice:
                offset, length = int(data_slice["offset"]), int(data_slice["length"])
                sliced = raw[offset : offset + length]
            if encoding == "base58":
                if len(sliced) > 128:
                    raise _invalid("Encoded binary (base 58) data should be less than 128 bytes")
                data = [_b58encode(sliced), "base58"]
            elif encoding in ("base64", "jsonParsed"):
                data = [base64.b64encode(sliced).decode(), "base64"]
            else:
                raise _invalid(f"Invalid params: unsupported encoding {encoding!r}")
        return {
            "data": data,
            "executable": account.executable,
            "lamports": account.lamports,
            "owner": str(account.owner),
            "rentEpoch": account.rent_epoch,
            "space": len(raw),
        }

    async def _decimals(self, mint: Pubkey) -> int | None:
        if mint == NATIVE_MINT:
            return NATIVE_DECIMALS
        account = await self.ledger.get_account(mint)
        decoded = decode_mint(bytes(account.data)) if account is not None else None
        return decoded.decimals if decoded is not None else None

    async def _parsed(self, account: Account, raw: bytes) -> dict[str, Any] | None:
        if account.owner != TOKEN_PROGRAM_ID:
            return None
        parsed: dict[str, Any] | None = None
        token = decode_token_account(raw)
        if token is not None:
            decimals = await self._decimals(token.mint)
            if decimals is not None:
                parsed = token_account_json(token, decimals)
        elif (mint := decode_mint(raw)) is not None:
            parsed = mint_json(mint)
        elif (multisig := decode_multisig(raw)) is not None:
            parsed = multisig_json(multisig)
        if parsed is None:
            return None
        return {"program": "spl-token", "parsed": parsed, "space": len(raw)}

    async def get_account_info(self, params: list[Any]) -> Any:
        account = await self.ledger.get_account(_pubkey(params[0]))
        return self._context(await self._render_account(account, _config(params, 1)))

    async def get_multiple_accounts(self, params: list[Any]) -> Any:
        keys = params[0]
        if not isinstance(keys, list) or len(keys) > _MAX_MULTIPLE_ACCOUNTS:
            raise _invalid(f"Invalid params: give a list of at most {_MAX_MULTIPLE_ACCOUNTS} keys")
        config = _config(params, 1)
        accounts = await self.ledger.get_accounts([_pubkey(k) for k in keys])
        return self._context([await self._render_account(a, config) for a in accounts])

    async def get_balance(self, params: list[Any]) -> Any:
        return self._context(await self.ledger.get_balance(_pubkey(params[0])))

    async def get_token_account_balance(self, params: list[Any]) -> Any:
        account = await self.ledger.get_account(_pubkey(params[0]))
        token = (
            decode_token_account(bytes(account.data))
            if account is not None and account.owner == TOKEN_PROGRAM_ID
            else None
        )
        if token is None:
            raise _invalid("Invalid param: not a Token account")
        decimals = await self._decimals(token.mint)
        if decimals is None:
            raise _invalid("Invalid param: the token account's mint is not a Token mint")
        return self._context(ui_token_amount(token.amount, decimals))

    async def get_minimum_balance_for_rent_exemption(self, params: list[Any]) -> Any:
        size = params[0]
        if not isinstance(size, int) or size < 0:
            raise _invalid("Invalid params: the data length must be a non-negative integer")
        return self.ledger.minimum_balance_for_rent_exemption(size)

    # -- cluster -----------------------------------------------------------------------------

    async def get_latest_blockhash(self, params: list[Any]) -> Any:
        blockhash, last_valid = self.ledger.latest_blockhash()
        return self._context({"blockhash": str(blockhash), "lastValidBlockHeight": last_valid})

    async def is_blockhash_valid(self, params: list[Any]) -> Any:
        try:
            blockhash = Hash.from_string(params[0])
        except (ValueError, TypeError):
            raise _invalid(f"Invalid param: {params[0]!r} is not a blockhash") from None
        return self._context(self.ledger.is_blockhash_valid(blockhash))

    async def get_slot(self, params: list[Any]) -> Any:
        return self.ledger.slot

    async def get_block_height(self, params: list[Any]) -> Any:
        return self.ledger.slot

    async def get_transaction_count(self, params: list[Any]) -> Any:
        return self.ledger.transaction_count

    async def get_epoch_info(self, params: list[Any]) -> Any:
        slot, per_epoch = self.ledger.slot, 432_000
        return {
            "absoluteSlot": slot,
            "blockHeight": slot,
            "epoch": slot // per_epoch,
            "slotIndex": slot % per_epoch,
            "slotsInEpoch": per_epoch,
            "transactionCount": self.ledger.transaction_count,
        }

    async def get_health(self, params: list[Any]) -> Any:
        if not self.ledger.healthy:
            raise _RpcError(-32005, "Node is unhealthy", {"numSlotsBehind": None})
        return "ok"

    async def get_version(self, params: list[Any]) -> Any:
        return {"solana-core": SOLANA_CORE_VERSION, "feature-set": 0}

    async def get_genesis_hash(self, params: list[Any]) -> Any:
        return str(self.ledger.genesis_hash)

    async def get_fee_for_message(self, params: list[Any]) -> Any:
        raw = _decode_wire(params[0], "base64")
        try:
            message = from_bytes_versioned(raw)
        except Exception as exc:
            raise _invalid(f"Invalid params: not a message ({exc})") from None
        return self._context(self.ledger.fee_for_message(message))

    # -- transactions --------------------------------------------------------------------------

    async def send_transaction(self, params: list[Any]) -> Any:
        tx, config = _transaction(params, "base58")
        skip = bool(config.get("skipPreflight", False))
        signature = await self.ledger.send_transaction(tx, skip_preflight=skip)
        return str(signature)

    async def simulate_transaction(self, params: list[Any]) -> Any:
        tx, config = _transaction(params, "base58")
        wanted = config.get("accounts") or None
        addresses = [_pubkey(a) for a in wanted["addresses"]] if wanted else None
        outcome = await self.ledger.simulate_transaction(
            tx,
            sig_verify=bool(config.get("sigVerify", False)),
            replace_recent_blockhash=bool(config.get("replaceRecentBlockhash", False)),
            accounts=addresses,
        )
        accounts = None
        if outcome.accounts is not None:
            account_config = {"encoding": (wanted or {}).get("encoding") or "base64"}
            accounts = [await self._render_account(a, account_config) for a in outcome.accounts]
        replacement = None
        if outcome.replacement_blockhash is not None:
            blockhash, slot = outcome.replacement_blockhash
            replacement = {"blockhash": str(blockhash), "lastValidBlockHeight": slot}
        return self._context(
            {
                "err": error_json(outcome.err),
                "logs": outcome.logs,
                "accounts": accounts,
                "unitsConsumed": outcome.compute_units,
                "returnData": None,
                "innerInstructions": None,
                "replacementBlockhash": replacement,
                "fee": outcome.fee,
            }
        )

    @staticmethod
    def _status(record: TransactionRecord) -> dict[str, Any]:
        err = error_json(record.err)
        return {
            "slot": record.slot,
            "confirmations": None,
            "status": {"Ok": None} if err is None else {"Err": err},
            "err": err,
            "confirmationStatus": "finalized",
        }

    async def get_signature_statuses(self, params: list[Any]) -> Any:
        signatures = params[0]
        if not isinstance(signatures, list) or len(signatures) > _MAX_SIGNATURE_STATUSES:
            raise _invalid(
                f"Invalid params: give a list of at most {_MAX_SIGNATURE_STATUSES} signatures"
            )
        statuses = []
        for text in signatures:
            record = self.ledger.transaction(_signature(text))
            statuses.append(self._status(record) if record is not None else None)
        return self._context(statuses)

    async def get_transaction(self, params: list[Any]) -> Any:
        record = self.ledger.transaction(_signature(params[0]))
        if len(params) > 1 and isinstance(params[1], str):
            config = {"encoding": params[1]}  # the older positional form
        else:
            config = _config(params, 1)
        if record is None or record.transaction is None:
            return None
        tx = record.transaction
        version: Any = 0 if isinstance(tx.message, MessageV0) else "legacy"
        if version == 0 and config.get("maxSupportedTransactionVersion") is None:
            raise _RpcError(
                -32015,
                "Transaction version (0) is not supported by the requesting client. Please try "
                "the request again with the following configuration parameter: "
                '"maxSupportedTransactionVersion": 0',
            )
        encoding = config.get("encoding") or "json"
        raw = bytes(tx)
        encoded: Any
        if encoding == "base64":
            encoded = [base64.b64encode(raw).decode(), "base64"]
        elif encoding == "base58":
            encoded = [_b58encode(raw), "base58"]
        elif encoding in ("json", "jsonParsed"):
            encoded = self._transaction_json(tx, version)
        else:
            raise _invalid(f"Invalid params: unsupported encoding {encoding!r}")
        err = error_json(record.err)
        result: dict[str, Any] = {
            "slot": record.slot,
            "blockTime": record.block_time,
            "transaction": encoded,
            "meta": {
                "err": err,
                "status": {"Ok": None} if err is None else {"Err": err},
                "fee": record.fee,
                "preBalances": record.pre_balances,
                "postBalances": record.post_balances,
                "innerInstructions": [],
                "logMessages": record.logs,
                "preTokenBalances": [],
                "postTokenBalances": [],
                "rewards": [],
                "loadedAddresses": {"writable": [], "readonly": []},
                "computeUnitsConsumed": record.compute_units,
            },
        }
        if version == 0:
            result["version"] = 0
        return result

    @staticmethod
    def _transaction_json(tx: VersionedTransaction, version: Any) -> dict[str, Any]:
        message = tx.message
        header = message.header
        body: dict[str, Any] = {
            "accountKeys": [str(k) for k in message.account_keys],
            "header": {
                "numRequiredSignatures": header.num_required_signatures,
                "numReadonlySignedAccounts": header.num_readonly_signed_accounts,
                "numReadonlyUnsignedAccounts": header.num_readonly_unsigned_accounts,
            },
            "recentBlockhash": str(message.recent_blockhash),
            "instructions": [
                {
                    "programIdIndex": ix.program_id_index,
                    "accounts": list(bytes(ix.accounts)),
                    "data": _b58encode(bytes(ix.data)),
                    "stackHeight": None,
                }
                for ix in message.instructions
            ],
        }
        if version == 0:
            body["addressTableLookups"] = [
                {
                    "accountKey": str(lookup.account_key),
                    "writableIndexes": list(bytes(lookup.writable_indexes)),
                    "readonlyIndexes": list(bytes(lookup.readonly_indexes)),
                }
                for lookup in getattr(message, "address_table_lookups", [])
            ]
        return {"signatures": [str(s) for s in tx.signatures], "message": body}

    async def request_airdrop(self, params: list[Any]) -> Any:
        pubkey, lamports = _pubkey(params[0]), params[1]
        if not isinstance(lamports, int):
            raise _invalid("Invalid params: lamports must be an integer")
        return str(await self.ledger.airdrop(pubkey, lamports))


class SolanaRpcHandler(web.RequestHandler):
    """Tornado handler serving :class:`LedgerRpc` at its route (POST only, like a node)."""

    rpc: LedgerRpc

    def initialize(self, rpc: LedgerRpc) -> None:
        self.rpc = rpc

    def check_xsrf_cookie(self) -> None:
        # JSON-RPC clients carry no XSRF token; this endpoint holds no browser session state.
        return None

    async def post(self) -> None:
        body = await self.rpc.handle(self.request.body)
        self.set_header("Content-Type", "application/json")
        self.finish(body)


def ledger_handlers(
    ledger: EmbeddedLedger, path: str = "/solana"
) -> list[tuple[str, type[web.RequestHandler], dict[str, Any]]]:
    """Routes to add to a tornado app (e.g. the coordinator's) to serve ``ledger`` at ``path``."""
    return [(path, SolanaRpcHandler, {"rpc": LedgerRpc(ledger)})]


@dataclass
class LedgerServer:
    """A running standalone endpoint; ``url`` is what ``AsyncClient`` takes."""

    url: str
    port: int
    ledger: EmbeddedLedger
    _server: httpserver.HTTPServer

    async def stop(self, *, close_ledger: bool = True) -> None:
        """Stop serving (and close the ledger, unless told not to)."""
        self._server.stop()
        await self._server.close_all_connections()
        if close_ledger:
            await self.ledger.close()


async def serve_ledger(
    ledger: EmbeddedLedger, *, host: str = "127.0.0.1", port: int = 0, path: str = "/"
) -> LedgerServer:
    """Serve ``ledger`` over HTTP on ``host:port`` (0 = a free port) in the running loop."""
    app = web.Application(ledger_handlers(ledger, path))
    sockets = bind_sockets(port, host, family=socket.AF_INET)
    server = httpserver.HTTPServer(app, xheaders=False)
    server.add_sockets(sockets)
    bound = sockets[0].getsockname()[1]
    return LedgerServer(
        url=f"http://{host}:{bound}{path}", port=bound, ledger=ledger, _server=server
    )
