"""`kvmart serve` (kvmart/cli/main.py): the real command in a subprocess, stopped by SIGTERM mid-answer."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import httpx
from server_support import DEADLINE_SECONDS

from kvmart.cluster.local import KVMART_READY, LogWatch
from kvmart.reuse.samples import sample_text

ADMIN_KEY = "admin-key-for-this-test-only"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_answers_then_sigterm_lets_the_answer_finish(tiny_folder, kvmart_data_dir):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-c", "from kvmart.cli.main import main; main()", "serve", "--port", str(port),
         "--ram-cache-bytes", "64MiB", "--max-queue", "8"],
        env={**os.environ, "KVMART_MODEL": "builtin:tiny", "KVMART_ADMIN_KEY": ADMIN_KEY},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert process.stdout is not None
    output = LogWatch(process.stdout, KVMART_READY)
    url = f"http://127.0.0.1:{port}"
    try:
        output.wait_ready("kvmart serve")  # its own word that it listens, however loaded the machine is
        with httpx.Client(base_url=url, timeout=DEADLINE_SECONDS,
                          headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as client:
            doc = client.post("/v1/documents", json={"text": sample_text("bsd-3-clause")}).json()
            body = {"model": "builtin:tiny", "documents": [doc["id"]], "max_tokens": 200, "temperature": 0,
                    "stream": True, "messages": [{"role": "user", "content": "Who holds the copyright?"}]}
            with client.stream("POST", "/v1/chat/completions", json=body) as response:
                lines = response.iter_lines()
                assert next(lines).startswith("data: ")
                process.send_signal(signal.SIGTERM)
                rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        process.wait(DEADLINE_SECONDS)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    stderr = output.text()
    assert process.returncode in (0, -signal.SIGTERM), stderr
    assert "serving builtin:tiny" in stderr and "Finished server process" in stderr
    assert (kvmart_data_dir / "store" / "entries" / f"{doc['cache_id']}.json").exists()  # the CLI's own store
