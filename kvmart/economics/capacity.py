"""Capacity and queueing of the prefill CDN: how busy each node's devices, disk and link are at a load, where the
bottleneck sits, how long reads wait, what a node refuses, and how many nodes a target p99 needs. Pure functions,
no I/O; kvmart/economics/simulation.py says where each read is served from (the per-node tier mix), this module
what serving it costs in time.

Each node is a set of finite servers with FIFO queues (stations):
    device  `devices_per_node` servers: a read holds one for the reuse time (its question on the cached document),
            or for a prefill on a miss; at most `max_queue_per_node` reads wait (beyond: refused, HTTP 429)
    disk    one server at `disk_bytes_per_second`: disk-tier reads, and the fills written after a shared read or a
            prefill
    link    one server at `shared_bytes_per_second`: the node's link to the shared tier (shared reads, stores back)
and the cluster shares one more: the shared tier's own egress (`shared_tier_bytes_per_second`, if bounded).

A read's path (TTFT) is: RAM -> device; disk -> disk, device; shared -> link, device; prefill -> device (its store
back occupies link and disk off the path). Service times come from `ServiceTimes`: the roofline estimate of
kvmart.economics.model, the paper's measured times, or times measured here.

Two answers, side by side: the analytic utilisation of every station (rho = arrivals x service / servers, exact
for any arrival process), which finds the bottleneck and the largest load the cluster carries; and latency from a
discrete-event simulation of Poisson arrivals through the stations (FIFO, deterministic service), which gives
p50/p99 TTFT with the queueing in them and the share refused by a full queue. The utilisation is what a
provider sizes by; the simulated latency assumes Poisson arrivals at a steady rate (no bursts beyond that)."""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, replace

import numpy as np

from kvmart.economics.model import PAPER_SECONDS, Prices
from kvmart.economics.simulation import TIERS, Cluster, NodeLoad, Outcome, Workload, analytic, economics_of

STATIONS = ("device", "disk", "link", "shared tier")
SIMULATED_READS = 60_000  # reads the latency simulation draws (all nodes together), enough for a steady p99


@dataclass(frozen=True)
class ServiceTimes:
    """Seconds a device spends on one read: reuse (a question on the cached document) and a prefill; `source`
    says where they come from (analytic, the paper, measured)."""

    reuse_seconds: float
    prefill_seconds: float
    source: str

    def __post_init__(self) -> None:
        if self.reuse_seconds <= 0 or self.prefill_seconds <= 0:
            raise ValueError(f"service times must be positive: {self}")


def roofline_times(workload: Workload, prices: Prices | None = None) -> ServiceTimes:
    """The roofline estimate of kvmart.economics.model for the workload's model and document (analytic)."""
    e = economics_of(workload, prices or Prices())
    return ServiceTimes(e.reuse_seconds, e.prefill_seconds, "analytic: roofline estimate")


def paper_times(document_tokens: int = 3774) -> ServiceTimes:
    """The paper's measured times (Qwen3-4B fp16, Apple M1 Pro, KV in memory) at a length it measured."""
    prefill, reuse = PAPER_SECONDS[document_tokens]
    return ServiceTimes(reuse, prefill, "taken from the paper: measured, M1 Pro")


def demands(size_bytes: float, times: ServiceTimes, cluster: Cluster) -> dict[str, dict[str, float]]:
    """Seconds of each station one read of each tier takes (on its path or off it)."""
    disk, link = size_bytes / cluster.disk_bytes_per_second, size_bytes / cluster.shared_bytes_per_second
    tier_bw = cluster.shared_tier_bytes_per_second
    shared = size_bytes / tier_bw if tier_bw else 0.0
    return {"ram": {"device": times.reuse_seconds},
            "disk": {"device": times.reuse_seconds, "disk": disk},
            "shared": {"device": times.reuse_seconds, "link": link, "disk": disk, "shared tier": shared},
            "prefill": {"device": times.prefill_seconds, "link": link, "disk": disk, "shared tier": shared}}


def servers(station: str, cluster: Cluster) -> int:
    return cluster.devices_per_node if station == "device" else 1


def utilisation(load: NodeLoad, work: dict[str, dict[str, float]], cluster: Cluster) -> dict[str, float]:
    """rho of each of one node's stations: reads/s x mean service seconds / servers (the shared tier's is this
    node's contribution to it)."""
    return {station: load.reads_per_second * sum(load.fractions[t] * work[t].get(station, 0.0) for t in TIERS)
            / servers(station, cluster) for station in STATIONS}


@dataclass(frozen=True)
class Capacity:
    """A cluster at a load: utilisation of the busiest node's stations, the bottleneck, the load it carries, and
    the simulated TTFT (with queueing) and share of reads refused."""

    offered_reads_per_second: float
    utilisation: dict[str, float]  # station -> rho on the node where it is highest (the shared tier: cluster-wide)
    mean_utilisation: dict[str, float]  # station -> rho averaged over nodes
    bottleneck: str  # the station with the highest rho
    busiest_node: int  # where the bottleneck's rho is highest
    max_reads_per_second: float  # the offered load (same mix, same routing) at which the bottleneck reaches rho = 1
    ttft_p50_seconds: float
    ttft_p99_seconds: float  # inf: a queue without bound grows without bound (rho >= 1)
    refused: float  # share of reads refused by a full device queue (HTTP 429)
    times: ServiceTimes

    @property
    def is_overloaded(self) -> bool:
        return self.utilisation[self.bottleneck] >= 1.0


def capacity(outcome: Outcome, workload: Workload, cluster: Cluster, times: ServiceTimes,
             peak_to_mean: float = 1.0, seed: int = 0) -> Capacity:
    """The capacity of `cluster` under `outcome`'s per-node loads (from simulation.analytic or .simulate), at
    `peak_to_mean` x the workload's mean rate."""
    if not outcome.nodes:
        raise ValueError("the outcome has no per-node loads (compute it with analytic or simulate)")
    loads = [replace(n, reads_per_second=n.reads_per_second * peak_to_mean) for n in outcome.nodes]
    size = float(outcome.extra["artifact_bytes"])
    work = demands(size, times, cluster)
    rhos = [utilisation(load, work, cluster) for load in loads]
    peak = {s: max(r[s] for r in rhos) for s in STATIONS}
    peak["shared tier"] = sum(r["shared tier"] for r in rhos)
    mean = {s: sum(r[s] for r in rhos) / len(rhos) for s in STATIONS}
    mean["shared tier"] = peak["shared tier"]
    bottleneck = max(STATIONS, key=lambda s: peak[s])
    busiest = max(range(len(rhos)), key=lambda k: rhos[k][bottleneck])
    offered = sum(n.reads_per_second for n in loads)
    latencies, refused = simulate_latency(loads, work, cluster, seed)
    unbounded = cluster.max_queue_per_node is None and peak[bottleneck] >= 1.0
    p50, p99 = ((math.inf, math.inf) if unbounded or not len(latencies) else
                (float(np.quantile(latencies, 0.5)), float(np.quantile(latencies, 0.99))))
    carried = offered / peak[bottleneck] if peak[bottleneck] > 0 else math.inf
    return Capacity(offered, peak, mean, bottleneck, busiest, carried, p50, p99, refused, times)


def simulate_latency(loads: list[NodeLoad], work: dict[str, dict[str, float]], cluster: Cluster,
                     seed: int = 0) -> tuple[np.ndarray, float]:
    """TTFT of Poisson reads through every node's stations (see the module docstring), over a stretch of time
    holding about SIMULATED_READS reads; returns the latencies of the admitted reads and the share refused. The
    shared tier's own egress is not simulated (its utilisation is reported)."""
    rng = np.random.default_rng(seed)
    total = sum(n.reads_per_second for n in loads)
    if total <= 0:
        return np.zeros(0), 0.0
    seconds = SIMULATED_READS / total
    out, refused, offered = [], 0, 0
    for load in loads:
        count = int(rng.poisson(load.reads_per_second * seconds))
        if count == 0:
            continue
        arrivals = np.sort(rng.uniform(0.0, seconds, count))
        probabilities = np.array([load.fractions[t] for t in TIERS])
        tiers = rng.choice(len(TIERS), size=count, p=probabilities / probabilities.sum())
        latency = NodeQueues(work, cluster).run(arrivals.tolist(), [TIERS[t] for t in tiers.tolist()])
        offered += count
        refused += int(np.isnan(latency).sum())
        out.append(latency[~np.isnan(latency)])
    return (np.concatenate(out) if out else np.zeros(0)), refused / max(1, offered)


class NodeQueues:
    """A discrete-event simulation of one node: FIFO stations (device, disk, link) with their servers, and an
    admission bound as kvmart serve has one: a read arriving while `devices + max_queue_per_node` reads are in the
    node is refused (HTTP 429). A read's path is RAM -> device; disk -> disk, device; shared -> link, device (then
    its disk fill, off the path); prefill -> device (then its store back: link, disk, off the path)."""

    PATHS = {"ram": ("device",), "disk": ("disk", "device"), "shared": ("link", "device"), "prefill": ("device",)}
    AFTER = {("shared", "link"): ("disk",), ("prefill", "device"): ("link", "disk")}  # off-path work it leaves

    def __init__(self, work: dict[str, dict[str, float]], cluster: Cluster) -> None:
        self.work, self.cluster = work, cluster
        self.free = {s: servers(s, cluster) for s in ("device", "disk", "link")}
        self.waiting: dict[str, deque] = {s: deque() for s in self.free}
        self.events: list[tuple[float, int, str, int, tuple[str, ...]]] = []  # (time, seq, station, read, rest)
        self.sequence = 0
        self.tiers: list[str] = []

    def run(self, arrivals: list[float], tiers: list[str]) -> np.ndarray:
        """TTFT of each read, arrivals in order (NaN: refused). Off-path work is numbered -1."""
        self.tiers = tiers
        latency = np.full(len(arrivals), np.nan)
        bound = None if self.cluster.max_queue_per_node is None else (
            self.cluster.devices_per_node + self.cluster.max_queue_per_node)
        in_node, next_arrival = 0, 0
        while next_arrival < len(arrivals) or self.events:
            if next_arrival < len(arrivals) and (not self.events or arrivals[next_arrival] <= self.events[0][0]):
                read = next_arrival
                next_arrival += 1
                if bound is None or in_node < bound:  # else refused: its latency stays NaN
                    in_node += 1
                    self._enter(arrivals[read], read, self.PATHS[tiers[read]])
                continue
            now, _, station, read, rest = heapq.heappop(self.events)
            self._leave(now, station)
            if read >= 0:
                for after in self.AFTER.get((tiers[read], station), ()):
                    self._enter(now, -1, (after,))
            if rest:
                self._enter(now, read, rest)
            elif read >= 0:
                latency[read] = now - arrivals[read]
                in_node -= 1
        return latency

    def _enter(self, now: float, read: int, path: tuple[str, ...]) -> None:
        station = path[0]
        if self.free[station]:
            self.free[station] -= 1
            self._start(now, read, path)
        else:
            self.waiting[station].append((read, path))

    def _start(self, now: float, read: int, path: tuple[str, ...]) -> None:
        station = path[0]
        if station == "device":
            service = self.work["prefill" if self.tiers[read] == "prefill" else "ram"]["device"]
        else:
            service = self.work["shared"][station]  # a transfer: the artifact's bytes at the station's bandwidth
        self.sequence += 1
        heapq.heappush(self.events, (now + service, self.sequence, station, read, path[1:]))

    def _leave(self, now: float, station: str) -> None:
        if self.waiting[station]:
            read, path = self.waiting[station].popleft()
            self._start(now, read, path)
        else:
            self.free[station] += 1


@dataclass(frozen=True)
class Sizing:
    """The fewest nodes that meet a p99 target with nothing refused, and the capacity there (None: none up to
    `max_nodes` does, e.g. one document alone needs more than a node under affinity routing)."""

    nodes: int | None
    outcome: Outcome | None
    capacity: Capacity | None


def nodes_needed(workload: Workload, cluster: Cluster, times: ServiceTimes, target_p99_seconds: float,
                 prices: Prices | None = None, max_nodes: int = 1024, peak_to_mean: float = 1.0) -> Sizing:
    """The smallest node count (same nodes, same routing) whose simulated p99 TTFT is within the target, with no
    station at rho >= 1 and nothing refused: doubling, then bisection (the routing's hash makes the answer nearly,
    not strictly, monotonic in the count; bisection returns a count that meets the target)."""

    def evaluate(k: int) -> tuple[bool, Outcome, Capacity]:
        sized = replace(cluster, nodes=k)
        outcome = analytic(workload, sized, prices)
        cap = capacity(outcome, workload, sized, times, peak_to_mean)
        ok = not cap.is_overloaded and cap.refused == 0 and cap.ttft_p99_seconds <= target_p99_seconds
        return ok, outcome, cap

    low, high = 0, 1
    found = evaluate(high)
    while not found[0]:
        if high >= max_nodes:
            return Sizing(None, None, None)
        low, high = high, min(max_nodes, high * 2)
        found = evaluate(high)
    while high - low > 1:
        middle = (low + high) // 2
        trial = evaluate(middle)
        if trial[0]:
            high, found = middle, trial
        else:
            low = middle
    return Sizing(high, found[1], found[2])


@dataclass(frozen=True)
class ClosedNetwork:
    """A closed queueing network's answer: throughput, mean response time, and the busiest station."""

    clients: int
    throughput: float  # reads per second
    response_seconds: float  # mean, per read
    bottleneck: str
    utilisation: dict[str, float]


def closed_network(demands: dict[str, float], delay_seconds: float, clients: int) -> ClosedNetwork:
    """Exact mean value analysis of `clients` clients, each sending its next read as soon as the last is answered,
    through single-server queueing stations (`demands`: seconds of service a read needs at each, e.g. a Python
    process's CPU seconds per read: one GIL, one server) and a pure delay (`delay_seconds`: time a read spends
    waiting on nothing shared). Product form: exponential service, FCFS or processor sharing."""
    if clients < 1 or any(d < 0 for d in demands.values()) or delay_seconds < 0:
        raise ValueError("clients >= 1 and non-negative demands")
    queue = dict.fromkeys(demands, 0.0)
    throughput, response = 0.0, delay_seconds
    for n in range(1, clients + 1):
        times = {k: d * (1 + queue[k]) for k, d in demands.items()}
        response = delay_seconds + sum(times.values())
        throughput = n / response
        queue = {k: throughput * t for k, t in times.items()}
    busiest = max(demands, key=lambda k: demands[k]) if demands else "none"
    return ClosedNetwork(clients, throughput, response, busiest,
                         {k: throughput * d for k, d in demands.items()})
