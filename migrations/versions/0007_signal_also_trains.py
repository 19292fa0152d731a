"""signals.also_trains: the scopes besides its own whose trainers learn from a signal

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06

Signals stored before this revision train their own scope only (what every signal did before).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('signals', schema=None) as batch_op:
        batch_op.add_column(sa.Column('also_trains', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('signals', schema=None) as batch_op:
        batch_op.drop_column('also_trains')
