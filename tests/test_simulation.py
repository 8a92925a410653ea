"""The CDN model: its parts (Zipf, Che's approximation), that its answers move the way they must when capacity,
routing and TTL change, that the analytic model agrees with a replay of sampled reads, and its money."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from kvmart.economics.simulation import (
    TIERS,
    ChunkRead,
    Cluster,
    Workload,
    analytic,
    che_time,
    che_time_bytes,
    replay_chunks,
    sample_reads,
    simulate,
    zipf_pmf,
)

SMALL = Workload(documents=2000, agents=40_000, window_seconds=3600)
SIZE = analytic(SMALL, Cluster()).extra["artifact_bytes"]


def test_zipf_and_che():
    p = zipf_pmf(1000, 0.9)
    assert p.sum() == pytest.approx(1.0) and np.all(np.diff(p) < 0)
    rates = p * 100
    t = che_time(rates, 50)
    assert np.sum(-np.expm1(-rates * t)) == pytest.approx(50, rel=1e-6)
    assert che_time(rates, 1000) == float("inf") and che_time(rates, 0) == 0.0


def fractions(cluster: Cluster, workload: Workload = SMALL) -> dict[str, float]:
    f = analytic(workload, cluster).fractions
    assert sum(f.values()) == pytest.approx(1.0) and all(v >= 0 for v in f.values())
    return f


def local(f: dict[str, float]) -> float:
    return f["ram"] + f["disk"]


def test_more_capacity_affinity_and_longer_ttls_help():
    base = Cluster(nodes=4, ram_bytes=20 * SIZE, disk_bytes=100 * SIZE)
    assert fractions(replace(base, ram_bytes=80 * SIZE))["ram"] > fractions(base)["ram"]
    assert local(fractions(replace(base, disk_bytes=400 * SIZE))) > local(fractions(base))
    assert local(fractions(base)) > local(fractions(replace(base, routing="random")))
    assert fractions(base)["prefill"] == 0.0  # published and pinned: nothing is ever prefilled again
    short, long_ = replace(base, disk_bytes=0, shared_ttl_seconds=60), replace(base, disk_bytes=0, shared_ttl_seconds=3600)
    assert fractions(short)["prefill"] > fractions(long_)["prefill"] > 0


@pytest.mark.parametrize("cluster", [Cluster(nodes=4, ram_bytes=40 * SIZE, disk_bytes=200 * SIZE),
                                     Cluster(nodes=4, ram_bytes=40 * SIZE, disk_bytes=200 * SIZE, routing="random"),
                                     Cluster(nodes=2, ram_bytes=40 * SIZE, disk_bytes=0, shared_ttl_seconds=300,
                                             published_on=0)])
def test_the_analytic_model_agrees_with_a_replay(cluster):
    docs, times = sample_reads(SMALL, 40_000, seed=5)
    model, replay = analytic(SMALL, cluster).fractions, simulate(SMALL, cluster, docs, times).fractions
    for tier in TIERS:
        assert model[tier] == pytest.approx(replay[tier], abs=0.05), (tier, model, replay)


def test_money():
    o = analytic(SMALL, Cluster(nodes=4, ram_bytes=40 * SIZE, disk_bytes=0, shared_ttl_seconds=300))
    assert 0 < o.prefills < SMALL.reads
    assert o.revenue_usd - o.cost_usd == o.margin_usd
    assert o.compute_saved_usd > 0 and o.egress_avoided_usd > 0 and o.storage_usd > 0
    assert o.ttft_p50_seconds <= o.ttft_p99_seconds


def test_che_time_in_bytes_with_the_reads_own_chunks():
    rates = zipf_pmf(500, 0.9) * 10
    assert che_time_bytes(rates, 4.0, 200.0, 0.0, 1.0) == pytest.approx(che_time(rates, 50), rel=1e-6)
    # every read also keeps 1 byte under one of 3 keys per item: less room for the items, a shorter time
    t = che_time_bytes(rates, 4.0, 200.0, 1.0, 3.0)
    held = 4 * np.sum(-np.expm1(-rates * t)) + 3 * np.sum(-np.expm1(-rates * t / 3))
    assert held == pytest.approx(200.0, rel=1e-6) and t < che_time(rates, 50)
    assert che_time_bytes(rates, 4.0, 500 * 7.0, 1.0, 3.0) == float("inf")  # everything fits


def test_the_reads_own_last_chunks_take_ram_from_documents():
    size = analytic(SMALL, Cluster()).extra["artifact_bytes"]
    cluster = Cluster(nodes=4, ram_bytes=40 * size, disk_bytes=None)
    lean = replace(SMALL, artifact_bytes=size)
    assert fractions(cluster, replace(lean, private_chunk_bytes=size // 20))["ram"] < fractions(cluster, lean)["ram"]


def test_replay_chunks_reads_each_chunk_from_the_fastest_tier_and_keeps_it_in_ram():
    a, b = (("a0", 4), ("a1", 4)), (("b0", 4), ("b1", 4))
    reads = [ChunkRead(1, a, ("a?", 1)), ChunkRead(1, a, ("a?", 1)), ChunkRead(1, b, ("b?", 1)),
             ChunkRead(1, a, ("a?", 1)), ChunkRead(0, b, ("b?", 1))]
    # node 1's RAM holds 11 bytes: one document (8) and the reads' last chunks (1 each), not two documents
    replay = replay_chunks(reads, 2, 11, None, {0: [("a0", 9), ("a1", 9), ("b0", 9), ("b1", 9)]})
    assert replay.chunk_tiers == (("shared", "shared"), ("ram", "ram"), ("shared", "shared"), ("disk", "disk"),
                                  ("disk", "disk"))
    assert replay.read_tiers == ["shared", "ram", "shared", "disk", "disk"]
    assert replay.fractions == {"ram": 0.2, "disk": 0.4, "shared": 0.4, "prefill": 0.0}
    # warm-up chunks held at the start are the oldest: the first reads evict them, then they are gone
    held = replay_chunks([ChunkRead(0, a, ("a?", 1))] * 2, 1, 9, None, {}, ram_held=[9])
    assert held.chunk_tiers == (("shared", "shared"), ("ram", "ram")) and held.chunk_fractions["ram"] == 0.5
