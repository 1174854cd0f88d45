"""The cohort contract (jupyter_io.cohorts), without a coordinator: request validation names
the field, codes and join links round-trip, ISO weeks in UTC, GPU-hour units, roster files,
and the JSON shapes both sides parse."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from solders.keypair import Keypair

from jupyter_io.cohorts import (
    CODE_ALPHABET,
    CODE_LENGTH,
    MAX_ROSTER,
    CohortRequestError,
    CohortView,
    StudentUsage,
    dashboard_csv,
    gpu_hours_to_seconds,
    gpu_seconds_to_hours,
    is_cohort_id,
    is_pubkey,
    join_link,
    new_cohort_id,
    new_join_code,
    next_week_start,
    normalise_code,
    parse_code_request,
    parse_create,
    parse_join,
    parse_join_target,
    parse_patch,
    parse_roster,
    parse_roster_csv,
    seconds_until_reset,
    week_start,
)

NOW = 1_800_000_000.0


def create_body(**changes: object) -> dict[str, object]:
    body: dict[str, object] = {
        "name": "CS229",
        "gpu_types": ["T4", "RTX 4090"],
        "max_price_lamports_per_hour": 2_000_000,
        "term_ends_at": NOW + 86400 * 90,
    }
    body.update(changes)
    return body


def test_create_defaults_and_the_field_named_in_every_refusal() -> None:
    settings = parse_create(create_body(), now=NOW)
    assert settings.gpu_types == ("T4", "RTX 4090")
    assert (
        settings.quota_gpu_seconds_per_week == 36_000 and settings.max_concurrent_per_student == 1
    )
    assert settings.student_cap_lamports is None and settings.requirements is None
    bad: list[tuple[dict[str, object], str]] = [
        (create_body(name=""), "name"),
        (create_body(name="x" * 201), "name"),
        (create_body(gpu_types=[]), "gpu_types"),
        (create_body(gpu_types="T4"), "gpu_types"),
        (create_body(gpu_types=["T4"] * 17), "gpu_types"),
        (create_body(max_price_lamports_per_hour=-1), "max_price_lamports_per_hour"),
        (create_body(max_price_lamports_per_hour=1.5), "max_price_lamports_per_hour"),
        (create_body(max_price_lamports_per_hour=True), "max_price_lamports_per_hour"),
        (create_body(term_ends_at=NOW - 1), "term_ends_at"),
        (create_body(term_ends_at=NOW + 3 * 366 * 86400), "term_ends_at"),
        (create_body(quota_gpu_seconds_per_week="10h"), "quota_gpu_seconds_per_week"),
        (create_body(max_concurrent_per_student=0), "max_concurrent_per_student"),
        (create_body(idle_timeout_seconds=5), "idle_timeout_seconds"),
        (create_body(requirements="x" * 9000), "requirements"),
        (create_body(colour="blue"), "colour"),
        ({"gpu_types": ["T4"]}, "name"),
    ]
    for body, field in bad:
        with pytest.raises(CohortRequestError) as refused:
            parse_create(body, now=NOW)
        assert refused.value.field == field and repr(field) in str(refused.value), body
    with pytest.raises(CohortRequestError, match="JSON object"):
        parse_create([1, 2], now=NOW)


def test_patch_changes_only_what_it_names() -> None:
    assert parse_patch({"quota_gpu_seconds_per_week": 7200}, now=NOW) == {
        "quota_gpu_seconds_per_week": 7200
    }
    assert parse_patch({"requirements": None, "student_cap_lamports": None}, now=NOW) == {
        "requirements": None,
        "student_cap_lamports": None,
    }
    with pytest.raises(CohortRequestError, match="at least one field"):
        parse_patch({}, now=NOW)
    with pytest.raises(CohortRequestError) as refused:
        parse_patch({"name": None}, now=NOW)
    assert refused.value.field == "name"
    with pytest.raises(CohortRequestError) as refused:
        parse_patch({"instructor": "me"}, now=NOW)
    assert refused.value.field == "instructor"


def test_codes_and_join_links_round_trip() -> None:
    code = new_join_code()
    assert len(code) == CODE_LENGTH and set(code) <= set(CODE_ALPHABET)
    assert not set("IO01") & set(CODE_ALPHABET)
    spaced = f"{code[:4].lower()}-{code[4:8]} {code[8:]}"
    assert normalise_code(spaced) == code
    with pytest.raises(CohortRequestError) as refused:
        normalise_code("IO01IO01IO")
    assert refused.value.field == "code"

    url = "https://gpu.example.edu:8700/base"
    link = join_link(url, code)
    assert link.startswith("jupyter-io:join?coordinator=https%3A%2F%2F")
    assert parse_join_target(link).coordinator == url and parse_join_target(link).code == code
    assert parse_join_target(f"  {code.lower()} ").coordinator is None
    assert parse_join({"code": link}) == code
    with pytest.raises(CohortRequestError) as refused:
        parse_join_target(f"jupyter-io:join?coordinator=file%3A%2F%2Fx&code={code}")
    assert refused.value.field == "coordinator"
    with pytest.raises(CohortRequestError):
        parse_join_target("jupyter-io:join?coordinator=http%3A%2F%2Fx")
    assert parse_code_request({}) == (7 * 86400, None)
    assert parse_code_request({"ttl_seconds": 3600, "max_uses": 40}) == (3600, 40)
    with pytest.raises(CohortRequestError) as refused:
        parse_code_request({"ttl_seconds": 10})
    assert refused.value.field == "ttl_seconds"


def test_ids_and_keys() -> None:
    assert is_cohort_id(new_cohort_id()) and not is_cohort_id("c_short")
    assert all(is_pubkey(str(Keypair().pubkey())) for _ in range(50))
    assert not is_pubkey("0OIl" * 11) and not is_pubkey("abc") and not is_pubkey(None)
    assert not is_pubkey("z" * 44)  # base58, but more than 32 bytes


def test_iso_weeks_in_utc() -> None:
    sunday_late = datetime(2026, 12, 6, 23, 30, tzinfo=timezone.utc)
    assert week_start(sunday_late) == datetime(2026, 11, 30, tzinfo=timezone.utc)
    assert next_week_start(sunday_late) == datetime(2026, 12, 7, tzinfo=timezone.utc)
    assert seconds_until_reset(sunday_late) == 1800
    # Monday 00:30 in UTC+2 is still Sunday 22:30 in UTC: the previous week.
    plus_two = timezone(timedelta(hours=2))
    assert week_start(datetime(2026, 12, 7, 0, 30, tzinfo=plus_two)) == week_start(sunday_late)
    monday = datetime(2026, 12, 7, tzinfo=timezone.utc)
    assert week_start(monday) == monday and seconds_until_reset(monday) == 7 * 86400
    with pytest.raises(ValueError, match="naive"):
        week_start(datetime(2026, 12, 7))


def test_gpu_hour_units() -> None:
    assert gpu_hours_to_seconds(10) == 36_000 and gpu_hours_to_seconds("7.5") == 27_000
    assert gpu_seconds_to_hours(27_000) == 7.5
    for bad in ("-1", "ten", "nan", "inf"):
        with pytest.raises(ValueError):
            gpu_hours_to_seconds(bad)


def test_roster_bodies_and_files() -> None:
    keys = [str(Keypair().pubkey()) for _ in range(3)]
    assert parse_roster({"students": [*keys, keys[0], "nope", 7]}) == (keys, ["nope", "7"])
    with pytest.raises(CohortRequestError) as refused:
        parse_roster({"students": keys * (MAX_ROSTER // 3 + 1)})
    assert refused.value.field == "students"
    plain = f"# CS229 roster\n{keys[0]}\n\n{keys[1]},Ada\n{keys[1]}\nnot-a-key\n"
    assert parse_roster_csv(plain) == (keys[:2], ["not-a-key"])
    table = f"name,pubkey\nAda,{keys[0]}\nBob,{keys[2]}\nEve,\n"
    assert parse_roster_csv(table) == ([keys[0], keys[2]], [""])


def test_shapes_round_trip_and_csv() -> None:
    row = StudentUsage(student="S1", gpu_seconds_week=5400, quota_left_gpu_seconds=1800)
    view = CohortView(
        id=new_cohort_id(), name="CS229", instructor="I", instructors=("I", "J"),
        gpu_types=("T4",), max_price_lamports_per_hour=1, quota_gpu_seconds_per_week=7200,
        max_concurrent_per_student=1, idle_timeout_seconds=600, max_session_seconds=3600,
        queue_max_wait_seconds=60, student_cap_lamports=None, term_ends_at=NOW,
        requirements=None, environment_sha256=None, state="active", created_at=NOW,
        ended_at=None, students=3, role="student", me=row,
    )  # fmt: skip
    assert CohortView.from_json(view.to_json()) == view
    csv_text = dashboard_csv([row])
    assert csv_text.splitlines()[0].startswith("student,gpu_hours_week,")
    assert csv_text.splitlines()[1].startswith("S1,1.5000,0,0,,0,0.5000,")
