"""The coordinator's part in measuring latency: where users ping, and what they may send.

The coordinator never measures a user's latency and never takes a provider's word for one.
It tells users *what to ping* for each offer (:class:`ProbeDirectory`: the provider's own
tunnel endpoint, or the relay that would carry the session together with the coordinator's
own measured hop to the provider, labelled ``via_relay``), answers the candidates request
(:func:`candidates_json`), and reads the figures a lease request carries
(:func:`parse_latencies`) for the scheduler. The ping itself is :mod:`jupyter_io.ping`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from .scheduler import LeaseRequest, Offer, OfferIndex

__all__ = [
    "DEFAULT_CANDIDATE_LIMIT",
    "MAX_CANDIDATE_LIMIT",
    "MAX_LATENCIES",
    "MAX_LATENCY_MS",
    "ProbeDirectory",
    "candidates_json",
    "parse_latencies",
    "parse_max_latency",
]

#: Candidates returned when the request does not say how many.
DEFAULT_CANDIDATE_LIMIT = 8
#: The most candidates one request may ask for.
MAX_CANDIDATE_LIMIT = 16
#: The most providers a lease request's ``latency_ms`` may name.
MAX_LATENCIES = 64
#: The largest latency a request may state or cap at, ms (a minute: anything more is a bug).
MAX_LATENCY_MS = 60_000.0


class ProbeDirectory:
    """What a user pings to measure each offer (see the module docstring).

    ``relay_url`` is the relay's base URL (``ws(s)://HOST:PORT/relay``); ``hop_ms`` gives the
    coordinator's latest round trip to a provider over its link (None: not measured yet).
    """

    def __init__(self, relay_url: str, hop_ms: Callable[[str], float | None]) -> None:
        self.relay_url = relay_url
        self.hop_ms = hop_ms

    def fields(self, offer: Offer) -> dict[str, Any]:
        """``{"probe_url", "via_relay", "relay_hop_ms"}`` for ``offer``: ping ``probe_url``
        (its path plus ``/ping``); for a relayed offer add ``relay_hop_ms`` to the result."""
        if offer.reachable_url is not None:
            return {"probe_url": offer.reachable_url, "via_relay": False, "relay_hop_ms": None}
        hop = self.hop_ms(offer.provider)
        return {
            "probe_url": self.relay_url,
            "via_relay": True,
            "relay_hop_ms": None if hop is None else round(hop, 3),
        }


def candidates_json(
    index: OfferIndex, request: LeaseRequest, directory: ProbeDirectory, limit: int
) -> dict[str, Any]:
    """The body of ``GET /api/v1/offers/candidates``: the first ``limit`` offers the scheduler
    would consider for ``request`` (the cheapest eligible ones, latency aside), each with
    what to ping. Empty when nothing fits (the lease request then says why)."""
    found = index.candidates(request, limit=limit)
    return {
        "candidates": [
            {
                "provider": offer.provider,
                "gpu": offer.gpu,
                "price_lamports_per_hour": offer.price_lamports_per_hour,
                "region": offer.region,
                "free": offer.gpus_free,
                **directory.fields(offer),
            }
            for offer in found
        ]
    }


def _milliseconds(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number of milliseconds")
    ms = float(value)
    if not math.isfinite(ms) or not 0.0 <= ms <= MAX_LATENCY_MS:
        raise ValueError(f"{what} must be between 0 and {MAX_LATENCY_MS:g} ms")
    return ms


def parse_max_latency(value: Any) -> float | None:
    """A lease request's ``max_latency_ms`` (None: no cap); :class:`ValueError` if bad."""
    return None if value is None else _milliseconds(value, "'max_latency_ms'")


def parse_latencies(value: Any) -> dict[str, float]:
    """A lease request's ``latency_ms``: ``{provider key: ms}`` as the user measured it (at
    most :data:`MAX_LATENCIES` entries); :class:`ValueError` naming what is wrong.

    These figures only steer the user's own lease: whoever sends them decides for nobody else.
    """
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError("'latency_ms' must be an object of provider key -> milliseconds")
    if len(value) > MAX_LATENCIES:
        raise ValueError(f"'latency_ms' may name at most {MAX_LATENCIES} providers")
    found: dict[str, float] = {}
    for provider, ms in value.items():
        if not isinstance(provider, str) or not 32 <= len(provider) <= 44:
            raise ValueError("'latency_ms' keys must be providers' base58 public keys")
        found[provider] = _milliseconds(ms, f"latency_ms[{provider!r}]")
    return found
