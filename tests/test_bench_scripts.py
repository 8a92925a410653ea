"""The benchmarks of issue 27 run end to end on the tiny model (their figures are for docs/BENCHMARKS.md; here only
that they work and print what they promise: a row per setting, min/median/max, CPU beside wall, the ratios).
bench/decode_batch.py also asserts on its way that batched decoding equals decoding alone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--model", "builtin:tiny", "--threads", "1",
                           *args], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def table_rows(output: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in output.splitlines()
            if line.startswith("| ") and not line.startswith("| document") and not line.startswith("| cached")
            and not line.startswith("| clients") and not line.startswith("| sequences")]


def test_reuse_vs_prefill_times_both_kernels_side_by_side():
    out = run("reuse_vs_prefill.py", "--lengths", "300,600", "--repeats", "2", "--kernels", "current,previous")
    rows = table_rows(out)
    assert [r[0] for r in rows] == ["300", "600"]
    assert all(len(r) == 12 and "[" in r[2] and "x [" in r[4] and "x [" in r[6] for r in rows)  # spreads, ratios
    assert "FLOP ratio" in out


def test_reuse_vs_prefill_synthetic_lengths_report_the_cost_per_token_added():
    rows = table_rows(run("reuse_vs_prefill.py", "--synthetic", "256,512", "--repeats", "2",
                          "--kernels", "current,previous"))
    assert [r[0] for r in rows] == ["256", "512"] and rows[0][2] == "-"
    float(rows[1][2])  # the CPU ms per 1k tokens added, a number (noise may make it negative on a tiny model)


def test_decode_batch_compares_batched_with_one_row_steps():
    rows = table_rows(run("decode_batch.py", "--context", "512", "--batch", "1,3", "--repeats", "2"))
    assert [r[0] for r in rows] == ["1", "3"] and all(r[3].endswith("x") for r in rows)


def test_serve_load_runs_batching_on_and_off_side_by_side():
    out = run("serve_load.py", "--clients", "1,2", "--rounds", "1", "--max-tokens", "4")
    rows = table_rows(out)
    assert [(r[0], r[2]) for r in rows] == [("1", "on"), ("1", "off"), ("2", "on"), ("2", "off")]
    assert "batching on vs off" in out
