"""Servers the tests start (kvmart/cluster/local.py, tests/node_support.py, tests/server_support.py) are ready when
they say so, whatever the machine's load: no wall-clock allowance decides it; one that exits first fails at once
with its output, and whatever a test started is stopped even when the test fails."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading

import pytest

from kvmart.cluster.local import KVMART_READY, LogWatch, NodeDiedError


def script(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_a_server_is_ready_when_it_logs_that_it_listens():
    """The ready line comes after a start-up that keeps the process busy; readiness waits for the line itself."""
    process = script("import sys, time\nprint('loading the model...', flush=True)\n"
                     "sum(range(3 * 10**7))\n"  # busy, as a node loading torch on a loaded machine
                     f"print('INFO:     {KVMART_READY} http://127.0.0.1:1 (Press CTRL+C to quit)', flush=True)\n"
                     "time.sleep(3600)")
    try:
        assert process.stdout is not None
        watch = LogWatch(process.stdout, KVMART_READY)
        watch.wait_ready("a fake server")
        assert watch.is_ready and "loading the model" in watch.text()
    finally:
        process.kill()
        process.wait()


def test_a_server_that_exits_before_it_is_ready_fails_at_once_with_its_output():
    process = script("import sys\nprint('no model named builtin:nope', flush=True)\nsys.exit(3)")
    assert process.stdout is not None
    with pytest.raises(NodeDiedError, match="no model named builtin:nope"):
        LogWatch(process.stdout, KVMART_READY).wait_ready("a failing server")
    assert process.wait() == 3


def test_a_node_that_fails_to_start_is_not_left_running(tiny_folder):
    from node_support import Node

    with pytest.raises(NodeDiedError, match="builtin:no-such-model"):
        Node(KVMART_MODEL="builtin:no-such-model")
    assert all(node.process.poll() is not None for node in Node.started)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # uvicorn's exit, on its thread
def test_a_live_server_that_cannot_start_is_stopped(model_f32, tmp_path):
    """The port is taken: uvicorn gives up; the LiveServer raises (no 30 s wait) and leaves no thread behind."""
    from server_support import LiveServer

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = LiveServer(model_f32, tmp_path / "data")
        server.server.config.port = taken.getsockname()[1]
        with pytest.raises((AssertionError, SystemExit)), server:
            pass
        assert not server.thread.is_alive()


def test_the_shutdown_probe_counts_a_server_closing_mid_response_as_stopped():
    """tests/test_server_http.py's probe: a server that accepts the connection and closes it without an answer
    (uvicorn shutting down as the probe arrives) has stopped; the probe must say so, not raise."""
    from test_server_http import _refused

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def close_mid_response() -> None:
        connection, _ = listener.accept()
        connection.recv(65536)
        connection.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{\"status\"")
        connection.close()

    thread = threading.Thread(target=close_mid_response)
    thread.start()
    try:
        assert _refused(f"http://127.0.0.1:{listener.getsockname()[1]}")
    finally:
        thread.join()
        listener.close()


def test_a_postgres_that_fails_to_start_fails_at_once_and_leaves_nothing_behind():
    """PostgreSQL is ready when it logs so (no wall-clock allowance); one that exits first fails at once with its
    output, and its directory (and process) are gone, not left for the session's end."""
    import os
    from pathlib import Path

    from pg_support import postgres_or_missing

    server = postgres_or_missing()
    fake = Path(server.root) / "fake-postgres"
    fake.write_text("#!/bin/sh\necho 'FATAL:  could not create lock file: the test says no' >&2\nexit 1\n")
    fake.chmod(0o755)
    server.initdb, server.postgres = "/bin/true", str(fake)
    with pytest.raises(NodeDiedError, match="the test says no"):
        server.__enter__()
    assert server.process is not None and server.process.poll() == 1
    assert not os.path.exists(server.root)
