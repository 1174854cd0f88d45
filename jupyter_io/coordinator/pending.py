"""Leases that hold GPUs before anyone pays for them: the claim window and the caps.

A new lease holds its GPUs at once (the store claims them atomically), before its user has
paid anything. :class:`PendingLeases` bounds what that costs the marketplace:

* with escrow payments a lease must be **funded** (its escrow verified by
  ``POST /api/v1/leases/{id}/escrow``) within ``window`` seconds of its request, and its
  session must then **start** (the provider reports the kernel running) within ``window``
  of the funding;
* on a free coordinator (no escrow) its session must start within ``window`` of the
  request;
* with escrow payments a key holds at most ``per_key`` unfunded leases at once and the
  coordinator at most ``total``; :meth:`PendingLeases.admit` refuses a request beyond either
  with :class:`TooManyUnfunded`, which says when a slot frees (the earliest deadline among
  the leases in the way).

The caps apply with escrow payments only: on a free coordinator a session that has started
holds its GPU for nothing too, so a cap on leases not started yet would stop nobody (a free
pool restricts who may connect instead).

This class does no I/O and holds no timers. The lease service
(:class:`~jupyter_io.coordinator.leasing.LeaseService`) calls :meth:`~PendingLeases.admit`
before it stores a lease (a slot is reserved at once, so concurrent requests cannot both
pass), :meth:`~PendingLeases.add` once stored and :meth:`~PendingLeases.unreserve` when the
attempt is over (stored or not), :meth:`~PendingLeases.funded` after a verified escrow,
:meth:`~PendingLeases.discard` when the lease starts or ends, and ends the leases
:meth:`~PendingLeases.due` returns, at :meth:`~PendingLeases.next_deadline`. Counts are this
coordinator's: replicas sharing one database each apply them. The window of a lease whose
replica died before it ended is kept by the leader of the replicas, from the database
(:meth:`~jupyter_io.coordinator.jobs.LeaderJobs.sweep_claims`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from ..errors import LeaseError

__all__ = [
    "DEFAULT_MAX_UNFUNDED",
    "DEFAULT_MAX_UNFUNDED_PER_KEY",
    "DEFAULT_WINDOW",
    "PendingLeases",
    "TooManyUnfunded",
    "Waiting",
]

#: Seconds a lease may wait for its escrow (then for its session) by default.
DEFAULT_WINDOW = 60.0
#: Unfunded leases one key may hold at once by default.
DEFAULT_MAX_UNFUNDED_PER_KEY = 2
#: Unfunded leases one coordinator holds at most by default, all keys together.
DEFAULT_MAX_UNFUNDED = 100


class TooManyUnfunded(LeaseError):
    """A lease request refused because too many leases wait for their escrow: the key's own
    (``scope = "key"``, HTTP 429 ``unfunded_limit``) or the coordinator's in all (``scope =
    "coordinator"``, HTTP 429 ``unfunded_capacity``). ``retry_after`` is how many seconds
    until the first of them is funded or expires (a slot frees then at the latest)."""

    def __init__(self, message: str, *, scope: str, retry_after: float) -> None:
        super().__init__(message)
        self.scope = scope
        self.retry_after = retry_after

    @property
    def code(self) -> str:
        """The API's error code."""
        return "unfunded_limit" if self.scope == "key" else "unfunded_capacity"

    @property
    def retry_after_seconds(self) -> int:
        """``retry_after`` as the whole seconds of a ``Retry-After`` header (at least 1)."""
        return max(1, math.ceil(self.retry_after))


@dataclass(slots=True)
class Waiting:
    """A lease whose session has not started yet."""

    lease_id: str
    user: str
    provider: str
    #: Wall-clock time (Unix seconds) by which it must be funded (or started, once funded).
    deadline: float
    #: Its escrow is verified (or payments are free): it waits for its session now.
    funded: bool
    #: ``POST .../escrow`` calls in flight: not ended meanwhile (the verification decides).
    holds: int = 0


class PendingLeases:
    """The leases waiting to be funded or started (see the module docstring)."""

    def __init__(
        self,
        *,
        window: float = DEFAULT_WINDOW,
        per_key: int = DEFAULT_MAX_UNFUNDED_PER_KEY,
        total: int = DEFAULT_MAX_UNFUNDED,
        caps: bool = True,
    ) -> None:
        if window <= 0 or per_key < 1 or total < 1:
            raise ValueError("window must be positive, per_key and total at least 1")
        self.window = window
        self.per_key = per_key
        self.total = total
        #: Whether :meth:`admit` applies the caps (escrow payments).
        self.caps = caps
        self._waiting: dict[str, Waiting] = {}
        self._unfunded: dict[str, set[str]] = {}  # user -> lease ids
        self._reserved: dict[str, int] = {}  # user -> requests between admit and add
        self._reserved_total = 0

    def __len__(self) -> int:
        return len(self._waiting)

    def __contains__(self, lease_id: object) -> bool:
        return lease_id in self._waiting

    def get(self, lease_id: str) -> Waiting | None:
        """The waiting lease, or None."""
        return self._waiting.get(lease_id)

    def unfunded(self, user: str | None = None) -> int:
        """Unfunded leases held (by ``user`` if given), requests being stored included."""
        if user is not None:
            return len(self._unfunded.get(user, ())) + self._reserved.get(user, 0)
        return sum(len(ids) for ids in self._unfunded.values()) + self._reserved_total

    # -- admission ---------------------------------------------------------------------------

    def admit(self, user: str, *, now: float) -> None:
        """Reserve a slot for a new lease of ``user``, or raise :class:`TooManyUnfunded`
        saying why and when to retry. :meth:`unreserve` it once the lease is stored (and
        :meth:`add` ed) or refused. Without caps (free payments) it only counts."""
        if self.caps:
            mine = self.unfunded(user)
            if mine >= self.per_key:
                wait = self._first_deadline(self._unfunded.get(user, ()), now)
                raise TooManyUnfunded(
                    f"key {user} already holds {mine} lease(s) whose escrow is not verified "
                    f"yet (at most {self.per_key} per key): fund one (POST "
                    f"/api/v1/leases/ID/escrow) or end it (DELETE /api/v1/leases/ID), or "
                    f"retry in {math.ceil(wait)} s, when the first of them is funded or "
                    f"expires (a lease not funded within {self.window:g} s ends)",
                    scope="key",
                    retry_after=wait,
                )
            everyone = self.unfunded()
            if everyone >= self.total:
                ids = [i for ids in self._unfunded.values() for i in ids]
                wait = self._first_deadline(ids, now)
                raise TooManyUnfunded(
                    f"this coordinator holds {everyone} leases waiting for their escrow, its "
                    f"limit: retry in {math.ceil(wait)} s, when the first of them is funded "
                    f"or expires (a lease not funded within {self.window:g} s ends)",
                    scope="coordinator",
                    retry_after=wait,
                )
        self._reserved[user] = self._reserved.get(user, 0) + 1
        self._reserved_total += 1

    def unreserve(self, user: str) -> None:
        """Give back the slot :meth:`admit` reserved."""
        left = self._reserved.get(user, 0) - 1
        if left < 0:
            return
        if left:
            self._reserved[user] = left
        else:
            del self._reserved[user]
        self._reserved_total -= 1

    def _first_deadline(self, lease_ids: Iterable[str], now: float) -> float:
        deadlines = [self._waiting[i].deadline for i in lease_ids if i in self._waiting]
        # Only requests still being stored are in the way: they expire a window from now.
        first = min(deadlines) if deadlines else now + self.window
        return max(0.0, first - now)

    # -- life of a waiting lease -------------------------------------------------------------

    def add(
        self,
        lease_id: str,
        *,
        user: str,
        provider: str,
        deadline: float,
        funded: bool,
    ) -> Waiting:
        """Track a stored lease that waits to be funded (``funded`` false) or started."""
        self.discard(lease_id)
        waiting = Waiting(lease_id, user, provider, deadline, funded)
        self._waiting[lease_id] = waiting
        if not funded:
            self._unfunded.setdefault(user, set()).add(lease_id)
        return waiting

    def funded(self, lease_id: str, *, now: float) -> Waiting | None:
        """The lease's escrow is verified: it no longer counts as unfunded and its session
        must start within a window from ``now``. None if it is not waiting (started, over)."""
        waiting = self._waiting.get(lease_id)
        if waiting is None:
            return None
        if not waiting.funded:
            waiting.funded = True
            waiting.deadline = now + self.window
            self._drop_unfunded(waiting)
        return waiting

    def discard(self, lease_id: str) -> Waiting | None:
        """Stop tracking the lease (it started, ended or failed); returns what was tracked."""
        waiting = self._waiting.pop(lease_id, None)
        if waiting is not None and not waiting.funded:
            self._drop_unfunded(waiting)
        return waiting

    def _drop_unfunded(self, waiting: Waiting) -> None:
        ids = self._unfunded.get(waiting.user)
        if ids is not None:
            ids.discard(waiting.lease_id)
            if not ids:
                del self._unfunded[waiting.user]

    @contextlib.contextmanager
    def holding(self, lease_id: str) -> Iterator[None]:
        """While the escrow of ``lease_id`` is being verified, it is not due."""
        waiting = self._waiting.get(lease_id)
        if waiting is not None:
            waiting.holds += 1
        try:
            yield
        finally:
            if waiting is not None:
                waiting.holds -= 1

    # -- expiry ----------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """The earliest deadline of a lease not held, or None."""
        deadlines = [w.deadline for w in self._waiting.values() if not w.holds]
        return min(deadlines) if deadlines else None

    def due(self, now: float) -> list[Waiting]:
        """The leases whose deadline has passed (held ones wait for their verification)."""
        return [w for w in self._waiting.values() if w.deadline <= now and not w.holds]
