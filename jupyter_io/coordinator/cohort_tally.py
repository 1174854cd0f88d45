"""What a cohort's leases cost since a time, without reading every lease each time (issue 14).

The instructors' dashboard shows the term's spend (``spent_lamports_term``) and Lab asks for
it every few seconds; reading every lease of a term each time costs the coordinator some
100-200 ms for a class of 300 students with 20 sessions each
(``benchmarks/bench_cohort_usage.py``). A finished lease's times never change again (the
store sets its state, ``ended_at`` and ``end_of_service`` in one statement, and only from a
live state), so :class:`FinishedLeaseTally` keeps what each finished lease cost and reads,
each time, the cohort's live leases and the ids of its finished ones (narrow, indexed), and
the rows of only those finished leases it has not seen. The sum is the one a full read gives
(a lease that finishes between the two reads is counted once, finished).
"""

from __future__ import annotations

from collections import OrderedDict
from datetime import datetime

from .store import Store
from .store.cohorts import lease_cost

__all__ = ["FinishedLeaseTally"]

#: Leases whose rows are read in one query.
_BATCH = 500


class FinishedLeaseTally:
    """Lamports a cohort's leases cost since a time (see the module docstring); keeps the
    finished leases' costs of the ``windows`` (cohort, since) pairs asked for last."""

    def __init__(self, store: Store, *, windows: int = 16) -> None:
        self.store = store
        self.windows = windows
        self._costs: OrderedDict[tuple[str, datetime], dict[str, int]] = OrderedDict()
        #: Finished leases whose rows were read (for tests and benchmarks).
        self.rows_read = 0

    async def cost_since(self, cohort_id: str, since: datetime, now: datetime) -> int:
        """Lamports the cohort's leases cost from ``since`` to ``now`` (each at its price
        per GPU-hour, :func:`~jupyter_io.coordinator.store.cohorts.lease_cost`)."""
        live = await self.store.cohort_live_leases(cohort_id)  # first: see the docstring
        finished = await self.store.cohort_finished_lease_ids(cohort_id, since)
        key = (cohort_id, since)
        known = self._costs.pop(key, {})
        costs = {lease_id: known[lease_id] for lease_id in finished if lease_id in known}
        missing = [lease_id for lease_id in finished if lease_id not in known]
        unsettled = 0  # ended after ``now`` by another clock: not kept
        for start in range(0, len(missing), _BATCH):
            for lease in await self.store.leases_by_ids(missing[start : start + _BATCH]):
                self.rows_read += 1
                cost = lease_cost(lease, since, now)
                end = lease.end_of_service or lease.ended_at
                if end is not None and end <= now:
                    costs[lease.id] = cost
                else:
                    unsettled += cost
        self._costs[key] = costs
        while len(self._costs) > self.windows:
            self._costs.popitem(last=False)
        done = set(finished)
        running = sum(lease_cost(lease, since, now) for lease in live if lease.id not in done)
        return sum(costs.values()) + unsettled + running
