"""Payments on the coordinator: escrow per lease, metering, budget, refunds.

``docs/payments-contract.md`` is the contract. :class:`Billing` is what the lease service and
the handlers call; it decides nothing about scheduling and moves no funds on its own:

* :meth:`Billing.check_ledger` before a lease is stored (an unreachable ledger is a 503 and
  no dangling lease), :meth:`Billing.escrow_block` for the ``201``;
* :meth:`Billing.fund` (``POST /leases/{id}/escrow``): read the escrow on-chain, record it on
  the lease (then the lease service issues the token);
* :meth:`Billing.view` (the ``billing`` block of a lease), from :func:`meter`, the one place
  that says how many seconds are billed: min(reported, observed, covered by the deposit,
  acknowledged by the user + ``ack_grace``); :func:`acknowledge` records the user's
  acknowledgements (``POST /leases/{id}/ack``);
* the budget watch: one timer per active funded lease whose provider is linked here (armed
  at activation and when the provider links: with several replicas the one holding the
  link watches, :mod:`~jupyter_io.coordinator.jobs`), due when its deposit runs out or
  ``escrow_check_interval`` has passed, whichever is first; each check re-reads the escrow
  on-chain. A spent deposit ends the lease ("budget exhausted"); an escrow that is no longer
  intact (closed, changed, or holding less than verified) ends it ("escrow no longer
  intact"). Either way the provider is sent ``end`` and the settlement worker
  (:mod:`~jupyter_io.coordinator.settlement`) takes over;
* :meth:`Billing.refund_offer` / :meth:`Billing.refund_submitted`
  (``POST /leases/{id}/refund``): the arbiter's half of a user + arbiter refund (for a cohort
  lease, :meth:`Billing.cohort_session`, the cohort shape: the arbiter pays the fee, the rest
  goes back to the student's allowance).

With ``payments = "free"`` there is no :class:`Billing` object at all; handlers answer
``"escrow": {"required": false}`` (see :func:`free_escrow_block`).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property
from typing import Any

from solana.exceptions import SolanaRpcException
from solders.hash import Hash
from solders.keypair import Keypair
from solders.message import to_bytes_versioned
from solders.pubkey import Pubkey
from solders.signature import Signature

from ..coordinator_client import BUDGET_EXHAUSTED, ESCROW_NOT_INTACT
from ..errors import PaymentError
from ..payments.amounts import (
    amount_for,
    covered_seconds,
    format_sol,
    min_deposit,
)
from ..payments.cohort_pool import AllowanceTerms, CohortPoolClient, CohortSession
from ..payments.escrow import (
    EscrowClient,
    EscrowError,
    EscrowState,
    EscrowTerms,
    TransactionFailed,
    refund_message,
)
from ..provider_link import End
from ..usage_acks import DEFAULT_ACK_GRACE_S, UsageAck, ack_bound, check_ack
from .jobs import LinkWatch, owned_here
from .lease_timers import LeaseTimers
from .models import LeaseState, SettlementKind, SettlementState
from .registry import Registry
from .store import LeaseRecord, SettlementRecord, Store

__all__ = [
    "WARNINGS",
    "Billing",
    "DepositTooSmall",
    "EscrowMissing",
    "LedgerUnreachable",
    "Meter",
    "NotFunded",
    "RefundNotAllowed",
    "acknowledge",
    "free_escrow_block",
    "meter",
]

#: Shares of the deposit (percent) at which the billing view carries a warning.
WARNINGS = (80, 95, 100)


class LedgerUnreachable(PaymentError):
    """The Solana ledger did not answer (503 ``ledger_unreachable``)."""


class EscrowMissing(PaymentError):
    """No valid escrow at the lease's derived address (402 ``escrow_missing``)."""


class DepositTooSmall(PaymentError):
    """The escrow holds less than the minimum deposit (402 ``deposit_too_small``)."""


class NotFunded(PaymentError):
    """The lease has no verified escrow yet (402 ``escrow_missing`` on token renewal)."""


class RefundNotAllowed(PaymentError):
    """The lease cannot be refunded now: still live, or already settled (409)."""


def free_escrow_block() -> dict[str, Any]:
    """The ``escrow`` block of a lease on a free coordinator."""
    return {"required": False}


@dataclass(frozen=True, slots=True)
class Meter:
    """How much of a lease is billed (see :func:`meter`)."""

    reported_seconds: int
    observed_seconds: int
    covered_seconds: int | None
    billed_seconds: int
    spent_lamports: int
    deposit_lamports: int
    #: What the user acknowledged (None: a lease recorded before acknowledgements).
    acknowledged_seconds: int | None = None

    @property
    def used_fraction(self) -> float:
        if self.covered_seconds is None:
            return 0.0
        if self.covered_seconds == 0:
            return 1.0
        return min(1.0, self.billed_seconds / self.covered_seconds)

    @property
    def warning(self) -> int | None:
        """80, 95 or 100 once that share of the deposit is spent, else None."""
        fraction = self.used_fraction
        reached = [level for level in WARNINGS if fraction * 100 >= level]
        return reached[-1] if reached else None


def _observed(lease: LeaseRecord, now: float) -> int:
    if lease.active_at is None:
        return 0
    end = lease.end_of_service or lease.ended_at
    until = end.timestamp() if end is not None else now
    return max(0, math.floor(until - lease.active_at.timestamp()))


def meter(
    lease: LeaseRecord, reported_seconds: int, *, now: float, grace: float | None = None
) -> Meter:
    """Billed seconds of a lease: min(reported, observed, covered) once it is over; while it
    runs, min(observed, covered) (reports lag behind; the budget runs on observation).

    With ``grace`` (the coordinator's ``usage_ack_grace``) neither party meters alone: the
    user's acknowledged seconds plus ``grace`` bound it too
    (:func:`~jupyter_io.usage_acks.ack_bound`; payments contract, "Neither party meters
    alone")."""
    deposit = lease.deposit_lamports or 0
    observed = _observed(lease, now)
    covered = covered_seconds(lease.price_lamports_per_hour, deposit)
    billed = observed if lease.live else min(observed, reported_seconds)
    bound = None if grace is None else ack_bound(lease.acked_seconds, grace)
    if bound is not None:
        billed = min(billed, bound)
    if covered is not None:
        billed = min(billed, covered)
    spent = min(deposit, amount_for(lease.price_lamports_per_hour, billed))
    return Meter(
        reported_seconds, observed, covered, billed, spent, deposit, lease.acked_seconds
    )


async def acknowledge(store: Store, lease: LeaseRecord, ack: UsageAck, *, now: float) -> int:
    """Record the user's acknowledgement ``ack`` of ``lease`` (its owner and the request's
    signature checked by the caller); returns the seconds acknowledged now. Raises
    :class:`~jupyter_io.usage_acks.StaleAck` or :class:`~jupyter_io.usage_acks.AckAhead`
    (nothing changed), ``LookupError`` when the lease is no longer live. Needs no
    :class:`Billing`: a free coordinator records acknowledgements too."""
    if not lease.live:
        raise LookupError(lease.id)
    check_ack(ack, recorded=lease.acked_seconds, observed=_observed(lease, now))
    # The same count again is recorded too: the user was heard from (the ack watch).
    recorded = await store.record_ack(lease.id, ack.seconds, at=_utc(now))
    if recorded is None:  # ended meanwhile, or a newer acknowledgement overtook this one
        current = await store.get_lease(lease.id)
        if current is None or not current.live:
            raise LookupError(lease.id)
        check_ack(ack, recorded=current.acked_seconds, observed=_observed(current, now))
        return current.acked_seconds or 0
    return recorded.acked_seconds or 0


def _utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=timezone.utc)


class Billing:
    """The coordinator's payment service in escrow mode (see the module docstring).

    ``escrow`` talks to the ledger (the embedded one through its own JSON-RPC endpoint, or a
    remote cluster); ``arbiter`` is the coordinator's keypair.
    """

    def __init__(
        self,
        store: Store,
        registry: Registry,
        escrow: EscrowClient,
        arbiter: Keypair,
        *,
        solana_url: str,
        min_deposit_seconds: int = 60,
        ledger_timeout: float = 10.0,
        escrow_check_interval: float = 15.0,
        ack_grace: float = DEFAULT_ACK_GRACE_S,
        log: logging.Logger | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.registry = registry
        self.escrow = escrow
        self.arbiter = arbiter
        self.solana_url = solana_url
        self.min_deposit_seconds = min_deposit_seconds
        self.ledger_timeout = ledger_timeout
        #: Seconds billed past the user's last usage acknowledgement.
        self.ack_grace = ack_grace
        #: Longest time, seconds, between two on-chain reads of a live lease's escrow.
        self.escrow_check_interval = escrow_check_interval
        self.log = log or logging.getLogger("jupyter_io.coordinator")
        self.clock = clock
        #: Called after the budget watch ended a lease (the settlement worker wakes up).
        self.on_budget_exhausted: Callable[[str], None] | None = None
        self._timers = LeaseTimers(self._check_budget, what="budget check", log=self.log)
        self._links = LinkWatch(store, registry, self.watch, log=self.log)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Watch the budget of each active funded lease whose provider links here (after a
        restart: as its provider links again), and of each lease that becomes active."""
        self.registry.activation_listeners.append(self.watch)
        self._links.start()
        for lease in await self.store.funded_active_leases():
            if owned_here(self.registry, lease.provider_pubkey):
                self.watch(lease)

    async def stop(self) -> None:
        """Cancel the budget timers and wait for an end in progress."""
        await self._links.stop()
        await self._timers.stop()

    # -- the ledger ------------------------------------------------------------------------

    async def _ledger(self, what: str, call: Any) -> Any:
        try:
            return await asyncio.wait_for(call, self.ledger_timeout)
        except asyncio.TimeoutError:
            raise LedgerUnreachable(
                f"the Solana ledger at {self.solana_url} did not answer within "
                f"{self.ledger_timeout:g} s while {what}; try again shortly, or ask the "
                f"coordinator's operator to check its solana_url"
            ) from None
        except (EscrowError, TransactionFailed):
            raise
        except PaymentError as exc:  # EscrowClient's "cannot reach the Solana RPC ..."
            raise LedgerUnreachable(
                f"{exc} (the coordinator cannot use its ledger now; try again shortly)"
            ) from None
        except SolanaRpcException as exc:
            raise LedgerUnreachable(
                f"cannot reach the Solana ledger at {self.solana_url} while {what} "
                f"({exc.__cause__ or exc!r}); try again shortly"
            ) from None

    async def check_ledger(self) -> None:
        """Raise :class:`LedgerUnreachable` unless the ledger answers (before a lease is
        stored: no lease is left behind that could never be funded)."""
        await self._ledger("checking it before a lease", self.escrow.balance(self.arbiter.pubkey()))

    async def latest_blockhash(self) -> Hash:
        """A recent blockhash for a message the arbiter co-signs."""
        request = self.escrow.client.get_latest_blockhash(self.escrow.commitment)
        resp = await self._ledger("fetching a blockhash", request)
        return resp.value.blockhash

    def terms(self, lease: LeaseRecord) -> EscrowTerms:
        """The escrow's parties for ``lease`` (session id = lease id)."""
        return EscrowTerms(
            Pubkey.from_string(lease.user_pubkey),
            Pubkey.from_string(lease.provider_pubkey),
            self.arbiter.pubkey(),
            lease.id,
        )

    @cached_property
    def pool(self) -> CohortPoolClient:
        """The cohort-pool operations, on the escrow client's connection."""
        return CohortPoolClient(self.escrow.client, commitment=self.escrow.commitment)

    async def cohort_session(self, lease: LeaseRecord) -> CohortSession | None:
        """The allowance and escrow of a cohort lease (None: not a cohort lease); raises
        :class:`EscrowMissing` if its cohort is gone from the store."""
        if lease.cohort_id is None:
            return None
        cohort = await self.store.get_cohort(lease.cohort_id)
        if cohort is None:
            raise EscrowMissing(
                f"lease {lease.id} names cohort {lease.cohort_id}, which this coordinator "
                f"does not know"
            )
        allowance = AllowanceTerms(
            Pubkey.from_string(cohort.instructor),
            Pubkey.from_string(lease.user_pubkey),
            self.arbiter.pubkey(),
            cohort.id,
        )
        return allowance.session(Pubkey.from_string(lease.provider_pubkey), lease.id)

    async def escrow_state(self, lease: LeaseRecord) -> EscrowState | None:
        """The lease's escrow on-chain (None: closed or never opened)."""
        return await self._ledger("reading the escrow", self.escrow.escrow_state(self.terms(lease)))

    # -- lease → escrow → token ------------------------------------------------------------

    def min_deposit(self, lease: LeaseRecord) -> int:
        return min_deposit(lease.price_lamports_per_hour, self.min_deposit_seconds)

    def escrow_block(self, lease: LeaseRecord) -> dict[str, Any]:
        """The ``escrow`` block of the ``201`` and of the funded grant."""
        block: dict[str, Any] = {
            "required": True,
            "arbiter": str(self.arbiter.pubkey()),
            "solana_url": self.solana_url,
            "min_deposit_lamports": self.min_deposit(lease),
        }
        if lease.cohort_id is not None:
            # Paid from the student's allowance: POST /leases/{id}/cohort-funding.
            block["funding"] = "cohort"
        if lease.escrow_address is not None:
            block["address"] = lease.escrow_address
            block["deposit_lamports"] = lease.deposit_lamports
        return block

    async def fund(
        self, lease: LeaseRecord, signature: str | None, *, cohort: bool = False
    ) -> LeaseRecord:
        """Verify the lease's escrow on-chain and record it (again after a top-up).

        Raises :class:`EscrowMissing`, :class:`DepositTooSmall` (402),
        :class:`LedgerUnreachable` (503). Returns the lease as recorded, or raises
        ``LookupError`` when it is no longer live. Next: the lease service issues the token.

        A cohort lease is recorded only from its cohort funding (``cohort``: the call of
        :mod:`~jupyter_io.coordinator.cohort_funding`, once its transaction landed): its
        settlement returns the rest to the allowance, so an escrow the student opened with
        their own SOL must not pass for it.
        """
        if lease.cohort_id is not None and not cohort:
            raise EscrowMissing(
                f"lease {lease.id} is a lease of cohort {lease.cohort_id}: the cohort's pool "
                f"funds it (POST /api/v1/leases/{lease.id}/cohort-funding), not your wallet"
            )
        if signature is not None:
            try:
                Signature.from_string(signature)
            except ValueError:
                raise EscrowMissing(
                    f"{signature!r} is not a base58 transaction signature"
                ) from None
        terms = self.terms(lease)
        try:
            state = await self.escrow_state(lease)
        except EscrowError as exc:
            raise EscrowMissing(
                f"{exc}. The coordinator accepts only the escrow of the payments contract, "
                f"as EscrowClient.open_escrow builds it with the lease's terms: request a new "
                f"lease for a fresh escrow address (a multisig cannot be closed: if it is the "
                f"problem, lease with another wallet key)"
            ) from None
        needed = self.min_deposit(lease)
        if state is None:
            raise EscrowMissing(
                f"no escrow for lease {lease.id} at {terms.escrow}: open it (user {terms.user}, "
                f"provider {terms.provider}, arbiter {terms.arbiter}, session id = the lease id) "
                f"with at least {format_sol(needed)}, then call this again"
            )
        if state.amount < needed:
            raise DepositTooSmall(
                f"escrow {terms.escrow} holds {format_sol(state.amount)}, lease {lease.id} needs "
                f"at least {format_sol(needed)} ({self.min_deposit_seconds} s at "
                f"{format_sol(lease.price_lamports_per_hour)}/h); top it up and call this again"
            )
        recorded = await self.store.record_escrow(
            lease.id,
            address=str(terms.escrow),
            deposit_lamports=state.amount,
            signature=signature,
            at=_utc(self.clock()),
        )
        if recorded is None:
            raise LookupError(lease.id)
        if recorded.state is LeaseState.ACTIVE:
            self.watch(recorded)  # a top-up moves the end of the budget
        return recorded

    # -- the billing view ------------------------------------------------------------------

    async def meter(self, lease: LeaseRecord) -> Meter:
        """The lease's billed seconds now (see :func:`meter`)."""
        reported = await self.store.usage_for_lease(lease.id)
        return meter(lease, reported, now=self.clock(), grace=self.ack_grace)

    async def view(
        self, lease: LeaseRecord, settlement: SettlementRecord | None = None
    ) -> dict[str, Any]:
        """The ``billing`` block of a lease (payments contract §3)."""
        metered = await self.meter(lease)
        return {
            "deposit_lamports": metered.deposit_lamports,
            "billed_seconds": metered.billed_seconds,
            "reported_seconds": metered.reported_seconds,
            "acknowledged_seconds": metered.acknowledged_seconds,
            "spent_lamports": metered.spent_lamports,
            "left_lamports": metered.deposit_lamports - metered.spent_lamports,
            "used_fraction": round(metered.used_fraction, 6) if lease.funded else 0.0,
            "warning": metered.warning if lease.funded else None,
            "escrow": lease.escrow_address,
            "escrow_signature": lease.escrow_signature,
            "settlement": settlement.to_json() if settlement is not None else None,
        }

    # -- the budget watch ------------------------------------------------------------------

    def watch(self, lease: LeaseRecord) -> None:
        """(Re)arm the timer of ``lease``'s next budget check: when its deposit runs out, or
        in ``escrow_check_interval`` if that is sooner (each check re-reads the escrow). One
        timer per lease; unfunded and inactive leases need none."""
        self._timers.cancel(lease.id)
        if not lease.funded or lease.state is not LeaseState.ACTIVE:
            return
        if lease.active_at is None:
            return
        covered = covered_seconds(lease.price_lamports_per_hour, lease.deposit_lamports or 0)
        delay = self.escrow_check_interval
        if covered is not None:
            due = lease.active_at.timestamp() + covered
            delay = min(delay, due - self.clock())
        self._timers.arm(lease.id, delay)

    async def _check_budget(self, lease_id: str) -> None:
        lease = await self.store.get_lease(lease_id)
        if lease is None or not lease.live:
            return
        if not owned_here(self.registry, lease.provider_pubkey):
            return  # its provider moved: the replica holding its link watches it now
        broken = await self.escrow_broken(lease)
        if broken is not None:
            await self.end_not_intact(lease, broken)
            return
        metered = await self.meter(lease)
        covered = metered.covered_seconds
        if covered is None or metered.observed_seconds < covered:
            self.watch(lease)  # topped up (maybe through another coordinator)
            return
        await self.end_exhausted(lease)

    async def escrow_broken(self, lease: LeaseRecord) -> str | None:
        """Why ``lease``'s escrow is no longer intact (closed, no longer exactly what was
        verified, or holding less than its recorded deposit), or None while it is. A ledger
        that does not answer is no verdict: None (the next check reads it again)."""
        try:
            state = await self.escrow_state(lease)
        except EscrowError as exc:
            return str(exc)
        except LedgerUnreachable as exc:
            self.log.warning("lease %s: cannot check its escrow now: %s", lease.id, exc)
            return None
        if state is None:
            return f"escrow {lease.escrow_address} was closed while lease {lease.id} was live"
        deposit = lease.deposit_lamports or 0
        if state.amount < deposit:
            return (
                f"escrow {lease.escrow_address} holds {format_sol(state.amount)}, less than "
                f"the {format_sol(deposit)} verified for lease {lease.id}"
            )
        return None

    async def end_exhausted(self, lease: LeaseRecord) -> bool:
        """End a lease whose deposit is spent: the provider stops the kernel, the lease is
        settled. Returns whether this call ended it."""
        return await self._end(lease, BUDGET_EXHAUSTED)

    async def end_not_intact(self, lease: LeaseRecord, why: str) -> bool:
        """End a lease whose escrow is no longer intact (``why``): the provider stops the
        kernel; the settlement worker pays it, for what it served until now, whatever can
        still be recovered. Returns whether this call ended it."""
        self.log.warning("lease %s: %s (%s)", lease.id, ESCROW_NOT_INTACT, why)
        return await self._end(lease, ESCROW_NOT_INTACT)

    async def _end(self, lease: LeaseRecord, reason: str) -> bool:
        if not await self.store.end_lease(lease.id, reason, at=_utc(self.clock())):
            return False
        provider = lease.provider_pubkey
        self.log.info("lease %s: %s, ending it", lease.id, reason)
        self.registry.deliver(provider, End(lease.id, reason), ttl=60.0)
        self.registry.lease_over(provider, lease.id, ok=True, reason=reason)
        if self.on_budget_exhausted is not None:
            self.on_budget_exhausted(lease.id)
        return True

    # -- refunds (user + arbiter) ----------------------------------------------------------

    async def refund_offer(self, lease: LeaseRecord) -> dict[str, Any]:
        """The arbiter's half of a refund: the message (fee payer = the user) paying the
        provider its share for the billed seconds and closing the escrow to the user, and
        the arbiter's signature. For a failed lease, one never activated, or one whose
        provider is not linked here; raises :class:`RefundNotAllowed` otherwise (live,
        settled, or settled by the worker with its online provider)."""
        lease, settlement = await self._refundable(lease)
        linked = self.registry.provider(lease.provider_pubkey)
        if (
            settlement.kind is SettlementKind.SETTLE
            and lease.active_at is not None
            and linked is not None
            and linked.linked
        ):
            # The provider served this lease and is here to co-sign: it is settled with the
            # provider's own metering, not refunded around it.
            raise RefundNotAllowed(
                f"lease {lease.id} ended normally and its provider is online: the coordinator "
                f"settles it with the provider (see billing.settlement); no refund is needed"
            )
        state = await self.escrow_state(lease)
        if state is None:
            raise RefundNotAllowed(
                f"the escrow of lease {lease.id} is already closed; nothing to refund"
                + (f" (settlement {settlement.signature})" if settlement.signature else "")
            )
        metered = await self.meter(lease)
        share = min(state.amount, metered.spent_lamports)
        terms = self.terms(lease)
        session = await self.cohort_session(lease)
        if session is not None:
            # The arbiter pays the fee (the student holds no SOL) and takes it back from the
            # escrow; the rest returns to the allowance (or, reclaimed, to the instructor).
            plan = await self._ledger("reading the escrow", self.pool.refund_plan(session, share))
            if plan is None:
                raise RefundNotAllowed(f"the escrow of lease {lease.id} is already closed")
            build = self.pool.refund_builder(session, share, plan)
            message = build(await self.latest_blockhash())
        else:
            payout = await self._ledger(
                "reading the provider's wSOL account",
                self.escrow.client.get_account_info(terms.provider_wsol),
            )
            message = refund_message(
                terms,
                share,
                blockhash=await self.latest_blockhash(),
                provider_has_wsol_account=payout.value is not None,
                fee_payer=terms.user,
            )
        signature = self.arbiter.sign_message(to_bytes_versioned(message))
        return {
            "message": base64.b64encode(bytes(message)).decode(),
            "arbiter_signature": str(signature),
            "provider_share": share,
        }

    async def refund_submitted(self, lease: LeaseRecord, signature: str) -> SettlementRecord:
        """The user submitted the refund: check that the escrow is closed on-chain and mark
        the settlement done with ``signature``. Raises :class:`RefundNotAllowed` while the
        escrow is still open."""
        try:
            parsed = Signature.from_string(signature)
        except ValueError:
            raise RefundNotAllowed(f"{signature!r} is not a base58 transaction signature") from None
        lease, settlement = await self._refundable(lease, allow_done=True)
        await self._check_landed(parsed, lease)
        if settlement.state is SettlementState.DONE and settlement.signature is None:
            # The worker saw the escrow closed before the user reported how (rows of
            # coordinators before the "failed" state for an unknown closer).
            await self.store.note_settlement_signature(lease.id, signature)
        if settlement.state is not SettlementState.DONE:
            # Pending, or failed: the worker saw the escrow closed before the user reported
            # how. Recorded only as what that landed transaction paid the provider.
            if await self.escrow_state(lease) is not None:
                raise RefundNotAllowed(
                    f"the escrow of lease {lease.id} is still open: submit the refund "
                    f"transaction (signed by you and the arbiter) and wait for it to land"
                )
            terms = self.terms(lease)
            closing = await self._ledger(
                "reading the refund", self.escrow.closing_transaction(terms, parsed)
            )
            if closing is None or terms.arbiter not in closing.signers:
                raise RefundNotAllowed(
                    f"transaction {signature} is not the refund of lease {lease.id} that the "
                    f"arbiter co-signed (it did not close escrow {terms.escrow} with the "
                    f"arbiter's signature); submit that refund and report its signature"
                )
            await self.store.finish_settlement(
                lease.id,
                signature=signature,
                amount_lamports=closing.paid_to_provider,
                fee_lamports=closing.fee,
                at=_utc(self.clock()),
            )
        done = await self.store.get_settlement(lease.id)
        assert done is not None
        return done

    async def _check_landed(self, signature: Signature, lease: LeaseRecord) -> None:
        """Raise :class:`RefundNotAllowed` unless ``signature`` is a transaction that landed
        without error (what the user reports is recorded in the lease's history)."""
        resp = await self._ledger(
            "reading the refund's status", self.escrow.client.get_signature_statuses([signature])
        )
        status = resp.value[0]
        if status is None or status.err is not None:
            why = "is unknown to the ledger" if status is None else f"failed ({status.err})"
            raise RefundNotAllowed(
                f"transaction {signature} {why}; submit the refund of lease {lease.id} "
                f"(signed by you and the arbiter) and report the signature once it landed"
            )

    async def _found_late(self, lease: LeaseRecord) -> LeaseRecord:
        """A lease that is over with no escrow recorded: the user may have opened it and then
        never reached ``POST /escrow`` (coordinator or ledger down, lease ended meanwhile).
        Look at the derived address; an escrow there is recorded now so that it can be
        refunded (its lease never ran: nothing is owed to the provider). Raises
        :class:`RefundNotAllowed` when there is none."""
        try:
            state = await self.escrow_state(lease)
        except EscrowError:
            state = None
        if state is None:
            raise RefundNotAllowed(f"lease {lease.id} was never funded: nothing to refund")
        recorded = await self.store.record_escrow(
            lease.id,
            address=str(state.address),
            deposit_lamports=state.amount,
            signature=None,
            at=_utc(self.clock()),
            late=True,
        )
        if recorded is None:  # recorded meanwhile by another request: read it again
            recorded = await self.store.get_lease(lease.id)
            if recorded is None or not recorded.funded:
                raise RefundNotAllowed(f"lease {lease.id} was never funded: nothing to refund")
        self.log.info(
            "lease %s: escrow %s found on-chain after the lease was over; it can be refunded",
            lease.id,
            state.address,
        )
        return recorded

    async def _refundable(
        self, lease: LeaseRecord, *, allow_done: bool = False
    ) -> tuple[LeaseRecord, SettlementRecord]:
        if lease.live:
            raise RefundNotAllowed(
                f"lease {lease.id} is {lease.state.value}: end it first (DELETE the lease); "
                f"a refund is for a lease whose provider failed"
            )
        if not lease.funded:
            lease = await self._found_late(lease)
        await self.store.enqueue_settlements(at=_utc(self.clock()))
        settlement = await self.store.get_settlement(lease.id)
        assert settlement is not None, "a funded lease that is over always has a settlement"
        if settlement.state is SettlementState.FAILED and not allow_done:
            raise RefundNotAllowed(
                f"the escrow of lease {lease.id} is closed and nothing can be refunded: "
                f"{settlement.error}"
            )
        if settlement.state is not SettlementState.PENDING and not allow_done:
            raise RefundNotAllowed(
                f"lease {lease.id} is already settled ({settlement.kind.value}, "
                f"{settlement.signature or 'escrow closed'})"
            )
        return lease, settlement
