"""The coordinator's offers as the server extension sees them: fetched, cached, remembered.

:class:`OffersCatalog` asks the coordinator (``GET /api/v1/offers``, see
``docs/coordinator-contract.md``) at most once per ``ttl`` seconds, shares one request among
concurrent callers, and keeps the last good answer (:attr:`OffersCatalog.latest`), which the
GPU kernelspecs (:mod:`jupyter_io.serverext.kernelspecs`) are built from: kernelspec lookups
are synchronous, so they can only read what a fetch already brought.

Errors: :class:`NoCoordinator` when no coordinator is configured (HTTP 503 to the browser),
:class:`CoordinatorUnavailable` when it cannot be reached or answers badly (HTTP 502).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..coordinator_client import CoordinatorClient
from ..errors import ConfigError, JupyterIOError
from .single_flight import SingleFlight

__all__ = ["CoordinatorUnavailable", "NoCoordinator", "OffersCatalog", "OffersSnapshot"]


class NoCoordinator(ConfigError):
    """No coordinator URL is configured, so there is nothing to offer."""


class CoordinatorUnavailable(JupyterIOError):
    """The coordinator could not be reached or gave an unusable answer."""


@dataclass(frozen=True)
class OffersSnapshot:
    """One answer of the coordinator's ``GET /api/v1/offers``."""

    coordinator_url: str
    #: ``{"types": [...], "providers": [...]}`` as the coordinator sent it.
    body: dict[str, Any]
    #: Unix seconds when it was fetched.
    fetched_at: float
    #: time.monotonic() when it was fetched (for the cache).
    fetched_mono: float = field(repr=False, default=0.0)

    @property
    def types(self) -> list[dict[str, Any]]:
        return list(self.body.get("types") or [])

    @property
    def providers(self) -> list[dict[str, Any]]:
        return list(self.body.get("providers") or [])


class OffersCatalog:
    """Cached offers of the coordinator at ``coordinator_url`` ("" when none is configured).

    Call :meth:`get` for offers at most ``ttl`` seconds old, :meth:`close` when done.
    """

    def __init__(
        self,
        coordinator_url: str,
        *,
        ttl: float = 3.0,
        timeout: float = 10.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.coordinator_url = coordinator_url.rstrip("/")
        self.ttl = ttl
        self.timeout = timeout
        self.monotonic = monotonic
        #: The last good answer (None before the first one).
        self.latest: OffersSnapshot | None = None
        #: The message of the last failed fetch, cleared by a good one.
        self.last_error: str | None = None
        self._client: CoordinatorClient | None = None
        self._refresh = SingleFlight(self._fetch)
        # Bumped by invalidate(); a snapshot is fresh only if its fetch began after the last.
        self._generation = 0
        self._latest_generation = -1

    @property
    def configured(self) -> bool:
        return bool(self.coordinator_url)

    async def get(self, *, max_age: float | None = None) -> OffersSnapshot:
        """Offers at most ``max_age`` (default ``ttl``) seconds old; fetched if older.

        Raises :class:`NoCoordinator` or :class:`CoordinatorUnavailable`.
        """
        if not self.configured:
            raise NoCoordinator(
                "no coordinator is configured: start JupyterLab with "
                "--JupyterIOExtension.coordinator_url=http://HOST:8700 (or run `jupyter io "
                "demo`), then reload"
            )
        age = self.ttl if max_age is None else max_age
        latest = self.latest
        if (
            latest is not None
            and self._latest_generation == self._generation
            and self.monotonic() - latest.fetched_mono < age
        ):
            return latest
        return await self._refresh()

    def invalidate(self) -> None:
        """Fetch afresh at the next :meth:`get`: a lease of ours began or ended, so what is
        free changed. A fetch already in flight does not count as fresh either."""
        self._generation += 1

    async def _fetch(self) -> OffersSnapshot:
        generation = self._generation
        if self._client is None:
            self._client = CoordinatorClient(self.coordinator_url, timeout=self.timeout)
        try:
            body = await self._client.offers()
        except JupyterIOError as exc:
            self.last_error = str(exc)
            raise CoordinatorUnavailable(str(exc)) from None
        if not isinstance(body.get("types"), list):
            self.last_error = f"the coordinator at {self.coordinator_url} sent no offers list"
            raise CoordinatorUnavailable(
                f"{self.last_error}; is that URL a jupyter-io coordinator?"
            )
        snapshot = OffersSnapshot(self.coordinator_url, body, time.time(), self.monotonic())
        self.latest = snapshot
        self._latest_generation = generation
        self.last_error = None
        return snapshot

    def close(self) -> None:
        self._refresh.cancel()
        if self._client is not None:
            self._client.close()
            self._client = None
