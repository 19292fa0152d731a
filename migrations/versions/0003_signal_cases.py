"""signal_cases: the signals worker's state per turn; signals.evidence and signals.published (the outbox)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'signal_cases',
        sa.Column('turn_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('partition', sa.Integer(), nullable=False),
        sa.Column('session_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('state', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('opened_at', sa.Float(), nullable=False),
        sa.Column('touched_at', sa.Float(), nullable=False),
        sa.Column('body', sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint('turn_id', name=op.f('pk_signal_cases')),
    )
    with op.batch_alter_table('signal_cases', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_signal_cases_state'), ['state'], unique=False)
        batch_op.create_index(batch_op.f('ix_signal_cases_opened_at'), ['opened_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_signal_cases_touched_at'), ['touched_at'], unique=False)
    with op.batch_alter_table('signals', schema=None) as batch_op:
        # Rows from before this revision were published by whoever wrote them, and recorded no evidence.
        batch_op.add_column(sa.Column('evidence', sa.JSON(), nullable=False, server_default='[]'))
        batch_op.add_column(sa.Column('published', sa.Boolean(), nullable=False, server_default=sa.true()))
        batch_op.create_index(batch_op.f('ix_signals_published'), ['published'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('signals', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_signals_published'))
        batch_op.drop_column('published')
        batch_op.drop_column('evidence')
    with op.batch_alter_table('signal_cases', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_signal_cases_touched_at'))
        batch_op.drop_index(batch_op.f('ix_signal_cases_opened_at'))
        batch_op.drop_index(batch_op.f('ix_signal_cases_state'))
    op.drop_table('signal_cases')
