"""Providers and their offers: who is linked, what each offers, and the scheduler's view.

Records :class:`ProviderProfile` (what a provider says when it links), :class:`ProviderRecord`,
:class:`OfferSpec` (its inventory), :class:`OfferRecord` and :class:`LiveOffer` (an offer with
its load); the queries are :class:`ProviderQueries`, part of
:class:`~jupyter_io.coordinator.store.Store`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple, cast

import sqlalchemy as sa

from ..models import LIVE_LEASE_STATES, Lease, Offer, Provider, ProviderStatus
from .engine import Aggregate, _aware, _when
from .reliability import close_link, open_links, outages_before_link

__all__ = [
    "HEARTBEAT_FLUSH_ROWS",
    "HeartbeatFlush",
    "LiveOffer",
    "OfferRecord",
    "OfferSpec",
    "ProviderProfile",
    "ProviderQueries",
    "ProviderRecord",
]

_BASE58 = re.compile(r"[1-9A-HJ-NP-Za-km-z]{32,44}")
_LIVE = tuple(state.value for state in LIVE_LEASE_STATES)

_providers = cast(sa.Table, Provider.__table__)
_offers = cast(sa.Table, Offer.__table__)
_leases = cast(sa.Table, Lease.__table__)


# --------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True, slots=True)
class ProviderProfile:
    """What a provider says about itself when it connects; input to
    :meth:`Store.upsert_provider`."""

    pubkey: str
    display_name: str = ""
    region: str = ""
    reachable_url: str | None = None

    def __post_init__(self) -> None:
        _check_pubkey(self.pubkey, "provider")


@dataclass(frozen=True, slots=True)
class ProviderRecord:
    """A provider as stored, with its reliability counters (see
    :class:`~jupyter_io.coordinator.models.Provider`)."""

    pubkey: str
    display_name: str
    region: str
    reachable_url: str | None
    status: ProviderStatus
    first_seen: datetime
    last_heartbeat: datetime
    online_since: datetime | None
    sessions_ok: int
    sessions_failed: int
    heartbeats_missed: int
    times_lost: int
    online_seconds: int
    #: How many times it linked so far (the latest link's number; see :meth:`Store.
    #: mark_provider_offline`).
    link_generation: int = 0
    #: The replica holding its latest link (None: not linked, or linked by a coordinator
    #: that does not name itself; see :mod:`jupyter_io.coordinator.replicas`).
    replica_id: str | None = None

    @property
    def online(self) -> bool:
        return self.status is ProviderStatus.ONLINE

    def online_seconds_total(self) -> int:
        """Seconds online so far: closed stretches plus the open one up to the last
        heartbeat. Divide by the time since ``first_seen`` for an uptime fraction."""
        if self.online_since is None:
            return self.online_seconds
        open_stretch = (self.last_heartbeat - self.online_since).total_seconds()
        return self.online_seconds + max(0, int(open_stretch))


@dataclass(frozen=True, slots=True)
class OfferSpec:
    """One group of identical GPUs a provider offers; input to :meth:`Store.replace_offers`.

    ``gpu_indices`` are the device indices of the group; leave them out and the store numbers
    the groups' GPUs consecutively from 0, in the order given. ``max_kernels`` (default:
    ``count``) caps the concurrent leases on the group.
    """

    gpu_model: str
    vram_bytes: int
    count: int
    price_lamports_per_hour: int
    simulated: bool = False
    benchmark_tflops: float | None = None
    driver_version: str | None = None
    cuda_version: str | None = None
    max_kernels: int | None = None
    gpu_indices: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not self.gpu_model:
            raise ValueError("an offer needs a GPU model name")
        if self.count < 1:
            raise ValueError(f"an offer needs at least one GPU, not {self.count}")
        if self.vram_bytes < 0 or self.price_lamports_per_hour < 0:
            raise ValueError("VRAM and price cannot be negative")
        if not isinstance(self.price_lamports_per_hour, int):
            raise TypeError("price_lamports_per_hour is an integer number of lamports")
        if self.max_kernels is not None and self.max_kernels < 1:
            raise ValueError(f"max_kernels must be at least 1, not {self.max_kernels}")
        if self.gpu_indices is not None and (
            len(self.gpu_indices) != self.count
            or len(set(self.gpu_indices)) != self.count
            or min(self.gpu_indices) < 0
        ):
            raise ValueError(
                f"gpu_indices {self.gpu_indices} must be {self.count} distinct device indices"
            )


@dataclass(frozen=True, slots=True)
class OfferRecord:
    """An offer as stored."""

    id: int
    provider_pubkey: str
    gpu_model: str
    vram_bytes: int
    count: int
    gpu_indices: tuple[int, ...]
    price_lamports_per_hour: int
    simulated: bool
    benchmark_tflops: float | None
    driver_version: str | None
    cuda_version: str | None
    max_kernels: int
    published_at: datetime


@dataclass(frozen=True, slots=True)
class LiveOffer:
    """An offer of an online provider with its current load, for the scheduler's index."""

    offer: OfferRecord
    provider: ProviderRecord
    #: Indices of the group's GPUs held by requested or active leases.
    leased_indices: frozenset[int]
    #: Requested or active leases on the group.
    live_leases: int

    @property
    def free_gpus(self) -> int:
        """GPUs a new lease could get now (0 when the group runs ``max_kernels`` leases)."""
        if self.live_leases >= self.offer.max_kernels:
            return 0
        return self.offer.count - len(self.leased_indices)


# --------------------------------------------------------------------------------------------
# Queries


#: Providers per transaction of a PostgreSQL heartbeat flush (:meth:`ProviderQueries.
#: flush_heartbeats`): each transaction's row locks last one statement of this many rows.
HEARTBEAT_FLUSH_ROWS = 2000


class HeartbeatFlush(NamedTuple):
    """What :meth:`ProviderQueries.flush_heartbeats` did: ``updated`` rows written, and the
    providers ``skipped`` because another transaction held their rows (flush them again)."""

    updated: int
    skipped: frozenset[str]


class ProviderQueries(Aggregate):
    """Providers linking, heartbeating and leaving, and what they offer."""

    def _provider_upsert(self) -> Any:
        insert = self._insert(_providers)
        excluded = insert.excluded
        return insert.on_conflict_do_update(
            index_elements=[_providers.c.pubkey],
            set_={
                "display_name": excluded.display_name,
                "region": excluded.region,
                "reachable_url": excluded.reachable_url,
                "status": ProviderStatus.ONLINE.value,
                "last_heartbeat": excluded.last_heartbeat,
                "link_generation": _providers.c.link_generation + 1,
                "replica_id": excluded.replica_id,
                # A provider that reconnects while still online keeps its open stretch.
                "online_since": sa.case(
                    (
                        _providers.c.status == ProviderStatus.ONLINE.value,
                        _providers.c.online_since,
                    ),
                    else_=excluded.online_since,
                ),
            },
        )

    @staticmethod
    def _provider_values(
        profile: ProviderProfile, at: datetime, replica_id: str | None = None
    ) -> dict[str, Any]:
        return {
            "pubkey": profile.pubkey,
            "display_name": profile.display_name,
            "region": profile.region,
            "reachable_url": profile.reachable_url,
            "status": ProviderStatus.ONLINE.value,
            "first_seen": at,
            "last_heartbeat": at,
            "online_since": at,
            "link_generation": 1,
            "replica_id": replica_id,
        }

    async def upsert_provider(
        self,
        profile: ProviderProfile,
        *,
        at: datetime | None = None,
        replica_id: str | None = None,
    ) -> ProviderRecord:
        """Register a provider that connected (or update one that reconnected) and mark it
        online; its counters and ``first_seen`` are kept. ``replica_id``: the replica that
        holds this link (other replicas send it the provider's messages through it). Call
        :meth:`replace_offers` next."""
        at = _when(at)
        async with self._write() as conn:
            outages = await outages_before_link(conn, [profile.pubkey])
            row = (
                await conn.execute(
                    self._provider_upsert()
                    .values(self._provider_values(profile, at, replica_id))
                    .returning(*_providers.c)
                )
            ).one()
            await open_links(conn, [profile.pubkey], at, outages)
        return _provider_record(row)

    async def upsert_providers(
        self, profiles: Iterable[ProviderProfile], *, at: datetime | None = None
    ) -> int:
        """:meth:`upsert_provider` for many providers in one transaction (a coordinator
        restart with thousands reconnecting, or a simulation); the last profile of a public key
        given twice wins. Returns how many providers were upserted."""
        at = _when(at)
        # One row per provider (PostgreSQL refuses to upsert a row twice in one statement),
        # sorted like heartbeat batches so concurrent multi-row writes lock in one order.
        latest = {profile.pubkey: profile for profile in profiles}
        rows = [self._provider_values(latest[pubkey], at) for pubkey in sorted(latest)]
        if not rows:
            return 0

        async def upsert() -> None:
            async with self._write() as conn:
                outages = await outages_before_link(conn, sorted(latest))
                await conn.execute(self._provider_upsert(), rows)
                await open_links(conn, sorted(latest), at, outages)

        await self._retrying(upsert)
        return len(rows)

    async def mark_provider_offline(
        self, pubkey: str, *, at: datetime | None = None, link_generation: int | None = None
    ) -> bool:
        """Record that a provider said goodbye at ``at``. Its leases are left alone: end or
        fail them first. With ``link_generation`` (the :attr:`ProviderRecord.link_generation`
        :meth:`upsert_provider` returned for the link that said goodbye), only if the
        provider has not linked again since, here or at another coordinator sharing the
        database: a goodbye on an old link must not take a newer one offline. Returns whether
        it was marked offline."""
        at = _when(at)
        async with self._write() as conn:
            provider = await self._lock_provider(conn, pubkey)
            if provider is None or provider.status != ProviderStatus.ONLINE.value:
                return False
            if link_generation is not None and provider.link_generation != link_generation:
                return False  # linked again since: that link is the provider's now
            # The goodbye itself shows the provider was up until ``at``.
            last_heartbeat = max(provider.last_heartbeat, at)
            await conn.execute(
                sa.update(_providers)
                .where(_providers.c.pubkey == pubkey)
                .values(
                    status=ProviderStatus.OFFLINE.value,
                    last_heartbeat=last_heartbeat,
                    replica_id=None,
                    **_close_online_stretch(provider, last_heartbeat),
                )
            )
            await close_link(conn, pubkey, last_heartbeat, "offline")
        return True

    async def replace_offers(
        self, pubkey: str, offers: Sequence[OfferSpec], *, at: datetime | None = None
    ) -> list[OfferRecord]:
        """Replace everything provider ``pubkey`` offers by ``offers`` (its inventory as
        published on connect). Leases already made are unaffected. Raises ``LookupError`` for
        a provider not registered with :meth:`upsert_provider`."""
        at = _when(at)
        rows = [
            {
                "provider_pubkey": pubkey,
                "gpu_model": spec.gpu_model,
                "vram_bytes": spec.vram_bytes,
                "count": spec.count,
                "gpu_indices": list(indices),
                "price_lamports_per_hour": spec.price_lamports_per_hour,
                "simulated": spec.simulated,
                "benchmark_tflops": spec.benchmark_tflops,
                "driver_version": spec.driver_version,
                "cuda_version": spec.cuda_version,
                "max_kernels": spec.max_kernels if spec.max_kernels is not None else spec.count,
                "published_at": at,
            }
            for spec, indices in zip(offers, _assign_indices(offers), strict=True)
        ]
        async with self._write() as conn:
            # Locked like create_lease, so a lease never sees half of the new inventory.
            if await self._lock_provider(conn, pubkey) is None:
                raise LookupError(
                    f"provider {pubkey} is not registered; call upsert_provider() first"
                )
            await conn.execute(sa.delete(_offers).where(_offers.c.provider_pubkey == pubkey))
            records: list[OfferRecord] = []
            for row in rows:  # one by one: RETURNING keeps the order on every backend
                inserted = (
                    await conn.execute(sa.insert(_offers).values(row).returning(*_offers.c))
                ).one()
                records.append(_offer_record(inserted))
        return records

    async def record_heartbeats(self, batch: Mapping[str, datetime]) -> int:
        """Store the latest heartbeat time of many providers in one SQL statement.

        The coordinator collects heartbeats in memory and calls this about once a second with
        ``{pubkey: time of its latest heartbeat}``. A time older than the stored one is
        ignored (a late flush never rewinds), and so are unknown providers. The provider's
        status is not touched: bringing a lost provider back is :meth:`upsert_provider`'s
        job. Returns how many providers were updated.
        """
        if not batch:
            return 0
        # Sorted, so two coordinators flushing overlapping batches lock rows in one order.
        items = sorted(batch.items())
        statement: sa.TextClause
        params: dict[str, Any]
        if self._postgres:
            statement = _PG_HEARTBEATS
            params = {
                "pubkeys": [pubkey for pubkey, _ in items],
                "beats": [_aware(beat) for _, beat in items],
            }
        else:
            statement = _SQLITE_HEARTBEATS
            params = {"batch": json.dumps([[pubkey, _sqlite_time(beat)] for pubkey, beat in items])}

        async def flush() -> int:
            async with self._write() as conn:
                return int((await conn.execute(statement, params)).rowcount)

        return await self._retrying(flush)

    async def flush_heartbeats(
        self, batch: Mapping[str, datetime], *, rows: int = 0
    ) -> HeartbeatFlush:
        """Store the latest heartbeat times like :meth:`record_heartbeats`, without waiting
        for other transactions: the periodic flush of a busy coordinator.

        On PostgreSQL the batch goes in transactions of at most ``rows`` providers
        (:data:`HEARTBEAT_FLUSH_ROWS` by default), each locking only the rows no other
        transaction holds (``FOR UPDATE SKIP LOCKED``), so a flush never queues behind a
        lease transaction's row lock (``FOR NO KEY UPDATE SKIP LOCKED``), and holds its own
        for one short statement. The
        providers whose rows were locked come back in :attr:`HeartbeatFlush.skipped`,
        unwritten: flush them again next time (a heartbeat is delayed, never lost). On SQLite
        (one writer at a time anyway) this is :meth:`record_heartbeats`.
        """
        if not self._postgres or not batch:
            return HeartbeatFlush(await self.record_heartbeats(batch), frozenset())
        rows = rows or HEARTBEAT_FLUSH_ROWS
        items = sorted(batch.items())
        updated = 0
        skipped: set[str] = set()
        for start in range(0, len(items), rows):
            chunk = items[start : start + rows]
            params = {
                "pubkeys": [pubkey for pubkey, _ in chunk],
                "beats": [_aware(beat) for _, beat in chunk],
            }
            async with self._write() as conn:
                result = (await conn.execute(_PG_HEARTBEATS_SKIP_LOCKED, params)).one()
            updated += int(result.updated)
            skipped.update(result.skipped)
        return HeartbeatFlush(updated, frozenset(skipped))

    async def stale_providers(self, before: datetime) -> list[str]:
        """Public keys of providers still marked online whose last heartbeat is older than
        ``before``: after a coordinator restart, the ones to watch (or mark lost)."""
        query = sa.select(_providers.c.pubkey).where(
            _providers.c.status == ProviderStatus.ONLINE.value,
            _providers.c.last_heartbeat < _aware(before),
        )
        async with self._read() as conn:
            return list((await conn.scalars(query)).all())

    async def get_provider(self, pubkey: str) -> ProviderRecord | None:
        """The provider ``pubkey``, or ``None``."""
        async with self._read() as conn:
            row = (
                await conn.execute(sa.select(_providers).where(_providers.c.pubkey == pubkey))
            ).first()
        return None if row is None else _provider_record(row)

    async def provider_offers(self, pubkey: str) -> list[OfferRecord]:
        """What provider ``pubkey`` offers now, in the order it published."""
        query = sa.select(_offers).where(_offers.c.provider_pubkey == pubkey).order_by(_offers.c.id)
        async with self._read() as conn:
            return [_offer_record(row) for row in await conn.execute(query)]

    async def load_live_offers(self) -> list[LiveOffer]:
        """Every offer of every online provider, with its current load: the scheduler's index
        after a coordinator restart (or on a replica that just started)."""
        offers_query = (
            sa.select(_offers, _providers)
            .join(_providers, _providers.c.pubkey == _offers.c.provider_pubkey)
            .where(_providers.c.status == ProviderStatus.ONLINE.value)
            .order_by(_offers.c.provider_pubkey, _offers.c.id)
        )
        leases_query = (
            sa.select(_leases.c.provider_pubkey, _leases.c.gpu_indices)
            .join(_providers, _providers.c.pubkey == _leases.c.provider_pubkey)
            .where(
                _leases.c.state.in_(_LIVE),
                _providers.c.status == ProviderStatus.ONLINE.value,
            )
        )
        # One read transaction, so offers and leases are one consistent snapshot.
        async with self._read() as conn, conn.begin():
            offer_rows = (await conn.execute(offers_query)).all()
            lease_rows = (await conn.execute(leases_query)).all()

        leased: dict[str, list[frozenset[int]]] = {}
        for provider_pubkey, indices in lease_rows:
            leased.setdefault(provider_pubkey, []).append(frozenset(indices))
        providers: dict[str, ProviderRecord] = {}
        live: list[LiveOffer] = []
        provider_columns = [column.name for column in _providers.c]
        for row in offer_rows:
            mapping = row._mapping
            offer = _offer_record(row)
            provider = providers.get(offer.provider_pubkey)
            if provider is None:
                provider = _provider_from_mapping(
                    {name: mapping[_providers.c[name]] for name in provider_columns}
                )
                providers[offer.provider_pubkey] = provider
            group = frozenset(offer.gpu_indices)
            holding = [held & group for held in leased.get(offer.provider_pubkey, ())]
            holding = [held for held in holding if held]
            in_use = frozenset().union(*holding) if holding else frozenset[int]()
            live.append(LiveOffer(offer, provider, in_use, len(holding)))
        return live


# One statement however large the batch: the batch travels as one parameter (two arrays on
# PostgreSQL, one JSON array on SQLite), so there is no per-row round trip and no limit on
# the number of bound parameters.
_PG_HEARTBEATS = sa.text(
    """
    UPDATE providers AS p SET last_heartbeat = hb.beat
    FROM unnest(CAST(:pubkeys AS text[]), CAST(:beats AS timestamptz[])) AS hb(pubkey, beat)
    WHERE p.pubkey = hb.pubkey AND p.last_heartbeat < hb.beat
    """
)
# The same without waiting: lock the batch's rows that no other transaction holds (a lease
# transaction's FOR UPDATE, another flush), update those, and name the known providers whose
# rows were skipped (unknown providers are neither updated nor skipped). NO KEY UPDATE is the
# lock the UPDATE takes anyway: a foreign key check (FOR KEY SHARE, a lease or offer insert)
# neither blocks it nor waits for it.
_PG_HEARTBEATS_SKIP_LOCKED = sa.text(
    """
    WITH hb AS (
        SELECT * FROM unnest(CAST(:pubkeys AS text[]), CAST(:beats AS timestamptz[]))
            AS hb(pubkey, beat)
    ), locked AS (
        SELECT p.pubkey FROM providers AS p
        WHERE p.pubkey = ANY(CAST(:pubkeys AS text[]))
        ORDER BY p.pubkey
        FOR NO KEY UPDATE SKIP LOCKED
    ), written AS (
        UPDATE providers AS p SET last_heartbeat = hb.beat
        FROM locked JOIN hb ON hb.pubkey = locked.pubkey
        WHERE p.pubkey = locked.pubkey AND p.last_heartbeat < hb.beat
        RETURNING p.pubkey
    )
    SELECT
        (SELECT count(*) FROM written) AS updated,
        ARRAY(
            SELECT pubkey FROM providers WHERE pubkey = ANY(CAST(:pubkeys AS text[]))
            EXCEPT SELECT pubkey FROM locked
        ) AS skipped
    """
)
_SQLITE_HEARTBEATS = sa.text(
    """
    UPDATE providers SET last_heartbeat = hb.beat
    FROM (
        SELECT json_extract(value, '$[0]') AS pubkey, json_extract(value, '$[1]') AS beat
        FROM json_each(:batch)
    ) AS hb
    WHERE providers.pubkey = hb.pubkey AND providers.last_heartbeat < hb.beat
    """
)


def _assign_indices(offers: Sequence[OfferSpec]) -> list[tuple[int, ...]]:
    """Device indices for each offer group: the given ones, else the next unclaimed."""
    claimed: set[int] = set()
    for spec in offers:
        if spec.gpu_indices is not None:
            overlap = claimed & set(spec.gpu_indices)
            if overlap:
                raise ValueError(f"GPU indices {sorted(overlap)} appear in two offers")
            claimed.update(spec.gpu_indices)
    assigned: list[tuple[int, ...]] = []
    next_index = 0
    for spec in offers:
        if spec.gpu_indices is not None:
            assigned.append(tuple(spec.gpu_indices))
            continue
        indices: list[int] = []
        while len(indices) < spec.count:
            if next_index not in claimed:
                indices.append(next_index)
                claimed.add(next_index)
            next_index += 1
        assigned.append(tuple(indices))
    return assigned


def _close_online_stretch(provider: sa.Row[Any], until: datetime) -> dict[str, Any]:
    """Column updates that move the open online stretch (up to ``until``) into
    ``online_seconds``."""
    if provider.online_since is None:
        return {}
    seconds = max(0, int((until - provider.online_since).total_seconds()))
    return {"online_seconds": _providers.c.online_seconds + seconds, "online_since": None}


def _provider_record(row: sa.Row[Any]) -> ProviderRecord:
    return _provider_from_mapping(row._mapping)


def _provider_from_mapping(mapping: Mapping[Any, Any]) -> ProviderRecord:
    return ProviderRecord(
        pubkey=mapping["pubkey"],
        display_name=mapping["display_name"],
        region=mapping["region"],
        reachable_url=mapping["reachable_url"],
        status=ProviderStatus(mapping["status"]),
        first_seen=mapping["first_seen"],
        last_heartbeat=mapping["last_heartbeat"],
        online_since=mapping["online_since"],
        sessions_ok=mapping["sessions_ok"],
        sessions_failed=mapping["sessions_failed"],
        heartbeats_missed=mapping["heartbeats_missed"],
        times_lost=mapping["times_lost"],
        online_seconds=mapping["online_seconds"],
        link_generation=mapping["link_generation"],
        replica_id=mapping["replica_id"],
    )


def _offer_record(row: sa.Row[Any]) -> OfferRecord:
    m = row._mapping
    return OfferRecord(
        id=m[_offers.c.id],
        provider_pubkey=m[_offers.c.provider_pubkey],
        gpu_model=m[_offers.c.gpu_model],
        vram_bytes=m[_offers.c.vram_bytes],
        count=m[_offers.c.count],
        gpu_indices=tuple(m[_offers.c.gpu_indices]),
        price_lamports_per_hour=m[_offers.c.price_lamports_per_hour],
        simulated=bool(m[_offers.c.simulated]),
        benchmark_tflops=m[_offers.c.benchmark_tflops],
        driver_version=m[_offers.c.driver_version],
        cuda_version=m[_offers.c.cuda_version],
        max_kernels=m[_offers.c.max_kernels],
        published_at=m[_offers.c.published_at],
    )


def _sqlite_time(value: datetime) -> str:
    # The text form SQLAlchemy's SQLite DateTime stores (UTCDateTime strips the zone), so raw
    # SQL comparisons and ORM reads agree.
    return _aware(value).strftime("%Y-%m-%d %H:%M:%S.%f")


def _check_pubkey(pubkey: str, who: str) -> None:
    if not isinstance(pubkey, str) or not _BASE58.fullmatch(pubkey):
        raise ValueError(f"{pubkey!r} is not a base58 public key of a {who}")
