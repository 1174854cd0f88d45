"""Classroom cohorts on the coordinator: who may do what, and leases run for a cohort.

:class:`CohortService` is what the REST handlers (:mod:`.cohort_handlers`) call. Every method
takes the signed caller's key and checks its role first: instructors (the creator and the
co-instructors) manage the cohort and see its dashboard; students join with a code (or are
added by roster) and lease on the cohort's pool; anyone else gets :class:`NotMember` /
:class:`NotInstructor` (403).

A student's lease request for a cohort (``POST /api/v1/leases`` with ``"cohort"``) runs::

    cohort, restricted = await cohorts.check_request(user, cohort_id, request)
    grant = await leases.request(user, restricted, cohort_id=cohort_id)

(:meth:`CohortService.request_lease` does both, one request per student at a time). The
check refuses a non-member (403), an ended cohort or a past term (409 ``cohort_ended``), a
GPU type the cohort does not pay for (409 ``not_covered``), a student at the cohort's
concurrent-kernel limit (429 ``too_many_kernels``) and a student whose weekly quota is used up
(402 ``quota_exhausted``, saying when the week resets); the request is then narrowed to the
cohort's GPU types under its price cap.

The weekly quota also holds during a session: :class:`QuotaWatch` keeps one timer per active
cohort lease, due when its student's quota runs out at the rate their live leases use it,
and ends the student's cohort leases then (:data:`~jupyter_io.cohorts.QUOTA_USED_UP`).
Usage is GPU-seconds of service the coordinator observed (active time x GPUs,
:func:`~jupyter_io.coordinator.store.cohorts.gpu_seconds`) in the ISO week (UTC).

Hooks for the other parts of issue 14 (all optional): :attr:`CohortService.removed_listeners`
and :attr:`CohortService.ended_listeners` (the queue drops tickets), :attr:`allowances_of`
(the students' allowances on-chain, from which the dashboard's pool figures follow:
:mod:`.cohort_allowances`), :attr:`queue_of`, :attr:`queued_of` and :attr:`idle_of` (the
queue's and the idle watch's figures).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from solders.pubkey import Pubkey

from ..cohorts import (
    COHORT_ENDED,
    MAX_COHORTS_PER_INSTRUCTOR,
    MAX_LIVE_CODES,
    MAX_STUDENTS,
    QUOTA_USED_UP,
    REMOVED_FROM_COHORT,
    CohortSettings,
    CohortView,
    StudentUsage,
    join_link,
    new_cohort_id,
    new_join_code,
    next_week_start,
    week_start,
)
from ..errors import AuthError, JupyterIOError, LeaseError
from ..gpu_names import normalise_gpu_name
from ..provider_link import End
from .cohort_allowances import pool_figures
from .cohort_tally import FinishedLeaseTally, settled_cost
from .jobs import LinkWatch, owned_here
from .lease_timers import LeaseTimers
from .leasing import LeaseGrant, LeaseService
from .models import CohortState, LeaseState
from .registry import Registry
from .scheduler import LeaseRequest, OfferIndex
from .store import CodeRecord, CohortRecord, LeaseRecord, Store
from .store.cohorts import gpu_seconds

__all__ = [
    "QUOTA_RECHECK_SECONDS",
    "QUOTA_WARNING_SECONDS",
    "CohortEnded",
    "CohortError",
    "CohortNotFound",
    "CohortService",
    "NotCovered",
    "NotInstructor",
    "NotMember",
    "QuotaExhausted",
    "QuotaWatch",
    "TooMany",
    "TooManyKernels",
]

#: Seconds before the quota runs out that a lease's JSON warns of it.
QUOTA_WARNING_SECONDS = 60.0
#: Seconds between two looks at a lease over quota whose provider is linked at another
#: replica (which ends it).
QUOTA_RECHECK_SECONDS = 5.0


class CohortError(JupyterIOError):
    """A cohort request refused for a reason of its own: ``status`` and ``code`` are the
    HTTP answer (``docs/cohorts.md``)."""

    status = 409
    code = "conflict"


class CohortNotFound(CohortError):
    """No cohort has that id (404)."""

    status, code = 404, "not_found"


class NotInstructor(CohortError, AuthError):
    """Only the cohort's instructors may do this (403)."""

    status, code = 403, "forbidden"


class NotMember(CohortError, AuthError):
    """The caller is not (or no longer) a student of the cohort (403)."""

    status, code = 403, "not_member"


class CohortEnded(CohortError, LeaseError):
    """The cohort's term is over (409 ``cohort_ended``)."""

    status, code = 409, "cohort_ended"


class NotCovered(CohortError, LeaseError):
    """The cohort does not pay for that GPU type or price (409 ``not_covered``)."""

    status, code = 409, "not_covered"


class TooManyKernels(CohortError, LeaseError):
    """The student runs as many kernels as the cohort allows (429 ``too_many_kernels``)."""

    status, code = 429, "too_many_kernels"


class TooMany(CohortError):
    """A bound on what one key can make the coordinator store (429 ``too_many``)."""

    status, code = 429, "too_many"


class QuotaExhausted(CohortError, LeaseError):
    """The student's GPU-hours of this week are used up (402 ``quota_exhausted``);
    ``resets_at`` is the next Monday 00:00 UTC (Unix seconds)."""

    status, code = 402, "quota_exhausted"

    def __init__(self, message: str, resets_at: float) -> None:
        super().__init__(message)
        self.resets_at = resets_at


def _utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=timezone.utc)


def _hours(seconds: int) -> str:
    return f"{seconds / 3600:.2f}".rstrip("0").rstrip(".") + " GPU-h"


def _until(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{max(1, math.ceil(seconds / 60))} min"


class CohortService:
    """Cohort operations for signed callers (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        leases: LeaseService,
        registry: Registry,
        index: OfferIndex,
        *,
        public_url: Callable[[], str] = lambda: "",
        clock: Callable[[], float] | None = None,
        log: logging.Logger | None = None,
    ) -> None:
        self.store = store
        self.leases = leases
        self.registry = registry
        self.index = index
        #: The coordinator's URL as students reach it (for join links).
        self.public_url = public_url
        self.clock = clock or leases.clock
        self.log = log or logging.getLogger("jupyter_io.coordinator")
        self.quota = QuotaWatch(self)
        #: The term's spend on the dashboard, without reading every lease of the term.
        self.tally = FinishedLeaseTally(store)
        #: ``(cohort_id, student)`` after a student was removed (their leases ended).
        self.removed_listeners: list[Callable[[str, str], None]] = []
        #: ``(cohort_id)`` after a cohort's term was ended (its leases ended).
        self.ended_listeners: list[Callable[[str], None]] = []
        #: The students' allowances on-chain (payments contract section 6), read in one
        #: batch for the dashboard: ``(blocks by student, read at)``
        #: (:meth:`.cohort_allowances.AllowanceReader.read`). None: no pool on-chain, for
        #: :attr:`no_pool_reason`.
        self.allowances_of: (
            Callable[
                [CohortRecord, Sequence[str]],
                Awaitable[tuple[Mapping[str, dict[str, Any] | None], float]],
            ]
            | None
        ) = None
        #: Why the dashboard's pool figures are null when :attr:`allowances_of` is None.
        self.no_pool_reason = "this coordinator runs free leases (payments = free): no pool"
        #: The cohort's queue (JSON rows), and how many tickets a student has in it.
        self.queue_of: Callable[[str], list[dict[str, Any]]] | None = None
        self.queued_of: Callable[[str, str], int] | None = None
        #: Seconds a lease has been idle (None when unknown).
        self.idle_of: Callable[[str], float | None] | None = None
        self._admitting: dict[tuple[str, str], asyncio.Lock] = {}

    async def start(self) -> None:
        """Watch the quota of every active cohort lease (a restarted coordinator's too)."""
        await self.quota.start()

    async def stop(self) -> None:
        """Cancel the quota timers."""
        await self.quota.stop()

    # -- reading -----------------------------------------------------------------------------

    async def cohort(self, cohort_id: str) -> CohortRecord:
        """The cohort, or :class:`CohortNotFound`."""
        record = await self.store.get_cohort(cohort_id)
        if record is None:
            raise CohortNotFound(
                f"no cohort {cohort_id!r}; check the id `jupyter io cohort list` shows"
            )
        return record

    async def role(self, user: Pubkey, cohort: CohortRecord) -> str | None:
        """The caller's role in ``cohort``: instructor, co_instructor, student or None."""
        role = cohort.role_of(str(user))
        if role is None and await self.store.is_member(cohort.id, str(user)):
            role = "student"
        return role

    async def instructed(self, user: Pubkey, cohort_id: str) -> CohortRecord:
        """The cohort, if ``user`` is one of its instructors; else :class:`NotInstructor`."""
        cohort = await self.cohort(cohort_id)
        if cohort.role_of(str(user)) is None:
            raise NotInstructor(f"only the instructors of cohort {cohort.name!r} may do this")
        return cohort

    async def get(self, user: Pubkey, cohort_id: str) -> CohortView:
        """The cohort as its instructors or students see it (a student's with ``me``)."""
        cohort = await self.cohort(cohort_id)
        role = await self.role(user, cohort)
        if role is None:
            raise NotMember(
                f"you are not in cohort {cohort_id}: join it with the code your instructor gave you"
            )
        me = await self.usage_of(cohort, str(user)) if role == "student" else None
        return await self.view(cohort, role, me)

    async def of_user(self, user: Pubkey) -> list[CohortView]:
        """The cohorts where ``user`` has a role, newest first, each with ``role``."""
        views = []
        for cohort, role in await self.store.cohorts_of(str(user)):
            me = await self.usage_of(cohort, str(user)) if role == "student" else None
            views.append(await self.view(cohort, role, me))
        return views

    async def view(
        self, cohort: CohortRecord, role: str | None = None, me: StudentUsage | None = None
    ) -> CohortView:
        """``cohort`` in the API's shape."""
        return CohortView(
            id=cohort.id,
            name=cohort.name,
            instructor=cohort.instructor,
            instructors=cohort.instructors,
            gpu_types=cohort.gpu_types,
            max_price_lamports_per_hour=cohort.max_price_lamports_per_hour,
            quota_gpu_seconds_per_week=cohort.quota_gpu_seconds_per_week,
            max_concurrent_per_student=cohort.max_concurrent_per_student,
            idle_timeout_seconds=cohort.idle_timeout_seconds,
            max_session_seconds=cohort.max_session_seconds,
            queue_max_wait_seconds=cohort.queue_max_wait_seconds,
            student_cap_lamports=cohort.student_cap_lamports,
            term_ends_at=cohort.term_ends_at.timestamp(),
            requirements=cohort.requirements,
            environment_sha256=cohort.environment_sha256,
            state=cohort.state.value,
            created_at=cohort.created_at.timestamp(),
            ended_at=None if cohort.ended_at is None else cohort.ended_at.timestamp(),
            students=await self.store.member_count(cohort.id),
            role=role,
            me=me,
        )

    async def usage_of(self, cohort: CohortRecord, student: str) -> StudentUsage:
        """``student``'s week in ``cohort`` (their ``me``, a dashboard row)."""
        rows = await self._week_rows(cohort, [student])
        return rows[0]

    # -- instructors -------------------------------------------------------------------------

    async def create(self, user: Pubkey, settings: CohortSettings) -> CohortView:
        """A new cohort with ``user`` as its instructor (:class:`TooMany` past
        :data:`~jupyter_io.cohorts.MAX_COHORTS_PER_INSTRUCTOR` active ones)."""
        if await self.store.active_cohorts_of(str(user)) >= MAX_COHORTS_PER_INSTRUCTOR:
            raise TooMany(
                f"you already teach {MAX_COHORTS_PER_INSTRUCTOR} active cohorts: end one "
                f"(`jupyter io cohort end`) before creating another"
            )
        cohort = await self.store.create_cohort(
            instructor=str(user), settings=settings, cohort_id=new_cohort_id(), at=self._now()
        )
        self.log.info("cohort %s (%r) created by %s", cohort.id, cohort.name, user)
        return await self.view(cohort, "instructor")

    async def patch(self, user: Pubkey, cohort_id: str, changes: dict[str, Any]) -> CohortView:
        """Change settings (checked by :func:`jupyter_io.cohorts.parse_patch`); the quota
        watch re-reads a changed quota at once."""
        cohort = await self.instructed(user, cohort_id)
        self._still_active(cohort)
        updated = await self.store.update_cohort(cohort_id, **changes)
        assert updated is not None
        if "quota_gpu_seconds_per_week" in changes:
            for lease in await self.store.cohort_live_leases(cohort_id):
                self.quota.watch(lease)
        return await self.view(updated, updated.role_of(str(user)))

    async def create_code(
        self, user: Pubkey, cohort_id: str, ttl_seconds: int, max_uses: int | None
    ) -> dict[str, Any]:
        """A join code: ``{"code", "link", "expires_at", "max_uses"}``."""
        cohort = await self.instructed(user, cohort_id)
        self._still_active(cohort)
        now = self._now()
        if await self.store.live_code_count(cohort_id, now) >= MAX_LIVE_CODES:
            raise TooMany(
                f"cohort {cohort.name!r} has {MAX_LIVE_CODES} valid join codes: revoke some "
                f"first (`jupyter io cohort revoke-code`)"
            )
        expires = min(now + timedelta(seconds=ttl_seconds), cohort.term_ends_at)
        record = await self.store.create_code(
            cohort_id, new_join_code(), expires_at=expires, max_uses=max_uses, at=now
        )
        return self.code_json(record)

    def code_json(self, record: CodeRecord) -> dict[str, Any]:
        """A code as the API shows it, with its join link."""
        return {
            "code": record.code,
            "link": join_link(self.public_url(), record.code),
            "expires_at": record.expires_at.timestamp(),
            "max_uses": record.max_uses,
            "uses": record.uses,
            "revoked": record.revoked,
        }

    async def codes(self, user: Pubkey, cohort_id: str) -> list[dict[str, Any]]:
        """The cohort's codes, newest first."""
        await self.instructed(user, cohort_id)
        return [self.code_json(record) for record in await self.store.codes(cohort_id)]

    async def revoke_code(self, user: Pubkey, cohort_id: str, code: str) -> None:
        """Revoke a code of the cohort (:class:`CohortNotFound` when it has no such code)."""
        await self.instructed(user, cohort_id)
        if not await self.store.revoke_code(cohort_id, code):
            raise CohortNotFound(f"cohort {cohort_id} has no join code {code}")

    async def add_students(
        self, user: Pubkey, cohort_id: str, students: list[str]
    ) -> tuple[list[str], list[str]]:
        """A roster import: (added, already members). Students removed earlier come back."""
        cohort = await self.instructed(user, cohort_id)
        self._still_active(cohort)
        if await self.store.member_count(cohort_id) + len(students) > MAX_STUDENTS:
            raise TooMany(f"a cohort has at most {MAX_STUDENTS} students")
        return await self.store.add_members(cohort_id, students, at=self._now())

    async def remove_student(self, user: Pubkey, cohort_id: str, student: str) -> int:
        """Remove a student: their live leases on the cohort end
        (:data:`~jupyter_io.cohorts.REMOVED_FROM_COHORT`), the listeners drop their queue
        tickets. Returns how many leases ended; :class:`CohortNotFound` for a non-member."""
        await self.instructed(user, cohort_id)
        if not await self.store.remove_member(cohort_id, student, at=self._now()):
            raise CohortNotFound(f"{student} is not a student of cohort {cohort_id}")
        ended = await self._end_leases(
            await self.store.cohort_live_leases(cohort_id, student=student), REMOVED_FROM_COHORT
        )
        for listener in list(self.removed_listeners):
            self._call(listener, cohort_id, student)
        self.log.info("cohort %s: %s removed by %s", cohort_id, student, user)
        return ended

    async def add_instructor(self, user: Pubkey, cohort_id: str, pubkey: str) -> CohortView:
        """Make ``pubkey`` a co-instructor (any instructor may)."""
        cohort = await self.instructed(user, cohort_id)
        if pubkey == cohort.instructor:
            raise CohortError(f"{pubkey} created cohort {cohort.name!r}: an instructor already")
        await self.store.add_instructor(cohort_id, pubkey, at=self._now())
        return await self.view(await self.cohort(cohort_id), cohort.role_of(str(user)))

    async def remove_instructor(self, user: Pubkey, cohort_id: str, pubkey: str) -> CohortView:
        """Remove a co-instructor (any instructor may, but nobody removes the creator)."""
        cohort = await self.instructed(user, cohort_id)
        if pubkey == cohort.instructor:
            raise NotInstructor(f"the creator of cohort {cohort.name!r} cannot be removed")
        if not await self.store.remove_instructor(cohort_id, pubkey):
            raise CohortNotFound(f"{pubkey} is not a co-instructor of cohort {cohort_id}")
        return await self.view(await self.cohort(cohort_id), cohort.role_of(str(user)))

    async def end(self, user: Pubkey, cohort_id: str) -> CohortView:
        """End the term: codes revoked, live leases ended
        (:data:`~jupyter_io.cohorts.COHORT_ENDED`), the listeners empty the queue.
        Idempotent."""
        await self.instructed(user, cohort_id)
        await self.store.end_cohort(cohort_id, at=self._now())
        await self._end_leases(await self.store.cohort_live_leases(cohort_id), COHORT_ENDED)
        for listener in list(self.ended_listeners):
            self._call(listener, cohort_id)
        cohort = await self.cohort(cohort_id)
        return await self.view(cohort, cohort.role_of(str(user)))

    async def dashboard(self, user: Pubkey, cohort_id: str) -> dict[str, Any]:
        """The instructors' dashboard: ``{"cohort", "students", "pool", "queue",
        "generated_at"}`` (``docs/cohorts.md``)."""
        cohort = await self.instructed(user, cohort_id)
        members = await self.store.members(cohort_id)
        students = [m.student for m in members]
        now = self._now()
        since = week_start(now)
        week = await self.store.cohort_leases_since(cohort.id, since)
        finished = [lease.id for lease in week if lease.funded and not lease.live]
        settlements = await self.store.settlements_of(finished) if finished else {}
        spent_week = sum(
            settled_cost(lease, since, now, settlements.get(lease.id)) for lease in week
        )
        spent = await self._spent_term(cohort)
        allowances: Mapping[str, dict[str, Any] | None] | None = None
        pool: dict[str, Any] = {
            "allowance_lamports": None,
            "spent_lamports_term": spent,
            "spent_lamports_week": spent_week,
            "projected_run_out": None,
            "reason": self.no_pool_reason,
        }
        if self.allowances_of is not None:
            try:
                allowances, read_at = await self.allowances_of(cohort, students)
            except JupyterIOError as exc:
                pool["reason"] = f"the allowances could not be read on-chain: {exc}"
            else:
                pool = pool_figures(
                    allowances,
                    spent_term=spent,
                    spent_week=spent_week,
                    week_start=since.timestamp(),
                    now=now.timestamp(),
                    read_at=read_at,
                )
        rows = await self._week_rows(cohort, students, members, leases=week, allowances=allowances)
        return {
            "cohort": (await self.view(cohort, cohort.role_of(str(user)))).to_json(),
            "students": [row.to_json() for row in rows],
            "pool": pool,
            "queue": self.queue_of(cohort_id) if self.queue_of is not None else [],
            "generated_at": self.clock(),
        }

    # -- students ------------------------------------------------------------------------------

    async def join(self, user: Pubkey, code: str) -> CohortView:
        """Join the cohort of ``code`` as a student (again: a no-op). Raises
        :class:`CodeRefused` (unknown, expired, revoked, used up, removed, ended)."""
        now = self._now()
        record = await self.store.redeem_code(code, str(user), at=now, max_students=MAX_STUDENTS)
        cohort, joined = record
        if cohort.role_of(str(user)) is not None and joined:
            await self.store.remove_member(cohort.id, str(user), at=now)
            raise CohortError(f"you teach cohort {cohort.name!r}: instructors do not join it")
        if joined:
            self.log.info("cohort %s: %s joined", cohort.id, user)
        return await self.view(cohort, "student", await self.usage_of(cohort, str(user)))

    async def check_request(
        self, user: Pubkey, cohort_id: str, request: LeaseRequest
    ) -> tuple[CohortRecord, LeaseRequest]:
        """Whether ``user`` may lease ``request`` on the cohort now, and the request narrowed
        to the cohort's GPU types under its price cap. Raises :class:`CohortNotFound`,
        :class:`NotMember`, :class:`CohortEnded`, :class:`NotCovered`,
        :class:`TooManyKernels` or :class:`QuotaExhausted`, each saying what to do."""
        cohort = await self.cohort(cohort_id)
        student = str(user)
        if not await self.store.is_member(cohort_id, student):
            raise NotMember(
                f"you are not a student of cohort {cohort.name!r}: join it with its code, "
                f"or lease without 'cohort' on your own wallet"
            )
        self._still_active(cohort)
        restricted = self._restrict(cohort, request)
        live = await self.store.cohort_live_leases(cohort_id, student=student)
        if len(live) >= cohort.max_concurrent_per_student:
            raise TooManyKernels(
                f"cohort {cohort.name!r} allows {cohort.max_concurrent_per_student} kernel(s) "
                f"at a time per student and you run {len(live)}: shut one down first"
            )
        now = self._now()
        used = (
            await self.store.cohort_usage(cohort_id, week_start(now), now=now, student=student)
        ).get(student, 0)
        if used >= cohort.quota_gpu_seconds_per_week:
            resets = next_week_start(now)
            raise QuotaExhausted(
                f"you used your {_hours(cohort.quota_gpu_seconds_per_week)} of cohort "
                f"{cohort.name!r} this week; it resets {resets:%A %d %b %H:%M} UTC (in "
                f"{_until((resets - now).total_seconds())})",
                resets.timestamp(),
            )
        return cohort, restricted

    async def request_lease(
        self, user: Pubkey, cohort_id: str, request: LeaseRequest, **options: Any
    ) -> LeaseGrant:
        """Check (:meth:`check_request`) and lease for the cohort, one request of a student
        at a time (two racing requests cannot both pass the concurrency check here).
        ``options`` go to :meth:`LeaseService.request` (``latencies=``)."""
        async with self._admission(cohort_id, str(user)):
            _, restricted = await self.check_request(user, cohort_id, request)
            return await self.leases.request(user, restricted, cohort_id=cohort_id, **options)

    # -- internals -------------------------------------------------------------------------

    def _now(self) -> datetime:
        return _utc(self.clock())

    def _still_active(self, cohort: CohortRecord) -> None:
        if cohort.state is CohortState.ENDED:
            raise CohortEnded(f"the term of cohort {cohort.name!r} was ended by its instructor")
        if self._now() >= cohort.term_ends_at:
            raise CohortEnded(
                f"the term of cohort {cohort.name!r} ended at "
                f"{cohort.term_ends_at:%Y-%m-%d %H:%M} UTC"
            )

    def _restrict(self, cohort: CohortRecord, request: LeaseRequest) -> LeaseRequest:
        """``request`` narrowed to one of the cohort's GPU types, under its price cap."""
        cap = cohort.max_price_lamports_per_hour
        if request.max_price_lamports_per_hour is not None:
            cap = min(cap, request.max_price_lamports_per_hour)
        covered = {normalise_gpu_name(name) for name in cohort.gpu_types}
        types = ", ".join(cohort.gpu_types)
        names = list(cohort.gpu_types)
        if request.gpu is not None:
            if normalise_gpu_name(request.gpu) not in covered:
                raise NotCovered(
                    f"cohort {cohort.name!r} pays for {types}, not {request.gpu}: choose one "
                    f"of those, or lease without 'cohort' on your own wallet"
                )
            names = [request.gpu]
        # The type whose cheapest free GPU under the cap is cheapest.
        best: tuple[int, str] | None = None
        for name in names:
            # The cohort's own reservation holds count as free for it (cohort=).
            wanted = _with(request, gpu=name, cap=cap)
            found = self.index.candidates(wanted, limit=1, cohort=cohort.id)
            if found and (best is None or found[0].price_lamports_per_hour < best[0]):
                best = (found[0].price_lamports_per_hour, name)
        if best is not None:
            return _with(request, gpu=best[1], cap=cap)
        # None free under the cap: the cap, or capacity (then the scheduler says it is full,
        # and the queue takes the request)?
        keys = {normalise_gpu_name(name) for name in names}
        prices = [o.price_lamports_per_hour for o in self.index if o.gpu_key in keys]
        if prices and min(prices) > cap:
            raise NotCovered(
                f"{' or '.join(names)} GPUs cost at least {min(prices)} lamports per GPU-hour "
                f"now, above the {cap} that cohort {cohort.name!r} pays; ask your instructor "
                f"to raise the cap"
            )
        on_offer = self.index.gpu_types()
        listed = [n for n in names if normalise_gpu_name(n) in on_offer]
        return _with(request, gpu=(listed or names)[0], cap=cap)

    @contextlib.asynccontextmanager
    async def _admission(self, cohort_id: str, student: str) -> AsyncIterator[None]:
        key = (cohort_id, student)
        lock = self._admitting.setdefault(key, asyncio.Lock())
        try:
            async with lock:
                yield
        finally:
            if not lock.locked() and self._admitting.get(key) is lock:
                del self._admitting[key]

    async def _week_rows(
        self,
        cohort: CohortRecord,
        students: list[str],
        members: list[Any] | None = None,
        *,
        leases: list[LeaseRecord] | None = None,
        allowances: Mapping[str, dict[str, Any] | None] | None = None,
    ) -> list[StudentUsage]:
        now = self._now()
        since = week_start(now)
        resets = next_week_start(now).timestamp()
        if leases is None:
            leases = await self.store.cohort_leases_since(cohort.id, since)
        joined = {m.student: m.joined_at.timestamp() for m in members or []}
        by_student: dict[str, list[LeaseRecord]] = {}
        for lease in leases:
            by_student.setdefault(lease.user_pubkey, []).append(lease)
        # A finished funded lease cost what its settlement paid once that is done.
        finished = [lease.id for lease in leases if lease.funded and not lease.live]
        settlements = await self.store.settlements_of(finished) if finished else {}
        rows = []
        for student in students:
            mine = by_student.get(student, [])
            used = sum(gpu_seconds(lease, since, now) for lease in mine)
            live = [lease for lease in mine if lease.live]
            idle = None
            if self.idle_of is not None:
                idles = [self.idle_of(lease.id) for lease in live]
                known = [value for value in idles if value is not None]
                idle = int(min(known)) if known else None
            allowance = allowances.get(student) if allowances is not None else None
            rows.append(
                StudentUsage(
                    student=student,
                    gpu_seconds_week=used,
                    cost_lamports_week=sum(
                        settled_cost(lease, since, now, settlements.get(lease.id)) for lease in mine
                    ),
                    live_kernels=len(live),
                    idle_seconds=idle,
                    queued=self.queued_of(cohort.id, student) if self.queued_of else 0,
                    quota_left_gpu_seconds=max(0, cohort.quota_gpu_seconds_per_week - used),
                    week_resets_at=resets,
                    joined_at=joined.get(student),
                    allowance=allowance,
                )
            )
        return rows

    async def _spent_term(self, cohort: CohortRecord) -> int:
        return await self.tally.cost_since(cohort.id, cohort.created_at, self._now())

    async def _end_leases(self, leases: list[LeaseRecord], reason: str) -> int:
        ended = 0
        for lease in leases:
            if await self.store.end_lease(lease.id, reason, at=self._now()):
                ended += 1
                provider = lease.provider_pubkey
                self.registry.deliver(provider, End(lease.id, reason), ttl=60.0)
                self.registry.lease_over(provider, lease.id, ok=True, reason=reason)
                self.quota.forget(lease.id)
        return ended

    def _call(self, listener: Callable[..., None], *args: Any) -> None:
        try:
            listener(*args)
        except Exception:
            self.log.exception("a cohort listener failed")


def _with(request: LeaseRequest, *, gpu: str, cap: int) -> LeaseRequest:
    return LeaseRequest(
        gpu=gpu,
        min_vram_bytes=request.min_vram_bytes,
        gpus=request.gpus,
        max_price_lamports_per_hour=cap,
        region=request.region,
        max_latency_ms=request.max_latency_ms,
        min_reliability=request.min_reliability,
    )


class QuotaWatch:
    """Ends a student's cohort leases when their weekly quota runs out mid-session.

    One :class:`~jupyter_io.coordinator.lease_timers.LeaseTimers` timer per active cohort
    lease, due when the student's quota left, used at the rate of all their active leases
    of the cohort (GPUs per second), reaches zero; armed at activation, when the coordinator
    starts and when the lease's provider links here, and re-armed when the quota changes.
    When it fires the usage is measured again from the store: still within quota (a lease
    ended meanwhile, a new week began, the quota was raised) re-arms; otherwise every live
    lease of that student in the cohort ends with :data:`~jupyter_io.cohorts.QUOTA_USED_UP`,
    by the replica holding the link of the lease's provider (:mod:`~.jobs`; another replica
    watching it only shows when it runs out, and looks again :data:`QUOTA_RECHECK_SECONDS`
    later).
    """

    def __init__(self, service: CohortService) -> None:
        self.service = service
        self._timers = LeaseTimers(self._check, what="cohort quota check", log=service.log)
        #: Leases this watch ended (tests, status).
        self.ended = 0
        #: When each watched lease's student runs out of quota at the current rate (Unix).
        self._runs_out: dict[str, float] = {}
        self._links = LinkWatch(service.store, service.registry, self.watch, log=service.log)

    async def start(self) -> None:
        self._links.start()
        self.service.registry.activation_listeners.append(self.watch)
        self.service.leases.notices.append(self.notice)
        for lease in await self.service.store.live_leases():
            if lease.cohort_id is not None and lease.state is LeaseState.ACTIVE:
                self.watch(lease)

    async def stop(self) -> None:
        with contextlib.suppress(ValueError):
            self.service.registry.activation_listeners.remove(self.watch)
        with contextlib.suppress(ValueError):
            self.service.leases.notices.remove(self.notice)
        await self._links.stop()
        await self._timers.stop()

    def forget(self, lease_id: str) -> None:
        self._timers.cancel(lease_id)
        self._runs_out.pop(lease_id, None)

    def runs_out(self, lease_id: str) -> float | None:
        """When the quota of ``lease_id``'s student runs out at the rate measured last (Unix
        seconds), or None (not watched, or not within this week)."""
        return self._runs_out.get(lease_id)

    def notice(self, lease: LeaseRecord) -> dict[str, Any]:
        """The lease JSON's quota fields (:attr:`LeaseService.notices`): ``ends_at`` when the
        quota runs out at the current rate and, within :data:`QUOTA_WARNING_SECONDS` of
        it, a ``quota`` warning."""
        due = self._runs_out.get(lease.id) if lease.live else None
        if due is None:
            return {}
        warnings = []
        left = due - self.service.clock()
        if left <= QUOTA_WARNING_SECONDS:
            warnings.append(
                {
                    "kind": "quota",
                    "at": due,
                    "message": f"your week's GPU quota of the class runs out in "
                    f"{max(0, math.ceil(left))} s: the session ends then",
                }
            )
        return {"warnings": warnings, "ends_at": due}

    def watch(self, lease: LeaseRecord) -> None:
        """(Re)arm ``lease``'s check: at once (the check measures and arms the real due
        time). Only active cohort leases are watched."""
        if lease.cohort_id is None or lease.state is not LeaseState.ACTIVE:
            return
        self._timers.arm(lease.id, 0.0)

    async def _check(self, lease_id: str) -> None:
        service = self.service
        store = service.store
        lease = await store.get_lease(lease_id)
        if lease is None or lease.cohort_id is None or lease.state is not LeaseState.ACTIVE:
            self._runs_out.pop(lease_id, None)
            return
        cohort = await store.get_cohort(lease.cohort_id)
        if cohort is None:
            return
        now = service._now()
        since = week_start(now)
        student = lease.user_pubkey
        mine = await store.cohort_leases_since(cohort.id, since, student=student)
        used = sum(gpu_seconds(other, since, now) for other in mine)
        left = cohort.quota_gpu_seconds_per_week - used
        if left > 0:
            rate = sum(len(other.gpu_indices) for other in mine if other.state is LeaseState.ACTIVE)
            # At most until the week ends: usage is measured afresh then.
            due = min(left / max(1, rate), (next_week_start(now) - now).total_seconds())
            if due < (next_week_start(now) - now).total_seconds():
                self._runs_out[lease_id] = now.timestamp() + due
            else:
                self._runs_out.pop(lease_id, None)
            self._timers.arm(lease_id, due)
            return
        if not owned_here(service.registry, lease.provider_pubkey):
            # The replica holding the provider's link ends it (or the provider is lost).
            self._runs_out[lease_id] = now.timestamp()
            self._timers.arm(lease_id, QUOTA_RECHECK_SECONDS)
            return
        live = await store.cohort_live_leases(cohort.id, student=student)
        ended = await service._end_leases(live, QUOTA_USED_UP)
        self.ended += ended
        if ended:
            service.log.info(
                "cohort %s: %s used the week's %d GPU-seconds; %d lease(s) ended",
                cohort.id,
                student,
                cohort.quota_gpu_seconds_per_week,
                ended,
            )
