"""Claim: the market page costs about what the JSON API costs for the same catalogue. Measured side by side, one
server, interleaved: GET / (the HTML catalogue: store refresh, ledger report, licence terms, sort, template, SVG
chart) against GET /v1/documents?limit=100 (the JSON listing), and the document page against GET
/v1/documents/{id}, at several catalogue sizes. Prints median milliseconds and the ratios, as markdown.

    python bench/web_pages.py --sizes 10,100 --repeats 30
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from decimal import Decimal
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import httpx  # noqa: E402
import uvicorn  # noqa: E402
from rich.progress import track  # noqa: E402

from kvmart.app import create_app
from kvmart.config import Settings  # noqa: E402
from kvmart.reuse.samples import sample_text  # noqa: E402
from kvmart.server import ServerSettings  # noqa: E402

MODEL = "builtin:tiny"


def start(data_dir: Path):
    app = create_app(Settings(data_dir=data_dir, model=MODEL, dtype="float32"),
                     ServerSettings(port=0, log_level="warning"))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return app, server, f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"


def median_ms(http: httpx.Client, path: str, repeats: int, headers: dict | None = None) -> list[float]:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        http.get(path, headers=headers).raise_for_status()
        times.append(1000 * (time.perf_counter() - began))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    texts = [sample_text(n) for n in ("bsd-3-clause", "apache-2.0", "mpl-2.0")]
    print("| documents | GET / (HTML) ms | GET /v1/documents ms | ratio | document page ms | GET /v1/documents/{id} ms "
          "| ratio |\n|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        app, server, url = start(Path(tmp))
        ledger = app.state.services.ledger
        key = ledger.create_account("bench-pub", "publisher")[1]
        ledger.deposit("bench-pub", Decimal("100"))
        auth = {"Authorization": f"Bearer {key}"}
        published: list[str] = []
        with httpx.Client(base_url=url, timeout=120) as http:
            for size in (int(s) for s in args.sizes.split(",")):
                for i in track(range(len(published), size), description=f"publishing up to {size}"):
                    body = {"text": f"Document {i}.\n\n" + texts[i % 3][: 1500 + 7 * i], "title": f"doc {i}"}
                    response = http.post("/v1/documents", json=body, headers=auth).raise_for_status()
                    published.append(response.json()["id"])
                html, api, page, one = [], [], [], []
                for _ in range(args.repeats):  # interleaved, so drift hits both alike
                    html += median_ms(http, "/", 1)
                    api += median_ms(http, "/v1/documents?limit=100", 1, auth)
                    page += median_ms(http, f"/documents/{published[0]}", 1)
                    one += median_ms(http, f"/v1/documents/{published[0]}", 1, auth)
                m = [statistics.median(x) for x in (html, api, page, one)]
                print(f"| {size} | {m[0]:.1f} | {m[1]:.1f} | {m[0] / m[1]:.1f}x | {m[2]:.1f} | {m[3]:.1f} | "
                      f"{m[2] / m[3]:.1f}x |")
        server.should_exit = True


if __name__ == "__main__":
    main()
