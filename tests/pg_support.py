"""A real PostgreSQL server for the ledger tests: kvmart/cluster/local.py's (initdb in a temp dir, `postgres` on
127.0.0.1 at a free port, stopped and removed at the end). Not a test module."""

from __future__ import annotations

from kvmart.cluster.local import PostgresServer, find_bin, free_port

__all__ = ["PostgresServer", "find_bin", "free_port"]
