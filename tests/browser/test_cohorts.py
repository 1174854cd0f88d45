"""Classes in JupyterLab, in Chromium: an instructor's Lab and a student's Lab (two keys, one
coordinator). The student joins with the code in the GPU picker and sees the class's GPUs
with the week's quota; the instructor's dashboard lists the student and follows the class
without a reload. Screenshots for the README: see conftest.py."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import secrets
import time
import urllib.request
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from solders.keypair import Keypair
from solders.pubkey import Pubkey

from jupyter_io.identity import load_keypair, write_keypair
from jupyter_io.payments.amounts import LAMPORTS_PER_SOL

from .conftest import PICKER_TAB
from .lab_stack import START_TIMEOUT, Lab, airdrop
from .lab_stack import Stack as Backend

pytest.importorskip("playwright.sync_api")
from playwright.sync_api import TimeoutError as PlaywrightTimeout

T = TypeVar("T")
CLASS = "Browser class"
QUOTA_HOURS = 10


def run_async(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine on a loop of its own, in a thread (Playwright's sync API may run an
    event loop in this one)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, factory()).result(timeout=60)


def as_user(coordinator_url: str, keypair: Keypair, call: str, *args: Any, **kwargs: Any) -> Any:
    """``CohortClient(coordinator_url, keypair).call(*args, **kwargs)``, signed by ``keypair``."""
    from jupyter_io.cohort_client import CohortClient

    async def ask() -> Any:
        async with CohortClient(coordinator_url, keypair, timeout=20) as client:
            return await getattr(client, call)(*args, **kwargs)

    return run_async(ask)


def wait_for(check: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    """``check()`` once it is truthy; AssertionError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g} s"
        time.sleep(0.2)
    return found


@dataclass
class Classroom:
    backend: Backend
    instructor_lab: Lab
    student_lab: Lab
    instructor: Keypair
    student: Keypair
    cohort_id: str
    code: str

    @property
    def url(self) -> str:
        return self.backend.coordinator_url


@pytest.fixture(scope="module")
def classroom(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Classroom]:
    root = tmp_path_factory.mktemp("classroom")
    backend = Backend(root)
    try:
        backend.start_backend(user_funds=5 * LAMPORTS_PER_SOL, min_deposit_seconds=1)
        assert backend.user_keypair is not None
        instructor = load_keypair(backend.user_keypair)
        # The coordinator's arbiter fronts a class session's rents and fee (it gets them back).
        info = json.loads(urllib.request.urlopen(f"{backend.coordinator_url}/api/v1/info").read())
        airdrop(backend.solana_url, Pubkey.from_string(info["arbiter"]), LAMPORTS_PER_SOL)
        student = Keypair()
        student_key = write_keypair(student, root / "student.json")
        cohort = as_user(
            backend.coordinator_url,
            instructor,
            "create",
            name=CLASS,
            gpu_types=["rtx4090"],
            max_price_lamports_per_hour=LAMPORTS_PER_SOL,
            quota_gpu_seconds_per_week=QUOTA_HOURS * 3600,
            term_ends_at=time.time() + 30 * 24 * 3600,
        )
        code = as_user(backend.coordinator_url, instructor, "create_code", cohort.id)
        labs = [backend.start_lab("instructor"), backend.start_lab("student", keypair=student_key)]
        for lab in labs:
            # Jupyter Server prints its URL just before it binds the port.
            wait_for(lambda lab=lab: answers(lab), f"{lab.url} answers", START_TIMEOUT)
        yield Classroom(
            backend,
            *labs,
            instructor,
            student,
            cohort.id,
            code.code,
        )
    finally:
        backend.close()


def answers(lab: Lab) -> bool:
    try:
        lab.api("GET", "/api/status")
    except OSError:
        return False
    return True


def open_lab(browser: Any, lab: Lab) -> Any:
    """A fresh page with ``lab`` loaded in a workspace of its own."""
    context = browser.new_context(viewport={"width": 1400, "height": 860})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(
        f"{lab.url}/lab/workspaces/test-{secrets.token_hex(4)}?reset&token={lab.token}",
        timeout=START_TIMEOUT * 1000,
    )
    page.wait_for_selector("#jp-main-dock-panel", timeout=START_TIMEOUT * 1000)
    return page


def fetch_text(lab: Lab, path: str) -> tuple[str, str]:
    """``path`` on ``lab``'s server: (Content-Type, body)."""
    request = urllib.request.Request(
        f"{lab.url}{path}", headers={"Authorization": f"token {lab.token}"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.headers.get("Content-Type", ""), response.read().decode()


def test_a_student_joins_with_the_code_and_sees_the_class_gpus_with_the_quota_left(
    browser: Any, classroom: Classroom, screenshots: Path
) -> None:
    page = open_lab(browser, classroom.student_lab)
    try:
        page.locator(PICKER_TAB).click()
        picker = page.locator("#jupyter-io-picker")
        picker.locator(".jio-Cohorts-join").click()
        dialog = page.locator(".jp-Dialog")
        # The code as an instructor would read it out: lower case, dashes between groups.
        code = classroom.code.lower()
        dialog.locator("input").fill(f"{code[:4]}-{code[4:]}")
        dialog.locator(".jp-mod-accept").click()
        toast = page.locator(".Toastify__toast", has_text=f"Joined {CLASS}").first
        toast.wait_for()
        assert f"Joined {CLASS}: {QUOTA_HOURS} of {QUOTA_HOURS} GPU-h left" in toast.inner_text()

        card = picker.locator(f'.jio-Cohort[data-cohort="{classroom.cohort_id}"]')
        quota = card.locator(".jio-Cohort-quota")
        quota.wait_for()
        assert quota.inner_text() == f"{CLASS}: {QUOTA_HOURS} of {QUOTA_HOURS} GPU-h left this week"
        assert card.get_attribute("data-role") == "student"
        row = card.locator('.jio-CohortGpu[data-gpu="rtx4090"]')
        assert row.locator(".jio-CohortGpu-name").inner_text() == "RTX 4090 (simulated)"
        assert row.locator(".jio-CohortGpu-free").inner_text() == "1/1 free"
        assert row.locator(".jio-CohortGpu-notebook").is_enabled()
        kernel_name = row.get_attribute("data-kernel-name")
        assert kernel_name and kernel_name.startswith("jupyter-io-cohort-")
        page.wait_for_timeout(500)  # the success toast settles
        page.screenshot(path=str(screenshots / "cohort-picker.png"))
    finally:
        page.context.close()

    # The section's buttons start that kernelspec: it leases for the class.
    specs = classroom.student_lab.api("GET", "/api/kernelspecs")["kernelspecs"]
    config = specs[kernel_name]["spec"]["metadata"]["kernel_provisioner"]["config"]
    assert config["cohort"] == classroom.cohort_id and config["gpu"] == "rtx4090"
    assert config["keypair_path"].endswith("student.json")
    # The instructor's Lab has no such kernelspec: it teaches the class, it does not study.
    specs = classroom.instructor_lab.api("GET", "/api/kernelspecs")["kernelspecs"]
    assert not [name for name in specs if name.startswith("jupyter-io-cohort-")]


def test_the_instructor_dashboard_lists_the_student_and_follows_the_class(
    browser: Any, classroom: Classroom, screenshots: Path
) -> None:
    student = str(classroom.student.pubkey())
    if not [
        c for c in classroom.student_lab.api("GET", "/jupyter-io/cohorts")["cohorts"]
        if c["id"] == classroom.cohort_id
    ]:  # fmt: skip
        as_user(classroom.url, classroom.student, "join", classroom.code)  # run alone
    page = open_lab(browser, classroom.instructor_lab)
    try:
        page.locator(PICKER_TAB).click()
        card = page.locator(f'#jupyter-io-picker .jio-Cohort[data-cohort="{classroom.cohort_id}"]')
        card.wait_for()
        assert card.get_attribute("data-role") == "instructor"
        card.locator(".jio-Cohort-dashboard").click()

        dashboard = page.locator(f"#jupyter-io-dashboard-{classroom.cohort_id}")
        row = dashboard.locator(f'.jio-Dashboard-row[data-student="{student}"]')
        row.wait_for()
        assert row.locator(".jio-Dashboard-hours").inner_text() == "0"
        assert row.locator(".jio-Dashboard-cost").inner_text() == "0 SOL"
        assert row.locator(".jio-Dashboard-live").inner_text() == "0"
        assert row.locator(".jio-Dashboard-left").inner_text() == str(QUOTA_HOURS)
        assert dashboard.locator(".jio-Dashboard-title").inner_text().startswith(CLASS)

        # A second student joins from a terminal: the open dashboard shows them within 10 s.
        late = Keypair()
        as_user(classroom.url, late, "join", classroom.code)
        seen = time.monotonic()
        dashboard.locator(f'.jio-Dashboard-row[data-student="{late.pubkey()}"]').wait_for(
            timeout=10_000
        )
        print(f"a join reached the open dashboard in {time.monotonic() - seen:.1f} s")
        page.wait_for_timeout(300)
        page.screenshot(path=str(screenshots / "cohort-dashboard.png"))

        # Export CSV: a download of the week, a row per student.
        with page.expect_download() as download:
            dashboard.locator(".jio-Dashboard-csv").click()
        assert download.value.suggested_filename == f"cohort-{classroom.cohort_id}-week.csv"
        lines = Path(download.value.path()).read_text().splitlines()
        assert lines[0].startswith("student,gpu_hours_week,")
        assert {line.split(",")[0] for line in lines[1:]} == {student, str(late.pubkey())}

        # Remove the late student: asked first, then gone from the class and the table.
        late_row = dashboard.locator(f'.jio-Dashboard-row[data-student="{late.pubkey()}"]')
        late_row.locator(".jio-Dashboard-revoke").click()
        page.locator(".jp-Dialog").get_by_role("button", name="Remove").click()
        page.locator(".Toastify__toast", has_text="Removed").first.wait_for()
        late_row.wait_for(state="detached", timeout=10_000)

        # Top up the student's allowance from the instructor's wallet.
        row.locator(".jio-Dashboard-topup").click()
        dialog = page.locator(".jp-Dialog")
        dialog.locator("input").fill("0.25")
        dialog.get_by_role("button", name="Top up").click()
        page.locator(".Toastify__toast", has_text="Topped up by 0.25 SOL").first.wait_for()

        # Behind another tab the dashboard asks nothing; shown again, it asks at once.
        asked: list[float] = []
        page.on(
            "request",
            lambda r: asked.append(time.monotonic()) if "/dashboard" in r.url else None,
        )
        page.locator(".lm-DockPanel-tabBar .lm-TabBar-addButton").first.click()  # a launcher
        page.locator(".jp-Launcher:visible").first.wait_for()
        hidden_at = time.monotonic()
        page.wait_for_timeout(6_000)  # past the next of its 5 s polls
        assert [t for t in asked if t > hidden_at + 0.5] == []
        page.locator(".lm-DockPanel-tabBar .lm-TabBar-tab", has_text="dashboard").click()
        page.wait_for_timeout(1_500)
        assert [t for t in asked if t > hidden_at + 6]
        # The pool's figure is the allowance read on the ledger (the coordinator's read is
        # kept 5 s: the top-up is older than that by now).
        pool = dashboard.locator(".jio-Dashboard-pool")
        pool.filter(has_text="pool left 0.25 SOL").wait_for(timeout=10_000)
        assert "not reported" not in pool.inner_text()
        assert row.locator(".jio-Dashboard-allowance").inner_text() == "0.25 SOL"
    finally:
        page.context.close()

    assert allowance(classroom, classroom.student) == LAMPORTS_PER_SOL // 4
    kind, text = fetch_text(
        classroom.instructor_lab, f"/jupyter-io/cohorts/{classroom.cohort_id}/dashboard?format=csv"
    )
    assert kind.startswith("text/csv")
    assert [line.split(",")[0] for line in text.splitlines()[1:]] == [student]


def allowance(classroom: Classroom, student: Keypair) -> int:
    """What ``student``'s allowance in the class holds on the ledger (0: none)."""
    from jupyter_io.payments.cohort_pool import AllowanceTerms, CohortPoolClient

    info = json.loads(urllib.request.urlopen(f"{classroom.url}/api/v1/info").read())
    terms = AllowanceTerms(
        classroom.instructor.pubkey(),
        student.pubkey(),
        Pubkey.from_string(info["arbiter"]),
        classroom.cohort_id,
    )

    async def read() -> int:
        ledger = CohortPoolClient.connect(classroom.backend.solana_url)
        try:
            state = await ledger.allowance_state(terms)  # type: ignore[attr-defined]
        finally:
            await ledger.close()
        return 0 if state is None else int(state.amount)

    return run_async(read)


def rtx_free(classroom: Classroom) -> int:
    types = classroom.backend.offers()["types"]
    return next(t["available"] for t in types if t["gpu"] == "rtx4090")


def test_a_start_on_a_busy_class_gpu_queues_with_its_place_then_runs_paid_by_the_class(
    browser: Any, classroom: Classroom, screenshots: Path
) -> None:
    student = str(classroom.student.pubkey())
    if not classroom.student_lab.api("GET", "/jupyter-io/cohorts")["cohorts"]:
        as_user(classroom.url, classroom.student, "join", classroom.code)  # run alone
    # The instructor funds the student's allowance from Lab (the student holds no SOL).
    funded = classroom.instructor_lab.api(
        "POST",
        f"/jupyter-io/cohorts/{classroom.cohort_id}/topup",
        {"lamports": LAMPORTS_PER_SOL // 2, "student": student},
    )
    assert funded["students"] == [student]
    # The instructor's own kernel (their wallet) takes the only RTX 4090.
    busy = classroom.instructor_lab.api("POST", "/api/kernels", {"name": "jupyter-io-rtx-4090"})
    wait_for(lambda: rtx_free(classroom) == 0, "the instructor's kernel holds the RTX 4090")

    page = open_lab(browser, classroom.student_lab)
    try:
        page.locator(PICKER_TAB).click()
        row = page.locator(
            f'#jupyter-io-picker .jio-Cohort[data-cohort="{classroom.cohort_id}"] '
            '.jio-CohortGpu[data-gpu="rtx4090"]'
        )
        row.locator(".jio-CohortGpu-free", has_text="all busy").wait_for(timeout=20_000)
        row.locator(".jio-CohortGpu-notebook").click()
        queued = page.locator(".Toastify__toast", has_text="In the class's queue").first
        queued.wait_for(timeout=60_000)
        assert "place 1" in queued.inner_text()
        page.wait_for_timeout(400)  # the toast slides in
        page.screenshot(path=str(screenshots / "cohort-queue.png"))

        # The instructor's dashboard shows who waits.
        teacher = open_lab(browser, classroom.instructor_lab)
        teacher.locator(PICKER_TAB).click()
        teacher.locator(
            f'#jupyter-io-picker .jio-Cohort[data-cohort="{classroom.cohort_id}"] '
            ".jio-Cohort-dashboard"
        ).click()
        dashboard = teacher.locator(f"#jupyter-io-dashboard-{classroom.cohort_id}")
        waiting = dashboard.locator(f'.jio-Dashboard-queued-entry[data-student="{student}"]')
        waiting.wait_for(timeout=10_000)
        assert waiting.inner_text().startswith("1. ")
        row = dashboard.locator(f'.jio-Dashboard-row[data-student="{student}"]')
        assert row.locator(".jio-Dashboard-queued").inner_text() == "1 waiting"
        teacher.screenshot(path=str(screenshots / "cohort-dashboard-queue.png"))

        # The RTX 4090 comes free: the queue serves the student, paid by the class.
        classroom.instructor_lab.api("DELETE", f"/api/kernels/{busy['id']}")
        try:
            page.locator(".Toastify__toast", has_text="is ready").first.wait_for(timeout=60_000)
        except PlaywrightTimeout:
            progress = classroom.student_lab.api("GET", "/jupyter-io/progress")
            raise AssertionError(
                f"the queued start did not run: {progress}\n{classroom.backend.logs()}"
            ) from None
        sessions = classroom.student_lab.api("GET", "/jupyter-io/sessions")["sessions"]
        [session] = [s for s in sessions if s["state"] == "running"]
        assert session["cohort"] == classroom.cohort_id and session["gpu"] == "RTX 4090"
        # ... and the dashboard follows: a live kernel, nobody waiting.
        row.locator(".jio-Dashboard-live", has_text="1").wait_for(timeout=10_000)
        waiting.wait_for(state="detached", timeout=10_000)
    finally:
        page.context.close()
        if "teacher" in locals():
            teacher.context.close()
        for lab in (classroom.student_lab, classroom.instructor_lab):
            for kernel in lab.api("GET", "/api/kernels"):
                lab.api("DELETE", f"/api/kernels/{kernel['id']}")
        wait_for(lambda: rtx_free(classroom) == 1, "the RTX 4090 is free again")


def test_a_class_kernel_near_its_max_length_is_announced_in_a_notification(
    browser: Any, classroom: Classroom
) -> None:
    # A class whose sessions last at most a minute: the coordinator warns a minute before
    # the end, that is from the start. Its course environment (a requirement the provider's
    # Python has already: built offline in seconds) is built before its first kernel.
    cohort = as_user(
        classroom.url,
        classroom.instructor,
        "create",
        name="Short sessions",
        gpu_types=["a100"],
        max_price_lamports_per_hour=LAMPORTS_PER_SOL,
        max_session_seconds=60,
        term_ends_at=time.time() + 86400,
        requirements="ipykernel\n",
    )
    code = as_user(classroom.url, classroom.instructor, "create_code", cohort.id)
    as_user(classroom.url, classroom.student, "join", code.code)
    student = str(classroom.student.pubkey())
    classroom.instructor_lab.api(
        "POST",
        f"/jupyter-io/cohorts/{cohort.id}/topup",
        {"lamports": LAMPORTS_PER_SOL, "student": student},
    )
    page = open_lab(browser, classroom.student_lab)
    try:
        page.locator(PICKER_TAB).click()
        row = page.locator(
            f'#jupyter-io-picker .jio-Cohort[data-cohort="{cohort.id}"] '
            '.jio-CohortGpu[data-gpu="a100"]'
        )
        row.locator(".jio-CohortGpu-notebook").click()
        ready = page.locator(".Toastify__toast", has_text="is ready").first
        ready.wait_for(timeout=60_000)
        # The provider's build is a stage of the start (kernel_provisioner/progress.py).
        assert "launching ✓ · environment ✓ · ready ✓" in ready.inner_text()
        warning = page.locator(".Toastify__toast", has_text="A100 kernel:").first
        warning.wait_for(timeout=20_000)
        [session] = [
            s
            for s in classroom.student_lab.api("GET", "/jupyter-io/sessions")["sessions"]
            if s["cohort"] == cohort.id
        ]
        [notice] = [w for w in session["warnings"] if w["kind"] == "max_length"]
        assert notice["message"] in warning.inner_text()
    finally:
        page.context.close()
        for kernel in classroom.student_lab.api("GET", "/api/kernels"):
            classroom.student_lab.api("DELETE", f"/api/kernels/{kernel['id']}")
