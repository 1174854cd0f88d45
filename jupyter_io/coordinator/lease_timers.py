"""One timer per lease that runs its owner's check when due: the budget watch
(:class:`~jupyter_io.coordinator.billing.Billing`) and the acknowledgement watch
(:class:`~jupyter_io.coordinator.ack_watch.AckWatch`) each keep one.

:meth:`LeaseTimers.arm` (re)sets a lease's timer; when it fires, the owner's ``check`` runs
as a task of its own; a check that raises is logged and retried a second later (a store or
ledger hiccup must not leave a lease unwatched); :meth:`LeaseTimers.stop` cancels the timers
and waits for the checks in progress.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["RETRY_SECONDS", "LeaseTimers"]

#: Seconds before a check that raised runs again.
RETRY_SECONDS = 1.0


class LeaseTimers:
    """Timers keyed by lease id, each running ``check(lease_id)`` when due."""

    def __init__(
        self, check: Callable[[str], Awaitable[None]], *, what: str, log: logging.Logger
    ) -> None:
        self._check = check
        self._what = what
        self.log = log
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        #: True once :meth:`stop` was called: nothing is armed any more.
        self.stopped = False

    def cancel(self, lease_id: str) -> None:
        """Forget ``lease_id``'s timer, if it has one."""
        handle = self._timers.pop(lease_id, None)
        if handle is not None:
            handle.cancel()

    def arm(self, lease_id: str, delay: float) -> None:
        """Run the check of ``lease_id`` in ``delay`` seconds (replacing its timer)."""
        self.cancel(lease_id)
        if not self.stopped:
            loop = asyncio.get_running_loop()
            self._timers[lease_id] = loop.call_later(max(0.0, delay), self._due, lease_id)

    async def stop(self) -> None:
        """Cancel every timer and wait for the checks in progress."""
        self.stopped = True
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _due(self, lease_id: str) -> None:
        self._timers.pop(lease_id, None)
        task = asyncio.create_task(self._run(lease_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, lease_id: str) -> None:
        try:
            await self._check(lease_id)
        except Exception:
            self.log.exception("%s of lease %s failed; retrying", self._what, lease_id)
            self.arm(lease_id, RETRY_SECONDS)
