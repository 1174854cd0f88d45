"""The cohort queue (issue 14.3): fair-share order, bounds, expiry, the wait estimate, and
the service serving it on events. The REST half against a real coordinator is at the end."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from solders.keypair import Keypair

from jupyter_io.cohort_client import CohortClient
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
from jupyter_io.coordinator.server import CoordinatorServer
from jupyter_io.coordinator_client import (
    CoordinatorClient,
    LeaseGrant,
    LeaseQueued,
    TooManyPendingLeases,
)
from jupyter_io.errors import AuthError, LeaseError
from jupyter_io.queue_tickets import QueuePlace, progress_message
from kernel_provisioner.lease import KernelLease

from .conftest import WAIT, FakeProvider, Starter, gpu_offer

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


# --------------------------------------------------------------------------------------------
# Against a real coordinator: the 202, the ticket endpoint, strangers, floods, expiry, serving


async def _class_with_one_t4(
    start_coordinator: Starter, providers: list[FakeProvider], students: int, **settings: Any
) -> tuple[CoordinatorServer, str, list[CoordinatorClient]]:
    server = await start_coordinator()
    provider = FakeProvider(server.url, [gpu_offer("Tesla T4", count=1)])
    providers.append(provider)
    await provider.connect()
    assert server.registry is not None
    await server.registry.wait_for(lambda: len(server.index) == 1, WAIT)
    instructor = CohortClient(server.url, Keypair(), timeout=WAIT)
    view = await instructor.create(
        name="rush", gpu_types=["T4"], max_price_lamports_per_hour=10**7,
        term_ends_at=time.time() + 86400, **settings,
    )  # fmt: skip
    clients = [CoordinatorClient(server.url, Keypair(), timeout=WAIT) for _ in range(students)]
    await instructor.add_students(view.id, [str(c.keypair.pubkey()) for c in clients])  # type: ignore[union-attr]
    instructor.close()
    return server, view.id, clients


def _served(server: CoordinatorServer) -> asyncio.Queue[Ticket]:
    assert server.cohort_scheduling is not None
    events: asyncio.Queue[Ticket] = asyncio.Queue()
    server.cohort_scheduling.service.listeners.append(events.put_nowait)
    return events


async def test_a_full_class_queues_and_the_freed_gpu_serves_the_head(
    start_coordinator: Starter, providers: list[FakeProvider]
) -> None:
    server, cohort, (alice, bob, carol) = await _class_with_one_t4(start_coordinator, providers, 3)
    events = _served(server)
    try:
        grant = await alice.request_lease("T4", cohort=cohort)
        with pytest.raises(LeaseQueued) as queued_bob:
            await bob.request_lease("T4", cohort=cohort)
        with pytest.raises(LeaseQueued) as queued_carol:
            await carol.request_lease(cohort=cohort)
        bob_place, carol_place = queued_bob.value.place, queued_carol.value.place
        assert (bob_place.place, carol_place.place) == (1, 2)
        assert bob_place.cohort == cohort and bob_place.expires_at > time.time()
        assert carol_place.estimated_wait_seconds >= bob_place.estimated_wait_seconds > 0
        # A stranger (another student) can neither read nor cancel bob's ticket.
        with pytest.raises(AuthError):
            await carol.queue_ticket(bob_place)
        with pytest.raises(AuthError):
            await carol.cancel_queue_ticket(bob_place)
        # A flood by bob does not grow the queue beyond his allowance (1 kernel).
        for _ in range(5):
            with pytest.raises(TooManyPendingLeases) as flood:
                await bob.request_lease("T4", cohort=cohort)
            assert flood.value.code == "too_many_tickets"
        again = await carol.queue_ticket(carol_place)
        assert isinstance(again, QueuePlace) and again.place == 2 and again.waiting == 2
        # Alice ends her kernel: the GPU goes to the head of the queue at once.
        await alice.end_lease(grant.lease)
        served = await asyncio.wait_for(events.get(), WAIT)
        assert served.id == bob_place.ticket
        won = await bob.queue_ticket(bob_place)
        assert isinstance(won, LeaseGrant) and won.gpu == "Tesla T4"
        assert (await carol.queue_ticket(carol_place)).place == 1  # type: ignore[union-attr]
        await carol.cancel_queue_ticket(carol_place)
        with pytest.raises(LeaseError, match="cancelled by the student"):
            await carol.queue_ticket(carol_place)
    finally:
        for client in (alice, bob, carol):
            client.close()


async def test_a_ticket_not_served_in_time_is_refused_with_the_reason(
    start_coordinator: Starter, providers: list[FakeProvider]
) -> None:
    server, cohort, (alice, bob) = await _class_with_one_t4(
        start_coordinator, providers, 2, queue_max_wait_seconds=1
    )
    events = _served(server)
    try:
        await alice.request_lease("T4", cohort=cohort)
        with pytest.raises(LeaseQueued) as queued:
            await bob.request_lease("T4", cohort=cohort)
        expired = await asyncio.wait_for(events.get(), WAIT)
        assert expired.state is TicketState.EXPIRED
        with pytest.raises(LeaseError, match="no GPU of the class's types came free within 1 s"):
            await bob.queue_ticket(queued.value.place)
    finally:
        alice.close()
        bob.close()


async def test_the_provisioner_waits_in_the_queue_and_withdraws_when_cancelled(
    start_coordinator: Starter, providers: list[FakeProvider]
) -> None:
    server, cohort, (alice, bob, carol) = await _class_with_one_t4(start_coordinator, providers, 3)
    assert server.cohort_scheduling is not None and bob.keypair and carol.keypair
    queue = server.cohort_scheduling.queue
    grant = await alice.request_lease("T4", cohort=cohort)
    waits: list[tuple[asyncio.Task[LeaseGrant], QueuePlace]] = []
    leases = [KernelLease(server.url, c.keypair, timeout=WAIT) for c in (bob, carol)]
    try:
        for client, lease in zip((bob, carol), leases, strict=True):
            seen: asyncio.Queue[QueuePlace] = asyncio.Queue()
            lease.on_queue = seen.put_nowait
            with pytest.raises(LeaseQueued) as queued:
                await client.request_lease("T4", cohort=cohort)
            waits.append(
                (asyncio.create_task(lease._wait_in_queue(queued.value.place)), queued.value.place)
            )
            shown = await asyncio.wait_for(seen.get(), WAIT)
            assert progress_message(shown).startswith(f"In the queue: place {len(waits)}, ")
        # Carol's start is cancelled: her ticket is withdrawn, not left to hold a place.
        carol_wait, carol_place = waits[1]
        carol_wait.cancel()
        with pytest.raises(asyncio.CancelledError):
            await carol_wait
        ticket = queue.get(carol_place.ticket)
        assert ticket is not None and ticket.state is TicketState.CANCELLED
        # Alice's kernel ends: Bob's waiting start gets the lease.
        await alice.end_lease(grant.lease)
        bob_grant = await asyncio.wait_for(waits[0][0], WAIT)
        assert bob_grant.gpu == "Tesla T4" and bob_grant.token
    finally:
        for task, _ in waits:
            task.cancel()
        for lease in leases:
            await lease.close()
        for client in (alice, bob, carol):
            client.close()


async def test_a_new_request_does_not_jump_the_queue_for_a_freed_gpu(
    start_coordinator: Starter, providers: list[FakeProvider]
) -> None:
    server, cohort, (alice, bob, carol) = await _class_with_one_t4(start_coordinator, providers, 3)
    scheduling = server.cohort_scheduling
    assert scheduling is not None and scheduling.lease_for is not None
    events = _served(server)
    # Hold the serving of the queue at a gate: the freed GPU stays free while bob waits.
    gate, serve = asyncio.Event(), scheduling.lease_for

    async def gated(student: str, cohort_record: Any, request: Any) -> Any:
        await gate.wait()
        return await serve(student, cohort_record, request)

    scheduling.lease_for = gated
    try:
        grant = await alice.request_lease("T4", cohort=cohort)
        with pytest.raises(LeaseQueued) as queued_bob:
            await bob.request_lease("T4", cohort=cohort)
        await alice.end_lease(grant.lease)
        with pytest.raises(LeaseQueued) as queued_carol:
            await carol.request_lease("T4", cohort=cohort)  # the T4 is free, bob came first
        assert queued_carol.value.place.place == 2
        gate.set()
        served = await asyncio.wait_for(events.get(), WAIT)
        assert served.id == queued_bob.value.place.ticket
    finally:
        gate.set()
        for client in (alice, bob, carol):
            client.close()
