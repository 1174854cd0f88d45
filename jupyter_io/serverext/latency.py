"""Round trips for the picker: measured from this server, per provider and best per GPU type.

:class:`LatencyBoard` annotates the coordinator's offers (``GET /jupyter-io/offers``) with
what :func:`~jupyter_io.latency.shared_prober` has measured, the same cache the provisioner
uses before a lease, so the figure the picker shows is the one the lease is chosen on. It
never waits for a measurement: offers not measured yet are sent as such and measured in the
background (a few of the cheapest available offers per type, all at once under one
deadline), after which ``on_measured`` is called so the browser fetches the offers again.

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
from ..latency import Candidate, LatencyProber, Measurement

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
    ) -> None:
        self.prober = prober
        self.on_measured = on_measured
        self.per_type = per_type
        self.limit = limit
        self.timeout = timeout
        self._task: asyncio.Task[None] | None = None

    def annotate(
        self, types: list[dict[str, Any]], providers: list[dict[str, Any]]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """``types`` and ``providers`` with the latency fields; starts measuring what is not
        measured yet (at most one round at a time)."""
        rows = []
        best: dict[str, Measurement] = {}
        probed: dict[str, int] = {}
        wanted: list[Candidate] = []
        per_type: dict[str, int] = {}
        for row in providers:
            provider = str(row.get("provider") or "")
            gpu = normalise_gpu_name(str(row.get("gpu") or ""))
            found = self.prober.cached(provider) if provider else None
            if found is None:
                if (
                    row.get("free")
                    and per_type.get(gpu, 0) < self.per_type
                    and len(wanted) < self.limit
                ):
                    per_type[gpu] = per_type.get(gpu, 0) + 1
                    wanted.append(Candidate.from_json(row))
            else:
                probed[gpu] = probed.get(gpu, 0) + 1
                ms = found.latency_ms
                if ms is not None:
                    held = best.get(gpu)
                    if held is None or held.latency_ms is None or ms < held.latency_ms:
                        best[gpu] = found
            rows.append(
                {
                    **row,
                    "latency_ms": None
                    if found is None or found.latency_ms is None
                    else round(found.latency_ms, 1),
                    "latency_via_relay": found.via_relay if found is not None else None,
                    "latency_unreachable": found.unreachable if found is not None else None,
                }
            )
        out = []
        for row in types:
            gpu = str(row.get("gpu") or "")
            top = best.get(gpu)
            state = "measured" if top else ("unreachable" if probed.get(gpu) else "pending")
            if state == "unreachable" and per_type.get(gpu):
                state = "pending"  # others of the type are being measured now
            out.append(
                {
                    **row,
                    "latency_ms": None if top is None else round(top.latency_ms or 0.0, 1),
                    "latency_via_relay": None if top is None else top.via_relay,
                    "latency_state": state,
                }
            )
        if wanted:
            self._measure(wanted)
        return out, rows

    def _measure(self, wanted: list[Candidate]) -> None:
        if self._task is not None and not self._task.done():
            return
        self._task = asyncio.ensure_future(self._round(wanted))

    async def _round(self, wanted: list[Candidate]) -> None:
        try:
            await self.prober.measure(wanted, probes=len(wanted), timeout=self.timeout)
        except Exception:  # a probe never fails the picker
            _LOG.warning("jupyter-io: measuring round trips failed", exc_info=True)
            return
        self.on_measured()

    def close(self) -> None:
        """Stop a round in progress."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
