"""Round trips for the picker: measured from this server, per provider and best per GPU type.

:class:`LatencyBoard` annotates the coordinator's offers (``GET /jupyter-io/offers``) with
what :func:`~jupyter_io.latency.shared_prober` has measured, the same cache the provisioner
uses before a lease, so the figure the picker shows is the one the lease is chosen on. It
never waits for a measurement: offers not measured yet are sent as such and measured in the
background (a few of the cheapest available offers per type, all at once under one
deadline, and twice more in the next seconds keeping the faster figures), after each of which
``on_measured`` is called so the browser fetches the offers again.

Per type the body gains ``latency_ms`` (the best measured round trip, ms, or None),
``latency_via_relay`` (that figure went through the coordinator's relay) and
``latency_state``: ``measured``, ``unreachable`` (every provider probed failed to answer in
time) or ``pending`` (not measured yet). Per provider row: ``latency_ms``,
``latency_via_relay``, ``latency_unreachable``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from ..gpu_names import normalise_gpu_name
from ..latency import Candidate, LatencyProber, annotate_offers

__all__ = ["LatencyBoard"]

_LOG = logging.getLogger("jupyter_io.serverext")


class LatencyBoard:
    """See the module docstring. ``per_type`` offers of each type (cheapest available first)
    and ``limit`` in all are probed per round, within ``timeout`` seconds."""

    def __init__(
        self,
        prober: LatencyProber,
        *,
        on_measured: Callable[[], None],
        per_type: int = 4,
        limit: int = 16,
        timeout: float | None = None,
        refine_after: tuple[float, ...] = (3.0, 10.0),
    ) -> None:
        self.prober = prober
        self.on_measured = on_measured
        self.per_type = per_type
        self.limit = limit
        self.timeout = timeout
        self.refine_after = refine_after
        self._task: asyncio.Task[None] | None = None

    def annotate(
        self, types: list[dict[str, Any]], providers: list[dict[str, Any]]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """``types`` and ``providers`` with the latency fields
        (:func:`~jupyter_io.latency.annotate_offers`); starts measuring what is not
        measured yet (at most one round at a time)."""
        wanted: list[Candidate] = []
        per_type: dict[str, int] = {}
        for row in providers:
            provider = str(row.get("provider") or "")
            gpu = normalise_gpu_name(str(row.get("gpu") or ""))
            if (
                provider
                and row.get("free")
                and self.prober.cached(provider) is None
                and per_type.get(gpu, 0) < self.per_type
                and len(wanted) < self.limit
            ):
                per_type[gpu] = per_type.get(gpu, 0) + 1
                wanted.append(Candidate.from_json(row))
        if wanted:
            self._measure(wanted)
        return annotate_offers(types, providers, self.prober.cached, probing=per_type)

    def _measure(self, wanted: list[Candidate]) -> None:
        if self._task is not None and not self._task.done():
            return
        self._task = asyncio.ensure_future(self._round(wanted))

    async def _round(self, wanted: list[Candidate]) -> None:
        """Measure ``wanted``, then again ``refine_after`` seconds later (each delay after
        the previous round) keeping the faster figures: the first round often runs while the
        page loads and this server is busy, which only ever adds to a round trip."""
        for delay in (None, *self.refine_after):
            refine = delay is not None
            if delay is not None:
                await asyncio.sleep(delay)
            try:
                await self.prober.measure(
                    wanted, probes=len(wanted), timeout=self.timeout, refine=refine
                )
            except Exception:  # a probe never fails the picker
                _LOG.warning("jupyter-io: measuring round trips failed", exc_info=True)
                return
            self.on_measured()

    def close(self) -> None:
        """Stop a round in progress."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
