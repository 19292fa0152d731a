"""erasures: forgotten sessions, end users and tenants; the end user of turns and sessions

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06

Turns and sessions stored before this revision name no end user: `nextturn users forget` finds a user's
turns recorded since (and, under NEXTTURN_SCOPE_BY=user, every turn of the user's scope).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = '0009'
down_revision: str | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    for table in ('sessions', 'turns'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column('user', sqlmodel.sql.sqltypes.AutoString(), nullable=True))
            batch_op.create_index(batch_op.f(f'ix_{table}_user'), ['user'], unique=False)
    op.create_table(
        'erasures',
        sa.Column('seq', sa.Integer(), nullable=False),
        sa.Column('id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('kind', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('tenant', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('subject', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column('before', sa.DateTime(timezone=True), nullable=False),
        sa.Column('scopes', sa.JSON(), nullable=False),
        sa.Column('actor', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('requested_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('report', sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint('seq', name=op.f('pk_erasures')),
        sa.UniqueConstraint('id', name=op.f('uq_erasures_id')),
    )
    op.create_index(op.f('ix_erasures_tenant'), 'erasures', ['tenant'], unique=False)
    op.create_table(
        'erased_sessions',
        sa.Column('seq', sa.Integer(), nullable=False),
        sa.Column('session_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('erasure', sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint('seq', name=op.f('pk_erased_sessions')),
        sa.UniqueConstraint('session_id', name=op.f('uq_erased_sessions_session_id')),
    )
    op.create_index(op.f('ix_erased_sessions_erasure'), 'erased_sessions', ['erasure'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_erased_sessions_erasure'), table_name='erased_sessions')
    op.drop_table('erased_sessions')
    op.drop_index(op.f('ix_erasures_tenant'), table_name='erasures')
    op.drop_table('erasures')
    for table in ('turns', 'sessions'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_index(batch_op.f(f'ix_{table}_user'))
            batch_op.drop_column('user')
