"""The cohort queue (issue 14.3): fair-share order, bounds, expiry, the wait estimate, and
the service serving it on events. The REST half against a real coordinator is at the end."""

from __future__ import annotations

import asyncio

import pytest

from jupyter_io.coordinator.cohort_queue import (
    CohortQueue,
    QueueFull,
    QueueService,
    Served,
    Ticket,
    TicketState,
    TooManyTickets,
    estimate_wait,
    expected_session_seconds,
)
from jupyter_io.errors import LeaseError

C = "c_AAAAAAAAAAAAAAAA"


def _add(queue: CohortQueue, student: str, usage: float, now: float = 0.0, **kw: object) -> Ticket:
    kw.setdefault("max_wait", 600.0)
    kw.setdefault("allowance", 1)
    return queue.add(C, student, ("T4", 1), usage=usage, now=now, **kw)  # type: ignore[arg-type]


def test_the_student_who_used_least_this_week_goes_first_ties_by_ticket() -> None:
    queue = CohortQueue()
    heavy = _add(queue, "heavy", 7200.0)
    light = _add(queue, "light", 60.0)
    first_fresh = _add(queue, "fresh1", 0.0)
    second_fresh = _add(queue, "fresh2", 0.0)
    assert [t.student for t in queue.waiting(C)] == ["fresh1", "fresh2", "light", "heavy"]
    assert [queue.place(t) for t in (first_fresh, second_fresh, light, heavy)] == [1, 2, 3, 4]
    queue.cancel(first_fresh, now=1.0)
    assert queue.place(second_fresh) == 1 and queue.place(heavy) == 3
    assert queue.place(first_fresh) == 0


def test_a_student_holds_no_more_tickets_than_their_allowance() -> None:
    queue = CohortQueue()
    _add(queue, "alice", 0.0, allowance=2)
    _add(queue, "alice", 0.0, allowance=2)
    for _ in range(50):  # a flood
        with pytest.raises(TooManyTickets):
            _add(queue, "alice", 0.0, allowance=2)
    assert queue.waiting_of(C, "alice") == 2 and len(queue) == 2
    with pytest.raises(TooManyTickets, match="stop one first"):
        _add(queue, "bob", 0.0, allowance=0)  # bob runs his max already


def test_the_cohort_queue_is_capped() -> None:
    queue = CohortQueue(per_cohort=3)
    for i in range(3):
        _add(queue, f"s{i}", 0.0)
    with pytest.raises(QueueFull):
        _add(queue, "late", 0.0)
    assert len(queue) == 3


def test_tickets_expire_with_a_reason_and_are_forgotten_after_the_retention() -> None:
    queue = CohortQueue(retain=100.0)
    early = _add(queue, "a", 0.0, now=0.0, max_wait=10.0)
    later = _add(queue, "b", 0.0, now=5.0, max_wait=10.0)
    assert queue.next_expiry() == 10.0
    assert queue.expire_due(9.9, lambda t: "late") == []
    assert queue.expire_due(10.0, lambda t: "late") == [early]
    assert early.state is TicketState.EXPIRED and early.reason == "late"
    assert queue.place(later) == 1 and queue.next_expiry() == 15.0
    assert queue.purge(50.0) == 0 and queue.get(early.id) is early
    assert queue.purge(110.0) == 1 and queue.get(early.id) is None


def test_strangers_cannot_read_a_ticket() -> None:
    queue = CohortQueue()
    ticket = _add(queue, "alice", 0.0)
    assert queue.owned(ticket.id, "alice") is ticket
    with pytest.raises(LeaseError, match="another student"):
        queue.owned(ticket.id, "mallory")
    with pytest.raises(LeaseError, match="no queue ticket"):
        queue.owned("q_nope", "alice")


def test_the_wait_estimate() -> None:
    # Three leases that ran 10, 50 and 70 minutes of an expected hour (max 2 h).
    elapsed = [600.0, 3000.0, 4200.0]
    assert estimate_wait(1, elapsed, expected=3600, max_session=7200) == 0.0  # past expected
    assert estimate_wait(2, elapsed, expected=3600, max_session=7200) == 600.0
    assert estimate_wait(3, elapsed, expected=3600, max_session=7200) == 3000.0
    assert estimate_wait(4, elapsed, expected=3600, max_session=7200) == 3600.0  # next round
    assert estimate_wait(2, [], expected=1800, max_session=None) == 3600.0
    # None outlives the max session, even when the expected length is longer.
    assert estimate_wait(1, [3500.0], expected=5000, max_session=3600) == 100.0
    assert expected_session_seconds(3600, [600, 1200, 9000]) == 1200
    assert expected_session_seconds(1000, [6000]) == 1000
    assert expected_session_seconds(None, []) == 3600.0


async def test_the_service_serves_in_order_on_events_and_skips_full_shapes() -> None:
    queue = CohortQueue()
    free = {"T4": 0, "A100": 1}
    attempts: list[str] = []

    async def lease(ticket: Ticket) -> Served | None:
        gpu = ticket.request[0]
        attempts.append(ticket.student)
        if free[gpu] <= 0:
            return None
        free[gpu] -= 1
        return Served({"lease": f"l-{ticket.student}"}, f"l-{ticket.student}")

    service = QueueService(queue, lease, clock=lambda: 0.0)
    t4 = [queue.add(C, f"s{i}", ("T4", 1), usage=i, now=0.0, max_wait=60, allowance=1)
          for i in range(5)]  # fmt: skip
    a100 = queue.add(C, "z", ("A100", 1), usage=99, now=0.0, max_wait=60, allowance=1)
    await service.serve_now()
    # The T4 head finds none: the other T4 tickets are not tried; the A100 one behind is served.
    assert attempts == ["s0", "z"]
    assert a100.state is TicketState.SERVED and a100.grant == {"lease": "l-z"}
    assert all(t.state is TicketState.WAITING for t in t4)
    free["T4"] = 2
    attempts.clear()
    service.lease_ended("some lease")  # the event
    await service.serve_now()
    assert [t.state for t in t4] == [TicketState.SERVED] * 2 + [TicketState.WAITING] * 3
    assert attempts == ["s0", "s1", "s2"]
    await service.stop()


async def test_the_service_expires_tickets_on_its_timer() -> None:
    queue = CohortQueue()

    async def lease(ticket: Ticket) -> Served | None:
        return None

    expired = asyncio.Event()
    service = QueueService(queue, lease)
    service.listeners.append(lambda t: expired.set())
    loop = asyncio.get_running_loop()
    service.clock = loop.time
    ticket = queue.add(C, "a", ("T4", 1), usage=0, now=loop.time(), max_wait=0.05, allowance=1)
    await service.serve_now()
    await asyncio.wait_for(expired.wait(), 5)
    assert ticket.state is TicketState.EXPIRED
    assert "no GPU of the class's types came free within" in (ticket.reason or "")
    await service.stop()
