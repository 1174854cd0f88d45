"""When a kernel last executed anything: the rule both parties of a class's session measure
its idle time by (issue 14.3; ``docs/cohorts.md``, "Time rules").

A class's idle timeout stops kernels that execute nothing. The user's side
(``kernel_provisioner.activity``) and the provider host (``provider_host.activity``) each
report ``idle_seconds`` to the coordinator, which stops the kernel when either says it idled
for the class's timeout. Both count with an :class:`ExecutionClock`: an execution is in
flight from its start to its end (however long a silent cell runs), and idle time counts
from the last start or end (or from the clock's creation, before any). What starts and ends
an execution is each party's to witness: the user's side sees its ``execute_request`` go
out and the ``execute_reply`` come back; the provider trusts only the kernel (its iopub
``status: busy`` for an ``execute_request``, then ``status: idle`` or the reply), so a
request the kernel never ran (a bad signature, no kernel) is no activity there.

Sans-I/O: :func:`peek` reads what it needs from a Jupyter message's wire parts (cheaply:
JSON is parsed only for messages whose header names a wanted type).
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["MAX_IN_FLIGHT", "ExecutionClock", "Peeked", "peek"]

_DELIMITER = b"<IDS|MSG>"

#: Executions tracked in flight at once; more (a flood of forged starts) are not tracked
#: apart, but still count as activity when they happen.
MAX_IN_FLIGHT = 256
#: Ends remembered, so that a start heard after its own end (the kernel's iopub and shell
#: are separate sockets) is not taken for a new execution.
_RECENT_ENDS = 64


@dataclass(frozen=True, slots=True)
class Peeked:
    """What :func:`peek` read of one Jupyter message."""

    msg_type: str
    #: The header's ``msg_id`` and the parent header's ``msg_type`` and ``msg_id`` ("" when
    #: absent).
    msg_id: str
    parent_type: str
    parent_id: str
    #: ``content["execution_state"]`` of a ``status`` message (None for others).
    execution_state: str | None = None


def _json(raw: Any) -> dict[str, Any]:
    try:
        value = json.loads(bytes(raw))
    except (ValueError, TypeError):
        return {}
    return value if isinstance(value, dict) else {}


def peek(parts: Sequence[Any], wanted: tuple[bytes, ...]) -> Peeked | None:
    """The message in ``parts`` (ZMQ frames: identities, delimiter, signature, header,
    parent header, metadata, content) if its ``msg_type`` is one of ``wanted``; else None,
    for most messages without parsing JSON."""
    try:  # the hot path (every iopub message): no copy, no JSON
        index = parts.index(_DELIMITER)
        header_raw = parts[index + 2]
    except (ValueError, IndexError):
        return None
    if not isinstance(header_raw, bytes):
        header_raw = bytes(header_raw)  # a view of a received frame, or a zmq.Frame
    for w in wanted:
        if w in header_raw:
            break
    else:
        return None
    header = _json(header_raw)
    msg_type = header.get("msg_type")
    if not isinstance(msg_type, str) or msg_type.encode() not in wanted:
        return None
    parent = _json(parts[index + 3]) if len(parts) > index + 3 else {}
    state = None
    if msg_type == "status" and len(parts) > index + 5:
        found = _json(parts[index + 5]).get("execution_state")
        state = found if isinstance(found, str) else None
    return Peeked(
        msg_type,
        str(header.get("msg_id", "")),
        str(parent.get("msg_type", "")),
        str(parent.get("msg_id", "")),
        state,
    )


class ExecutionClock:
    """Executions in flight (by their request's ``msg_id``) and the time of the last start
    or end; ``clock`` is monotonic seconds (injectable for tests)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.last_active = clock()
        self._running: set[str] = set()
        self._ended: deque[str] = deque(maxlen=_RECENT_ENDS)

    @property
    def running(self) -> int:
        """How many executions are in flight."""
        return len(self._running)

    def begin(self, key: str) -> None:
        """An execution started (``key``: its request's msg_id)."""
        self.last_active = self.clock()
        if key not in self._ended and len(self._running) < MAX_IN_FLIGHT:
            self._running.add(key)

    def end(self, key: str) -> None:
        """An execution ended (an unknown ``key`` still counts as activity now)."""
        self.last_active = self.clock()
        if key in self._running:
            self._running.discard(key)
            self._ended.append(key)
        elif key not in self._ended:
            self._ended.append(key)

    def reset(self) -> None:
        """The kernel is gone or new: nothing is in flight; what was ran until now."""
        if self._running:
            self.last_active = self.clock()
            self._running.clear()

    def idle_seconds(self) -> int:
        """Whole seconds since the kernel last executed anything (0 while it does)."""
        if self._running:
            return 0
        return max(0, int(self.clock() - self.last_active))
