"""Classroom cohorts (issue 14): cohorts, their instructors, members, join codes and
reservations; leases name the cohort they run for.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06

Written out by hand (see 0001). ``leases.cohort_id`` is null for every lease recorded before
this revision (users' own leases) and has no foreign key: adding one would make SQLite copy
the leases table, which the settlements and usage reports point at.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_PUBKEY = 44


def _timestamp(name: str, *, nullable: bool) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _cohort_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["cohort_id"],
        ["cohorts.id"],
        name=op.f(f"fk_{table}_cohort_id_cohorts"),
        ondelete="CASCADE",
    )


def upgrade() -> None:
    op.create_table(
        "cohorts",
        sa.Column("id", sa.String(24), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("instructor", sa.String(_PUBKEY), nullable=False),
        sa.Column("gpu_types", sa.JSON, nullable=False),
        sa.Column("max_price_lamports_per_hour", sa.BigInteger, nullable=False),
        sa.Column("quota_gpu_seconds_per_week", sa.BigInteger, nullable=False),
        sa.Column("max_concurrent_per_student", sa.Integer, nullable=False),
        sa.Column("idle_timeout_seconds", sa.Integer, nullable=False),
        sa.Column("max_session_seconds", sa.Integer, nullable=False),
        sa.Column("queue_max_wait_seconds", sa.Integer, nullable=False),
        sa.Column("student_cap_lamports", sa.BigInteger, nullable=True),
        _timestamp("term_ends_at", nullable=False),
        sa.Column("requirements", sa.Text, nullable=True),
        sa.Column("environment_sha256", sa.String(64), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        _timestamp("created_at", nullable=False),
        _timestamp("ended_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_cohorts")),
        sa.CheckConstraint("state IN ('active', 'ended')", name=op.f("ck_cohorts_state")),
        sa.CheckConstraint(
            "max_price_lamports_per_hour >= 0", name=op.f("ck_cohorts_price_not_negative")
        ),
        sa.CheckConstraint(
            "quota_gpu_seconds_per_week >= 0", name=op.f("ck_cohorts_quota_not_negative")
        ),
        sa.CheckConstraint(
            "max_concurrent_per_student >= 1", name=op.f("ck_cohorts_concurrent_positive")
        ),
    )
    op.create_index(op.f("ix_cohorts_instructor"), "cohorts", ["instructor"])
    op.create_index(op.f("ix_cohorts_environment_sha256"), "cohorts", ["environment_sha256"])

    op.create_table(
        "cohort_instructors",
        sa.Column("cohort_id", sa.String(24), nullable=False),
        sa.Column("pubkey", sa.String(_PUBKEY), nullable=False),
        _timestamp("added_at", nullable=False),
        sa.PrimaryKeyConstraint("cohort_id", "pubkey", name=op.f("pk_cohort_instructors")),
        _cohort_fk("cohort_instructors"),
    )
    op.create_index(op.f("ix_cohort_instructors_pubkey"), "cohort_instructors", ["pubkey"])

    op.create_table(
        "cohort_members",
        sa.Column("cohort_id", sa.String(24), nullable=False),
        sa.Column("student", sa.String(_PUBKEY), nullable=False),
        _timestamp("joined_at", nullable=False),
        _timestamp("removed_at", nullable=True),
        sa.PrimaryKeyConstraint("cohort_id", "student", name=op.f("pk_cohort_members")),
        _cohort_fk("cohort_members"),
    )
    op.create_index(op.f("ix_cohort_members_student"), "cohort_members", ["student"])

    op.create_table(
        "cohort_codes",
        sa.Column("code", sa.String(16), nullable=False),
        sa.Column("cohort_id", sa.String(24), nullable=False),
        _timestamp("expires_at", nullable=False),
        sa.Column("revoked", sa.Boolean, server_default=sa.false(), nullable=False),
        sa.Column("uses", sa.Integer, server_default=sa.text("0"), nullable=False),
        sa.Column("max_uses", sa.Integer, nullable=True),
        _timestamp("created_at", nullable=False),
        sa.PrimaryKeyConstraint("code", name=op.f("pk_cohort_codes")),
        _cohort_fk("cohort_codes"),
        sa.CheckConstraint("uses >= 0", name=op.f("ck_cohort_codes_uses_not_negative")),
    )
    op.create_index(op.f("ix_cohort_codes_cohort_id"), "cohort_codes", ["cohort_id"])

    op.create_table(
        "cohort_reservations",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("cohort_id", sa.String(24), nullable=False),
        sa.Column("gpu", sa.String(128), nullable=False),
        sa.Column("count", sa.Integer, nullable=False),
        _timestamp("starts_at", nullable=False),
        _timestamp("ends_at", nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_cohort_reservations")),
        _cohort_fk("cohort_reservations"),
        sa.CheckConstraint("count >= 1", name=op.f("ck_cohort_reservations_count_positive")),
        sa.CheckConstraint(
            "ends_at > starts_at", name=op.f("ck_cohort_reservations_ends_after_start")
        ),
    )
    op.create_index(op.f("ix_cohort_reservations_cohort_id"), "cohort_reservations", ["cohort_id"])
    op.create_index(op.f("ix_cohort_reservations_ends_at"), "cohort_reservations", ["ends_at"])

    # A plain ADD COLUMN (SQLite has it): no table copy.
    op.add_column("leases", sa.Column("cohort_id", sa.String(24), nullable=True))
    op.create_index(op.f("ix_leases_cohort_id"), "leases", ["cohort_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_leases_cohort_id"), table_name="leases")
    with op.batch_alter_table("leases") as batch:
        batch.drop_column("cohort_id")
    op.drop_table("cohort_reservations")
    op.drop_table("cohort_codes")
    op.drop_table("cohort_members")
    op.drop_table("cohort_instructors")
    op.drop_table("cohorts")
