"""Cohorts: a class sharing a pool, its instructors, students, join codes and reservations.

Records :class:`CohortRecord`, :class:`MemberRecord`, :class:`CodeRecord`,
:class:`ReservationRecord`; the queries are :class:`CohortQueries`, part of
:class:`~jupyter_io.coordinator.store.Store`. The service that decides who may do what is
:class:`~jupyter_io.coordinator.cohorts.CohortService`; these methods only read and write,
each in one transaction. A cohort's leases are ordinary leases with ``cohort_id`` set
(:meth:`~jupyter_io.coordinator.store.LeaseQueries.create_lease`); :func:`gpu_seconds` and
:func:`lease_cost` measure them.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from ...cohorts import PATCHABLE, CohortSettings
from ...errors import JupyterIOError
from ...payments.amounts import amount_for
from ..models import (
    LIVE_LEASE_STATES,
    Cohort,
    CohortCode,
    CohortInstructor,
    CohortMember,
    CohortReservation,
    CohortState,
    Lease,
)
from .engine import Aggregate, _aware, _when
from .leases import LeaseRecord, _lease_record

__all__ = [
    "CodeRecord",
    "CodeRefused",
    "CohortQueries",
    "CohortRecord",
    "MemberRecord",
    "ReservationRecord",
    "environment_sha256",
    "gpu_seconds",
    "lease_cost",
]

_LIVE = tuple(state.value for state in LIVE_LEASE_STATES)
_UTC = timezone.utc

_cohorts = cast(sa.Table, Cohort.__table__)
_instructors = cast(sa.Table, CohortInstructor.__table__)
_members = cast(sa.Table, CohortMember.__table__)
_codes = cast(sa.Table, CohortCode.__table__)
_reservations = cast(sa.Table, CohortReservation.__table__)
_leases = cast(sa.Table, Lease.__table__)


class CodeRefused(JupyterIOError):
    """A join code could not be redeemed; ``reason`` is one of ``unknown``, ``expired``,
    ``revoked``, ``used_up``, ``ended`` (the cohort's term is over), ``removed`` (an
    instructor removed this student) or ``full`` (the cohort has its most students)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class CohortRecord:
    """A cohort as stored; ``co_instructors`` are the instructors besides its creator."""

    id: str
    name: str
    instructor: str
    co_instructors: tuple[str, ...]
    gpu_types: tuple[str, ...]
    max_price_lamports_per_hour: int
    quota_gpu_seconds_per_week: int
    max_concurrent_per_student: int
    idle_timeout_seconds: int
    max_session_seconds: int
    queue_max_wait_seconds: int
    student_cap_lamports: int | None
    term_ends_at: datetime
    requirements: str | None
    environment_sha256: str | None
    state: CohortState
    created_at: datetime
    ended_at: datetime | None

    @property
    def instructors(self) -> tuple[str, ...]:
        """Every instructor, the creator first."""
        return (self.instructor, *self.co_instructors)

    def role_of(self, pubkey: str) -> str | None:
        """``"instructor"``, ``"co_instructor"`` or None (students: see ``is_member``)."""
        if pubkey == self.instructor:
            return "instructor"
        if pubkey in self.co_instructors:
            return "co_instructor"
        return None


@dataclass(frozen=True, slots=True)
class MemberRecord:
    """A student of a cohort; ``removed_at`` set once an instructor removed them."""

    cohort_id: str
    student: str
    joined_at: datetime
    removed_at: datetime | None

    @property
    def active(self) -> bool:
        return self.removed_at is None


@dataclass(frozen=True, slots=True)
class CodeRecord:
    """A join code and its state."""

    code: str
    cohort_id: str
    expires_at: datetime
    revoked: bool
    uses: int
    max_uses: int | None
    created_at: datetime

    def refusal(self, at: datetime) -> str | None:
        """Why the code cannot be redeemed at ``at`` (``expired``, ``revoked``,
        ``used_up``), or None."""
        if self.revoked:
            return "revoked"
        if at >= self.expires_at:
            return "expired"
        if self.max_uses is not None and self.uses >= self.max_uses:
            return "used_up"
        return None


@dataclass(frozen=True, slots=True)
class ReservationRecord:
    """``count`` GPUs of ``gpu`` kept for a cohort from ``starts_at`` to ``ends_at``."""

    id: str
    cohort_id: str
    gpu: str
    count: int
    starts_at: datetime
    ends_at: datetime


def environment_sha256(requirements: str | None) -> str | None:
    """The hash a course environment is cached by: SHA-256 of the requirements (UTF-8)."""
    if requirements is None:
        return None
    return hashlib.sha256(requirements.encode()).hexdigest()


def _active_seconds(lease: LeaseRecord, since: datetime, now: datetime) -> int:
    """Seconds ``lease`` was active between ``since`` and ``now`` (until its end of service,
    or ``now`` while live); none for a lease that never started."""
    if lease.active_at is None:
        return 0
    end = lease.end_of_service or lease.ended_at or now
    start = max(lease.active_at, since)
    stop = min(end, now)
    return max(0, math.floor((stop - start).total_seconds()))


def gpu_seconds(lease: LeaseRecord, since: datetime, now: datetime) -> int:
    """GPU-seconds of service ``lease`` delivered between ``since`` and ``now``: its active
    time within that window, times its GPUs."""
    return _active_seconds(lease, since, now) * len(lease.gpu_indices)


def lease_cost(lease: LeaseRecord, since: datetime, now: datetime) -> int:
    """Lamports ``lease`` cost between ``since`` and ``now``: its active seconds at its price
    (which is per hour of the whole lease, all its GPUs)."""
    return amount_for(lease.price_lamports_per_hour, _active_seconds(lease, since, now))


def _cohort_values(settings: CohortSettings) -> dict[str, Any]:
    values = settings.to_json()
    values["term_ends_at"] = datetime.fromtimestamp(settings.term_ends_at, tz=_UTC)
    values["environment_sha256"] = environment_sha256(settings.requirements)
    return values


class CohortQueries(Aggregate):
    """Cohorts, their instructors, members, codes and reservations."""

    # ---- cohorts -------------------------------------------------------------------------

    async def create_cohort(
        self,
        *,
        instructor: str,
        settings: CohortSettings,
        cohort_id: str,
        at: datetime | None = None,
    ) -> CohortRecord:
        """Record a new active cohort created by ``instructor``."""
        at = _when(at)
        async with self._write() as conn:
            await conn.execute(
                sa.insert(_cohorts).values(
                    id=cohort_id,
                    instructor=instructor,
                    state=CohortState.ACTIVE.value,
                    created_at=at,
                    **_cohort_values(settings),
                )
            )
        record = await self.get_cohort(cohort_id)
        assert record is not None
        return record

    async def get_cohort(self, cohort_id: str) -> CohortRecord | None:
        """The cohort ``cohort_id`` with its co-instructors, or None."""
        async with self._read() as conn:
            row = (
                await conn.execute(sa.select(_cohorts).where(_cohorts.c.id == cohort_id))
            ).first()
            if row is None:
                return None
            co = await self._co_instructors(conn, [cohort_id])
        return _cohort_record(row, co.get(cohort_id, ()))

    async def cohorts_of(self, pubkey: str) -> list[tuple[CohortRecord, str]]:
        """The cohorts where ``pubkey`` has a role, newest first, each with the role
        (``instructor``, ``co_instructor`` or ``student``; removed students have none)."""
        async with self._read() as conn:
            co_ids = sa.select(_instructors.c.cohort_id).where(_instructors.c.pubkey == pubkey)
            member_ids = sa.select(_members.c.cohort_id).where(
                _members.c.student == pubkey, _members.c.removed_at.is_(None)
            )
            rows = (
                await conn.execute(
                    sa.select(_cohorts)
                    .where(
                        sa.or_(
                            _cohorts.c.instructor == pubkey,
                            _cohorts.c.id.in_(co_ids),
                            _cohorts.c.id.in_(member_ids),
                        )
                    )
                    .order_by(_cohorts.c.created_at.desc(), _cohorts.c.id)
                )
            ).all()
            co = await self._co_instructors(conn, [row.id for row in rows])
        result = []
        for row in rows:
            record = _cohort_record(row, co.get(row.id, ()))
            result.append((record, record.role_of(pubkey) or "student"))
        return result

    async def update_cohort(self, cohort_id: str, **changes: Any) -> CohortRecord | None:
        """Change some of a cohort's settings (names of :data:`jupyter_io.cohorts.PATCHABLE`,
        values checked by :func:`jupyter_io.cohorts.parse_patch`). Returns the cohort, or
        None when there is none."""
        unknown = set(changes) - set(PATCHABLE)
        if unknown:
            raise ValueError(f"not cohort settings: {sorted(unknown)}")
        values = dict(changes)
        if "gpu_types" in values:
            values["gpu_types"] = list(values["gpu_types"])
        if "term_ends_at" in values:
            values["term_ends_at"] = datetime.fromtimestamp(values["term_ends_at"], tz=_UTC)
        if "requirements" in values:
            values["environment_sha256"] = environment_sha256(values["requirements"])
        if values:
            async with self._write() as conn:
                await conn.execute(
                    sa.update(_cohorts).where(_cohorts.c.id == cohort_id).values(values)
                )
        return await self.get_cohort(cohort_id)

    async def end_cohort(self, cohort_id: str, *, at: datetime | None = None) -> bool:
        """End the term: state ``ended`` and every code revoked. Returns whether it was
        active (False again, or for an unknown cohort)."""
        at = _when(at)
        async with self._write() as conn:
            result = await conn.execute(
                sa.update(_cohorts)
                .where(_cohorts.c.id == cohort_id, _cohorts.c.state == CohortState.ACTIVE.value)
                .values(state=CohortState.ENDED.value, ended_at=at)
            )
            await conn.execute(
                sa.update(_codes).where(_codes.c.cohort_id == cohort_id).values(revoked=True)
            )
            return bool(result.rowcount)

    async def cohort_environment(self, sha256: str) -> str | None:
        """The requirements whose hash is ``sha256`` (any cohort's), or None: what a
        provider builds the course environment from."""
        async with self._read() as conn:
            return cast(
                "str | None",
                await conn.scalar(
                    sa.select(_cohorts.c.requirements)
                    .where(_cohorts.c.environment_sha256 == sha256)
                    .limit(1)
                ),
            )

    # ---- instructors ---------------------------------------------------------------------

    async def add_instructor(
        self, cohort_id: str, pubkey: str, *, at: datetime | None = None
    ) -> bool:
        """Make ``pubkey`` a co-instructor. Returns whether it was not one already."""
        at = _when(at)
        async with self._write() as conn:
            result = await conn.execute(
                self._insert(_instructors)
                .values(cohort_id=cohort_id, pubkey=pubkey, added_at=at)
                .on_conflict_do_nothing()
            )
            return bool(result.rowcount)

    async def remove_instructor(self, cohort_id: str, pubkey: str) -> bool:
        """Remove a co-instructor. Returns whether they were one."""
        async with self._write() as conn:
            result = await conn.execute(
                sa.delete(_instructors).where(
                    _instructors.c.cohort_id == cohort_id, _instructors.c.pubkey == pubkey
                )
            )
            return bool(result.rowcount)

    # ---- members -------------------------------------------------------------------------

    async def add_members(
        self, cohort_id: str, students: Iterable[str], *, at: datetime | None = None
    ) -> tuple[list[str], list[str]]:
        """Add students (a roster import): returns (added, already members). A student an
        instructor removed earlier is added back."""
        at = _when(at)
        wanted = list(dict.fromkeys(students))
        added: list[str] = []
        already: list[str] = []
        if not wanted:
            return added, already
        async with self._write() as conn:
            rows = (
                await conn.execute(
                    sa.select(_members.c.student, _members.c.removed_at).where(
                        _members.c.cohort_id == cohort_id, _members.c.student.in_(wanted)
                    )
                )
            ).all()
            known = {row.student: row.removed_at for row in rows}
            back = [s for s in wanted if s in known and known[s] is not None]
            fresh = [s for s in wanted if s not in known]
            if back:
                await conn.execute(
                    sa.update(_members)
                    .where(_members.c.cohort_id == cohort_id, _members.c.student.in_(back))
                    .values(removed_at=None, joined_at=at)
                )
            if fresh:
                await conn.execute(
                    sa.insert(_members),
                    [
                        {"cohort_id": cohort_id, "student": s, "joined_at": at, "removed_at": None}
                        for s in fresh
                    ],
                )
        for student in wanted:
            (added if student in back or student in fresh else already).append(student)
        return added, already

    async def remove_member(
        self, cohort_id: str, student: str, *, at: datetime | None = None
    ) -> bool:
        """Mark a student removed. Returns whether they were an active member."""
        at = _when(at)
        async with self._write() as conn:
            result = await conn.execute(
                sa.update(_members)
                .where(
                    _members.c.cohort_id == cohort_id,
                    _members.c.student == student,
                    _members.c.removed_at.is_(None),
                )
                .values(removed_at=at)
            )
            return bool(result.rowcount)

    async def member(self, cohort_id: str, student: str) -> MemberRecord | None:
        """The membership of ``student`` (removed or not), or None."""
        async with self._read() as conn:
            row = (
                await conn.execute(
                    sa.select(_members).where(
                        _members.c.cohort_id == cohort_id, _members.c.student == student
                    )
                )
            ).first()
        return None if row is None else _member_record(row)

    async def is_member(self, cohort_id: str, pubkey: str) -> bool:
        """Whether ``pubkey`` is a student of the cohort now (not removed)."""
        member = await self.member(cohort_id, pubkey)
        return member is not None and member.active

    async def members(self, cohort_id: str, *, include_removed: bool = False) -> list[MemberRecord]:
        """The cohort's students in the order they joined."""
        query = (
            sa.select(_members)
            .where(_members.c.cohort_id == cohort_id)
            .order_by(_members.c.joined_at, _members.c.student)
        )
        if not include_removed:
            query = query.where(_members.c.removed_at.is_(None))
        async with self._read() as conn:
            return [_member_record(row) for row in await conn.execute(query)]

    async def active_cohorts_of(self, instructor: str) -> int:
        """How many active cohorts ``instructor`` created."""
        async with self._read() as conn:
            return int(
                await conn.scalar(
                    sa.select(sa.func.count()).where(
                        _cohorts.c.instructor == instructor,
                        _cohorts.c.state == CohortState.ACTIVE.value,
                    )
                )
                or 0
            )

    async def live_code_count(self, cohort_id: str, at: datetime) -> int:
        """How many of the cohort's codes are neither revoked nor expired at ``at``."""
        async with self._read() as conn:
            return int(
                await conn.scalar(
                    sa.select(sa.func.count()).where(
                        _codes.c.cohort_id == cohort_id,
                        _codes.c.revoked.is_(False),
                        _codes.c.expires_at > _aware(at),
                    )
                )
                or 0
            )

    async def member_count(self, cohort_id: str) -> int:
        """How many students the cohort has now."""
        async with self._read() as conn:
            return int(
                await conn.scalar(
                    sa.select(sa.func.count()).where(
                        _members.c.cohort_id == cohort_id, _members.c.removed_at.is_(None)
                    )
                )
                or 0
            )

    # ---- join codes ----------------------------------------------------------------------

    async def create_code(
        self,
        cohort_id: str,
        code: str,
        *,
        expires_at: datetime,
        max_uses: int | None = None,
        at: datetime | None = None,
    ) -> CodeRecord:
        """Record a join code (``code`` from :func:`jupyter_io.cohorts.new_join_code`)."""
        at = _when(at)
        async with self._write() as conn:
            row = (
                await conn.execute(
                    sa.insert(_codes)
                    .values(
                        code=code,
                        cohort_id=cohort_id,
                        expires_at=_aware(expires_at),
                        revoked=False,
                        uses=0,
                        max_uses=max_uses,
                        created_at=at,
                    )
                    .returning(*_codes.c)
                )
            ).one()
        return _code_record(row)

    async def codes(self, cohort_id: str) -> list[CodeRecord]:
        """The cohort's join codes, newest first."""
        async with self._read() as conn:
            rows = await conn.execute(
                sa.select(_codes)
                .where(_codes.c.cohort_id == cohort_id)
                .order_by(_codes.c.created_at.desc(), _codes.c.code)
            )
            return [_code_record(row) for row in rows]

    async def revoke_code(self, cohort_id: str, code: str) -> bool:
        """Revoke a code of this cohort. Returns whether it exists (revoking twice is fine)."""
        async with self._write() as conn:
            result = await conn.execute(
                sa.update(_codes)
                .where(_codes.c.cohort_id == cohort_id, _codes.c.code == code)
                .values(revoked=True)
            )
            return bool(result.rowcount)

    async def redeem_code(
        self,
        code: str,
        student: str,
        *,
        at: datetime | None = None,
        max_students: int | None = None,
    ) -> tuple[CohortRecord, bool]:
        """Join the cohort of ``code`` as ``student``, in one transaction: the code must be
        valid (not revoked, expired or used up), its cohort active (with fewer than
        ``max_students`` students, if given), and the student not removed by an
        instructor. Returns (the cohort, whether the student joined now: a member using a
        code again is not counted as a use).

        Raises :class:`CodeRefused` otherwise (reason ``full`` for a cohort at
        ``max_students``)."""
        at = _when(at)
        async with self._write() as conn:
            row = (
                await conn.execute(sa.select(_codes).where(_codes.c.code == code).with_for_update())
            ).first()
            if row is None:
                raise CodeRefused("unknown", f"no cohort has the join code {code}")
            record = _code_record(row)
            cohort = (
                await conn.execute(
                    sa.select(_cohorts).where(_cohorts.c.id == record.cohort_id).with_for_update()
                )
            ).one()
            if cohort.state != CohortState.ACTIVE.value or at >= cohort.term_ends_at:
                raise CodeRefused("ended", f"the term of cohort {cohort.name!r} is over")
            membership = (
                await conn.execute(
                    sa.select(_members).where(
                        _members.c.cohort_id == record.cohort_id, _members.c.student == student
                    )
                )
            ).first()
            if membership is not None and membership.removed_at is not None:
                raise CodeRefused(
                    "removed",
                    f"an instructor removed you from cohort {cohort.name!r}; ask them to add "
                    f"you back",
                )
            joined = membership is None
            if joined:
                refusal = record.refusal(at)
                if refusal is not None:
                    raise CodeRefused(refusal, _code_message(refusal, code, record))
                if max_students is not None:
                    count = await conn.scalar(
                        sa.select(sa.func.count()).where(
                            _members.c.cohort_id == record.cohort_id,
                            _members.c.removed_at.is_(None),
                        )
                    )
                    if (count or 0) >= max_students:
                        raise CodeRefused(
                            "full",
                            f"cohort {cohort.name!r} has its {max_students} students; ask "
                            f"your instructor",
                        )
                updated = await conn.execute(
                    sa.update(_codes)
                    .where(
                        _codes.c.code == code,
                        sa.or_(_codes.c.max_uses.is_(None), _codes.c.uses < _codes.c.max_uses),
                    )
                    .values(uses=_codes.c.uses + 1)
                )
                if not updated.rowcount:
                    raise CodeRefused("used_up", _code_message("used_up", code, record))
                try:
                    async with conn.begin_nested():
                        await conn.execute(
                            sa.insert(_members).values(
                                cohort_id=record.cohort_id,
                                student=student,
                                joined_at=at,
                                removed_at=None,
                            )
                        )
                except IntegrityError:
                    joined = False  # joined through another coordinator meanwhile
        joined_cohort = await self.get_cohort(record.cohort_id)
        assert joined_cohort is not None
        return joined_cohort, joined

    # ---- leases of a cohort ----------------------------------------------------------------

    async def cohort_leases_since(
        self, cohort_id: str, since: datetime, *, student: str | None = None
    ) -> list[LeaseRecord]:
        """The cohort's leases that were live at some point since ``since`` (of one student
        if given), oldest first: what its usage in a week is measured on."""
        since = _aware(since)
        query = (
            sa.select(_leases)
            .where(
                _leases.c.cohort_id == cohort_id,
                sa.or_(
                    _leases.c.state.in_(_LIVE),
                    _leases.c.end_of_service.is_(None),
                    _leases.c.end_of_service > since,
                ),
            )
            .order_by(_leases.c.requested_at, _leases.c.id)
        )
        if student is not None:
            query = query.where(_leases.c.user_pubkey == student)
        async with self._read() as conn:
            return [_lease_record(row) for row in await conn.execute(query)]

    async def cohort_usage(
        self,
        cohort_id: str,
        since: datetime,
        *,
        now: datetime | None = None,
        student: str | None = None,
    ) -> dict[str, int]:
        """GPU-seconds each student used in the cohort since ``since`` (until ``now``), by
        :func:`gpu_seconds`; students without usage are absent."""
        now = _when(now)
        usage: dict[str, int] = {}
        for lease in await self.cohort_leases_since(cohort_id, since, student=student):
            used = gpu_seconds(lease, since, now)
            if used:
                usage[lease.user_pubkey] = usage.get(lease.user_pubkey, 0) + used
        return usage

    async def cohort_finished_lease_ids(self, cohort_id: str, since: datetime) -> list[str]:
        """Ids of the cohort's ended or failed leases whose service ended after ``since``
        (one narrow read; a finished lease's times never change again, so callers may keep
        what they computed of it: :mod:`~jupyter_io.coordinator.cohort_tally`)."""
        query = sa.select(_leases.c.id).where(
            _leases.c.cohort_id == cohort_id,
            _leases.c.state.not_in(_LIVE),
            _leases.c.end_of_service > _aware(since),
        )
        async with self._read() as conn:
            return [str(row[0]) for row in await conn.execute(query)]

    async def leases_by_ids(self, lease_ids: Iterable[str]) -> list[LeaseRecord]:
        """The leases of ``lease_ids`` that exist (in no particular order; pass a few
        hundred ids at a time)."""
        ids = list(lease_ids)
        if not ids:
            return []
        async with self._read() as conn:
            rows = await conn.execute(sa.select(_leases).where(_leases.c.id.in_(ids)))
            return [_lease_record(row) for row in rows]

    async def cohort_live_leases(
        self, cohort_id: str, *, student: str | None = None
    ) -> list[LeaseRecord]:
        """The cohort's requested or active leases (of one student if given), oldest first."""
        query = (
            sa.select(_leases)
            .where(_leases.c.cohort_id == cohort_id, _leases.c.state.in_(_LIVE))
            .order_by(_leases.c.requested_at, _leases.c.id)
        )
        if student is not None:
            query = query.where(_leases.c.user_pubkey == student)
        async with self._read() as conn:
            return [_lease_record(row) for row in await conn.execute(query)]

    # ---- reservations (the logic is the scheduler's) ---------------------------------------

    async def add_reservation(
        self,
        cohort_id: str,
        *,
        gpu: str,
        count: int,
        starts_at: datetime,
        ends_at: datetime,
        reservation_id: str | None = None,
    ) -> ReservationRecord:
        """Record that ``count`` GPUs of ``gpu`` are kept for the cohort in a window."""
        if count < 1:
            raise ValueError("a reservation holds at least one GPU")
        if _aware(ends_at) <= _aware(starts_at):
            raise ValueError("a reservation must end after it starts")
        async with self._write() as conn:
            row = (
                await conn.execute(
                    sa.insert(_reservations)
                    .values(
                        id=reservation_id or "r_" + secrets.token_urlsafe(12),
                        cohort_id=cohort_id,
                        gpu=gpu,
                        count=count,
                        starts_at=_aware(starts_at),
                        ends_at=_aware(ends_at),
                    )
                    .returning(*_reservations.c)
                )
            ).one()
        return _reservation_record(row)

    async def reservations(
        self, cohort_id: str | None = None, *, ending_after: datetime | None = None
    ) -> list[ReservationRecord]:
        """Reservations of a cohort (of every cohort when None), by start; only those that
        end after ``ending_after`` if given."""
        query = sa.select(_reservations).order_by(_reservations.c.starts_at, _reservations.c.id)
        if cohort_id is not None:
            query = query.where(_reservations.c.cohort_id == cohort_id)
        if ending_after is not None:
            query = query.where(_reservations.c.ends_at > _aware(ending_after))
        async with self._read() as conn:
            return [_reservation_record(row) for row in await conn.execute(query)]

    async def delete_reservation(self, cohort_id: str, reservation_id: str) -> bool:
        """Delete a reservation of the cohort. Returns whether there was one."""
        async with self._write() as conn:
            result = await conn.execute(
                sa.delete(_reservations).where(
                    _reservations.c.cohort_id == cohort_id,
                    _reservations.c.id == reservation_id,
                )
            )
            return bool(result.rowcount)

    # ---- internals -------------------------------------------------------------------------

    @staticmethod
    async def _co_instructors(conn: Any, cohort_ids: list[str]) -> dict[str, tuple[str, ...]]:
        if not cohort_ids:
            return {}
        rows = await conn.execute(
            sa.select(_instructors.c.cohort_id, _instructors.c.pubkey)
            .where(_instructors.c.cohort_id.in_(cohort_ids))
            .order_by(_instructors.c.added_at, _instructors.c.pubkey)
        )
        found: dict[str, list[str]] = {}
        for row in rows:
            found.setdefault(row.cohort_id, []).append(row.pubkey)
        return {key: tuple(value) for key, value in found.items()}


def _code_message(reason: str, code: str, record: CodeRecord) -> str:
    if reason == "revoked":
        return f"join code {code} was revoked; ask your instructor for a new one"
    if reason == "expired":
        return (
            f"join code {code} expired at {record.expires_at.isoformat()}; ask your "
            f"instructor for a new one"
        )
    return f"join code {code} was used its {record.max_uses} times; ask for a new one"


def _cohort_record(row: sa.Row[Any], co_instructors: tuple[str, ...]) -> CohortRecord:
    m = row._mapping
    return CohortRecord(
        id=m["id"],
        name=m["name"],
        instructor=m["instructor"],
        co_instructors=co_instructors,
        gpu_types=tuple(m["gpu_types"]),
        max_price_lamports_per_hour=m["max_price_lamports_per_hour"],
        quota_gpu_seconds_per_week=m["quota_gpu_seconds_per_week"],
        max_concurrent_per_student=m["max_concurrent_per_student"],
        idle_timeout_seconds=m["idle_timeout_seconds"],
        max_session_seconds=m["max_session_seconds"],
        queue_max_wait_seconds=m["queue_max_wait_seconds"],
        student_cap_lamports=m["student_cap_lamports"],
        term_ends_at=m["term_ends_at"],
        requirements=m["requirements"],
        environment_sha256=m["environment_sha256"],
        state=CohortState(m["state"]),
        created_at=m["created_at"],
        ended_at=m["ended_at"],
    )


def _member_record(row: sa.Row[Any]) -> MemberRecord:
    m = row._mapping
    return MemberRecord(m["cohort_id"], m["student"], m["joined_at"], m["removed_at"])


def _code_record(row: sa.Row[Any]) -> CodeRecord:
    m = row._mapping
    return CodeRecord(
        code=m["code"],
        cohort_id=m["cohort_id"],
        expires_at=m["expires_at"],
        revoked=bool(m["revoked"]),
        uses=m["uses"],
        max_uses=m["max_uses"],
        created_at=m["created_at"],
    )


def _reservation_record(row: sa.Row[Any]) -> ReservationRecord:
    m = row._mapping
    return ReservationRecord(
        id=m["id"],
        cohort_id=m["cohort_id"],
        gpu=m["gpu"],
        count=m["count"],
        starts_at=m["starts_at"],
        ends_at=m["ends_at"],
    )
