"""Alembic environment of the registry: runs on the connection handed over in config.attributes.

The registry builds the Alembic config in code (services.registry.store.alembic_config) and
calls ``upgrade`` inside its own transaction; there is no alembic.ini and no offline mode.
"""

from __future__ import annotations

from alembic import context

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run the registry migrations through services.registry.store.upgrade(engine)")

context.configure(connection=connection, transactional_ddl=True, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
