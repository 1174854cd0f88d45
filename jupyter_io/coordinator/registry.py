"""Live providers: who is linked, what they offer, what they host, and who went quiet.

The :class:`Registry` is the coordinator's in-memory view of its providers, kept in step with
the durable :class:`~jupyter_io.coordinator.store.Store` and the scheduler's
:class:`~jupyter_io.coordinator.scheduler.OfferIndex`:

* :meth:`Registry.start` rebuilds the index from :meth:`Store.load_live_offers` (a restarted
  coordinator knows every live offer and lease at once; each provider then has a full
  ``heartbeat_misses`` x ``heartbeat_interval`` window to reconnect) and starts two tasks:
  the heartbeat flush (every ``flush_interval``, one :meth:`Store.record_heartbeats` for all
  heartbeats since the last flush) and the sweep (loss detection and token expiry);
* :meth:`Registry.connect` takes a verified hello: provider and inventory to the store
  (:meth:`Store.upsert_provider`, :meth:`Store.replace_offers`), one
  :class:`~jupyter_io.coordinator.scheduler.Offer` per offer group into the index, and the
  provider's ``sessions`` reconciled with its live leases (kept; active leases it no longer
  hosts fail; sessions of leases that are not live get an ``end``);
* :meth:`Registry.heartbeat` is the hot path: no I/O, no allocation beyond the batch entry;
* a provider silent for ``heartbeat_misses`` intervals is lost (:meth:`Store.mark_provider_lost`:
  its live leases fail with ``end_of_service`` = its last heartbeat) and its offers leave the
  index; a provider that reconnects in time keeps the leases it lists in ``sessions``.

The lease service calls :meth:`lease_created`, :meth:`lease_over` and :meth:`resync` to keep
capacity exact; the relay subscribes to :attr:`lease_listeners` to close the sockets of
leases that end. With several coordinators (replicas) on one PostgreSQL,
:class:`~jupyter_io.coordinator.replicas.ReplicaService` feeds :meth:`refresh` from the
database's change feed: providers linked at other replicas are indexed too
(:attr:`ProviderState.elsewhere`), leases made or ended elsewhere hold or free their GPUs, and
:meth:`deliver` leaves messages for providers linked elsewhere in the outbox. Without it (a
SQLite coordinator) only providers linked here (and, right after its start, those the store
says are online) are scheduled. Before marking a provider lost a coordinator re-reads the
store, so a provider heartbeating through another coordinator is never failed by this one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from solders.keypair import Keypair
from solders.pubkey import Pubkey

from ..errors import AuthError, ProtocolError
from ..gpu_names import normalise_gpu_name
from ..provider_link import (
    End,
    GpuReply,
    Heartbeat,
    Hello,
    LinkMessage,
    SessionEvent,
    SettlementReply,
    Usage,
    Welcome,
    parse_message,
)
from ..signing import sign_welcome, verify_usage
from .models import LeaseState
from .reliability import UNMEASURED_RELIABILITY, WINDOW, ReliabilityBook
from .scheduler import Offer, OfferIndex
from .store import (
    LeaseRecord,
    OfferRecord,
    OfferSpec,
    ProviderProfile,
    ProviderRecord,
    ProviderView,
    Store,
    UsageReport,
)

__all__ = [
    "ProviderState",
    "Registry",
    "RegistryStats",
    "TrackedLease",
]

#: Close code for a link the coordinator drops because the provider went quiet, or because
#: the same provider linked again (RFC 6455 "going away" / normal).
_CLOSE_LOST = 1001
_CLOSE_REPLACED = 1000
#: Region shown for a provider that did not name one (the index needs some region).
_NO_REGION = "unknown"
#: Load changes smaller than this are not worth re-indexing an offer for.
_LOAD_STEP = 0.05
#: Seconds between full reconciles while the change feed runs (a safety net only).
_RECONCILE_WITH_FEED = 300.0


def _utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=timezone.utc)


@dataclass(slots=True)
class TrackedLease:
    """A live lease as the registry tracks it (for capacity and token expiry)."""

    id: str
    user: str
    gpu_model: str
    indices: frozenset[int]
    state: LeaseState
    token_expires_at: float | None

    @classmethod
    def of(cls, record: LeaseRecord) -> TrackedLease:
        expires = record.token_expires_at
        return cls(
            id=record.id,
            user=record.user_pubkey,
            gpu_model=record.gpu_model,
            indices=frozenset(record.gpu_indices),
            state=record.state,
            token_expires_at=None if expires is None else expires.timestamp(),
        )


@dataclass(slots=True)
class ProviderState:
    """One provider as this coordinator sees it."""

    pubkey: str
    name: str
    region: str
    reachable_url: str | None
    offers: list[OfferRecord]
    leases: dict[str, TrackedLease]
    sessions_ok: int
    sessions_failed: int
    times_lost: int
    #: The link's session object while linked here, else None.
    link: Any = None
    #: ``time.monotonic()`` of the last heartbeat (or of the link, or of the restart).
    last_seen: float = 0.0
    #: Wall-clock time of the last heartbeat received here.
    last_beat: float = 0.0
    load: float = 0.0
    sessions: frozenset[str] = frozenset()
    #: Loaded from the store at start-up and not linked since.
    restored: bool = False
    #: The store's number of the link held here (:attr:`ProviderRecord.link_generation`).
    link_generation: int = 0
    #: Linked at another replica sharing the database (:mod:`.replicas`): scheduled here,
    #: its messages go through the outbox, its loss is not this replica's to detect.
    elsewhere: bool = False
    #: The replica holding its latest link, as the store said at the last refresh.
    replica_id: str | None = None

    @property
    def linked(self) -> bool:
        return self.link is not None

    def free_gpus(self, group: OfferRecord) -> int:
        """GPUs of ``group`` a new lease could get, counted as the store counts them."""
        devices = frozenset(group.gpu_indices)
        holding = [held for lease in self.leases.values() if (held := lease.indices & devices)]
        if len(holding) >= group.max_kernels:
            return 0
        return group.count - len(frozenset().union(*holding))


@dataclass(slots=True)
class RegistryStats:
    """Counters for the status endpoint and the benchmark."""

    heartbeats: int = 0
    heartbeats_flushed: int = 0
    #: Heartbeats a flush left for the next one (their rows were locked by a transaction).
    heartbeats_deferred: int = 0
    flushes: int = 0
    flush_seconds: float = 0.0
    providers_lost: int = 0
    providers_offline: int = 0
    links: int = 0
    usage_received: int = 0
    usage_stored: int = 0
    usage_refused: int = 0
    started: float = field(default_factory=time.monotonic)


class Registry:
    """Live providers (see the module docstring). Use from the coordinator's event loop."""

    def __init__(
        self,
        store: Store,
        index: OfferIndex,
        *,
        coordinator: Pubkey,
        keypair: Keypair | None = None,
        heartbeat_interval: float = 5.0,
        heartbeat_misses: int = 3,
        flush_interval: float = 1.0,
        reconcile_interval: float = 10.0,
        log: logging.Logger | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if min(heartbeat_interval, flush_interval, reconcile_interval) <= 0 or heartbeat_misses < 1:
            raise ValueError("intervals must be positive and heartbeat_misses at least 1")
        self.store = store
        self.index = index
        self.coordinator = coordinator
        #: Signs welcomes, proving this coordinator's key to providers (None: unsigned).
        self.keypair = keypair
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_misses = heartbeat_misses
        self.flush_interval = flush_interval
        self.reconcile_interval = reconcile_interval
        self.log = log or logging.getLogger("jupyter_io.coordinator")
        self.clock = clock
        self.monotonic = monotonic
        self.stats = RegistryStats()
        #: Called with ``(lease_id, reason)`` whenever a live lease ends or fails.
        self.lease_listeners: list[Callable[[str, str], None]] = []
        #: Called with the lease record when a lease becomes active here.
        self.activation_listeners: list[Callable[[LeaseRecord], None]] = []
        #: Called with the provider's key when a provider links here.
        self.link_listeners: list[Callable[[str], None]] = []
        #: Called with the provider's key when its link here closes.
        self.unlink_listeners: list[Callable[[str], None]] = []
        #: This replica's id (:class:`~jupyter_io.coordinator.replicas.ReplicaService`
        #: sets it; stored with each link it holds), and whether the change feed and the
        #: outbox run: then providers linked at other replicas are in the index too
        #: (:meth:`refresh`), and :meth:`deliver` posts to the outbox.
        self.replica_id: str | None = None
        self.replicated = False
        #: The change feed's position the view loaded by :meth:`start` is current at.
        self.view_seq = 0
        self._refresh_later: set[str] = set()
        #: Called with each verified usage report (a cohort's idle watch reads
        #: ``idle_seconds``).
        self.usage_listeners: list[Callable[[Usage], None]] = []
        #: Called with each lease the lease service stored here (a cohort's queue and
        #: reservations count the class's leases).
        self.creation_listeners: list[Callable[[LeaseRecord], None]] = []
        #: Gets each provider's answer to a ``sign_settlement`` (the settlement worker).
        self.settlement_replies: Callable[[str, SettlementReply], None] | None = None
        #: Gets each provider's GPU challenge messages (the challenge service).
        self.gpu_replies: Callable[[str, GpuReply], None] | None = None
        #: Whether an offer (provider, GPU model) may be listed (None: all are; the
        #: challenge service delists offers that failed a GPU challenge).
        self.offer_listed: Callable[[str, str], bool] | None = None
        self._providers: dict[str, ProviderState] = {}
        self._pending: dict[str, float] = {}  # heartbeats since the last flush
        self._undelivered: dict[str, list[tuple[float, LinkMessage]]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self._stopping = False
        self._waiters = 0  # wait_for() callers: only then do heartbeats notify
        #: Measured reliability of the providers watched here (30-day records), refreshed
        #: when one links, when its lease ends, and every ``reliability_interval`` seconds.
        self.reliability = ReliabilityBook(store, clock=clock, log=self.log)
        self.reliability_interval = 60.0

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def loss_window(self) -> float:
        """Seconds of silence after which a provider is lost."""
        return self.heartbeat_interval * self.heartbeat_misses

    async def start(self) -> None:
        """Rebuild the index from the store, then start the flush and sweep tasks."""
        if self.replicated:  # before the load: changes made during it are read again
            self.view_seq = await self.store.replicas.last_seq()
        offers = await self.store.load_live_offers()
        leases = await self.store.live_leases()
        now = self.monotonic()
        records: dict[str, ProviderRecord] = {}
        groups: dict[str, list[OfferRecord]] = {}
        for live in offers:
            records[live.offer.provider_pubkey] = live.provider
            groups.setdefault(live.offer.provider_pubkey, []).append(live.offer)
        for pubkey, record in records.items():
            elsewhere = self.replicated and record.replica_id not in (None, self.replica_id)
            self._providers[pubkey] = ProviderState(
                pubkey=pubkey,
                name=record.display_name,
                region=record.region,
                reachable_url=record.reachable_url,
                offers=groups[pubkey],
                leases={},
                sessions_ok=record.sessions_ok,
                sessions_failed=record.sessions_failed,
                times_lost=record.times_lost,
                last_seen=now,  # a full window to reconnect after the restart
                last_beat=record.last_heartbeat.timestamp(),
                restored=not elsewhere,
                link_generation=record.link_generation,
                elsewhere=elsewhere,
                replica_id=record.replica_id,
            )
        for lease in leases:
            state = self._providers.get(lease.provider_pubkey)
            if state is not None:
                state.leases[lease.id] = TrackedLease.of(lease)
        await self.reliability.refresh(self._providers)
        for state in self._providers.values():
            self._reindex(state)
        self.log.info(
            "registry: %d live offers of %d providers and %d live leases restored",
            len(self.index),
            len(self._providers),
            len(leases),
        )
        # With the change feed, leases made or ended elsewhere arrive through refresh();
        # the full scan stays as a rare safety net.
        reconcile_every = (
            max(self.reconcile_interval, _RECONCILE_WITH_FEED)
            if self.replicated
            else self.reconcile_interval
        )
        self._tasks = [
            asyncio.create_task(self._every(self.flush_interval, self.flush), name="flush"),
            asyncio.create_task(self._every(self._sweep_period(), self.sweep), name="sweep"),
            asyncio.create_task(self._every(reconcile_every, self.reconcile), name="reconcile"),
            asyncio.create_task(
                self._every(self.reliability_interval, self.refresh_reliability),
                name="reliability",
            ),
        ]

    async def stop(self) -> None:
        """Stop the tasks, close every link with 1001 (providers reconnect to the next
        coordinator) and flush the last heartbeats. Nothing is marked lost or offline."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        for state in self._providers.values():
            if state.link is not None:
                state.link.close(_CLOSE_LOST, "coordinator shutting down; reconnect shortly")
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self.flush()

    def _sweep_period(self) -> float:
        return min(1.0, max(0.02, self.heartbeat_interval / 2))

    async def _every(self, period: float, job: Callable[[], Any]) -> None:
        while True:
            await asyncio.sleep(period)
            try:
                await job()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.log.exception("registry: %s failed; retrying", getattr(job, "__name__", job))

    # -- reading ---------------------------------------------------------------------------

    def provider(self, pubkey: str) -> ProviderState | None:
        """The provider's state, or None if it is neither linked nor being watched."""
        return self._providers.get(pubkey)

    def providers(self) -> list[ProviderState]:
        """Every provider linked here or being watched."""
        return list(self._providers.values())

    def linked_count(self) -> int:
        return sum(1 for state in self._providers.values() if state.link is not None)

    def linked_here(self, pubkey: str) -> bool:
        """Whether provider ``pubkey`` holds a link to this coordinator now."""
        state = self._providers.get(pubkey)
        return state is not None and state.link is not None

    def linked_keys(self) -> list[str]:
        """Public keys of the providers linked here."""
        return [key for key, state in self._providers.items() if state.link is not None]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> None:
        """Wait until ``predicate()`` holds, re-checking after every change the registry makes
        (links, heartbeats, losses, lease changes, flushes). Raises
        :class:`asyncio.TimeoutError`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self._waiters += 1
        try:
            while True:
                event = self._changed
                if predicate():
                    return
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise asyncio.TimeoutError(f"condition not met within {timeout} s")
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(event.wait(), remaining)
        finally:
            self._waiters -= 1

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # -- the provider link -----------------------------------------------------------------

    def _lock(self, pubkey: str) -> asyncio.Lock:
        lock = self._locks.get(pubkey)
        if lock is None:
            lock = self._locks[pubkey] = asyncio.Lock()
        return lock

    async def connect(
        self, pubkey: str, link: Any, hello: Hello
    ) -> tuple[Welcome, list[LinkMessage]]:
        """A provider proved its key: store it and its inventory, reconcile its sessions,
        index its offers. Returns the ``welcome`` and the messages to send after it (``end``
        for sessions of leases that are not live, ``dial`` queued while it was away).

        Raises :class:`ProtocolError` for an inventory the store cannot take (two offers of
        one GPU model, or overlapping device indices), before writing anything.
        """
        inventory = hello.inventory
        specs = _offer_specs(inventory)
        async with self._lock(pubkey):
            wall = self.clock()
            at = _utc(wall)
            previous = await self.store.get_provider(pubkey)
            profile = ProviderProfile(
                pubkey, inventory.name, inventory.region, inventory.reachable_url
            )
            record = await self.store.upsert_provider(profile, at=at, replica_id=self.replica_id)
            offers = await self.store.replace_offers(pubkey, specs, at=at)
            live = await self.store.live_leases(provider_pubkey=pubkey)
            # Billing of a session the provider lost stops at its last heartbeat before now.
            end_of_service = previous.last_heartbeat if previous is not None else at
            kept: dict[str, TrackedLease] = {}
            failed: list[str] = []
            for lease in live:
                if lease.state is LeaseState.ACTIVE and lease.id not in hello.sessions:
                    reason = (
                        f"provider {pubkey} reconnected without the session of lease "
                        f"{lease.id} (its kernel is gone)"
                    )
                    if await self.store.fail_lease(
                        lease.id, reason, at=at, end_of_service=end_of_service
                    ):
                        failed.append(lease.id)
                else:
                    kept[lease.id] = TrackedLease.of(lease)
            follow_up: list[LinkMessage] = [
                End(lease_id, "this lease is not live (ended, failed or unknown); stop it")
                for lease_id in sorted(hello.sessions - kept.keys())
            ]
            old = self._providers.get(pubkey)
            if old is not None and old.link is not None and old.link is not link:
                old.link.close(_CLOSE_REPLACED, "replaced by a newer link from this provider")
            state = ProviderState(
                pubkey=pubkey,
                name=inventory.name,
                region=inventory.region,
                reachable_url=inventory.reachable_url,
                offers=offers,
                leases=kept,
                sessions_ok=record.sessions_ok,
                sessions_failed=record.sessions_failed + len(failed),
                times_lost=record.times_lost,
                link=link,
                last_seen=self.monotonic(),
                last_beat=wall,
                sessions=hello.sessions,
                link_generation=record.link_generation,
            )
            self._providers[pubkey] = state
            await self.reliability.refresh([pubkey])
            self._reindex(state)
            now = self.monotonic()
            for deadline, message in self._undelivered.pop(pubkey, ()):
                if deadline > now:
                    follow_up.append(message)
            if self.replicated:  # dials and ends other replicas left for it
                for row in await self.store.replicas.take_messages([pubkey]):
                    follow_up.append(parse_message(row.body))
            self.stats.links += 1
        self.log.info(
            "provider %s linked (%s, %d offer group(s), %d live lease(s) kept)",
            pubkey,
            inventory.region or "no region",
            len(offers),
            len(kept),
        )
        for lease_id in failed:
            self._lease_gone(lease_id, "failed: the provider no longer hosts its session")
        self._call_listeners(self.link_listeners, pubkey)
        self._notify()
        signature = None
        if hello.nonce is not None and self.keypair is not None:
            signature = sign_welcome(self.keypair, Pubkey.from_string(pubkey), hello.nonce)
        return Welcome(self.heartbeat_interval, str(self.coordinator), signature), follow_up

    def heartbeat(self, pubkey: str, link: Any, beat: Heartbeat) -> None:
        """A heartbeat from a linked provider: remember it for the next flush."""
        state = self._providers.get(pubkey)
        if state is None or state.link is not link:
            return  # a replaced link's late message
        state.last_seen = self.monotonic()
        state.last_beat = self._pending[pubkey] = self.clock()
        self.stats.heartbeats += 1
        state.sessions = beat.sessions
        if abs(beat.load - state.load) >= _LOAD_STEP or (
            beat.load != state.load and beat.load in (0.0, 1.0)
        ):
            state.load = beat.load
            self._reindex(state)
        if self._waiters:
            self._notify()

    async def session_event(self, pubkey: str, event: SessionEvent) -> None:
        """A lease's session attached (``active``) or ended on the provider."""
        state = self._providers.get(pubkey)
        tracked = state.leases.get(event.lease) if state is not None else None
        if tracked is None:
            record = await self.store.get_lease(event.lease)
            if record is None or record.provider_pubkey != pubkey:
                self.log.warning(
                    "provider %s reported a session for lease %s, which is not its lease",
                    pubkey,
                    event.lease,
                )
                return
            if not record.live:
                if event.state == "active" and state is not None and state.link is not None:
                    state.link.send(End(event.lease, f"lease is {record.state.value}; stop it"))
                return
            tracked = TrackedLease.of(record)  # made by another coordinator: track it
            if state is not None:
                state.leases[tracked.id] = tracked
        at = _utc(self.clock())
        if event.state == "active":
            if await self.store.activate_lease(event.lease, at=at):
                tracked.state = LeaseState.ACTIVE
                activated = await self.store.get_lease(event.lease)
                if activated is not None:
                    self._call_listeners(self.activation_listeners, activated)
            self._notify()
            return
        reason = "the provider ended the session"
        if await self.store.end_lease(event.lease, reason, at=at):
            self.lease_over(pubkey, event.lease, ok=True, reason=reason)
        else:
            self._forget_lease(pubkey, event.lease)
            self._notify()

    async def usage_report(self, pubkey: str, usage: Usage) -> bool:
        """Store a signed usage report (``seconds`` is the total delivered so far).

        The store keeps increments: the report is stored with ``seconds`` minus what earlier
        reports of the lease already account for (never negative), so the store's sum is the
        largest total reported, whatever the order or duplication of reports. Idempotent by
        ``(lease, seq)``. Raises :class:`AuthError` for a bad signature or a lease that is not
        this provider's. Returns whether the report was new.
        """
        try:
            verify_usage(Pubkey.from_string(pubkey), usage.raw)
            lease = await self.store.get_lease(usage.lease)
            if lease is None or lease.provider_pubkey != pubkey:
                raise AuthError(f"lease {usage.lease!r} is not hosted by provider {pubkey}")
        except AuthError:
            self.stats.usage_received += 1
            self.stats.usage_refused += 1
            self._notify()
            raise
        so_far = await self.store.usage_for_lease(usage.lease)
        report = UsageReport(
            lease_id=usage.lease,
            seq=usage.seq,
            seconds_delivered=max(0, usage.seconds - so_far),
            signature=usage.signature,
            reported_at=_utc(usage.at),
            gpu_utilisation=usage.gpu_utilisation,
            received_at=_utc(self.clock()),
        )
        stored = await self.store.add_usage_report(report)
        self.stats.usage_received += 1
        self.stats.usage_stored += stored
        self._call_listeners(self.usage_listeners, usage)
        self._notify()
        return stored

    def disconnected(self, pubkey: str, link: Any, code: int | None) -> None:
        """The link closed. The provider stops being scheduled; it is watched for the rest of
        its loss window (a reconnect keeps its leases). A provider that said goodbye
        (1000/1001) with no live lease is marked offline at once."""
        state = self._providers.get(pubkey)
        if self._stopping or state is None or state.link is not link:
            return
        state.link = None
        self.index.remove_provider(pubkey)
        self._call_listeners(self.unlink_listeners, pubkey)
        if code in (1000, 1001) and not state.leases:
            del self._providers[pubkey]
            self.reliability.forget(pubkey)
            self._spawn(self._goodbye(pubkey, state.link_generation))
        self.log.info("provider %s link closed (code %s)", pubkey, code)
        self._notify()

    async def _goodbye(self, pubkey: str, generation: int) -> None:
        async with self._lock(pubkey):
            if pubkey in self._providers:
                return  # it came back meanwhile
            beat = self._pending.pop(pubkey, None)
            if beat is not None:
                await self.store.record_heartbeats({pubkey: _utc(beat)})
            # Only if the link that said goodbye is still its latest: a provider that linked
            # again meanwhile, to another coordinator on this database, stays online there.
            if await self.store.mark_provider_offline(
                pubkey, at=_utc(self.clock()), link_generation=generation
            ):
                self.stats.providers_offline += 1
            else:
                self.log.info("provider %s linked again elsewhere: left online", pubkey)
        self._notify()

    def deliver(self, pubkey: str, message: LinkMessage, *, ttl: float) -> bool:
        """Send ``message`` to a provider now if it is linked here, else when it links within
        ``ttl`` seconds: with replicas, through the outbox (the replica holding its link, or
        the next one it links to within ``ttl``, sends it; ``ttl=0``: only if linked here).
        Returns whether it was sent now."""
        state = self._providers.get(pubkey)
        if state is not None and state.link is not None:
            state.link.send(message)
            return True
        if self.replicated:
            if ttl > 0:
                self._spawn(self.store.replicas.post_message(pubkey, message.to_json(), ttl))
            return False
        queue = self._undelivered.setdefault(pubkey, [])
        now = self.monotonic()
        queue[:] = [(deadline, m) for deadline, m in queue if deadline > now]
        queue.append((now + ttl, message))
        return False

    # -- heartbeats and loss -----------------------------------------------------------------

    async def flush(self) -> int:
        """Write the heartbeats received since the last flush without waiting on row locks
        (:meth:`Store.flush_heartbeats`); those of providers whose rows another transaction
        held stay pending for the next flush. Returns how many were written."""
        if not self._pending:
            return 0
        batch, self._pending = self._pending, {}
        started = time.perf_counter()
        kept = batch  # kept for the next flush unless written
        try:
            done = await self.store.flush_heartbeats({k: _utc(v) for k, v in batch.items()})
            kept = {pubkey: batch[pubkey] for pubkey in done.skipped if pubkey in batch}
        finally:
            for pubkey, beat in kept.items():
                self._pending[pubkey] = max(beat, self._pending.get(pubkey, beat))
        self.stats.flushes += 1
        self.stats.heartbeats_flushed += len(batch) - len(kept)
        self.stats.heartbeats_deferred += len(kept)
        self.stats.flush_seconds += time.perf_counter() - started
        self._notify()
        return len(batch) - len(kept)

    async def sweep(self) -> None:
        """Mark providers silent for the loss window lost; end requested leases whose token
        expired unused. The sweep task calls this; tests may too."""
        now = self.monotonic()
        window = self.loss_window
        for state in list(self._providers.values()):
            if not state.elsewhere and now - state.last_seen > window:
                await self._check_silent(state.pubkey)
        wall = self.clock()
        for state in list(self._providers.values()):
            if state.elsewhere:
                continue  # its replica expires its leases
            for lease in list(state.leases.values()):
                if (
                    lease.state is LeaseState.REQUESTED
                    and lease.token_expires_at is not None
                    and lease.token_expires_at <= wall
                ):
                    await self._expire(state.pubkey, lease.id)

    async def reconcile(self) -> None:
        """Bring the live leases of the providers watched here in line with the store.

        Other coordinators sharing the database create and end leases too: a lease made
        elsewhere on a provider linked here starts holding its GPUs in this index, and a lease
        ended or failed elsewhere frees them and its provider is sent ``end`` (and its relayed
        connections closed). The reconcile task runs this every ``reconcile_interval``.
        """
        live = await self.store.live_leases()
        by_provider: dict[str, dict[str, LeaseRecord]] = {}
        for lease in live:
            by_provider.setdefault(lease.provider_pubkey, {})[lease.id] = lease
        changed: list[ProviderState] = []
        vanished: list[tuple[str, str]] = []
        for state in list(self._providers.values()):
            fresh = by_provider.get(state.pubkey, {})
            for lease_id, lease in fresh.items():
                if lease_id not in state.leases:
                    state.leases[lease_id] = TrackedLease.of(lease)
                    changed.append(state)
            vanished += [(state.pubkey, i) for i in state.leases if i not in fresh]
        for state in changed:
            self._reindex(state)
        for pubkey, lease_id in vanished:
            # Made here after the snapshot, or really over: ask the store about this one.
            record = await self.store.replicas.lease(lease_id)  # the feed's own pool
            if record is None or record.live:
                continue
            holder = self._providers.get(pubkey)
            if holder is None or lease_id not in holder.leases:
                continue
            why = f"lease {record.state.value} (by another coordinator)"
            self.deliver(pubkey, End(lease_id, why), ttl=0)
            self.lease_over(pubkey, lease_id, ok=record.state is LeaseState.ENDED, reason=why)

    # -- replicas: the change feed and the outbox -------------------------------------------

    async def refresh(self, pubkeys: Collection[str]) -> None:
        """Bring these providers' view in line with the store (the change feed named them).

        One batch of queries whatever their number. A provider linked at another replica is
        indexed as :attr:`ProviderState.elsewhere` (its offers and live leases as stored); one
        the store no longer has online leaves the index; for one linked here the leases made
        or ended elsewhere hold or free their GPUs, and an ended one's ``end`` is sent to the
        provider. A provider whose link is being set up here is refreshed on the next call.
        """
        keys = set(pubkeys) | self._refresh_later
        self._refresh_later = set()
        keys -= self._busy(keys)
        if not keys:
            return
        views = await self.store.replicas.provider_views(keys)
        busy = self._busy(keys)  # links made while the views were read
        vanished: list[tuple[str, str]] = []
        fresh: list[str] = []
        for pubkey in sorted(keys - busy):
            if self._apply_view(pubkey, views.get(pubkey), vanished):
                fresh.append(pubkey)
        if fresh:
            # Read through the feed's own connections (lease transactions waiting on row
            # locks can spend the main pool's for seconds).
            await self.reliability.refresh(fresh, queries=self.store.replicas.reliability)
            for pubkey in fresh:
                if (state := self._providers.get(pubkey)) is not None:
                    self._reindex(state)
        for pubkey, lease_id in vanished:
            # Made here after the views were read, or really over: ask the store.
            record = await self.store.get_lease(lease_id)
            if record is None or record.live:
                continue
            holder = self._providers.get(pubkey)
            if holder is None or lease_id not in holder.leases:
                continue
            why = f"lease {record.state.value} (by another coordinator)"
            if holder.link is not None:
                self.deliver(pubkey, End(lease_id, why), ttl=0)
                self.lease_over(pubkey, lease_id, ok=record.state is LeaseState.ENDED, reason=why)
            else:
                self._forget_lease(pubkey, lease_id)
                self._lease_gone(lease_id, why)
        self._notify()

    def _busy(self, keys: Collection[str]) -> set[str]:
        busy = {k for k in keys if (lock := self._locks.get(k)) is not None and lock.locked()}
        self._refresh_later |= busy
        return busy

    def _apply_view(
        self, pubkey: str, view: ProviderView | None, vanished: list[tuple[str, str]]
    ) -> bool:
        """Apply one provider's stored view; True when it (re)joined the index as linked
        elsewhere (its reliability is to be measured)."""
        state = self._providers.get(pubkey)
        record = None if view is None else view.provider
        if state is not None and state.link is not None:
            if record is not None and record.link_generation > state.link_generation:
                # It linked again at another replica: this link is stale.
                state.link.close(_CLOSE_REPLACED, "linked again at another coordinator")
                state.link = None
                self._call_listeners(self.unlink_listeners, pubkey)
            else:
                self._sync_leases(state, view, vanished)
                return False
        if view is None or record is None or not record.online:
            if state is not None:
                self._drop(state, "not online in the store")
                for lease_id in list(state.leases):  # failed or ended with their provider
                    self._lease_gone(lease_id, "its provider is no longer online")
            return False
        if (
            state is not None
            and not state.elsewhere
            and record.link_generation == state.link_generation
            and record.replica_id in (None, self.replica_id)
        ):
            self._sync_leases(state, view, vanished)  # its link here closed: still watched
            return False
        known = {} if state is None else state.leases
        leases = {lease.id: TrackedLease.of(lease) for lease in view.leases}
        vanished += [(pubkey, lease_id) for lease_id in known if lease_id not in leases]
        for lease_id in known.keys() - leases.keys():
            leases[lease_id] = known[lease_id]  # until the store confirms it is over
        self.index.remove_provider(pubkey)  # offer groups may have gone
        new = ProviderState(
            pubkey=pubkey,
            name=record.display_name,
            region=record.region,
            reachable_url=record.reachable_url,
            offers=view.offers,
            leases=leases,
            sessions_ok=record.sessions_ok,
            sessions_failed=record.sessions_failed,
            times_lost=record.times_lost,
            last_seen=self.monotonic(),
            last_beat=record.last_heartbeat.timestamp(),
            link_generation=record.link_generation,
            elsewhere=True,
            replica_id=record.replica_id,
        )
        self._providers[pubkey] = new
        if state is None or not state.elsewhere:
            return True
        self._reindex(new)
        return False

    def _sync_leases(
        self, state: ProviderState, view: ProviderView | None, vanished: list[tuple[str, str]]
    ) -> None:
        stored = {} if view is None else {lease.id: lease for lease in view.leases}
        vanished += [(state.pubkey, i) for i in state.leases if i not in stored]
        added = False
        for lease_id, lease in stored.items():
            if lease_id not in state.leases:
                state.leases[lease_id] = TrackedLease.of(lease)
                added = True
        if added:
            self._reindex(state)

    def send_outbox(self, rows: Collection[Any]) -> int:
        """Send messages taken from the outbox (rows with ``pubkey`` and ``body``) to the
        providers linked here; a row whose provider is no longer linked here is posted again
        for its next link (a minute). Returns how many were sent."""
        sent = 0
        for row in rows:
            message = parse_message(row.body)
            if self.linked_here(row.pubkey):
                self.deliver(row.pubkey, message, ttl=0)
                sent += 1
            else:
                self._spawn(self.store.replicas.post_message(row.pubkey, row.body, 60.0))
        return sent

    async def _check_silent(self, pubkey: str) -> None:
        async with self._lock(pubkey):
            state = self._providers.get(pubkey)
            if state is None or self.monotonic() - state.last_seen <= self.loss_window:
                return  # reconnected or heartbeated meanwhile
            record = await self.store.get_provider(pubkey)
            wall = self.clock()
            if record is None or not record.online:
                self._drop(state, "not online in the store")
                return
            # A heartbeat stored after this one came through another coordinator.
            newest_here = max(state.last_beat, wall - self.loss_window)
            if record.last_heartbeat.timestamp() > newest_here:
                self._linked_elsewhere(state)
                return
            beat = self._pending.pop(pubkey, None)
            if beat is not None:
                await self.store.record_heartbeats({pubkey: _utc(beat)})
            # Conditional: a heartbeat another coordinator stores between the read above and
            # this write (the provider relinked there just now) leaves it online.
            lost = await self.store.mark_silent_provider_lost(
                pubkey,
                silent_since=_utc(newest_here + 0.001),
                at=_utc(wall),
                heartbeats_missed=self.heartbeat_misses,
            )
            if lost is None:
                self._linked_elsewhere(state)
                return
            failed = lost
            self._drop(state, "lost")
            self.stats.providers_lost += 1
            if state.link is not None:
                state.link.close(
                    _CLOSE_LOST, f"no heartbeat for {self.loss_window:g} s: marked lost"
                )
        self.log.warning(
            "provider %s lost: no heartbeat for %g s; %d lease(s) failed",
            pubkey,
            self.loss_window,
            len(failed),
        )
        for lease in failed:
            self._lease_gone(lease.id, "failed: its provider was lost")
        self._notify()

    def _linked_elsewhere(self, state: ProviderState) -> None:
        """Another coordinator stored a fresher heartbeat: the provider is linked there."""
        self._drop(state, "linked to another coordinator")
        if self.replicated:
            self._refresh_later.add(state.pubkey)  # back in the index as linked elsewhere
        self._notify()

    async def refresh_reliability(self) -> None:
        """Re-measure every provider watched here (the window rolls), re-index those whose
        figure changed, and prune link records out of every window. The reliability task
        runs this every ``reliability_interval``; tests may too."""
        changed = await self.reliability.refresh(self._providers)
        for pubkey in changed:
            if (state := self._providers.get(pubkey)) is not None:
                self._reindex(state)
        await self.store.prune_provider_links(_utc(self.clock() - WINDOW - 86400))
        if changed:
            self._notify()

    async def _refresh_reliability_of(self, pubkey: str) -> None:
        if pubkey in await self.reliability.refresh([pubkey]):
            if (state := self._providers.get(pubkey)) is not None:
                self._reindex(state)
            self._notify()

    def _drop(self, state: ProviderState, why: str) -> None:
        self.reliability.forget(state.pubkey)
        self._providers.pop(state.pubkey, None)
        self._pending.pop(state.pubkey, None)
        self.index.remove_provider(state.pubkey)
        self.log.debug("registry: stopped watching %s (%s)", state.pubkey, why)

    async def _expire(self, pubkey: str, lease_id: str) -> None:
        reason = "the lease token expired before the lease was used"
        if await self.store.end_lease(lease_id, reason, at=_utc(self.clock())):
            self.deliver(pubkey, End(lease_id, reason), ttl=0)
            self.lease_over(pubkey, lease_id, ok=True, reason=reason)
        else:
            self._forget_lease(pubkey, lease_id)

    # -- leases (called by the lease service) ----------------------------------------------

    def lease_created(self, lease: LeaseRecord) -> None:
        """A lease was stored: hold its GPUs in the index."""
        state = self._providers.get(lease.provider_pubkey)
        if state is not None:
            state.leases[lease.id] = TrackedLease.of(lease)
            self._reindex(state)
        self._call_listeners(self.creation_listeners, lease)
        self._notify()

    def lease_token_renewed(self, lease: LeaseRecord) -> None:
        """A live lease got a fresh token (its expiry moved)."""
        state = self._providers.get(lease.provider_pubkey)
        if state is not None and lease.id in state.leases:
            state.leases[lease.id] = TrackedLease.of(lease)

    def lease_over(self, pubkey: str, lease_id: str, *, ok: bool, reason: str) -> None:
        """A live lease ended (``ok``) or failed: free its GPUs and tell the listeners."""
        state = self._providers.get(pubkey)
        if state is not None:
            if ok:
                state.sessions_ok += 1
            else:
                state.sessions_failed += 1
            self._spawn(self._refresh_reliability_of(pubkey))
        self._forget_lease(pubkey, lease_id)
        self._lease_gone(lease_id, reason)
        self._notify()

    def _forget_lease(self, pubkey: str, lease_id: str) -> None:
        state = self._providers.get(pubkey)
        if state is not None and state.leases.pop(lease_id, None) is not None:
            self._reindex(state)

    def settlement_reply(self, pubkey: str, reply: SettlementReply) -> None:
        """A provider answered a ``sign_settlement``: hand it to the settlement worker."""
        if self.settlement_replies is None:
            self.log.info("ignoring a %s from %s: payments are off", reply.type, pubkey)
            return
        self.settlement_replies(pubkey, reply)

    def _call_listeners(self, listeners: list[Callable[[Any], None]], value: Any) -> None:
        for listener in list(listeners):
            try:
                listener(value)
            except Exception:
                self.log.exception("registry listener failed")

    def _lease_gone(self, lease_id: str, reason: str) -> None:
        for listener in list(self.lease_listeners):
            try:
                listener(lease_id, reason)
            except Exception:
                self.log.exception("lease listener failed for %s", lease_id)

    async def resync(self, pubkey: str) -> None:
        """Reload a provider's live leases from the store (after the store refused a lease
        the index thought possible: another coordinator took the GPUs)."""
        live = await self.store.live_leases(provider_pubkey=pubkey)
        state = self._providers.get(pubkey)
        if state is not None:
            state.leases = {lease.id: TrackedLease.of(lease) for lease in live}
            self._reindex(state)

    # -- the index -------------------------------------------------------------------------

    def _reindex(self, state: ProviderState) -> None:
        """Put the provider's offers in the index as they are now (or take them out)."""
        if state.link is None and not state.restored and not state.elsewhere:
            self.index.remove_provider(state.pubkey)
            return
        region = state.region.strip() or _NO_REGION
        figure = self.reliability.get(state.pubkey)
        rel = UNMEASURED_RELIABILITY if figure is None else figure.score
        detail = None if figure is None else figure.to_json()
        listed = self.offer_listed
        for group in state.offers:
            if listed is not None and not listed(state.pubkey, group.gpu_model):
                self.index.remove(state.pubkey, group.gpu_model)
                continue
            self.index.upsert(
                Offer(
                    provider=state.pubkey,
                    gpu=group.gpu_model,
                    # The index needs a positive size; a CPU offer may say 0 bytes of VRAM.
                    vram_bytes=max(1, group.vram_bytes),
                    gpus_total=group.count,
                    gpus_free=state.free_gpus(group),
                    price_lamports_per_hour=group.price_lamports_per_hour,
                    region=region,
                    reliability=rel,
                    reliability_measured=figure is not None,
                    reliability_detail=detail,
                    load=state.load,
                    benchmark_tflops=group.benchmark_tflops,
                    simulated=group.simulated,
                    reachable_url=state.reachable_url,
                )
            )

    def relist(self, pubkey: str) -> None:
        """Put the provider's offers in the index again (after :attr:`offer_listed` changed
        its answer for one of them)."""
        state = self._providers.get(pubkey)
        if state is not None:
            self._reindex(state)
            self._notify()

    def relay_hop_ms(self, pubkey: str) -> float | None:
        """The coordinator's latest round trip to ``pubkey`` over its link, ms (None while the
        provider is not linked here or not measured yet): a relayed session's extra hop."""
        state = self._providers.get(pubkey)
        link = state.link if state is not None else None
        hop = getattr(link, "round_trip_ms", None)
        return hop if isinstance(hop, float) else None

    def group_of(self, pubkey: str, gpu: str) -> OfferRecord | None:
        """The provider's offer group of GPU model ``gpu`` (any spelling), or None."""
        state = self._providers.get(pubkey)
        if state is None:
            return None
        key = normalise_gpu_name(gpu)
        return next((g for g in state.offers if normalise_gpu_name(g.gpu_model) == key), None)

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(self._log_failure)

    def _log_failure(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.log.error("registry task failed", exc_info=task.exception())


def _offer_specs(inventory: Any) -> list[OfferSpec]:
    """The store's offer specs for an inventory; :class:`ProtocolError` if the store or the
    index could not take it (checked before anything is written)."""
    seen: dict[str, str] = {}
    devices: set[int] = set()
    specs: list[OfferSpec] = []
    for group in inventory.offers:
        key = normalise_gpu_name(group.gpu)
        if not key:
            raise ProtocolError(f"provider link: {group.gpu!r} does not name a GPU model")
        if key in seen:
            raise ProtocolError(
                f"provider link: two offers of one GPU model ({seen[key]!r} and {group.gpu!r}); "
                f"publish one offer per model"
            )
        seen[key] = group.gpu
        overlap = devices & set(group.gpu_indices)
        if overlap:
            raise ProtocolError(f"provider link: GPU indices {sorted(overlap)} in two offers")
        devices.update(group.gpu_indices)
        specs.append(
            OfferSpec(
                gpu_model=group.gpu,
                vram_bytes=group.vram_bytes,
                count=group.count,
                price_lamports_per_hour=group.price_lamports_per_hour,
                simulated=group.simulated,
                benchmark_tflops=group.benchmark_tflops,
                driver_version=group.driver,
                cuda_version=group.cuda,
                max_kernels=inventory.max_kernels,
                gpu_indices=group.gpu_indices,
            )
        )
    return specs
