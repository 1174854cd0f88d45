"""An async client of the coordinator's cohort endpoints, for instructors, students and Lab.

::

    async with CohortClient("http://127.0.0.1:8700", instructor_keypair) as client:
        cohort = await client.create(name="CS229", gpu_types=["T4"],
                                     max_price_lamports_per_hour=2_000_000,
                                     term_ends_at=time.time() + 90 * 86400)
        code = await client.create_code(cohort.id)        # code.link to share
    async with CohortClient(url, student_keypair) as client:
        await client.join(code.code)                       # or the link
        grant = await client.request_lease("T4", cohort=cohort.id)

Every request is signed with :func:`~jupyter_io.signing.sign_request` (it is a
:class:`~jupyter_io.coordinator_client.CoordinatorClient`, so the lease methods are here too).
Shapes and checks come from the contract :mod:`jupyter_io.cohorts`; nothing of the server is
imported. Errors are the coordinator client's (:mod:`jupyter_io.coordinator_client`):
``AuthError`` (401/403: not an instructor, not a member, removed), ``LeaseError`` (409: the
cohort ended, a type it does not cover), ``CoordinatorPaymentError`` (402
``quota_exhausted``), ``TooManyPendingLeases`` (429 ``too_many_kernels``),
``CoordinatorError`` (400 naming the field, 404, 410 for a code that expired or was
revoked), each with the coordinator's message.

Reservations (instructors): :meth:`CohortClient.reserve` keeps GPUs of one type for a
class's lab session, :meth:`CohortClient.reservations` lists them and
:meth:`CohortClient.unreserve` deletes one (``docs/cohorts.md``, "Reservations").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from .cohorts import (
    MAX_ROSTER,
    CohortSettings,
    CohortView,
    StudentUsage,
    dashboard_csv,
    parse_join_target,
)
from .coordinator_client import CoordinatorClient, CoordinatorError

__all__ = ["CohortClient", "JoinCode", "ReservationView", "RosterResult"]

_BASE = "/api/v1/cohorts"


@dataclass(frozen=True, slots=True)
class JoinCode:
    """A join code: share ``code`` or ``link`` (``jupyter-io:join?...``)."""

    code: str
    link: str
    expires_at: float
    max_uses: int | None = None
    uses: int = 0
    revoked: bool = False

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> JoinCode:
        return cls(
            code=str(body["code"]),
            link=str(body["link"]),
            expires_at=float(body["expires_at"]),
            max_uses=body.get("max_uses"),
            uses=int(body.get("uses") or 0),
            revoked=bool(body.get("revoked")),
        )


@dataclass(frozen=True, slots=True)
class RosterResult:
    """What a roster import did: keys added, keys already members, entries refused."""

    added: tuple[str, ...] = ()
    already: tuple[str, ...] = ()
    invalid: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ReservationView:
    """``count`` GPUs of type ``gpu`` kept for the class from ``starts_at`` to ``ends_at``
    (Unix seconds); ``id`` (``r_...``) deletes it."""

    id: str
    cohort: str
    gpu: str
    count: int
    starts_at: float
    ends_at: float

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> ReservationView:
        try:
            return cls(
                id=str(body["id"]),
                cohort=str(body["cohort"]),
                gpu=str(body["gpu"]),
                count=int(body["count"]),
                starts_at=float(body["starts_at"]),
                ends_at=float(body["ends_at"]),
            )
        except (TypeError, KeyError, ValueError) as exc:
            raise CoordinatorError(
                f"the coordinator's answer is not a reservation: {exc!r}"
            ) from None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "cohort": self.cohort,
            "gpu": self.gpu,
            "count": self.count,
            "starts_at": self.starts_at,
            "ends_at": self.ends_at,
        }


def _view(body: Mapping[str, Any], what: str) -> CohortView:
    try:
        return CohortView.from_json(body)
    except (TypeError, KeyError) as exc:
        raise CoordinatorError(
            f"the coordinator's answer to {what} is not a cohort: {exc}"
        ) from None


class CohortClient(CoordinatorClient):
    """Cohort calls of one key on one coordinator (see the module docstring)."""

    async def create(self, settings: CohortSettings | None = None, **fields: Any) -> CohortView:
        """Create a cohort you teach: ``settings`` or its fields (``name``, ``gpu_types``,
        ``max_price_lamports_per_hour``, ``term_ends_at``, ...)."""
        body = settings.to_json() if settings is not None else dict(fields)
        if "gpu_types" in body:
            body["gpu_types"] = list(body["gpu_types"])
        return _view(await self._call("POST", _BASE, body, sign=True), "create")

    async def cohorts(self) -> list[CohortView]:
        """Your cohorts (as instructor, co-instructor or student), each with ``role``."""
        body = await self._call("GET", _BASE, sign=True)
        return [_view(row, "list") for row in body.get("cohorts") or []]

    async def get(self, cohort_id: str) -> CohortView:
        """A cohort you have a role in (a student's with ``me``: their week)."""
        return _view(await self._call("GET", f"{_BASE}/{cohort_id}", sign=True), "show")

    async def update(self, cohort_id: str, **changes: Any) -> CohortView:
        """Change settings (instructors): quota, limits, GPU types, price cap, term end..."""
        if "gpu_types" in changes:
            changes["gpu_types"] = list(changes["gpu_types"])
        body = await self._call("PATCH", f"{_BASE}/{cohort_id}", changes, sign=True)
        return _view(body, "set")

    async def create_code(
        self, cohort_id: str, *, ttl_seconds: int | None = None, max_uses: int | None = None
    ) -> JoinCode:
        """A join code (instructors), valid ``ttl_seconds`` (default 7 days)."""
        body = {"ttl_seconds": ttl_seconds, "max_uses": max_uses}
        return JoinCode.from_json(
            await self._call("POST", f"{_BASE}/{cohort_id}/codes", body, sign=True)
        )

    async def codes(self, cohort_id: str) -> list[JoinCode]:
        """The cohort's join codes, newest first (instructors)."""
        body = await self._call("GET", f"{_BASE}/{cohort_id}/codes", sign=True)
        return [JoinCode.from_json(row) for row in body.get("codes") or []]

    async def revoke_code(self, cohort_id: str, code: str) -> None:
        """Revoke a join code (instructors)."""
        await self._call("DELETE", f"{_BASE}/{cohort_id}/codes/{quote(code, safe='')}", sign=True)

    async def join(self, code_or_link: str) -> CohortView:
        """Join a cohort as a student with a code or a join link (checked here first)."""
        code = parse_join_target(code_or_link).code
        body = await self._call("POST", f"{_BASE}/join", {"code": code}, sign=True)
        return _view(body.get("cohort") or {}, "join")

    async def add_students(self, cohort_id: str, students: Iterable[str]) -> RosterResult:
        """Import a roster (instructors), in requests of at most
        :data:`~jupyter_io.cohorts.MAX_ROSTER` keys."""
        keys = list(students)
        added: list[str] = []
        already: list[str] = []
        invalid: list[str] = []
        for start in range(0, len(keys), MAX_ROSTER):
            body = await self._call(
                "POST",
                f"{_BASE}/{cohort_id}/roster",
                {"students": keys[start : start + MAX_ROSTER]},
                sign=True,
            )
            added += body.get("added") or []
            already += body.get("already") or []
            invalid += body.get("invalid") or []
        return RosterResult(tuple(added), tuple(already), tuple(invalid))

    async def remove_student(self, cohort_id: str, student: str) -> int:
        """Remove a student (instructors); returns how many of their leases ended."""
        body = await self._call("DELETE", f"{_BASE}/{cohort_id}/members/{student}", sign=True)
        return int(body.get("leases_ended") or 0)

    async def add_instructor(self, cohort_id: str, pubkey: str) -> CohortView:
        """Add a co-instructor (instructors)."""
        body = await self._call(
            "POST", f"{_BASE}/{cohort_id}/instructors", {"pubkey": pubkey}, sign=True
        )
        return _view(body, "add-instructor")

    async def remove_instructor(self, cohort_id: str, pubkey: str) -> CohortView:
        """Remove a co-instructor (instructors; never the creator)."""
        body = await self._call("DELETE", f"{_BASE}/{cohort_id}/instructors/{pubkey}", sign=True)
        return _view(body, "remove-instructor")

    async def end(self, cohort_id: str) -> CohortView:
        """End the term (instructors): codes revoked, live sessions ended."""
        return _view(await self._call("POST", f"{_BASE}/{cohort_id}/end", {}, sign=True), "end")

    async def dashboard(self, cohort_id: str) -> dict[str, Any]:
        """The dashboard (instructors): ``{"cohort", "students", "pool", "queue",
        "generated_at"}``."""
        return await self._call("GET", f"{_BASE}/{cohort_id}/dashboard", sign=True)

    async def dashboard_csv(self, cohort_id: str) -> str:
        """The dashboard's rows as CSV (the same as ``?format=csv``)."""
        body = await self.dashboard(cohort_id)
        return dashboard_csv(StudentUsage.from_json(row) for row in body.get("students") or [])

    async def reserve(
        self, cohort_id: str, *, gpu: str, count: int, starts_at: float, ends_at: float
    ) -> ReservationView:
        """Keep ``count`` GPUs of type ``gpu`` for the class from ``starts_at`` to
        ``ends_at`` (Unix seconds; a window of at most 24 h, at most 200 days ahead;
        instructors). The coordinator's 400 names the field it refuses."""
        body = {"gpu": gpu, "count": count, "starts_at": starts_at, "ends_at": ends_at}
        answer = await self._call("POST", f"{_BASE}/{cohort_id}/reservations", body, sign=True)
        return ReservationView.from_json(answer)

    async def reservations(self, cohort_id: str) -> list[ReservationView]:
        """The class's reservations (instructors), as the coordinator keeps them."""
        body = await self._call("GET", f"{_BASE}/{cohort_id}/reservations", sign=True)
        return [ReservationView.from_json(row) for row in body.get("reservations") or []]

    async def unreserve(self, cohort_id: str, reservation_id: str) -> None:
        """Delete a reservation (instructors); its GPUs are free for anyone at once."""
        rid = quote(reservation_id, safe="")
        await self._call("DELETE", f"{_BASE}/{cohort_id}/reservations/{rid}", sign=True)
