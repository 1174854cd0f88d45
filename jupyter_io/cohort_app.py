"""``jupyter io cohort ...``: classroom cohorts from the command line, signed by your key.

Instructors: ``create``, ``list``, ``show``, ``code``, ``revoke-code``, ``roster`` (a file of
public keys), ``remove``, ``add-instructor``, ``set`` (quotas and limits), ``end``,
``dashboard [--csv]``, ``reserve`` / ``reservations`` / ``unreserve`` (GPUs kept for a
lab session), and the pool's money: ``fund`` (create or top up every student's
allowance to the cap) and ``reclaim`` (close allowances, everything unspent back; the
creator's key signs, ``docs/payments-contract.md`` section 6). Students: ``join CODE|LINK``
(a link names its coordinator), ``list``, ``show``. Each is a :class:`CohortCommand`
subclass in :data:`COHORT_SUBCOMMANDS`; the command parses options and delegates to
:class:`~jupyter_io.cohort_client.CohortClient` (and, for the pool,
:class:`~jupyter_io.payments.cohort_pool.CohortPoolClient`). To add one, subclass
:class:`CohortCommand` and add a line to :data:`COHORT_SUBCOMMANDS`. ``docs/cohorts.md``
describes what each does on the coordinator.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from jupyter_core.application import base_flags
from traitlets import Bool, Float, Integer, Unicode

from .app import IOCommand, _CommandGroup
from .cohort_client import CohortClient, ReservationView
from .cohorts import (
    CohortRequestError,
    CohortView,
    gpu_hours_to_seconds,
    gpu_seconds_to_hours,
    parse_join_target,
    parse_roster_csv,
)
from .errors import ConfigError
from .identity import DEFAULT_KEYPAIR_PATH, load_keypair
from .payments.amounts import format_sol, parse_sol

__all__ = [
    "COHORT_SUBCOMMANDS",
    "CohortApp",
    "CohortCommand",
    "cohort_text",
    "dashboard_text",
    "parse_utc_time",
    "reservation_text",
]

_T = TypeVar("_T")

#: The coordinator a command talks to unless ``--coordinator`` says otherwise.
DEFAULT_COORDINATOR = "http://127.0.0.1:8700"


def cohort_text(view: CohortView) -> str:
    """A cohort for people: its settings, and a student's own week."""
    term = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(view.term_ends_at))
    lines = [
        f"{view.name}  ({view.id}, {view.state}{', you: ' + view.role if view.role else ''})",
        f"  GPU types     {', '.join(view.gpu_types)} up to "
        f"{format_sol(view.max_price_lamports_per_hour)}/GPU-hour",
        f"  quota         {gpu_seconds_to_hours(view.quota_gpu_seconds_per_week):g} GPU-hours "
        f"a week per student, {view.max_concurrent_per_student} kernel(s) at a time",
        f"  sessions      idle stop after {view.idle_timeout_seconds // 60} min, at most "
        f"{view.max_session_seconds / 3600:g} h; queue waits at most "
        f"{view.queue_max_wait_seconds // 60} min",
        f"  term ends     {term}",
        f"  instructors   {', '.join(view.instructors)}",
        f"  students      {view.students}",
    ]
    if view.environment_sha256:
        lines.append(f"  environment   {view.environment_sha256[:16]}… (requirements)")
    if view.me is not None:
        me = view.me
        lines.append(
            f"  this week     {gpu_seconds_to_hours(me.gpu_seconds_week):.2f} GPU-h used, "
            f"{gpu_seconds_to_hours(me.quota_left_gpu_seconds):.2f} left, "
            f"{me.live_kernels} kernel(s) running"
        )
    return "\n".join(lines)


class CohortCommand(IOCommand):
    """Base of the cohort commands: the coordinator, your key, ``--json``; positional
    arguments checked against :attr:`usage`."""

    #: The positional arguments, e.g. ``"COHORT CODE"`` (checked by :meth:`arguments`).
    usage = ""

    coordinator = Unicode(DEFAULT_COORDINATOR, help="The coordinator's http(s)://HOST:PORT.").tag(
        config=True
    )
    keypair_path = Unicode(DEFAULT_KEYPAIR_PATH, help="Your Solana keypair file.").tag(config=True)
    timeout = Float(30.0, help="Seconds to wait for the coordinator.").tag(config=True)
    json_output = Bool(False, help="Print JSON for scripts.").tag(config=True)

    aliases: dict[str, Any] = {
        "coordinator": "CohortCommand.coordinator",
        "keypair": "CohortCommand.keypair_path",
        "timeout": "CohortCommand.timeout",
    }
    flags: dict[str, Any] = {
        "json": ({"CohortCommand": {"json_output": True}}, "Print JSON for scripts."),
        "debug": base_flags["debug"],
    }

    def arguments(self) -> list[str]:
        """The positional arguments, as many as :attr:`usage` names."""
        names = self.usage.split()
        if len(self.extra_args) != len(names):
            raise ConfigError(f"usage: {self.name} {self.usage}".rstrip())
        return list(self.extra_args)

    def client(self, url: str | None = None) -> CohortClient:
        """A client of ``url`` (default ``--coordinator``) signing with ``--keypair``."""
        return CohortClient(
            url or self.coordinator, load_keypair(self.keypair_path), timeout=self.timeout
        )

    def talk(self, work: Callable[[CohortClient], Awaitable[_T]], url: str | None = None) -> _T:
        """Run ``work(client)`` and close the client."""

        async def run() -> _T:
            client = self.client(url)
            try:
                return await work(client)
            finally:
                client.close()

        return asyncio.run(run())

    def show(self, body: Any, text: str) -> None:
        """Print ``body`` as JSON with ``--json``, else ``text``."""
        print(json.dumps(body, indent=2) if self.json_output else text)


class CohortSettingsCommand(CohortCommand):
    """The options of ``create`` and ``set`` (in people's units)."""

    gpu_types = Unicode("", help="GPU types the cohort pays for, comma-separated.").tag(config=True)
    max_price = Unicode("", help="The most it pays per GPU-hour, in SOL (e.g. 0.5).").tag(
        config=True
    )
    quota_hours = Unicode("", help="GPU-hours a week per student (e.g. 10).").tag(config=True)
    max_kernels = Integer(0, help="Kernels a student may run at once.").tag(config=True)
    idle_minutes = Float(0.0, help="Stop a kernel idle this many minutes.").tag(config=True)
    max_session_hours = Float(0.0, help="End a session after this many hours.").tag(config=True)
    queue_minutes = Float(0.0, help="Refuse a queued start after this many minutes.").tag(
        config=True
    )
    term_days = Float(0.0, help="The term ends this many days from now.").tag(config=True)
    requirements = Unicode("", help="A requirements file: the course environment.").tag(config=True)

    aliases = {
        **CohortCommand.aliases,
        "gpu-types": "CohortSettingsCommand.gpu_types",
        "max-price": "CohortSettingsCommand.max_price",
        "quota-hours": "CohortSettingsCommand.quota_hours",
        "max-kernels": "CohortSettingsCommand.max_kernels",
        "idle-minutes": "CohortSettingsCommand.idle_minutes",
        "max-session-hours": "CohortSettingsCommand.max_session_hours",
        "queue-minutes": "CohortSettingsCommand.queue_minutes",
        "term-days": "CohortSettingsCommand.term_days",
        "requirements": "CohortSettingsCommand.requirements",
    }

    def fields(self) -> dict[str, Any]:
        """The settings given on the command line, as the API names them."""
        body: dict[str, Any] = {}
        if self.gpu_types:
            body["gpu_types"] = [t.strip() for t in self.gpu_types.split(",") if t.strip()]
        if self.max_price:
            body["max_price_lamports_per_hour"] = parse_sol(self.max_price)
        if self.quota_hours:
            try:
                body["quota_gpu_seconds_per_week"] = gpu_hours_to_seconds(self.quota_hours)
            except ValueError as exc:
                raise ConfigError(f"--quota-hours: {exc}") from None
        if self.max_kernels:
            body["max_concurrent_per_student"] = self.max_kernels
        if self.idle_minutes:
            body["idle_timeout_seconds"] = round(self.idle_minutes * 60)
        if self.max_session_hours:
            body["max_session_seconds"] = round(self.max_session_hours * 3600)
        if self.queue_minutes:
            body["queue_max_wait_seconds"] = round(self.queue_minutes * 60)
        if self.term_days:
            body["term_ends_at"] = time.time() + self.term_days * 86400
        if self.requirements:
            try:
                body["requirements"] = Path(self.requirements).read_text()
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(
                    f"cannot read --requirements {self.requirements}: {exc}"
                ) from None
        return body


class CohortCreateApp(CohortSettingsCommand):
    name = "jupyter io cohort create"
    description = "Create a cohort you teach; prints its id (then `code` for a join code)."
    usage = "NAME"
    examples = (
        "jupyter io cohort create CS229 --gpu-types T4 --max-price 0.3 --quota-hours 10 "
        "--term-days 90"
    )

    def run(self) -> None:
        (name,) = self.arguments()
        body = {"name": name, **self.fields()}
        body.setdefault("term_ends_at", time.time() + 120 * 86400)
        for required, flag in (
            ("gpu_types", "--gpu-types"),
            ("max_price_lamports_per_hour", "--max-price"),
        ):
            if required not in body:
                raise ConfigError(f"create needs {flag} (see --help)")
        view = self.talk(lambda c: c.create(**body))
        self.show(view.to_json(), cohort_text(view))


class CohortSetApp(CohortSettingsCommand):
    name = "jupyter io cohort set"
    description = "Change a cohort's quota, limits, GPU types, price cap or term (instructors)."
    usage = "COHORT"
    examples = "jupyter io cohort set c_Ab12... --quota-hours 15 --max-kernels 2"

    def run(self) -> None:
        (cohort,) = self.arguments()
        changes = self.fields()
        if not changes:
            raise ConfigError("name at least one setting to change (see --help)")
        view = self.talk(lambda c: c.update(cohort, **changes))
        self.show(view.to_json(), cohort_text(view))


class CohortListApp(CohortCommand):
    name = "jupyter io cohort list"
    description = "The cohorts you teach or study in, newest first."

    def run(self) -> None:
        self.arguments()
        views = self.talk(lambda c: c.cohorts())
        text = (
            "\n".join(f"{v.id}  {v.role or '':<13} {v.state:<6} {v.name}" for v in views)
            or "No cohorts yet: `jupyter io cohort create NAME ...` or `join CODE`."
        )
        self.show([v.to_json() for v in views], text)


class CohortShowApp(CohortCommand):
    name = "jupyter io cohort show"
    description = "A cohort's settings (a student's: their week too)."
    usage = "COHORT"

    def run(self) -> None:
        (cohort,) = self.arguments()
        view = self.talk(lambda c: c.get(cohort))
        self.show(view.to_json(), cohort_text(view))


class CohortCodeApp(CohortCommand):
    name = "jupyter io cohort code"
    description = "A join code and link for students (instructors)."
    usage = "COHORT"
    ttl_days = Float(7.0, help="Days the code stays valid.").tag(config=True)
    max_uses = Integer(0, help="How many students may use it (0: no limit).").tag(config=True)
    aliases = {
        **CohortCommand.aliases,
        "ttl-days": "CohortCodeApp.ttl_days",
        "max-uses": "CohortCodeApp.max_uses",
    }

    def run(self) -> None:
        (cohort,) = self.arguments()
        ttl = round(self.ttl_days * 86400)
        code = self.talk(
            lambda c: c.create_code(cohort, ttl_seconds=ttl, max_uses=self.max_uses or None)
        )
        until = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(code.expires_at))
        self.show(
            {"code": code.code, "link": code.link, "expires_at": code.expires_at},
            f"code {code.code} (valid until {until})\nlink {code.link}",
        )


class CohortRevokeCodeApp(CohortCommand):
    name = "jupyter io cohort revoke-code"
    description = "Revoke a join code (instructors)."
    usage = "COHORT CODE"

    def run(self) -> None:
        cohort, code = self.arguments()
        self.talk(lambda c: c.revoke_code(cohort, code))
        self.show({"code": code, "revoked": True}, f"code {code} revoked")


class CohortJoinApp(CohortCommand):
    name = "jupyter io cohort join"
    description = "Join a cohort as a student with the code or link your instructor gave you."
    usage = "CODE_OR_LINK"

    def run(self) -> None:
        (text,) = self.arguments()
        try:
            target = parse_join_target(text)
        except CohortRequestError as exc:
            raise ConfigError(str(exc)) from None
        view = self.talk(lambda c: c.join(target.code), target.coordinator)
        self.show(view.to_json(), f"joined\n{cohort_text(view)}")


class CohortRosterApp(CohortCommand):
    name = "jupyter io cohort roster"
    description = (
        "Add students from a file of public keys: one per line, or a CSV with a 'pubkey' "
        "column (instructors)."
    )
    usage = "COHORT FILE"

    def run(self) -> int | None:
        cohort, path = self.arguments()
        try:
            keys, bad = parse_roster_csv(Path(path).read_text())
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the roster {path}: {exc}") from None
        if not keys:
            raise ConfigError(
                f"{path} holds no public keys" + (f" ({len(bad)} bad)" if bad else "")
            )
        result = self.talk(lambda c: c.add_students(cohort, keys))
        invalid = [*bad, *result.invalid]
        text = f"added {len(result.added)}, already members {len(result.already)}"
        if invalid:
            text += f"\nnot public keys ({len(invalid)}): " + ", ".join(repr(b) for b in invalid)
        self.show(
            {"added": list(result.added), "already": list(result.already), "invalid": invalid},
            text,
        )
        return 1 if invalid else None


class CohortRemoveApp(CohortCommand):
    name = "jupyter io cohort remove"
    description = "Remove a student; their running sessions end (instructors)."
    usage = "COHORT PUBKEY"

    def run(self) -> None:
        cohort, student = self.arguments()
        ended = self.talk(lambda c: c.remove_student(cohort, student))
        self.show(
            {"student": student, "removed": True, "leases_ended": ended},
            f"removed {student} ({ended} session(s) ended)",
        )


class CohortAddInstructorApp(CohortCommand):
    name = "jupyter io cohort add-instructor"
    description = "Make a key a co-instructor (instructors)."
    usage = "COHORT PUBKEY"

    def run(self) -> None:
        cohort, pubkey = self.arguments()
        view = self.talk(lambda c: c.add_instructor(cohort, pubkey))
        self.show(view.to_json(), cohort_text(view))


class CohortEndApp(CohortCommand):
    name = "jupyter io cohort end"
    description = "End the term: codes revoked, running sessions ended (instructors)."
    usage = "COHORT"

    def run(self) -> None:
        (cohort,) = self.arguments()
        view = self.talk(lambda c: c.end(cohort))
        self.show(view.to_json(), cohort_text(view))


class CohortDashboardApp(CohortCommand):
    name = "jupyter io cohort dashboard"
    description = "A row per student: this week's GPU-hours, cost, kernels, queue (instructors)."
    usage = "COHORT"
    csv = Bool(False, help="Print CSV, one row per student.").tag(config=True)
    flags = {
        **CohortCommand.flags,
        "csv": ({"CohortDashboardApp": {"csv": True}}, "Print CSV, one row per student."),
    }

    def run(self) -> None:
        (cohort,) = self.arguments()
        if self.csv:
            sys.stdout.write(self.talk(lambda c: c.dashboard_csv(cohort)))
            return
        board = self.talk(lambda c: c.dashboard(cohort))
        self.show(board, dashboard_text(board, time.time()))


def _allowance_text(allowance: Mapping[str, Any] | None) -> str:
    """A row's allowance: what the student's sessions can still draw, as read on-chain."""
    if allowance is None:
        return "-"
    if not allowance.get("as_agreed", True):
        return "not as agreed"
    return format_sol(int(allowance.get("spendable_lamports") or 0))


def _run_out_text(pool: Mapping[str, Any], now: float) -> str:
    if pool.get("allowance_lamports") is None:
        return "not reported"
    when = pool.get("projected_run_out")
    if when is None:
        return "no spending this week to project from"
    if float(when) <= now:
        return "now (nothing left to spend)"
    return _utc(float(when))


def dashboard_text(board: Mapping[str, Any], now: float) -> str:
    """``jupyter io cohort dashboard`` as text: a row per student (this week's GPU-hours,
    cost, kernels, quota left, allowance left on-chain), then the pool: what is left to
    spend, what the allowances hold, the term's spend and the projected run-out."""
    rows = board.get("students") or []
    lines = [
        f"{'student':<45} {'GPU-h':>7} {'cost SOL':>14} {'kernels':>7} {'left':>7} "
        f"{'allowance':>16}"
    ]
    for row in rows:
        lines.append(
            f"{row['student']:<45} {row['gpu_seconds_week'] / 3600:>7.2f} "
            f"{format_sol(row['cost_lamports_week']):>14} {row['live_kernels']:>7} "
            f"{row['quota_left_gpu_seconds'] / 3600:>7.2f} "
            f"{_allowance_text(row.get('allowance')):>16}"
        )
    pool = board.get("pool") or {}
    left = pool.get("allowance_lamports")
    if left is None:
        reason = pool.get("reason") or "the coordinator did not read the allowances"
        lines.append(f"pool left: not reported ({reason})")
    else:
        held = int(pool.get("held_lamports") or 0)
        funded = int(pool.get("students_funded") or 0)
        lines.append(
            f"pool left: {format_sol(int(left))} spendable, {format_sol(held)} held in "
            f"{funded} allowance(s)"
        )
        if pool.get("not_as_agreed"):
            lines.append(f"allowances not as agreed: {pool['not_as_agreed']}")
    lines.append(f"projected run-out: {_run_out_text(pool, now)}")
    lines.append(f"spent this term: {format_sol(pool.get('spent_lamports_term') or 0)}")
    return "\n".join(lines)


def parse_utc_time(flag: str, text: str) -> float:
    """``text``, an ISO 8601 time (``2026-12-07T14:00``, ``2026-12-07 14:00Z``,
    ``2026-12-07T15:00+01:00``; without an offset it is UTC, like every time the coordinator
    shows), as Unix seconds; :class:`ConfigError` naming ``flag`` otherwise."""
    value = text.strip()
    if value[-1:] in ("Z", "z"):
        value = value[:-1] + "+00:00"
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ConfigError(
            f"{flag} {text!r} is not a time: write it in ISO 8601, e.g. 2026-12-07T14:00 "
            f"(UTC) or 2026-12-07T15:00+01:00"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def _utc(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


def reservation_text(r: ReservationView, now: float) -> str:
    """One reservation for people: id, GPUs, window in UTC and whether it is open."""
    state = "open now" if r.starts_at <= now < r.ends_at else "over" if r.ends_at <= now else ""
    window = f"{_utc(r.starts_at)} to {_utc(r.ends_at)}"
    return f"{r.id}  {r.count} x {r.gpu}  {window}  {state}".rstrip()


class CohortReserveApp(CohortCommand):
    name = "jupyter io cohort reserve"
    description = (
        "Keep GPUs of one type for the class's lab session: other users cannot take the "
        "free ones during the window (instructors)."
    )
    usage = "COHORT"
    examples = (
        "jupyter io cohort reserve c_Ab12... --gpu T4 --count 30 --start 2026-12-07T14:00 "
        "--end 2026-12-07T16:00"
    )
    gpu = Unicode("", help="The GPU type to keep (one the class pays for), e.g. T4.").tag(
        config=True
    )
    count = Integer(0, help="How many GPUs (1 to 1,000).").tag(config=True)
    window_start = Unicode("", help="When the window opens, ISO 8601 (UTC without an offset).").tag(
        config=True
    )
    window_end = Unicode("", help="When it closes (at most 24 h after --start).").tag(config=True)
    aliases = {
        **CohortCommand.aliases,
        "gpu": "CohortReserveApp.gpu",
        "count": "CohortReserveApp.count",
        "start": "CohortReserveApp.window_start",
        "end": "CohortReserveApp.window_end",
    }

    def run(self) -> None:
        (cohort,) = self.arguments()
        for value, flag in (
            (self.gpu, "--gpu"),
            (self.window_start, "--start"),
            (self.window_end, "--end"),
        ):
            if not value.strip():
                raise ConfigError(f"reserve needs {flag} (see --help)")
        if self.count < 1:
            raise ConfigError("reserve needs --count, a whole number of GPUs from 1")
        starts = parse_utc_time("--start", self.window_start)
        ends = parse_utc_time("--end", self.window_end)
        if ends <= starts:
            raise ConfigError(f"--end ({_utc(ends)}) must be after --start ({_utc(starts)})")
        made = self.talk(
            lambda c: c.reserve(
                cohort, gpu=self.gpu.strip(), count=self.count, starts_at=starts, ends_at=ends
            )
        )
        self.show(made.to_json(), f"reserved {reservation_text(made, time.time())}")


class CohortReservationsApp(CohortCommand):
    name = "jupyter io cohort reservations"
    description = "The class's reservations, by start (instructors)."
    usage = "COHORT"

    def run(self) -> None:
        (cohort,) = self.arguments()
        found = self.talk(lambda c: c.reservations(cohort))
        now = time.time()
        text = "\n".join(reservation_text(r, now) for r in found) or (
            f"no reservations: `jupyter io cohort reserve {cohort} --gpu T4 --count 30 "
            f"--start ... --end ...`"
        )
        self.show([r.to_json() for r in found], text)


class CohortUnreserveApp(CohortCommand):
    name = "jupyter io cohort unreserve"
    description = "Delete a reservation; its GPUs are free for anyone at once (instructors)."
    usage = "COHORT RESERVATION"

    def run(self) -> None:
        cohort, rid = self.arguments()
        self.talk(lambda c: c.unreserve(cohort, rid))
        self.show({"id": rid, "deleted": True}, f"reservation {rid} deleted")


class _PoolCommand(CohortCommand):
    """``fund`` and ``reclaim``: transactions on the cohort's ledger that only your key (the
    cohort's creator: the allowances are yours) signs (``docs/payments-contract.md`` 6)."""

    async def _allowances(
        self, client: CohortClient, cohort: str, students: list[str] | None
    ) -> tuple[Any, list[Any], Any, Any]:
        """The ledger client, the allowance terms of ``students`` (every current student's
        with None), the cohort's dashboard and your keypair."""
        from solders.pubkey import Pubkey

        from .payments.cohort_pool import AllowanceTerms, CohortPoolClient

        board = await client.dashboard(cohort)  # 403 unless you teach it
        keypair = load_keypair(self.keypair_path)
        me = keypair.pubkey()
        if (board.get("cohort") or {}).get("instructor") != str(me):
            raise ConfigError(
                f"only the creator of cohort {cohort} funds or reclaims its allowances (they "
                f"are the creator's); {me} is not"
            )
        payments = await client.payments()
        if payments.payments != "escrow" or not payments.arbiter or not payments.solana_url:
            raise ConfigError(f"the coordinator at {self.coordinator} runs free leases: no pool")
        keys = students or [row["student"] for row in board.get("students") or []]
        arbiter = Pubkey.from_string(payments.arbiter)
        try:
            terms = [AllowanceTerms(me, Pubkey.from_string(k), arbiter, cohort) for k in keys]
        except ValueError as exc:
            raise ConfigError(f"not a student's public key: {exc}") from None
        return CohortPoolClient.connect(payments.solana_url), terms, board, keypair


class CohortFundApp(_PoolCommand):
    name = "jupyter io cohort fund"
    description = (
        "Create or top up every current student's allowance to the cap, delegated to the "
        "student + the coordinator (the cohort's creator; your wallet pays)."
    )
    usage = "COHORT"
    cap = Unicode("", help="SOL per student (default: the cohort's student cap).").tag(config=True)
    aliases = {**CohortCommand.aliases, "cap": "CohortFundApp.cap"}

    def run(self) -> None:
        (cohort,) = self.arguments()

        async def fund(client: CohortClient) -> list[dict[str, Any]]:
            ledger, terms, board, keypair = await self._allowances(client, cohort, None)
            cap = (
                parse_sol(self.cap)
                if self.cap
                else (board.get("cohort") or {}).get("student_cap_lamports")
            )
            if not cap:
                raise ConfigError(
                    f"cohort {cohort} has no student cap: pass --cap SOL (what each "
                    f"student's allowance holds and may spend)"
                )
            try:
                grants = await ledger.plan_grants([(t, int(cap)) for t in terms])
                receipts = await ledger.fund(keypair, grants)
            finally:
                await ledger.close()
            sent = {g.terms.student: (g, r) for r in receipts for g in r.grants}
            rows = []
            for t in terms:
                grant, receipt = sent.get(t.student, (None, None))
                rows.append(
                    {
                        "student": str(t.student),
                        "allowance": str(t.allowance),
                        "cap_lamports": int(cap),
                        "added_lamports": 0 if grant is None else grant.lamports,
                        "created": grant is not None and grant.allowance_rent is not None,
                        "signature": None if receipt is None else str(receipt.signature),
                    }
                )
            return rows

        rows = self.talk(fund)
        lines = []
        for row in rows:
            what = (
                "created" if row["created"] else
                "topped up" if row["added_lamports"] else "already at the cap"
            )  # fmt: skip
            lines.append(
                f"{row['student']}  {what}: +{format_sol(row['added_lamports'])}, "
                f"{format_sol(row['cap_lamports'])} delegated  (allowance {row['allowance']})"
            )
        self.show({"cohort": cohort, "students": rows}, "\n".join(lines) or "no students")


class CohortReclaimApp(_PoolCommand):
    name = "jupyter io cohort reclaim"
    description = (
        "Revoke and close allowances: everything unspent comes back to your wallet (all "
        "current students', or --student KEY's; live sessions finish, their rest comes to you)."
    )
    usage = "COHORT"
    student = Unicode("", help="Only this student's allowance (also a removed student's).").tag(
        config=True
    )
    aliases = {**CohortCommand.aliases, "student": "CohortReclaimApp.student"}

    def run(self) -> None:
        (cohort,) = self.arguments()

        async def reclaim(client: CohortClient) -> list[dict[str, Any]]:
            only = [self.student] if self.student else None
            ledger, terms, _, keypair = await self._allowances(client, cohort, only)
            try:
                receipts = await ledger.reclaim(keypair, terms)
            finally:
                await ledger.close()
            return [
                {
                    "students": [str(t.student) for t in r.closed],
                    "returned_lamports": r.returned,
                    "fee_lamports": r.fee,
                    "signature": str(r.signature),
                }
                for r in receipts
            ]

        done = self.talk(reclaim)
        returned = sum(r["returned_lamports"] for r in done)
        closed = sum(len(r["students"]) for r in done)
        self.show(
            {"cohort": cohort, "transactions": done},
            f"closed {closed} allowance(s): {format_sol(returned)} back to your wallet",
        )


#: ``jupyter io cohort NAME``: (the command class, one line of help).
COHORT_SUBCOMMANDS: dict[str, tuple[type[CohortCommand], str]] = {
    "create": (CohortCreateApp, CohortCreateApp.description),
    "list": (CohortListApp, CohortListApp.description),
    "show": (CohortShowApp, CohortShowApp.description),
    "code": (CohortCodeApp, CohortCodeApp.description),
    "revoke-code": (CohortRevokeCodeApp, CohortRevokeCodeApp.description),
    "join": (CohortJoinApp, CohortJoinApp.description),
    "roster": (CohortRosterApp, CohortRosterApp.description),
    "remove": (CohortRemoveApp, CohortRemoveApp.description),
    "add-instructor": (CohortAddInstructorApp, CohortAddInstructorApp.description),
    "set": (CohortSetApp, CohortSetApp.description),
    "end": (CohortEndApp, CohortEndApp.description),
    "dashboard": (CohortDashboardApp, CohortDashboardApp.description),
    "reserve": (CohortReserveApp, CohortReserveApp.description),
    "reservations": (CohortReservationsApp, CohortReservationsApp.description),
    "unreserve": (CohortUnreserveApp, CohortUnreserveApp.description),
    "fund": (CohortFundApp, CohortFundApp.description),
    "reclaim": (CohortReclaimApp, CohortReclaimApp.description),
}


class CohortApp(_CommandGroup):
    """``jupyter io cohort``"""

    name = "jupyter io cohort"
    description = (
        "Classroom cohorts: an instructor's pool of GPU time with weekly quotas per student. "
        "Run `jupyter io cohort COMMAND --help` for a command's options."
    )
    examples = """jupyter io cohort create CS229 --gpu-types T4 --max-price 0.3 --quota-hours 10
jupyter io cohort code c_Ab12... --ttl-days 7
jupyter io cohort join 'jupyter-io:join?coordinator=...&code=...'
jupyter io cohort roster c_Ab12... students.csv
jupyter io cohort dashboard c_Ab12... --csv > week.csv
jupyter io cohort reserve c_Ab12... --gpu T4 --count 30 --start 2026-12-07T14:00 \
    --end 2026-12-07T16:00"""
    subcommands = dict(COHORT_SUBCOMMANDS)
