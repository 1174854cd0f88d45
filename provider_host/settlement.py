"""The provider's half of a settlement: co-sign only what pays it for what it delivered.

``docs/payments-contract.md`` section 4. When a funded lease is over, the coordinator (the
arbiter) sends ``sign_settlement`` over the provider link with the transaction message that
pays the provider and closes the escrow. :class:`SettlementBook` keeps, for every lease whose
session this host served, what it needs to judge that request — the lease's claims (user,
price, coordinator) and its :class:`~provider_host.usage.UsageMeter` — from the moment the
session opens until the lease is settled, even long after the session ended.

:meth:`SettlementBook.answer` signs with the host keypair only when

* the message is byte for byte :func:`~jupyter_io.payments.escrow.settlement_message` of
  this lease's escrow terms (user from the token, provider = this host, arbiter = the
  coordinator pinned on the link, session id = the lease id) for the amount asked, fee paid
  by this host; and
* the amount is at least price x (own delivered seconds - ``tolerance_seconds``) / 3600.

Otherwise it answers ``settlement_refused`` with the reason (code ``unknown_lease`` for a
lease it has no record of, e.g. after a restart: the coordinator then lets the user refund).
The host calls :meth:`SettlementBook.admit` when a lease's session opens; entries go
``keep_seconds`` after being signed, and the oldest go beyond ``max_entries``.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from solders.keypair import Keypair
from solders.message import MessageV0, to_bytes_versioned
from solders.pubkey import Pubkey

from jupyter_io.coordinator.provider_link import (
    SettlementRefused,
    SettlementReply,
    SettlementSignature,
    SignSettlement,
)
from jupyter_io.errors import PaymentError
from jupyter_io.leases import LeaseClaims
from jupyter_io.payments.amounts import format_sol
from jupyter_io.payments.escrow import EscrowTerms, settlement_message

from .usage import UsageMeter

__all__ = ["DEFAULT_TOLERANCE_SECONDS", "SettlementBook"]

#: Seconds of its own metering a provider lets go (the coordinator observes a little less).
DEFAULT_TOLERANCE_SECONDS = 10.0
_SECONDS_PER_HOUR = 3600


class _UnknownLease(PaymentError):
    """No record of the lease here: this host can never co-sign its settlement."""


@dataclass(slots=True)
class _Lease:
    claims: LeaseClaims
    meter: UsageMeter
    signed_at: float | None = None


class SettlementBook:
    """What this host needs to co-sign settlements (see the module docstring)."""

    def __init__(
        self,
        keypair: Keypair,
        *,
        tolerance_seconds: float = DEFAULT_TOLERANCE_SECONDS,
        keep_seconds: float = 3600.0,
        max_entries: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
        log: logging.Logger | None = None,
    ) -> None:
        self.keypair = keypair
        self.tolerance_seconds = tolerance_seconds
        self.keep_seconds = keep_seconds
        self.max_entries = max_entries
        self.clock = clock
        self.log = log or logging.getLogger("provider_host")
        self._leases: OrderedDict[str, _Lease] = OrderedDict()

    def __contains__(self, lease_id: object) -> bool:
        return lease_id in self._leases

    def __len__(self) -> int:
        return len(self._leases)

    def admit(self, claims: LeaseClaims, meter: UsageMeter) -> None:
        """A session of the lease opened here: remember its claims and meter until the
        lease is settled."""
        self._prune()
        self._leases[claims.lease_id] = _Lease(claims, meter)
        self._leases.move_to_end(claims.lease_id)

    def meter(self, lease_id: str) -> UsageMeter | None:
        """The lease's meter (live, or frozen once its session ended), if known here."""
        entry = self._leases.get(lease_id)
        return None if entry is None else entry.meter

    def owed(self, lease_id: str) -> int:
        """The least this host accepts for the lease now, lamports."""
        entry = self._leases[lease_id]
        seconds = max(0.0, entry.meter.seconds() - self.tolerance_seconds)
        return int(entry.claims.price_lamports_per_hour * seconds) // _SECONDS_PER_HOUR

    def answer(self, request: SignSettlement, coordinator: Pubkey | None) -> SettlementReply:
        """Check ``request`` and sign it, or say why not (see the module docstring)."""
        try:
            signature = self._check_and_sign(request, coordinator)
        except PaymentError as exc:
            self.log.warning("refusing to settle lease %s: %s", request.lease, exc)
            code = "unknown_lease" if isinstance(exc, _UnknownLease) else "refused"
            return SettlementRefused(request.lease, str(exc), code)
        self.log.info(
            "co-signed the settlement of lease %s: %s", request.lease, format_sol(request.amount)
        )
        return SettlementSignature(request.lease, signature)

    def _check_and_sign(self, request: SignSettlement, coordinator: Pubkey | None) -> str:
        entry = self._leases.get(request.lease)
        if entry is None:
            raise _UnknownLease(
                f"lease {request.lease} is unknown here (never served, or forgotten after a "
                f"restart); settle it by refund (user + arbiter)"
            )
        claims = entry.claims
        if coordinator is None or claims.coordinator != coordinator:
            raise PaymentError(
                f"lease {request.lease} was issued by coordinator {claims.coordinator}, not by "
                f"the one asking ({coordinator})"
            )
        me = self.keypair.pubkey()
        try:
            message = MessageV0.from_bytes(request.message)
            terms = EscrowTerms(claims.user, me, coordinator, request.lease)
            expected = [
                bytes(
                    settlement_message(
                        terms,
                        request.amount,
                        blockhash=message.recent_blockhash,
                        fee_payer=me,
                        create_payout_account=create,
                    )
                )
                for create in (True, False)
            ]
        except (ValueError, PaymentError) as exc:
            raise PaymentError(f"the settlement message does not parse: {exc}") from None
        if request.message not in expected:
            raise PaymentError(
                f"the message is not the settlement of lease {request.lease}'s escrow paying "
                f"this provider {request.amount} lamports with this provider as fee payer"
            )
        owed = self.owed(request.lease)
        if request.amount < owed:
            raise PaymentError(
                f"it pays {format_sol(request.amount)}, but this provider delivered "
                f"{entry.meter.seconds()} s at {format_sol(claims.price_lamports_per_hour)}/h: "
                f"at least {format_sol(owed)} is owed ({self.tolerance_seconds:g} s tolerance)"
            )
        entry.signed_at = self.clock()
        return str(self.keypair.sign_message(to_bytes_versioned(message)))

    def _prune(self) -> None:
        now = self.clock()
        done = [
            lease_id
            for lease_id, entry in self._leases.items()
            if entry.signed_at is not None and now - entry.signed_at > self.keep_seconds
        ]
        for lease_id in done:
            del self._leases[lease_id]
        while len(self._leases) >= self.max_entries:
            self._leases.popitem(last=False)
