"""A publisher's web origin on loopback, for ownership claims: a real HTTP server (standard library) in a thread,
answering each path from a table the test fills in. Not a test module."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Origin:
    """`with Origin() as o:` serves `o.pages[path] = (status, headers, body)` on http://127.0.0.1:<port>; anything
    else is a 404. `o.requests` lists the paths asked for."""

    def __init__(self) -> None:
        self.pages: dict[str, tuple[int, dict[str, str], bytes]] = {}
        self.requests: list[str] = []
        origin = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802  (the standard library's name)
                origin.requests.append(self.path)
                status, headers, body = origin.pages.get(self.path, (404, {}, b"not here"))
                self.send_response(status)
                for name, value in {"Content-Length": str(len(body)), **headers}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="origin", daemon=True)

    def serve_token(self, token: str) -> None:
        self.pages["/.well-known/kvmart-claim"] = (200, {"Content-Type": "text/plain"},
                                                   f"some-other-provider-token\n{token}\n".encode())

    def __enter__(self) -> "Origin":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)
