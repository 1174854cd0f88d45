"""``jupyter io demo --cohort``: a class on the demo's coordinator, so a newcomer sees both sides.

:class:`CohortDemo` is the :class:`~jupyter_io.demo.Demo` with two more kinds of service
(configure them with ``c.CohortDemo.*``):

- :class:`CohortDemoService`, once the coordinator and the provider are up: the demo user
  (``user-keypair.json``, the key the demo's JupyterLab leases with) becomes the instructor
  of a cohort "Demo class" paying for every GPU type on offer, up to the demo's price. A few
  simulated students get keys of their own (``students/student-N.json`` in the data dir),
  join with a fresh join code and, when the coordinator is paid through escrows, get an
  allowance each, funded from the instructor's wallet (:mod:`jupyter_io.payments.cohort_pool`),
  so their kernels are paid by the class. A restarted demo finds its cohort again
  (``cohort.json``) and tops up only what was spent.
- :class:`StudentLabService`: a JupyterLab of a student's own, whose GPU picker leases with
  the student's key, so the class's section, the quota and the queue are seen from the
  student's side while the demo's main Lab shows the instructor's dashboard.
  ``CohortDemo.student_labs`` of them (1 by default: each is a Jupyter Server process); the
  ready message prints their URLs and how the other students join from a terminal.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, cast

from traitlets import Float, Int, Unicode

from .data_lock import DataDirLock
from .demo import CoordinatorService, Demo, LabService, ProviderService, Service
from .errors import JupyterIOError
from .identity import load_keypair, load_or_create_keypair
from .payments.amounts import format_sol, parse_sol

__all__ = ["COHORT_NAME", "CohortDemo", "CohortDemoService", "StudentLabService"]

#: The demo cohort's name.
COHORT_NAME = "Demo class"
#: The demo term: 90 days from the first start.
TERM_SECONDS = 90 * 24 * 3600
#: What the coordinator's arbiter key holds on the demo's ledger to front class sessions' rents.
ARBITER_LAMPORTS = 1_000_000_000
#: How long the demo waits for a student Lab to say where it serves.
LAB_URL_TIMEOUT = 90.0


class CohortDemoService(Service):
    """Creates (or finds) the demo cohort, its students, their join and their allowances.

    ``coordinator`` is the demo's :class:`~jupyter_io.demo.CoordinatorService` (its ``url``
    is known once it started).
    """

    name = "cohort"

    def __init__(
        self,
        coordinator: CoordinatorService,
        *,
        data_dir: Path,
        instructor_keypair_path: Path,
        students: int,
        quota_hours: float,
        price_cap_lamports: int,
        allowance_lamports: int,
        log: Any,
    ) -> None:
        self.coordinator = coordinator
        self.data_dir = data_dir
        self.instructor_keypair_path = instructor_keypair_path
        self.students = students
        self.quota_hours = quota_hours
        self.price_cap_lamports = price_cap_lamports
        self.allowance_lamports = allowance_lamports
        self.log = log
        self.cohort: dict[str, Any] = {}
        self.code = ""
        self.link = ""
        #: ``students/student-N.json`` paths, in order.
        self.student_keys: list[Path] = []
        self.funding = ""

    @property
    def state_path(self) -> Path:
        return self.data_dir / "cohort.json"

    def student_key(self, index: int) -> Path:
        return self.data_dir / "students" / f"student-{index}.json"

    async def start(self) -> None:
        from .cohort_client import CohortClient
        from .coordinator_client import CoordinatorClient

        url = self.coordinator.url
        instructor = load_keypair(self.instructor_keypair_path)
        async with CoordinatorClient(url, timeout=10) as plain:
            types = [str(t["gpu"]) for t in (await plain.offers())["types"]]
            payments = await plain.payments()
        if not types:
            raise JupyterIOError(f"the coordinator at {url} has nothing on offer for a class")
        teacher = CohortClient(url, instructor, timeout=10)
        try:
            self.cohort = await self._find_or_create(teacher, types)
            code = await teacher.create_code(str(self.cohort["id"]))
            self.code, self.link = code.code, code.link
        finally:
            teacher.close()
        (self.data_dir / "students").mkdir(exist_ok=True, mode=0o700)
        for index in range(1, self.students + 1):
            path = self.student_key(index)
            keypair = load_or_create_keypair(path)
            self.student_keys.append(path)
            student = CohortClient(url, keypair, timeout=10)
            try:
                await student.join(self.code)
            finally:
                student.close()
        if payments.payments == "escrow" and payments.solana_url and payments.arbiter:
            await self._fund(instructor, payments.solana_url, payments.arbiter)
        else:
            self.funding = "free coordinator: the class's kernels cost nothing"

    async def _find_or_create(self, teacher: Any, types: list[str]) -> dict[str, Any]:
        """The cohort of an earlier run of this demo, if it is still active; else a new one."""
        try:
            known = json.loads(self.state_path.read_text())["id"]
        except (OSError, ValueError, KeyError, TypeError):
            known = None
        if known:
            for view in await teacher.cohorts():
                if view.id == known and view.state == "active":
                    return dict(view.to_json())
        view = await teacher.create(
            name=COHORT_NAME,
            gpu_types=types,
            max_price_lamports_per_hour=self.price_cap_lamports,
            quota_gpu_seconds_per_week=round(self.quota_hours * 3600),
            term_ends_at=time.time() + TERM_SECONDS,
        )
        self.state_path.write_text(json.dumps({"id": view.id}))
        return dict(view.to_json())

    async def _fund(self, instructor: Any, solana_url: str, arbiter_key: str) -> None:
        """Bring each student's allowance up to ``allowance_lamports`` (a restarted demo
        tops up only what was spent)."""
        from solders.pubkey import Pubkey

        from .payments.cohort_pool import AllowanceTerms, CohortPoolClient

        arbiter = Pubkey.from_string(arbiter_key)
        ledger = cast(CohortPoolClient, CohortPoolClient.connect(solana_url))
        try:
            # The coordinator's arbiter fronts each class session's rents and fee (all of it
            # comes back): on the demo's ledger, the demo funds it as it funds the provider.
            held = await ledger.balance(arbiter)
            if held < ARBITER_LAMPORTS:
                await ledger.airdrop(arbiter, ARBITER_LAMPORTS - held)
            targets = [
                (
                    AllowanceTerms(
                        instructor.pubkey(),
                        load_keypair(path).pubkey(),
                        arbiter,
                        str(self.cohort["id"]),
                    ),
                    self.allowance_lamports,
                )
                for path in self.student_keys
            ]
            grants = await ledger.plan_grants(targets)
            receipts = await ledger.fund(instructor, grants)
        finally:
            await ledger.close()
        moved = sum(g.outlay for g in grants)
        self.funding = (
            f"each student's allowance holds {format_sol(self.allowance_lamports)} from the "
            f"instructor's wallet ({format_sol(moved)} moved now in {len(receipts)} "
            f"transaction(s))"
        )

    def describe(self) -> list[str]:
        if not self.cohort:
            return []
        lines = [
            f"  class:       {self.cohort.get('name')} ({self.cohort.get('id')}), taught by the "
            f"demo user; {self.quota_hours:g} GPU-h a week per student",
            f"  join code:   {self.code}   link: {self.link}",
            f"  pool:        {self.funding}",
        ]
        for index, path in enumerate(self.student_keys, 1):
            lines.append(f"  student {index}:   key {path}")
        lines.append(
            f"  A student joins from a terminal with `jupyter io cohort join '{self.link}' "
            f"--keypair KEY`, or in Lab: GPU picker → Join a class. The instructor's dashboard: "
            f"GPU picker → Classes → Open dashboard, or `jupyter io cohort dashboard "
            f"{self.cohort.get('id')} --coordinator {self.coordinator.url} --keypair "
            f"{self.instructor_keypair_path}`."
        )
        return lines


def student_lab_argv(data_dir: Path, index: int) -> list[str]:
    """JupyterLab for student ``index``: loopback, any free port, no browser, its own
    workspaces and picker preferences (so it does not open the instructor's layout)."""
    home = data_dir / "students" / f"student-{index}-lab"
    argv = [
        sys.executable, "-m", "jupyterlab", "--no-browser",
        "--ServerApp.ip=127.0.0.1", "--ServerApp.port=0",
        f"--LabApp.workspaces_dir={home / 'workspaces'}",
        f"--JupyterIOExtension.preferences_path={home / 'preferences.json'}",
    ]  # fmt: skip
    if os.name == "posix" and os.geteuid() == 0:
        argv.append("--allow-root")
    return argv


class StudentLabService(LabService):
    """A student's JupyterLab (see the module docstring); :meth:`start` returns once it
    says where it serves, so the ready message prints its URL."""

    def __init__(self, argv: list[str], *, index: int, **kwargs: Any) -> None:
        self._seen = asyncio.Event()
        super().__init__(argv, on_url=lambda _url: self._seen.set(), **kwargs)
        self.name = f"jupyterlab (student {index})"

    async def start(self) -> None:
        await super().start()
        try:
            await asyncio.wait_for(self._seen.wait(), LAB_URL_TIMEOUT)
        except asyncio.TimeoutError:
            raise JupyterIOError(
                f"{self.name} did not say where it serves within {LAB_URL_TIMEOUT:g} s"
            ) from None

    def describe(self) -> list[str]:
        return [f"  {self.name}: {self.url}"]


class CohortDemo(Demo):
    """``jupyter io demo --cohort``: the demo, plus a class taught by the demo user with
    :attr:`students` simulated students (see the module docstring)."""

    students = Int(
        3, help="Simulated students in the demo class (each with a key of its own)."
    ).tag(config=True)
    student_labs = Int(
        1,
        help="Students who get a JupyterLab of their own (a Jupyter Server each, its URL "
        "printed); the others join from a terminal. 0: none. Not with --no-lab.",
    ).tag(config=True)
    quota_hours = Float(10.0, help="GPU-hours a week per student.").tag(config=True)
    allowance_sol = Unicode(
        "0.5",
        help="SOL each student's allowance holds, from the demo user's wallet (escrow "
        "payments only).",
    ).tag(config=True)

    def services(self, lock: DataDirLock | None = None) -> list[Service]:
        services = super().services(lock)
        coordinator = next(s for s in services if isinstance(s, CoordinatorService))
        data = Path(self.data_dir).expanduser().absolute()
        cohort = CohortDemoService(
            coordinator,
            data_dir=data,
            instructor_keypair_path=data / "user-keypair.json",
            students=self.students,
            quota_hours=self.quota_hours,
            price_cap_lamports=parse_sol(self.price),
            allowance_lamports=parse_sol(self.allowance_sol),
            log=self.log,
        )
        # After the provider (the class pays for what it offers), before the Labs.
        at = next(i for i, s in enumerate(services) if isinstance(s, ProviderService)) + 1
        services.insert(at, cohort)
        if self.lab:
            for index in range(1, min(self.student_labs, self.students) + 1):
                services.append(
                    StudentLabService(
                        student_lab_argv(data, index),
                        index=index,
                        coordinator=coordinator,
                        keypair_path=cohort.student_key(index),
                        stop_timeout=self.stop_timeout,
                        log=self.log,
                    )
                )
        return services
