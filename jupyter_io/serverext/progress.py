"""Launch progress of remote kernels, kept in memory for ``GET /jupyter-io/progress``.

The io-remote provisioner reports each step of a kernel's start (``queued → leased →
launching → ready``, or ``failed``; see :mod:`kernel_provisioner.progress`) as a log record
carrying the event's JSON in :data:`~kernel_provisioner.progress.PROGRESS_ATTR`. The server
extension attaches a :class:`ProgressLogFilter` to the Jupyter Server's logger (the logger the
provisioner logs to when Jupyter Server runs it), which feeds a :class:`ProgressBoard`.

The hook, for code that would rather call than log (a future escrow step, say)::

    from jupyter_io.serverext.progress import publish_progress
    publish_progress({"step": "escrowed", "kernel_id": kid, "message": "...", "at": time.time()})

:func:`publish_progress` hands the event to every board of a running server extension in
this process; an event arriving by both paths (logged and published) is kept once. Events
are plain JSON dicts: ``step``, ``kernel_id``, ``message``, ``at`` (Unix seconds), plus
step-specific details (``gpu``, ``lease``, ``price_lamports_per_hour``, ...).

Limits: the board keeps the last :attr:`ProgressBoard.max_kernels` kernels and
:attr:`ProgressBoard.max_events` events each. Records below the server's log level never
exist, so a server run with ``--log-level=WARN`` sees only ``failed`` steps through the log
filter; publish through the hook to avoid that.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from kernel_provisioner.progress import PROGRESS_ATTR

__all__ = ["TERMINAL_STEPS", "ProgressBoard", "ProgressLogFilter", "publish_progress"]

#: Steps that end a start; a later step begins a new start (a restart).
TERMINAL_STEPS = frozenset({"ready", "failed"})

#: A failover's last event (``step`` ``failover``) ends it like ``ready`` (``phase`` ``done``:
#: the kernel continues on another provider) or ``failed`` (``phase`` ``failed``).
_FAILOVER_ENDS = {"done": "ready", "failed": "failed"}


def _outcome(event: Mapping[str, Any]) -> str | None:
    """``ready`` or ``failed`` when ``event`` ends a start (or a failover), else None."""
    step = event["step"]
    if step in TERMINAL_STEPS:
        return str(step)
    if step == "failover":
        return _FAILOVER_ENDS.get(str(event.get("phase")))
    return None


_boards: weakref.WeakSet[ProgressBoard] = weakref.WeakSet()


def publish_progress(event: Mapping[str, Any]) -> None:
    """Hand ``event`` to every live :class:`ProgressBoard` in this process (see the module
    docstring for its fields). Events without a ``kernel_id`` are ignored."""
    for board in list(_boards):
        board.publish(event)


class _Launch:
    __slots__ = ("events", "kernel_id", "keys")

    def __init__(self, kernel_id: str) -> None:
        self.kernel_id = kernel_id
        self.events: list[dict[str, Any]] = []
        self.keys: set[tuple[str, float]] = set()

    def current(self) -> list[dict[str, Any]]:
        """The events of the latest start: after the last terminal step before the end."""
        start = 0
        for i, event in enumerate(self.events[:-1]):
            if _outcome(event) is not None:
                start = i + 1
        return self.events[start:]

    def to_json(self) -> dict[str, Any]:
        events = self.current()
        last = events[-1]
        state = _outcome(last) or "starting"
        details: dict[str, Any] = {}
        # Later steps know more (the leased GPU and price); a restart that fails at once
        # (its budget spent, say) keeps what the kernel's earlier starts knew.
        for event in self.events:
            for key in ("gpu", "provider", "lease", "price_lamports_per_hour", "relay"):
                if event.get(key) is not None:
                    details[key] = event[key]
        return {
            "kernel_id": self.kernel_id,
            "state": state,
            "step": last["step"],
            "message": last["message"],
            "started_at": events[0]["at"],
            "updated_at": last["at"],
            **details,
            "events": events,
        }


class ProgressBoard:
    """The recent starts of this server's remote kernels, by kernel id.

    Thread-safe (a log handler may be called from any thread). Create one per server
    extension; it registers itself for :func:`publish_progress` until :meth:`close`.
    """

    def __init__(
        self,
        *,
        max_kernels: int = 64,
        max_events: int = 64,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.max_kernels = max_kernels
        self.max_events = max_events
        self.clock = clock
        self._launches: OrderedDict[str, _Launch] = OrderedDict()
        self._lock = threading.Lock()
        #: Called with each new event, after it is recorded (from the publishing thread).
        self.listeners: list[Callable[[Mapping[str, Any]], None]] = []
        _boards.add(self)

    def close(self) -> None:
        """Stop receiving :func:`publish_progress` events."""
        _boards.discard(self)

    def publish(self, event: Mapping[str, Any]) -> None:
        """Record one progress event (a dict as :func:`publish_progress` takes)."""
        kernel_id = event.get("kernel_id")
        step = event.get("step")
        if not kernel_id or not isinstance(step, str):
            return
        at = event.get("at")
        record = {
            **event,
            "kernel_id": str(kernel_id),
            "step": step,
            "message": str(event.get("message") or step),
            "at": float(at) if isinstance(at, (int, float)) else self.clock(),
        }
        key = (step, record["at"])
        with self._lock:
            launch = self._launches.get(record["kernel_id"])
            if launch is None:
                launch = self._launches[record["kernel_id"]] = _Launch(record["kernel_id"])
            elif key in launch.keys:
                return  # the same event by the other path
            self._launches.move_to_end(record["kernel_id"])
            launch.keys.add(key)
            launch.events.append(record)
            if len(launch.events) > self.max_events:
                dropped = launch.events.pop(0)
                launch.keys.discard((dropped["step"], dropped["at"]))
            while len(self._launches) > self.max_kernels:
                self._launches.popitem(last=False)
        for listener in list(self.listeners):
            listener(record)

    def launches(self, since: float | None = None) -> list[dict[str, Any]]:
        """Each kernel's latest start (oldest first), optionally only those updated after
        ``since`` (Unix seconds): ``{"kernel_id", "state": "starting" | "ready" | "failed",
        "step", "message", "started_at", "updated_at", "gpu"?, "price_lamports_per_hour"?,
        ..., "events": [...]}``. A failover is a start of its own: the ``failover`` event of
        ``phase`` ``lost`` begins it, the new lease's steps follow, and the ``failover`` event
        of ``phase`` ``done`` (``state`` ``ready``; ``old_provider``, ``new_provider``,
        ``restored``, ``missing``: see docs/server-extension-api.md) or ``failed`` ends it."""
        with self._lock:
            found = [launch.to_json() for launch in self._launches.values()]
        if since is not None:
            found = [launch for launch in found if launch["updated_at"] > since]
        return found

    def launch(self, kernel_id: str) -> dict[str, Any] | None:
        """One kernel's latest start with every event recorded for it (``history``), or
        None when no event was seen for ``kernel_id``."""
        with self._lock:
            launch = self._launches.get(kernel_id)
            if launch is None:
                return None
            return {**launch.to_json(), "history": list(launch.events)}


class ProgressLogFilter(logging.Filter):
    """Feeds a :class:`ProgressBoard` from the provisioner's progress log records, and lets
    every record through unchanged.

    A filter on the logger rather than a handler: a logger's filters see each record logged
    on it whatever its handlers are, and logging setups (Jupyter's ``logging_config``, test
    harnesses) replace handlers wholesale after extensions load.
    """

    def __init__(self, board: ProgressBoard) -> None:
        super().__init__()
        self.board = board

    def filter(self, record: logging.LogRecord) -> bool:
        event = getattr(record, PROGRESS_ATTR, None)
        if isinstance(event, Mapping):
            # Logging must never break the code that logs (nor lose its record).
            with contextlib.suppress(Exception):
                self.board.publish(event)
        return True
