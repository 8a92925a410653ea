"""Local clusters on loopback, for the tests and the CDN benchmarks: a real `redis-server` and PostgreSQL
(Debian's), `kvmart serve` nodes and `kvmart route` as subprocesses, each on a free port with its own directory,
started and stopped by the caller.

A server is ready when it says so: `LogWatch` follows its output through a pipe and waits for the line it logs once
it listens (uvicorn's "Uvicorn running on", redis' "Ready to accept connections", PostgreSQL's "database system
is ready to accept connections"), or for its exit, which fails at once with its last lines; `kvmart route` and
nginx are ready when their port accepts a connection. No wall-clock allowance decides readiness: a loaded machine
makes a start slower, never a failure. HANG_SECONDS only guards against a server that hangs without a word. A
start that fails stops what it started before it raises."""

from __future__ import annotations

import collections
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import IO

import httpx

from kvmart.errors import ConfigError

HANG_SECONDS = 1800.0  # a guard against a server that hangs without a word: never a timing
DEADLINE_SECONDS = HANG_SECONDS  # what waits here and in the tests allow something that must happen
KVMART_READY = "Uvicorn running on"  # what `kvmart serve` logs once it listens (after its start-up is complete)
REDIS_READY = "Ready to accept connections"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, what: str, deadline_seconds: float = DEADLINE_SECONDS) -> None:
    """Poll `condition` until it is true; AssertionError after the deadline. Exceptions count as not yet."""
    end = time.monotonic() + deadline_seconds
    while True:
        try:
            if condition():
                return
        except NodeDiedError:
            raise
        except Exception:  # not up yet
            pass
        if time.monotonic() > end:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.1)


class NodeDiedError(RuntimeError):
    """A server process exited while it was awaited."""


class LogWatch:
    """Follows a server's output (a pipe, bytes) line by line on a thread: every line goes to `sink` (a log file,
    or only the last lines kept) and `wait_ready` returns once a line holds `ready_text`. The thread runs until the
    pipe closes, so the server never blocks on a full pipe."""

    def __init__(self, stream: IO[bytes], ready_text: str, sink: IO[bytes] | None = None) -> None:
        self.ready_text, self.sink = ready_text, sink
        self.tail: collections.deque[str] = collections.deque(maxlen=60)
        self.is_ready = self.has_ended = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._follow, args=(stream,), name="log-watch", daemon=True)
        self._thread.start()

    def _follow(self, stream: IO[bytes]) -> None:
        try:
            for raw in iter(stream.readline, b""):
                if self.sink is not None:
                    self.sink.write(raw)
                    self.sink.flush()
                line = raw.decode(errors="replace")
                self.tail.append(line)
                if self.ready_text in line:
                    with self._changed:
                        self.is_ready = True
                        self._changed.notify_all()
        except (OSError, ValueError):  # the sink or the pipe was closed under us: the server is being stopped
            pass
        finally:
            with self._changed:
                self.has_ended = True
                self._changed.notify_all()

    def wait_ready(self, what: str) -> None:
        """Return once the server logged its ready line; NodeDiedError with its last lines if its output ended
        first (it exited); AssertionError only after HANG_SECONDS of silence-or-hang."""
        with self._changed:
            self._changed.wait_for(lambda: self.is_ready or self.has_ended, HANG_SECONDS)
        if not self.is_ready:
            said = "".join(self.tail)[-3000:]
            if self.has_ended:
                raise NodeDiedError(f"{what}: it exited before it was ready:\n{said}")
            raise AssertionError(f"{what}: not ready after {HANG_SECONDS:.0f} s (hung?):\n{said}")

    def text(self) -> str:
        """The last lines the server wrote."""
        return "".join(self.tail)


class MissingBinaryError(ConfigError):
    """A server binary the cluster needs is not installed."""


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise MissingBinaryError(f"{name} is not installed (apt-get install {name}; .ci/run does)")
    return path


class RedisServer:
    """redis-server on 127.0.0.1:<port>, data in `directory` with append-only persistence, so a restart keeps
    what was written (as a production Redis tier would be configured)."""

    def __init__(self, directory: Path) -> None:
        self.binary, self.directory, self.port = require_binary("redis-server"), directory, free_port()
        self.process: subprocess.Popen | None = None
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
             "--appendonly", "yes", "--save", "", "--protected-mode", "no", "--daemonize", "no"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert self.process.stdout is not None
        try:
            LogWatch(self.process.stdout, REDIS_READY).wait_ready("redis-server")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # SIGTERM: redis flushes its append-only file and exits
            try:
                self.process.wait(DEADLINE_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def client(self):
        import redis

        return redis.Redis(port=self.port)


CATALOG_REFRESH_SECONDS = "0.2"  # local clusters' nodes learn of each other's documents quickly


class KvmartNode:
    """`kvmart serve --model builtin:tiny` as a subprocess with its own data dir and port, over `store_url`.
    `models`: a models folder to link as DATA_DIR/models (shared by nodes, so the tiny model is built once)."""

    def __init__(self, name: str, root: Path, models: Path | None, store_url: str, *options: str,
                 ledger_url: str = "", admin_key: str = "", env: dict[str, str] | None = None) -> None:
        """`ledger_url`: the ledger the nodes share (PostgreSQL in production; empty: each node its own SQLite);
        `admin_key`: KVMART_ADMIN_KEY, the key `publish` and `ask` send unless given another; `env`: more of the
        node's environment (KVMART_* settings)."""
        self.name, self.port, self.store_url, self.options = name, free_port(), store_url, options
        self.ledger_url, self.admin_key, self.env = ledger_url, admin_key, dict(env or {})
        self.data_dir = root / name
        self.data_dir.mkdir(parents=True)
        if models is not None:
            (self.data_dir / "models").symlink_to(models, target_is_directory=True)
        self.log_path = root / f"{name}.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "KvmartNode":
        paths = (str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH"))  # this kvmart first
        env = {**os.environ, "KVMART_DATA_DIR": str(self.data_dir), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
               "KVMART_LOG_LEVEL": "info",  # its ready line (KVMART_READY) is logged at info
               "PYTHONPATH": os.pathsep.join(p for p in paths if p),
               "KVMART_CATALOG_REFRESH_SECONDS": CATALOG_REFRESH_SECONDS, **self.env}
        if self.ledger_url:
            env["KVMART_LEDGER"] = self.ledger_url
        if self.admin_key:
            env["KVMART_ADMIN_KEY"] = self.admin_key
        command = [sys.executable, "-c", "from kvmart.cli.main import main; main()", "serve", "--model", "builtin:tiny",
                   "--port", str(self.port), "--store", self.store_url, "--max-active", "2", *self.options]
        self.log = open(self.log_path, "wb")  # noqa: SIM115  (the node writes it until `stop` closes it)
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.http = httpx.Client(base_url=self.url, timeout=DEADLINE_SECONDS)
        assert self.process.stdout is not None
        try:
            LogWatch(self.process.stdout, KVMART_READY, self.log).wait_ready(
                f"node {self.name} (log: {self.log_path})")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the node (SIGTERM: in-flight requests finish) if it was started and still runs."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(DEADLINE_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.http.close()
        self.log.close()

    def health(self) -> dict:
        return self.http.get("/healthz").json()

    def _auth(self, key: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.admin_key}"}

    def publish(self, text: str, key: str | None = None) -> httpx.Response:
        return self.http.post("/v1/documents", json={"text": text}, headers=self._auth(key))

    def knows(self, doc_id: str, key: str | None = None) -> bool:
        """Whether the node's catalogue holds `doc_id` yet (one published on another node joins it at the next
        catalogue refresh)."""
        return self.http.get(f"/v1/documents/{doc_id}", headers=self._auth(key)).status_code == 200

    def ask(self, doc_id: str, question: str, max_tokens: int = 8, key: str | None = None) -> dict:
        """Ask about `doc_id` once the node knows it (waiting on its catalogue, not on a clock)."""
        wait_for(lambda: self.knows(doc_id, key), f"node {self.name} to learn of {doc_id}")
        response = self.http.post("/v1/chat/completions", json={
            "model": "builtin:tiny", "messages": [{"role": "user", "content": question}], "documents": [doc_id],
            "temperature": 0, "max_tokens": max_tokens}, headers=self._auth(key))
        assert response.status_code == 200, response.text
        return response.json()


class RouterProcess:
    """`kvmart route --node URL ...` as a subprocess on a free loopback port."""

    def __init__(self, nodes: list[str], log_path: Path) -> None:
        self.nodes, self.port, self.log_path = nodes, free_port(), log_path
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "RouterProcess":
        paths = (str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH"))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
        command = [sys.executable, "-c", "from kvmart.cli.main import main; main()", "route", "--port",
                   str(self.port)]
        for node in self.nodes:
            command += ["--node", node]
        self.log = open(self.log_path, "wb")  # noqa: SIM115  (written by the router until `stop`)
        self.process = subprocess.Popen(command, env=env, stdout=self.log, stderr=subprocess.STDOUT)

        def up() -> bool:
            if self.process is None or self.process.poll() is not None:
                raise NodeDiedError(f"kvmart route exited: {self.log_path.read_text()[-2000:]}")
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True

        try:
            wait_for(up, f"kvmart route to start (log: {self.log_path})")
        except BaseException:
            self.stop()  # never left running by a start that failed
            raise
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(DEADLINE_SECONDS)
        if self.process is not None:
            self.log.close()
        self.process = None


SUPERUSER = "kvmart"
POSTGRES_READY = "database system is ready to accept connections"


def find_bin(name: str) -> str | None:
    """`name` on PATH, else in Debian's /usr/lib/postgresql/<version>/bin (newest first)."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]),
                        reverse=True)
    return candidates[0] if candidates else None


class PostgresServer:
    """A real PostgreSQL server: initdb in a temp dir, `postgres` on 127.0.0.1 at a free port, stopped and removed
    at the end. PostgreSQL refuses to run as root, so as root both run as `nobody` (the temp dir is handed to it).
    `with PostgresServer() as pg: pg.new_database()` -> a URL for a fresh, empty database."""

    def __init__(self) -> None:
        initdb, postgres = find_bin("initdb"), find_bin("postgres")
        if not initdb or not postgres:
            raise FileNotFoundError("PostgreSQL's initdb/postgres are not installed (Debian: apt-get install "
                                    "postgresql)")
        self.initdb, self.postgres = initdb, postgres
        self.root = Path(tempfile.mkdtemp(prefix="kvmart-pg-"))
        self.user = "nobody" if os.geteuid() == 0 else None
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.log: IO[bytes] | None = None

    def _run_as(self) -> dict:
        return {"user": self.user, "group": pwd.getpwnam(self.user).pw_gid} if self.user else {}

    def __enter__(self) -> "PostgresServer":
        """Start it; return once it logs that it accepts connections (through a pipe: no wall-clock allowance).
        If it cannot start, it is stopped and its directory removed before the error is raised."""
        try:
            self._start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start(self) -> None:
        if self.user:
            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}  # its ready line in English
        subprocess.run([self.initdb, "-D", str(self.root / "data"), "-U", SUPERUSER, "-A", "trust", "-E", "UTF8",
                        "--no-locale", "--no-sync"], check=True, capture_output=True, cwd=self.root, env=env,
                       **self._run_as())
        self.log = open(self.root / "postgres.log", "wb")  # noqa: SIM115  (written until __exit__ closes it)
        self.process = subprocess.Popen(
            [self.postgres, "-D", str(self.root / "data"), "-p", str(self.port), "-k", str(self.root),
             "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off",
             "-c", "full_page_writes=off", "-c", "max_connections=200", "-c", "shared_buffers=32MB"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=self.root, env=env, **self._run_as())
        assert self.process.stderr is not None
        LogWatch(self.process.stderr, POSTGRES_READY, self.log).wait_ready("postgres")

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
                self.process.wait(DEADLINE_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.log is not None:
            self.log.close()
        shutil.rmtree(self.root, ignore_errors=True)
