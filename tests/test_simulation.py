"""The CDN model: its parts (Zipf, Che's approximation), that its answers move the way they must when capacity,
routing and TTL change, that the analytic model agrees with a replay of sampled reads, and its money."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from kvmart.economics.simulation import TIERS, Cluster, Workload, analytic, che_time, sample_reads, simulate, zipf_pmf

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
