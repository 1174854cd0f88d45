"""The pool's on-chain figures on a class's dashboard: each student's allowance, read exactly.

:class:`AllowanceReader` reads the allowances of a cohort's students (payments contract
section 6: the instructor's wSOL account per student, delegated to the [student, arbiter]
2-of-2) with :meth:`~jupyter_io.payments.cohort_pool.CohortPoolClient.allowance_states`, so
every figure is the exact on-chain state, checked field by field. One read covers the whole
roster: ``getMultipleAccounts`` of 100 keys a call, sent at once, delegates verified once and
not read again; its result is kept ``ttl`` seconds per cohort, and dashboards asking at once
share one read. A dashboard of 300 funded students refreshed every 10 s therefore costs 3
calls per refresh, and nothing more for a second instructor's tab within ``ttl``.

Keys are free and a roster may hold 5,000 students, so what all dashboards together may
read is rationed (:class:`ReadBudget`, accounts a second): past it a dashboard gets the
class's last read however old (its ``read_at`` says when), or none with the reason.

:func:`allowance_json` is a row's ``allowance`` block, :func:`pool_figures` the dashboard's
``pool`` (``docs/cohorts.md``, "The pool on the dashboard").
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from solders.pubkey import Pubkey

from ..errors import PaymentError
from ..payments.cohort_pool import (
    AllowanceState,
    AllowanceTerms,
    CohortPoolClient,
    CohortPoolError,
)
from .store import CohortRecord

__all__ = [
    "KEPT_ALLOWANCES",
    "RUN_OUT_MIN_ELAPSED",
    "AllowanceReader",
    "ReadBudget",
    "allowance_json",
    "pool_figures",
]

#: The least time (seconds) this week's spend is spread over when projecting the run-out, so
#: a few minutes into Monday one session does not read as the week's pace.
RUN_OUT_MIN_ELAPSED = 3600.0
#: Allowance blocks the reader keeps from earlier reads (a few MB), least recent dropped first.
KEPT_ALLOWANCES = 20_000


def allowance_json(
    terms: AllowanceTerms, state: AllowanceState | CohortPoolError | None
) -> dict[str, Any] | None:
    """A dashboard row's ``allowance``: None when the student has none on-chain (never
    funded, or reclaimed); else ``{"address", "as_agreed", "problem", "amount_lamports",
    "delegated_lamports", "spendable_lamports"}``. An allowance not as agreed spends nothing
    (the arbiter co-signs no funding from it): spendable 0, amounts null, ``problem`` says
    which fields differ."""
    if state is None:
        return None
    if isinstance(state, CohortPoolError):
        return {
            "address": str(terms.allowance),
            "as_agreed": False,
            "problem": str(state),
            "amount_lamports": None,
            "delegated_lamports": None,
            "spendable_lamports": 0,
        }
    return {
        "address": str(state.address),
        "as_agreed": True,
        "problem": None,
        "amount_lamports": state.amount,
        "delegated_lamports": state.delegated_amount,
        "spendable_lamports": state.spendable,
    }


def pool_figures(
    allowances: Mapping[str, dict[str, Any] | None],
    *,
    spent_term: int,
    spent_week: int,
    week_start: float,
    now: float,
    read_at: float,
) -> dict[str, Any]:
    """The dashboard's ``pool`` from the students' allowance blocks (:func:`allowance_json`).

    ``allowance_lamports``: what the students can still spend, the sum of their spendable;
    ``held_lamports``: what their allowances hold (what a reclaim returns, rents aside);
    ``projected_run_out``: ``now + allowance_lamports / rate``, ``rate`` = ``spent_week`` /
    max(seconds since ``week_start``, :data:`RUN_OUT_MIN_ELAPSED`); None when no student has
    an allowance or nothing was spent this week (no pace to project), ``now`` when nothing
    is left."""
    blocks = [b for b in allowances.values() if b is not None]
    left = sum(int(b["spendable_lamports"]) for b in blocks)
    held = sum(int(b["amount_lamports"] or 0) for b in blocks)
    run_out: float | None = None
    if not blocks:
        run_out = None  # never funded (or all reclaimed): nothing to run out
    elif left <= 0:
        run_out = now
    elif spent_week > 0:
        rate = spent_week / max(now - week_start, RUN_OUT_MIN_ELAPSED)
        run_out = now + left / rate
    return {
        "allowance_lamports": left,
        "held_lamports": held,
        "spent_lamports_term": spent_term,
        "spent_lamports_week": spent_week,
        "projected_run_out": run_out,
        "students_funded": len(blocks),
        "not_as_agreed": sum(1 for b in blocks if not b["as_agreed"]),
        "read_at": read_at,
        "reason": None,
    }


class ReadBudget:
    """A token bucket of accounts read: ``rate`` a second on average, ``burst`` at once. A
    read larger than ``burst`` goes once the bucket is full and overdraws it (a class of any
    size stays readable); the next waits until it has refilled."""

    def __init__(
        self, rate: float, burst: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._tokens = burst
        self._at = clock()

    def take(self, accounts: int) -> bool:
        """Whether a read of ``accounts`` may go now (then they are spent)."""
        now = self.clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens < min(accounts, self.burst):
            return False
        self._tokens -= accounts
        return True


@dataclass(frozen=True, slots=True)
class _Read:
    at: float  # the reader's clock
    read_at: float  # Unix seconds
    students: frozenset[str]
    blocks: dict[str, dict[str, Any] | None]


class AllowanceReader:
    """Reads a cohort's allowances on-chain in one batch, kept ``ttl`` seconds per cohort
    (see the module docstring). ``arbiter`` is the coordinator's key (a party to each
    allowance); ``pool`` the client on the coordinator's ledger."""

    def __init__(
        self,
        pool: CohortPoolClient,
        arbiter: Pubkey,
        *,
        ttl: float = 5.0,
        accounts_per_second: float = 2000.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        log: logging.Logger | None = None,
    ) -> None:
        self.pool = pool
        self.arbiter = arbiter
        self.ttl = ttl
        self.clock = clock
        self.wall_clock = wall_clock
        self.log = log or logging.getLogger("jupyter_io.coordinator")
        #: What every dashboard together may read (a 10 s burst).
        self.budget = ReadBudget(accounts_per_second, 10 * accounts_per_second, clock=clock)
        self._reads: dict[str, _Read] = {}  # oldest read first
        self._kept = 0  # blocks in _reads
        self._flights: dict[str, tuple[frozenset[str], asyncio.Future[_Read]]] = {}

    async def read(
        self, cohort: CohortRecord, students: Sequence[str]
    ) -> tuple[dict[str, dict[str, Any] | None], float]:
        """Each of ``students``' allowance block (:func:`allowance_json`) and when the ledger
        was read (Unix seconds). :class:`~jupyter_io.errors.PaymentError` when the RPC
        cannot be read, or the budget is spent and there is no earlier read."""
        wanted = frozenset(students)
        now = self.clock()
        cached = self._reads.get(cohort.id)
        if cached is not None and wanted <= cached.students:
            if now - cached.at < self.ttl:
                return {s: cached.blocks[s] for s in students}, cached.read_at
        else:
            cached = None
        flight = self._flights.get(cohort.id)
        if flight is None or not wanted <= flight[0]:
            if not self.budget.take(len(wanted)):
                if cached is not None:  # stale, and its read_at says so
                    return {s: cached.blocks[s] for s in students}, cached.read_at
                raise PaymentError(
                    f"the coordinator reads at most {self.budget.rate:g} allowances a second "
                    f"for dashboards and is at that pace now; the figures come back within "
                    f"seconds"
                )
            future: asyncio.Future[_Read] = asyncio.ensure_future(self._read(cohort, wanted))
            self._flights[cohort.id] = flight = (wanted, future)
            future.add_done_callback(functools.partial(self._landed, cohort.id))
        done = await asyncio.shield(flight[1])
        return {s: done.blocks[s] for s in students}, done.read_at

    def forget(self, cohort_id: str) -> None:
        """Read ``cohort_id``'s allowances afresh next time (after a funding or a reclaim)."""
        read = self._reads.pop(cohort_id, None)
        if read is not None:
            self._kept -= len(read.blocks)

    def _landed(self, cohort_id: str, future: asyncio.Future[_Read]) -> None:
        flight = self._flights.get(cohort_id)
        if flight is not None and flight[1] is future:
            del self._flights[cohort_id]
        if future.cancelled() or future.exception() is not None:
            return
        # A class's last read is kept (served stale when the budget is spent), the least
        # recently read going first past KEPT_ALLOWANCES blocks (a few hundred bytes each).
        self._reads.pop(cohort_id, None)
        self._reads[cohort_id] = read = future.result()
        self._kept += len(read.blocks)
        while self._kept > KEPT_ALLOWANCES and len(self._reads) > 1:
            oldest = next(iter(self._reads))
            self._kept -= len(self._reads.pop(oldest).blocks)

    async def _read(self, cohort: CohortRecord, students: frozenset[str]) -> _Read:
        at = self.clock()
        instructor = Pubkey.from_string(cohort.instructor)
        terms: dict[str, AllowanceTerms] = {}
        blocks: dict[str, dict[str, Any] | None] = {}
        for student in sorted(students):
            try:
                terms[student] = AllowanceTerms(
                    instructor, Pubkey.from_string(student), self.arbiter, cohort.id
                )
            except (CohortPoolError, ValueError):
                blocks[student] = None  # no allowance can exist for it (the arbiter's own key)
        states = await self.pool.allowance_states(list(terms.values()))
        for (student, t), state in zip(terms.items(), states, strict=True):
            blocks[student] = allowance_json(t, state)
        return _Read(at, self.wall_clock(), students, blocks)
