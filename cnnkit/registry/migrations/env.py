"""Alembic environment: run by ``cnnkit.registry`` with an open connection (never from the alembic CLI).

``Registry`` passes its connection in ``config.attributes["connection"]``; migrations run inside
one transaction. On PostgreSQL an advisory lock serialises two processes opening a new database
at once; on SQLite the registry's ``BEGIN IMMEDIATE`` does the same.
"""

from alembic import context
from sqlalchemy import text

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=None, render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(74277)"))  # 74277: "cnnkit" registry lock id
    context.run_migrations()
