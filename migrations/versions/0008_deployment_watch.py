"""deployments.watch_since: the stable version is watched after a promotion on offline evidence

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06

Deployments and changes stored before this revision watch nothing (what every promotion did before).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    for table in ('deployments', 'deployment_changes'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column('watch_since', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    for table in ('deployment_changes', 'deployments'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column('watch_since')
