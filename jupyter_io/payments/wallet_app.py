"""``jupyter io wallet``: the user's Solana wallet — its address, its balance, an airdrop, the
history of its paid sessions, a top-up or refund of one session's escrow.

Amounts are shown in SOL (exact: :func:`~jupyter_io.payments.amounts.format_sol` never
rounds), or as an integer of lamports with ``--lamports``; ``history --json`` prints exact
lamports. ``airdrop`` is answered only by the embedded ledger (a coordinator's,
``--solana-url``) and test clusters; a cluster that refuses it has its error shown as it is.
``history``, ``topup`` and ``refund`` talk to the coordinator (``--coordinator``; without it,
the coordinator whose embedded ledger ``--solana-url`` names): its ``GET /api/v1/leases`` is
the history (``--json``: each lease's record as that endpoint gives it, plus a few derived
fields), and escrows live on the ledger it names unless ``--solana-url`` is given. The command
parses options and delegates to :class:`~jupyter_io.payments.escrow.EscrowClient`,
:class:`~jupyter_io.payments.hooks.SolanaEscrowHook` and
:class:`~jupyter_io.coordinator_client.CoordinatorClient`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from jupyter_core.application import base_flags
from solana.rpc.async_api import AsyncClient
from solders.keypair import Keypair
from solders.pubkey import Pubkey
from traitlets import Bool, Float, Integer, Unicode

from ..app import IOCommand
from ..coordinator.config import DEFAULT_PORT
from ..coordinator_client import CoordinatorClient, LeaseInfo
from ..errors import ConfigError, JupyterIOError, PaymentError
from ..identity import DEFAULT_KEYPAIR_PATH, load_keypair
from .amounts import format_sol, parse_sol
from .escrow import EscrowClient, EscrowTerms
from .hooks import (
    DEFAULT_SOLANA_URL,
    EscrowInfo,
    SessionTerms,
    SolanaEscrowHook,
    close_ledger_clients,
)

__all__ = ["ACTIONS", "WalletApp", "history_json", "history_text"]

#: The actions ``jupyter io wallet`` knows, with how many arguments each takes.
ACTIONS: dict[str, int] = {
    "show": 0,
    "address": 0,
    "balance": 0,
    "airdrop": 1,
    "history": 0,
    "topup": 2,
    "refund": 1,
    "unwrap": 0,
}

USAGE: dict[str, str] = {
    "airdrop": "airdrop AMOUNT (in SOL)",
    "topup": "topup LEASE AMOUNT (in SOL)",
    "refund": "refund LEASE",
}

#: Seconds a refund's provider share may exceed the coordinator's own record of the lease.
REFUND_TOLERANCE_S = 10


def _refunded(info: LeaseInfo) -> int | None:
    """Lamports of the deposit that went back to the user (None until settled)."""
    billing = info.billing
    settlement = billing.settlement if billing is not None else None
    if billing is None or settlement is None or settlement.state != "done":
        return None
    return billing.deposit_lamports - settlement.amount_lamports


def history_json(leases: list[LeaseInfo]) -> list[dict[str, Any]]:
    """One JSON row per lease: everything the coordinator's lease record holds
    (``GET /api/v1/leases``: times, ``end_reason``, ``failure_reason``, the ``billing`` block
    with its settlement and fee), in exact lamports, plus fields derived for scripts
    (``escrow`` is the escrow's address there; the record's ``escrow`` block, how the lease
    was to be paid, is ``escrow_offer``)."""
    rows = []
    for info in leases:
        billing = info.billing
        settlement = billing.settlement if billing is not None else None
        rows.append(
            {
                "lease": info.lease,
                "user": info.user,
                "gpu": info.gpu,
                "gpu_indices": list(info.gpu_indices),
                "provider": info.provider,
                "state": info.state,
                "relay": info.relay,
                "tunnel_url": info.tunnel_url,
                "price_lamports_per_hour": info.price_lamports_per_hour,
                "requested_at": info.requested_at,
                "active_at": info.active_at,
                "ended_at": info.ended_at,
                "end_of_service": info.end_of_service,
                "expires_at": info.expires_at,
                "end_reason": info.end_reason,
                "failure_reason": info.failure_reason,
                "cohort": info.cohort,
                "warnings": [dict(warning) for warning in info.warnings],
                "ends_at": info.ends_at,
                "escrow_offer": info.escrow.to_json() if info.escrow is not None else None,
                "billing": billing.to_json() if billing is not None else None,
                # Derived, for scripts:
                "why_ended": info.why_ended,
                "fee_lamports": settlement.fee_lamports if settlement is not None else 0,
                "escrow": billing.escrow if billing is not None else None,
                "escrow_signature": billing.escrow_signature if billing is not None else None,
                "deposit_lamports": billing.deposit_lamports if billing is not None else 0,
                "billed_seconds": billing.billed_seconds if billing is not None else 0,
                "billed_lamports": billing.spent_lamports if billing is not None else 0,
                "settlement": settlement.to_json() if settlement is not None else None,
                "refunded_lamports": _refunded(info),
            }
        )
    return rows


def history_text(leases: list[LeaseInfo], amount: Callable[[int], str] = format_sol) -> str:
    """The history for people: one block per lease, newest first."""
    if not leases:
        return "No sessions yet."
    blocks = []
    for info in leases:
        lines = [
            f"lease {info.lease} · {info.gpu} · {info.state} · "
            f"{amount(info.price_lamports_per_hour)}/h"
        ]
        billing = info.billing
        if billing is None or billing.escrow is None:
            lines.append("  escrow    none (a free lease)")
        else:
            setup = billing.escrow_signature or "unknown"
            lines.append(
                f"  escrow    {billing.escrow} · deposit {amount(billing.deposit_lamports)} · "
                f"setup {setup}"
            )
            lines.append(
                f"  billed    {billing.billed_seconds} s = {amount(billing.spent_lamports)}"
            )
            settlement = billing.settlement
            if settlement is None:
                lines.append("  settled   not yet")
            else:
                refunded = _refunded(info)
                back = f" · refunded {amount(refunded)}" if refunded is not None else ""
                sig = settlement.signature or "-"
                error = f" · last error: {settlement.error}" if settlement.error else ""
                fee = f" · fee {amount(settlement.fee_lamports)}" if settlement.fee_lamports else ""
                lines.append(
                    f"  {settlement.kind + 'd':<9} {settlement.state} · paid "
                    f"{amount(settlement.amount_lamports)}{fee} · signature {sig}{back}{error}"
                )
        why = info.why_ended or info.failure_reason
        if why and not info.live:
            lines.append(f"  ended     {why}")
        blocks.append("\n".join(lines))
    return "\n".join(blocks)


class WalletApp(IOCommand):
    """``jupyter io wallet [address|balance|airdrop AMOUNT|history|topup LEASE AMOUNT|refund
    LEASE]``"""

    name = "jupyter io wallet"
    description = (
        "Show your Solana wallet's address and balance, airdrop SOL into it (on the embedded "
        "ledger a coordinator serves), list your paid sessions (escrow, billed, settlement), "
        "top up a running session's escrow, or refund one whose provider failed; providers "
        "unwrap their wSOL earnings into SOL. Without an action: address and balance."
    )
    examples = """jupyter io wallet
jupyter io wallet address
jupyter io wallet balance --lamports
jupyter io wallet airdrop 2 --solana-url http://127.0.0.1:8700/solana
jupyter io wallet history --coordinator http://127.0.0.1:8700
jupyter io wallet history --json --limit 5
jupyter io wallet topup 3f2a9c 0.05
jupyter io wallet refund 3f2a9c
jupyter io wallet unwrap --keypair provider-keypair.json"""

    keypair_path = Unicode(DEFAULT_KEYPAIR_PATH, help="Your Solana keypair file.").tag(config=True)
    solana_url = Unicode(
        DEFAULT_SOLANA_URL,
        help="Solana JSON-RPC URL: the coordinator's embedded ledger, devnet, mainnet, ... "
        "(topup and refund: the ledger the coordinator names, unless given).",
    ).tag(config=True)
    coordinator = Unicode(
        f"http://127.0.0.1:{DEFAULT_PORT}",
        help="The coordinator's http(s)://HOST:PORT (history, topup, refund). Not given: the "
        "coordinator whose embedded ledger --solana-url is (http://HOST:PORT/solana), else "
        "this default.",
    ).tag(config=True)
    lamports = Bool(False, help="Show amounts as exact integers of lamports.").tag(config=True)
    json_output = Bool(False, help="history: print JSON with exact lamports.").tag(config=True)
    limit = Integer(20, help="history: how many sessions, newest first (at most 100).").tag(
        config=True
    )
    timeout = Float(10.0, help="Seconds to wait for each RPC request.").tag(config=True)

    aliases = {
        "keypair": "WalletApp.keypair_path",
        "solana-url": "WalletApp.solana_url",
        "coordinator": "WalletApp.coordinator",
        "coordinator-url": "WalletApp.coordinator",
        "limit": "WalletApp.limit",
        "timeout": "WalletApp.timeout",
    }
    flags = {
        "lamports": ({"WalletApp": {"lamports": True}}, "Show amounts in lamports."),
        "json": ({"WalletApp": {"json_output": True}}, "history: print JSON (exact lamports)."),
        "debug": base_flags["debug"],
    }

    def _amount(self, lamports: int) -> str:
        return str(lamports) if self.lamports else format_sol(lamports)

    def _action(self) -> tuple[str, list[str]]:
        action, *args = self.extra_args or ["show"]
        if action not in ACTIONS:
            raise ConfigError(
                f"unknown wallet action {action!r}; use one of: address, balance, airdrop "
                f"AMOUNT, history, topup LEASE AMOUNT, refund LEASE, unwrap"
            )
        if len(args) != ACTIONS[action]:
            raise ConfigError(f"usage: jupyter io wallet {USAGE.get(action, action)}")
        return action, args

    def run(self) -> None:
        action, args = self._action()
        keypair = load_keypair(self.keypair_path)
        if action == "address":
            print(keypair.pubkey())
            return
        if action == "history":
            asyncio.run(self._history(keypair))
            return
        if action == "topup":
            lamports = parse_sol(args[1])
            if lamports == 0:
                raise ConfigError("top up a positive amount of SOL, e.g. `topup LEASE 0.05`")
            asyncio.run(self._top_up(keypair, args[0], lamports))
            return
        if action == "refund":
            asyncio.run(self._refund(keypair, args[0]))
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
            if action == "unwrap":
                await self._unwrap(client, keypair)
                return
            balance = await client.balance(wallet)
        if action == "balance":
            print(self._amount(balance))
        else:
            print(f"{wallet}\t{self._amount(balance)}")

    async def _unwrap(self, client: EscrowClient, keypair: Keypair) -> None:
        """A provider's earnings arrive as wSOL: close its wSOL account into its wallet."""
        wallet = keypair.pubkey()
        signature, returned = await client.unwrap(keypair)
        if signature is None:
            print(f"{wallet} has no wSOL account: nothing to unwrap")
            return
        balance = await client.balance(wallet)
        print(
            f"Unwrapped {self._amount(returned)} (wSOL earnings plus the account's rent) into "
            f"{wallet} (signature {signature}); balance now {self._amount(balance)}"
        )

    # -- sessions (through the coordinator) --------------------------------------------------

    def _coordinator(self, keypair: Keypair) -> CoordinatorClient:
        return CoordinatorClient(self.coordinator, keypair, timeout=self.timeout)

    async def _find_coordinator(self) -> None:
        """Without --coordinator but with --solana-url: the sessions are a coordinator's
        records, so use the coordinator whose embedded ledger that URL is (it serves it at
        ``/solana``), after checking it says so. Any other ledger cannot say which escrows
        are your sessions: then say so."""
        given = self.config.get("WalletApp", {})
        if "coordinator" in given or "solana_url" not in given:
            return
        ledger = self.solana_url.rstrip("/")
        why = (
            f"your sessions are a coordinator's records (GET /api/v1/leases), which a Solana "
            f"ledger alone does not hold; {ledger} is not a coordinator's embedded ledger"
        )
        if not ledger.endswith("/solana"):
            raise ConfigError(f"{why}: give --coordinator http(s)://HOST:PORT")
        candidate = ledger.removesuffix("/solana")
        try:
            async with CoordinatorClient(candidate, timeout=self.timeout) as client:
                payments = await client.payments()
        except JupyterIOError as exc:
            raise ConfigError(
                f"{why} that answers ({exc}): give --coordinator http(s)://HOST:PORT"
            ) from None
        if (payments.solana_url or "").rstrip("/") != ledger:
            raise ConfigError(
                f"{why} (the coordinator at {candidate} uses {payments.solana_url or 'none'}): "
                f"give --coordinator http(s)://HOST:PORT"
            )
        self.coordinator = candidate

    async def _history(self, keypair: Keypair) -> None:
        await self._find_coordinator()
        async with self._coordinator(keypair) as coordinator:
            leases = await coordinator.list_leases(self.limit)
        if self.json_output:
            print(json.dumps(history_json(leases), indent=2))
        else:
            print(history_text(leases, self._amount))

    async def _session(
        self, coordinator: CoordinatorClient, keypair: Keypair, lease_id: str
    ) -> tuple[LeaseInfo, SessionTerms]:
        """The lease's record and escrow parties, checked against the address it records."""
        info, payments = await asyncio.gather(
            coordinator.get_lease(lease_id), coordinator.payments()
        )
        if payments.arbiter is None:
            raise PaymentError(
                f"the coordinator at {self.coordinator} is not paid through escrows "
                f"(payments = {payments.payments}); lease {lease_id} has no escrow"
            )
        explicit = "solana_url" in self.config.get("WalletApp", {})
        url = self.solana_url if explicit else (payments.solana_url or self.solana_url)
        session = SessionTerms(
            lease_id,
            keypair.pubkey(),
            Pubkey.from_string(info.provider),
            Pubkey.from_string(payments.arbiter),
            info.price_lamports_per_hour,
            url,
        )
        recorded = info.billing.escrow if info.billing is not None else None
        if recorded is None:
            raise PaymentError(
                f"lease {lease_id} has no escrow on record at {self.coordinator}; nothing to do"
            )
        if recorded != str(session.escrow_terms.escrow):
            raise PaymentError(
                f"lease {lease_id}'s escrow is {recorded}, not {session.escrow_terms.escrow} "
                f"as derived for wallet {keypair.pubkey()}; is --keypair the wallet that "
                f"leased it?"
            )
        return info, session

    async def _top_up(self, keypair: Keypair, lease_id: str, lamports: int) -> None:
        await self._find_coordinator()
        async with self._coordinator(keypair) as coordinator:
            info, session = await self._session(coordinator, keypair, lease_id)
            if not info.live:
                raise PaymentError(
                    f"lease {lease_id} is {info.state}: only a running session can be topped "
                    f"up; start a new kernel for a new session"
                )
            terms: EscrowTerms = session.escrow_terms
            assert session.solana_url is not None
            escrow = EscrowClient(
                AsyncClient(session.solana_url, timeout=self.timeout), owns_client=True
            )
            async with escrow:
                receipt = await escrow.top_up(terms, lamports, keypair)
            grant = await coordinator.fund_lease(lease_id, str(receipt.signature))
        deposit = grant.billing.deposit_lamports if grant.billing else receipt.state.amount
        print(
            f"Topped up lease {lease_id} by {self._amount(lamports)} (signature "
            f"{receipt.signature}); the escrow {terms.escrow} now holds "
            f"{self._amount(receipt.state.amount)}, the coordinator counts "
            f"{self._amount(deposit)}"
        )

    async def _refund(self, keypair: Keypair, lease_id: str) -> None:
        await self._find_coordinator()
        async with self._coordinator(keypair) as coordinator:
            info, session = await self._session(coordinator, keypair, lease_id)
            offer = await coordinator.request_refund(lease_id)
            # The user's check of the provider's share: the seconds the coordinator saw the
            # lease active, plus a little (a CLI run later has no observation of its own).
            end = info.end_of_service or info.ended_at
            seconds = 0
            if info.active_at is not None and end is not None:
                seconds = max(0, int(end - info.active_at)) + REFUND_TOLERANCE_S
            hook = SolanaEscrowHook(
                keypair_path=self.keypair_path, solana_url=session.solana_url or ""
            )
            hook.restore(EscrowInfo(session, 0, None))
            try:
                signature = await hook.complete_refund(
                    offer.message,
                    offer.arbiter_signature,
                    offer.provider_share,
                    max_provider_share=session.amount_for(seconds),
                )
            finally:
                await hook.close()
                await close_ledger_clients()
            if signature is None:
                print(f"Lease {lease_id}: its escrow was closed already; nothing to refund")
                return
            await coordinator.report_refund(lease_id, str(signature))
        print(
            f"Refunded lease {lease_id} (signature {signature}): the provider got "
            f"{self._amount(offer.provider_share)} for the time it delivered, the rest came back"
        )
