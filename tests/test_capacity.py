"""Capacity and queueing (kvmart/economics/capacity.py): utilisation by hand, the simulated queue against queueing
theory (M/D/1's mean wait, a full queue refusing 1 - 1/rho), the bottleneck moving where the numbers say, node
sizing meeting its target, bounded-load routing spreading a hot document, and the closed network against exact
cases."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from kvmart.economics.capacity import (
    ServiceTimes,
    capacity,
    closed_network,
    demands,
    nodes_needed,
    paper_times,
    roofline_times,
    simulate_latency,
    utilisation,
)
from kvmart.economics.simulation import Cluster, NodeLoad, Workload, analytic, placements, zipf_pmf

GIB = 2**30
ONE = ServiceTimes(reuse_seconds=1.0, prefill_seconds=10.0, source="test")
ALL_RAM = {"ram": 1.0, "disk": 0.0, "shared": 0.0, "prefill": 0.0}


def test_service_times_come_from_the_roofline_or_the_paper():
    w = Workload()
    assert roofline_times(w).reuse_seconds == pytest.approx(0.142, abs=0.001)
    assert (paper_times().reuse_seconds, paper_times().prefill_seconds) == (0.296, 14.71)
    assert "roofline" in roofline_times(w).source and "paper" in paper_times().source
    with pytest.raises(ValueError):
        ServiceTimes(0.0, 1.0, "bad")


def test_utilisation_is_arrivals_times_service_over_servers():
    cluster = Cluster(devices_per_node=4, disk_bytes_per_second=100.0, shared_bytes_per_second=50.0)
    work = demands(1000.0, ONE, cluster)  # disk: 10 s per artifact, link: 20 s
    load = NodeLoad(2.0, {"ram": 0.5, "disk": 0.25, "shared": 0.25, "prefill": 0.0})
    rho = utilisation(load, work, cluster)
    assert rho["device"] == pytest.approx(2.0 * 1.0 / 4)  # every read holds a device for 1 s
    assert rho["disk"] == pytest.approx(2.0 * (0.25 + 0.25) * 10.0)  # disk reads, and the shared reads' fills
    assert rho["link"] == pytest.approx(2.0 * 0.25 * 20.0)
    assert rho["shared tier"] == 0.0  # unbounded unless given


def test_the_simulated_queue_agrees_with_md1_and_a_full_queue_refuses_the_excess():
    cluster = Cluster(devices_per_node=1, max_queue_per_node=None)
    work = demands(1.0, ONE, cluster)
    latencies, refused = simulate_latency([NodeLoad(0.5, ALL_RAM)], work, cluster, seed=1)
    expected = 1.0 + 0.5 / (2 * (1 - 0.5))  # M/D/1: service + rho s / (2 (1 - rho))
    assert refused == 0 and float(np.mean(latencies)) == pytest.approx(expected, rel=0.05)
    bounded = replace(cluster, max_queue_per_node=4)
    _, refused = simulate_latency([NodeLoad(2.0, ALL_RAM)], work, bounded, seed=1)
    assert refused == pytest.approx(1 - 1 / 2.0, abs=0.02)  # rho = 2: half the reads find the queue full


def test_too_few_nodes_are_overloaded_and_say_where():
    w = Workload(documents=2000, agents=2_000_000, window_seconds=3600)  # 556 reads/s of 556 MB artifacts
    size = analytic(w, Cluster()).extra["artifact_bytes"]
    slow_link = Cluster(nodes=2, ram_bytes=10 * size, disk_bytes=0, shared_bytes_per_second=1.25e9)
    o = analytic(w, slow_link)
    cap = capacity(o, w, slow_link, roofline_times(w))
    assert cap.bottleneck == "link" and cap.is_overloaded and cap.refused > 0.5
    assert cap.max_reads_per_second < cap.offered_reads_per_second
    roomy = replace(slow_link, nodes=64, ram_bytes=2000 * size)
    cap = capacity(analytic(w, roomy), w, roomy, roofline_times(w))
    assert cap.bottleneck == "device" and not cap.is_overloaded and cap.refused == 0
    assert cap.ttft_p99_seconds < 1.0
    unbounded = replace(slow_link, max_queue_per_node=None)
    assert capacity(o, w, unbounded, roofline_times(w)).ttft_p99_seconds == math.inf


def test_nodes_needed_meets_its_target_and_one_fewer_does_not():
    w = Workload(documents=2000, agents=20_000_000, window_seconds=86_400)  # 231 reads/s
    cluster = Cluster(ram_bytes=64 * GIB, disk_bytes=2 * 10**12)
    sized = nodes_needed(w, cluster, roofline_times(w), 1.0)
    assert sized.nodes is not None and sized.nodes > 1 and sized.capacity is not None
    assert sized.capacity.ttft_p99_seconds <= 1.0 and sized.capacity.refused == 0
    fewer = replace(cluster, nodes=sized.nodes - 1)
    cap = capacity(analytic(w, fewer), w, fewer, roofline_times(w))
    assert cap.is_overloaded or cap.refused > 0 or cap.ttft_p99_seconds > 1.0


def test_bounded_routing_spreads_a_document_hotter_than_its_node():
    """Under affinity the hottest document's reads all land on one node, whatever the node count; bounded loads
    spill them to the next nodes, keeping every node under the bound."""
    w = Workload(documents=1000, agents=10_000_000, window_seconds=86_400)
    rate = w.reads * zipf_pmf(w.documents, w.zipf_s) / w.window_seconds
    affinity = placements(w, Cluster(nodes=32), rate)
    bounded = placements(w, Cluster(nodes=32, routing="bounded", balance_factor=1.25), rate)
    mean = rate.sum() / 32
    assert max(p.rates.sum() for p in affinity) > 1.25 * mean
    assert max(p.rates.sum() for p in bounded) <= 1.25 * mean * (1 + 1e-9)
    assert sum(p.rates.sum() for p in bounded) == pytest.approx(rate.sum())
    assert sum(1 for p in bounded if 0 in p.docs.tolist()) > 1  # the hottest document is served by several nodes
    o = analytic(w, Cluster(nodes=32, routing="bounded"))
    assert sum(n.reads_per_second for n in o.nodes) == pytest.approx(rate.sum())


def test_the_closed_network_matches_exact_cases():
    one = closed_network({"cpu": 0.1}, 0.0, 1)
    assert one.throughput == pytest.approx(10.0) and one.response_seconds == pytest.approx(0.1)
    saturated = closed_network({"cpu": 0.1, "disk": 0.05}, 0.2, 50)
    assert saturated.throughput == pytest.approx(10.0, rel=0.01) and saturated.bottleneck == "cpu"  # 1 / max demand
    delay_only = closed_network({}, 0.5, 4)
    assert delay_only.throughput == pytest.approx(8.0)
    two = closed_network({"a": 1.0}, 0.0, 2)  # two clients, one server: each waits for the other
    assert two.response_seconds == pytest.approx(2.0) and two.throughput == pytest.approx(1.0)
