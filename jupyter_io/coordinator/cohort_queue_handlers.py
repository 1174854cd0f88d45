"""REST of a cohort's queue tickets and reservations (issue 14.3); thin, the work is
:class:`~jupyter_io.coordinator.cohort_scheduling.CohortScheduling`'s.

==============================================  =================================================
``GET    /api/v1/cohorts/{id}/queue/{ticket}``  signed, the ticket's student: ``{"queued":
                                                {ticket, place, waiting, estimated_wait_seconds,
                                                expires_at}}``, or ``{"lease": <grant>}`` once
                                                served, or 410 ``gone`` with the reason
``DELETE /api/v1/cohorts/{id}/queue/{ticket}``  signed once, the ticket's student: cancel
``GET    /api/v1/cohorts/{id}/reservations``    signed, instructors: ``{"reservations": [...]}``
``POST   /api/v1/cohorts/{id}/reservations``    signed once, instructors: ``{"gpu", "count",
                                                "starts_at", "ends_at"}`` → 201 the reservation
``DELETE /api/v1/cohorts/{id}/reservations/{r}``  signed once, instructors: 200 / 404
==============================================  =================================================

A ticket another student asks about is answered 403 and changes nothing; an unknown one 404.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from solders.pubkey import Pubkey

from .cohort_queue import NotTicketOwner, Ticket, TicketNotFound
from .cohort_reservations import (
    MAX_RESERVATIONS_PER_COHORT,
    parse_reservation,
    reservation_json,
)
from .cohort_scheduling import CohortScheduling, TicketGone
from .handlers import API_PREFIX, _ApiHandler, _json_body

__all__ = ["queue_routes"]

_COHORT = r"(c_[A-Za-z0-9_-]{16})"


class _CohortApi(_ApiHandler):
    @property
    def scheduling(self) -> CohortScheduling:
        scheduling = self.services.cohort_scheduling
        assert scheduling is not None
        return scheduling

    async def instructor(self, cohort_id: str, *, once: bool) -> Any | None:
        """The cohort, if the signer is one of its instructors; None after answering."""
        user = self.signed(once=once)
        if user is None:
            return None
        cohort = await self.scheduling.store.get_cohort(cohort_id)
        if cohort is None:
            self.fail(404, "not_found", f"no class {cohort_id}")
            return None
        if cohort.role_of(str(user)) is None:
            self.fail(403, "forbidden", "only the class's instructors manage its reservations")
            return None
        return cohort


class QueueTicketHandler(_CohortApi):
    def owned_ticket(self, cohort_id: str, ticket_id: str, user: Pubkey) -> Ticket | None:
        """The signer's ticket ``ticket_id`` of this cohort; None after answering 403
        (another student's) or 404 (unknown, or of another cohort)."""
        try:
            ticket = self.scheduling.queue.owned(ticket_id, str(user))
            if ticket.cohort != cohort_id:
                raise TicketNotFound(f"queue ticket {ticket_id} is not of class {cohort_id}")
        except NotTicketOwner as exc:
            self.fail(403, "forbidden", str(exc))
            return None
        except TicketNotFound as exc:
            self.fail(404, "not_found", str(exc))
            return None
        return ticket

    def get(self, cohort_id: str, ticket_id: str) -> None:
        user = self.signed()
        if user is None:
            return
        ticket = self.owned_ticket(cohort_id, ticket_id, user)
        if ticket is None:
            return
        scheduling = self.scheduling
        try:
            body = scheduling.ticket_json(ticket, scheduling.max_session(cohort_id))
        except TicketGone as exc:
            self.fail(410, "gone", str(exc))
            return
        self.send_json(body)

    async def delete(self, cohort_id: str, ticket_id: str) -> None:
        user = self.signed(once=True)
        if user is None:
            return
        ticket = self.owned_ticket(cohort_id, ticket_id, user)
        if ticket is None:
            return
        cancelled = self.scheduling.cancel(ticket)
        self.send_json({"ticket": ticket.id, "state": ticket.state.value, "cancelled": cancelled})


class ReservationsHandler(_CohortApi):
    async def get(self, cohort_id: str) -> None:
        cohort = await self.instructor(cohort_id, once=False)
        if cohort is None:
            return
        records = await self.scheduling.store.reservations(cohort_id)
        self.send_json({"reservations": [reservation_json(r) for r in records]})

    async def post(self, cohort_id: str) -> None:
        cohort = await self.instructor(cohort_id, once=True)
        if cohort is None:
            return
        scheduling = self.scheduling
        now = scheduling.clock()
        try:
            wanted = parse_reservation(_json_body(self.request.body), now=now)
        except ValueError as exc:
            self.fail(400, "bad_request", f"reservation: {exc}")
            return
        if cohort.state != "active":
            self.fail(409, "cohort_ended", f"class {cohort_id} has ended: it reserves nothing")
            return
        store = scheduling.store
        current = await store.reservations(cohort_id, ending_after=_utc(now))
        if len(current) >= MAX_RESERVATIONS_PER_COHORT:
            self.fail(
                409,
                "too_many_reservations",
                f"class {cohort_id} holds {len(current)} reservations, the most it may; "
                f"delete one first",
            )
            return
        record = await store.add_reservation(
            cohort_id,
            gpu=wanted.gpu,
            count=wanted.count,
            starts_at=_utc(wanted.starts_at),
            ends_at=_utc(wanted.ends_at),
        )
        await scheduling.reservations.reload()
        self.send_json(reservation_json(record), 201)


class ReservationHandler(_CohortApi):
    async def delete(self, cohort_id: str, reservation_id: str) -> None:
        cohort = await self.instructor(cohort_id, once=True)
        if cohort is None:
            return
        scheduling = self.scheduling
        if not await scheduling.store.delete_reservation(cohort_id, reservation_id):
            self.fail(404, "not_found", f"class {cohort_id} has no reservation {reservation_id}")
            return
        await scheduling.reservations.reload()
        self.send_json({"deleted": reservation_id})


def queue_routes(init: dict[str, Any]) -> list[tuple[str, type[_ApiHandler], dict[str, Any]]]:
    """The routes of this module, for :func:`~jupyter_io.coordinator.handlers.make_app`."""
    base = f"{API_PREFIX}/cohorts/{_COHORT}"
    return [
        (rf"{base}/queue/(q_[A-Za-z0-9_-]{{1,32}})", QueueTicketHandler, init),
        (rf"{base}/reservations", ReservationsHandler, init),
        (rf"{base}/reservations/(r_[A-Za-z0-9_-]{{1,32}})", ReservationHandler, init),
    ]


def _utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=timezone.utc)
