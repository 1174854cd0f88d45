"""GPU challenge verdicts: the ``gpu_checks`` table (:class:`GpuCheckQueries`).

The coordinator's challenge service (:mod:`jupyter_io.coordinator.challenges`) writes one row
per judged challenge with :meth:`GpuCheckQueries.record_gpu_check`; a provider's GPU record is
:meth:`GpuCheckQueries.gpu_checks`, newest first.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import cast

import sqlalchemy as sa

from ..models import GpuCheck
from .engine import Aggregate, _when

__all__ = ["GpuCheckQueries", "GpuCheckRecord"]

_checks = cast(sa.Table, GpuCheck.__table__)


@dataclass(frozen=True, slots=True)
class GpuCheckRecord:
    """One row of ``gpu_checks``."""

    provider_pubkey: str
    gpu_model: str
    gpu_index: int
    at: datetime
    ok: bool
    reason: str
    seconds: float | None
    n: int


class GpuCheckQueries(Aggregate):
    """Verdicts of GPU challenges."""

    async def record_gpu_check(
        self,
        provider_pubkey: str,
        gpu_model: str,
        gpu_index: int,
        *,
        ok: bool,
        reason: str,
        seconds: float | None,
        n: int,
        at: datetime | None = None,
    ) -> GpuCheckRecord:
        """Store one verdict (the provider must be in ``providers``)."""
        record = GpuCheckRecord(
            provider_pubkey, gpu_model, gpu_index, _when(at), ok, reason, seconds, n
        )
        async with self._write() as conn:
            await conn.execute(
                sa.insert(_checks).values(
                    provider_pubkey=record.provider_pubkey,
                    gpu_model=record.gpu_model,
                    gpu_index=record.gpu_index,
                    at=record.at,
                    ok=record.ok,
                    reason=record.reason,
                    seconds=record.seconds,
                    n=record.n,
                )
            )
        return record

    async def gpu_checks(self, provider_pubkey: str, *, limit: int = 50) -> list[GpuCheckRecord]:
        """The provider's newest ``limit`` verdicts, newest first."""
        query = (
            sa.select(_checks)
            .where(_checks.c.provider_pubkey == provider_pubkey)
            .order_by(_checks.c.at.desc(), _checks.c.id.desc())
            .limit(limit)
        )
        async with self._read() as conn:
            rows = (await conn.execute(query)).all()
        return [
            GpuCheckRecord(
                row.provider_pubkey,
                row.gpu_model,
                row.gpu_index,
                row.at,
                row.ok,
                row.reason,
                row.seconds,
                row.n,
            )
            for row in rows
        ]
