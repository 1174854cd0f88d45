"""A provider's reliability, measured from its record over a rolling 30 days.

The record (read by :meth:`Store.reliability_inputs
<jupyter_io.coordinator.store.reliability.ReliabilityQueries.reliability_inputs>`) is, over
the last :data:`WINDOW` seconds:

* **sessions**: leases on the provider that ended normally after their kernel ran
  (``completed``), and leases that failed (``lost``: the provider was lost, or came back
  without the session). A lease whose token expired unused is no session. A lease the
  provider's own key made on itself never counts.
* **links**: how long it was linked (``up``), and the outages its losses caused (``down``:
  from the last heartbeat before a loss to its next link, or to now while it is still lost).
  A goodbye is not an outage: a provider that shuts down cleanly is just not on offer.

The figure::

    completion = sum(w_u * completed_u) / sum(w_u * sessions_u)     (1.0 with no session)
    w_u        = min(1, PER_USER_SESSIONS / sessions_u)              per user u
    uptime     = up / (up + down)                                    (1.0 with neither)
    score      = completion * uptime

Weighting each user's sessions to at most :data:`PER_USER_SESSIONS` keeps one user (the
provider's own second key, say) from outvoting everyone else, while keeping each user's own
ratio. A provider with no session and no outage in the window is **not measured**
(:func:`measure` returns None): it shows "not measured", never 100 %, and a request with a
``min_reliability`` skips it. For ranking, :func:`jupyter_io.coordinator.scheduler.score`
counts an unmeasured provider at :data:`UNMEASURED_RELIABILITY`.

:class:`ReliabilityBook` keeps the figures of the providers a coordinator watches and
refreshes them from the store (after a provider links or a lease of it ends, and every
``refresh_interval`` for the window's roll), so the scheduler reads a float and never waits.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from .store.reliability import LinkSpan, SessionCounts

if TYPE_CHECKING:
    from .store import Store
    from .store.reliability import ReliabilityQueries

__all__ = [
    "PER_USER_SESSIONS",
    "UNMEASURED_RELIABILITY",
    "WINDOW",
    "LinkSpan",
    "Reliability",
    "ReliabilityBook",
    "SessionCounts",
    "measure",
    "parse_min_reliability",
]

#: The rolling window of a record, seconds (30 days).
WINDOW = 30 * 24 * 3600
#: Sessions of one user that count in full towards a provider's completion rate.
PER_USER_SESSIONS = 5
#: The reliability the scheduler ranks an unmeasured provider with: as if it completed nine
#: sessions in ten (behind a clean record, ahead of one that lost more than one in ten).
UNMEASURED_RELIABILITY = 0.9


@dataclass(frozen=True, slots=True)
class Reliability:
    """A provider's measured reliability (see the module docstring for the formula)."""

    score: float
    #: Sessions in the window (completed + lost), unweighted.
    sessions: int
    lost: int
    #: Fraction of its listed time it was reachable, 0..1.
    uptime: float
    #: Where the evidence starts: the window's start or the provider's first evidence in it.
    since: datetime

    def to_json(self) -> dict[str, Any]:
        """The ``reliability`` object of the offers API (``docs/coordinator-contract.md``)."""
        return {
            "score": round(self.score, 4),
            "sessions": self.sessions,
            "lost": self.lost,
            "uptime": round(self.uptime, 4),
            "since": self.since.isoformat().replace("+00:00", "Z"),
        }


def _overlap(start: datetime, end: datetime, lo: datetime, hi: datetime) -> float:
    return max(0.0, (min(end, hi) - max(start, lo)).total_seconds())


def measure(
    sessions: Mapping[str, SessionCounts],
    links: Iterable[LinkSpan],
    *,
    now: datetime,
    lost_since: datetime | None = None,
    window: float = WINDOW,
) -> Reliability | None:
    """The figure of one provider, or None when the window holds no session and no outage.

    ``sessions`` per user key (the provider's own key already left out), ``links`` its links
    that overlap the window, ``lost_since`` its last heartbeat while it is lost now (an
    outage still running). Pure.
    """
    start = now - timedelta(seconds=window)
    completed = lost = 0
    weighted_ok = weighted_all = 0.0
    for counts in sessions.values():
        total = counts.completed + counts.lost
        if total <= 0:
            continue
        weight = min(1.0, PER_USER_SESSIONS / total)
        completed += counts.completed
        lost += counts.lost
        weighted_ok += weight * counts.completed
        weighted_all += weight * total
    up = down = 0.0
    first: datetime | None = None
    for span in links:
        up += _overlap(span.linked_at, span.closed_at or now, start, now)
        if span.down_since is not None:
            down += _overlap(span.down_since, span.linked_at, start, now)
        begun = span.down_since or span.linked_at
        first = begun if first is None else min(first, begun)
    if lost_since is not None:
        down += _overlap(lost_since, now, start, now)
        first = lost_since if first is None else min(first, lost_since)
    if completed + lost == 0 and down <= 0:
        return None
    completion = weighted_ok / weighted_all if weighted_all else 1.0
    uptime = up / (up + down) if up + down > 0 else 1.0
    since = start if first is None or first < start else first
    return Reliability(
        score=completion * uptime,
        sessions=completed + lost,
        lost=lost,
        uptime=uptime,
        since=since,
    )


def parse_min_reliability(value: Any) -> float | None:
    """A lease request's ``min_reliability`` (None: no minimum); :class:`ValueError` unless
    it is a number in 0..1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(
            "'min_reliability' must be a number in 0..1 (0.95: providers that completed 95 % "
            "of their sessions in 30 days) or null"
        )
    return float(value)


class ReliabilityBook:
    """The figures of the providers this coordinator watches, refreshed from the store."""

    def __init__(
        self,
        store: Store,
        *,
        window: float = WINDOW,
        clock: Callable[[], float] | None = None,
        log: logging.Logger | None = None,
    ) -> None:
        self.store = store
        self.window = window
        self._clock = clock
        self.log = log or logging.getLogger("jupyter_io.coordinator")
        self._figures: dict[str, Reliability] = {}

    def get(self, pubkey: str) -> Reliability | None:
        """The provider's figure as last refreshed, or None (not measured)."""
        return self._figures.get(pubkey)

    def _now(self) -> datetime:
        if self._clock is None:
            return datetime.now(timezone.utc)
        return datetime.fromtimestamp(self._clock(), tz=timezone.utc)

    async def refresh(
        self, pubkeys: Iterable[str], *, queries: ReliabilityQueries | None = None
    ) -> set[str]:
        """Re-read the records of ``pubkeys`` (one read of the store, or of ``queries``: the
        change feed passes its own connections'); returns those whose figure changed."""
        wanted = sorted(set(pubkeys))
        if not wanted:
            return set()
        now = self._now()
        since = now - timedelta(seconds=self.window)
        inputs = await (queries or self.store).reliability_inputs(wanted, since=since)
        changed: set[str] = set()
        for pubkey in wanted:
            record = inputs.get(pubkey)
            figure = (
                None
                if record is None
                else measure(
                    record.sessions,
                    record.links,
                    now=now,
                    lost_since=record.lost_since,
                    window=self.window,
                )
            )
            if figure != self._figures.get(pubkey):
                changed.add(pubkey)
            if figure is None:
                self._figures.pop(pubkey, None)
            else:
                self._figures[pubkey] = figure
        return changed

    def forget(self, pubkey: str) -> None:
        """Drop a provider no longer watched here."""
        self._figures.pop(pubkey, None)
