"""Immutable artifacts: versions added from now on point at a copy in the content-addressed store.

``artifact_stored`` says that ``artifact_path`` is the registry's own copy (``<root>/<sha256>/model.keras``,
removed with the last version using it); ``source_path`` is the file it was copied from. Rows
registered before this migration keep pointing into their run folders (``artifact_stored`` false),
and work as before.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN (no batch table copy on SQLite: that would risk the partial unique index).
    op.add_column("model_versions", sa.Column("artifact_stored", sa.Boolean, nullable=False,
                                              server_default=sa.false()))
    op.add_column("model_versions", sa.Column("source_path", sa.Text, nullable=True))


def downgrade() -> None:
    op.drop_column("model_versions", "source_path")
    op.drop_column("model_versions", "artifact_stored")
