"""The cohort contract: what the coordinator and its clients agree on about classroom cohorts.

Sans-I/O and stdlib only, imported by both sides (the coordinator's
:mod:`~jupyter_io.coordinator.cohorts` and :mod:`~jupyter_io.coordinator.cohort_handlers`,
the client :mod:`jupyter_io.cohort_client`, the CLI and Lab's server extension); neither
imports the other for it. ``docs/cohorts.md`` is the prose version.

* Requests: :func:`parse_create`, :func:`parse_patch`, :func:`parse_code_request`,
  :func:`parse_join`, :func:`parse_roster`, :func:`parse_pubkey_body` turn a request body into
  checked values or raise :class:`CohortRequestError`, whose message names the field.
* Shapes: :class:`CohortSettings` (what an instructor sets), :class:`CohortView` (the cohort
  as ``GET /api/v1/cohorts/{id}`` shows it), :class:`StudentUsage` (one dashboard row, a
  student's ``"me"``), :func:`dashboard_csv`.
* Join codes and links: :func:`new_join_code`, :func:`normalise_code`, :func:`join_link`,
  :func:`parse_join_target` (a link or a bare code).
* Weeks: :func:`week_start`, :func:`next_week_start`, :func:`seconds_until_reset` (ISO weeks
  in UTC, from Monday 00:00 UTC).
* Units: :func:`gpu_hours_to_seconds`, :func:`gpu_seconds_to_hours`.
"""

from __future__ import annotations

import csv
import io
import math
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

__all__ = [
    "CODE_ALPHABET",
    "CODE_LENGTH",
    "COHORT_ENDED",
    "COHORT_ID_PREFIX",
    "CSV_COLUMNS",
    "DEFAULT_CODE_TTL",
    "JOIN_SCHEME",
    "MAX_CODE_TTL",
    "MAX_COHORTS_PER_INSTRUCTOR",
    "MAX_GPU_TYPES",
    "MAX_LIVE_CODES",
    "MAX_NAME",
    "MAX_REQUIREMENTS",
    "MAX_ROSTER",
    "MAX_STUDENTS",
    "PATCHABLE",
    "QUOTA_USED_UP",
    "REMOVED_FROM_COHORT",
    "ROLES",
    "CohortRequestError",
    "CohortSettings",
    "CohortView",
    "JoinTarget",
    "StudentUsage",
    "dashboard_csv",
    "gpu_hours_to_seconds",
    "gpu_seconds_to_hours",
    "is_cohort_id",
    "is_pubkey",
    "join_link",
    "new_cohort_id",
    "new_join_code",
    "next_week_start",
    "normalise_code",
    "parse_code_request",
    "parse_create",
    "parse_join",
    "parse_join_target",
    "parse_patch",
    "parse_pubkey_body",
    "parse_roster",
    "parse_roster_csv",
    "seconds_until_reset",
    "week_start",
]

COHORT_ID_PREFIX = "c_"
_COHORT_ID = re.compile(r"^c_[A-Za-z0-9_-]{16}$")
#: Join codes use letters and digits nobody confuses when reading them aloud or off a slide
#: (no I, O, 0, 1).
CODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
CODE_LENGTH = 10
#: Seconds a join code lives unless the instructor says otherwise (7 days), and at most.
DEFAULT_CODE_TTL = 7 * 24 * 3600
MAX_CODE_TTL = 366 * 24 * 3600
MAX_CODE_USES = 100_000
#: ``jupyter-io:join?coordinator=<url-encoded url>&code=<code>``.
JOIN_SCHEME = "jupyter-io:join"
MAX_NAME = 200
MAX_GPU_TYPES = 16
MAX_GPU_NAME = 128
#: Largest requirements file a cohort may name, characters (the request body's limit is
#: 16 KiB).
MAX_REQUIREMENTS = 8 * 1024
#: Most students one roster request may add (a body of 300 keys is about 14 KB); the CLI
#: sends a longer roster in several requests.
MAX_ROSTER = 300
#: What one signed key can make the coordinator store is bounded: active cohorts per
#: instructor, join codes still valid per cohort, students per cohort.
MAX_COHORTS_PER_INSTRUCTOR = 50
MAX_LIVE_CODES = 100
MAX_STUDENTS = 5000
#: Longest term: two years from now.
MAX_TERM_SECONDS = 2 * 366 * 24 * 3600
_MAX_INT = 2**63 - 1

#: Roles: the creator, those the creator (or another instructor) added, the class.
ROLES = ("instructor", "co_instructor", "student")

#: End reasons of cohort leases the coordinator ends.
QUOTA_USED_UP = "cohort quota used up"
REMOVED_FROM_COHORT = "removed from the cohort"
COHORT_ENDED = "the cohort's term ended"


class CohortRequestError(ValueError):
    """A cohort request body is wrong; the message names the field (``field``) and what it
    must be. The coordinator answers it 400 ``bad_request``."""

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(message if field is None else f"{field!r}: {message}")
        self.field = field


# --------------------------------------------------------------------------------------------
# Identifiers, keys, codes, links


def new_cohort_id() -> str:
    """A fresh cohort id: ``c_`` and 16 URL-safe random characters."""
    return COHORT_ID_PREFIX + secrets.token_urlsafe(12)


def is_cohort_id(text: object) -> bool:
    """Whether ``text`` has the shape of a cohort id."""
    return isinstance(text, str) and _COHORT_ID.match(text) is not None


_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58)}


def is_pubkey(text: object) -> bool:
    """Whether ``text`` is a Solana public key: base58 of exactly 32 bytes."""
    if not isinstance(text, str) or not 32 <= len(text) <= 44:
        return False
    value = 0
    for char in text:
        digit = _B58_INDEX.get(char)
        if digit is None:
            return False
        value = value * 58 + digit
    leading = len(text) - len(text.lstrip("1"))
    return leading + (value.bit_length() + 7) // 8 == 32


def new_join_code() -> str:
    """A fresh join code: :data:`CODE_LENGTH` characters of :data:`CODE_ALPHABET` (50 bits)."""
    return "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))


def normalise_code(text: str) -> str:
    """A code as typed (any case, spaces or dashes between groups) → its canonical form.
    Raises :class:`CohortRequestError` when it cannot be a join code."""
    code = re.sub(r"[\s-]", "", text).upper()
    if len(code) != CODE_LENGTH or any(c not in CODE_ALPHABET for c in code):
        raise CohortRequestError(
            "code",
            f"a join code is {CODE_LENGTH} letters and digits (no I, O, 0 or 1), like "
            f"'K7QX-M2PA-9R'; check what your instructor gave you",
        )
    return code


def join_link(coordinator_url: str, code: str) -> str:
    """The link an instructor shares: ``jupyter-io:join?coordinator=...&code=...``."""
    return f"{JOIN_SCHEME}?coordinator={quote(coordinator_url, safe='')}&code={code}"


@dataclass(frozen=True, slots=True)
class JoinTarget:
    """What a student pasted: the code, and the coordinator when it was a link."""

    code: str
    coordinator: str | None = None


def parse_join_target(text: str) -> JoinTarget:
    """A join link or a bare code → :class:`JoinTarget`; :class:`CohortRequestError` (field
    ``code``, or ``coordinator`` for a link without a usable URL) otherwise."""
    text = text.strip()
    if not text.startswith(JOIN_SCHEME):
        return JoinTarget(normalise_code(text))
    query = text[len(JOIN_SCHEME) :]
    if not query.startswith("?"):
        raise CohortRequestError("code", f"a join link looks like {JOIN_SCHEME}?coordinator=…")
    params = parse_qs(query[1:], keep_blank_values=True)
    codes, urls = params.get("code", []), params.get("coordinator", [])
    if len(codes) != 1:
        raise CohortRequestError("code", "the join link has no code=; copy the whole link")
    coordinator = urls[0] if len(urls) == 1 else None
    if coordinator is not None:
        parts = urlsplit(coordinator)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise CohortRequestError(
                "coordinator", f"the join link's coordinator {coordinator!r} is not an http(s) URL"
            )
    return JoinTarget(normalise_code(codes[0]), coordinator)


# --------------------------------------------------------------------------------------------
# Weeks and units


def week_start(at: datetime) -> datetime:
    """Monday 00:00 UTC of the ISO week holding ``at`` (timezone-aware)."""
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(f"naive datetime {at!r}: pass a timezone-aware datetime")
    utc = at.astimezone(timezone.utc)
    midnight = utc.replace(hour=0, minute=0, second=0, microsecond=0)
    return midnight - timedelta(days=utc.weekday())


def next_week_start(at: datetime) -> datetime:
    """When the week holding ``at`` ends and quotas reset: the next Monday 00:00 UTC."""
    return week_start(at) + timedelta(days=7)


def seconds_until_reset(at: datetime) -> int:
    """Whole seconds (rounded up) from ``at`` to the next weekly reset."""
    return math.ceil((next_week_start(at) - at).total_seconds())


def gpu_hours_to_seconds(hours: float | int | str | Decimal) -> int:
    """GPU-hours (``10``, ``"7.5"``) → whole GPU-seconds; :class:`ValueError` for a negative,
    non-finite or non-numeric value."""
    try:
        value = Decimal(str(hours).strip())
    except InvalidOperation:
        raise ValueError(f"{hours!r} is not a number of GPU-hours") from None
    if not value.is_finite() or value < 0:
        raise ValueError(f"GPU-hours must be a finite number ≥ 0, not {hours!r}")
    seconds = int((value * 3600).to_integral_value())
    if seconds > _MAX_INT:
        raise ValueError(f"{hours!r} GPU-hours is too many")
    return seconds


def gpu_seconds_to_hours(seconds: int) -> float:
    """GPU-seconds → GPU-hours (for display; round it as you show it)."""
    return seconds / 3600


# --------------------------------------------------------------------------------------------
# Request bodies


def _object(body: Any) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise CohortRequestError(None, "the body must be a JSON object")
    return body


def _unknown(body: Mapping[str, Any], known: Iterable[str]) -> None:
    unknown = sorted(set(body) - set(known))
    if unknown:
        raise CohortRequestError(
            unknown[0], f"unknown field(s) {unknown}; expected some of {sorted(known)}"
        )


def _int(body: Mapping[str, Any], name: str, low: int, high: int = _MAX_INT) -> int:
    value = body.get(name)
    if type(value) is not int or not low <= value <= high:
        raise CohortRequestError(name, f"must be an integer from {low} to {high}, not {value!r}")
    return value


def _optional_int(body: Mapping[str, Any], name: str, low: int, high: int = _MAX_INT) -> int | None:
    return None if body.get(name) is None else _int(body, name, low, high)


def _name(value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_NAME:
        raise CohortRequestError(
            "name", f"must be a non-empty text of at most {MAX_NAME} characters"
        )
    if any(ord(c) < 32 for c in value):
        raise CohortRequestError("name", "must not contain control characters")
    return value.strip()


def _gpu_types(value: Any) -> tuple[str, ...]:
    if (
        not isinstance(value, list)
        or not 1 <= len(value) <= MAX_GPU_TYPES
        or not all(
            isinstance(v, str) and v.strip() and len(v) <= MAX_GPU_NAME and v.isprintable()
            for v in value
        )
    ):
        raise CohortRequestError(
            "gpu_types",
            f"must be a list of 1 to {MAX_GPU_TYPES} GPU model names (each at most "
            f'{MAX_GPU_NAME} characters), like ["T4", "RTX 4090"]',
        )
    seen: list[str] = []
    for name in value:
        if name.strip() not in seen:
            seen.append(name.strip())
    return tuple(seen)


def _term_end(value: Any, now: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CohortRequestError("term_ends_at", "must be a Unix time in seconds")
    if value <= now:
        raise CohortRequestError("term_ends_at", "must be in the future")
    if value > now + MAX_TERM_SECONDS:
        raise CohortRequestError("term_ends_at", "must be within two years from now")
    return float(value)


def _requirements(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_REQUIREMENTS:
        raise CohortRequestError(
            "requirements",
            f"must be the text of a requirements file of at most {MAX_REQUIREMENTS} characters",
        )
    return value if value.strip() else None


@dataclass(frozen=True, slots=True)
class CohortSettings:
    """What an instructor sets for a cohort (``POST /api/v1/cohorts``; every field but
    ``name``, ``gpu_types``, ``max_price_lamports_per_hour`` and ``term_ends_at`` has a
    default). Quotas and limits apply per student."""

    name: str
    gpu_types: tuple[str, ...]
    #: The price cap per GPU-hour the cohort pays.
    max_price_lamports_per_hour: int
    #: Unix seconds; leases are refused from then on.
    term_ends_at: float
    quota_gpu_seconds_per_week: int = 10 * 3600
    max_concurrent_per_student: int = 1
    idle_timeout_seconds: int = 30 * 60
    max_session_seconds: int = 4 * 3600
    queue_max_wait_seconds: int = 15 * 60
    #: Each student's on-chain term cap (None until the instructor funds allowances).
    student_cap_lamports: int | None = None
    requirements: str | None = None

    def to_json(self) -> dict[str, Any]:
        body = asdict(self)
        body["gpu_types"] = list(self.gpu_types)
        return body


#: Fields ``PATCH /api/v1/cohorts/{id}`` may change.
PATCHABLE = tuple(f.name for f in fields(CohortSettings))

_LIMITS: dict[str, tuple[int, int]] = {
    "max_price_lamports_per_hour": (0, _MAX_INT),
    "quota_gpu_seconds_per_week": (0, 7 * 24 * 3600 * 64),
    "max_concurrent_per_student": (1, 64),
    "idle_timeout_seconds": (60, 7 * 24 * 3600),
    "max_session_seconds": (60, 30 * 24 * 3600),
    "queue_max_wait_seconds": (0, 24 * 3600),
    "student_cap_lamports": (0, _MAX_INT),
}


def _field(body: Mapping[str, Any], name: str, now: float) -> Any:
    value = body[name]
    if name == "name":
        return _name(value)
    if name == "gpu_types":
        return _gpu_types(value)
    if name == "term_ends_at":
        return _term_end(value, now)
    if name == "requirements":
        return _requirements(value)
    low, high = _LIMITS[name]
    if name == "student_cap_lamports":
        return _optional_int(body, name, low, high)
    return _int(body, name, low, high)


def parse_create(body: Any, *, now: float) -> CohortSettings:
    """The body of ``POST /api/v1/cohorts`` → :class:`CohortSettings` (``now``: Unix seconds,
    for the term end's checks). :class:`CohortRequestError` names the first bad field."""
    body = _object(body)
    _unknown(body, PATCHABLE)
    for required in ("name", "gpu_types", "max_price_lamports_per_hour", "term_ends_at"):
        if body.get(required) is None:
            raise CohortRequestError(required, "is required")
    values = {name: _field(body, name, now) for name in body}
    return CohortSettings(**values)


def parse_patch(body: Any, *, now: float) -> dict[str, Any]:
    """The body of ``PATCH /api/v1/cohorts/{id}`` → the changes (field → checked value), at
    least one. ``student_cap_lamports`` and ``requirements`` may be set to null."""
    body = _object(body)
    _unknown(body, PATCHABLE)
    if not body:
        raise CohortRequestError(None, f"name at least one field to change: {list(PATCHABLE)}")
    nullable = ("student_cap_lamports", "requirements")
    changes: dict[str, Any] = {}
    for name in body:
        if body[name] is None and name not in nullable:
            raise CohortRequestError(name, "cannot be null")
        changes[name] = _field(body, name, now)
    return changes


def parse_code_request(body: Any) -> tuple[int, int | None]:
    """The body of ``POST /api/v1/cohorts/{id}/codes`` → (ttl_seconds, max_uses or None)."""
    body = _object(body)
    _unknown(body, ("ttl_seconds", "max_uses"))
    ttl = _optional_int(body, "ttl_seconds", 60, MAX_CODE_TTL)
    return (DEFAULT_CODE_TTL if ttl is None else ttl), _optional_int(
        body, "max_uses", 1, MAX_CODE_USES
    )


def parse_join(body: Any) -> str:
    """The body of ``POST /api/v1/cohorts/join`` → the canonical code (a link is taken too)."""
    body = _object(body)
    _unknown(body, ("code",))
    code = body.get("code")
    if not isinstance(code, str) or len(code) > 4096:
        raise CohortRequestError("code", "is required: the join code or link")
    return parse_join_target(code).code


def parse_roster(body: Any) -> tuple[list[str], list[str]]:
    """The body of ``POST /api/v1/cohorts/{id}/roster`` → (valid keys without duplicates,
    entries that are not public keys)."""
    body = _object(body)
    _unknown(body, ("students",))
    students = body.get("students")
    if not isinstance(students, list) or not 1 <= len(students) <= MAX_ROSTER:
        raise CohortRequestError(
            "students", f"must be a list of 1 to {MAX_ROSTER} base58 public keys"
        )
    valid: list[str] = []
    invalid: list[str] = []
    for entry in students:
        if is_pubkey(entry):
            if entry not in valid:
                valid.append(entry)
        else:
            invalid.append(entry if isinstance(entry, str) else repr(entry))
    return valid, invalid


def parse_pubkey_body(body: Any) -> str:
    """The body of ``POST /api/v1/cohorts/{id}/instructors`` → the key."""
    body = _object(body)
    _unknown(body, ("pubkey",))
    pubkey = body.get("pubkey")
    if not is_pubkey(pubkey):
        raise CohortRequestError("pubkey", "must be a base58 Solana public key")
    assert isinstance(pubkey, str)
    return pubkey


def parse_roster_csv(text: str) -> tuple[list[str], list[str]]:
    """A roster file → (keys, bad lines): one key per line, or a CSV with a ``pubkey``
    column. Blank lines and ``#`` comments are skipped; duplicates dropped."""
    lines = [
        line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]
    keys: list[str] = []
    bad: list[str] = []
    if not lines:
        return keys, bad
    header = [cell.strip().lower() for cell in next(csv.reader([lines[0]]))]
    if "pubkey" in header:
        column = header.index("pubkey")
        entries = [
            row[column].strip() if len(row) > column else ""
            for row in csv.reader(io.StringIO("\n".join(lines[1:])))
        ]
    else:
        entries = [line.strip().split(",")[0].strip() for line in lines]
    for entry in entries:
        if is_pubkey(entry):
            if entry not in keys:
                keys.append(entry)
        else:
            bad.append(entry)
    return keys, bad


# --------------------------------------------------------------------------------------------
# Response shapes


@dataclass(frozen=True, slots=True)
class StudentUsage:
    """A student's week (a dashboard row; the ``"me"`` of a student's cohort view).
    ``allowance`` is the on-chain allowance block (payments contract section 6; None until
    the instructor funds one)."""

    student: str
    gpu_seconds_week: int = 0
    cost_lamports_week: int = 0
    live_kernels: int = 0
    idle_seconds: int | None = None
    queued: int = 0
    quota_left_gpu_seconds: int = 0
    week_resets_at: float = 0.0
    joined_at: float | None = None
    allowance: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> StudentUsage:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in body.items() if k in known})


@dataclass(frozen=True, slots=True)
class CohortView:
    """A cohort as the API shows it. ``role`` is the caller's (in lists); ``me`` a student's
    own usage."""

    id: str
    name: str
    instructor: str
    instructors: tuple[str, ...]
    gpu_types: tuple[str, ...]
    max_price_lamports_per_hour: int
    quota_gpu_seconds_per_week: int
    max_concurrent_per_student: int
    idle_timeout_seconds: int
    max_session_seconds: int
    queue_max_wait_seconds: int
    student_cap_lamports: int | None
    term_ends_at: float
    requirements: str | None
    environment_sha256: str | None
    state: str
    created_at: float
    ended_at: float | None
    students: int = 0
    role: str | None = None
    me: StudentUsage | None = None

    def to_json(self) -> dict[str, Any]:
        body = {f.name: getattr(self, f.name) for f in fields(self)}
        body["instructors"] = list(self.instructors)
        body["gpu_types"] = list(self.gpu_types)
        body["me"] = None if self.me is None else self.me.to_json()
        return body

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> CohortView:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in body.items() if k in known}
        values["instructors"] = tuple(values.get("instructors") or ())
        values["gpu_types"] = tuple(values.get("gpu_types") or ())
        me = values.get("me")
        values["me"] = StudentUsage.from_json(me) if isinstance(me, Mapping) else None
        return cls(**values)


#: Columns of the dashboard's CSV export, in order.
CSV_COLUMNS: Sequence[str] = (
    "student",
    "gpu_hours_week",
    "cost_lamports_week",
    "live_kernels",
    "idle_seconds",
    "queued",
    "quota_left_gpu_hours",
    "joined_at",
    "allowance_spendable_lamports",
    "allowance_amount_lamports",
    "allowance_delegated_lamports",
    "allowance_problem",
)


def _allowance_cells(allowance: Mapping[str, Any] | None) -> list[object]:
    """The allowance columns of a row: empty when the student has no allowance on-chain (or
    the pool is not reported); a figure the coordinator could not read stays empty."""
    if allowance is None:
        return ["", "", "", ""]

    def figure(key: str) -> object:
        value = allowance.get(key)
        return "" if value is None else int(value)

    return [
        figure("spendable_lamports"),
        figure("amount_lamports"),
        figure("delegated_lamports"),
        allowance.get("problem") or "",
    ]


def dashboard_csv(rows: Iterable[StudentUsage]) -> str:
    """The dashboard's rows as CSV (one per student, GPU-hours to 4 decimals). The
    ``allowance_*`` columns are the student's on-chain allowance as the dashboard read it
    (payments contract section 6): what their sessions can still draw, what it holds, what
    the delegate may still move, and why it is not as agreed; empty without an allowance."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow(
            [
                row.student,
                f"{gpu_seconds_to_hours(row.gpu_seconds_week):.4f}",
                row.cost_lamports_week,
                row.live_kernels,
                "" if row.idle_seconds is None else row.idle_seconds,
                row.queued,
                f"{gpu_seconds_to_hours(row.quota_left_gpu_seconds):.4f}",
                ""
                if row.joined_at is None
                else datetime.fromtimestamp(row.joined_at, tz=timezone.utc).isoformat(),
                *_allowance_cells(row.allowance),
            ]
        )
    return out.getvalue()
