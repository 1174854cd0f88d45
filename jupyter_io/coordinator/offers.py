"""What is on offer: the body of ``GET /api/v1/offers`` and the ``jupyter io offers`` table.

:func:`offers_json` reads the scheduler's :class:`~jupyter_io.coordinator.scheduler.OfferIndex`
(aggregates by GPU type come from :meth:`OfferIndex.summary`, kept incrementally; the per
provider rows are one pass over the offers). :class:`OffersCache` serves the same encoded body
for ``ttl`` seconds, so a crowd of pickers costs one pass per ``ttl``.
:func:`format_offers_table` renders a body for people; simulated GPUs are always marked.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from ..payments.amounts import format_sol
from .latency import ProbeDirectory
from .scheduler import Offer, OfferIndex

__all__ = ["OffersCache", "format_offers_table", "offers_json", "reliability_json"]


def reliability_json(offer: Offer) -> dict[str, Any] | None:
    """An offer's ``reliability``: ``{"score", "sessions", "lost", "uptime", "since"}`` of its
    provider's 30-day record, or None when the provider is not measured (no record)."""
    if not offer.reliability_measured:
        return None
    if offer.reliability_detail is not None:
        return dict(offer.reliability_detail)
    return {"score": round(offer.reliability, 4)}


def offers_json(
    index: OfferIndex,
    directory: ProbeDirectory | None = None,
    verification: Callable[[Offer], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """``{"types": [...], "providers": [...]}`` as ``docs/coordinator-contract.md`` says.

    ``types`` per GPU model (``gpu`` is the model key a lease request can name, ``display``
    the name for people; ``available`` / ``total`` count GPUs; prices are lamports per
    GPU-hour over offers with a GPU free, ``None`` when none is; ``reliability`` the mean
    score of its measured offers, ``None`` when none is measured); ``providers`` one row per
    provider offer, cheapest first within a model, with its ``reliability``
    (:func:`reliability_json`) and what to ping to measure it
    (``probe_url``, ``via_relay``, ``relay_hop_ms``) when ``directory`` is given, and its
    GPU challenge verdict (``verified`` true/false/null, ``verified_at``) when
    ``verification`` is (:meth:`GpuChallenges.fields
    <jupyter_io.coordinator.challenges.GpuChallenges.fields>`).
    """
    offers = sorted(index, key=lambda o: (o.gpu_key, o.price_lamports_per_hour, o.provider))
    vram: dict[str, int] = {}
    for offer in offers:
        vram[offer.gpu_key] = max(vram.get(offer.gpu_key, 0), offer.vram_bytes)
    types = [
        {
            "gpu": row.gpu_key,
            "display": row.gpu,
            "vram_bytes": vram.get(row.gpu_key, 0),
            "offers": row.offers,
            "available": row.gpus_available,
            "total": row.gpus_total,
            "price_min": row.price_min_lamports_per_hour,
            "price_median": row.price_median_lamports_per_hour,
            "regions": list(row.regions),
            "reliability": (
                None if row.mean_reliability is None else round(row.mean_reliability, 4)
            ),
            "benchmark_tflops": row.best_benchmark_tflops,
            "simulated": row.simulated,
        }
        for row in index.summary()
    ]
    providers = [
        {
            "provider": offer.provider,
            "gpu": offer.gpu,
            "vram_bytes": offer.vram_bytes,
            "count": offer.gpus_total,
            "free": offer.gpus_free,
            "price_lamports_per_hour": offer.price_lamports_per_hour,
            "region": offer.region,
            "reliability": reliability_json(offer),
            "benchmark_tflops": offer.benchmark_tflops,
            "simulated": offer.simulated,
            "reachable": offer.reachable_url is not None,
            **(directory.fields(offer) if directory is not None else {}),
            **(verification(offer) if verification is not None else {}),
        }
        for offer in offers
    ]
    return {"types": types, "providers": providers}


class OffersCache:
    """The encoded offers body, rebuilt at most once per ``ttl`` seconds."""

    def __init__(
        self,
        index: OfferIndex,
        *,
        ttl: float = 2.0,
        monotonic: Callable[[], float] = time.monotonic,
        directory: ProbeDirectory | None = None,
        verification: Callable[[Offer], dict[str, Any]] | None = None,
    ) -> None:
        self.index = index
        self.directory = directory
        #: The GPU challenge verdict of an offer (set once the challenge service runs).
        self.verification = verification
        self.ttl = ttl
        self.monotonic = monotonic
        self._body = b""
        self._built = -float("inf")

    def body(self) -> bytes:
        """The JSON body, at most ``ttl`` seconds old."""
        now = self.monotonic()
        if now - self._built >= self.ttl:
            body = offers_json(self.index, self.directory, self.verification)
            self._body = json.dumps(body, separators=(",", ":")).encode()
            self._built = now
        return self._body

    def invalidate(self) -> None:
        """Rebuild on the next :meth:`body` (tests; an operator's refresh)."""
        self._built = -float("inf")


def _sol(lamports: int | None) -> str:
    return "-" if lamports is None else format_sol(lamports).removesuffix(" SOL")


def _reliability(value: Any) -> str:
    """A measured figure as a percentage; "not measured" for None (never 100 %)."""
    if isinstance(value, dict):
        value = value.get("score")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.0%}"
    return "not measured"


def _latency(row: dict[str, Any]) -> str:
    ms = row.get("latency_ms")
    if isinstance(ms, (int, float)):
        return f"{ms:.0f} ms" + (" via relay" if row.get("latency_via_relay") else "")
    return "unreachable" if row.get("latency_state") == "unreachable" else "not measured"


def format_offers_table(body: dict[str, Any]) -> str:
    """A table of ``body["types"]`` for a terminal: one row per GPU type, prices in SOL per
    GPU-hour, ``(simulated)`` after simulated types, and the best round trip measured from
    here when the body carries one (:func:`jupyter_io.latency.annotate_offers`). RELIABILITY
    is the mean 30-day score of the type's measured providers, "not measured" when none has
    a record; a second table lists each provider's offer with its own record. Says so when
    nothing is on offer."""
    types = body.get("types") or []
    if not types:
        return (
            "No GPUs on offer right now: no provider is linked to this coordinator "
            "(start one with `jupyter io provider --coordinator URL`)."
        )
    header: tuple[str, ...] = (
        "GPU", "AVAILABLE", "MIN SOL/h", "MEDIAN SOL/h", "REGIONS", "RELIABILITY", "TFLOPS"
    )  # fmt: skip
    measured = any("latency_state" in row for row in types)
    if measured:
        header += ("LATENCY",)
    rows = [header]
    for row in types:
        name = row["display"] + (" (simulated)" if row.get("simulated") else "")
        tflops = row.get("benchmark_tflops")
        rows.append(
            (
                name,
                f"{row['available']}/{row['total']}",
                _sol(row.get("price_min")),
                _sol(row.get("price_median")),
                ", ".join(row.get("regions") or []) or "-",
                _reliability(row.get("reliability")),
                "-" if tflops is None else f"{tflops:.1f}",
            )
            + ((_latency(row),) if measured else ())
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    right = {1, 2, 3, 5, 6}
    lines = [
        "  ".join(
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(r)
        ).rstrip()
        for r in rows
    ]
    providers = body.get("providers") or []
    lines.append(f"{len(providers)} offer(s) from {len({p['provider'] for p in providers})} "
                 f"provider(s); prices per GPU-hour.")  # fmt: skip
    if providers:
        lines += ["", *_provider_lines(providers)]
    return "\n".join(lines)


def _record(value: Any) -> str:
    """A provider's 30-day record: "97% (31 sessions, 1 lost, up 99.5%)", or "not measured"."""
    if not isinstance(value, dict) or "sessions" not in value:
        return _reliability(value)
    sessions = value["sessions"]
    return (
        f"{_reliability(value)} ({sessions} session{'' if sessions == 1 else 's'}, "
        f"{value['lost']} lost, up {value['uptime']:.1%})"
    )


def _provider_lines(providers: list[dict[str, Any]]) -> list[str]:
    """One line per provider offer, with its measured reliability (30 days)."""
    header = ("PROVIDER", "GPU", "FREE", "SOL/h", "REGION", "RELIABILITY (30 days)")
    rows = [header]
    for row in providers:
        key = str(row.get("provider", ""))
        rows.append(
            (
                key[:8] + "…" if len(key) > 9 else key,
                str(row.get("gpu", "")) + (" (simulated)" if row.get("simulated") else ""),
                f"{row.get('free', 0)}/{row.get('count', 0)}",
                _sol(row.get("price_lamports_per_hour")),
                str(row.get("region") or "-"),
                _record(row.get("reliability")),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return [
        "  ".join(
            cell.rjust(widths[i]) if i in (2, 3) else cell.ljust(widths[i])
            for i, cell in enumerate(r)
        ).rstrip()
        for r in rows
    ]
