"""Alembic environment: runs with the engine that safereset passes in."""

from alembic import context
from sqlalchemy import text

from safereset.store.db import MIGRATION_LOCK_KEY
from safereset.store.models import Base

engine = context.config.attributes["engine"]
with engine.begin() as connection:
    if connection.dialect.name == "postgresql":
        # Instances started together take turns; the lock ends with the transaction.
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    context.run_migrations()
