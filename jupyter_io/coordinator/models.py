"""The coordinator's durable tables: providers, their GPU offers, leases and usage reports.

SQLAlchemy 2 declarative models, one class per table. Nothing here opens a database: the
schema is created and upgraded by the Alembic migrations next to this module
(``migrations/versions``), which :meth:`jupyter_io.coordinator.store.Store.open` runs, and
every read and write goes through :class:`~jupyter_io.coordinator.store.Store`. When you change
a model, add a migration that makes the same change (``tests/coordinator/test_migrations.py``
fails while the two disagree).

Conventions:

* Public keys are base58 text (at most 44 characters), the form Solana prints.
* SOL amounts are integer lamports (``BigInteger``): money is never a float.
* Every timestamp is timezone-aware UTC (:class:`UTCDateTime`); naive datetimes are refused.
* States are short strings with a CHECK constraint, not native enums, so a new state is a
  one-line migration on both SQLite and PostgreSQL.
"""

from __future__ import annotations

import enum
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

__all__ = [
    "LIVE_LEASE_STATES",
    "Base",
    "Cohort",
    "CohortCode",
    "CohortInstructor",
    "CohortMember",
    "CohortReservation",
    "CohortState",
    "GpuCheck",
    "Lease",
    "LeaseState",
    "Offer",
    "OutboxMessage",
    "Provider",
    "ProviderChange",
    "ProviderLink",
    "ProviderStatus",
    "Replica",
    "SettlementKind",
    "SettlementRow",
    "SettlementState",
    "UTCDateTime",
    "UsageReportRow",
    "metadata",
]

# Explicit constraint names, so migrations can drop or alter them by name on every backend.
NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

PUBKEY_LENGTH = 44  # the longest base58 encoding of 32 bytes


class ProviderStatus(str, enum.Enum):
    """Whether a provider is connected: ``online`` heartbeats, ``lost`` stopped heartbeating
    (its leases failed), ``offline`` said goodbye."""

    ONLINE = "online"
    LOST = "lost"
    OFFLINE = "offline"


class LeaseState(str, enum.Enum):
    """A lease's life: ``requested`` → ``active`` → ``ended``, or ``failed`` from either."""

    REQUESTED = "requested"
    ACTIVE = "active"
    ENDED = "ended"
    FAILED = "failed"


class CohortState(str, enum.Enum):
    """A cohort is ``active`` until its instructor ends the term (``ended``)."""

    ACTIVE = "active"
    ENDED = "ended"


class SettlementKind(str, enum.Enum):
    """How a funded lease's escrow is closed: ``settle`` (arbiter + provider, the lease ended)
    or ``refund`` (user + arbiter, the provider failed)."""

    SETTLE = "settle"
    REFUND = "refund"


class SettlementState(str, enum.Enum):
    """A settlement's progress: ``pending`` until a closing transaction is known to have
    landed (``done``, with what it paid); ``failed`` when the escrow was closed by no
    settlement of this coordinator's, or arbiter + provider can no longer move it (nothing
    recorded as paid; a refund reported later still makes it ``done``)."""

    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


#: States in which a lease holds its GPUs (and counts against the provider's capacity).
LIVE_LEASE_STATES: tuple[LeaseState, ...] = (LeaseState.REQUESTED, LeaseState.ACTIVE)


def _in_check(column: str, values: type[enum.Enum]) -> str:
    return f"{column} IN ({', '.join(repr(member.value) for member in values)})"


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend.

    PostgreSQL stores ``timestamptz``. SQLite has no time zone type, so UTC is stored as
    naive ISO text (which sorts chronologically) and the zone is put back on read. Binding a
    naive datetime raises ``ValueError``: guessing its zone is how billing goes wrong.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware (UTC) datetime")
        value = value.astimezone(timezone.utc)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    """Declarative base of the coordinator's tables; ``Base.metadata`` is what Alembic
    compares the migrations against."""

    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime()}


#: The coordinator's schema, for Alembic's ``target_metadata``.
metadata = Base.metadata


class Provider(Base):
    """A GPU provider, keyed by the public key it authenticated with.

    ``last_heartbeat`` is deliberately not indexed: it is rewritten thousands of times a
    second, and an index on it would turn each of those writes into an index update (and on
    PostgreSQL rule out HOT updates). Failure detection runs on the coordinator's in-memory
    copy of the heartbeats, not on this column.

    Lifetime counters (the scheduler's reliability is the 30-day record instead, from the
    leases and :class:`ProviderLink` rows: :mod:`jupyter_io.coordinator.reliability`):
    ``sessions_ok`` / ``sessions_failed`` count leases that ended / failed;
    ``heartbeats_missed`` and ``times_lost`` grow each time the provider is marked lost;
    ``online_seconds`` accumulates closed online stretches (``online_since`` → last
    heartbeat) and ``online_since`` marks the open one.
    """

    __tablename__ = "providers"
    __table_args__ = (
        sa.CheckConstraint(_in_check("status", ProviderStatus), name="status"),
        sa.Index(None, "status"),
    )

    pubkey: Mapped[str] = mapped_column(sa.String(PUBKEY_LENGTH), primary_key=True)
    display_name: Mapped[str] = mapped_column(sa.String(200), server_default="")
    region: Mapped[str] = mapped_column(sa.String(64), server_default="")
    reachable_url: Mapped[str | None] = mapped_column(sa.String(2048))
    status: Mapped[str] = mapped_column(sa.String(16))
    first_seen: Mapped[datetime]
    last_heartbeat: Mapped[datetime]
    online_since: Mapped[datetime | None]
    sessions_ok: Mapped[int] = mapped_column(sa.Integer, server_default=sa.text("0"))
    sessions_failed: Mapped[int] = mapped_column(sa.Integer, server_default=sa.text("0"))
    heartbeats_missed: Mapped[int] = mapped_column(sa.Integer, server_default=sa.text("0"))
    times_lost: Mapped[int] = mapped_column(sa.Integer, server_default=sa.text("0"))
    online_seconds: Mapped[int] = mapped_column(sa.BigInteger, server_default=sa.text("0"))
    #: Grows by one each time the provider links (to any coordinator sharing the database):
    #: a coordinator marks it offline only if no newer link has been made since its own.
    link_generation: Mapped[int] = mapped_column(sa.BigInteger, server_default=sa.text("0"))
    #: The replica (:class:`Replica`) holding the provider's latest link: set with
    #: ``link_generation``, cleared when the provider goes offline or is lost.
    replica_id: Mapped[str | None] = mapped_column(sa.String(64))


class ProviderLink(Base):
    """One link of a provider (to any coordinator sharing the database), for its reliability
    record (:mod:`jupyter_io.coordinator.reliability`).

    A row opens when the provider links (``linked_at``) and closes when it stops being
    online: ``closed_how`` ``"offline"`` (it said goodbye) or ``"lost"`` (it went silent;
    ``closed_at`` is its last heartbeat). Linking again while online continues the open row,
    and so does linking within a minute of a goodbye (the row reopens). ``down_since`` is set
    on a link that follows a lost one: the previous last heartbeat, so
    ``linked_at - down_since`` is the outage that loss caused.
    """

    __tablename__ = "provider_links"
    __table_args__ = (
        sa.Index(None, "provider_pubkey", "linked_at"),
        sa.Index(None, "closed_at"),
    )

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    provider_pubkey: Mapped[str] = mapped_column(
        sa.String(PUBKEY_LENGTH), sa.ForeignKey("providers.pubkey", ondelete="CASCADE")
    )
    linked_at: Mapped[datetime]
    closed_at: Mapped[datetime | None]
    closed_how: Mapped[str | None] = mapped_column(sa.String(16))
    down_since: Mapped[datetime | None]


class Offer(Base):
    """One group of identical GPUs a provider offers at one price.

    ``gpu_indices`` are the device indices (as ``CUDA_VISIBLE_DEVICES`` counts them) that make
    up the group; a lease is assigned a subset of them. ``max_kernels`` caps how many leases
    may run on the group at once, whatever the number of free GPUs.
    """

    __tablename__ = "offers"
    __table_args__ = (
        sa.CheckConstraint("count >= 1", name="count_positive"),
        sa.CheckConstraint("vram_bytes >= 0", name="vram_not_negative"),
        sa.CheckConstraint("price_lamports_per_hour >= 0", name="price_not_negative"),
        sa.CheckConstraint("max_kernels >= 1", name="max_kernels_positive"),
        sa.Index(None, "provider_pubkey"),
        sa.Index(None, "gpu_model"),
    )

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    provider_pubkey: Mapped[str] = mapped_column(
        sa.String(PUBKEY_LENGTH), sa.ForeignKey("providers.pubkey", ondelete="CASCADE")
    )
    gpu_model: Mapped[str] = mapped_column(sa.String(128))
    vram_bytes: Mapped[int] = mapped_column(sa.BigInteger)
    count: Mapped[int] = mapped_column(sa.Integer)
    gpu_indices: Mapped[list[int]] = mapped_column(sa.JSON)
    price_lamports_per_hour: Mapped[int] = mapped_column(sa.BigInteger)
    simulated: Mapped[bool] = mapped_column(sa.Boolean, server_default=sa.false())
    benchmark_tflops: Mapped[float | None] = mapped_column(sa.Float)
    driver_version: Mapped[str | None] = mapped_column(sa.String(64))
    cuda_version: Mapped[str | None] = mapped_column(sa.String(32))
    max_kernels: Mapped[int] = mapped_column(sa.Integer)
    published_at: Mapped[datetime]


class Lease(Base):
    """A user's lease of GPUs on one provider, with its whole life persisted.

    ``end_of_service`` is when billing stops: the end time for an ended lease, the provider's
    last heartbeat for a lease that failed because its provider was lost.
    ``price_lamports_per_hour`` is copied from the offer when the lease is made, so a later
    price change never re-prices a running session.
    """

    __tablename__ = "leases"
    __table_args__ = (
        sa.CheckConstraint(_in_check("state", LeaseState), name="state"),
        sa.CheckConstraint("price_lamports_per_hour >= 0", name="price_not_negative"),
        sa.Index(None, "provider_pubkey", "state"),
        sa.Index(None, "user_pubkey", "requested_at"),
        sa.Index(None, "state"),
        # The reliability window reads the leases that ended in the last 30 days (0008).
        sa.Index(None, "ended_at"),
    )

    id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    user_pubkey: Mapped[str] = mapped_column(sa.String(PUBKEY_LENGTH))
    provider_pubkey: Mapped[str] = mapped_column(
        sa.String(PUBKEY_LENGTH), sa.ForeignKey("providers.pubkey")
    )
    gpu_model: Mapped[str] = mapped_column(sa.String(128))
    gpu_indices: Mapped[list[int]] = mapped_column(sa.JSON)
    price_lamports_per_hour: Mapped[int] = mapped_column(sa.BigInteger)
    state: Mapped[str] = mapped_column(sa.String(16))
    requested_at: Mapped[datetime]
    active_at: Mapped[datetime | None]
    ended_at: Mapped[datetime | None]
    end_of_service: Mapped[datetime | None]
    failure_reason: Mapped[str | None] = mapped_column(sa.Text)
    #: Why an ended lease ended ("ended by the user", "budget exhausted", ...).
    end_reason: Mapped[str | None] = mapped_column(sa.Text)
    token_expires_at: Mapped[datetime | None]
    relay: Mapped[bool] = mapped_column(sa.Boolean, server_default=sa.false())
    #: The lease's escrow once verified on-chain (``POST /leases/{id}/escrow``); null while
    #: unfunded (and always with ``payments = "free"``).
    escrow_address: Mapped[str | None] = mapped_column(sa.String(PUBKEY_LENGTH))
    #: Lamports the escrow held at its last verification (raised by a top-up).
    deposit_lamports: Mapped[int | None] = mapped_column(sa.BigInteger)
    escrow_signature: Mapped[str | None] = mapped_column(sa.String(100))
    funded_at: Mapped[datetime | None]
    #: Seconds of service the user acknowledged (``jupyter_io.usage_acks``), and when the
    #: latest acknowledgement came; 0 from creation, null for leases recorded before
    #: acknowledgements existed (billed without them).
    acked_seconds: Mapped[int | None] = mapped_column(sa.BigInteger)
    acked_at: Mapped[datetime | None]
    #: The cohort whose pool and quota the lease runs on (null: the user's own lease). No
    #: foreign key: adding one would make SQLite copy the leases table (see 0006).
    cohort_id: Mapped[str | None] = mapped_column(sa.String(24), index=True)


class SettlementRow(Base):
    """The durable settlement of one funded lease: at most one per lease (its primary key),
    retried until the escrow is closed on-chain.

    ``claimed_by`` / ``claimed_until`` let one coordinator of several sharing the database
    work on a row at a time; ``next_attempt_at`` spaces the retries. ``amount_lamports`` is
    what the provider is (or was) paid, ``fee_lamports`` what the closing transaction cost.
    """

    __tablename__ = "settlements"
    __table_args__ = (
        sa.CheckConstraint(_in_check("kind", SettlementKind), name="kind"),
        sa.CheckConstraint(_in_check("state", SettlementState), name="state"),
        sa.CheckConstraint("amount_lamports >= 0", name="amount_not_negative"),
        sa.Index(None, "state", "next_attempt_at"),
    )

    lease_id: Mapped[str] = mapped_column(
        sa.String(64), sa.ForeignKey("leases.id", ondelete="CASCADE"), primary_key=True
    )
    kind: Mapped[str] = mapped_column(sa.String(16))
    state: Mapped[str] = mapped_column(sa.String(16))
    amount_lamports: Mapped[int] = mapped_column(sa.BigInteger, server_default=sa.text("0"))
    fee_lamports: Mapped[int] = mapped_column(sa.BigInteger, server_default=sa.text("0"))
    signature: Mapped[str | None] = mapped_column(sa.String(100))
    attempts: Mapped[int] = mapped_column(sa.Integer, server_default=sa.text("0"))
    error: Mapped[str | None] = mapped_column(sa.Text)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    next_attempt_at: Mapped[datetime]
    claimed_by: Mapped[str | None] = mapped_column(sa.String(64))
    claimed_until: Mapped[datetime | None]


class UsageReportRow(Base):
    """A provider's signed usage report for one lease: ``seconds_delivered`` since its
    previous report. ``(lease_id, seq)`` is the primary key, so a report delivered twice is
    stored once."""

    __tablename__ = "usage_reports"
    __table_args__ = (
        sa.CheckConstraint("seconds_delivered >= 0", name="seconds_not_negative"),
        sa.CheckConstraint("seq >= 0", name="seq_not_negative"),
    )

    lease_id: Mapped[str] = mapped_column(
        sa.String(64), sa.ForeignKey("leases.id", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(sa.BigInteger, primary_key=True, autoincrement=False)
    seconds_delivered: Mapped[int] = mapped_column(sa.Integer)
    gpu_utilisation: Mapped[float | None] = mapped_column(sa.Float)
    signature: Mapped[str] = mapped_column(sa.Text)
    reported_at: Mapped[datetime]
    received_at: Mapped[datetime]


class Cohort(Base):
    """A class sharing a pool: its instructor (the creator), what it pays for (GPU types,
    price cap), each student's limits, its term and course environment.

    ``gpu_types`` are model names as the instructor typed them (compared with
    :func:`jupyter_io.gpu_names.normalise_gpu_name`). ``environment_sha256`` is the SHA-256
    of ``requirements`` (UTF-8), which providers cache the built environment by.
    """

    __tablename__ = "cohorts"
    __table_args__ = (
        sa.CheckConstraint(_in_check("state", CohortState), name="state"),
        sa.CheckConstraint("max_price_lamports_per_hour >= 0", name="price_not_negative"),
        sa.CheckConstraint("quota_gpu_seconds_per_week >= 0", name="quota_not_negative"),
        sa.CheckConstraint("max_concurrent_per_student >= 1", name="concurrent_positive"),
        sa.Index(None, "instructor"),
        sa.Index(None, "environment_sha256"),
    )

    id: Mapped[str] = mapped_column(sa.String(24), primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(200))
    instructor: Mapped[str] = mapped_column(sa.String(PUBKEY_LENGTH))
    gpu_types: Mapped[list[str]] = mapped_column(sa.JSON)
    max_price_lamports_per_hour: Mapped[int] = mapped_column(sa.BigInteger)
    quota_gpu_seconds_per_week: Mapped[int] = mapped_column(sa.BigInteger)
    max_concurrent_per_student: Mapped[int] = mapped_column(sa.Integer)
    idle_timeout_seconds: Mapped[int] = mapped_column(sa.Integer)
    max_session_seconds: Mapped[int] = mapped_column(sa.Integer)
    queue_max_wait_seconds: Mapped[int] = mapped_column(sa.Integer)
    student_cap_lamports: Mapped[int | None] = mapped_column(sa.BigInteger)
    term_ends_at: Mapped[datetime]
    requirements: Mapped[str | None] = mapped_column(sa.Text)
    environment_sha256: Mapped[str | None] = mapped_column(sa.String(64))
    state: Mapped[str] = mapped_column(sa.String(16))
    created_at: Mapped[datetime]
    ended_at: Mapped[datetime | None]


class CohortInstructor(Base):
    """A co-instructor of a cohort (the creator is ``cohorts.instructor``, not a row here)."""

    __tablename__ = "cohort_instructors"
    __table_args__ = (sa.Index(None, "pubkey"),)

    cohort_id: Mapped[str] = mapped_column(
        sa.String(24), sa.ForeignKey("cohorts.id", ondelete="CASCADE"), primary_key=True
    )
    pubkey: Mapped[str] = mapped_column(sa.String(PUBKEY_LENGTH), primary_key=True)
    added_at: Mapped[datetime]


class CohortMember(Base):
    """A student of a cohort. ``removed_at`` set: removed by an instructor (the row stays,
    so the dashboard's history and the refusal of a rejoin by code can name it)."""

    __tablename__ = "cohort_members"
    __table_args__ = (sa.Index(None, "student"),)

    cohort_id: Mapped[str] = mapped_column(
        sa.String(24), sa.ForeignKey("cohorts.id", ondelete="CASCADE"), primary_key=True
    )
    student: Mapped[str] = mapped_column(sa.String(PUBKEY_LENGTH), primary_key=True)
    joined_at: Mapped[datetime]
    removed_at: Mapped[datetime | None]


class CohortCode(Base):
    """A join code of a cohort: valid until ``expires_at``, unless ``revoked`` or used
    ``max_uses`` times (null: no limit)."""

    __tablename__ = "cohort_codes"
    __table_args__ = (
        sa.CheckConstraint("uses >= 0", name="uses_not_negative"),
        sa.Index(None, "cohort_id"),
    )

    code: Mapped[str] = mapped_column(sa.String(16), primary_key=True)
    cohort_id: Mapped[str] = mapped_column(
        sa.String(24), sa.ForeignKey("cohorts.id", ondelete="CASCADE")
    )
    expires_at: Mapped[datetime]
    revoked: Mapped[bool] = mapped_column(sa.Boolean, server_default=sa.false())
    uses: Mapped[int] = mapped_column(sa.Integer, server_default=sa.text("0"))
    max_uses: Mapped[int | None] = mapped_column(sa.Integer)
    created_at: Mapped[datetime]


class CohortReservation(Base):
    """Capacity an instructor reserved for a lab session: ``count`` GPUs of ``gpu`` from
    ``starts_at`` to ``ends_at`` (the scheduler keeps them for the cohort then)."""

    __tablename__ = "cohort_reservations"
    __table_args__ = (
        sa.CheckConstraint("count >= 1", name="count_positive"),
        sa.CheckConstraint("ends_at > starts_at", name="ends_after_start"),
        sa.Index(None, "cohort_id"),
        sa.Index(None, "ends_at"),
    )

    id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    cohort_id: Mapped[str] = mapped_column(
        sa.String(24), sa.ForeignKey("cohorts.id", ondelete="CASCADE")
    )
    gpu: Mapped[str] = mapped_column(sa.String(128))
    count: Mapped[int] = mapped_column(sa.Integer)
    starts_at: Mapped[datetime]
    ends_at: Mapped[datetime]


class GpuCheck(Base):
    """One judged GPU challenge (:mod:`jupyter_io.coordinator.challenges`): which provider's
    GPU (model, device index), when, whether it passed, why not, the seconds its commitment
    took (None when it never came) and the matrix size ``n``."""

    __tablename__ = "gpu_checks"
    __table_args__ = (sa.Index(None, "provider_pubkey", "at"),)

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    provider_pubkey: Mapped[str] = mapped_column(
        sa.String(PUBKEY_LENGTH), sa.ForeignKey("providers.pubkey", ondelete="CASCADE")
    )
    gpu_model: Mapped[str] = mapped_column(sa.String(128))
    gpu_index: Mapped[int] = mapped_column(sa.Integer)
    at: Mapped[datetime]
    ok: Mapped[bool] = mapped_column(sa.Boolean)
    reason: Mapped[str] = mapped_column(sa.Text)
    seconds: Mapped[float | None] = mapped_column(sa.Float)
    n: Mapped[int] = mapped_column(sa.Integer)


# BIGSERIAL on PostgreSQL; SQLite autoincrements only an INTEGER PRIMARY KEY.
_SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


class Replica(Base):
    """A coordinator process sharing the database (:mod:`jupyter_io.coordinator.replicas`):
    ``url`` is where providers reach it (a ``dial`` names it), ``last_seen`` its heartbeat
    (every second), ``stopped_at`` set when it stopped cleanly."""

    __tablename__ = "replicas"

    id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    url: Mapped[str] = mapped_column(sa.String(2048))
    started_at: Mapped[datetime]
    last_seen: Mapped[datetime]
    stopped_at: Mapped[datetime | None]


class ProviderChange(Base):
    """The change feed: provider ``pubkey``'s view (row, offers, live leases) changed.

    Written only by database triggers (migration 0009), never by the coordinator's code, so
    every writer feeds it; heartbeat flushes do not. Replicas poll it by ``seq``
    (:meth:`~jupyter_io.coordinator.store.replicas.ReplicaQueries.changes_since`) and
    re-read the providers it names."""

    __tablename__ = "provider_changes"
    __table_args__ = (sa.Index(None, "at"), {"sqlite_autoincrement": True})

    seq: Mapped[int] = mapped_column(_SEQ, primary_key=True, autoincrement=True)
    pubkey: Mapped[str] = mapped_column(sa.String(PUBKEY_LENGTH))
    at: Mapped[datetime] = mapped_column(server_default=sa.func.now())


class OutboxMessage(Base):
    """The outbox: a provider-link message (``body``, its JSON text) for provider ``pubkey``
    linked at another replica. The replica holding the link takes it (``DELETE ...
    RETURNING``: exactly one sends it) until ``expires_at``."""

    __tablename__ = "link_messages"
    __table_args__ = (sa.Index(None, "pubkey"), sa.Index(None, "expires_at"))

    id: Mapped[int] = mapped_column(_SEQ, primary_key=True, autoincrement=True)
    pubkey: Mapped[str] = mapped_column(sa.String(PUBKEY_LENGTH))
    body: Mapped[str] = mapped_column(sa.Text)
    expires_at: Mapped[datetime]
    created_at: Mapped[datetime]
