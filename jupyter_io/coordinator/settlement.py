"""The settlement worker: close every funded lease's escrow, exactly once, whatever fails.

``docs/payments-contract.md`` section 4. The queue is the ``settlements`` table
(:meth:`~jupyter_io.coordinator.store.Store.enqueue_settlements` adds a row for each funded
lease that is over; the lease id is the key, so never two). :class:`SettlementWorker` runs on
every coordinator; each pass (every ``retry_interval``, and at once when a lease ends, a
provider links or a provider answers):

1. queue what is missing (first attempt ``final_report_grace`` later, once the provider's
   last usage report is in), then take the due rows this replica owns, claiming each
   atomically (:meth:`~jupyter_io.coordinator.store.Store.claim_settlement`): of several
   coordinators sharing the database one works on a row at a time. A replica owns the rows
   of the providers linked to it (the provider co-signs over its link; so a row is not
   bounced between replicas that cannot settle it), and of a provider whose link closed here
   while it is watched for its loss window; the leader
   (:class:`~jupyter_io.coordinator.jobs.Leadership`) owns those of providers the database
   shows linked nowhere (offline, lost, or silent for the loss window), to find their
   escrows refunded or closed;
2. read the escrow on-chain. Closed: if the transaction this row last submitted (its
   signature is noted before sending) landed and closed it, the row is ``done`` with what
   that transaction paid; otherwise (the user's refund not reported yet, a tampered escrow
   closed by its user) the row is ``failed`` and nothing is recorded as paid. Never paid
   twice. An escrow no longer intact but still a wSOL account of the multisig is settled
   for what it still holds; if arbiter + provider cannot move it, the row is ``failed``;
3. if the lease's provider is linked here, build
   :func:`~jupyter_io.payments.escrow.settlement_message` (the billed amount, fee payer the
   provider; for a cohort lease
   :func:`~jupyter_io.payments.cohort_pool.cohort_settlement_message`, the rest back to the
   student's allowance, or to the instructor once it was reclaimed), send it a
   :class:`~jupyter_io.provider_link.SignSettlement` and
   wait (bounded) for its ``settlement_signature``; check that signature, note it on the row,
   add the arbiter's and submit (:meth:`~jupyter_io.payments.escrow.EscrowClient.submit`
   with a ``Presigner``); once it landed, ``done`` with its amount (never before);
4. otherwise (provider away, refused, ledger down, transaction failed) release the claim,
   note why, and try again later: ``retry_interval`` after the first failure, then twice the
   row's previous wait each time, up to ``retry_max`` (:meth:`SettlementWorker.backoff`). The
   wait is read back from the row itself (``next_attempt_at - updated_at``), so it survives a
   restart and is shared by coordinators on one database. When a provider links, its pending
   rows are due at once and their backoff starts over. A provider that never comes back: the
   user refunds through ``POST /leases/{id}/refund`` and the next pass sees the escrow closed.

A restarted coordinator picks the pending rows up where they were (a shutdown releases its
claims; a crashed coordinator's claims expire after ``claim_ttl``, or, a replica's, once it
has not beaten for :data:`~jupyter_io.coordinator.store.settlements.DEAD_REPLICA_S`; the
replica its provider links to next takes them). :attr:`SettlementWorker.
stats` counts what this process did (``GET /api/v1/status`` shows it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

from solders.message import to_bytes_versioned
from solders.presigner import Presigner
from solders.pubkey import Pubkey
from solders.signature import Signature

from ..errors import PaymentError
from ..payments.amounts import FEE_PER_SIGNATURE
from ..payments.cohort_pool import cohort_settlement_message
from ..payments.escrow import EscrowError, TransactionFailed, settlement_message
from ..provider_link import SettlementRefused, SettlementReply, SignSettlement
from .billing import Billing
from .jobs import Leadership, owned_here
from .models import SettlementKind
from .registry import Registry
from .store import LeaseRecord, SettlementRecord, Store

__all__ = ["SettlementWorker", "WorkerStats"]

_T = TypeVar("_T")


def _utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=timezone.utc)


class WorkerStats:
    """Counters of this process's worker, for tests and ``GET /api/v1/status``."""

    def __init__(self) -> None:
        self.passes = 0
        #: Rows still pending (anyone's) at the end of the last pass.
        self.pending = 0
        self.attempts = 0
        #: Settlements this worker submitted, and rows it found closed (by a refund, ...).
        self.settled = 0
        self.found_closed = 0
        #: Attempts that left their row pending (provider away or refusing, ledger down...).
        self.failed_attempts = 0
        self.refused = 0
        #: Attempts that failed with a :class:`~jupyter_io.errors.PaymentError` (ledger).
        self.failed = 0
        #: Rows marked ``failed``: their escrow was closed by no settlement of ours, or
        #: arbiter + provider can no longer move it (nothing recorded as paid).
        self.unrecoverable = 0
        #: Rows made due at once because their provider linked again.
        self.backoffs_reset = 0
        #: Why the last failed attempt failed: ``(lease id, message, Unix seconds)``.
        self.last_error: tuple[str, str, float] | None = None

    @property
    def done(self) -> int:
        """Rows this worker marked done (settled, or found closed)."""
        return self.settled + self.found_closed

    def to_json(self) -> dict[str, Any]:
        """The ``settlements`` block of ``GET /api/v1/status``."""
        last = self.last_error
        return {
            "pending": self.pending,
            "done": self.done,
            "settled": self.settled,
            "found_closed": self.found_closed,
            "unrecoverable": self.unrecoverable,
            "attempts": self.attempts,
            "failed_attempts": self.failed_attempts,
            "refused": self.refused,
            "backoffs_reset": self.backoffs_reset,
            "passes": self.passes,
            "last_error": (
                None if last is None else {"lease": last[0], "message": last[1], "at": last[2]}
            ),
        }


class SettlementWorker:
    """Drains the settlements queue (see the module docstring). :meth:`start` after the
    registry, :meth:`stop` before it."""

    def __init__(
        self,
        store: Store,
        registry: Registry,
        billing: Billing,
        *,
        retry_interval: float = 5.0,
        retry_max: float = 60.0,
        reply_timeout: float = 10.0,
        claim_ttl: float = 60.0,
        final_report_grace: float = 1.0,
        leadership: Leadership | None = None,
        owner: str | None = None,
        log: logging.Logger | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        #: Whether this replica leads (settles the rows of providers linked nowhere); None:
        #: the only coordinator.
        self.leadership = leadership
        self.registry = registry
        self.billing = billing
        self.escrow = billing.escrow
        self.arbiter = billing.arbiter
        self.retry_interval = retry_interval
        #: The longest wait between two attempts of one row.
        self.retry_max = max(retry_max, retry_interval)
        self.reply_timeout = reply_timeout
        self.claim_ttl = max(claim_ttl, reply_timeout + 30.0)
        #: Seconds a new settlement waits before its first attempt: the provider's last usage
        #: report, sent when its session ends, should be in by then.
        self.final_report_grace = final_report_grace
        self.log = log or logging.getLogger("jupyter_io.coordinator")
        self.clock = clock
        #: This process's name in ``claimed_by`` (replicas share a key, not a claim): its
        #: replica id on PostgreSQL, so a replica that stopped beating loses its claims.
        self.owner = owner or f"coordinator-{secrets.token_hex(8)}"
        self.stats = WorkerStats()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._replies: dict[str, tuple[str, asyncio.Future[SettlementReply]]] = {}
        self._relinked: set[str] = set()
        self._backoff = retry_interval  # the wait after the attempt in progress fails
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the passes (:meth:`listen`, then a pass now and every ``retry_interval``)."""
        self.listen()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="settlements")

    def listen(self) -> None:
        """Hear lease ends, provider links and provider replies (what :meth:`start` does
        first; a test that drives :meth:`run_once` itself calls only this)."""
        self.registry.settlement_replies = self.reply
        self.registry.lease_listeners.append(lambda _lease, _why: self.wake())
        self.registry.link_listeners.append(self.provider_linked)
        self.billing.on_budget_exhausted = lambda _lease: self.wake()

    async def stop(self) -> None:
        """Stop after the current attempt is cancelled, and release this process's claims."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for _, future in self._replies.values():
            future.cancel()
        self._replies.clear()
        with contextlib.suppress(Exception):
            await self.store.release_settlements(self.owner)

    def wake(self) -> None:
        """Run a pass now (a lease ended, a provider answered)."""
        self._wake.set()

    def provider_linked(self, provider: str) -> None:
        """A provider linked: the next pass (now) makes its pending rows due at once and
        starts their backoff over."""
        self._relinked.add(provider)
        self.wake()

    def backoff(self, row: SettlementRecord) -> float:
        """Seconds to wait after a failed attempt of ``row`` (as it was before its claim):
        ``retry_interval`` after its first attempt or a reset, else twice its previous wait,
        at most ``retry_max``."""
        previous = (row.next_attempt_at - row.updated_at).total_seconds()
        if row.attempts == 0:
            return self.retry_interval
        return min(self.retry_max, max(self.retry_interval, 2 * previous))

    async def wait_idle(self) -> None:
        """Wait until a pass finished with nothing left due (for tests and benchmarks)."""
        self._idle.clear()
        self.wake()
        await self._idle.wait()

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                left = await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.log.exception("settlement pass failed; retrying in %g s", self.retry_interval)
                left = 1
            if not left:
                self._idle.set()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.retry_interval)

    # -- passes ----------------------------------------------------------------------------

    async def run_once(self) -> int:
        """One pass: queue, claim, attempt. Returns how many rows are left pending."""
        self.stats.passes += 1
        now = self.clock()
        queued = await self.store.enqueue_settlements(
            at=_utc(now), first_attempt=_utc(now + self.final_report_grace)
        )
        if queued:
            loop = asyncio.get_running_loop()
            loop.call_later(self.final_report_grace + 0.01, self.wake)
        if self._relinked:
            await self._reset_backoff(now)
        registry = self.registry
        live_since = _utc(now - registry.loss_window - registry.flush_interval)
        due = await self.store.due_settlements_with_providers(
            self.owner, live_since=live_since, at=_utc(now)
        )
        for row, provider, linked_somewhere in due:
            if not self.owns(provider, linked_somewhere):
                continue  # the replica holding its link settles it
            claimed = await self.store.claim_settlement(
                row.lease_id, self.owner, until=_utc(now + self.claim_ttl), at=_utc(now)
            )
            if claimed is not None:  # else another coordinator has it
                await self._attempt(claimed, self.backoff(row))
        self.stats.pending = await self.store.pending_settlements()
        return self.stats.pending

    def owns(self, provider: str, linked_somewhere: bool) -> bool:
        """Whether this replica settles the rows of ``provider`` (see the module docstring);
        ``linked_somewhere``: the database shows it online and heartbeating."""
        if owned_here(self.registry, provider):
            return True
        if linked_somewhere:
            return False
        return self.leadership is None or self.leadership.is_leader("settlements")

    async def _reset_backoff(self, now: float) -> None:
        """Make the pending rows of the providers that linked since the last pass due now
        (a wait is at most ``retry_max``: they are among the rows due by then)."""
        providers, self._relinked = self._relinked, set()
        waiting = await self.store.due_settlements(
            self.owner, at=_utc(now + self.retry_max + 1.0), limit=1000
        )
        for row in waiting:
            if row.next_attempt_at <= _utc(now):
                continue  # due anyway
            lease = await self.store.get_lease(row.lease_id)
            if lease is None or lease.provider_pubkey not in providers:
                continue
            if await self.store.retry_settlement(
                row.lease_id, self.owner, error=row.error, next_attempt_at=_utc(now), at=_utc(now)
            ):
                self.stats.backoffs_reset += 1

    async def _attempt(self, row: SettlementRecord, backoff: float) -> bool:
        """Try to close one escrow; True once the row is done, else it waits ``backoff``."""
        self.stats.attempts += 1
        self._backoff = backoff
        lease = await self.store.get_lease(row.lease_id)
        assert lease is not None  # the foreign key keeps it
        try:
            return await self._settle(lease, row)
        except PaymentError as exc:
            self.stats.failed += 1
            await self._later(lease, f"{type(exc).__name__}: {exc}")
            return False

    async def _settle(self, lease: LeaseRecord, row: SettlementRecord) -> bool:
        problem: str | None = None
        terms = self.billing.terms(lease)
        try:
            state = await self.billing.escrow_state(lease)
        except EscrowError as exc:
            # No longer intact (changed while the lease ran, or since): settle out of what
            # arbiter + provider can still move; the transaction's preflight says if they can.
            problem = str(exc)
            state = await self._read(self.escrow.recoverable_state(terms))
        if state is None:
            return await self._closed(lease, row.signature, problem)
        metered = await self.billing.meter(lease)
        amount = min(state.amount, metered.spent_lamports)
        provider = lease.provider_pubkey
        linked = self.registry.provider(provider)
        if linked is None or not linked.linked:
            await self._later(
                lease,
                f"provider {provider} is not linked here; waiting for it to link "
                f"(or for the user's refund)",
            )
            return False
        session = await self.billing.cohort_session(lease)
        if session is not None:
            # A cohort lease: the rest goes back to the student's allowance, or to the
            # instructor if it was reclaimed meanwhile; the rent to the arbiter, who fronted it.
            to = await self._read(self.billing.pool.remainder_destination(session))
            message = cohort_settlement_message(
                session,
                amount,
                remainder=state.amount - amount,
                remainder_to=to,
                blockhash=await self.billing.latest_blockhash(),
            )
        else:
            message = settlement_message(
                terms,
                amount,
                blockhash=await self.billing.latest_blockhash(),
                fee_payer=terms.provider,
            )
        reply = await self.ask(provider, SignSettlement(lease.id, amount, bytes(message)))
        if reply is None:
            await self._later(lease, f"provider {provider} did not answer in time")
            return False
        if isinstance(reply, SettlementRefused):
            self.stats.refused += 1
            self.log.warning("provider refused settling lease %s: %s", lease.id, reply.reason)
            if reply.code == "unknown_lease":
                # It can never co-sign: the user and the arbiter refund it (section 4).
                await self._later(
                    lease,
                    f"the provider has no record of this lease ({reply.reason}); refund it: "
                    f"POST /api/v1/leases/{lease.id}/refund",
                    kind=SettlementKind.REFUND,
                )
                return False
            await self._later(lease, f"the provider refused: {reply.reason}")
            return False
        try:
            signature = Signature.from_string(reply.signature)
        except ValueError:
            signature = Signature.default()
        if not signature.verify(Pubkey.from_string(provider), to_bytes_versioned(message)):
            await self._later(lease, "the provider's signature does not verify")
            return False
        # The provider pays the fee, so its signature is the transaction's: noted before it
        # is sent, whoever finds the escrow closed later can tell whether this closed it.
        await self.store.note_settlement_attempt(lease.id, self.owner, str(signature))
        try:
            landed = await self.escrow.submit(
                message,
                [self.arbiter, Presigner(terms.provider, signature)],
                what=f"settling lease {lease.id}",
            )
        except TransactionFailed as exc:
            if await self._read(self.escrow.recoverable_state(terms)) is None:
                return await self._closed(lease, str(signature), problem)
            if problem is not None:
                # Arbiter + provider can no longer move this escrow: nothing to recover.
                await self._unrecoverable(
                    lease, f"{problem}; arbiter and provider cannot settle it ({exc})"
                )
                return True
            await self._later(lease, str(exc))
            return False
        self.stats.settled += 1
        await self._done(lease, str(landed), amount, 2 * FEE_PER_SIGNATURE)
        self.log.info(
            "lease %s settled: %d lamports to the provider (%s)", lease.id, amount, landed
        )
        return True

    async def _closed(self, lease: LeaseRecord, attempted: str | None, problem: str | None) -> bool:
        """The escrow is closed (or no longer a token account arbiter + provider could move).
        Done if a settlement of ours closed it (``attempted``: the transaction this row last
        submitted), with what that transaction paid; else ``failed``, nothing recorded as
        paid. Returns True: the row is final either way."""
        terms = self.billing.terms(lease)
        if attempted is not None:
            try:
                noted = Signature.from_string(attempted)
            except ValueError:
                noted = None
            closing = (
                None
                if noted is None
                else await self._read(self.escrow.closing_transaction(terms, noted))
            )
            if closing is not None:
                self.stats.found_closed += 1
                await self._done(lease, attempted, closing.paid_to_provider, closing.fee)
                return True
        why = problem or f"escrow {terms.escrow} was closed"
        await self._unrecoverable(
            lease,
            f"{why}, by no settlement this coordinator submitted: nothing was paid to the "
            f"provider from it (a refund is recorded when its signature is posted to "
            f"POST /api/v1/leases/{lease.id}/refund)",
        )
        return True

    async def _unrecoverable(self, lease: LeaseRecord, error: str) -> None:
        self.stats.unrecoverable += 1
        self.stats.last_error = (lease.id, error, self.clock())
        self.log.warning("lease %s: settlement failed: %s", lease.id, error)
        await self.store.fail_settlement(lease.id, error=error, at=_utc(self.clock()))

    async def _read(self, call: Awaitable[_T]) -> _T:
        """A ledger read, bounded like the billing service's."""
        try:
            return await asyncio.wait_for(call, self.billing.ledger_timeout)
        except asyncio.TimeoutError:
            raise PaymentError(
                f"the Solana ledger did not answer within {self.billing.ledger_timeout:g} s"
            ) from None

    async def ask(self, provider: str, request: SignSettlement) -> SettlementReply | None:
        """Send ``request`` to the provider linked here; its answer, or None after
        ``reply_timeout``."""
        future: asyncio.Future[SettlementReply] = asyncio.get_running_loop().create_future()
        self._replies[request.lease] = (provider, future)
        try:
            self.registry.deliver(provider, request, ttl=0)
            return await asyncio.wait_for(future, self.reply_timeout)
        except asyncio.TimeoutError:
            return None
        finally:
            self._replies.pop(request.lease, None)

    def reply(self, provider: str, reply: SettlementReply) -> None:
        """A provider's ``settlement_signature`` / ``settlement_refused`` (from its link)."""
        waiting = self._replies.get(reply.lease)
        if waiting is None or waiting[0] != provider:
            self.log.info("ignoring an unexpected %s from %s", reply.type, provider)
            return
        if not waiting[1].done():
            waiting[1].set_result(reply)

    async def _done(self, lease: LeaseRecord, signature: str | None, amount: int, fee: int) -> None:
        await self.store.finish_settlement(
            lease.id,
            signature=signature,
            amount_lamports=amount,
            fee_lamports=fee,
            at=_utc(self.clock()),
        )

    async def _later(
        self, lease: LeaseRecord, error: str, *, kind: SettlementKind | None = None
    ) -> None:
        now = self.clock()
        self.stats.failed_attempts += 1
        self.stats.last_error = (lease.id, error, now)
        await self.store.retry_settlement(
            lease.id,
            self.owner,
            error=error,
            next_attempt_at=_utc(now) + timedelta(seconds=self._backoff),
            kind=kind,
            at=_utc(now),
        )
