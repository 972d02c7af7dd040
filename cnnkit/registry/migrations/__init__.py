"""Alembic migrations of the model registry schema, applied by ``cnnkit.registry`` on open."""
