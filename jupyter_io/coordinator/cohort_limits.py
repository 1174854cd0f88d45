"""A cohort's time rules: idle kernels stop, sessions end at the max length (issue 14.3).

A lease run for a cohort (``LeaseRecord.cohort_id``) is watched from the moment it becomes
active: it ends after the cohort's ``max_session_seconds`` (reason
:data:`MAX_LENGTH_REACHED`) and after ``idle_timeout_seconds`` without execution activity
(reason ``"idle for N min"``, :func:`idle_reason`). A minute before either (``warning``),
the lease JSON carries ``"warnings": [{"kind": "idle"|"max_length", "at", "message"}]`` and
``"ends_at"`` (:meth:`CohortLimits.view`), which the provisioner and Lab show.

Idle is measured by the two parties of the session, each reporting ``idle_seconds`` (seconds
since the kernel last executed anything): the provider host in its signed usage reports, the
user's side in its usage acknowledgements. Each report sets that party's *last activity* to
``received_at - idle_seconds``; the lease is idle since the **earliest** last activity any
party reported, i.e. **idle when either party says idle**. So neither can keep a kernel alive
at the other's cost by lying: a student whose client claims activity is stopped on the
provider's word, a provider that claims activity to bill longer is stopped on the user's.
A party's word covers only up to its report: activity another party reports *after* it is
not contradicted (:func:`last_activity`), so a cell run just after a party's last report is
not stopped on that stale report; a liar gains at most until the other's next report.
Either can end the session anyway (the user ends the lease, the provider stops the kernel),
so a false "idle" gains nothing. While neither party has reported ``idle_seconds`` the idle
rule does not apply (older clients); the max length always does.

One :class:`~jupyter_io.coordinator.lease_timers.LeaseTimers` timer per watched lease, due at
its next warning or end; a report re-arms it. No polling.

With several coordinator replicas a lease is watched where it became active, by every replica
that started while it was active, and by the replica its provider links to (a moved provider's
leases keep their rules). Each replica ends it on what it knows (the parties' idle reports
reach the replica they were sent to: the provider's the one holding its link, the user's any);
the end is conditional on the lease being live, so it ends once.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from ..provider_link import End
from .jobs import LinkWatch
from .lease_timers import LeaseTimers
from .models import LeaseState
from .registry import Registry
from .store import LeaseRecord, Store

__all__ = [
    "MAX_LENGTH_REACHED",
    "PARTY_PROVIDER",
    "PARTY_USER",
    "WARNING_SECONDS",
    "CohortLimits",
    "SessionRules",
    "idle_reason",
    "last_activity",
]

#: The end reason of a cohort session that reached the cohort's max session length.
MAX_LENGTH_REACHED = "cohort max session length"
#: Seconds before an idle stop or the max length that the warning appears.
WARNING_SECONDS = 60.0
#: Who reported an ``idle_seconds``.
PARTY_PROVIDER = "provider"
PARTY_USER = "user"


def idle_reason(idle_timeout: float) -> str:
    """The end reason of a session stopped for idling: ``"idle for N min"``."""
    minutes = idle_timeout / 60
    shown = f"{minutes:.0f}" if minutes >= 1 else f"{minutes:.2g}"
    return f"idle for {shown} min"


@dataclass(frozen=True, slots=True)
class SessionRules:
    """A cohort's time rules, in seconds (None or 0: no such rule)."""

    idle_timeout: float | None
    max_session: float | None


@dataclass(slots=True)
class _Watch:
    cohort: str
    provider: str
    user: str
    started: float
    rules: SessionRules
    #: party -> Unix seconds of its reported last activity.
    activity: dict[str, float] = field(default_factory=dict)
    #: party -> Unix seconds of its last report (the coordinator's clock).
    reported: dict[str, float] = field(default_factory=dict)
    warnings: dict[str, dict[str, Any]] = field(default_factory=dict)
    ends_at: float | None = None


def last_activity(activity: Mapping[str, float], reported: Mapping[str, float]) -> float:
    """When the kernel last executed, from each party's reported last activity and the time
    of its report: the latest activity no party contradicts. A party contradicts activity
    at ``t`` when it said "idle since before ``t``" after ``t``; activity after a party's
    last report is not contradicted by it (it has not spoken since). The earliest
    report is never contradicted, so with every report current this is the earliest."""
    for at in sorted(set(activity.values()), reverse=True):
        if not any(other < at < reported.get(party, other) for party, other in activity.items()):
            return at
    return min(activity.values())


#: The rules of a watch before they were read.
_UNKNOWN = SessionRules(None, None)

#: ``rules(cohort_id)``: the cohort's rules, or None when the cohort is unknown.
RulesLookup = Callable[[str], Awaitable[SessionRules | None]]


class CohortLimits:
    """Watches active cohort leases (see the module docstring). :meth:`start` after the
    registry, :meth:`stop` at shutdown; :meth:`activity` for each ``idle_seconds`` report."""

    def __init__(
        self,
        store: Store,
        registry: Registry,
        rules: RulesLookup,
        *,
        warning: float = WARNING_SECONDS,
        clock: Callable[[], float] = time.time,
        log: logging.Logger | None = None,
    ) -> None:
        self.store = store
        self.registry = registry
        self._rules = rules
        self.warning = warning
        self.clock = clock
        self.log = log or logging.getLogger("jupyter_io.coordinator")
        self._watches: dict[str, _Watch] = {}
        self._timers = LeaseTimers(self._check, what="cohort time rules", log=self.log)
        self._links = LinkWatch(store, registry, self.watch, log=self.log)
        #: Leases ended for idling / for the max length.
        self.ended_idle = 0
        self.ended_max_length = 0
        #: Called with the lease id after each check (its :meth:`view` is current then).
        self.checked: list[Callable[[str], None]] = []

    async def start(self) -> None:
        """Watch cohort leases that become active, and the active ones now (after a
        restart: the idle clock restarts at the restart, the max length does not)."""
        self.registry.activation_listeners.append(self.watch)
        self.registry.lease_listeners.append(self._gone)
        self._links.start()
        for lease in await self.store.live_leases():
            self.watch(lease)

    async def stop(self) -> None:
        for listeners, fn in (
            (self.registry.activation_listeners, self.watch),
            (self.registry.lease_listeners, self._gone),
        ):
            if fn in listeners:
                listeners.remove(fn)  # type: ignore[arg-type]
        await self._links.stop()
        await self._timers.stop()

    def watch(self, lease: LeaseRecord) -> None:
        """Start watching an active cohort lease (others are ignored)."""
        cohort = getattr(lease, "cohort_id", None)
        if cohort is None or lease.state is not LeaseState.ACTIVE or lease.id in self._watches:
            return
        started = (lease.active_at or lease.requested_at).timestamp()
        self._watches[lease.id] = _Watch(
            cohort, lease.provider_pubkey, lease.user_pubkey, started, _UNKNOWN
        )
        self._timers.arm(lease.id, 0.0)  # the first check loads the cohort's rules

    def activity(self, lease_id: str, party: str, idle_seconds: float) -> None:
        """``party`` reports the kernel idle for ``idle_seconds`` now: re-check the lease."""
        watch = self._watches.get(lease_id)
        if watch is None or not math.isfinite(idle_seconds) or idle_seconds < 0:
            return
        now = self.clock()
        watch.activity[party] = now - idle_seconds
        watch.reported[party] = now
        # With the rules known the new state is computed at once (the lease JSON read
        # right after the report shows it); an end that is due runs in the timer's task.
        if watch.rules == _UNKNOWN or self._evaluate(lease_id, watch) is not None:
            self._timers.arm(lease_id, 0.0)

    def idle_seconds(self, lease_id: str) -> float | None:
        """Seconds the lease has been idle by the parties' reports (:func:`last_activity`;
        None while nobody reported)."""
        watch = self._watches.get(lease_id)
        if watch is None or not watch.activity:
            return None
        last = last_activity(watch.activity, watch.reported)
        return max(0.0, self.clock() - max(watch.started, last))

    def view(self, lease_id: str) -> dict[str, Any]:
        """The lease JSON's ``warnings`` and ``ends_at`` (the earliest end the rules set)."""
        watch = self._watches.get(lease_id)
        if watch is None:
            return {"warnings": [], "ends_at": None}
        return {"warnings": list(watch.warnings.values()), "ends_at": watch.ends_at}

    def _gone(self, lease_id: str, reason: str) -> None:
        self._watches.pop(lease_id, None)
        self._timers.cancel(lease_id)

    async def _check(self, lease_id: str) -> None:
        try:
            await self._check_rules(lease_id)
        finally:
            for listener in list(self.checked):
                listener(lease_id)

    async def _check_rules(self, lease_id: str) -> None:
        watch = self._watches.get(lease_id)
        if watch is None:
            return
        if watch.rules == _UNKNOWN:
            rules = await self._rules(watch.cohort)
            if rules is None or not (rules.idle_timeout or rules.max_session):
                self._watches.pop(lease_id, None)
                return
            watch.rules = rules
        due = self._evaluate(lease_id, watch)
        if due is not None:
            await self._end(lease_id, watch, due)

    def _evaluate(self, lease_id: str, watch: _Watch) -> str | None:
        """Update the lease's ``ends_at``, warnings and timer from its rules; the kind of
        end that is due now (None: none)."""
        now = self.clock()
        deadlines = self._deadlines(watch)
        if not deadlines:
            watch.ends_at = None
            watch.warnings.clear()
            return None
        end_kind, end_at = min(deadlines.items(), key=lambda item: item[1])
        watch.ends_at = end_at
        if end_at <= now:
            return end_kind
        for kind, at in deadlines.items():
            if at - now <= self.warning:
                watch.warnings[kind] = {"kind": kind, "at": at, "message": _message(kind, at - now)}
            else:
                watch.warnings.pop(kind, None)  # activity resumed: the warning is over
        for kind in list(watch.warnings):
            if kind not in deadlines:
                del watch.warnings[kind]
        wake = min(
            (at - self.warning if at - self.warning > now else at) for at in deadlines.values()
        )
        self._timers.arm(lease_id, wake - now)
        return None

    def _deadlines(self, watch: _Watch) -> dict[str, float]:
        rules = watch.rules
        deadlines: dict[str, float] = {}
        if rules.max_session:
            deadlines["max_length"] = watch.started + rules.max_session
        if rules.idle_timeout and watch.activity:
            # Idle when either party says idle: the earliest last activity counts, but a
            # party's word covers only up to its report (last_activity).
            last = max(watch.started, last_activity(watch.activity, watch.reported))
            deadlines["idle"] = last + rules.idle_timeout
        return deadlines

    async def _end(self, lease_id: str, watch: _Watch, kind: str) -> None:
        rules = watch.rules
        reason = (
            MAX_LENGTH_REACHED if kind == "max_length" else idle_reason(rules.idle_timeout or 0)
        )
        at = datetime.fromtimestamp(self.clock(), tz=timezone.utc)
        lease = await self.store.get_lease(lease_id)
        if (
            lease is None
            or not lease.live
            or not await self.store.end_lease(lease_id, reason, at=at)
        ):
            self._watches.pop(lease_id, None)
            return
        if kind == "max_length":
            self.ended_max_length += 1
        else:
            self.ended_idle += 1
        self.log.info(
            "cohort %s lease %s of %s ended: %s", watch.cohort, lease_id, watch.user, reason
        )
        self.registry.deliver(watch.provider, End(lease_id, reason), ttl=60.0)
        self.registry.lease_over(watch.provider, lease_id, ok=True, reason=reason)


def _message(kind: str, left: float) -> str:
    when = f"in {left:.0f} s" if left < 90 else f"in {left / 60:.0f} min"
    if kind == "idle":
        return (
            f"this kernel has been idle and stops {when}; run a cell to keep it "
            f"(save your work: the class's idle timeout frees the GPU for others)"
        )
    return f"this session reaches the class's maximum length and ends {when}; save your work"
