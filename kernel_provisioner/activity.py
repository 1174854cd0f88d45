"""How long a remote kernel has been idle, as the user's side sees it (issue 14.3).

A class's idle timeout stops kernels that execute nothing (``docs/cohorts.md``, "Time
rules"); the user's usage acknowledgements carry ``idle_seconds`` for it.
:class:`KernelActivity` watches the facade's shell channel on the tunnel's bridge: an
``execute_request`` going out makes the kernel busy until its ``execute_reply`` comes back
(however long a silent cell runs), and idle time counts from the last reply (or from the
start, before any execution). Other shell traffic (completions, inspections, comms) is not
execution. It composes with the file channel's gate and tap on the same channel. The rule
is :class:`jupyter_io.activity.ExecutionClock`, which the provider host counts with too.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence

from jupyter_io.activity import ExecutionClock, peek
from jupyter_io.bridge import Bridge, Gate, Tap
from jupyter_io.protocol import Channel

__all__ = ["KernelActivity"]

_REQUEST = (b"execute_request",)
_REPLY = (b"execute_reply",)


class KernelActivity:
    """Executions in flight and the time of the last one (see the module docstring)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.executions = ExecutionClock(clock)

    def watch(self, bridge: Bridge) -> None:
        """Hear the shell channel of ``bridge`` (a new tunnel session), keeping whatever
        gate and tap are there already."""
        gate, tap = bridge.gates.get(Channel.SHELL), bridge.taps.get(Channel.SHELL)
        bridge.gates[Channel.SHELL] = self._gate(gate)
        bridge.taps[Channel.SHELL] = self._tap(tap)
        self.executions.reset()  # a new session: requests in flight on the old one are gone

    def idle_seconds(self) -> int:
        """Whole seconds since the kernel last executed anything (0 while it does)."""
        return self.executions.idle_seconds()

    def _gate(self, inner: Gate | None) -> Gate:
        def gate(parts: list[bytes]) -> Awaitable[None] | None:
            request = peek(parts, _REQUEST)
            if request is not None:
                self.executions.begin(request.msg_id)
            return inner(parts) if inner is not None else None

        return gate

    def _tap(self, inner: Tap | None) -> Tap:
        def tap(parts: Sequence[bytes]) -> None:
            reply = peek(parts, _REPLY)
            if reply is not None:
                self.executions.end(reply.parent_id)
            if inner is not None:
                inner(parts)

        return tap
