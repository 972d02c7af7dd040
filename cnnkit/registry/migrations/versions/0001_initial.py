"""The first registry schema: one row per registered model version.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("artifact_path", sa.Text, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("run_dir", sa.Text, nullable=True),
        sa.Column("architecture", sa.String(100), nullable=False),
        sa.Column("backend", sa.String(50), nullable=False),
        sa.Column("keras_version", sa.String(50), nullable=False),
        sa.Column("cnnkit_version", sa.String(50), nullable=False),
        sa.Column("image_size", sa.JSON, nullable=False),
        sa.Column("color_mode", sa.String(20), nullable=False),
        sa.Column("class_names", sa.JSON, nullable=False),
        sa.Column("data_hash", sa.String(64), nullable=True),
        sa.Column("split_sizes", sa.JSON, nullable=True),
        sa.Column("augmentation", sa.JSON, nullable=True),
        sa.Column("hyperparameters", sa.JSON, nullable=True),
        sa.Column("metrics", sa.JSON, nullable=True),
        sa.Column("stage", sa.String(20), nullable=False, server_default="none"),
        sa.Column("notes", sa.Text, nullable=False, server_default=""),
        sa.UniqueConstraint("name", "version", name="uq_model_versions_name_version"),
        sa.CheckConstraint("stage IN ('none', 'staging', 'production', 'archived')", name="ck_model_versions_stage"),
    )
    # At most one production version per name, enforced by the database itself (a partial unique
    # index), so two concurrent promotions can never both win.
    op.create_index(
        "uq_model_versions_one_production", "model_versions", ["name"], unique=True,
        sqlite_where=sa.text("stage = 'production'"), postgresql_where=sa.text("stage = 'production'"),
    )


def downgrade() -> None:
    op.drop_index("uq_model_versions_one_production", table_name="model_versions")
    op.drop_table("model_versions")
