"""``jupyter io cohort ...`` as people type it, against a real coordinator: an instructor
creates a class, shares a code, imports a roster file, sets the quota, reads the dashboard as
CSV and ends the term; a student joins with the link; an instructor reserves GPUs for a lab
session, lists and deletes the reservation; bad input is an error naming the flag or the
file, with exit status 1."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from solders.keypair import Keypair

from jupyter_io.cohort_client import CohortClient
from jupyter_io.identity import write_keypair

from .conftest import Starter

pytestmark = pytest.mark.timeout(90)

JUPYTER = str(Path(sys.executable).with_name("jupyter"))


async def cohort(*args: str, keypair: Path, url: str, ok: bool = True) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        JUPYTER, "io", "cohort", *args, "--keypair", str(keypair), "--coordinator", url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert (proc.returncode == 0) is ok, (args, out.decode(), err.decode())
    return proc.returncode or 0, out.decode(), err.decode()


async def test_the_cohort_commands_run_a_term(start_coordinator: Starter, tmp_path: Path) -> None:
    server = await start_coordinator()
    url = server.url
    teacher, student, other = Keypair(), Keypair(), Keypair()
    teacher_file = write_keypair(teacher, tmp_path / "teacher.json")
    student_file = write_keypair(student, tmp_path / "student.json")

    _, out, _ = await cohort(
        "create", "CS229", "--gpu-types", "T4, RTX 4090", "--max-price", "0.002",
        "--quota-hours", "7.5", "--term-days", "30", "--json",
        keypair=teacher_file, url=url,
    )  # fmt: skip
    created = json.loads(out)
    cid = created["id"]
    assert created["gpu_types"] == ["T4", "RTX 4090"]
    assert created["max_price_lamports_per_hour"] == 2_000_000
    assert created["quota_gpu_seconds_per_week"] == 27_000

    _, out, _ = await cohort(
        "code", cid, "--max-uses", "3", "--json", keypair=teacher_file, url=url
    )
    link = json.loads(out)["link"]
    # The student names no coordinator: the link does.
    _, out, _ = await cohort("join", link, keypair=student_file, url="http://127.0.0.1:9")
    assert "joined" in out and "7.50 left" in out

    roster = tmp_path / "roster.csv"
    roster.write_text(f"name,pubkey\nAda,{other.pubkey()}\nBob,{student.pubkey()}\nEve,oops\n")
    status, out, _ = await cohort(
        "roster", cid, str(roster), keypair=teacher_file, url=url, ok=False
    )
    assert status == 1 and "added 1, already members 1" in out and "'oops'" in out

    await cohort("set", cid, "--quota-hours", "2", keypair=teacher_file, url=url)
    _, out, _ = await cohort("dashboard", cid, "--csv", keypair=teacher_file, url=url)
    lines = out.splitlines()
    assert lines[0].startswith("student,gpu_hours_week") and len(lines) == 3
    assert all(line.split(",")[6] == "2.0000" for line in lines[1:])  # quota left: 2 GPU-h

    # A student sees no dashboard; errors go to stderr with status 1.
    _, _, err = await cohort("dashboard", cid, keypair=student_file, url=url, ok=False)
    assert "only the instructors" in err
    _, _, err = await cohort("set", cid, "--quota-hours", "lots", keypair=teacher_file, url=url,
                             ok=False)  # fmt: skip
    assert "--quota-hours" in err
    _, _, err = await cohort("join", "IO01", keypair=student_file, url=url, ok=False)
    assert "join code" in err

    _, out, _ = await cohort("end", cid, "--json", keypair=teacher_file, url=url)
    assert json.loads(out)["state"] == "ended"
    _, out, _ = await cohort("list", keypair=student_file, url=url)
    assert cid in out and "student" in out and "ended" in out


async def test_reserve_lists_and_unreserves_gpus_for_a_lab_session(
    start_coordinator: Starter, tmp_path: Path
) -> None:
    server = await start_coordinator()
    url = server.url
    teacher, student = Keypair(), Keypair()
    teacher_file = write_keypair(teacher, tmp_path / "teacher.json")
    student_file = write_keypair(student, tmp_path / "student.json")
    async with CohortClient(url, teacher, timeout=30) as client:
        view = await client.create(
            name="lab", gpu_types=["T4"], max_price_lamports_per_hour=10**7,
            term_ends_at=time.time() + 30 * 86400,
        )  # fmt: skip
        await client.add_students(view.id, [str(student.pubkey())])
    cid = view.id
    day = time.strftime("%Y-%m-%d", time.gmtime(time.time() + 86400))

    # An ISO time without an offset is UTC; one with an offset says where it is.
    _, out, _ = await cohort(
        "reserve", cid, "--gpu", "T4", "--count", "30", "--start", f"{day}T14:00",
        "--end", f"{day}T17:00+01:00", "--json", keypair=teacher_file, url=url,
    )  # fmt: skip
    made = json.loads(out)
    starts = datetime.fromisoformat(f"{day}T14:00+00:00").timestamp()
    assert made["id"].startswith("r_") and made["cohort"] == cid
    assert (made["gpu"], made["count"]) == ("T4", 30)
    assert (made["starts_at"], made["ends_at"]) == (starts, starts + 2 * 3600)
    assert server.store is not None
    (stored,) = await server.store.reservations(cid)
    assert stored.id == made["id"] and stored.count == 30

    _, out, _ = await cohort("reservations", cid, keypair=teacher_file, url=url)
    assert f"{made['id']}  30 x T4  {day} 14:00 UTC to {day} 16:00 UTC" in out

    # Bad input names the flag and reaches nobody; the coordinator's refusals come through.
    _, _, err = await cohort("reserve", cid, "--gpu", "T4", "--count", "3", "--start",
                             "tomorrow", "--end", f"{day}T15:00", keypair=teacher_file,
                             url=url, ok=False)  # fmt: skip
    assert "--start 'tomorrow' is not a time" in err
    _, _, err = await cohort("reserve", cid, "--gpu", "T4", "--count", "3", "--start",
                             f"{day}T15:00", "--end", f"{day}T14:00", keypair=teacher_file,
                             url=url, ok=False)  # fmt: skip
    assert "--end" in err and "must be after --start" in err
    _, _, err = await cohort("reserve", cid, "--gpu", "T4", "--count", "3", "--start",
                             f"{day}T00:00", "--end", f"{day}T23:00", keypair=student_file,
                             url=url, ok=False)  # fmt: skip
    assert "only the class's instructors" in err
    assert len(await server.store.reservations(cid)) == 1

    _, out, _ = await cohort("unreserve", cid, made["id"], keypair=teacher_file, url=url)
    assert f"reservation {made['id']} deleted" in out
    assert await server.store.reservations(cid) == []
    _, _, err = await cohort("unreserve", cid, made["id"], keypair=teacher_file, url=url,
                             ok=False)  # fmt: skip
    assert "has no reservation" in err


async def test_the_dashboard_prints_the_pool_and_each_allowance_as_on_chain(
    start_coordinator: Starter, tmp_path: Path
) -> None:
    """Text and CSV carry the pool's figures (left, held, run-out) and each student's
    allowance, equal to what the ledger holds; a reclaimed student's allowance reads empty."""
    from jupyter_io.payments.amounts import LAMPORTS_PER_SOL, format_sol
    from jupyter_io.payments.cohort_pool import AllowanceTerms, CohortPoolClient

    server = await start_coordinator(payments="escrow", cohort_allowance_ttl=0)
    assert server.keypair is not None
    teacher, ada, bob = Keypair(), Keypair(), Keypair()
    teacher_file = write_keypair(teacher, tmp_path / "teacher.json")
    url = server.url
    async with CohortClient(url, teacher, timeout=30) as client:
        view = await client.create(
            name="pool", gpu_types=["T4"], max_price_lamports_per_hour=10**7,
            term_ends_at=time.time() + 30 * 86400,
        )  # fmt: skip
        await client.add_students(view.id, [str(ada.pubkey()), str(bob.pubkey())])
    cid = view.id
    pool = CohortPoolClient.connect(server.solana_url)
    try:
        await pool.airdrop(teacher.pubkey(), LAMPORTS_PER_SOL)
        # Before any fund: no allowance on-chain, nothing to run out.
        _, out, _ = await cohort("dashboard", cid, keypair=teacher_file, url=url)
        assert "pool left: 0 SOL spendable, 0 SOL held in 0 allowance(s)" in out
        assert "projected run-out: no spending this week to project from" in out

        await cohort("fund", cid, "--cap", "0.03", keypair=teacher_file, url=url)
        await cohort("reclaim", cid, "--student", str(bob.pubkey()), keypair=teacher_file,
                     url=url)  # fmt: skip
        terms = AllowanceTerms(teacher.pubkey(), ada.pubkey(), server.keypair.pubkey(), cid)
        state = await pool.allowance_state(terms)
        assert state is not None and state.spendable == 30_000_000
        assert await pool.allowance_state(
            AllowanceTerms(teacher.pubkey(), bob.pubkey(), server.keypair.pubkey(), cid)
        ) is None  # fmt: skip

        _, out, _ = await cohort("dashboard", cid, keypair=teacher_file, url=url)
        rows = {line.split()[0]: line for line in out.splitlines() if line[:1].isalnum()}
        assert rows[str(ada.pubkey())].endswith(format_sol(state.spendable))
        assert rows[str(bob.pubkey())].endswith(" -")
        assert (
            f"pool left: {format_sol(state.spendable)} spendable, "
            f"{format_sol(state.amount)} held in 1 allowance(s)"
        ) in out
        assert "projected run-out: no spending this week to project from" in out

        _, out, _ = await cohort("dashboard", cid, "--csv", keypair=teacher_file, url=url)
        header, *lines = out.splitlines()
        columns = header.split(",")
        rows_csv = [dict(zip(columns, line.split(","), strict=True)) for line in lines]
        ada_row, bob_row = sorted(rows_csv, key=lambda r: r["student"] != str(ada.pubkey()))
        assert ada_row["allowance_spendable_lamports"] == str(state.spendable)
        assert ada_row["allowance_amount_lamports"] == str(state.amount)
        assert ada_row["allowance_delegated_lamports"] == str(state.delegated_amount)
        assert bob_row["student"] == str(bob.pubkey())
        assert bob_row["allowance_spendable_lamports"] == ""
    finally:
        await pool.close()

    # A free coordinator has no pool: the text says so with the coordinator's reason.
    free = await start_coordinator(payments="free", data_dir=str(tmp_path / "free"))
    async with CohortClient(free.url, teacher, timeout=30) as client:
        view = await client.create(
            name="free", gpu_types=["T4"], max_price_lamports_per_hour=10**7,
            term_ends_at=time.time() + 30 * 86400,
        )  # fmt: skip
    _, out, _ = await cohort("dashboard", view.id, keypair=teacher_file, url=free.url)
    assert "pool left: not reported (" in out and "projected run-out: not reported" in out


def test_the_dashboard_text_projects_the_run_out_from_the_pool() -> None:
    from jupyter_io.cohort_app import dashboard_text

    now = 1_800_000_000.0
    pool = {"allowance_lamports": 5, "held_lamports": 7, "students_funded": 1,
            "spent_lamports_term": 3, "projected_run_out": now + 86400}  # fmt: skip
    text = dashboard_text({"students": [], "pool": pool}, now)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(now + 86400))
    assert f"projected run-out: {when}" in text
    text = dashboard_text({"students": [], "pool": {**pool, "projected_run_out": now}}, now)
    assert "projected run-out: now (nothing left to spend)" in text
