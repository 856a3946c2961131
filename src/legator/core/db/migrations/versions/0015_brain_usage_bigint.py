"""brain: usage totals per profile and feature are 64-bit (32 bits on PostgreSQL ran out)

Revision ID: 0015_brain_usage_bigint
Revises: 0014_probe_key_salt
Create Date: 2026-12-07 07:10:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015_brain_usage_bigint"
down_revision: str | Sequence[str] | None = "0014_probe_key_salt"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ("requests", "input_tokens", "output_tokens")


def upgrade() -> None:
    with op.batch_alter_table("brain_usage", schema=None) as batch_op:
        for column in COLUMNS:
            batch_op.alter_column(column, existing_type=sa.Integer(), type_=sa.BigInteger())


def downgrade() -> None:
    with op.batch_alter_table("brain_usage", schema=None) as batch_op:
        for column in COLUMNS:
            batch_op.alter_column(column, existing_type=sa.BigInteger(), type_=sa.Integer())
