"""Work done once across coordinator replicas: who leads, who owns a lease's timers.

Several coordinators may share one PostgreSQL database (``docs/coordinator-contract.md``
section 5.1). Each job runs where exactly one replica runs it:

* **per-lease work** (the budget watch, the acknowledgement watch, a cohort's idle /
  max-length / quota rules, the lease's settlement) runs on the replica that holds the
  provider's link (:func:`linked_here`): the provider co-signs settlements and receives
  ``end`` over that link. Timers are armed when a provider links here
  (``Registry.link_listeners``) and a check that finds the provider linked elsewhere leaves
  the lease to that replica;
* **what has no linked replica** runs on the leader (:class:`Leadership`), as conditional
  updates so that a second run changes nothing (:class:`LeaderJobs`): the loss sweep of
  providers whose heartbeats stopped in the database (their replica died), the claim window
  of leases whose replica died before it ended them, and settlements of providers linked
  nowhere (the settlement worker asks :meth:`Leadership.is_leader`).

On SQLite (one process) the coordinator is always the leader. On PostgreSQL leadership is a
session-level advisory lock (``pg_try_advisory_lock``) held on a dedicated connection for the
life of the replica: a replica that dies, or whose connection drops, loses it with its
connection, and another replica takes it within ``interval`` seconds. A replica notices a
lost connection (a termination callback, and a ``SELECT 1`` every ``interval``), logs it and
stops leading at once; for the moment between the server releasing the lock and the old
leader noticing, two replicas may both run a pass, which every leader job tolerates (each
change is conditional on the state it changes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from ..coordinator_client import NOT_FUNDED_IN_TIME, NOT_STARTED_IN_TIME
from ..provider_link import End
from .pending import PendingLeases
from .registry import Registry
from .store import LeaseRecord, Store

__all__ = [
    "LEADER_LOCK_KEY",
    "REPLICA_SILENCE",
    "JobStats",
    "LeaderJobs",
    "Leadership",
    "LinkWatch",
    "linked_here",
    "owned_here",
    "watched_here",
]

#: The advisory lock key whose holder leads (a constant every replica agrees on; the
#: migrations' lock uses another).
LEADER_LOCK_KEY = 0x6A7570696F_01  # "jupio" + 1
#: Seconds without a beat after which a replica counts as gone (replicas beat every second).
REPLICA_SILENCE = 5.0
#: Longest wait, seconds, for one statement on the leadership connection.
_STATEMENT_TIMEOUT = 5.0


def _utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=timezone.utc)


def linked_here(registry: Registry, provider: str) -> bool:
    """Whether ``provider``'s link is held by this replica (its per-lease work runs here)."""
    state = registry.provider(provider)
    return state is not None and state.linked


def owned_here(registry: Registry, provider: str) -> bool:
    """Whether this replica holds ``provider``'s link, or held it last and is watching its
    loss window (a provider merely restored from the database at start-up, or known as
    linked at another replica, is not owned here)."""
    state = registry.provider(provider)
    if state is None:
        return False
    return state.linked or not (state.restored or getattr(state, "elsewhere", False))


def watched_here(registry: Registry, provider: str) -> bool:
    """Whether the registry here runs its own loss check for ``provider`` (linked here,
    watched since its link closed, or restored at start-up)."""
    state = registry.provider(provider)
    return state is not None and not getattr(state, "elsewhere", False)


class Leadership:
    """Whether this replica is the leader (see the module docstring).

    :meth:`start` takes the lock if it is free (on SQLite: leads at once), then retries every
    ``interval`` seconds while another replica holds it; :meth:`stop` releases it (closes the
    connection). :meth:`is_leader` is cheap: jobs ask it before each pass."""

    def __init__(
        self,
        store: Store,
        *,
        interval: float = 2.0,
        key: int = LEADER_LOCK_KEY,
        log: logging.Logger | None = None,
    ) -> None:
        if interval <= 0:
            raise ValueError("the leadership interval must be positive")
        self.store = store
        self.interval = interval
        self.key = key
        self.log = log or logging.getLogger("jupyter_io.coordinator")
        #: Times this replica became the leader / stopped being it (status, tests).
        self.gained = 0
        self.lost = 0
        self._leader = False
        self._changed = asyncio.Event()
        self._conn: Any = None  # asyncpg.Connection on PostgreSQL
        self._task: asyncio.Task[None] | None = None
        #: ``time.monotonic()`` before which this replica does not try for the lock again
        #: (after losing it: a replica whose connection dropped lets a healthy one lead).
        self._cool_down = 0.0
        self._failing = False  # the last try failed (logged once per streak)

    @property
    def postgres(self) -> bool:
        return self.store.dialect == "postgresql"

    def is_leader(self, job: str = "") -> bool:
        """Whether this replica runs the leader's jobs now (``job`` names the asking job, for
        the reader; there is one leader for all of them)."""
        return self._leader

    async def start(self) -> None:
        """Lead at once on SQLite; on PostgreSQL try the lock now, then every ``interval``."""
        if not self.postgres:
            self._set(True, "the only coordinator of a SQLite database")
            return
        await self._try()
        self._task = asyncio.create_task(self._run(), name="leadership")

    async def stop(self) -> None:
        """Stop trying and release the lock (by closing its connection)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._close()
        self._leader = False

    async def wait(self, leader: bool, timeout: float) -> None:
        """Wait until :meth:`is_leader` is ``leader`` (tests); :class:`asyncio.TimeoutError`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._leader is not leader:
            event = self._changed
            await asyncio.wait_for(event.wait(), max(0.0, deadline - loop.time()))

    def to_json(self, jobs: JobStats | None = None) -> dict[str, Any]:
        """For ``GET /api/v1/status``: whether this replica leads, how often it took and lost
        the lead, and what its leader passes did (``jobs``)."""
        body: dict[str, Any] = {"leader": self._leader, "gained": self.gained, "lost": self.lost}
        if jobs is not None:
            body["jobs"] = {
                "passes": jobs.passes,
                "providers_lost": jobs.providers_lost,
                "leases_failed": jobs.leases_failed,
                "leases_expired": jobs.leases_expired,
            }
        return body

    @property
    def connection(self) -> Any:
        """The dedicated connection holding (or trying for) the lock (PostgreSQL; tests)."""
        return self._conn

    # -- the lock --------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self._try()

    async def _try(self) -> None:
        try:
            if self._conn is None or self._conn.is_closed():
                await self._connect()
            if self._leader:
                await self._conn.fetchval("SELECT 1", timeout=_STATEMENT_TIMEOUT)
            elif time.monotonic() >= self._cool_down and await self._conn.fetchval(
                "SELECT pg_try_advisory_lock($1)", self.key, timeout=_STATEMENT_TIMEOUT
            ):
                self._set(True, "took the leader lock")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            why = f"{type(exc).__name__}: {exc}"
            if not self._leader and not self._failing:
                self.log.warning(
                    "cannot try for the leadership of the coordinator replicas (%s); retrying "
                    "every %g s",
                    why,
                    self.interval,
                )
            self._failing = True
            self._connection_lost(why)
            await self._close()
        else:
            self._failing = False

    async def _connect(self) -> None:
        import asyncpg

        url = self.store.engine.url.set(drivername="postgresql")
        self._conn = conn = await asyncpg.connect(
            url.render_as_string(hide_password=False), timeout=_STATEMENT_TIMEOUT
        )
        conn.add_termination_listener(self._terminated)

    def _terminated(self, conn: Any) -> None:
        if conn is self._conn:  # not one this replica closed itself
            self._connection_lost("connection closed")

    def _connection_lost(self, why: str) -> None:
        if self._leader:
            self.log.warning(
                "lost the leadership of the coordinator replicas (database connection: %s); "
                "retrying every %g s",
                why,
                self.interval,
            )
            self._set(False, None)
            self._cool_down = time.monotonic() + 2 * self.interval

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), _STATEMENT_TIMEOUT)
            except Exception:
                conn.terminate()

    def _set(self, leader: bool, why: str | None) -> None:
        if leader == self._leader:
            return
        self._leader = leader
        if leader:
            self.gained += 1
            self.log.info("this coordinator leads the replicas' jobs (%s)", why)
        else:
            self.lost += 1
        self._changed.set()
        self._changed = asyncio.Event()


@dataclass
class JobStats:
    """What :class:`LeaderJobs` did in this process (tests, status)."""

    passes: int = 0
    #: Providers the loss sweep marked lost, and the leases that failed with them.
    providers_lost: int = 0
    leases_failed: int = 0
    #: Leases the claim-window sweep ended.
    leases_expired: int = 0


class LeaderJobs:
    """The leader's periodic pass over the database (see the module docstring): every
    ``interval`` seconds, on the leader only, :meth:`sweep_lost` then :meth:`sweep_claims`.

    ``pending`` is this replica's own claim-window watch (its leases are left to it, so that
    the full window a restarted coordinator grants them holds); ``escrow`` says whether leases
    are paid (an unfunded lease must be funded in the window, then started)."""

    def __init__(
        self,
        store: Store,
        registry: Registry,
        leadership: Leadership,
        *,
        pending: PendingLeases,
        escrow: bool,
        interval: float = 2.0,
        claim_grace: float | None = None,
        log: logging.Logger | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.registry = registry
        self.leadership = leadership
        self.pending = pending
        self.escrow = escrow
        self.interval = interval
        #: Seconds past a lease's claim window before the leader ends it: the replica that
        #: made it (if alive) ends it at the window itself, and an escrow verification in
        #: flight at the deadline may still land.
        self.claim_grace = (
            min(pending.window, 15.0) if claim_grace is None else claim_grace
        )
        self.log = log or logging.getLogger("jupyter_io.coordinator")
        self.clock = clock
        self.stats = JobStats()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="leader jobs")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if not self.leadership.is_leader("leader jobs"):
                continue
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.log.exception("leader jobs failed; retrying in %g s", self.interval)

    async def run_once(self) -> None:
        """One pass (the leader's task runs it; tests may too)."""
        self.stats.passes += 1
        await self.sweep_lost()
        await self.sweep_claims()

    async def sweep_lost(self) -> int:
        """Mark lost the providers online in the database with no heartbeat stored for the
        loss window (plus one flush interval: the linked replica flushes that often) whose
        replica is gone (stopped, or silent for :data:`REPLICA_SILENCE` seconds) or unknown,
        and that the registry here does not watch. Conditional on the provider's row (a
        provider that heartbeated meanwhile, through any replica, is untouched). Returns how
        many."""
        registry = self.registry
        now = self.clock()
        silent_since = _utc(now - registry.loss_window - registry.flush_interval)
        lost = 0
        stale = await self.store.stale_providers(silent_since)
        if not stale:
            return 0
        # A replica that still beats runs the loss check of the providers linked to it
        # (one stalled for a moment is not a reason to fail its providers' leases).
        live = {
            replica
            for replica, _url, _seen in await self.store.replicas.live(
                max(REPLICA_SILENCE, registry.loss_window)
            )
        }
        for pubkey in stale:
            if watched_here(registry, pubkey):
                continue  # the registry's own loss check runs for a provider watched here
            record = await self.store.get_provider(pubkey)
            if record is None or (record.replica_id is not None and record.replica_id in live):
                continue
            failed = await self.store.mark_silent_provider_lost(
                pubkey,
                silent_since=silent_since,
                at=_utc(now),
                heartbeats_missed=registry.heartbeat_misses,
            )
            if failed is None:
                continue  # heartbeated, went offline or was marked lost meanwhile
            lost += 1
            self.stats.providers_lost += 1
            self.stats.leases_failed += len(failed)
            self.log.warning(
                "provider %s lost: no heartbeat in the database for %g s and no replica "
                "holds its link; %d lease(s) failed",
                pubkey,
                registry.loss_window,
                len(failed),
            )
            for lease in failed:
                registry.lease_over(
                    pubkey, lease.id, ok=False, reason="failed: its provider was lost"
                )
        return lost

    async def sweep_claims(self) -> int:
        """End the leases still ``requested`` whose claim window (plus ``claim_grace``) is
        over and that this replica's own watch does not track: made by a replica that died.
        Each end is conditional (a lease funded or started meanwhile is left alone)."""
        now = self.clock()
        before = _utc(now - self.pending.window - self.claim_grace)
        overdue = await self.store.overdue_requested_leases(
            requested_before=before, funded_before=before if self.escrow else None
        )
        ended = 0
        for lease in overdue:
            if lease.id in self.pending:
                continue
            unfunded = self.escrow and not lease.funded
            reason = NOT_FUNDED_IN_TIME if unfunded else NOT_STARTED_IN_TIME
            if not await self.store.end_lease(
                lease.id, reason, at=_utc(now), only_requested=True, only_unfunded=unfunded
            ):
                continue
            ended += 1
            self.stats.leases_expired += 1
            self.log.info(
                "lease %s of %s ended: %s (its coordinator replica is gone)",
                lease.id,
                lease.user_pubkey,
                reason,
            )
            provider = lease.provider_pubkey
            self.registry.deliver(provider, End(lease.id, reason), ttl=60.0)
            self.registry.lease_over(provider, lease.id, ok=True, reason=reason)
        return ended


class LinkWatch:
    """Arms a per-lease watch for the live leases of each provider that links here (the
    ownership rule: a lease's timers run on the replica holding its provider's link; a
    replica that gets the link of a provider moved from another re-arms them)."""

    def __init__(
        self,
        store: Store,
        registry: Registry,
        arm: Callable[[LeaseRecord], None],
        *,
        log: logging.Logger,
    ) -> None:
        self.store = store
        self.registry = registry
        self.arm = arm
        self.log = log
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self.registry.link_listeners.append(self.linked)

    async def stop(self) -> None:
        with contextlib.suppress(ValueError):
            self.registry.link_listeners.remove(self.linked)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def linked(self, provider: str) -> None:
        """``provider`` linked here: arm its live leases' watches (in a task)."""
        task = asyncio.get_running_loop().create_task(self._arm(provider))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _arm(self, provider: str) -> None:
        try:
            leases = await self.store.live_leases(provider_pubkey=provider)
        except Exception:
            self.log.exception("could not load the live leases of %s to watch them", provider)
            return
        for lease in leases:
            self.arm(lease)
