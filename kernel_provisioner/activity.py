"""How long a remote kernel has been idle, as the user's side sees it (issue 14.3).

A class's idle timeout stops kernels that execute nothing (``docs/cohorts.md``, "Time
rules"); the user's usage acknowledgements carry ``idle_seconds`` for it.
:class:`KernelActivity` watches the facade's shell channel on the tunnel's bridge: an
``execute_request`` going out makes the kernel busy until its ``execute_reply`` comes back
(however long a silent cell runs), and idle time counts from the last reply (or from the
start, before any execution). Other shell traffic (completions, inspections, comms) is not
execution. It composes with the file channel's gate and tap on the same channel.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Sequence

from jupyter_io.bridge import Bridge, Gate, Tap
from jupyter_io.protocol import Channel

__all__ = ["KernelActivity"]

_DELIMITER = b"<IDS|MSG>"


def _msg_type(parts: Sequence[bytes], wanted: tuple[bytes, ...]) -> bytes | None:
    """Which of ``wanted`` this Jupyter message is (None for the others, cheaply)."""
    try:
        index = list(parts).index(_DELIMITER)
        header = bytes(parts[index + 2])
    except (ValueError, IndexError):
        return None
    candidates = [w for w in wanted if w in header]
    if not candidates:
        return None
    try:
        found = json.loads(header).get("msg_type", "").encode()
    except (ValueError, AttributeError):
        return None
    return found if found in candidates else None


class KernelActivity:
    """Executions in flight and the time of the last one (see the module docstring)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.running = 0
        self.last_active = clock()

    def watch(self, bridge: Bridge) -> None:
        """Hear the shell channel of ``bridge`` (a new tunnel session), keeping whatever
        gate and tap are there already."""
        gate, tap = bridge.gates.get(Channel.SHELL), bridge.taps.get(Channel.SHELL)
        bridge.gates[Channel.SHELL] = self._gate(gate)
        bridge.taps[Channel.SHELL] = self._tap(tap)
        self.running = 0  # a new session: requests in flight on the old one are gone

    def idle_seconds(self) -> int:
        """Whole seconds since the kernel last executed anything (0 while it does)."""
        if self.running:
            return 0
        return max(0, int(self.clock() - self.last_active))

    def _gate(self, inner: Gate | None) -> Gate:
        def gate(parts: list[bytes]) -> Awaitable[None] | None:
            if _msg_type(parts, (b"execute_request",)):
                self.running += 1
                self.last_active = self.clock()
            return inner(parts) if inner is not None else None

        return gate

    def _tap(self, inner: Tap | None) -> Tap:
        def tap(parts: Sequence[bytes]) -> None:
            if _msg_type(parts, (b"execute_reply",)):
                self.running = max(0, self.running - 1)
                self.last_active = self.clock()
            if inner is not None:
                inner(parts)

        return tap
