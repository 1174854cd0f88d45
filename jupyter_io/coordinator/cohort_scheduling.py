"""Scheduling for cohorts at the rush: the queue, reservations and time rules, wired to the
coordinator (issue 14.3).

:class:`CohortScheduling` owns the three parts and the events that drive them:

* the queue (:mod:`~jupyter_io.coordinator.cohort_queue`): a cohort request that finds no
  capacity (:class:`~jupyter_io.coordinator.scheduler.NoCapacity`) is queued by
  :meth:`CohortScheduling.enqueue` (the 202); a lease that ends, a provider that links and a
  reservation window that opens or closes serve the queue again;
* reservations (:mod:`~jupyter_io.coordinator.cohort_reservations`): holds recounted when a
  cohort lease starts or ends;
* time rules (:mod:`~jupyter_io.coordinator.cohort_limits`): idle stop and max length.

The lease itself is made by ``lease_for(student, cohort, request)``, the same path as a
direct cohort request (membership, quota and concurrency checked again at serve time: a
student removed while waiting is not served); the coordinator sets it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

from solders.pubkey import Pubkey

from ..cohorts import COHORT_ENDED, REMOVED_FROM_COHORT, week_start
from ..errors import JupyterIOError
from ..queue_tickets import QueuePlace
from .cohort_limits import PARTY_PROVIDER, PARTY_USER, CohortLimits, SessionRules
from .cohort_queue import (
    DEFAULT_MAX_PER_COHORT,
    CohortQueue,
    QueueService,
    Served,
    Ticket,
    TicketState,
)
from .cohort_reservations import Reservations
from .registry import Registry
from .scheduler import NoCapacity, OfferIndex
from .store import LeaseRecord, Store

__all__ = ["CohortScheduling", "LeaseFor", "TicketGone"]

#: ``lease_for(student, cohort_record, request)``: lease for a cohort student now; returns
#: the grant (its ``to_json()`` and ``lease.id``), raises :class:`NoCapacity` when full.
LeaseFor = Callable[[str, Any, Any], Awaitable[Any]]


class TicketGone(JupyterIOError):
    """The ticket expired or was cancelled (410): ``str()`` is the reason."""


class CohortScheduling:
    """The queue, reservations and time rules of every cohort (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        registry: Registry,
        index: OfferIndex,
        *,
        max_queue_per_cohort: int = DEFAULT_MAX_PER_COHORT,
        warning_seconds: float = 60.0,
        clock: Callable[[], float] = time.time,
        log: logging.Logger | None = None,
    ) -> None:
        self.store = store
        self.registry = registry
        self.index = index
        self.clock = clock
        self.log = log or logging.getLogger("jupyter_io.coordinator")
        self.queue = CohortQueue(per_cohort=max_queue_per_cohort)
        self.service = QueueService(self.queue, self._attempt, clock=clock, log=self.log)
        self.reservations = Reservations(
            store, index, on_change=self.service.kick, clock=clock, log=self.log
        )
        self.limits = CohortLimits(
            store, registry, self._rules, warning=warning_seconds, clock=clock, log=self.log
        )
        #: Set by the coordinator: how a cohort lease is made (see the module docstring),
        #: and how a request is checked without leasing (membership, term, quota, ...).
        self.lease_for: LeaseFor | None = None
        self.check: Callable[[Pubkey, str, Any], Awaitable[Any]] | None = None
        #: cohort id -> its ``max_session_seconds`` as last read (the polls' estimate).
        self._max_session: dict[str, float | None] = {}

    async def start(self) -> None:
        """Subscribe to the registry's events, load reservations, watch live cohort leases."""
        registry = self.registry
        registry.lease_listeners.append(self._lease_gone)
        registry.activation_listeners.append(self._lease_active)
        registry.link_listeners.append(self._provider_linked)
        registry.creation_listeners.append(self.lease_created)
        registry.usage_listeners.append(self._usage)
        for lease in await self.store.live_leases():
            if lease.cohort_id is not None:
                started = (lease.active_at or lease.requested_at).timestamp()
                self.service.lease_started(lease.cohort_id, lease.id, started)
        await self.reservations.start()
        await self.limits.start()

    async def stop(self) -> None:
        registry = self.registry
        for listeners, fn in (
            (registry.lease_listeners, self._lease_gone),
            (registry.activation_listeners, self._lease_active),
            (registry.link_listeners, self._provider_linked),
            (registry.creation_listeners, self.lease_created),
            (registry.usage_listeners, self._usage),
        ):
            if fn in listeners:
                listeners.remove(fn)  # type: ignore[arg-type]
        await self.service.stop()
        await self.limits.stop()
        await self.reservations.stop()

    # -- events ------------------------------------------------------------------------------

    def _lease_gone(self, lease_id: str, reason: str) -> None:
        self.service.lease_ended(lease_id)  # serves the queue
        self.reservations.lease_changed(None)

    def _lease_active(self, lease: LeaseRecord) -> None:
        if lease.cohort_id is not None:
            started = (lease.active_at or lease.requested_at).timestamp()
            self.service.lease_started(lease.cohort_id, lease.id, started)

    def _provider_linked(self, pubkey: str) -> None:
        self.service.kick()

    def _usage(self, usage: Any) -> None:
        if usage.idle_seconds is not None:
            self.limits.activity(usage.lease, PARTY_PROVIDER, usage.idle_seconds)

    def user_idle(self, lease_id: str, idle_seconds: int | None) -> None:
        """The lease's user acknowledged usage with ``idle_seconds`` (None: not reported)."""
        if idle_seconds is not None:
            self.limits.activity(lease_id, PARTY_USER, idle_seconds)

    def notice(self, lease: LeaseRecord) -> dict[str, Any]:
        """The lease JSON's ``warnings`` and ``ends_at`` from the time rules."""
        return self.limits.view(lease.id)

    def idle_seconds(self, lease_id: str) -> float | None:
        """How long the lease has been idle as its parties report (None: unknown)."""
        return self.limits.idle_seconds(lease_id)

    def lease_created(self, lease: LeaseRecord) -> None:
        """A cohort lease was granted (directly or from the queue): it holds a GPU now."""
        if lease.cohort_id is not None:
            self.service.lease_started(lease.cohort_id, lease.id, self.clock())
            self.reservations.lease_changed(lease.cohort_id)

    # -- the queue ---------------------------------------------------------------------------

    def busy(self, cohort_id: str) -> bool:
        """Whether students of the cohort wait in its queue (a new request queues too)."""
        return self.queue.waiting_count(cohort_id) > 0

    async def take_turn(
        self, user: Pubkey, cohort_id: str, request: Any
    ) -> tuple[int, dict[str, Any]]:
        """A request while others of the class wait: checked like any (the cohort's errors
        raise), then queued in fair-share order rather than handed a GPU another student
        waits for: ``(202, {"queued": ...})`` at once; the serving pass it starts may serve
        it before its first poll."""
        if self.check is None or self.lease_for is None:
            raise TicketGone("this coordinator does not queue cohort requests")
        cohort, _ = await self.check(user, cohort_id, request)
        return 202, await self.queue_request(str(user), cohort_id, request, cohort=cohort)

    async def queue_request(
        self, student: str, cohort_id: str, request: Any, *, cohort: Any = None
    ) -> dict[str, Any]:
        """Queue a cohort request the scheduler found no capacity for: the 202's body
        (``cohort``: its record, when the caller read it already). Raises
        :class:`~.cohort_queue.TooManyTickets` / :class:`~.cohort_queue.QueueFull`."""
        if cohort is None:
            cohort = await self.store.get_cohort(cohort_id)
        if cohort is None:
            raise TicketGone(f"no class {cohort_id}")
        live = await self.store.cohort_live_leases(cohort_id, student=student)
        ticket = await self.enqueue(student, cohort, request, live_kernels=len(live))
        return self.ticket_json(ticket, self._max_session.get(cohort_id))

    def max_session(self, cohort_id: str) -> float | None:
        """The cohort's max session length as last read (for a poll's estimate)."""
        return self._max_session.get(cohort_id)

    async def enqueue(
        self, student: str, cohort: Any, request: Any, *, live_kernels: int
    ) -> Ticket:
        """Queue ``student``'s request for ``cohort`` (a ``CohortRecord``): fair-share key =
        their GPU-seconds this week. Raises :class:`~.cohort_queue.TooManyTickets` /
        :class:`~.cohort_queue.QueueFull` (429s). Serving starts at once (capacity may have
        freed since the request was refused)."""
        self._max_session[cohort.id] = cohort.max_session_seconds
        now = self.clock()
        since = week_start(datetime.fromtimestamp(now, tz=timezone.utc))
        usage = await self.store.cohort_usage(cohort.id, since, student=student)
        ticket = self.queue.add(
            cohort.id,
            student,
            request,
            usage=usage.get(student, 0),
            now=now,
            max_wait=float(cohort.queue_max_wait_seconds),
            allowance=max(0, cohort.max_concurrent_per_student - live_kernels),
            gpus=getattr(request, "gpus", 1),
        )
        self.log.info(
            "cohort %s: %s queued (ticket %s, place %d)",
            cohort.id,
            student,
            ticket.id,
            self.queue.place(ticket),
        )
        self.service.rearm_expiry()
        self.service.kick()
        return ticket

    def ticket_json(self, ticket: Ticket, max_session: float | None) -> dict[str, Any]:
        """``{"queued": {...}}`` while waiting, ``{"lease": grant}`` once served; raises
        :class:`TicketGone` (a 410) when it expired or was cancelled."""
        if ticket.state is TicketState.SERVED:
            return {"lease": ticket.grant}
        if ticket.state is not TicketState.WAITING:
            raise TicketGone(ticket.reason or f"queue ticket {ticket.id} is {ticket.state.value}")
        place = QueuePlace(
            ticket=ticket.id,
            cohort=ticket.cohort,
            place=self.queue.place(ticket),
            estimated_wait_seconds=self.service.estimate(ticket, max_session),
            expires_at=ticket.expires_at,
            waiting=self.queue.waiting_count(ticket.cohort),
        )
        return {"queued": place.to_json()}

    def cancel(self, ticket: Ticket) -> bool:
        """The student withdrew the ticket."""
        done = self.queue.cancel(ticket, self.clock(), "cancelled by the student")
        self.service.rearm_expiry()
        return done

    def drop(self, cohort: str, reason: str, student: str | None = None) -> int:
        """Cancel a cohort's tickets (one student's): removed from the class, class ended."""
        dropped = self.queue.drop(cohort, self.clock(), reason, student)
        self.service.rearm_expiry()
        return dropped

    def student_removed(self, cohort: str, student: str) -> None:
        """The student left the class: their tickets go."""
        self.drop(cohort, REMOVED_FROM_COHORT, student)

    def cohort_ended(self, cohort: str) -> None:
        """The class's term ended: its queue is emptied."""
        self.drop(cohort, COHORT_ENDED)

    def queue_view(self, cohort: str) -> list[dict[str, Any]]:
        """The cohort's queue for its instructors' dashboard, first served first."""
        return [
            {
                "ticket": t.id,
                "student": t.student,
                "place": place,
                "usage_gpu_seconds": t.usage,
                "queued_at": t.created_at,
                "expires_at": t.expires_at,
            }
            for place, t in enumerate(self.queue.waiting(cohort), start=1)
        ]

    async def _attempt(self, ticket: Ticket) -> Served | None:
        if self.lease_for is None:
            return None
        cohort = await self.store.get_cohort(ticket.cohort)
        if cohort is None:
            raise TicketGone("the class no longer exists")
        self._max_session[cohort.id] = cohort.max_session_seconds
        if not self._may_fit(cohort, ticket.request):
            return None  # nothing free for it: no need for the checks' reads
        try:
            grant = await self.lease_for(ticket.student, cohort, ticket.request)
        except NoCapacity:
            return None
        return Served(grant.to_json(), grant.lease.id)

    def _may_fit(self, cohort: Any, request: Any) -> bool:
        """Whether some free GPU of the cohort's types (the one the request names, if any)
        could serve ``request`` now, by the index alone; the full path decides."""
        cap = cohort.max_price_lamports_per_hour
        if request.max_price_lamports_per_hour is not None:
            cap = min(cap, request.max_price_lamports_per_hour)
        types = (request.gpu,) if request.gpu is not None else cohort.gpu_types
        for gpu in types:
            wanted = replace(request, gpu=gpu, max_price_lamports_per_hour=cap)
            if self.index.candidates(wanted, limit=1, cohort=cohort.id):
                return True
        return False

    async def _rules(self, cohort_id: str) -> SessionRules | None:
        cohort = await self.store.get_cohort(cohort_id)
        if cohort is None:
            return None
        return SessionRules(cohort.idle_timeout_seconds, cohort.max_session_seconds)
