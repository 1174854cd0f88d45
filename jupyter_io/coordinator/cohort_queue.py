"""A cohort's start queue: fair share at the rush (issue 14.3).

When a cohort lease request finds no capacity among the cohort's GPU types it is queued
instead of refused: ``202 {"queued": {"ticket", "place", "estimated_wait_seconds",
"expires_at"}}``. Two parts:

* :class:`CohortQueue` is pure (no I/O, no clock: every method takes ``now``): the tickets,
  their order, their bounds and their ends. Order is **fair share**: the student who used the
  fewest GPU-seconds this week goes first, ties to the earlier ticket. Bounds: one ticket per
  request; a student holds at most ``allowance`` waiting tickets (their max concurrent
  kernels less the kernels they run); a cohort queues at most ``per_cohort`` tickets. A ticket
  not served within the cohort's ``queue_max_wait_seconds`` expires with the reason.
* :class:`QueueService` serves the queue on events: a lease that ends, a provider that links
  or changes its offers, a reservation window that opens or closes (:meth:`QueueService.kick`).
  It then offers the freed capacity to the waiting tickets in order (a ticket whose request
  cannot be served, another GPU type say, does not block the next: no GPU stands idle while
  someone in the cohort waits for one it could use). There is no polling loop: one timer for
  the next expiry.

The wait estimate is :func:`estimate_wait` (formula there and in ``docs/cohorts.md``).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import secrets
import statistics
import time
from bisect import bisect_left, insort
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import JupyterIOError, LeaseError

__all__ = [
    "DEFAULT_MAX_PER_COHORT",
    "DEFAULT_RETAIN_SECONDS",
    "EXPIRED_REASON",
    "CohortQueue",
    "NotTicketOwner",
    "QueueFull",
    "QueueService",
    "Served",
    "Ticket",
    "TicketNotFound",
    "TicketState",
    "TooManyTickets",
    "estimate_wait",
    "expected_session_seconds",
    "new_ticket_id",
]

#: Tickets one cohort may hold waiting at once (its ``queue`` cap).
DEFAULT_MAX_PER_COHORT = 2000
#: Seconds a served, expired or cancelled ticket is kept for its owner to read.
DEFAULT_RETAIN_SECONDS = 600.0
#: Session lengths remembered per cohort for the wait estimate.
RECENT_SESSIONS = 50
#: The expected session length when nothing better is known: an hour.
DEFAULT_SESSION_SECONDS = 3600.0
#: What an expired ticket's 410 says (``{wait}`` is the cohort's ``queue_max_wait_seconds``).
EXPIRED_REASON = (
    "no GPU of the class's types came free within {wait}; try again later, or ask the "
    "instructor to reserve GPUs for the session"
)


class TicketState(str, enum.Enum):
    """``waiting`` → ``served`` (a lease was granted), ``expired`` or ``cancelled``."""

    WAITING = "waiting"
    SERVED = "served"
    EXPIRED = "expired"
    CANCELLED = "cancelled"


class TicketNotFound(LeaseError):
    """No such ticket (404): it never existed or was forgotten after its retention."""


class NotTicketOwner(LeaseError):
    """The ticket belongs to another student (403)."""


class QueueFull(LeaseError):
    """The cohort's queue holds its maximum of tickets (429 ``queue_full``)."""

    code = "queue_full"


class TooManyTickets(LeaseError):
    """The student already waits with as many tickets as they may run kernels (429
    ``too_many_tickets``)."""

    code = "too_many_tickets"


def new_ticket_id() -> str:
    """A fresh ticket id: ``"q_"`` and 16 URL-safe random characters."""
    return "q_" + secrets.token_urlsafe(12)


@dataclass(slots=True)
class Ticket:
    """One queued lease request of one student."""

    id: str
    cohort: str
    student: str
    #: The lease request, as the service will schedule it (opaque to the queue).
    request: Any
    #: The student's GPU-seconds this week when they queued: the fair-share key.
    usage: float
    seq: int
    created_at: float
    expires_at: float
    gpus: int = 1
    state: TicketState = TicketState.WAITING
    #: The lease grant's JSON once served.
    grant: dict[str, Any] | None = None
    #: Why it expired or was cancelled.
    reason: str | None = None
    done_at: float | None = None

    @property
    def key(self) -> tuple[float, int]:
        """Queue order: fewer GPU-seconds this week first, then the earlier ticket."""
        return (self.usage, self.seq)


class CohortQueue:
    """Every cohort's waiting tickets and the recently finished ones (pure; see the module
    docstring). Memory is bounded by ``per_cohort`` per cohort and ``total`` in all."""

    def __init__(
        self,
        *,
        per_cohort: int = DEFAULT_MAX_PER_COHORT,
        total: int = 20 * DEFAULT_MAX_PER_COHORT,
        retain: float = DEFAULT_RETAIN_SECONDS,
    ) -> None:
        if per_cohort < 1 or total < 1 or retain < 0:
            raise ValueError("queue caps must be positive and the retention not negative")
        self.per_cohort = per_cohort
        self.total = total
        self.retain = retain
        self._tickets: dict[str, Ticket] = {}
        #: cohort -> sorted [(usage, seq, ticket id)] of its waiting tickets.
        self._order: dict[str, list[tuple[float, int, str]]] = {}
        #: (cohort, student) -> ids of their waiting tickets.
        self._by_student: dict[tuple[str, str], set[str]] = {}
        #: Finished tickets in the order they finished (for :meth:`purge`).
        self._done: deque[str] = deque()
        self._seq = 0

    # -- reading ---------------------------------------------------------------------------

    def get(self, ticket_id: str) -> Ticket | None:
        return self._tickets.get(ticket_id)

    def owned(self, ticket_id: str, student: str) -> Ticket:
        """``student``'s ticket; :class:`TicketNotFound` or :class:`NotTicketOwner`."""
        ticket = self._tickets.get(ticket_id)
        if ticket is None:
            raise TicketNotFound(
                f"no queue ticket {ticket_id!r} (it was served, expired or cancelled over "
                f"{self.retain:g} s ago, or never existed); request the lease again"
            )
        if ticket.student != student:
            raise NotTicketOwner(f"queue ticket {ticket_id} belongs to another student")
        return ticket

    def waiting(self, cohort: str) -> list[Ticket]:
        """The cohort's waiting tickets, first served first."""
        return [self._tickets[i] for _, _, i in self._order.get(cohort, ())]

    def cohorts(self) -> list[str]:
        """Cohorts with a ticket waiting."""
        return list(self._order)

    def place(self, ticket: Ticket) -> int:
        """1-based place of a waiting ticket in its cohort's queue (0 when not waiting)."""
        if ticket.state is not TicketState.WAITING:
            return 0
        order = self._order.get(ticket.cohort, [])
        return bisect_left(order, (ticket.usage, ticket.seq, ticket.id)) + 1

    def waiting_count(self, cohort: str) -> int:
        """How many tickets wait in ``cohort``'s queue."""
        return len(self._order.get(cohort, ()))

    def waiting_of(self, cohort: str, student: str) -> int:
        """How many tickets ``student`` has waiting in ``cohort``."""
        return len(self._by_student.get((cohort, student), ()))

    def __len__(self) -> int:
        return sum(len(order) for order in self._order.values())

    def next_expiry(self) -> float | None:
        """The earliest ``expires_at`` of a waiting ticket (None when none waits)."""
        return min(
            (self._tickets[i].expires_at for order in self._order.values() for _, _, i in order),
            default=None,
        )

    # -- writing ---------------------------------------------------------------------------

    def add(
        self,
        cohort: str,
        student: str,
        request: Any,
        *,
        usage: float,
        now: float,
        max_wait: float,
        allowance: int,
        gpus: int = 1,
    ) -> Ticket:
        """Queue one request. Raises :class:`TooManyTickets` when the student already waits
        with ``allowance`` tickets, :class:`QueueFull` at the cohort's or the coordinator's
        cap; nothing is queued then."""
        if max_wait <= 0:
            raise ValueError("max_wait must be positive")
        mine = self.waiting_of(cohort, student)
        if mine >= allowance:
            raise TooManyTickets(
                f"you already wait in this class's queue with {mine} request(s), as many as "
                f"the kernels you may run at once; wait for one, or cancel it"
                if mine
                else "you run as many kernels as this class allows at once; stop one first"
            )
        order = self._order.get(cohort, [])
        if len(order) >= self.per_cohort or len(self) >= self.total:
            raise QueueFull(
                f"the class's queue is full ({len(order)} requests wait); try again in a "
                f"few minutes"
            )
        self._seq += 1
        ticket = Ticket(
            id=new_ticket_id(),
            cohort=cohort,
            student=student,
            request=request,
            usage=float(usage),
            seq=self._seq,
            created_at=now,
            expires_at=now + max_wait,
            gpus=gpus,
        )
        self._tickets[ticket.id] = ticket
        insort(self._order.setdefault(cohort, []), (ticket.usage, ticket.seq, ticket.id))
        self._by_student.setdefault((cohort, student), set()).add(ticket.id)
        return ticket

    def serve(self, ticket: Ticket, grant: dict[str, Any], now: float) -> None:
        """The ticket got its lease: it leaves the queue, its owner reads ``grant``."""
        self._finish(ticket, TicketState.SERVED, now)
        ticket.grant = grant

    def cancel(self, ticket: Ticket, now: float, reason: str = "cancelled") -> bool:
        """Take a waiting ticket out of the queue (False if it was no longer waiting)."""
        if ticket.state is not TicketState.WAITING:
            return False
        self._finish(ticket, TicketState.CANCELLED, now)
        ticket.reason = reason
        return True

    def expire_due(self, now: float, describe: Callable[[Ticket], str]) -> list[Ticket]:
        """Expire every waiting ticket whose time is up; ``describe`` gives each its reason."""
        due = [
            self._tickets[i]
            for order in self._order.values()
            for _, _, i in order
            if self._tickets[i].expires_at <= now
        ]
        for ticket in due:
            self._finish(ticket, TicketState.EXPIRED, now)
            ticket.reason = describe(ticket)
        return due

    def drop(self, cohort: str, now: float, reason: str, student: str | None = None) -> int:
        """Cancel the cohort's waiting tickets (only ``student``'s when given): the cohort
        ended or the student was removed. Returns how many."""
        victims = [t for t in self.waiting(cohort) if student is None or t.student == student]
        for ticket in victims:
            self.cancel(ticket, now, reason)
        return len(victims)

    def purge(self, now: float) -> int:
        """Forget finished tickets older than the retention. Returns how many."""
        forgotten = 0
        while self._done:
            ticket = self._tickets.get(self._done[0])
            if ticket is not None and (ticket.done_at or 0.0) + self.retain > now:
                break
            self._done.popleft()
            if ticket is not None:
                del self._tickets[ticket.id]
                forgotten += 1
        return forgotten

    def _finish(self, ticket: Ticket, state: TicketState, now: float) -> None:
        if ticket.state is TicketState.WAITING:
            order = self._order[ticket.cohort]
            del order[bisect_left(order, (ticket.usage, ticket.seq, ticket.id))]
            if not order:
                del self._order[ticket.cohort]
            mine = self._by_student[(ticket.cohort, ticket.student)]
            mine.discard(ticket.id)
            if not mine:
                del self._by_student[(ticket.cohort, ticket.student)]
        ticket.state = state
        ticket.done_at = now
        ticket.request = None  # nothing more to schedule
        self._done.append(ticket.id)


# --------------------------------------------------------------------------------------------
# The wait estimate


def expected_session_seconds(max_session: float | None, recent: Sequence[float]) -> float:
    """How long a session of the cohort is expected to last: the median of its recent
    session lengths, at most ``max_session``; ``max_session`` (or an hour when the cohort
    sets none) when no session ended yet."""
    cap = max_session if max_session and max_session > 0 else None
    if recent:
        typical = float(statistics.median(recent))
        return min(typical, cap) if cap is not None else typical
    return cap if cap is not None else DEFAULT_SESSION_SECONDS


def estimate_wait(
    place: int,
    elapsed: Iterable[float],
    *,
    expected: float,
    max_session: float | None,
) -> float:
    """Seconds until the ticket at ``place`` (1-based) is expected to be served.

    Each of the ``n`` live leases that could free a GPU for it has run ``elapsed_i``
    seconds; it is expected to end in ``r_i = min(max(expected - elapsed_i, 0),
    max_session - elapsed_i)`` seconds (a lease past the expected length may end any
    moment; none outlives the max session). With ``r`` sorted ascending, the ticket at
    place ``p`` gets the GPU freed by the ``p``-th end: ``r[(p-1) mod n] +
    floor((p-1) / n) * expected`` (after the ``n`` live leases, each freed GPU serves one
    more session of the expected length per round). With no live lease the estimate is
    ``p * expected`` (a GPU must first come back).
    """
    if place < 1:
        return 0.0
    cap = max_session if max_session and max_session > 0 else math.inf
    remaining = sorted(max(0.0, min(expected - e, cap - e)) for e in elapsed)
    n = len(remaining)
    if n == 0:
        return place * expected
    rounds, index = divmod(place - 1, n)
    return remaining[index] + rounds * expected


# --------------------------------------------------------------------------------------------
# The service


@dataclass(frozen=True, slots=True)
class Served:
    """What the service's ``lease`` callback returns for a served ticket."""

    grant_json: dict[str, Any]
    lease_id: str


@dataclass(slots=True)
class _CohortTimes:
    """Per cohort: its live leases' start times and its recent session lengths."""

    started: dict[str, float] = field(default_factory=dict)  # lease id -> start (Unix s)
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_SESSIONS))


#: ``lease(ticket)``: try to lease for the ticket now; a :class:`Served`, or None when there
#: is no capacity for it yet. A :class:`~jupyter_io.errors.JupyterIOError` (the student left
#: the class, reached their quota, ...) cancels the ticket with its message.
LeaseAttempt = Callable[[Ticket], Awaitable[Served | None]]


class QueueService:
    """Serves the cohort queue on events (see the module docstring).

    ``lease`` tries one ticket; ``cohort_limits(cohort)`` returns ``(max_session_seconds,
    queue_max_wait_seconds)`` for the estimate and the expiry. Call :meth:`kick` whenever
    capacity may have freed, :meth:`lease_started` / :meth:`lease_ended` for the estimate's
    inputs, :meth:`stop` at shutdown.
    """

    def __init__(
        self,
        queue: CohortQueue,
        lease: LeaseAttempt,
        *,
        clock: Callable[[], float] = time.time,
        log: logging.Logger | None = None,
    ) -> None:
        self.queue = queue
        self._lease = lease
        self.clock = clock
        self.log = log or logging.getLogger("jupyter_io.coordinator")
        self._times: dict[str, _CohortTimes] = {}
        self._lease_cohort: dict[str, str] = {}
        self._dirty = False
        self._pump: asyncio.Task[None] | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self._stopped = False
        #: Tickets served, expired (for the status endpoint and the benchmark).
        self.served = 0
        self.expired = 0
        #: ``(ticket)`` callbacks run when a ticket is served or expires (tests, listeners).
        self.listeners: list[Callable[[Ticket], None]] = []
        self._max_wait_text: Callable[[Ticket], str] = lambda t: EXPIRED_REASON.format(
            wait=_minutes(t.expires_at - t.created_at)
        )

    # -- the estimate's inputs -------------------------------------------------------------

    def lease_started(self, cohort: str, lease_id: str, started_at: float) -> None:
        """A cohort lease now holds a GPU (from ``started_at``, Unix seconds)."""
        self._times.setdefault(cohort, _CohortTimes()).started[lease_id] = started_at
        self._lease_cohort[lease_id] = cohort

    def lease_ended(self, lease_id: str) -> None:
        """A lease ended: its cohort's GPU may serve the queue; its length is remembered."""
        cohort = self._lease_cohort.pop(lease_id, None)
        if cohort is not None:
            times = self._times[cohort]
            started = times.started.pop(lease_id, None)
            if started is not None:
                times.recent.append(max(0.0, self.clock() - started))
        self.kick()

    def estimate(self, ticket: Ticket, max_session: float | None) -> float:
        """Seconds the waiting ``ticket`` is expected to wait (:func:`estimate_wait`)."""
        times = self._times.get(ticket.cohort) or _CohortTimes()
        now = self.clock()
        expected = expected_session_seconds(max_session, list(times.recent))
        elapsed = [now - started for started in times.started.values()]
        wait = estimate_wait(
            self.queue.place(ticket), elapsed, expected=expected, max_session=max_session
        )
        return round(min(wait, max(0.0, ticket.expires_at - now)), 1)

    # -- serving ---------------------------------------------------------------------------

    def kick(self) -> None:
        """Capacity may have freed: serve the queues (coalesced: one pass at a time)."""
        if self._stopped or not len(self.queue):
            return
        self._dirty = True
        if self._pump is None or self._pump.done():
            self._pump = asyncio.get_running_loop().create_task(self._serve_all(), name="queue")

    async def serve_now(self) -> None:
        """Serve the queues and return when the pass is over (tests, a fresh ticket)."""
        self.kick()
        while self._pump is not None and not self._pump.done():
            await asyncio.shield(self._pump)

    def rearm_expiry(self) -> None:
        """(Re)set the one timer, for the next ticket to expire."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        due = self.queue.next_expiry()
        if due is None or self._stopped:
            return
        loop = asyncio.get_running_loop()
        self._expiry = loop.call_later(max(0.0, due - self.clock()), self._expire)

    def _expire(self) -> None:
        self._expiry = None
        now = self.clock()
        for ticket in self.queue.expire_due(now, self._max_wait_text):
            self.expired += 1
            self.log.info("queue ticket %s of %s expired", ticket.id, ticket.student)
            self._tell(ticket)
        self.queue.purge(now)
        self.rearm_expiry()

    async def _serve_all(self) -> None:
        while self._dirty and not self._stopped:
            self._dirty = False
            for cohort in self.queue.cohorts():
                await self._serve_cohort(cohort)
        self.rearm_expiry()

    async def _serve_cohort(self, cohort: str) -> None:
        """Offer capacity to the cohort's tickets in order. A ticket that finds none leaves
        its request's shape marked full for this pass (the tickets behind it asking the same
        are skipped, so a pass costs one failed attempt per shape, not per ticket)."""
        full: set[Any] = set()
        for ticket in self.queue.waiting(cohort):
            if ticket.state is not TicketState.WAITING:
                continue
            shape = _shape(ticket.request)
            if shape in full:
                continue
            try:
                served = await self._lease(ticket)
            except JupyterIOError as exc:
                if ticket.state is TicketState.WAITING:
                    self.queue.cancel(ticket, self.clock(), str(exc))
                    self._tell(ticket)
                continue
            if served is None:
                full.add(shape)
                continue
            if ticket.state is not TicketState.WAITING:
                continue  # cancelled while the lease was made: the claim window frees it
            self.queue.serve(ticket, served.grant_json, self.clock())
            self.served += 1
            self._tell(ticket)

    def _tell(self, ticket: Ticket) -> None:
        for listener in list(self.listeners):
            try:
                listener(ticket)
            except Exception:
                self.log.exception("queue listener failed")

    async def stop(self) -> None:
        """No more serving; wait for a pass in progress."""
        self._stopped = True
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if self._pump is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self._pump


def _shape(request: Any) -> Any:
    """What makes two requests equally servable (the request itself when hashable)."""
    try:
        hash(request)
    except TypeError:
        return id(request)
    return request


def _minutes(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min"
