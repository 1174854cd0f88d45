"""Measuring latency from the user's machine: probes before a lease, the live round trip after.

Shared by the provisioner (it measures its candidates before asking for a lease) and the
server extension (the picker shows the best figure per GPU type), in one process, so one
cache serves both (:func:`shared_prober`)::

    body = await client.candidates(gpu="RTX 4090")            # the coordinator's short list
    candidates = [Candidate.from_json(c) for c in body["candidates"]]
    measured = await shared_prober().measure(candidates)      # parallel, one tight deadline
    grant = await client.request_lease("RTX 4090", latency_ms=latencies(measured))

* :func:`ping` sends one latency ping (:mod:`jupyter_io.ping`) and returns the round trip.
* :class:`LatencyProber` pings the top few candidates at once with one deadline for all; a
  probe that does not answer by then is *unreachable* (never fast, never a guess). Results
  are cached per provider for ``ttl`` seconds (an unreachable one for ``unreachable_ttl``),
  so a second start probes nothing. A provider behind the relay is measured as the relay's
  ping plus the coordinator's own measured hop to the provider, and labelled ``via_relay``.
* :class:`RoundTripWatch` follows a running kernel's tunnel from its keepalive pings and
  says when the round trip has been much worse than its best for a while.

A provider never states its own latency: nothing here reads a figure it sent.
"""

from __future__ import annotations

import asyncio
import math
import os
import ssl
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .gpu_names import normalise_gpu_name
from .ping import PING_MAX_REPLY, build_ping_request, parse_ping_reply, ping_target

__all__ = [
    "DEFAULT_PROBES",
    "DEFAULT_PROBE_TIMEOUT",
    "DEFAULT_TTL",
    "Candidate",
    "LatencyProber",
    "Measurement",
    "PingFailed",
    "RoundTripWatch",
    "annotate_offers",
    "latencies",
    "ping",
    "shared_prober",
]

#: Seconds all the probes of one measurement may take together.
DEFAULT_PROBE_TIMEOUT = 0.5
#: How many candidates one measurement probes (the first ones of the coordinator's list).
DEFAULT_PROBES = 8
#: Seconds a measurement is reused.
DEFAULT_TTL = 300.0
#: Seconds an unreachable verdict is reused (shorter: a provider may come back).
DEFAULT_UNREACHABLE_TTL = 60.0
#: Pings sent to each endpoint, one after the other while the deadline allows; the fastest
#: answer counts (a busy machine only ever adds to a round trip, so the least of a few is
#: the closest to the network's).
DEFAULT_SAMPLES = 2


class PingFailed(OSError):
    """A ping got no valid answer (refused, cut, rate-limited, or not a jupyter-io endpoint)."""


async def ping(url: str, *, timeout: float, ssl_context: ssl.SSLContext | None = None) -> float:
    """One latency ping to the endpoint at ``url`` (a tunnel or relay ``ws(s)://`` URL);
    returns the round trip in milliseconds, from writing the request to reading the reply
    that carries its nonce (the TCP and TLS handshakes before it are not counted).

    Raises :class:`asyncio.TimeoutError` after ``timeout`` seconds in all, :class:`PingFailed`
    for an answer that is not a ping reply, :class:`OSError` when the connection fails.
    """
    target = ping_target(url)
    nonce = os.urandom(16)
    request = build_ping_request(target, nonce)

    async def exchange() -> float:
        context = (ssl_context or ssl.create_default_context()) if target.tls else None
        reader, writer = await asyncio.open_connection(
            target.host, target.port, ssl=context, server_hostname=target.host if context else None
        )
        try:
            start = time.perf_counter()
            writer.write(request)
            data = b""
            while True:
                chunk = await reader.read(PING_MAX_REPLY + 1 - len(data))
                if not chunk:
                    raise PingFailed(
                        f"{target.url} closed the connection without answering the ping "
                        f"(rate-limited, or not a jupyter-io endpoint)"
                    )
                data += chunk
                verdict = parse_ping_reply(data, nonce)
                if verdict:
                    return (time.perf_counter() - start) * 1000.0
                if verdict is False:
                    raise PingFailed(f"{target.url} did not answer like a jupyter-io endpoint")
        finally:
            writer.transport.abort()

    return await asyncio.wait_for(exchange(), timeout)


@dataclass(frozen=True, slots=True)
class Candidate:
    """One offer the coordinator proposes for a request (``GET /api/v1/offers/candidates``),
    or a provider row of ``GET /api/v1/offers``: whom to measure, and how."""

    provider: str
    #: What to ping: the provider's tunnel URL, or the relay's (``via_relay``).
    probe_url: str | None
    via_relay: bool = False
    #: The coordinator's own round trip to the provider over its link (relayed providers).
    relay_hop_ms: float | None = None
    gpu: str = ""
    price_lamports_per_hour: int | None = None

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Candidate:
        """From a candidate or provider row; unknown or ill-typed fields are left out."""
        hop = body.get("relay_hop_ms")
        price = body.get("price_lamports_per_hour")
        url = body.get("probe_url")
        return cls(
            provider=str(body.get("provider") or ""),
            probe_url=url if isinstance(url, str) and url else None,
            via_relay=body.get("via_relay") is True,
            relay_hop_ms=float(hop) if isinstance(hop, (int, float)) and hop >= 0 else None,
            gpu=str(body.get("gpu") or ""),
            price_lamports_per_hour=price if type(price) is int else None,
        )


@dataclass(frozen=True, slots=True)
class Measurement:
    """What one probe of one provider found. ``latency_ms`` is None when it is unknown:
    ``unreachable`` (no answer by the deadline, or a refusal) or not measurable yet (a relayed
    provider whose hop the coordinator has not measured)."""

    provider: str
    latency_ms: float | None
    via_relay: bool
    #: Time (``time.time()``) of the probe.
    measured_at: float
    unreachable: bool = False
    #: The relay's ping and the coordinator's hop, for a relayed provider.
    relay_ms: float | None = None
    hop_ms: float | None = None
    #: Why there is no figure, for people.
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "latency_ms": None if self.latency_ms is None else round(self.latency_ms, 2),
            "via_relay": self.via_relay,
            "unreachable": self.unreachable,
            "relay_ms": None if self.relay_ms is None else round(self.relay_ms, 2),
            "relay_hop_ms": None if self.hop_ms is None else round(self.hop_ms, 2),
            "measured_at": self.measured_at,
            "error": self.error,
        }


def latencies(measured: Iterable[Measurement]) -> dict[str, float]:
    """The figures a lease request carries (``latency_ms``): providers with a measured round
    trip, in milliseconds. Unreachable and unmeasured ones are left out, so the scheduler
    treats them as unknown (never as fast)."""
    return {
        m.provider: round(m.latency_ms, 3)
        for m in measured
        if m.latency_ms is not None and not m.unreachable
    }


class LatencyProber:
    """Probes candidates in parallel and caches what it found (see the module docstring).

    ``timeout`` bounds one :meth:`measure` call as a whole; ``ssl_context`` verifies ``wss://``
    endpoints (the system's trust store when None). Use one per process
    (:func:`shared_prober`) so the cache is shared; it holds at most ``max_entries``
    providers. Methods run on any event loop; the cache is plain data.
    """

    def __init__(
        self,
        *,
        ttl: float = DEFAULT_TTL,
        unreachable_ttl: float = DEFAULT_UNREACHABLE_TTL,
        timeout: float = DEFAULT_PROBE_TIMEOUT,
        probes: int = DEFAULT_PROBES,
        samples: int = DEFAULT_SAMPLES,
        max_entries: int = 4096,
        ssl_context: ssl.SSLContext | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.unreachable_ttl = unreachable_ttl
        self.timeout = timeout
        self.probes = probes
        self.samples = max(1, samples)
        self.max_entries = max_entries
        self.ssl_context = ssl_context
        self.monotonic = monotonic
        self._cache: dict[str, tuple[float, Measurement]] = {}
        #: Pings sent so far (tests and benchmarks count them).
        self.pings_sent = 0

    def cached(self, provider: str) -> Measurement | None:
        """The provider's measurement while it is fresh, else None."""
        entry = self._cache.get(provider)
        if entry is None:
            return None
        stamp, found = entry
        ttl = self.unreachable_ttl if found.latency_ms is None else self.ttl
        if self.monotonic() - stamp >= ttl:
            del self._cache[provider]
            return None
        return found

    def forget(self) -> None:
        """Drop every cached measurement."""
        self._cache.clear()

    async def measure(
        self,
        candidates: Sequence[Candidate],
        *,
        probes: int | None = None,
        timeout: float | None = None,
        refine: bool = False,
    ) -> dict[str, Measurement]:
        """Measurements of the first ``probes`` candidates (default :attr:`probes`) by
        provider: cached ones as they are, the others pinged now, all endpoints at once
        (each up to :attr:`samples` times in a row, the fastest answer counting), within
        ``timeout`` seconds (default :attr:`timeout`) in all. Never raises for a provider
        that does not answer: it comes back ``unreachable``.

        ``refine``: ping the cached ones too and keep the faster figure for the rest of
        their cache period (a figure taken while this machine was busy is only ever too
        high); the period is not extended."""
        limit = self.probes if probes is None else probes
        deadline = self.timeout if timeout is None else timeout
        chosen: dict[str, Candidate] = {}
        for candidate in candidates:
            if len(chosen) >= limit:
                break
            if candidate.provider and candidate.provider not in chosen:
                chosen[candidate.provider] = candidate
        found: dict[str, Measurement] = {}
        wanted: dict[str, list[Candidate]] = {}
        for provider, candidate in chosen.items():
            hit = self.cached(provider)
            if hit is not None and not (refine and candidate.probe_url):
                found[provider] = hit
            elif candidate.probe_url is None:
                found[provider] = self._remember(
                    Measurement(
                        provider, None, candidate.via_relay, time.time(), error="no ping URL"
                    )
                )
            else:
                wanted.setdefault(candidate.probe_url, []).append(candidate)
        if not wanted:
            return found
        answers: dict[str, list[float]] = {url: [] for url in wanted}
        errors: dict[str, str] = {}
        tasks = [
            asyncio.ensure_future(self._sample(url, deadline, answers[url], errors))
            for url in wanted
        ]
        await asyncio.wait(tasks, timeout=deadline)
        for task in tasks:
            task.cancel()
        now = time.time()
        late = f"no answer within {deadline * 1000:.0f} ms"
        for url, got in answers.items():
            rtt = min(got) if got else None
            error = None if got else errors.get(url, late)
            for candidate in wanted[url]:
                fresh = _measurement(candidate, rtt, error, now)
                found[candidate.provider] = self._remember(fresh, keep_best=refine)
        return found

    async def _sample(
        self, url: str, deadline: float, answers: list[float], errors: dict[str, str]
    ) -> None:
        """Ping ``url`` up to :attr:`samples` times in a row (one after the other: a stall
        of this machine that delays one answer rarely delays the next)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline
        for _ in range(self.samples):
            left = end - loop.time()
            if left <= 0:
                return
            self.pings_sent += 1
            try:
                answers.append(await ping(url, timeout=left, ssl_context=self.ssl_context))
            except asyncio.TimeoutError:
                return
            except (OSError, ValueError, ssl.SSLError) as exc:
                errors[url] = str(exc) or repr(exc)
                return

    def _remember(self, found: Measurement, *, keep_best: bool = False) -> Measurement:
        cache = self._cache
        held = cache.get(found.provider)
        if keep_best and held is not None and self.cached(found.provider) is not None:
            stamp, old = held
            if old.latency_ms is not None and (
                found.latency_ms is None or old.latency_ms <= found.latency_ms
            ):
                return old
            cache[found.provider] = (stamp, found)  # the faster figure, the same period
            return found
        if found.provider not in cache and len(cache) >= self.max_entries:
            del cache[next(iter(cache))]  # the oldest entry
        cache.pop(found.provider, None)
        cache[found.provider] = (self.monotonic(), found)
        return found


def _measurement(
    candidate: Candidate, rtt: float | None, error: str | None, now: float
) -> Measurement:
    if rtt is None:
        return Measurement(
            candidate.provider, None, candidate.via_relay, now, unreachable=True, error=error
        )
    if not candidate.via_relay:
        return Measurement(candidate.provider, rtt, False, now)
    hop = candidate.relay_hop_ms
    if hop is None:
        return Measurement(
            candidate.provider,
            None,
            True,
            now,
            relay_ms=rtt,
            error="the relay's hop to this provider is not measured yet",
        )
    return Measurement(candidate.provider, rtt + hop, True, now, relay_ms=rtt, hop_ms=hop)


def annotate_offers(
    types: Iterable[Mapping[str, Any]],
    providers: Iterable[Mapping[str, Any]],
    lookup: Callable[[str], Measurement | None],
    *,
    probing: Iterable[str] = (),
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The offers' ``types`` and ``providers`` rows (``GET /api/v1/offers``) with what was
    measured from here (``lookup(provider)``; None: not measured).

    Per provider: ``latency_ms``, ``latency_via_relay``, ``latency_unreachable``. Per type:
    ``latency_ms`` (its best measured round trip), ``latency_via_relay`` (of that one) and
    ``latency_state``: ``measured``, ``unreachable`` (every provider probed failed to answer
    in time) or ``pending`` (none measured yet, or some of the types in ``probing``, GPU type
    keys, are being measured now).
    """
    busy = set(probing)
    best: dict[str, Measurement] = {}
    probed: set[str] = set()
    rows = []
    for row in providers:
        provider = str(row.get("provider") or "")
        gpu = normalise_gpu_name(str(row.get("gpu") or ""))
        found = lookup(provider) if provider else None
        if found is not None:
            probed.add(gpu)
            held = best.get(gpu)
            if found.latency_ms is not None and (
                held is None or held.latency_ms is None or found.latency_ms < held.latency_ms
            ):
                best[gpu] = found
        rows.append(
            {
                **row,
                "latency_ms": _ms(found.latency_ms) if found is not None else None,
                "latency_via_relay": found.via_relay if found is not None else None,
                "latency_unreachable": found.unreachable if found is not None else None,
            }
        )
    out = []
    for row in types:
        gpu = str(row.get("gpu") or "")
        top = best.get(gpu)
        if top is not None:
            state = "measured"
        elif gpu in probed and gpu not in busy:
            state = "unreachable"
        else:
            state = "pending"
        out.append(
            {
                **row,
                "latency_ms": None if top is None else _ms(top.latency_ms),
                "latency_via_relay": None if top is None else top.via_relay,
                "latency_state": state,
            }
        )
    return out, rows


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


_SHARED: LatencyProber | None = None


def shared_prober() -> LatencyProber:
    """This process's prober: the provisioner and the server extension share its cache."""
    global _SHARED
    if _SHARED is None:
        _SHARED = LatencyProber()
    return _SHARED


class RoundTripWatch:
    """A running tunnel's round trip, from its keepalive pings (sans-I/O; give it the time).

    :meth:`observe` each sample (ms; None when the tunnel is down). The round trip is
    *degraded* once every sample for ``after`` seconds was above ``factor`` times the best
    seen in this session and at least ``margin_ms`` above it: a blip is not a notice, and a
    1 ms link going to 3 ms is not worth one either.
    """

    def __init__(
        self, *, factor: float = 2.0, margin_ms: float = 30.0, after: float = 30.0
    ) -> None:
        self.factor = factor
        self.margin_ms = margin_ms
        self.after = after
        #: The last sample, and the best of the session.
        self.current_ms: float | None = None
        self.best_ms: float | None = None
        #: When the samples went above the threshold (None: they are not).
        self.worse_since: float | None = None
        self._last_at: float | None = None

    def observe(self, sample_ms: float | None, now: float) -> None:
        """Record a sample taken at ``now`` (seconds, monotonic)."""
        self._last_at = now
        self.current_ms = sample_ms
        if sample_ms is None or not math.isfinite(sample_ms):
            self.worse_since = None
            return
        if self.best_ms is None or sample_ms < self.best_ms:
            self.best_ms = sample_ms
        best = self.best_ms
        if sample_ms > max(best * self.factor, best + self.margin_ms):
            if self.worse_since is None:
                self.worse_since = now
        else:
            self.worse_since = None

    def degraded_for(self, now: float) -> float:
        """Seconds the round trip has been above the threshold (0 when it is not)."""
        return 0.0 if self.worse_since is None else max(0.0, now - self.worse_since)

    def degraded(self, now: float) -> bool:
        """True once the round trip has been above the threshold for ``after`` seconds."""
        return self.worse_since is not None and now - self.worse_since >= self.after

    def to_json(self, now: float) -> dict[str, Any]:
        """The sessions JSON's ``round_trip`` block."""
        return {
            "ms": None if self.current_ms is None else round(self.current_ms, 2),
            "best_ms": None if self.best_ms is None else round(self.best_ms, 2),
            "degraded": self.degraded(now),
            "degraded_for_s": round(self.degraded_for(now), 1),
        }
