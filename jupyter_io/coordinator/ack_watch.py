"""The acknowledgement watch: a paid lease whose user stopped acknowledging its usage ends.

Billing already stops at the user's last acknowledgement plus the grace
(:func:`~jupyter_io.coordinator.billing.meter`, ``docs/payments-contract.md``, "Neither
party meters alone"). This ends the lease itself once no acknowledgement came for
``usage_ack_timeout`` seconds (the coordinator cannot tell a user who vanished from a client
that does not acknowledge): the first would otherwise keep the provider's GPU and its own
deposit tied up until the budget runs out, the second would use the kernel for the price of
the grace. By default the timeout is the grace: the provider, told to end the session, then
stops metering about when billing stopped, and an honest provider host co-signs the
settlement (it refuses one more than its ``settle_tolerance_seconds`` short of its own
metering). A kernel whose tunnel is cut for longer than that loses its lease; a shorter cut
is acknowledged after the resume (the count runs from READY).

:class:`AckWatch` keeps one timer per active funded lease whose provider is linked here,
armed at activation and when the provider links (a restarted coordinator's, or another
replica's provider moving here: :mod:`~jupyter_io.coordinator.jobs`), due ``timeout`` after the last
acknowledgement (or the activation); when it fires and nothing newer came, the lease ends
with :data:`~jupyter_io.usage_acks.NOT_ACKNOWLEDGED`: the provider is sent ``end`` and the
settlement worker, woken by the registry, settles it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime, timezone

from ..provider_link import End
from ..usage_acks import NOT_ACKNOWLEDGED
from .jobs import LinkWatch, owned_here
from .lease_timers import LeaseTimers
from .models import LeaseState
from .registry import Registry
from .store import LeaseRecord, Store

__all__ = ["AckWatch"]


def _last_heard(lease: LeaseRecord) -> float | None:
    """When the user last acknowledged (or the lease became active), Unix seconds."""
    when = lease.acked_at or lease.active_at
    return None if when is None else when.timestamp()


class AckWatch:
    """Ends active funded leases whose acknowledgements stopped for ``timeout`` seconds (see
    the module docstring). :meth:`start` after the registry, :meth:`stop` at shutdown."""

    def __init__(
        self,
        store: Store,
        registry: Registry,
        *,
        timeout: float,
        clock: Callable[[], float] = time.time,
        log: logging.Logger | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError("the acknowledgement timeout must be positive")
        self.store = store
        self.registry = registry
        self.timeout = timeout
        self.clock = clock
        self.log = log or logging.getLogger("jupyter_io.coordinator")
        #: Leases this watch ended (for ``GET /api/v1/status`` and tests).
        self.ended = 0
        self._timers = LeaseTimers(self._check, what="acknowledgement check", log=self.log)
        self._links = LinkWatch(store, registry, self.watch, log=self.log)

    async def start(self) -> None:
        """Watch every lease that becomes active, and the active funded ones of each
        provider that links here (a restarted coordinator's too)."""
        self.registry.activation_listeners.append(self.watch)
        self._links.start()
        for lease in await self.store.funded_active_leases():
            if owned_here(self.registry, lease.provider_pubkey):
                self.watch(lease)

    async def stop(self) -> None:
        """Cancel the timers and wait for an end in progress."""
        await self._links.stop()
        await self._timers.stop()

    def watch(self, lease: LeaseRecord) -> None:
        """(Re)arm ``lease``'s timer: due ``timeout`` after it was last heard from. Only
        active funded leases that take acknowledgements (not one recorded before them)."""
        self._timers.cancel(lease.id)
        last = _last_heard(lease)
        if (
            lease.state is not LeaseState.ACTIVE
            or not lease.funded
            or lease.acked_seconds is None
            or last is None
        ):
            return
        self._timers.arm(lease.id, last + self.timeout - self.clock())

    async def _check(self, lease_id: str) -> None:
        lease = await self.store.get_lease(lease_id)
        if lease is None or lease.state is not LeaseState.ACTIVE:
            return
        if not owned_here(self.registry, lease.provider_pubkey):
            return  # its provider moved: the replica holding its link watches it now
        last = _last_heard(lease)
        if last is not None and self.clock() - last < self.timeout:
            self.watch(lease)  # acknowledged meanwhile
            return
        await self._end(lease)

    async def _end(self, lease: LeaseRecord) -> None:
        at = datetime.fromtimestamp(self.clock(), tz=timezone.utc)
        if not await self.store.end_lease(lease.id, NOT_ACKNOWLEDGED, at=at):
            return
        self.ended += 1
        provider = lease.provider_pubkey
        self.log.info(
            "lease %s: no usage acknowledgement for %g s (last: %s s), ending it",
            lease.id,
            self.timeout,
            lease.acked_seconds,
        )
        self.registry.deliver(provider, End(lease.id, NOT_ACKNOWLEDGED), ttl=60.0)
        self.registry.lease_over(provider, lease.id, ok=True, reason=NOT_ACKNOWLEDGED)
