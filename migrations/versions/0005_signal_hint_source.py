"""signals.hint_source: where a signal's hint came from (the user's words, failed tool calls, the judge)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22

Signals stored before this revision have no source on file: the trainer treats their hints as the
user's (what it did with every hint before this revision).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('signals', schema=None) as batch_op:
        batch_op.add_column(sa.Column('hint_source', sqlmodel.sql.sqltypes.AutoString(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('signals', schema=None) as batch_op:
        batch_op.drop_column('hint_source')
