"""The server extension's class endpoints against a real coordinator: the Lab's key is a
student's in some tests and the instructor's in others; the other party is a second key
talking to the same coordinator through the cohort client."""

from __future__ import annotations

import time
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
from solders.keypair import Keypair

from jupyter_io.cohort_client import CohortClient
from jupyter_io.coordinator_client import LeaseInfo
from jupyter_io.identity import load_keypair
from jupyter_io.serverext.cohorts import cohort_spec_name, parse_cohort_spec_name

QUOTA = 10 * 3600


async def new_cohort(url: str, instructor: Keypair, name: str = "CS229") -> tuple[str, str]:
    """A cohort taught by ``instructor`` paying for the RTX 4090; (its id, a join code)."""
    async with CohortClient(url, instructor, timeout=10) as client:
        cohort = await client.create(
            name=name,
            gpu_types=["rtx4090"],
            max_price_lamports_per_hour=1_000_000_000,
            quota_gpu_seconds_per_week=QUOTA,
            term_ends_at=time.time() + 86400,
        )
        code = await client.create_code(cohort.id)
    return cohort.id, code.code


ENDPOINTS = [
    ("GET", "cohorts"),
    ("POST", "cohorts/join"),
    ("GET", "cohorts/c_0123456789abcdef"),
    ("GET", "cohorts/c_0123456789abcdef/dashboard"),
    ("DELETE", "cohorts/c_0123456789abcdef/members/x"),
    ("POST", "cohorts/c_0123456789abcdef/topup"),
]


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
async def test_every_class_endpoint_needs_a_logged_in_user(
    jp_fetch: Any, method: str, path: str
) -> None:
    body = "{}" if method == "POST" else None
    response = await jp_fetch(
        "jupyter-io", *path.split("/"), method=method, body=body,
        headers={"Authorization": ""}, raise_error=False,
    )  # fmt: skip
    assert response.code == 403


async def test_a_student_joins_with_a_code_and_gets_the_class_gpus_and_its_kernelspec(
    fetch_json: Any, market: Any, user_keypair_path: Path
) -> None:
    cohort_id, code = await new_cohort(market.url, Keypair())
    status, body = await fetch_json("jupyter-io", "cohorts")
    assert (status, body["cohorts"]) == (200, [])

    # As typed from a whiteboard: lower case, a dash in the middle.
    status, joined = await fetch_json(
        "jupyter-io",
        "cohorts",
        "join",
        method="POST",
        body={"code": f"{code[:5]}-{code[5:]}".lower()},
    )
    assert status == 200, joined
    assert joined["role"] == "student" and joined["cohort"]["id"] == cohort_id

    status, body = await fetch_json("jupyter-io", "cohorts")
    [cohort] = body["cohorts"]
    assert cohort["role"] == "student" and cohort["name"] == "CS229"
    me = cohort["me"]
    assert me["student"] == str(load_keypair(user_keypair_path).pubkey())
    assert (me["gpu_seconds_week"], me["quota_left_gpu_seconds"]) == (0, QUOTA)
    [gpu] = cohort["gpus"]
    assert gpu["gpu"] == "rtx4090" and gpu["offered"] and gpu["available"] == 1
    assert gpu["kernel_name"] == cohort_spec_name(cohort_id, "rtx4090")

    # The kernelspec that starts a kernel paid by the class.
    status, specs = await fetch_json("api", "kernelspecs")
    spec = specs["kernelspecs"][gpu["kernel_name"]]["spec"]
    config = spec["metadata"]["kernel_provisioner"]["config"]
    assert config["cohort"] == cohort_id and config["gpu"] == "rtx4090"
    assert config["coordinator_url"] == market.url
    assert spec["display_name"] == "RTX 4090 · CS229"
    assert spec["metadata"]["jupyter_io"]["cohort_name"] == "CS229"

    # A student sees no dashboard: the coordinator's refusal comes back as it is.
    status, refused = await fetch_json("jupyter-io", "cohorts", cohort_id, "dashboard")
    assert status == 403, refused


async def test_a_join_link_of_another_coordinator_and_a_malformed_code_are_refused_plainly(
    fetch_json: Any, market: Any
) -> None:
    elsewhere = "http://coordinator.example:8700"
    link = f"jupyter-io:join?coordinator={urllib.parse.quote(elsewhere, safe='')}&code=ABCDEFGHJK"
    status, body = await fetch_json(
        "jupyter-io", "cohorts", "join", method="POST", body={"code": link}
    )
    assert status == 400
    assert elsewhere in body["message"] and market.url in body["message"]

    status, body = await fetch_json(
        "jupyter-io", "cohorts", "join", method="POST", body={"code": "not a code"}
    )
    assert status == 400 and "10 letters and digits" in body["message"]
    status, body = await fetch_json("jupyter-io", "cohorts", "join", method="POST", body={})
    assert status == 400 and "join code" in body["message"]


async def test_a_join_link_of_this_coordinator_is_taken(fetch_json: Any, market: Any) -> None:
    cohort_id, code = await new_cohort(market.url, Keypair())
    link = f"jupyter-io:join?coordinator={urllib.parse.quote(market.url, safe='')}&code={code}"
    status, body = await fetch_json(
        "jupyter-io", "cohorts", "join", method="POST", body={"code": link}
    )
    assert status == 200 and body["cohort"]["id"] == cohort_id


async def test_the_instructor_gets_the_dashboard_as_json_and_csv_and_removes_a_student(
    fetch_json: Any, jp_fetch: Any, market: Any, user_keypair_path: Path
) -> None:
    cohort_id, code = await new_cohort(market.url, load_keypair(user_keypair_path))
    student = Keypair()
    async with CohortClient(market.url, student, timeout=10) as client:
        await client.join(code)

    status, body = await fetch_json("jupyter-io", "cohorts")
    [cohort] = body["cohorts"]
    assert cohort["role"] == "instructor" and "gpus" not in cohort and cohort["students"] == 1

    status, board = await fetch_json("jupyter-io", "cohorts", cohort_id, "dashboard")
    assert status == 200, board
    [row] = board["students"]
    assert row["student"] == str(student.pubkey()) and row["quota_left_gpu_seconds"] == QUOTA

    response = await jp_fetch(
        "jupyter-io", "cohorts", cohort_id, "dashboard", params={"format": "csv"}
    )
    assert response.headers["Content-Type"].startswith("text/csv")
    assert f'filename="cohort-{cohort_id}-week.csv"' in response.headers["Content-Disposition"]
    header, line = response.body.decode().splitlines()
    assert header.startswith("student,gpu_hours_week,") and line.startswith(
        f"{student.pubkey()},0.0000,"
    )

    status, removed = await fetch_json(
        "jupyter-io", "cohorts", cohort_id, "members", str(student.pubkey()), method="DELETE"
    )
    assert (status, removed["removed"]) == (200, True)
    status, board = await fetch_json("jupyter-io", "cohorts", cohort_id, "dashboard")
    assert board["students"] == []


async def test_a_top_up_on_a_free_coordinator_says_there_is_no_pool_and_moves_nothing(
    fetch_json: Any, market: Any, user_keypair_path: Path
) -> None:
    cohort_id, code = await new_cohort(market.url, load_keypair(user_keypair_path))
    async with CohortClient(market.url, Keypair(), timeout=10) as client:
        await client.join(code)
    status, body = await fetch_json(
        "jupyter-io", "cohorts", cohort_id, "topup", method="POST", body={"lamports": 1000}
    )
    assert status == 409 and "takes no escrow payments" in body["message"]
    status, body = await fetch_json(
        "jupyter-io", "cohorts", cohort_id, "topup", method="POST", body={"lamports": 0}
    )
    assert status == 400


def test_a_cohort_kernelspec_name_keeps_the_case_of_the_cohort_id() -> None:
    name = cohort_spec_name("c_AbC-dEf_0123456789", "RTX 4090")
    assert name == name.lower()  # Jupyter lower-cases kernelspec names
    assert parse_cohort_spec_name(name) == ("c_AbC-dEf_0123456789", "rtx-4090")
    assert parse_cohort_spec_name("jupyter-io-rtx-4090") is None
    assert parse_cohort_spec_name("jupyter-io-cohort-zz-rtx4090") is None
    assert parse_cohort_spec_name("jupyter-io-cohort-abc-rtx4090") is None  # odd hex


def test_a_lease_carries_its_cohort_and_its_warnings() -> None:
    body = {
        "lease": "l1", "user": "u", "provider": "p", "gpu": "rtx4090", "gpu_indices": [0],
        "price_lamports_per_hour": 1, "state": "active", "relay": True, "requested_at": 1.0,
        "cohort": "c_0123456789abcdef", "ends_at": 200.0,
        "warnings": [{"kind": "idle", "at": 200.0, "message": "idle for 29 min"}, "junk"],
    }  # fmt: skip
    info = LeaseInfo.from_json(body)
    assert info.cohort == "c_0123456789abcdef" and info.ends_at == 200.0
    assert info.warnings == ({"kind": "idle", "at": 200.0, "message": "idle for 29 min"},)
    assert LeaseInfo.from_json({**body, "warnings": None, "cohort": None}).warnings == ()
