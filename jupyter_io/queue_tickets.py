"""The cohort start queue as both ends speak it (issue 14.3): the coordinator answers a
cohort lease request it cannot serve yet with ``202 {"queued": {...}}``; the client polls
the ticket until it is served, refused or expires. Pure: no I/O, no clock::

    POST /api/v1/leases {"cohort": id, ...}      -> 202 {"queued": QueuePlace.to_json()}
    GET  queue_path(cohort, ticket)   (signed)   -> 200 {"queued": {...}} while waiting
                                                 -> 200 {"lease": <the lease grant>} once served
                                                 -> 410 {"error": {"code": "gone", "message":
                                                    why}} when it expired or was cancelled
    DELETE queue_path(cohort, ticket) (signed)   -> cancel

Clients poll every :data:`POLL_SECONDS` (the coordinator serves the queue on events, so the
lease is waiting at the next poll) until ``expires_at``, and show :func:`progress_message`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ProtocolError

__all__ = [
    "POLL_SECONDS",
    "QUEUE_STEP",
    "QueuePlace",
    "progress_message",
    "queue_path",
]

#: Seconds between two polls of a waiting ticket.
POLL_SECONDS = 1.0
#: The start-progress step id (and name) of waiting in the queue.
QUEUE_STEP = "queue"


def queue_path(cohort: str, ticket: str) -> str:
    """The ticket's endpoint below the coordinator's base URL."""
    return f"/api/v1/cohorts/{cohort}/queue/{ticket}"


@dataclass(frozen=True, slots=True)
class QueuePlace:
    """A waiting ticket: its place (1 = next), how many wait, the estimate, the expiry."""

    ticket: str
    cohort: str
    place: int
    estimated_wait_seconds: float
    expires_at: float
    waiting: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "ticket": self.ticket,
            "cohort": self.cohort,
            "place": self.place,
            "waiting": self.waiting,
            "estimated_wait_seconds": self.estimated_wait_seconds,
            "expires_at": self.expires_at,
        }

    @classmethod
    def from_json(cls, body: Any) -> QueuePlace:
        """The ``queued`` object; :class:`~jupyter_io.errors.ProtocolError` when malformed."""
        if not isinstance(body, Mapping):
            raise ProtocolError("the coordinator's 'queued' answer is not an object")
        ticket, cohort = body.get("ticket"), body.get("cohort")
        place, waiting = body.get("place"), body.get("waiting", 0)
        if not isinstance(ticket, str) or not isinstance(cohort, str):
            raise ProtocolError("the coordinator's 'queued' answer names no ticket or class")
        if type(place) is not int or type(waiting) is not int or place < 0:
            raise ProtocolError("the coordinator's 'queued' answer has no whole 'place'")
        numbers = []
        for name in ("estimated_wait_seconds", "expires_at"):
            value = body.get(name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ProtocolError(f"the coordinator's 'queued' answer has no {name!r}")
            numbers.append(float(value))
        return cls(ticket, cohort, place, numbers[0], numbers[1], waiting)


def progress_message(place: QueuePlace) -> str:
    """``"In the queue: place 3, about 4 min"`` (what Lab shows while the start waits)."""
    wait = place.estimated_wait_seconds
    if wait < 60:
        about = "less than a minute"
    else:
        about = f"about {math.ceil(wait / 60)} min"
    return f"In the queue: place {place.place}, {about}"
