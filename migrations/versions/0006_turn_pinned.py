"""turns.pinned: the client named the version, so the turn is no evidence for the rollout

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06

Turns stored before this revision were recorded by gateways that did not say; they count as routed by the
deployment (what the rollout did with every turn before this revision).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('turns', schema=None) as batch_op:
        batch_op.add_column(sa.Column('pinned', sa.Boolean(), server_default=sa.false(), nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('turns', schema=None) as batch_op:
        batch_op.drop_column('pinned')
