"""The ledger's database: an engine by URL, and write transactions that are safe across threads and processes.

    (empty)                    SQLite file DATA_DIR/ledger.sqlite (the embedded default)
    sqlite:///PATH             SQLite file
    postgresql://USER@HOST/DB  PostgreSQL through psycopg 3 (several servers may share one)

SQLite: every writing transaction starts with BEGIN IMMEDIATE (one writer at a time, others wait up to
`BUSY_SECONDS`), in WAL mode; a read-only one (`write=False`) with a plain BEGIN, reading a snapshot without
waiting for writers. PostgreSQL: READ COMMITTED, and every balance change first locks the account rows it touches, in id
order (`SELECT ... FOR UPDATE`), so concurrent requests spending one balance serialize on its row. Deadlocks and
serialization failures are retried; anything else is a LedgerError."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from kvmart.errors import ConfigError, LedgerError

log = logging.getLogger("kvmart.ledger")
T = TypeVar("T")
SCHEMES = ("sqlite", "postgresql")
BUSY_SECONDS = 30.0
RETRIES = 20
RETRY_SQLSTATES = ("40001", "40P01")  # serialization failure, deadlock detected


def ledger_url(url: str, data_dir: Path) -> str:
    """The SQLAlchemy URL of a `--ledger` value; empty means the embedded SQLite file in `data_dir`."""
    if not url:
        return f"sqlite:///{data_dir / 'ledger.sqlite'}"
    scheme = url.partition("://")[0].split("+")[0]
    if scheme == "postgres":
        url, scheme = "postgresql" + url.removeprefix("postgres"), "postgresql"
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown ledger URL scheme in {redact(url)!r}; known: sqlite:///PATH, "
                          "postgresql://USER@HOST:PORT/DB")
    if scheme == "postgresql" and url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return url


def redact(url: str) -> str:
    """The URL without its password."""
    head, at, tail = url.rpartition("@")
    if not at or ":" not in head.partition("://")[2]:
        return url
    scheme, _, user = head.partition("://")
    return f"{scheme}://{user.split(':')[0]}:***@{tail}"


def open_engine(url: str) -> Engine:
    """An engine for a URL from `ledger_url`; the SQLite file's folder is created."""
    if url.startswith("sqlite"):
        path = url.partition(":///")[2]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": BUSY_SECONDS, "check_same_thread": False})
        _sqlite_immediate(engine)
        return engine
    try:
        return create_engine(url, pool_size=8, max_overflow=16, pool_pre_ping=True)
    except ImportError as e:
        raise ConfigError(f"PostgreSQL needs psycopg 3: pip install 'psycopg[binary]' ({e})") from e


def _sqlite_immediate(engine: Engine) -> None:
    """pysqlite's own transaction handling off; ours on: BEGIN IMMEDIATE takes the write lock up front, so two
    transactions never both read a balance and then both spend it."""

    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(BUSY_SECONDS * 1000)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def on_begin(connection) -> None:
        writes = connection.get_execution_options().get("kvmart_write", True)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if writes else "BEGIN")


def is_retryable(error: DBAPIError) -> bool:
    sqlstate = getattr(error.orig, "sqlstate", None) or getattr(error.orig, "pgcode", None)
    return sqlstate in RETRY_SQLSTATES or "database is locked" in str(error.orig)


def in_transaction(engine: Engine, work: Callable[[Connection], T], write: bool = True) -> T:
    """Run `work` in one transaction: all of it commits, or none of it (an exception rolls it back). Retried
    from the start on deadlock or serialization failure; `work` must have no effect outside the database.
    `write=False` promises that `work` only reads (SQLite then lets it run beside a writer)."""
    for attempt in range(RETRIES):
        try:
            with engine.connect() as raw:
                conn = raw.execution_options(kvmart_write=write)
                with conn.begin():
                    return work(conn)
        except DBAPIError as e:
            if not is_retryable(e) or attempt == RETRIES - 1:
                raise LedgerError(f"ledger database error: {e.orig}") from e
            log.info("ledger transaction retried after %s", type(e.orig).__name__)
            time.sleep(random.uniform(0, 0.01 * (attempt + 1)))
        except SQLAlchemyError as e:
            raise LedgerError(f"ledger database error: {e}") from e
    raise AssertionError("unreachable")
