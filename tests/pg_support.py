"""A real PostgreSQL server for the ledger tests: kvmart/cluster/local.py's (initdb in a temp dir, `postgres` on
127.0.0.1 at a free port, stopped and removed at the end), and the rule for when it cannot exist. Not a test
module."""

from __future__ import annotations

from service_support import import_or_missing, missing_service

from kvmart.cluster.local import PostgresServer, find_bin, free_port

__all__ = ["PostgresServer", "find_bin", "free_port", "postgres_or_missing"]


def postgres_or_missing() -> PostgresServer:
    """A PostgresServer (not yet started), or `missing_service` saying what is not installed."""
    import_or_missing("psycopg", "psycopg is not installed (pip install 'psycopg[binary]', in the test extras)")
    if find_bin("initdb") is None or find_bin("postgres") is None:  # this module's name: tests replace it
        missing_service("PostgreSQL's initdb/postgres are not installed (Debian: apt-get install postgresql)")
    try:
        return PostgresServer()
    except FileNotFoundError as e:
        missing_service(str(e))
