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

A funded lease's cost is what it paid once its settlement is done (:func:`settled_cost`:
the amount the provider got on-chain, which the billed seconds bound, and those may be fewer
than the seconds observed active: the provider's reports and the user's acknowledgements
bound them). Until then it is the observed cost, and it is not kept.
"""

from __future__ import annotations

from collections import OrderedDict
from datetime import datetime

from .models import SettlementState
from .store import LeaseRecord, SettlementRecord, Store
from .store.cohorts import lease_cost

__all__ = ["FinishedLeaseTally", "cost_is_final", "settled_cost"]

#: Leases whose rows are read in one query.
_BATCH = 500


def settled_cost(
    lease: LeaseRecord, since: datetime, now: datetime, settlement: SettlementRecord | None
) -> int:
    """Lamports ``lease`` cost between ``since`` and ``now``: at its price for the seconds
    it was active (:func:`~jupyter_io.coordinator.store.cohorts.lease_cost`), at most what
    its settlement paid the provider once that is done (the exact on-chain amount)."""
    cost = lease_cost(lease, since, now)
    if settlement is not None and settlement.state is SettlementState.DONE:
        return min(cost, settlement.amount_lamports)
    return cost


def cost_is_final(lease: LeaseRecord, settlement: SettlementRecord | None) -> bool:
    """Whether a finished lease's cost can no longer change: unfunded (nothing to settle),
    or its settlement is done."""
    if not lease.funded:
        return True
    return settlement is not None and settlement.state is SettlementState.DONE


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
            leases = await self.store.leases_by_ids(missing[start : start + _BATCH])
            funded = [lease.id for lease in leases if lease.funded]
            settlements = await self.store.settlements_of(funded) if funded else {}
            for lease in leases:
                self.rows_read += 1
                settlement = settlements.get(lease.id)
                cost = settled_cost(lease, since, now, settlement)
                end = lease.end_of_service or lease.ended_at
                if end is not None and end <= now and cost_is_final(lease, settlement):
                    costs[lease.id] = cost
                else:
                    unsettled += cost
        self._costs[key] = costs
        while len(self._costs) > self.windows:
            self._costs.popitem(last=False)
        done = set(finished)
        running = sum(lease_cost(lease, since, now) for lease in live if lease.id not in done)
        return sum(costs.values()) + unsettled + running
