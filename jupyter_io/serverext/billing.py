"""The user's leases as the coordinator bills them: escrow, deposit, spent, left, warning.

The coordinator is the authority on what a session costs (``docs/payments-contract.md``
section 3): ``GET /api/v1/leases`` (signed by the user's key) lists the caller's leases, newest
first, each with its ``billing`` block. :class:`LeaseBook` asks at most once per ``ttl``
seconds, shares one request among concurrent callers, and keeps the last good answer, so
``GET /jupyter-io/sessions`` can join each running kernel with its lease's billing and name
the leases the coordinator ended because their deposit was spent.

A coordinator that cannot be asked (none configured, unreachable, no keypair yet) leaves the
book as it was: :attr:`LeaseBook.error` says why, and the sessions show no escrow figures
rather than failing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from ..coordinator_client import CoordinatorClient, LeaseInfo
from ..errors import JupyterIOError
from ..identity import load_keypair
from .single_flight import SingleFlight

__all__ = ["LeaseBook"]

#: The most leases one ``GET /api/v1/leases`` returns (the coordinator's cap).
MAX_LEASES = 100


class LeaseBook:
    """The leases of the keypair at ``keypair_path`` at the coordinator ``coordinator_url``.

    Call :meth:`get` for leases at most ``ttl`` seconds old (by lease id), :meth:`close` when
    done.
    """

    def __init__(
        self,
        coordinator_url: str,
        keypair_path: str,
        *,
        ttl: float = 2.0,
        timeout: float = 10.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.coordinator_url = coordinator_url.rstrip("/")
        self.keypair_path = str(Path(keypair_path).expanduser())
        self.ttl = ttl
        self.timeout = timeout
        self.monotonic = monotonic
        #: Why the last fetch failed (None after a good one).
        self.error: str | None = None
        self._leases: dict[str, LeaseInfo] = {}
        self._fetched = float("-inf")
        self._client: CoordinatorClient | None = None
        self._refresh = SingleFlight(self._fetch)
        self._generation = 0

    @property
    def leases(self) -> dict[str, LeaseInfo]:
        """The last good answer, by lease id (empty before the first)."""
        return dict(self._leases)

    async def get(self, *, max_age: float | None = None) -> dict[str, LeaseInfo]:
        """The user's leases at most ``max_age`` (default ``ttl``) seconds old, by lease id;
        the last good ones (possibly none) when the coordinator cannot be asked now."""
        if not self.coordinator_url:
            return {}
        age = self.ttl if max_age is None else max_age
        if self.monotonic() - self._fetched >= age:
            await self._refresh()
        return self.leases

    def invalidate(self) -> None:
        """Fetch afresh at the next :meth:`get` (after a top-up, a kernel's start or end);
        a fetch already in flight does not count as fresh either."""
        self._fetched = float("-inf")
        self._generation += 1

    async def _fetch(self) -> None:
        generation = self._generation
        try:
            if self._client is None:
                self._client = CoordinatorClient(
                    self.coordinator_url, load_keypair(self.keypair_path), timeout=self.timeout
                )
            leases = await self._client.list_leases(limit=MAX_LEASES)
        except JupyterIOError as exc:
            self.error = str(exc)
            # Ask again at the next request, not in a tight loop: count this as a fetch.
            self._fetched = self.monotonic()
            return
        self._leases = {lease.lease: lease for lease in leases}
        self._fetched = self.monotonic() if generation == self._generation else float("-inf")
        self.error = None

    def close(self) -> None:
        self._refresh.cancel()
        if self._client is not None:
            self._client.close()
            self._client = None
