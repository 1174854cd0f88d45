"""Choosing a provider for a lease: a pure scoring function over an in-memory index of offers.

Nothing here does I/O or reads a clock. The coordinator keeps one :class:`OfferIndex` of the
live offers (fed by provider inventories and heartbeats), and answers a lease request with::

    offer = schedule(index, LeaseRequest(gpu="RTX 4090", max_price_lamports_per_hour=...))
    index.reserve(offer.provider, offer.gpu, request.gpus)   # before signing the lease token

How a decision is made (the *candidate rule*, which the tests check against a brute-force
scan of every offer):

1. An offer is **eligible** for a request when its GPU model matches (names compared after
   :func:`~jupyter_io.gpu_names.normalise_gpu_name`), it has at least the requested VRAM, at
   least ``gpus`` GPUs free, its price per GPU-hour is at most the cap, it is in the requested
   region, its latency to the requester is known and within ``max_latency_ms`` (when the
   request sets one), and its provider's measured reliability is at least
   ``min_reliability`` (when the request sets one; an unmeasured provider never is).
2. The **candidates** are the first ``K`` eligible offers in the order
   ``(price_lamports_per_hour, provider, gpu_key)``: the cheapest ones, ties broken by the
   provider's public key. ``K`` is :data:`DEFAULT_CANDIDATES` (32) unless the caller says.
3. The winner is the candidate with the highest :func:`score`; equal scores go to the earlier
   candidate (cheaper, then smaller provider key), so every decision is deterministic.

Why only the ``K`` cheapest: a lease is requested by type and price, so the user expects
something close to the cheapest offer, while reliability, load and latency should still be
able to lift a slightly dearer, better provider over a flaky bargain. Bounding the candidates
bounds the work of a decision (``K`` scores) however many offers are live: the index keeps
offers sorted by price in *shelves* (one per GPU model, VRAM size, region and free-GPU tier;
and per latency band for offers with a measured latency, and per reliability floor for
measured providers), and a decision merges the few shelves that can match and stops after
``K`` eligible offers.

Updates (:meth:`OfferIndex.upsert`, :meth:`~OfferIndex.update`,
:meth:`~OfferIndex.set_capacity`, :meth:`~OfferIndex.remove`) cost O(1) when the price,
model, VRAM and region are unchanged and the offer stays in the same capacity tier and
latency band (the common heartbeat), and O(log n) amortised otherwise.
:meth:`OfferIndex.summary` answers the offers API from incrementally kept aggregates.

Prices are exact integers of lamports (1 SOL = 10**9 lamports), per GPU-hour.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, bisect_right, insort
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from itertools import chain
from typing import Any

from ..errors import LeaseError
from ..gpu_names import display_gpu_name, gpu_vram_hint, normalise_gpu_name
from ..payments.amounts import format_sol

__all__ = [
    "DEFAULT_CANDIDATES",
    "DEFAULT_WEIGHTS",
    "LATENCY_BANDS",
    "RELIABILITY_FLOORS",
    "TIERS",
    "GpuTypeSummary",
    "LeaseRequest",
    "NoCapacity",
    "Offer",
    "OfferIndex",
    "Weights",
    "is_eligible",
    "normalise_region",
    "schedule",
    "score",
]

#: How many of the cheapest eligible offers a decision scores (see the module docstring).
DEFAULT_CANDIDATES = 32

#: Free-GPU tiers: an offer sits on the tier-``t`` shelf of its group while it has at least
#: ``t`` GPUs free, so a request for ``g`` GPUs walks the highest tier ``<= g`` and rarely
#: skips an offer with too few GPUs free. Offers with no GPU free sit on no shelf at all.
TIERS = (1, 2, 4, 8)

#: Latency bands (ms, upper bounds). Offers with a GPU free and a known ``latency_ms`` also
#: sit on a shelf per band, so a request with ``max_latency_ms`` walks only the bands that
#: can satisfy it instead of skipping every offer that is too far away.
LATENCY_BANDS = (10.0, 20.0, 50.0, 100.0, 200.0, 500.0, float("inf"))

#: Reliability floors. A measured offer with a GPU free also sits on a shelf per floor it
#: reaches, so a request with ``min_reliability`` walks the shelf of the highest floor at or
#: below it instead of skipping every less reliable offer (a request that also sets
#: ``max_latency_ms`` walks the latency shelves and filters reliability on the way).
RELIABILITY_FLOORS = (0.8, 0.9, 0.95, 0.99)


class NoCapacity(LeaseError):
    """Offers match the request but none has the GPUs free now (or they are reserved for a
    class): the request could be served later, so a cohort's request queues on it."""


# --------------------------------------------------------------------------------------------
# Region names


def normalise_region(region: str) -> str:
    """Regions are compared case-insensitively, ignoring surrounding space."""
    return region.strip().lower()


# --------------------------------------------------------------------------------------------
# Offers, requests, weights


@dataclass(frozen=True, slots=True)
class Offer:
    """One provider's offer of one GPU model: what the scheduler chooses between.

    One offer per (provider, GPU model): a host with two models publishes two offers.
    ``price_lamports_per_hour`` is per GPU-hour. ``reliability`` (0..1) is the provider's
    measured figure over 30 days (:mod:`jupyter_io.coordinator.reliability`), or
    :data:`~jupyter_io.coordinator.reliability.UNMEASURED_RELIABILITY` with
    ``reliability_measured`` False for a provider with no record (it never meets a
    ``min_reliability``); ``reliability_detail`` is the figure's JSON for the offers API;
    ``load`` (0..1) is the host's
    reported busyness; ``latency_ms`` is the round trip measured to the requester when known
    (a per-request measurement can also be passed to :func:`schedule`). ``simulated`` offers
    come from ``--simulate-gpu`` and must be labelled as such wherever they are shown.
    """

    provider: str
    gpu: str
    vram_bytes: int
    gpus_total: int
    gpus_free: int
    price_lamports_per_hour: int
    region: str
    reliability: float = 1.0
    load: float = 0.0
    latency_ms: float | None = None
    benchmark_tflops: float | None = None
    simulated: bool = False
    reachable_url: str | None = None
    reliability_measured: bool = True
    reliability_detail: Mapping[str, Any] | None = field(default=None, compare=False)
    gpu_key: str = field(init=False, repr=False, compare=False)
    """:func:`normalise_gpu_name` of ``gpu``, computed once."""

    def __post_init__(self) -> None:
        key = normalise_gpu_name(self.gpu)
        if not self.provider:
            raise ValueError("an offer needs the provider's public key")
        if not key:
            raise ValueError(f"{self.gpu!r} does not name a GPU model")
        if self.vram_bytes <= 0:
            raise ValueError(f"vram_bytes must be positive, not {self.vram_bytes}")
        if not 0 <= self.gpus_free <= self.gpus_total:
            raise ValueError(f"gpus_free={self.gpus_free} is outside 0..{self.gpus_total}")
        if self.price_lamports_per_hour < 0:
            raise ValueError("price_lamports_per_hour cannot be negative")
        if not self.region.strip():
            raise ValueError("an offer needs a region")
        if not 0.0 <= self.reliability <= 1.0 or not 0.0 <= self.load <= 1.0:
            raise ValueError("reliability and load must lie in 0..1")
        if self.latency_ms is not None and self.latency_ms < 0:
            raise ValueError("latency_ms cannot be negative")
        object.__setattr__(self, "gpu_key", key)

    @property
    def key(self) -> tuple[str, str]:
        """``(provider, gpu_key)``: how the index identifies this offer."""
        return (self.provider, self.gpu_key)


@dataclass(frozen=True, slots=True)
class LeaseRequest:
    """What a user asks for. Every field but ``gpus`` is optional.

    ``gpu`` is any spelling of a model (``"rtx-4090"``); a memory size in it (``"A100 80GB"``)
    adds a VRAM minimum. Without ``gpu`` any model with ``min_vram_bytes`` qualifies.
    ``max_price_lamports_per_hour`` caps the price per GPU-hour, the unit offers are quoted in.
    ``min_reliability`` (0..1) skips providers whose measured reliability is lower, and those
    not measured at all (no record in the window: newcomers).
    """

    gpu: str | None = None
    min_vram_bytes: int | None = None
    gpus: int = 1
    max_price_lamports_per_hour: int | None = None
    region: str | None = None
    max_latency_ms: float | None = None
    min_reliability: float | None = None

    def __post_init__(self) -> None:
        if self.min_reliability is not None and not 0.0 <= self.min_reliability <= 1.0:
            raise ValueError("min_reliability must lie in 0..1")
        if self.gpus < 1:
            raise ValueError(f"a lease needs at least one GPU, not {self.gpus}")
        if self.min_vram_bytes is not None and self.min_vram_bytes < 0:
            raise ValueError("min_vram_bytes cannot be negative")
        if self.max_price_lamports_per_hour is not None and self.max_price_lamports_per_hour < 0:
            raise ValueError("max_price_lamports_per_hour cannot be negative")
        if self.max_latency_ms is not None and self.max_latency_ms < 0:
            raise ValueError("max_latency_ms cannot be negative")

    @property
    def vram_floor(self) -> int:
        """The VRAM an offer needs: ``min_vram_bytes`` or the size named in ``gpu``."""
        hint = gpu_vram_hint(self.gpu) if self.gpu else None
        return max(self.min_vram_bytes or 0, hint or 0)


@dataclass(frozen=True, slots=True)
class Weights:
    """How much each term of :func:`score` counts. The defaults, and why:

    * ``price`` 0.4 — the user leases by price and set (or accepted) the cap; it dominates.
    * ``reliability`` 0.3 — a failed session wastes the user's setup and kernel state, which
      costs more than a modestly higher price; enough to beat a 1.5x dearer offer when the
      cheaper one has failed half its sessions. It is the measured 30-day figure
      (:mod:`jupyter_io.coordinator.reliability`: completed sessions x uptime); a provider
      with no record counts as ``UNMEASURED_RELIABILITY`` (0.9). Each 0.1 of reliability is
      worth 0.03 of score: with no price cap, what a 7.5 % dearer offer loses against the
      cheapest (0.4 x (1 - 1/1.075)), or about 9 ms of round trip near 0 ms
      (0.2 x (1 - 1/(1 + 9/50))).
    * ``latency`` 0.2 — notebooks are interactive; every execute pays the round trip.
    * ``load`` 0.1 — a weak signal: hard capacity is already a filter (``gpus_free``), load
      only hints at CPU/network contention on a shared host.

    ``latency_scale_ms`` is the latency that halves the latency term; an offer whose latency
    is unknown is scored as if it were ``unknown_latency_ms`` away (worse than a typical
    measured one, so measuring helps a provider, but not ruinous).
    """

    price: float = 0.4
    reliability: float = 0.3
    latency: float = 0.2
    load: float = 0.1
    latency_scale_ms: float = 50.0
    unknown_latency_ms: float = 100.0

    def __post_init__(self) -> None:
        if min(self.price, self.reliability, self.latency, self.load) < 0:
            raise ValueError("weights cannot be negative")
        if self.latency_scale_ms <= 0 or self.unknown_latency_ms < 0:
            raise ValueError("latency_scale_ms must be positive, unknown_latency_ms >= 0")


#: The weights :func:`schedule` uses unless told otherwise.
DEFAULT_WEIGHTS = Weights()


def _latency_of(offer: Offer, latencies: Mapping[str, float] | None) -> float | None:
    if latencies is not None:
        measured = latencies.get(offer.provider)
        if measured is not None:
            return measured
    return offer.latency_ms


def score(
    offer: Offer,
    request: LeaseRequest,
    weights: Weights = DEFAULT_WEIGHTS,
    *,
    cheapest_price: int | None = None,
    latency_ms: float | None = None,
) -> float:
    """How good ``offer`` is for ``request``: higher is better, between 0 and the weight sum.

    ::

        score = w.price       * price_term
              + w.reliability * reliability
              + w.latency     * 1 / (1 + latency_ms / w.latency_scale_ms)
              + w.load        * (1 - load)

        price_term = 1 - price / cap          when the request has a cap
                   = cheapest / price         otherwise (1 for the cheapest candidate)

    Price is relative to what the user said they would pay: with a cap, an offer at the cap
    scores 0 and a free one 1, so a generous cap (the user cares less about price) lets
    quality count for more; without one, price counts relative to the cheapest candidate
    (``cheapest_price``, required then), a unit-free ratio. ``latency_ms`` overrides the
    offer's own measurement (the requester's, when known); if neither is known the offer is
    scored at ``weights.unknown_latency_ms``. See :class:`Weights` for why each weight.
    Pure: the same arguments always give the same float.
    """
    price = offer.price_lamports_per_hour
    cap = request.max_price_lamports_per_hour
    if cap is not None:
        price_term = 1.0 - price / cap if cap > 0 else 1.0
        price_term = max(price_term, 0.0)
    else:
        if cheapest_price is None:
            raise ValueError("score() needs cheapest_price when the request has no price cap")
        # A free offer has price 0; max(.., 1) keeps the ratio defined (one lamport is nothing).
        price_term = max(cheapest_price, 1) / max(price, 1)
    if latency_ms is None:
        latency_ms = offer.latency_ms
    if latency_ms is None:
        latency_ms = weights.unknown_latency_ms
    latency_term = 1.0 / (1.0 + latency_ms / weights.latency_scale_ms)
    return (
        weights.price * price_term
        + weights.reliability * offer.reliability
        + weights.latency * latency_term
        + weights.load * (1.0 - offer.load)
    )


def is_eligible(
    offer: Offer, request: LeaseRequest, *, latencies: Mapping[str, float] | None = None
) -> bool:
    """Whether ``offer`` may serve ``request`` at all (rule 1 of the module docstring).

    This is the slow, obvious statement of the rule; :class:`OfferIndex` applies the same rule
    without looking at every offer.
    """
    if request.gpu is not None and offer.gpu_key != normalise_gpu_name(request.gpu):
        return False
    if offer.vram_bytes < request.vram_floor or offer.gpus_free < request.gpus:
        return False
    cap = request.max_price_lamports_per_hour
    if cap is not None and offer.price_lamports_per_hour > cap:
        return False
    if request.region is not None and (
        normalise_region(offer.region) != normalise_region(request.region)
    ):
        return False
    if request.max_latency_ms is not None:
        latency = _latency_of(offer, latencies)
        if latency is None or latency > request.max_latency_ms:
            return False
    return _reliable_enough(offer, request.min_reliability)


def _reliable_enough(offer: Offer, minimum: float | None) -> bool:
    return minimum is None or (offer.reliability_measured and offer.reliability >= minimum)


# --------------------------------------------------------------------------------------------
# The index


class _SortedKeys:
    """A sorted list of keys kept in bounded chunks: O(log n) amortised add and remove.

    The standard library has no sorted container; this is the chunked design of
    ``sortedcontainers.SortedList``, cut down to what the index needs.
    """

    __slots__ = ("_len", "_lists", "_maxes")
    _LOAD = 256

    def __init__(self) -> None:
        self._lists: list[list[Any]] = []
        self._maxes: list[Any] = []
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[Any]:
        return chain.from_iterable(self._lists)

    def add(self, key: Any) -> None:
        self._len += 1
        maxes = self._maxes
        if not maxes:
            self._lists.append([key])
            maxes.append(key)
            return
        i = bisect_left(maxes, key)
        if i == len(maxes):
            i -= 1
            self._lists[i].append(key)
            maxes[i] = key
        else:
            insort(self._lists[i], key)
        chunk = self._lists[i]
        if len(chunk) > 2 * self._LOAD:
            tail = chunk[self._LOAD :]
            del chunk[self._LOAD :]
            maxes[i] = chunk[-1]
            self._lists.insert(i + 1, tail)
            maxes.insert(i + 1, tail[-1])

    def remove(self, key: Any) -> None:
        maxes = self._maxes
        i = bisect_left(maxes, key)
        chunk = self._lists[i] if i < len(maxes) else []
        j = bisect_left(chunk, key)
        if j == len(chunk) or chunk[j] != key:
            raise KeyError(key)
        del chunk[j]
        self._len -= 1
        if not chunk:
            del self._lists[i]
            del maxes[i]
        elif j == len(chunk):
            maxes[i] = chunk[-1]

    def __getitem__(self, index: int) -> Any:
        if index < 0:
            index += self._len
        if not 0 <= index < self._len:
            raise IndexError(index)
        for chunk in self._lists:
            if index < len(chunk):
                return chunk[index]
            index -= len(chunk)
        raise IndexError(index)  # pragma: no cover - lengths are consistent


@dataclass(frozen=True, slots=True)
class GpuTypeSummary:
    """One row of the offers API: every live offer of one GPU model, aggregated.

    Prices are over offers with at least one GPU free (``None`` when none is); the median of
    an even count is the mean of the two middle prices, rounded down to a whole lamport.
    """

    gpu: str
    """Display name (:func:`display_gpu_name`)."""
    gpu_key: str
    offers: int
    gpus_total: int
    gpus_available: int
    price_min_lamports_per_hour: int | None
    price_median_lamports_per_hour: int | None
    regions: tuple[str, ...]
    mean_reliability: float | None
    """Mean over the measured offers (None when no offer of the type is measured)."""
    best_benchmark_tflops: float | None
    simulated: bool
    """True when any offer of this type is simulated: show it as such."""


class _TypeStats:
    """Aggregates of one GPU model, kept up to date offer by offer."""

    __slots__ = (
        "available_prices",
        "benchmarks",
        "display",
        "gpus_free",
        "gpus_total",
        "measured",
        "offers",
        "regions",
        "reliability_micros",
        "simulated",
    )

    def __init__(self, display: str) -> None:
        self.display = display
        self.offers = 0
        self.gpus_total = 0
        self.gpus_free = 0
        # Integer micro-units: sums of floats drift after millions of heartbeats, ints do not.
        self.reliability_micros = 0  # over measured offers
        self.measured = 0
        self.simulated = 0
        self.regions: Counter[str] = Counter()
        self.available_prices = _SortedKeys()  # (price, provider) of offers with a GPU free
        self.benchmarks = _SortedKeys()  # (tflops, provider) of offers that measured one


_GroupKey = tuple[int, str]  # (vram_bytes, region key) within one GPU model
# (gpu_key, vram_bytes, region key, tier, band). Two families of shelves share the dict:
# capacity shelves have band _ANY_BAND; latency shelves a band index into LATENCY_BANDS;
# reliability shelves _FLOOR_BAND - k for RELIABILITY_FLOORS[k].
_ShelfKey = tuple[str, int, str, int, int]
_Item = tuple[int, str, str]  # (price, provider, gpu_key): the order candidates come in
_ANY_BAND = -1
_FLOOR_BAND = -2


def _places(offer: Offer, region: str) -> list[_ShelfKey]:
    """The shelves ``offer`` sits on: none while it has no GPU free."""
    gpu_key, vram = offer.gpu_key, offer.vram_bytes
    tiers = TIERS[: bisect_right(TIERS, offer.gpus_free)]
    places = [(gpu_key, vram, region, tier, _ANY_BAND) for tier in tiers]
    if offer.latency_ms is not None:
        band = bisect_left(LATENCY_BANDS, offer.latency_ms)
        places += [(gpu_key, vram, region, tier, band) for tier in tiers]
    if offer.reliability_measured:
        reached = bisect_right(RELIABILITY_FLOORS, offer.reliability)
        places += [
            (gpu_key, vram, region, tier, _FLOOR_BAND - k)
            for k in range(reached)
            for tier in tiers
        ]
    return places


class OfferIndex:
    """The live offers, indexed so a decision looks at a bounded number of them.

    Feed it from provider inventories and heartbeats: :meth:`upsert` when a provider publishes
    an offer, :meth:`set_capacity` / :meth:`update` on heartbeats, :meth:`remove_provider`
    when a provider is lost. Ask it with :func:`schedule` (decisions), :meth:`candidates`
    (the documented candidate rule) and :meth:`summary` (the offers API). Not thread-safe:
    use it from the coordinator's event loop.
    """

    def __init__(self, offers: Iterable[Offer] = ()) -> None:
        self._offers: dict[tuple[str, str], Offer] = {}
        self._by_provider: dict[str, set[str]] = {}
        # gpu_key -> (vram, region) -> number of offers, whatever their capacity.
        self._groups: dict[str, dict[_GroupKey, int]] = {}
        self._region_names: dict[str, str] = {}
        self._shelves: dict[_ShelfKey, _SortedKeys] = {}
        self._stats: dict[str, _TypeStats] = {}
        # gpu_key -> {cohort id: GPUs held back for its reservation} (see :meth:`hold`).
        self._held: dict[str, dict[str, int]] = {}
        for offer in offers:
            self.upsert(offer)

    # -- reading ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._offers)

    def __iter__(self) -> Iterator[Offer]:
        return iter(list(self._offers.values()))

    def __contains__(self, key: object) -> bool:
        return key in self._offers

    def get(self, provider: str, gpu: str) -> Offer | None:
        """The offer of ``provider`` for ``gpu`` (any spelling), or None."""
        return self._offers.get((provider, normalise_gpu_name(gpu)))

    def offers_of(self, provider: str) -> list[Offer]:
        """Every offer of one provider, by GPU key."""
        keys = sorted(self._by_provider.get(provider, ()))
        return [self._offers[(provider, k)] for k in keys]

    def gpu_types(self) -> dict[str, str]:
        """``{gpu_key: display name}`` of every model on offer, at capacity or not."""
        return {key: stats.display for key, stats in sorted(self._stats.items())}

    # -- writing ---------------------------------------------------------------------------

    def upsert(self, offer: Offer) -> Offer | None:
        """Add ``offer`` or replace the provider's offer of that model; return the old one.

        O(1) when price, VRAM and region are unchanged and the free-GPU tier and latency band
        stay the same; O(log n) amortised otherwise.
        """
        key = offer.key
        old = self._offers.get(key)
        if old is None:
            self._insert(offer)
        elif (
            old.price_lamports_per_hour == offer.price_lamports_per_hour
            and old.vram_bytes == offer.vram_bytes
            and (region := normalise_region(offer.region)) == normalise_region(old.region)
        ):
            self._offers[key] = offer
            self._move(old, offer, region)
            self._restat(old, offer)
        else:
            self._delete(old)
            self._insert(offer)
        return old

    def update(self, provider: str, gpu: str, /, **changes: Any) -> Offer:
        """Change fields of an existing offer (``load=0.3``, ``reliability=...``); return it.

        Raises :class:`KeyError` when the provider has no offer of ``gpu``, and
        :class:`ValueError` for a change of provider or GPU model (that is another offer:
        :meth:`remove` this one and :meth:`upsert` the new one).
        """
        old = self._offers[(provider, normalise_gpu_name(gpu))]
        new = replace(old, **changes)
        if new.key != old.key:
            raise ValueError(f"update() cannot turn offer {old.key} into {new.key}")
        self.upsert(new)
        return new

    def set_capacity(self, provider: str, gpu: str, gpus_free: int) -> Offer:
        """Record how many GPUs ``provider`` has free for ``gpu`` (a heartbeat); return it."""
        return self.update(provider, gpu, gpus_free=gpus_free)

    def reserve(self, provider: str, gpu: str, gpus: int) -> Offer:
        """Take ``gpus`` GPUs of a chosen offer until the provider's next heartbeat says more.

        Call right after :func:`schedule`, before signing the lease token, so two concurrent
        requests cannot both get the last GPU. Raises :class:`LeaseError` if the offer has
        gone or no longer has enough GPUs free (schedule again).
        """
        offer = self.get(provider, gpu)
        if offer is None:
            raise LeaseError(f"provider {provider} no longer offers {gpu}; request the lease again")
        if offer.gpus_free < gpus:
            raise LeaseError(
                f"provider {provider} has {offer.gpus_free} {gpu} free, not {gpus}; "
                f"request the lease again"
            )
        return self.set_capacity(provider, gpu, offer.gpus_free - gpus)

    def release(self, provider: str, gpu: str, gpus: int) -> Offer | None:
        """Give back GPUs of an ended lease (up to the offer's total); None if it has gone."""
        offer = self.get(provider, gpu)
        if offer is None:
            return None
        return self.set_capacity(provider, gpu, min(offer.gpus_total, offer.gpus_free + gpus))

    def remove(self, provider: str, gpu: str) -> Offer | None:
        """Withdraw one offer; return it, or None if there was none."""
        old = self._offers.get((provider, normalise_gpu_name(gpu)))
        if old is not None:
            self._delete(old)
        return old

    def remove_provider(self, provider: str) -> list[Offer]:
        """Withdraw every offer of a provider (it disconnected or was marked lost)."""
        removed = self.offers_of(provider)
        for offer in removed:
            self._delete(offer)
        return removed

    def hold(self, cohort: str, gpu: str, gpus: int) -> None:
        """Hold ``gpus`` free GPUs of model ``gpu`` back for ``cohort`` (its reservation's
        unused part; 0 releases): every other request sees the model's free GPUs minus what
        is held for others. O(1); a decision checks only the held models."""
        key = normalise_gpu_name(gpu)
        holds = self._held.setdefault(key, {})
        if gpus > 0:
            holds[cohort] = gpus
        else:
            holds.pop(cohort, None)
            if not holds:
                del self._held[key]

    def held(self, gpu: str, cohort: str | None = None) -> int:
        """GPUs of model ``gpu`` held back from ``cohort`` (from everyone for None)."""
        holds = self._held.get(normalise_gpu_name(gpu), {})
        return sum(n for c, n in holds.items() if c != cohort)

    def _blocked(self, request: LeaseRequest, cohort: str | None) -> set[str]:
        """Models whose free GPUs, less the holds for other cohorts, cannot serve it."""
        blocked = set()
        for key, holds in self._held.items():
            stats = self._stats.get(key)
            others = sum(n for c, n in holds.items() if c != cohort)
            if others and stats is not None and stats.gpus_free - others < request.gpus:
                blocked.add(key)
        return blocked

    # -- deciding --------------------------------------------------------------------------

    def candidates(
        self,
        request: LeaseRequest,
        *,
        limit: int = DEFAULT_CANDIDATES,
        latencies: Mapping[str, float] | None = None,
        cohort: str | None = None,
    ) -> list[Offer]:
        """The first ``limit`` eligible offers in ``(price, provider, gpu_key)`` order.

        This is rule 2 of the module docstring; :func:`schedule` scores what it returns.
        Only shelves that can match are merged, and the walk stops at ``limit`` offers or at
        the price cap. Per-request filters the shelves cannot pre-sort (latency, a GPU count
        between tiers) may skip offers on the way. A model whose free GPUs are held back for
        other cohorts' reservations (:meth:`hold`; ``cohort`` is the requester's) is skipped.
        """
        return list(
            self._walk(request, request.max_price_lamports_per_hour, latencies, limit, cohort)
        )

    def _walk(
        self,
        request: LeaseRequest,
        cap: int | None,
        latencies: Mapping[str, float] | None,
        limit: int,
        cohort: str | None = None,
        holds: bool = True,
    ) -> Iterator[Offer]:
        if limit <= 0:
            return
        groups = self._matching_groups(request)
        if holds and self._held and (blocked := self._blocked(request, cohort)):
            groups = [g for g in groups if g[0] not in blocked]
        max_latency = request.max_latency_ms
        sources: list[Iterable[_Item]]
        measured: set[str] = set()
        tier = TIERS[bisect_right(TIERS, request.gpus) - 1]
        minimum = request.min_reliability
        floor = bisect_right(RELIABILITY_FLOORS, minimum) if minimum is not None else 0
        if max_latency is None and floor:
            band = _FLOOR_BAND - (floor - 1)  # the highest floor at or below the minimum
            keys = [(g, vram, region, tier, band) for g, vram, region in groups]
        elif max_latency is None:
            keys = [(g, vram, region, tier, _ANY_BAND) for g, vram, region in groups]
        else:
            top = bisect_left(LATENCY_BANDS, max_latency)
            keys = [(g, v, region, tier, b) for g, v, region in groups for b in range(top + 1)]
        sources = [shelf for key in keys if (shelf := self._shelves.get(key))]
        if max_latency is not None and latencies:
            # The requester's own measurements override the offers' latency, so its providers
            # may sit in any band (or none): add them directly, in candidate order.
            measured = {p for p, ms in latencies.items() if ms <= max_latency}
            wanted = set(groups)
            direct = sorted(
                (o.price_lamports_per_hour, p, g)
                for p in measured
                for g in self._by_provider.get(p, ())
                if ((o := self._offers[(p, g)]).gpu_key, o.vram_bytes, normalise_region(o.region))
                in wanted
            )
            if direct:
                sources.append(direct)
        if not sources:
            return
        merged = iter(sources[0]) if len(sources) == 1 else heapq.merge(*sources)
        offers = self._offers
        gpus = request.gpus
        found = 0
        last: _Item | None = None
        for item in merged:
            price, provider, gpu_key = item
            if cap is not None and price > cap:
                return
            offer = offers[(provider, gpu_key)]
            if offer.gpus_free < gpus:
                continue
            if minimum is not None and not _reliable_enough(offer, minimum):
                continue
            if max_latency is not None:
                if provider in measured:
                    if item == last:  # on a band shelf and in the requester's list
                        continue
                    last = item
                latency = _latency_of(offer, latencies)
                if latency is None or latency > max_latency:
                    continue
            yield offer
            found += 1
            if found == limit:
                return

    def _matching_groups(self, request: LeaseRequest) -> list[tuple[str, int, str]]:
        """(gpu_key, vram, region) groups that pass the request's model, VRAM and region."""
        floor = request.vram_floor
        region = normalise_region(request.region) if request.region is not None else None
        if request.gpu is not None:
            gpu_key = normalise_gpu_name(request.gpu)
            models: Iterable[tuple[str, dict[_GroupKey, int]]] = (
                ((gpu_key, self._groups[gpu_key]),) if gpu_key in self._groups else ()
            )
        else:
            models = self._groups.items()
        return [
            (gpu_key, vram, reg)
            for gpu_key, groups in models
            for vram, reg in groups
            if vram >= floor and (region is None or reg == region)
        ]

    def explain(
        self,
        request: LeaseRequest,
        *,
        latencies: Mapping[str, float] | None = None,
        cohort: str | None = None,
    ) -> LeaseError:
        """Why nothing is eligible for ``request``, as an error that says what to change.

        Checks the filters in the order a user can act on them: GPU type, VRAM, region,
        capacity, latency, price. Call only after :meth:`candidates` came back empty.
        """
        what = self._describe(request)
        if not self._offers:
            return LeaseError(
                "no GPUs are on offer right now (no provider is connected); start one with "
                "`jupyter io provider --coordinator URL` or try again later"
            )
        types = ", ".join(sorted(s.display for s in self._stats.values()))
        gpu_key = normalise_gpu_name(request.gpu) if request.gpu is not None else None
        if request.gpu is not None and gpu_key not in self._groups:
            return LeaseError(
                f"no provider offers a GPU called {request.gpu!r}; GPU types on offer: "
                f"{types}. Ask for one of these (any spelling, e.g. 'rtx-4090', works)"
            )
        models = [gpu_key] if gpu_key is not None else list(self._groups)
        groups = [(m, vram, reg) for m in models for vram, reg in self._groups[m]]
        floor = request.vram_floor
        if not any(vram >= floor for _, vram, _ in groups):
            largest, biggest_model = max((vram, m) for m, vram, _ in groups)
            return LeaseError(
                f"no {what} on offer has {_gb(floor)} of VRAM; the largest is "
                f"{_gb(largest)} ({self._stats[biggest_model].display}). Lower min_vram or "
                f"ask for another GPU type"
            )
        groups = [g for g in groups if g[1] >= floor]
        if request.region is not None:
            region = normalise_region(request.region)
            if not any(reg == region for _, _, reg in groups):
                where = ", ".join(sorted({self._region_names[reg] for _, _, reg in groups}))
                return LeaseError(
                    f"no {what} is offered in region {request.region!r}; it is offered in: "
                    f"{where}. Change or drop the region"
                )
        unlimited = replace(request, max_latency_ms=None)
        if request.min_reliability is not None and next(
            self._walk(unlimited, None, None, 1, holds=False), None
        ) is None:
            anyone = replace(unlimited, min_reliability=None)
            if next(self._walk(anyone, None, None, 1, holds=False), None) is not None:
                return LeaseError(
                    f"no available {what} has a measured reliability of at least "
                    f"{request.min_reliability:.0%} (a provider with no record in the last "
                    f"30 days is not measured and never meets a minimum); lower or drop "
                    f"min_reliability"
                )
        if next(self._walk(unlimited, None, None, 1, cohort), None) is None:
            free = next(self._walk(unlimited, None, None, 1, holds=False), None)
            if free is not None:
                return NoCapacity(
                    f"the free {what} GPUs are reserved for a class's session right now; try "
                    f"again after it, or choose another type ({types})"
                )
            offers = sum(
                self._groups[m][(vram, reg)] for m, vram, reg in self._matching_groups(request)
            )
            need = "a GPU" if request.gpus == 1 else f"{request.gpus} GPUs"
            return NoCapacity(
                f"all {offers} {what} offers are at capacity (none has {need} free right now); "
                f"try again shortly, ask for fewer GPUs, or choose another type ({types})"
            )
        cheapest = next(self._walk(request, None, latencies, 1, cohort), None)
        if cheapest is None:
            return LeaseError(
                f"no available {what} is within {request.max_latency_ms:g} ms of you (or has "
                f"a measured latency yet); raise or drop max_latency_ms"
            )
        cap = request.max_price_lamports_per_hour
        price = cheapest.price_lamports_per_hour
        if cap is not None and price > cap:
            near = f" within {request.max_latency_ms:g} ms" if request.max_latency_ms else ""
            return LeaseError(
                f"cheapest available {what}{near} is {format_sol(price)}/h per GPU, above your cap "
                f"of {format_sol(cap)}/h; raise max_price_per_hour"
            )
        return LeaseError(f"no {what} matches the request")  # pragma: no cover - defensive

    def _describe(self, request: LeaseRequest) -> str:
        if request.gpu is None:
            return "GPU"
        stats = self._stats.get(normalise_gpu_name(request.gpu))
        return stats.display if stats is not None else request.gpu

    # -- the offers API --------------------------------------------------------------------

    def summary(self) -> list[GpuTypeSummary]:
        """Per GPU model: offers, GPUs available, price min/median, regions, reliability,
        best benchmark and whether any offer is simulated; sorted by display name.

        Costs O(models x (regions + chunks)), independent of the number of offers.
        """
        rows = []
        for gpu_key, s in self._stats.items():
            prices = s.available_prices
            n = len(prices)
            median: int | None = None
            if n:
                low = prices[(n - 1) // 2][0]
                median = low if n % 2 else (low + prices[n // 2][0]) // 2
            rows.append(
                GpuTypeSummary(
                    gpu=s.display,
                    gpu_key=gpu_key,
                    offers=s.offers,
                    gpus_total=s.gpus_total,
                    gpus_available=s.gpus_free,
                    price_min_lamports_per_hour=prices[0][0] if n else None,
                    price_median_lamports_per_hour=median,
                    regions=tuple(sorted(self._region_names[r] for r in s.regions)),
                    mean_reliability=(
                        s.reliability_micros / s.measured / 1e6 if s.measured else None
                    ),
                    best_benchmark_tflops=s.benchmarks[-1][0] if len(s.benchmarks) else None,
                    simulated=s.simulated > 0,
                )
            )
        rows.sort(key=lambda row: (row.gpu, row.gpu_key))
        return rows

    # -- bookkeeping -----------------------------------------------------------------------

    def _insert(self, offer: Offer) -> None:
        gpu_key = offer.gpu_key
        region = normalise_region(offer.region)
        self._offers[offer.key] = offer
        self._by_provider.setdefault(offer.provider, set()).add(gpu_key)
        groups = self._groups.setdefault(gpu_key, {})
        group = (offer.vram_bytes, region)
        groups[group] = groups.get(group, 0) + 1
        self._region_names.setdefault(region, offer.region.strip())
        item = (offer.price_lamports_per_hour, offer.provider, gpu_key)
        for place in _places(offer, region):
            self._shelf_add(place, item)
        display = display_gpu_name(offer.gpu)
        stats = self._stats.get(gpu_key)
        if stats is None:
            stats = self._stats[gpu_key] = _TypeStats(display)
        elif (-display.count(" "), display) < (-stats.display.count(" "), stats.display):
            # Prefer the most spaced-out spelling ("RTX 4090" over "RTX4090"), whoever came first.
            stats.display = display
        stats.offers += 1
        stats.regions[region] += 1
        self._restat(None, offer)

    def _delete(self, offer: Offer) -> None:
        gpu_key = offer.gpu_key
        region = normalise_region(offer.region)
        del self._offers[offer.key]
        models = self._by_provider[offer.provider]
        models.discard(gpu_key)
        if not models:
            del self._by_provider[offer.provider]
        groups = self._groups[gpu_key]
        group = (offer.vram_bytes, region)
        groups[group] -= 1
        if not groups[group]:
            del groups[group]
        item = (offer.price_lamports_per_hour, offer.provider, gpu_key)
        for place in _places(offer, region):
            self._shelf_remove(place, item)
        stats = self._stats[gpu_key]
        self._restat(offer, None)
        stats.offers -= 1
        stats.regions[region] -= 1
        if not stats.regions[region]:
            del stats.regions[region]
        if not groups:
            del self._groups[gpu_key]
            del self._stats[gpu_key]

    def _shelf_add(self, shelf_key: _ShelfKey, item: _Item) -> None:
        shelf = self._shelves.get(shelf_key)
        if shelf is None:
            shelf = self._shelves[shelf_key] = _SortedKeys()
        shelf.add(item)

    def _shelf_remove(self, shelf_key: _ShelfKey, item: _Item) -> None:
        shelf = self._shelves[shelf_key]
        shelf.remove(item)
        if not len(shelf):
            del self._shelves[shelf_key]

    def _move(self, old: Offer, new: Offer, region: str) -> None:
        """Move an offer between shelves when only its capacity or latency changed."""
        if (
            old.gpus_free == new.gpus_free
            and old.latency_ms == new.latency_ms
            and old.reliability == new.reliability
            and old.reliability_measured == new.reliability_measured
        ):
            return  # the heartbeat that changes nothing the shelves care about
        before = _places(old, region)
        after = _places(new, region)
        if before == after:
            return
        item = (new.price_lamports_per_hour, new.provider, new.gpu_key)
        for place in before:
            if place not in after:
                self._shelf_remove(place, item)
        for place in after:
            if place not in before:
                self._shelf_add(place, item)

    def _restat(self, old: Offer | None, new: Offer | None) -> None:
        """Move the per-model aggregates from ``old`` to ``new`` (either may be None)."""
        either = new if new is not None else old
        if either is None:
            return
        stats = self._stats[either.gpu_key]
        if old is not None:
            stats.gpus_total -= old.gpus_total
            stats.gpus_free -= old.gpus_free
            if old.reliability_measured:
                stats.measured -= 1
                stats.reliability_micros -= round(old.reliability * 1e6)
            stats.simulated -= old.simulated
            if old.gpus_free and not (new and new.gpus_free):
                stats.available_prices.remove((old.price_lamports_per_hour, old.provider))
            if old.benchmark_tflops is not None and (
                new is None or new.benchmark_tflops != old.benchmark_tflops
            ):
                stats.benchmarks.remove((old.benchmark_tflops, old.provider))
        if new is not None:
            stats.gpus_total += new.gpus_total
            stats.gpus_free += new.gpus_free
            if new.reliability_measured:
                stats.measured += 1
                stats.reliability_micros += round(new.reliability * 1e6)
            stats.simulated += new.simulated
            if new.gpus_free and not (old and old.gpus_free):
                stats.available_prices.add((new.price_lamports_per_hour, new.provider))
            if new.benchmark_tflops is not None and (
                old is None or old.benchmark_tflops != new.benchmark_tflops
            ):
                stats.benchmarks.add((new.benchmark_tflops, new.provider))


def _gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:.3g} GB"


def schedule(
    index: OfferIndex,
    request: LeaseRequest,
    *,
    weights: Weights = DEFAULT_WEIGHTS,
    candidates: int = DEFAULT_CANDIDATES,
    latencies: Mapping[str, float] | None = None,
    cohort: str | None = None,
) -> Offer:
    """Choose the offer that serves ``request`` best; raise :class:`LeaseError` if none can.

    The winner is the highest :func:`score` among :meth:`OfferIndex.candidates` (the
    ``candidates`` cheapest eligible offers), ties going to the cheaper, then the smaller
    provider key. ``latencies`` maps provider keys to the round trip measured from this
    requester; it overrides the offers' own ``latency_ms``. The error says what to change:
    the GPU types on offer, the cheapest price against the cap, full capacity, the region.
    ``cohort`` is the requesting cohort, which may use the GPUs held for its own reservation
    (:meth:`OfferIndex.hold`); every other request sees them taken.
    Next: :meth:`OfferIndex.reserve` the GPUs, then sign a lease token
    (:func:`jupyter_io.leases.issue_token`).
    """
    found = index.candidates(request, limit=candidates, latencies=latencies, cohort=cohort)
    if not found:
        raise index.explain(request, latencies=latencies, cohort=cohort)
    cheapest = found[0].price_lamports_per_hour
    best = found[0]
    best_score = -1.0
    for offer in found:
        value = score(
            offer,
            request,
            weights,
            cheapest_price=cheapest,
            latency_ms=_latency_of(offer, latencies),
        )
        if value > best_score:
            best, best_score = offer, value
    return best
