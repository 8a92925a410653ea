"""A real PostgreSQL server for the ledger tests: initdb in a temp dir, `postgres` on 127.0.0.1 at a free port,
stopped and removed at the end. PostgreSQL refuses to run as root, so as root both run as `nobody` (the temp dir
is handed to it). Not a test module."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from service_support import import_or_missing, missing_service

START_SECONDS = 60.0
SUPERUSER = "kvmart"


def find_bin(name: str) -> str | None:
    """`name` on PATH, else in Debian's /usr/lib/postgresql/<version>/bin (newest first)."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]),
                        reverse=True)
    return candidates[0] if candidates else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_or_missing() -> PostgresServer:
    """A PostgresServer (not yet started), or `missing_service` saying what is not installed."""
    import_or_missing("psycopg", "psycopg is not installed (pip install 'psycopg[binary]', in the test extras)")
    try:
        return PostgresServer()
    except FileNotFoundError as e:
        missing_service(str(e))


class PostgresServer:
    """`with PostgresServer() as pg: pg.new_database()` -> a URL for a fresh, empty database."""

    def __init__(self) -> None:
        self.initdb, self.postgres = find_bin("initdb"), find_bin("postgres")
        if not self.initdb or not self.postgres:
            raise FileNotFoundError("PostgreSQL's initdb/postgres are not installed (Debian: apt-get install "
                                    "postgresql)")
        self.root = Path(tempfile.mkdtemp(prefix="kvmart-pg-"))
        self.user = "nobody" if os.geteuid() == 0 else None
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    def _run_as(self) -> dict:
        return {"user": self.user, "group": pwd.getpwnam(self.user).pw_gid} if self.user else {}

    def __enter__(self) -> "PostgresServer":
        if self.user:
            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        subprocess.run([self.initdb, "-D", str(self.root / "data"), "-U", SUPERUSER, "-A", "trust", "-E", "UTF8",
                        "--no-locale", "--no-sync"], check=True, capture_output=True, cwd=self.root, env=env,
                       **self._run_as())
        self.process = subprocess.Popen(
            [self.postgres, "-D", str(self.root / "data"), "-p", str(self.port), "-k", str(self.root),
             "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off",
             "-c", "full_page_writes=off", "-c", "max_connections=200", "-c", "shared_buffers=32MB"],
            stdout=subprocess.DEVNULL, stderr=open(self.root / "postgres.log", "w"), cwd=self.root, env=env,
            **self._run_as())
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        import psycopg

        end = time.monotonic() + START_SECONDS
        while True:
            try:
                psycopg.connect(self.url("postgres"), connect_timeout=2).close()
                return
            except psycopg.OperationalError as e:
                if self.process.poll() is not None or time.monotonic() > end:
                    raise RuntimeError(f"postgres did not start: {(self.root / 'postgres.log').read_text()}") from e
                time.sleep(0.1)

    def url(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A URL for a new, empty database."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:16]
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # fast shutdown: disconnects clients
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)
