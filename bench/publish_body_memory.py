"""Claim: a large publish body (an uploaded artifact in base64) costs the node a bounded amount of memory when it
is streamed to disk and scanned (kvmart/server/publish_body.py), against about three times its size when read
whole (its pieces and their join, the JSON string, the decoded artifact: the way every body was read before,
kvmart/server/body.py `read_body` then `json.loads`).

Measured side by side in one run, on one body of --mib MiB (random bytes as the "artifact": the reading, not the
verification, is measured), each way --repeats times in a fresh child process: the peak resident memory it added
(VmHWM - VmRSS at the start, from /proc) and the Python heap's peak (tracemalloc), min/median/max.

    python bench/publish_body_memory.py [--mib 45] [--repeats 3]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r'''
import base64, json, sys, tempfile, time, tracemalloc
from pathlib import Path

def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)

way, path = sys.argv[1], sys.argv[2]
import kvmart.server.publish_body as publish_body  # imported before measuring: its code is not the body's cost
start_rss = status("VmRSS")
Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current resident size
tracemalloc.start()
wall, cpu = time.perf_counter(), time.process_time()
with open(path, "rb") as f:
    if way == "whole":  # as every body was read before: its pieces, joined, parsed, the artifact decoded
        pieces = list(iter(lambda: f.read(1 << 16), b""))
        body = json.loads(b"".join(pieces))
        del pieces
        artifact = base64.b64decode(body.pop("artifact"), validate=True)
        size = len(artifact)
    else:
        with tempfile.TemporaryFile() as out:
            fields, has = publish_body.split_publish_json(f, out, 32 << 20, 1 << 31)
            size = out.tell()
wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
heap = tracemalloc.get_traced_memory()[1]
print(json.dumps({"rss_added": status("VmHWM") - start_rss, "heap_peak": heap, "artifact": size, "wall": wall,
                  "cpu": cpu}))
'''


def run(way: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, way, str(path)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=float, default=45.0, help="size of the body")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    artifact_bytes = int(args.mib * 2**20 * 3 / 4)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "body.json"
        with path.open("wb") as f:
            f.write(b'{"text": "' + b"word " * 4000 + b'", "title": "bench", "artifact": "')
            left = artifact_bytes
            while left:
                piece = os.urandom(min(left, 3 << 20))
                f.write(base64.b64encode(piece))
                left -= len(piece)
            f.write(b'"}')
        body_bytes = path.stat().st_size
        results = {way: [run(way, path) for _ in range(args.repeats)] for way in ("whole", "streamed")}
    print(f"body {mib(body_bytes)} MiB (artifact {mib(artifact_bytes)} MiB), {args.repeats} runs each, "
          f"one child process per run (shared machine: figures are what this run measured)")
    print(f"{'way':<10} {'resident added, MiB (min/median/max)':>38} {'Python heap peak, MiB':>30}"
          f" {'wall s (median)':>16} {'CPU s (median)':>15}")
    medians = {}
    for way, runs in results.items():
        rss = sorted(r["rss_added"] for r in runs)
        heap = sorted(r["heap_peak"] for r in runs)
        medians[way] = statistics.median(rss)
        print(f"{way:<10} {mib(rss[0]):>12} / {mib(statistics.median(rss)):>7} / {mib(rss[-1]):>7}      "
              f"{mib(heap[0]):>9} / {mib(statistics.median(heap)):>7} / {mib(heap[-1]):>7}"
              f" {statistics.median(r['wall'] for r in runs):>16.2f} {statistics.median(r['cpu'] for r in runs):>15.2f}")
    print(f"read whole: {medians['whole'] / body_bytes:.2f}x the body; streamed: "
          f"{medians['streamed'] / body_bytes:.3f}x; ratio {medians['whole'] / max(medians['streamed'], 1):,.0f}x")


if __name__ == "__main__":
    main()
