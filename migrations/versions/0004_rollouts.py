"""Rollouts: the deployment's step schedule, canary start and the action of each change; adapters' status
changes with them; each turn's flaw (nextturn.flaws) and an index to read one version's turns since a time

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('turns', schema=None) as batch_op:
        # Turns recorded before this revision have no flaw on file: the rollout reads only newer ones.
        batch_op.add_column(sa.Column('flaw', sqlmodel.sql.sqltypes.AutoString(), nullable=True))
        batch_op.create_index('ix_turns_adapter_version_started_at', ['adapter_version', 'started_at'], unique=False)
    for table in ('deployments', 'deployment_changes'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column('schedule', sa.JSON(), nullable=False, server_default='[]'))
            batch_op.add_column(sa.Column('canary_since', sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table('deployment_changes', schema=None) as batch_op:
        batch_op.add_column(sa.Column('action', sqlmodel.sql.sqltypes.AutoString(), nullable=False,
                                      server_default='set'))
        batch_op.add_column(sa.Column('subject_version', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('deployment_changes', schema=None) as batch_op:
        batch_op.drop_column('subject_version')
        batch_op.drop_column('action')
    for table in ('deployment_changes', 'deployments'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column('canary_since')
            batch_op.drop_column('schedule')
    with op.batch_alter_table('turns', schema=None) as batch_op:
        batch_op.drop_index('ix_turns_adapter_version_started_at')
        batch_op.drop_column('flaw')
