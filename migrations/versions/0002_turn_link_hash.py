"""turns.link_hash: the conversation key that lets any gateway replica link a request to its turn

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22

Turns stored before this revision have no key; they stay linkable only from the memory of the replica
that served them (the behaviour before this revision).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('turns', schema=None) as batch_op:
        batch_op.add_column(sa.Column('link_hash', sqlmodel.sql.sqltypes.AutoString(), nullable=True))
        batch_op.create_index(batch_op.f('ix_turns_link_hash'), ['link_hash'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('turns', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_turns_link_hash'))
        batch_op.drop_column('link_hash')
