"""The user's preferences for GPU kernels: price cap, region, latency cap, session budget.

Stored as one JSON file (default ``JUPYTER_DATA_DIR/io/preferences.json``) by
:class:`PreferencesStore`; read by the GPU kernelspecs (the cap and region go into each
kernelspec's provisioner config) and shown by the Lab extension, which writes them from its
settings through ``PUT /jupyter-io/preferences``. :meth:`Preferences.updated` validates what
a client sends and raises :class:`PreferencesError` naming the field and what to send instead.

A session always has a budget: the user's, or the default (the escrow hook's
``max_session_hours``, :data:`~jupyter_io.payments.amounts.DEFAULT_SESSION_HOURS` unless
configured). :attr:`Preferences.session_budget_hours` is the one in effect, and the GET body
says which (``session_budget_is_default``), so every reader shows the budget the escrow takes.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..payments.amounts import DEFAULT_SESSION_HOURS, MAX_SESSION_HOURS, format_sol, parse_sol

__all__ = ["MAX_BUDGET_HOURS", "Preferences", "PreferencesError", "PreferencesStore"]

#: The longest session budget accepted, in hours (a month).
MAX_BUDGET_HOURS = MAX_SESSION_HOURS
_REGION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_FIELDS = (
    "max_price_per_hour",
    "region",
    "max_latency_ms",
    "session_budget_hours",
    "min_reliability",
)
#: The highest latency cap accepted, ms (a round trip of more is no interactive session).
MAX_LATENCY_CAP_MS = 10_000.0
#: Fields of the GET body that a client may send back; they are derived, so ignored.
_DERIVED = (
    "max_price_lamports_per_hour",
    "max_price_display",
    "session_budget_default_hours",
    "session_budget_is_default",
)


class PreferencesError(ConfigError):
    """A preference has a value that cannot be used; the message names the field."""


@dataclass(frozen=True)
class Preferences:
    """What the user wants from GPU kernels. Empty/None means "no preference"."""

    #: Most to pay per GPU-hour, in SOL, exactly as typed ("" for no cap).
    max_price_per_hour: str = ""
    #: Region to lease in ("" for any).
    region: str = ""
    #: Most round trip to accept, ms, as measured from this server (None: no cap).
    max_latency_ms: float | None = None
    #: Least measured reliability (30 days, 0..1) to lease from (None: any, newcomers too).
    min_reliability: float | None = None
    #: The session budget the user chose, in hours (None: the default).
    chosen_budget_hours: float | None = None
    #: The budget when the user chose none: the escrow hook's ``max_session_hours``.
    default_budget_hours: float = DEFAULT_SESSION_HOURS

    @property
    def session_budget_hours(self) -> float:
        """How long one session may run at its price before its escrow is spent: the
        user's choice, else the default. What a GPU kernel's escrow is sized by."""
        if self.chosen_budget_hours is not None:
            return self.chosen_budget_hours
        return self.default_budget_hours

    @property
    def max_price_lamports_per_hour(self) -> int | None:
        return parse_sol(self.max_price_per_hour) if self.max_price_per_hour else None

    def to_json(self) -> dict[str, Any]:
        """The body of ``GET /jupyter-io/preferences``."""
        cap = self.max_price_lamports_per_hour
        return {
            "max_price_per_hour": self.max_price_per_hour or None,
            "max_price_lamports_per_hour": cap,
            "max_price_display": None if cap is None else f"{format_sol(cap)}/h",
            "region": self.region or None,
            "max_latency_ms": self.max_latency_ms,
            "min_reliability": self.min_reliability,
            "session_budget_hours": self.session_budget_hours,
            "session_budget_default_hours": self.default_budget_hours,
            "session_budget_is_default": self.chosen_budget_hours is None,
        }

    def stored(self) -> dict[str, Any]:
        """What the preferences file keeps: the user's choices only (a default stays one)."""
        stored: dict[str, Any] = {
            "max_price_per_hour": self.max_price_per_hour or None,
            "region": self.region or None,
            "session_budget_hours": self.chosen_budget_hours,
        }
        if self.max_latency_ms is not None:
            stored["max_latency_ms"] = self.max_latency_ms
        if self.min_reliability is not None:
            stored["min_reliability"] = self.min_reliability
        return stored

    def updated(self, body: Any) -> Preferences:
        """These preferences with the fields of ``body`` (a JSON object) changed; fields
        left out keep their value, ``null`` or ``""`` clears one (a cleared budget is the
        default again). Raises
        :class:`PreferencesError` for unknown fields and invalid values."""
        if not isinstance(body, Mapping):
            raise PreferencesError(
                'send a JSON object such as {"max_price_per_hour": "0.5", "region": '
                'null, "session_budget_hours": 2}'
            )
        unknown = sorted(set(body) - set(_FIELDS) - set(_DERIVED))
        if unknown:
            raise PreferencesError(
                f"unknown preference(s) {', '.join(unknown)}; known: {', '.join(_FIELDS)}"
            )
        changes: dict[str, Any] = {}
        if "max_price_per_hour" in body:
            changes["max_price_per_hour"] = _price(body["max_price_per_hour"])
        if "region" in body:
            changes["region"] = _region(body["region"])
        if "max_latency_ms" in body:
            changes["max_latency_ms"] = _latency(body["max_latency_ms"])
        if "session_budget_hours" in body:
            changes["chosen_budget_hours"] = _budget(body["session_budget_hours"])
        if "min_reliability" in body:
            changes["min_reliability"] = _reliability(body["min_reliability"])
        return replace(self, **changes)


def _price(value: Any) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise PreferencesError(
            f'max_price_per_hour must be an amount of SOL such as "0.5" (or null for no '
            f"cap), not {value!r}"
        )
    text = str(value).strip()
    try:
        lamports = parse_sol(text)
    except ConfigError as exc:
        raise PreferencesError(f"max_price_per_hour: {exc}") from None
    if lamports == 0:
        raise PreferencesError(
            "max_price_per_hour must be more than 0 SOL (a cap of 0 leases nothing); send "
            "null for no cap"
        )
    return text


def _region(value: Any) -> str:
    if value is None or value == "":
        return ""
    if not isinstance(value, str) or not _REGION.match(value.strip()):
        raise PreferencesError(
            f"region must be a region name such as \"eu-west\" (letters, digits, '.', '_', "
            f"'-'; or null for any), not {value!r}"
        )
    return value.strip()


def _latency(value: Any) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PreferencesError(
            f"max_latency_ms must be a number of milliseconds such as 50 (or null for no "
            f"cap), not {value!r}"
        )
    ms = float(value)
    if not 0 < ms <= MAX_LATENCY_CAP_MS:
        raise PreferencesError(
            f"max_latency_ms must be more than 0 and at most {MAX_LATENCY_CAP_MS:g}, not {value!r}"
        )
    return ms


def _reliability(value: Any) -> float | None:
    if value is None or value == "" or value == 0:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise PreferencesError(
            f"min_reliability must be a number in 0..1 such as 0.95 (95 % of sessions "
            f"completed over 30 days; null or 0 for any provider), not {value!r}"
        )
    return float(value)


def _budget(value: Any) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PreferencesError(
            f"session_budget_hours must be a number of hours such as 2 (or null for the "
            f"default, {DEFAULT_SESSION_HOURS:g} h), not {value!r}"
        )
    hours = float(value)
    if not 0 < hours <= MAX_BUDGET_HOURS:
        raise PreferencesError(
            f"session_budget_hours must be more than 0 and at most {MAX_BUDGET_HOURS}, "
            f"not {value!r}"
        )
    return hours


class PreferencesStore:
    """Reads and writes :class:`Preferences` at ``path`` (created on first save); a budget
    left unchosen is ``default_budget_hours`` (the escrow hook's, as configured)."""

    def __init__(
        self, path: str | os.PathLike[str], default_budget_hours: float = DEFAULT_SESSION_HOURS
    ) -> None:
        self.path = Path(path).expanduser()
        self.default_budget_hours = default_budget_hours

    def defaults(self) -> Preferences:
        """No choices made: what :meth:`load` returns without a file."""
        return Preferences(default_budget_hours=self.default_budget_hours)

    def load(self) -> Preferences:
        """The stored preferences; defaults when the file does not exist. A file that
        cannot be used raises :class:`PreferencesError` naming it."""
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return self.defaults()
        except (OSError, ValueError) as exc:
            raise PreferencesError(
                f"cannot read the preferences in {self.path}: {exc}; fix or delete the file"
            ) from None
        try:
            return self.defaults().updated(raw)
        except PreferencesError as exc:
            raise PreferencesError(f"{self.path}: {exc}; fix or delete the file") from None

    def save(self, preferences: Preferences) -> None:
        """Write ``preferences`` atomically (a reader never sees half a file)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = preferences.stored()
        fd, tmp = tempfile.mkstemp(prefix=".preferences-", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as file:
                json.dump(body, file, indent=1)
                file.write("\n")
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
