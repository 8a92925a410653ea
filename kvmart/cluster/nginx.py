"""Cache affinity with a proxy providers already run: an nginx configuration that sends every request about one
document to one `kvmart serve` node (consistent hashing on its affinity key), failing over to the next node on the
ring when one dies; and a runner that starts Debian's nginx with it on loopback, for the tests and benchmarks.

The affinity key, in order (docs/SCALE.md): the client's `x-kvmart-document` header (AFFINITY_HEADER: a document
id, or any key the client keeps per document, such as the value of its OpenAI `prompt_cache_key`); else the id in
a /v1/documents/{id} path; else, read from the body, the first of `documents` or OpenAI's `prompt_cache_key`
(nginx has the whole body before it picks an upstream: the body buffer keeps it in memory); else a per-request id,
which spreads requests with no key. `kvmart route` takes the same header first (kvmart/cluster/router.py).

`hash ... consistent` is ketama: each node owns points on a ring, a key goes to the next point; a node that fails
(connection refused, 502/503/504) is skipped for `fail_timeout` and its keys go to the next points, and only its
keys move. nginx's hash has no load bound: a document hotter than one node stays on one node (HAProxy's
`hash-balance-factor` spills it; docs/SCALE.md)."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

from kvmart.cluster.local import DEADLINE_SECONDS, NodeDiedError, free_port, require_binary, wait_for
from kvmart.cluster.router import AFFINITY_HEADER

NGINX_SBIN = "/usr/sbin/nginx"  # Debian's, whether or not /usr/sbin is on PATH
UPSTREAM_HEADER = "x-kvmart-upstream"  # the node(s) nginx tried, last one answered (as $upstream_addr lists them)


def nginx_config(nodes: list[str], listen: str = "0.0.0.0:80", fail_timeout_seconds: int = 10,
                 max_body: str = "32m") -> str:
    """The http-level configuration (an `include` in nginx.conf's http block, e.g. /etc/nginx/conf.d/kvmart.conf)
    for `kvmart serve` nodes given as base URLs."""
    servers = "\n".join(f"    server {urlsplit(n).netloc} max_fails=1 fail_timeout={fail_timeout_seconds}s;"
                        for n in nodes)
    header = "$http_" + AFFINITY_HEADER.replace("-", "_")
    return f'''# kvmart: cache affinity on nginx (docs/SCALE.md). Consistent hashing on each request's affinity key.
upstream kvmart {{
    hash $kvmart_affinity consistent;
{servers}
    keepalive 32;
}}
# the affinity key: the client's {AFFINITY_HEADER} header, else the document id in the path, else the body's
# first "documents" entry or "prompt_cache_key", else a per-request id (spread)
map {header} $kvmart_affinity {{
    ""      $kvmart_path_key;
    default {header};
}}
map $uri $kvmart_path_key {{
    "~^/v1/documents/(?<kvmart_id>[^/]+)$" $kvmart_id;
    default $kvmart_body_key;
}}
map $request_body $kvmart_body_key {{
    "~\\"documents\\"\\s*:\\s*\\[\\s*\\"(?<kvmart_doc>[^\\"]+)\\"" $kvmart_doc;
    "~\\"prompt_cache_key\\"\\s*:\\s*\\"(?<kvmart_pck>[^\\"]+)\\"" $kvmart_pck;
    default $request_id;
}}
server {{
    listen {listen};
    client_max_body_size {max_body};
    client_body_buffer_size {max_body};  # the body stays in memory, where the key map can read it
    location / {{
        proxy_pass http://kvmart;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_buffering off;  # streams flow as they are generated
        proxy_read_timeout 600s;
        proxy_connect_timeout 2s;
        # a node that is down, or answers 502/503/504, hands the request to the next node on the ring; a POST too
        # (the node answered nothing; a retried read is charged once: Idempotency-Key)
        proxy_next_upstream error timeout http_502 http_503 http_504 non_idempotent;
        add_header {UPSTREAM_HEADER} $upstream_addr always;
    }}
}}
'''


class NginxServer:
    """Debian's nginx with `nginx_config` on 127.0.0.1:<free port>, its files in `directory`, in the foreground."""

    def __init__(self, nodes: list[str], directory: Path) -> None:
        self.binary = NGINX_SBIN if os.access(NGINX_SBIN, os.X_OK) else require_binary("nginx")
        self.nodes, self.directory, self.port = nodes, directory, free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def main_config(self) -> str:
        d = self.directory
        user = "user root;\n" if os.geteuid() == 0 else ""  # as root, workers would switch to an account that
        # cannot write this temp directory
        temp = "".join(f"    {kind}_temp_path {d / kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi",
                                                                         "scgi"))
        site = nginx_config(self.nodes, f"127.0.0.1:{self.port}", fail_timeout_seconds=10)
        return (f"{user}worker_processes 1;\ndaemon off;\npid {d / 'nginx.pid'};\nerror_log {d / 'error.log'} warn;\n"
                f"events {{ worker_connections 256; }}\nhttp {{\n    access_log off;\n{temp}"
                + "".join("    " + line + "\n" if line else "\n" for line in site.splitlines()) + "}\n")

    def start(self) -> "NginxServer":
        self.directory.mkdir(parents=True, exist_ok=True)
        config = self.directory / "nginx.conf"
        config.write_text(self.main_config())
        check = subprocess.run([self.binary, "-t", "-p", str(self.directory), "-c", str(config)],
                               capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"nginx refused the configuration: {check.stderr}")
        self.process = subprocess.Popen([self.binary, "-p", str(self.directory), "-c", str(config)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def up() -> bool:
            if self.process is None or self.process.poll() is not None:
                raise NodeDiedError(f"nginx exited: {(self.directory / 'error.log').read_text()[-2000:]}")
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True

        try:
            wait_for(up, "nginx to start")
        except BaseException:
            self.stop()  # never left running by a start that failed
            raise
        return self

    def stop(self) -> None:
        """SIGQUIT: nginx finishes the requests in flight and exits (its workers with it)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(3)
            try:
                self.process.wait(DEADLINE_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
