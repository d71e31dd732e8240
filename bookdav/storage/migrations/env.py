"""Alembic environment: migrations run on the connection bookdav hands over (see migrate.py)."""

from alembic import context

from bookdav.storage.schema import metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
