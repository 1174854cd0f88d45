"""The user's wallet as the Lab extension shows it: address, and balance when a ledger is known.

The address is the public key of the keypair the GPU kernels sign with (the server
extension's ``keypair_path``). The balance needs a Solana JSON-RPC endpoint
(``solana_rpc_url``: a cluster, a local validator, or the embedded ledger of
``jupyter io demo``); without one it is None and the note says so. :meth:`Wallet.airdrop`
asks for test SOL (``requestAirdrop``: the embedded ledger, devnet and local validators
answer it; mainnet does not).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from ..errors import ConfigError, JupyterIOError
from ..identity import load_keypair
from ..payments.amounts import format_sol

__all__ = ["Wallet", "WalletError"]


class WalletError(JupyterIOError):
    """The wallet's ledger could not be asked (unreachable, or it refused)."""


class Wallet:
    """The keypair at ``keypair_path`` and, optionally, the ledger at ``rpc_url``."""

    def __init__(self, keypair_path: str, rpc_url: str = "", *, timeout: float = 10.0) -> None:
        self.keypair_path = str(Path(keypair_path).expanduser())
        self.rpc_url = rpc_url
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._http: AsyncHTTPClient | None = None

    def address(self) -> str:
        """The base58 public key; :class:`~jupyter_io.errors.ConfigError` without a keypair."""
        return str(load_keypair(self.keypair_path).pubkey())

    async def info(self) -> dict[str, Any]:
        """The body of ``GET /jupyter-io/wallet``: ``address``, ``keypair_path``,
        ``rpc_url``, ``balance_lamports`` / ``balance`` (None when unknown) and a ``note``
        saying why a field is missing or what to do."""
        body: dict[str, Any] = {
            "address": None,
            "keypair_path": self.keypair_path,
            "rpc_url": self.rpc_url or None,
            "balance_lamports": None,
            "balance": None,
            "note": None,
        }
        try:
            address = body["address"] = self.address()
        except ConfigError as exc:
            body["note"] = str(exc)
            return body
        if not self.rpc_url:
            body["note"] = (
                "balance unknown: no Solana RPC URL is configured "
                "(--JupyterIOExtension.solana_rpc_url=URL)"
            )
            return body
        try:
            result = await self._rpc("getBalance", [address, {"commitment": "confirmed"}])
        except WalletError as exc:
            body["note"] = str(exc)
            return body
        lamports = result["value"] if isinstance(result, dict) else result
        body["balance_lamports"] = int(lamports)
        body["balance"] = format_sol(int(lamports))
        return body

    async def airdrop(self, lamports: int) -> str:
        """Ask the ledger for ``lamports`` of test SOL; returns the transaction signature.
        :class:`~jupyter_io.errors.ConfigError` without a ledger or keypair,
        :class:`WalletError` when the ledger cannot be reached or refuses."""
        if not self.rpc_url:
            raise ConfigError(
                "no Solana RPC URL is configured (--JupyterIOExtension.solana_rpc_url=URL), "
                "so there is no ledger to ask for an airdrop"
            )
        return str(await self._rpc("requestAirdrop", [self.address(), lamports]))

    async def _rpc(self, method: str, params: list[Any]) -> Any:
        if self._http is None:
            self._http = AsyncHTTPClient(force_instance=True)
        request = HTTPRequest(
            self.rpc_url,
            method="POST",
            headers={"Content-Type": "application/json"},
            body=json.dumps(
                {"jsonrpc": "2.0", "id": next(self._ids), "method": method, "params": params}
            ),
            request_timeout=self.timeout,
            connect_timeout=min(self.timeout, 5.0),
        )
        try:
            response = await self._http.fetch(request, raise_error=False)
        except OSError as exc:
            raise WalletError(f"cannot reach the Solana RPC at {self.rpc_url}: {exc}") from None
        if response.code == 599 or response.code >= 400:
            raise WalletError(
                f"the Solana RPC at {self.rpc_url} answered {method} with "
                f"{response.error or response.code}"
            )
        try:
            reply = json.loads(response.body)
        except ValueError:
            raise WalletError(f"the Solana RPC at {self.rpc_url} sent no JSON") from None
        if reply.get("error"):
            message = reply["error"].get("message", reply["error"])
            raise WalletError(f"the Solana RPC at {self.rpc_url} refused {method}: {message}")
        return reply.get("result")

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None
