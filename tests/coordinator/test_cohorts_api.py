"""Classroom cohorts over the REST API of a real coordinator (loopback HTTP, SQLite file),
every request signed with a real key, providers linked over real websockets: the instructor's
and the students' whole cycle, every refusal of a cohort lease, what strangers, students and
removed students cannot do, and the weekly quota ending a session mid-way."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from solders.keypair import Keypair
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from jupyter_io.cohort_client import CohortClient
from jupyter_io.cohorts import QUOTA_USED_UP, REMOVED_FROM_COHORT, new_join_code
from jupyter_io.coordinator.server import CoordinatorServer
from jupyter_io.signing import sign_request

from .conftest import WAIT, FakeProvider, Starter, gpu_offer

pytestmark = pytest.mark.timeout(60)

T4_PRICE = 1_000_000


class Caller:
    """One key's signed requests, answered with (status, JSON body or text)."""

    def __init__(self, server: CoordinatorServer, keypair: Keypair | None = None) -> None:
        self.url = server.url
        self.keypair = keypair or Keypair()
        self.pubkey = str(self.keypair.pubkey())
        self.http = AsyncHTTPClient(force_instance=True)

    async def __call__(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = b"" if body is None else json.dumps(body).encode()
        headers = sign_request(self.keypair, method, path, data)
        response = await self.http.fetch(
            HTTPRequest(
                self.url + path,
                method=method,
                headers=headers,
                body=data if method not in ("GET", "DELETE") else None,
                allow_nonstandard_methods=True,
                request_timeout=WAIT,
            ),
            raise_error=False,
        )
        if response.headers.get("Content-Type", "").startswith("text/csv"):
            return response.code, response.body.decode()
        return response.code, json.loads(response.body or b"null")

    def close(self) -> None:
        self.http.close()


def create_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": "CS229",
        "gpu_types": ["T4"],
        "max_price_lamports_per_hour": 2 * T4_PRICE,
        "term_ends_at": time.time() + 90 * 86400,
        "quota_gpu_seconds_per_week": 10 * 3600,
    }
    body.update(changes)
    return body


async def linked(server: CoordinatorServer, providers: list[FakeProvider]) -> FakeProvider:
    provider = FakeProvider(
        server.url,
        [
            gpu_offer("T4", count=2, price=T4_PRICE, vram_gb=16),
            gpu_offer("RTX 4090", count=1, price=T4_PRICE // 2, first_index=2),
        ],
    )
    providers.append(provider)
    await provider.connect()
    return provider


def error_code(body: Any) -> str:
    return str(body["error"]["code"])


async def test_instructor_and_students_full_cycle(
    start_coordinator: Starter, providers: list[FakeProvider]
) -> None:
    server = await start_coordinator()
    provider = await linked(server, providers)
    teacher, helper, alice, bob, stranger = (Caller(server) for _ in range(5))
    try:
        # The instructor creates the cohort and a join code; the link names this coordinator.
        status, cohort = await teacher("POST", "/api/v1/cohorts", create_body())
        assert status == 201 and cohort["role"] == "instructor"
        assert cohort["instructor"] == teacher.pubkey
        cid = cohort["id"]
        status, code = await teacher("POST", f"/api/v1/cohorts/{cid}/codes", {"max_uses": 5})
        assert status == 201 and code["link"].startswith("jupyter-io:join?coordinator=http")
        assert code["expires_at"] == pytest.approx(time.time() + 7 * 86400, abs=60)

        # Students join: Alice with the link (through the client), Bob by the roster.
        async with CohortClient(server.url, alice.keypair, timeout=WAIT) as client:
            joined = await client.join(code["link"])
        assert joined.id == cid and joined.role == "student" and joined.me is not None
        status, roster = await teacher(
            "POST", f"/api/v1/cohorts/{cid}/roster", {"students": [bob.pubkey, "nope"]}
        )
        assert status == 200 and roster == {
            "added": [bob.pubkey],
            "already": [],
            "invalid": ["nope"],
        }
        status, listed = await alice("GET", "/api/v1/cohorts")
        assert [(c["id"], c["role"]) for c in listed["cohorts"]] == [(cid, "student")]
        assert (await stranger("GET", "/api/v1/cohorts"))[1] == {"cohorts": []}

        # A cohort lease: any covered type, the lease records the cohort.
        status, grant = await alice("POST", "/api/v1/leases", {"cohort": cid})
        assert status == 201 and grant["gpu"] == "T4" and grant["cohort"] == cid
        status, lease = await alice("GET", f"/api/v1/leases/{grant['lease']}")
        assert lease["cohort"] == cid
        # Refusals: a type the cohort does not pay for, the concurrency limit, strangers.
        status, body = await bob("POST", "/api/v1/leases", {"cohort": cid, "gpu": "RTX 4090"})
        assert (status, error_code(body)) == (409, "not_covered") and "T4" in body["error"][
            "message"
        ]
        status, body = await alice("POST", "/api/v1/leases", {"cohort": cid})
        assert (status, error_code(body)) == (429, "too_many_kernels")
        status, body = await stranger("POST", "/api/v1/leases", {"cohort": cid})
        assert (status, error_code(body)) == (403, "not_member")
        status, body = await alice("POST", "/api/v1/leases", {"cohort": "c_" + "x" * 16})
        assert (status, error_code(body)) == (404, "not_found")
        status, body = await alice("POST", "/api/v1/leases", {"cohort": 7})
        assert status == 404

        # Students see their own week, not the dashboard, and change nothing.
        await provider.session(grant["lease"], "active")
        status, mine = await alice("GET", f"/api/v1/cohorts/{cid}")
        assert status == 200 and mine["me"]["live_kernels"] == 1 and mine["students"] == 2
        for method, path, body in [
            ("GET", f"/api/v1/cohorts/{cid}/dashboard", None),
            ("PATCH", f"/api/v1/cohorts/{cid}", {"quota_gpu_seconds_per_week": 10**9}),
            ("POST", f"/api/v1/cohorts/{cid}/instructors", {"pubkey": alice.pubkey}),
            ("POST", f"/api/v1/cohorts/{cid}/codes", {}),
            ("POST", f"/api/v1/cohorts/{cid}/roster", {"students": [stranger.pubkey]}),
            ("DELETE", f"/api/v1/cohorts/{cid}/members/{bob.pubkey}", None),
            ("POST", f"/api/v1/cohorts/{cid}/end", {}),
        ]:
            status, refused = await alice(method, path, body)
            assert (status, error_code(refused)) == (403, "forbidden"), (method, path)
        assert (await stranger("GET", f"/api/v1/cohorts/{cid}"))[0] == 403
        record = await server.store.get_cohort(cid)  # type: ignore[union-attr]
        assert record is not None and record.co_instructors == ()
        assert record.quota_gpu_seconds_per_week == 10 * 3600

        # A co-instructor has the instructor's rights, but cannot remove the creator.
        status, _ = await teacher(
            "POST", f"/api/v1/cohorts/{cid}/instructors", {"pubkey": helper.pubkey}
        )
        assert status == 200
        status, patched = await helper(
            "PATCH", f"/api/v1/cohorts/{cid}", {"quota_gpu_seconds_per_week": 7200}
        )
        assert status == 200 and patched["quota_gpu_seconds_per_week"] == 7200
        assert (await helper("GET", "/api/v1/cohorts"))[1]["cohorts"][0]["role"] == "co_instructor"
        status, body = await helper("DELETE", f"/api/v1/cohorts/{cid}/instructors/{teacher.pubkey}")
        assert status == 403
        status, body = await teacher(
            "PATCH", f"/api/v1/cohorts/{cid}", {"max_concurrent_per_student": 0}
        )
        assert (status, error_code(body)) == (400, "bad_request")
        assert "max_concurrent_per_student" in body["error"]["message"]

        # The dashboard: one row per student, the pool's figures, a CSV export.
        status, board = await helper("GET", f"/api/v1/cohorts/{cid}/dashboard")
        assert status == 200
        rows = {row["student"]: row for row in board["students"]}
        assert set(rows) == {alice.pubkey, bob.pubkey}
        assert rows[alice.pubkey]["live_kernels"] == 1 and rows[bob.pubkey]["live_kernels"] == 0
        assert rows[alice.pubkey]["allowance"] is None and board["queue"] == []
        assert rows[bob.pubkey]["quota_left_gpu_seconds"] == 7200
        assert set(board["pool"]) >= {
            "allowance_lamports",
            "spent_lamports_term",
            "projected_run_out",
        }
        status, csv_text = await teacher("GET", f"/api/v1/cohorts/{cid}/dashboard?format=csv")
        assert status == 200 and csv_text.startswith("student,gpu_hours_week,")
        assert len(csv_text.splitlines()) == 3

        # Removing Alice ends her session; she cannot lease on the cohort or rejoin by code.
        status, removed = await teacher("DELETE", f"/api/v1/cohorts/{cid}/members/{alice.pubkey}")
        assert status == 200 and removed["leases_ended"] == 1
        end = await provider.next_message("end")
        assert end["lease"] == grant["lease"] and end["reason"] == REMOVED_FROM_COHORT
        status, lease = await alice("GET", f"/api/v1/leases/{grant['lease']}")
        assert lease["state"] == "ended" and lease["end_reason"] == REMOVED_FROM_COHORT
        status, body = await alice("POST", "/api/v1/leases", {"cohort": cid})
        assert (status, error_code(body)) == (403, "not_member")
        status, body = await alice("POST", "/api/v1/cohorts/join", {"code": code["code"]})
        assert (status, error_code(body)) == (403, "removed")
        assert (await alice("GET", f"/api/v1/cohorts/{cid}/dashboard"))[0] == 403

        # Revoked and expired codes fail; ending the term ends leases and refuses new ones.
        status, _ = await teacher("DELETE", f"/api/v1/cohorts/{cid}/codes/{code['code']}")
        assert status == 200
        status, body = await stranger("POST", "/api/v1/cohorts/join", {"code": code["code"]})
        assert (status, error_code(body)) == (410, "code_revoked")
        stale = await server.store.create_code(  # type: ignore[union-attr]
            cid, new_join_code(), expires_at=datetime.now(timezone.utc) - timedelta(seconds=1)
        )
        status, body = await stranger("POST", "/api/v1/cohorts/join", {"code": stale.code})
        assert (status, error_code(body)) == (410, "code_expired")
        status, body = await stranger("POST", "/api/v1/cohorts/join", {"code": "AAAA-BBBB-CC"})
        assert (status, error_code(body)) == (404, "unknown_code")

        status, bobs = await bob("POST", "/api/v1/leases", {"cohort": cid})
        assert status == 201
        status, ended = await teacher("POST", f"/api/v1/cohorts/{cid}/end", {})
        assert status == 200 and ended["state"] == "ended"
        status, lease = await bob("GET", f"/api/v1/leases/{bobs['lease']}")
        assert lease["state"] == "ended" and lease["end_reason"] == "the cohort's term ended"
        status, body = await bob("POST", "/api/v1/leases", {"cohort": cid})
        assert (status, error_code(body)) == (409, "cohort_ended")
    finally:
        for caller in (teacher, helper, alice, bob, stranger):
            caller.close()


async def test_bad_cohort_bodies_name_the_field_and_are_not_stored(
    start_coordinator: Starter,
) -> None:
    server = await start_coordinator()
    teacher = Caller(server)
    try:
        for body, field in [
            (create_body(gpu_types=[]), "gpu_types"),
            (create_body(term_ends_at=time.time() - 5), "term_ends_at"),
            (create_body(name=None), "name"),
            (create_body(price=1), "price"),
        ]:
            status, answer = await teacher("POST", "/api/v1/cohorts", body)
            assert (status, error_code(answer)) == (400, "bad_request")
            assert repr(field) in answer["error"]["message"]
        status, answer = await teacher("POST", "/api/v1/cohorts", [1])
        assert status == 400
        assert (await teacher("GET", "/api/v1/cohorts"))[1] == {"cohorts": []}
        # An unsigned request, a replayed one: 401.
        http = AsyncHTTPClient(force_instance=True)
        response = await http.fetch(
            HTTPRequest(server.url + "/api/v1/cohorts", method="POST", body=b"{}"),
            raise_error=False,
        )
        http.close()
        assert response.code == 401
    finally:
        teacher.close()


async def test_the_weekly_quota_ends_a_session_and_refuses_the_next(
    start_coordinator: Starter, providers: list[FakeProvider]
) -> None:
    server = await start_coordinator()
    provider = await linked(server, providers)
    teacher, student = Caller(server), Caller(server)
    try:
        status, cohort = await teacher(
            "POST", "/api/v1/cohorts", create_body(quota_gpu_seconds_per_week=2)
        )
        cid = cohort["id"]
        await teacher("POST", f"/api/v1/cohorts/{cid}/roster", {"students": [student.pubkey]})
        status, grant = await student("POST", "/api/v1/leases", {"cohort": cid, "gpus": 2})
        assert status == 201 and len(grant["gpu_indices"]) == 2
        started = time.monotonic()
        await provider.session(grant["lease"], "active")
        end = await provider.next_message("end")
        # 2 GPU-seconds on 2 GPUs: about one second of service.
        assert end["lease"] == grant["lease"] and end["reason"] == QUOTA_USED_UP
        assert time.monotonic() - started < 5
        status, lease = await student("GET", f"/api/v1/leases/{grant['lease']}")
        assert lease["state"] == "ended" and lease["end_reason"] == QUOTA_USED_UP
        status, body = await student("POST", "/api/v1/leases", {"cohort": cid})
        assert (status, error_code(body)) == (402, "quota_exhausted")
        assert "resets Monday" in body["error"]["message"]
        # Raising the quota lets the student lease again this week.
        await teacher("PATCH", f"/api/v1/cohorts/{cid}", {"quota_gpu_seconds_per_week": 3600})
        status, _ = await student("POST", "/api/v1/leases", {"cohort": cid})
        assert status == 201
    finally:
        teacher.close()
        student.close()


async def test_the_price_cap_is_the_cohorts(
    start_coordinator: Starter, providers: list[FakeProvider]
) -> None:
    server = await start_coordinator()
    await linked(server, providers)
    teacher, student = Caller(server), Caller(server)
    try:
        status, cohort = await teacher(
            "POST", "/api/v1/cohorts", create_body(max_price_lamports_per_hour=T4_PRICE - 1)
        )
        cid = cohort["id"]
        await teacher("POST", f"/api/v1/cohorts/{cid}/roster", {"students": [student.pubkey]})
        # A higher cap in the request does not lift the cohort's.
        status, body = await student(
            "POST", "/api/v1/leases", {"cohort": cid, "max_price_lamports_per_hour": 10**12}
        )
        assert (status, error_code(body)) == (409, "not_covered")
        assert "raise the cap" in body["error"]["message"]
    finally:
        teacher.close()
        student.close()


async def test_a_lease_warns_a_minute_before_the_quota_runs_out(
    start_coordinator: Starter, providers: list[FakeProvider]
) -> None:
    server = await start_coordinator()
    provider = await linked(server, providers)
    assert server.cohorts is not None and server.registry is not None
    teacher, student = Caller(server), Caller(server)
    try:
        status, cohort = await teacher(
            "POST", "/api/v1/cohorts", create_body(quota_gpu_seconds_per_week=100)
        )
        cid = cohort["id"]
        await teacher("POST", f"/api/v1/cohorts/{cid}/roster", {"students": [student.pubkey]})
        status, grant = await student("POST", "/api/v1/leases", {"cohort": cid, "gpus": 2})
        status, lease = await student("GET", f"/api/v1/leases/{grant['lease']}")
        assert not lease.get("warnings")  # not running yet: nothing to warn of
        await provider.session(grant["lease"], "active")
        quota = server.cohorts.quota
        await server.registry.wait_for(lambda: quota.runs_out(grant["lease"]) is not None, WAIT)
        status, lease = await student("GET", f"/api/v1/leases/{grant['lease']}")
        assert status == 200
        # 100 GPU-seconds on 2 GPUs: 50 s from activation, within the minute's warning.
        assert lease["ends_at"] == pytest.approx(lease["active_at"] + 50, abs=2)
        (warning,) = [w for w in lease["warnings"] if w["kind"] == "quota"]
        assert warning["at"] == lease["ends_at"] and "quota" in warning["message"]
    finally:
        teacher.close()
        student.close()


async def test_what_one_key_can_store_is_bounded(
    start_coordinator: Starter, monkeypatch: pytest.MonkeyPatch
) -> None:
    import jupyter_io.coordinator.cohorts as service

    monkeypatch.setattr(service, "MAX_COHORTS_PER_INSTRUCTOR", 2)
    monkeypatch.setattr(service, "MAX_LIVE_CODES", 2)
    monkeypatch.setattr(service, "MAX_STUDENTS", 2)
    server = await start_coordinator()
    teacher, students = Caller(server), [Caller(server) for _ in range(3)]
    try:
        ids = [(await teacher("POST", "/api/v1/cohorts", create_body()))[1]["id"] for _ in range(2)]
        status, body = await teacher("POST", "/api/v1/cohorts", create_body())
        assert (status, error_code(body)) == (429, "too_many") and "end one" in body["error"][
            "message"
        ]
        await teacher("POST", f"/api/v1/cohorts/{ids[1]}/end", {})
        assert (await teacher("POST", "/api/v1/cohorts", create_body()))[0] == 201

        cid = ids[0]
        codes = [(await teacher("POST", f"/api/v1/cohorts/{cid}/codes", {}))[1] for _ in range(2)]
        status, body = await teacher("POST", f"/api/v1/cohorts/{cid}/codes", {})
        assert (status, error_code(body)) == (429, "too_many")
        await teacher("DELETE", f"/api/v1/cohorts/{cid}/codes/{codes[0]['code']}")
        assert (await teacher("POST", f"/api/v1/cohorts/{cid}/codes", {}))[0] == 201

        for student in students[:2]:
            assert (await student("POST", "/api/v1/cohorts/join", {"code": codes[1]["code"]}))[
                0
            ] == 200
        status, body = await students[2]("POST", "/api/v1/cohorts/join", {"code": codes[1]["code"]})
        assert (status, error_code(body)) == (409, "cohort_full")
        status, body = await teacher(
            "POST", f"/api/v1/cohorts/{cid}/roster", {"students": [students[2].pubkey]}
        )
        assert (status, error_code(body)) == (429, "too_many")
    finally:
        teacher.close()
        for student in students:
            student.close()
