"""One fetch at a time: concurrent callers share the request that is already in flight.

The server extension's caches of coordinator answers (:class:`~.offers.OffersCatalog`,
:class:`~.billing.LeaseBook`) are read by every poll of every open Lab tab; when their answer
is stale, one request to the coordinator must serve all of those callers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

__all__ = ["SingleFlight"]

T = TypeVar("T")


class SingleFlight(Generic[T]):
    """Runs ``fetch`` when called and none is running; callers meanwhile await the same run.

    A caller that is cancelled does not cancel the shared run (others may wait on it). A
    failure reaches the callers of that run only, and is retrieved even when none is left,
    so asyncio never reports it as unhandled. :meth:`cancel` stops a run in flight.
    """

    def __init__(self, fetch: Callable[[], Awaitable[T]]) -> None:
        self._fetch = fetch
        self._inflight: asyncio.Future[T] | None = None

    async def __call__(self) -> T:
        if self._inflight is None:
            self._inflight = asyncio.ensure_future(self._fetch())
            self._inflight.add_done_callback(self._clear)
        return await asyncio.shield(self._inflight)

    def _clear(self, future: asyncio.Future[T]) -> None:
        if self._inflight is future:
            self._inflight = None
        if not future.cancelled():
            future.exception()  # retrieved here, so an unawaited failure is not reported

    def cancel(self) -> None:
        """Cancel the run in flight, if any (on close)."""
        if self._inflight is not None:
            self._inflight.cancel()
            self._inflight = None
