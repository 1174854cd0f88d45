"""This process as one replica of several coordinators sharing a PostgreSQL database.

:class:`ReplicaService` makes a coordinator process one replica of a marketplace:

* it registers the replica (id ``<hostname>-<pid>-<4 hex>``, :attr:`ReplicaService.url` the
  URL providers reach it at) and beats every second, so ``/api/v1/status`` can list the
  live replicas;
* every ``feed_interval`` it reads the change feed (``provider_changes``, written by
  database triggers on every write to providers, offers and leases: migration 0009) from
  the last number it applied, and hands the providers named to
  :meth:`Registry.refresh <jupyter_io.coordinator.registry.Registry.refresh>` in batches, so
  the scheduler's index holds every provider of the marketplace, wherever it is linked;
* in the same pass it takes the outbox messages (``dial``, ``end``) other replicas left for
  providers linked here and sends them over their links;
* now and then it prunes old changes and expired messages (any replica may).

Sequence holes: on PostgreSQL a change's number is drawn when its row is written and the
row becomes visible when its transaction commits, so number 12 can be read before 11. A
number skipped over is kept as a hole and asked for again on each pass for
``hole_timeout`` seconds (a rolled-back transaction leaves a hole that never fills).

A SQLite coordinator (one process, the default) runs it with ``follow=False``: it only
prunes the feed the triggers write there; its registry schedules on its own links as before
(and re-reads leases every ``reconcile_interval`` for a second process on the same file).

Build it after the :class:`~jupyter_io.coordinator.registry.Registry` and before
:meth:`Registry.start` (the constructor marks the registry replicated, and the registry's
start reads the feed's position before loading its view), :meth:`start` it after the
registry, :meth:`stop` it before the links close.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

from .registry import Registry
from .store import Store

__all__ = ["ReplicaService", "new_replica_id"]

#: Seconds a skipped change number is asked for again before it is taken for a rollback.
HOLE_TIMEOUT = 5.0
#: Changes kept in the feed (a replica that stalls longer than this reloads its view).
RETENTION = 600.0
#: Seconds between prunes.
PRUNE_INTERVAL = 30.0
#: A replica not seen for this long is not listed as live.
LIVE_WITHIN = 5.0
#: Largest gap remembered as holes (beyond it the numbers were pruned or never drawn).
_MAX_HOLES = 10_000


def new_replica_id() -> str:
    """A fresh replica id: ``<hostname>-<pid>-<4 hex>`` (at most 64 characters)."""
    return f"{socket.gethostname()[:48]}-{os.getpid()}-{secrets.token_hex(2)}"


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


class ReplicaService:
    """This process's replica (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        registry: Registry,
        *,
        url: str,
        feed_interval: float = 0.2,
        beat_interval: float = 1.0,
        hole_timeout: float = HOLE_TIMEOUT,
        batch: int = 500,
        replica_id: str | None = None,
        follow: bool = True,
        log: logging.Logger | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if min(feed_interval, beat_interval, hole_timeout) <= 0 or batch < 1:
            raise ValueError("intervals must be positive and batch at least 1")
        self.store = store
        self.registry = registry
        #: This replica's id (stored with every provider link it holds).
        self.id = replica_id or new_replica_id()
        #: The URL providers reach this replica at (dials to its relay name it).
        self.url = url
        self.feed_interval = feed_interval
        self.beat_interval = beat_interval
        self.hole_timeout = hole_timeout
        self.batch = batch
        #: False (a SQLite coordinator): only prune the feed the triggers write; the
        #: registry keeps to its links and its reconcile (see the module docstring).
        self.follow = follow
        self.log = log or logging.getLogger("jupyter_io.coordinator")
        self.monotonic = monotonic
        #: The newest change number applied to the view.
        self.last_seq = 0
        #: Numbers skipped over, with the monotonic time each was first missed.
        self.holes: dict[int, float] = {}
        #: Milliseconds from a change's write (the database's clock) to this view, for the
        #: last 1000 changes (``feed_p99_ms`` in the status).
        self.propagation_ms: collections.deque[float] = collections.deque(maxlen=1000)
        self._caught_up = monotonic()
        self._live: list[tuple[str, str, datetime]] = []
        self._tasks: list[asyncio.Task[None]] = []
        if follow:
            registry.replica_id = self.id
            registry.replicated = True

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Register this replica and start the beat, the feed and the prune (after
        :meth:`Registry.start`: the feed goes on from the position its view was loaded at).
        """
        if not self.follow:
            self._tasks = [
                asyncio.create_task(self._every(PRUNE_INTERVAL, self.prune), name="feed prune")
            ]
            return
        self.last_seq = self.registry.view_seq
        self._caught_up = self.monotonic()
        await self.store.replicas.register(self.id, self.url)
        self._live = await self.store.replicas.live(LIVE_WITHIN)
        self.log.info("replica %s at %s (change feed from %d)", self.id, self.url, self.last_seq)
        self._tasks = [
            asyncio.create_task(self._every(self.beat_interval, self.beat), name="replica beat"),
            asyncio.create_task(self._every(self.feed_interval, self.poll), name="change feed"),
            asyncio.create_task(self._every(PRUNE_INTERVAL, self.prune), name="feed prune"),
        ]

    async def stop(self) -> None:
        """Stop the tasks and mark this replica stopped (the providers linked here are no
        longer said to be linked anywhere until they link again). Before the links close."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if not self.follow:
            return
        try:
            await self.store.replicas.stop(self.id)
        except Exception:
            self.log.exception("replica %s: could not record its stop", self.id)

    async def _every(self, period: float, job: Callable[[], Any]) -> None:
        while True:
            await asyncio.sleep(period)
            try:
                await job()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.log.exception("replica: %s failed; retrying", getattr(job, "__name__", job))

    # -- the jobs (the tasks run them; tests may too) ---------------------------------------

    async def beat(self) -> None:
        """Tell the database this replica lives; re-read the live replicas."""
        if not await self.store.replicas.beat(self.id):
            await self.store.replicas.register(self.id, self.url)  # pruned while stalled
        self._live = await self.store.replicas.live(LIVE_WITHIN)

    async def poll(self) -> int:
        """One pass: apply the feed's new changes (and holes that filled), then send the
        outbox messages for providers linked here. Returns the changes applied."""
        started = self.monotonic()
        self._expire_holes(started)
        applied = 0
        while True:
            changes = await self.store.replicas.changes_since(
                self.last_seq, self.batch, holes=self.holes.keys()
            )
            keys: set[str] = set()
            now = _utc_now()
            for change in changes:
                if change.seq in self.holes:
                    del self.holes[change.seq]
                elif change.seq > self.last_seq:
                    if change.seq - self.last_seq <= _MAX_HOLES:
                        for missing in range(self.last_seq + 1, change.seq):
                            self.holes.setdefault(missing, started)
                    self.last_seq = change.seq
                else:
                    continue
                keys.add(change.pubkey)
                self.propagation_ms.append(max(0.0, (now - change.at).total_seconds() * 1e3))
            applied += len(keys)
            await self.registry.refresh(keys)
            if len(changes) < self.batch:
                break
        self._caught_up = started
        await self.deliver_outbox()
        return applied

    async def deliver_outbox(self) -> int:
        """Take the outbox messages for providers linked here and send them."""
        targets = await self.store.replicas.message_targets()
        mine = [pubkey for pubkey in targets if self.registry.linked_here(pubkey)]
        if not mine:
            return 0
        rows = await self.store.replicas.take_messages(mine)
        return self.registry.send_outbox(rows)

    async def prune(self) -> None:
        """Delete changes older than the retention and expired messages."""
        cutoff = _utc_now() - timedelta(seconds=RETENTION)
        await self.store.replicas.prune(changes_before=cutoff)

    def _expire_holes(self, now: float) -> None:
        late = [seq for seq, since in self.holes.items() if now - since > self.hole_timeout]
        for seq in late:
            del self.holes[seq]

    # -- reading ---------------------------------------------------------------------------

    def view_lag_ms(self) -> float:
        """Milliseconds since the start of the last pass that read the feed to its end:
        every change committed before then is in this replica's view (holes aside)."""
        return max(0.0, (self.monotonic() - self._caught_up) * 1e3)

    def status_json(self) -> dict[str, Any]:
        """The ``"replica"`` object of ``/api/v1/status``."""
        now = _utc_now()
        return {
            "id": self.id,
            "url": self.url,
            "view_lag_ms": round(self.view_lag_ms(), 1),
            "last_seq": self.last_seq,
            "holes": len(self.holes),
            "feed_p99_ms": _p99(self.propagation_ms),
            "providers_known": len(self.registry.providers()),
            "linked_here": self.registry.linked_count(),
            "replicas": [
                {"id": rid, "url": url, "last_seen_s": round((now - seen).total_seconds(), 3)}
                for rid, url, seen in self._live
            ],
        }


def _p99(samples: collections.deque[float]) -> float | None:
    """The 99th percentile of the recent commit-to-view delays (None before any change)."""
    if not samples:
        return None
    ordered = sorted(samples)
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 1)
