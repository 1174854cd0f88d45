"""Reservations: GPUs kept for a cohort's lab session (issue 14.3).

An instructor reserves ``count`` GPUs of one type for a window (``POST
/api/v1/cohorts/{id}/reservations`` ``{"gpu": "T4", "count": 30, "starts_at": unix,
"ends_at": unix}``; stored in ``cohort_reservations``). While the window is open the
scheduler holds the reservation's **unused** part (``count`` less the GPUs of that type the
cohort's live leases hold) back from every other request
(:meth:`~jupyter_io.coordinator.scheduler.OfferIndex.hold`); the cohort's own requests see it
free. Overlapping reservations of one cohort and type add up. A reservation never takes a GPU
from a running session: it only stops new leases of others from taking the free ones.

:class:`Reservations` keeps the holds in step: one timer for the next window boundary, and a
recount of a cohort's unused GPUs when one of its leases starts or ends (:meth:`recount`).
Nothing polls.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from ..gpu_names import normalise_gpu_name
from .scheduler import OfferIndex
from .store import Store

__all__ = [
    "MAX_RESERVATION_GPUS",
    "MAX_RESERVATION_SECONDS",
    "Reservation",
    "Reservations",
    "parse_reservation",
]

#: Most GPUs one reservation may keep.
MAX_RESERVATION_GPUS = 1000
#: Longest window of one reservation (a day: lab sessions, not a standing claim).
MAX_RESERVATION_SECONDS = 24 * 3600.0
#: How far ahead a reservation may be made (a term).
MAX_RESERVATION_AHEAD = 200 * 24 * 3600.0
#: Reservations one cohort may hold (ended ones do not count).
MAX_RESERVATIONS_PER_COHORT = 100


@dataclass(frozen=True, slots=True)
class Reservation:
    """A validated reservation request."""

    gpu: str
    count: int
    starts_at: float
    ends_at: float


def parse_reservation(body: Any, *, now: float) -> Reservation:
    """A reservation request body; :class:`ValueError` saying what to fix."""
    if not isinstance(body, Mapping):
        raise ValueError('the body must be {"gpu", "count", "starts_at", "ends_at"}')
    unknown = sorted(set(body) - {"gpu", "count", "starts_at", "ends_at"})
    if unknown:
        raise ValueError(f"unknown fields {unknown}; expected gpu, count, starts_at, ends_at")
    gpu, count = body.get("gpu"), body.get("count")
    if not isinstance(gpu, str) or not normalise_gpu_name(gpu) or len(gpu) > 128:
        raise ValueError("'gpu' must name a GPU type (e.g. 'T4'), at most 128 characters")
    if type(count) is not int or not 1 <= count <= MAX_RESERVATION_GPUS:
        raise ValueError(f"'count' must be a whole number of GPUs from 1 to {MAX_RESERVATION_GPUS}")
    times = []
    for name in ("starts_at", "ends_at"):
        value = body.get(name)
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
        ):
            raise ValueError(f"{name!r} must be a time in Unix seconds")
        times.append(float(value))
    starts, ends = times
    if ends <= max(starts, now):
        raise ValueError("'ends_at' must be after 'starts_at' and in the future")
    if ends - starts > MAX_RESERVATION_SECONDS:
        raise ValueError("a reservation lasts at most 24 hours; make one per lab session")
    if starts - now > MAX_RESERVATION_AHEAD:
        raise ValueError("a reservation starts at most 200 days ahead")
    return Reservation(gpu.strip(), count, starts, ends)


def reservation_json(record: Any) -> dict[str, Any]:
    """A stored reservation as the API shows it."""
    return {
        "id": record.id,
        "cohort": record.cohort_id,
        "gpu": record.gpu,
        "count": record.count,
        "starts_at": record.starts_at.timestamp(),
        "ends_at": record.ends_at.timestamp(),
    }


class Reservations:
    """Keeps the scheduler's holds in step with the open reservation windows (see the
    module docstring). :meth:`start` after the registry; :meth:`reload` after a reservation
    is added or deleted; :meth:`recount` when a cohort lease starts or ends."""

    def __init__(
        self,
        store: Store,
        index: OfferIndex,
        *,
        on_change: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.time,
        log: logging.Logger | None = None,
    ) -> None:
        self.store = store
        self.index = index
        #: Called when holds changed (the queue may serve someone now).
        self.on_change = on_change
        self.clock = clock
        self.log = log or logging.getLogger("jupyter_io.coordinator")
        self._windows: list[Any] = []  # ReservationRecords not over yet
        self._holds: dict[tuple[str, str], int] = {}  # (cohort, gpu_key) -> GPUs held
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        await self.reload()

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    def open_cohorts(self) -> set[str]:
        """Cohorts with a reservation window open now."""
        now = self.clock()
        return {r.cohort_id for r in self._windows if _open(r, now)}

    async def reload(self) -> None:
        """Re-read the reservations not over yet and recount every open one."""
        now = self.clock()
        self._windows = await self.store.reservations(ending_after=_utc(now))
        await self._recount_all()

    async def recount(self, cohort: str) -> None:
        """A lease of ``cohort`` started or ended: its unused reserved GPUs changed."""
        if cohort in self.open_cohorts():
            await self._recount_all(only=cohort)

    def lease_changed(self, cohort: str | None) -> None:
        """Sync hook for listeners: recount ``cohort`` (or every open one) in a task."""
        if cohort is not None and cohort not in self.open_cohorts():
            return
        if cohort is None and not self.open_cohorts():
            return
        task = asyncio.get_running_loop().create_task(
            self._recount_all(only=cohort), name="reservation recount"
        )
        self._task = task
        task.add_done_callback(self._log_failure)

    async def _recount_all(self, only: str | None = None) -> None:
        async with self._lock:
            now = self.clock()
            wanted: dict[tuple[str, str], int] = {}
            for record in self._windows:
                if _open(record, now) and (only is None or record.cohort_id == only):
                    key = (record.cohort_id, normalise_gpu_name(record.gpu))
                    wanted[key] = wanted.get(key, 0) + record.count
            cohorts = {cohort for cohort, _ in wanted}
            for cohort in cohorts:
                held: dict[str, int] = {}
                for lease in await self.store.cohort_live_leases(cohort):
                    model = normalise_gpu_name(lease.gpu_model)
                    held[model] = held.get(model, 0) + len(lease.gpu_indices)
                for (c, model), count in list(wanted.items()):
                    if c == cohort:
                        wanted[(c, model)] = max(0, count - held.get(model, 0))
            changed = False
            for hold in list(self._holds):
                if (only is None or hold[0] == only) and hold not in wanted:
                    self.index.hold(hold[0], hold[1], 0)
                    del self._holds[hold]
                    changed = True
            for (cohort, gpu_key), unused in wanted.items():
                if self._holds.get((cohort, gpu_key)) != unused:
                    self.index.hold(cohort, gpu_key, unused)
                    self._holds[(cohort, gpu_key)] = unused
                    changed = True
            self._windows = [r for r in self._windows if r.ends_at.timestamp() > now]
            self._arm(now)
        if changed and self.on_change is not None:
            self.on_change()

    def _arm(self, now: float) -> None:
        """One timer at the next window boundary (an opening or a closing)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        boundaries = [
            t
            for r in self._windows
            for t in (r.starts_at.timestamp(), r.ends_at.timestamp())
            if t > now
        ]
        if boundaries:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(min(boundaries) - now, self._boundary)

    def _boundary(self) -> None:
        self._timer = None
        task = asyncio.get_running_loop().create_task(self._recount_all(), name="reservations")
        self._task = task
        task.add_done_callback(self._log_failure)

    def _log_failure(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.log.error("reservation holds not updated", exc_info=task.exception())
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(1.0, self._boundary)  # a store hiccup: try again


def _open(record: Any, now: float) -> bool:
    return record.starts_at.timestamp() <= now < record.ends_at.timestamp()


def _utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=timezone.utc)
