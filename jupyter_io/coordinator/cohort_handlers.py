"""REST handlers of classroom cohorts: thin, :class:`~.cohorts.CohortService` decides.

Every route is signed like the other user endpoints (:mod:`jupyter_io.signing`; POST, PATCH
and DELETE once only). Bodies are checked by :mod:`jupyter_io.cohorts` (a bad one is 400
``bad_request`` naming the field) and stay within the coordinator's 16 KiB body limit.
``docs/cohorts.md`` is the contract. Routes (:func:`cohort_routes`):

==============================================  ==============================================
``POST   /api/v1/cohorts``                      create (caller = instructor) → 201 cohort
``GET    /api/v1/cohorts``                      the caller's cohorts, each with ``role``
``POST   /api/v1/cohorts/join``                 ``{"code"}`` → ``{"cohort", "role"}``
``GET    /api/v1/cohorts/{id}``                 the cohort (+ ``me`` for a student)
``PATCH  /api/v1/cohorts/{id}``                 instructors: change settings
``GET    /api/v1/cohorts/{id}/codes``           instructors: the join codes
``POST   /api/v1/cohorts/{id}/codes``           instructors: ``{"ttl_seconds", "max_uses"}``
``DELETE /api/v1/cohorts/{id}/codes/{code}``    instructors: revoke
``POST   /api/v1/cohorts/{id}/roster``          instructors: ``{"students": [...]}``
``DELETE /api/v1/cohorts/{id}/members/{key}``   instructors: remove a student
``POST   /api/v1/cohorts/{id}/instructors``     instructors: ``{"pubkey"}``
``DELETE /api/v1/cohorts/{id}/instructors/{k}`` instructors: remove a co-instructor
``POST   /api/v1/cohorts/{id}/end``             instructors: end the term
``GET    /api/v1/cohorts/{id}/dashboard``       instructors: rows per student (``?format=csv``)
==============================================  ==============================================

Reservations and the queue (issue 14.3) add their routes to the list in
:func:`cohort_routes`.
"""

from __future__ import annotations

import time
from typing import Any

from solders.pubkey import Pubkey
from tornado import web

from ..cohorts import (
    CohortRequestError,
    StudentUsage,
    dashboard_csv,
    parse_code_request,
    parse_create,
    parse_join,
    parse_patch,
    parse_pubkey_body,
    parse_roster,
)
from ..errors import JupyterIOError
from .cohorts import CohortError, CohortService
from .handlers import API_PREFIX, _ApiHandler, _json_body
from .store import CodeRefused

__all__ = ["COHORTS_PREFIX", "COHORT_ID", "cohort_routes", "error_answer"]

COHORTS_PREFIX = f"{API_PREFIX}/cohorts"
#: A cohort id in a route (``c_`` + 16 URL-safe characters).
COHORT_ID = r"(c_[A-Za-z0-9_-]{16})"
_KEY = r"([1-9A-HJ-NP-Za-km-z]{32,44})"
_CODE = r"([A-Za-z0-9-]{1,32})"

#: HTTP status and error code of each refused join code.
_CODE_REFUSALS: dict[str, tuple[int, str]] = {
    "unknown": (404, "unknown_code"),
    "expired": (410, "code_expired"),
    "revoked": (410, "code_revoked"),
    "used_up": (410, "code_used_up"),
    "removed": (403, "removed"),
    "ended": (409, "cohort_ended"),
    "full": (409, "cohort_full"),
}


def error_answer(exc: Exception) -> tuple[int, str] | None:
    """The status and code a cohort error is answered with (None: not a cohort error)."""
    if isinstance(exc, CohortError):
        return exc.status, exc.code
    if isinstance(exc, CodeRefused):
        return _CODE_REFUSALS.get(exc.reason, (409, "conflict"))
    if isinstance(exc, CohortRequestError):
        return 400, "bad_request"
    return None


class _CohortHandler(_ApiHandler):
    @property
    def cohorts(self) -> CohortService:
        service = self.services.cohorts
        if service is None:  # pragma: no cover - the server always builds it
            raise web.HTTPError(404, "this coordinator has no cohorts")
        return service

    def body(self) -> Any:
        try:
            return _json_body(self.request.body)
        except ValueError as exc:
            raise CohortRequestError(None, f"the body is not JSON: {exc}") from None

    def refuse(self, exc: Exception) -> None:
        answer = error_answer(exc)
        if answer is not None:
            self.fail(answer[0], answer[1], str(exc))
        elif isinstance(exc, JupyterIOError):
            self.lease_failure(exc)
        else:
            raise exc

    async def run(self, once: bool, work: Any) -> None:
        """Authenticate, then answer ``await work(user)`` as ``(body, status)`` (or a
        string body already sent) or the error's status."""
        user = self.signed(once=once)
        if user is None:
            return
        try:
            answer = await work(user)
        except (JupyterIOError, CohortRequestError) as exc:
            self.refuse(exc)
            return
        if answer is not None:
            body, status = answer
            self.send_json(body, status)


class CohortsHandler(_CohortHandler):
    async def post(self) -> None:
        async def create(user: Pubkey) -> tuple[Any, int]:
            settings = parse_create(self.body(), now=time.time())
            return (await self.cohorts.create(user, settings)).to_json(), 201

        await self.run(True, create)

    async def get(self) -> None:
        async def mine(user: Pubkey) -> tuple[Any, int]:
            views = await self.cohorts.of_user(user)
            return {"cohorts": [view.to_json() for view in views]}, 200

        await self.run(False, mine)


class JoinHandler(_CohortHandler):
    async def post(self) -> None:
        async def join(user: Pubkey) -> tuple[Any, int]:
            view = await self.cohorts.join(user, parse_join(self.body()))
            return {"cohort": view.to_json(), "role": "student"}, 200

        await self.run(True, join)


class CohortHandler(_CohortHandler):
    async def get(self, cohort_id: str) -> None:
        async def show(user: Pubkey) -> tuple[Any, int]:
            return (await self.cohorts.get(user, cohort_id)).to_json(), 200

        await self.run(False, show)

    async def patch(self, cohort_id: str) -> None:
        async def change(user: Pubkey) -> tuple[Any, int]:
            await self.cohorts.instructed(user, cohort_id)  # a stranger learns nothing more
            changes = parse_patch(self.body(), now=time.time())
            return (await self.cohorts.patch(user, cohort_id, changes)).to_json(), 200

        await self.run(True, change)


class CodesHandler(_CohortHandler):
    async def get(self, cohort_id: str) -> None:
        async def codes(user: Pubkey) -> tuple[Any, int]:
            return {"codes": await self.cohorts.codes(user, cohort_id)}, 200

        await self.run(False, codes)

    async def post(self, cohort_id: str) -> None:
        async def create(user: Pubkey) -> tuple[Any, int]:
            await self.cohorts.instructed(user, cohort_id)
            ttl, max_uses = parse_code_request(self.body())
            return await self.cohorts.create_code(user, cohort_id, ttl, max_uses), 201

        await self.run(True, create)


class CodeHandler(_CohortHandler):
    async def delete(self, cohort_id: str, code: str) -> None:
        async def revoke(user: Pubkey) -> tuple[Any, int]:
            await self.cohorts.revoke_code(user, cohort_id, code.upper().replace("-", ""))
            return {"code": code, "revoked": True}, 200

        await self.run(True, revoke)


class RosterHandler(_CohortHandler):
    async def post(self, cohort_id: str) -> None:
        async def roster(user: Pubkey) -> tuple[Any, int]:
            await self.cohorts.instructed(user, cohort_id)
            valid, invalid = parse_roster(self.body())
            added, already = await self.cohorts.add_students(user, cohort_id, valid)
            return {"added": added, "already": already, "invalid": invalid}, 200

        await self.run(True, roster)


class MemberHandler(_CohortHandler):
    async def delete(self, cohort_id: str, student: str) -> None:
        async def remove(user: Pubkey) -> tuple[Any, int]:
            ended = await self.cohorts.remove_student(user, cohort_id, student)
            return {"student": student, "removed": True, "leases_ended": ended}, 200

        await self.run(True, remove)


class InstructorsHandler(_CohortHandler):
    async def post(self, cohort_id: str) -> None:
        async def add(user: Pubkey) -> tuple[Any, int]:
            await self.cohorts.instructed(user, cohort_id)
            pubkey = parse_pubkey_body(self.body())
            return (await self.cohorts.add_instructor(user, cohort_id, pubkey)).to_json(), 200

        await self.run(True, add)


class InstructorHandler(_CohortHandler):
    async def delete(self, cohort_id: str, pubkey: str) -> None:
        async def remove(user: Pubkey) -> tuple[Any, int]:
            view = await self.cohorts.remove_instructor(user, cohort_id, pubkey)
            return view.to_json(), 200

        await self.run(True, remove)


class EndHandler(_CohortHandler):
    async def post(self, cohort_id: str) -> None:
        async def end(user: Pubkey) -> tuple[Any, int]:
            return (await self.cohorts.end(user, cohort_id)).to_json(), 200

        await self.run(True, end)


class DashboardHandler(_CohortHandler):
    async def get(self, cohort_id: str) -> None:
        form = self.get_query_argument("format", "json")
        if form not in ("json", "csv"):
            self.fail(400, "bad_request", "'format' must be json or csv")
            return

        async def dashboard(user: Pubkey) -> tuple[Any, int] | None:
            body = await self.cohorts.dashboard(user, cohort_id)
            if form == "json":
                return body, 200
            rows = [StudentUsage.from_json(row) for row in body["students"]]
            self.set_header("Content-Type", "text/csv; charset=utf-8")
            self.set_header("Content-Disposition", f'attachment; filename="{cohort_id}-week.csv"')
            self.finish(dashboard_csv(rows))
            return None

        await self.run(False, dashboard)


def cohort_routes(init: dict[str, Any]) -> list[tuple[str, type[web.RequestHandler], Any]]:
    """The cohort routes for :func:`~.handlers.make_app` (``init``: the handlers' kwargs)."""
    base, cid = COHORTS_PREFIX, COHORT_ID
    return [
        (rf"{base}", CohortsHandler, init),
        (rf"{base}/join", JoinHandler, init),
        (rf"{base}/{cid}", CohortHandler, init),
        (rf"{base}/{cid}/codes", CodesHandler, init),
        (rf"{base}/{cid}/codes/{_CODE}", CodeHandler, init),
        (rf"{base}/{cid}/roster", RosterHandler, init),
        (rf"{base}/{cid}/members/{_KEY}", MemberHandler, init),
        (rf"{base}/{cid}/instructors", InstructorsHandler, init),
        (rf"{base}/{cid}/instructors/{_KEY}", InstructorHandler, init),
        (rf"{base}/{cid}/end", EndHandler, init),
        (rf"{base}/{cid}/dashboard", DashboardHandler, init),
        # Reservations and the queue (issue 14.3) go here.
    ]
