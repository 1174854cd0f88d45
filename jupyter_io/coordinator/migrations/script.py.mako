"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}

Write the schema change explicitly (op.create_table, op.add_column, ...), the way
0001_initial.py does, and keep models.py in step: test_migrations.py compares the two.
Inside ``with op.batch_alter_table(...)`` blocks, SQLite can alter columns too.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import jupyter_io.coordinator.models as models  # noqa: F401 (models.UTCDateTime)
${imports if imports else ""}

revision: str = ${repr(up_revision)}
down_revision: str | Sequence[str] | None = ${repr(down_revision)}
branch_labels: str | Sequence[str] | None = ${repr(branch_labels)}
depends_on: str | Sequence[str] | None = ${repr(depends_on)}


def upgrade() -> None:
    ${upgrades if upgrades else "pass"}


def downgrade() -> None:
    ${downgrades if downgrades else "pass"}
