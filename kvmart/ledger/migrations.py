"""Named, ordered schema migrations. `migrate` applies those not yet recorded in `schema_migrations`, each in the
same transaction as its record, under a lock (PostgreSQL: an advisory lock; SQLite: BEGIN IMMEDIATE), so several
servers starting at once on one database migrate it exactly once. A migration is never edited once released:
changes come as a new one appended to `MIGRATIONS`."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import insert, select, text
from sqlalchemy.engine import Connection, Engine

from . import schema
from .db import in_transaction

ADVISORY_LOCK_ID = 0x6B766D6172  # 'kvmar'
T = TypeVar("T")


def initial(conn: Connection) -> None:
    """Accounts, API keys, licences, double-entry transactions and entries, charges, holds, meta."""
    tables = [schema.accounts, schema.api_keys, schema.licences, schema.licence_readers, schema.transactions,
              schema.entries, schema.charges, schema.holds, schema.meta]
    schema.metadata.create_all(conn, tables=tables)


def stored_responses(conn: Connection) -> None:
    """The answers of idempotent requests, replayed to their retries."""
    schema.responses.create(conn, checkfirst=True)


MIGRATIONS: tuple[tuple[str, Callable[[Connection], None]], ...] = (
    ("0001_initial", initial),
    ("0002_stored_responses", stored_responses),
)


def migrate(engine: Engine, then: Callable[[Connection], T]) -> T:
    """Apply every pending migration, then run `then` (bootstrap) in the same transaction, under the lock."""

    def work(conn: Connection) -> T:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": ADVISORY_LOCK_ID})
        schema.schema_migrations.create(conn, checkfirst=True)
        done = set(conn.execute(select(schema.schema_migrations.c.name)).scalars())
        for name, step in MIGRATIONS:
            if name not in done:
                step(conn)
                conn.execute(insert(schema.schema_migrations).values(name=name, applied_at=int(time.time())))
        return then(conn)

    return in_transaction(engine, work)
