"""How long a session's kernel has been idle, as the provider host sees it (issue 14.3).

A class's idle timeout stops kernels that execute nothing (``docs/cohorts.md``, "Time
rules"); the host's signed usage reports of a class's lease carry ``idle_seconds`` for it,
and the coordinator stops the kernel when either party says it idled for the timeout, so
a student's client claiming activity cannot keep an idle kernel.

:class:`SessionActivity` takes the kernel's word, not the client's: an execution is in flight
from the kernel's iopub ``status: busy`` for an ``execute_request`` to its ``status: idle``
or its ``execute_reply`` on shell (whichever the host hears first), however long a silent
cell runs. An ``execute_request`` the tunnel forwards is no activity by itself: the kernel
drops one with a bad signature, and a client could keep the GPU with those. Status for other
requests (completions, kernel_info, comms) is not execution. The rule is
:class:`jupyter_io.activity.ExecutionClock`, which the user's side counts with too.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from jupyter_io.activity import ExecutionClock, peek
from jupyter_io.bridge import Bridge, Gate
from jupyter_io.protocol import Channel

__all__ = ["SessionActivity"]

_STATUS = (b"status",)
_REPLY = (b"execute_reply",)


class SessionActivity:
    """Executions the kernel reports, and the time of the last (see the module docstring).

    Call :meth:`watch` with the session's bridge before it starts, :meth:`kernel_changed`
    when a kernel starts or exits, :meth:`idle_seconds` for a report."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.executions = ExecutionClock(clock)

    def watch(self, bridge: Bridge) -> None:
        """Hear what the kernel sends on iopub and shell through ``bridge`` (before its
        pumps start: they read their gates once), keeping any gates there already."""
        for channel, hear in ((Channel.IOPUB, self._status), (Channel.SHELL, self._reply)):
            bridge.gates[channel] = _compose(hear, bridge.gates.get(channel))

    def kernel_changed(self) -> None:
        """A kernel started or exited: what was in flight ran until now and is over."""
        self.executions.reset()

    def idle_seconds(self) -> int:
        """Whole seconds since the kernel last executed anything (0 while it does)."""
        return self.executions.idle_seconds()

    def _status(self, parts: list[bytes]) -> None:
        status = peek(parts, _STATUS)
        if status is None or status.parent_type != "execute_request":
            return
        if status.execution_state == "busy":
            self.executions.begin(status.parent_id)
        elif status.execution_state == "idle":
            self.executions.end(status.parent_id)

    def _reply(self, parts: list[bytes]) -> None:
        reply = peek(parts, _REPLY)
        if reply is not None:
            self.executions.end(reply.parent_id)


def _compose(hear: Callable[[list[bytes]], None], inner: Gate | None) -> Gate:
    def gate(parts: list[bytes]) -> Awaitable[None] | None:
        hear(parts)
        return inner(parts) if inner is not None else None

    return gate
