"""``jupyter io wallet``: the user's Solana wallet — its address, its balance, an airdrop.

Amounts are shown in SOL (exact: :func:`~jupyter_io.payments.amounts.format_sol` never
rounds), or as an integer of lamports with ``--lamports``. ``airdrop`` is answered only by
the embedded ledger (a coordinator's, ``--solana-url``) and test clusters; a cluster that
refuses it has its error shown as it is. The command parses options and delegates to
:class:`~jupyter_io.payments.escrow.EscrowClient`; session history is a later change.
"""

from __future__ import annotations

import asyncio

from jupyter_core.application import base_flags
from solana.rpc.async_api import AsyncClient
from solders.keypair import Keypair
from traitlets import Bool, Float, Unicode

from ..app import IOCommand
from ..errors import ConfigError, PaymentError
from ..identity import DEFAULT_KEYPAIR_PATH, load_keypair
from .amounts import format_sol, parse_sol
from .escrow import EscrowClient
from .hooks import DEFAULT_SOLANA_URL

__all__ = ["ACTIONS", "WalletApp"]

#: The actions ``jupyter io wallet`` knows, with how many arguments each takes.
ACTIONS: dict[str, int] = {"show": 0, "address": 0, "balance": 0, "airdrop": 1}


class WalletApp(IOCommand):
    """``jupyter io wallet [address|balance|airdrop AMOUNT]``"""

    name = "jupyter io wallet"
    description = (
        "Show your Solana wallet's address and balance, or airdrop SOL into it (on the "
        "embedded ledger a coordinator serves). Without an action: address and balance."
    )
    examples = """jupyter io wallet
jupyter io wallet address
jupyter io wallet balance --lamports
jupyter io wallet airdrop 2 --solana-url http://127.0.0.1:8700/solana"""

    keypair_path = Unicode(DEFAULT_KEYPAIR_PATH, help="Your Solana keypair file.").tag(config=True)
    solana_url = Unicode(
        DEFAULT_SOLANA_URL,
        help="Solana JSON-RPC URL: the coordinator's embedded ledger, devnet, mainnet, ...",
    ).tag(config=True)
    lamports = Bool(False, help="Show amounts as exact integers of lamports.").tag(config=True)
    timeout = Float(10.0, help="Seconds to wait for each RPC request.").tag(config=True)

    aliases = {
        "keypair": "WalletApp.keypair_path",
        "solana-url": "WalletApp.solana_url",
        "timeout": "WalletApp.timeout",
    }
    flags = {
        "lamports": ({"WalletApp": {"lamports": True}}, "Show amounts in lamports."),
        "debug": base_flags["debug"],
    }

    def _amount(self, lamports: int) -> str:
        return str(lamports) if self.lamports else format_sol(lamports)

    def _action(self) -> tuple[str, list[str]]:
        action, *args = self.extra_args or ["show"]
        if action not in ACTIONS:
            raise ConfigError(
                f"unknown wallet action {action!r}; use one of: address, balance, airdrop AMOUNT"
            )
        if len(args) != ACTIONS[action]:
            usage = "airdrop AMOUNT (in SOL)" if action == "airdrop" else action
            raise ConfigError(f"usage: jupyter io wallet {usage}")
        return action, args

    def run(self) -> None:
        action, args = self._action()
        keypair = load_keypair(self.keypair_path)
        if action == "address":
            print(keypair.pubkey())
            return
        lamports = parse_sol(args[0]) if action == "airdrop" else 0
        if action == "airdrop" and lamports == 0:
            raise ConfigError("airdrop a positive amount of SOL, e.g. `airdrop 1`")
        asyncio.run(self._talk(action, keypair, lamports))

    async def _talk(self, action: str, keypair: Keypair, lamports: int) -> None:
        wallet = keypair.pubkey()
        client = EscrowClient(AsyncClient(self.solana_url, timeout=self.timeout), owns_client=True)
        async with client:
            if action == "airdrop":
                try:
                    # Bounded: a cluster that accepts the request may never confirm it.
                    signature = await asyncio.wait_for(
                        client.airdrop(wallet, lamports), timeout=self.timeout * 3
                    )
                except asyncio.TimeoutError:
                    raise PaymentError(
                        f"the airdrop to {wallet} was not confirmed by {self.solana_url} "
                        f"within {self.timeout * 3:g} s"
                    ) from None
                balance = await client.balance(wallet)
                print(
                    f"Airdropped {self._amount(lamports)} to {wallet} (signature {signature}); "
                    f"balance now {self._amount(balance)}"
                )
                return
            balance = await client.balance(wallet)
        if action == "balance":
            print(self._amount(balance))
        else:
            print(f"{wallet}\t{self._amount(balance)}")
