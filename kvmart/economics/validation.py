"""The CDN model against a real cluster on this machine (bench/cdn_sim.py --validate, tests/test_cdn_validation.py).
Unlike the rest of kvmart/economics this module does I/O: it starts servers and measures them.

A cluster as a provider would run one, shrunk onto loopback: three `kvmart serve` nodes (builtin:tiny) over a
real redis-server shared tier, one PostgreSQL ledger, per-key limits on (cluster-wide, in a second redis-server of
their own, so that the shared tier's byte counter counts KV traffic only) and configured for the workload, and a
router in front (`kvmart route`, or nginx with kvmart/cluster/nginx.py's configuration). A publisher publishes a
catalogue on node A and every node learns it (measured: catalogue discovery); every node warms up; agents, each
with its own key, read it in Zipf order through the router: from `clients` concurrent clients (the measured load),
then the last reads one at a time (calibration: the service demands the model is given, taken with warm caches, as
under load).

What a read is, with the chunk store. A document is stored as an index and chunks (docs/FORMAT.md); a read loads
the document's chunks one by one, each from the fastest tier that holds it (the node's RAM hot tier, its disk,
Redis), and computes its own last chunk (the question). A read is *served by* the slowest tier any of its
document's chunks came from (it waits for that one), and *by prefill* if any of the document's tokens were
computed. Both are reported, per read and per chunk read.

Measured: each read's tier (the nodes' `kvmart_reads_by_tier_total`, per request; `kvmart_chunk_reads_total`, per
chunk; prefill from the tokens each answer says were cached), bytes moved out of Redis (its own counter), throughput,
latency, and each process's CPU seconds (from /proc). Predicted, for the same configuration: the tier mix by the
replay of the same reads chunk by chunk (each node's RAM LRU by bytes and its disk, fed the nodes the router chose;
every read also leaves its last chunk in RAM, as the server does) and by the analytic model (documents as items of
their chunks' bytes, plus the RAM the reads' last chunks take); bytes from what the replay reads from Redis at the
sizes Redis holds (kvmart/economics/traffic.py: indexes, chunks, the catalogue's change-log polls); throughput and
latency by a closed queueing network (kvmart/economics/capacity.py's `closed_network`) whose service demands are
the CPU seconds per read measured in the calibration (each Python process one server: one GIL), bounded by this
machine's cores. The gaps are reported, not tuned away."""

from __future__ import annotations

import io
import json
import os
import re
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import httpx
import numpy as np

from kvmart.cluster.local import (
    CATALOG_REFRESH_SECONDS,
    KvmartNode,
    PostgresServer,
    RedisServer,
    RouterProcess,
    wait_for,
)
from kvmart.economics import traffic
from kvmart.economics.capacity import ClosedNetwork, closed_network
from kvmart.economics.simulation import TIERS, ChunkRead, Cluster, Workload, analytic, replay_chunks, sample_reads

KV_BYTES_PER_TOKEN = 512  # builtin:tiny in float32: 2 layers x 2 (K, V) x 2 KV heads x 16 dims x 4 bytes
ADMIN_KEY = "kvm_cdn_validation_admin_key"
TOKENS_GUESS = 420  # tokens of one generated document (the hot tier's budget is set in these before publishing)
QUESTION = "What is this?"
PREFIX = "cdn"  # the shared tier's key prefix
TIER_OF = {"hot": "ram", "disk": "disk", "redis": "shared"}  # the nodes' tier names (metrics) -> the model's


@dataclass(frozen=True)
class ValidationConfig:
    documents: int = 300
    reads: int = 3000
    calibration_reads: int = 150  # the last reads, one at a time: the service demands the model is given
    clients: int = 6  # concurrent clients for the reads before them
    agents: int = 6  # accounts, each with its own key; reads go round-robin
    zipf_s: float = 0.9
    ram_documents: int = 20  # each node's hot tier (RAM), in documents
    seed: int = 3
    router: str = "kvmart"  # kvmart | nginx

    @property
    def rate_limit_per_minute(self) -> int:
        """Each key's limit, set for the workload (a key's share of the reads in a minute, with room)."""
        return max(600, 4 * self.reads // self.agents)

    @property
    def rate_limit_burst(self) -> int:
        """Each key's burst, set for the workload too: the most one key sends in the whole run (the first key's
        warm-up and its share of the reads), twice over. With the server's default burst (60) the first key's
        bucket ran dry whenever the reads went faster than the per-minute rate refills it: one 429 in a CI run."""
        warm_up = len(NODE_NAMES) * (5 + 2 * self.clients)  # see warm_up: per node 1 listing, 3 answers, 1 read
        return max(60, 2 * (warm_up + -(-self.reads // self.agents)))


NODE_NAMES = "abc"  # the cluster's three nodes


@dataclass(frozen=True)
class Stored:
    """An artifact as Redis holds it: its cache id, its bytes and its index's JSON bytes (the entry beside it)."""

    key: str
    size: int
    index_json_bytes: int


@dataclass(frozen=True)
class PublishedDocument:
    id: str
    cache_id: str
    num_tokens: int
    index: Stored  # the document's index artifact
    chunks: tuple[tuple[int, Stored], ...]  # (tokens, the stored chunk) in order, as its index lists them


@dataclass
class Measured:
    tiers: dict[str, float]  # per read: fractions of the measured reads by the slowest tier of their chunks
    chunk_tiers: dict[str, float]  # per chunk read: fractions by the tier that answered
    shared_bytes: int  # bytes out of Redis during the measured reads
    throughput: float  # reads per second under `clients` concurrent clients
    latency_mean: float
    latency_p50: float
    latency_p99: float
    calibration_latency: float  # mean seconds of a read alone
    cpu_per_read: dict[str, float]  # process -> CPU seconds per read (calibration)
    refused: int  # reads answered other than 200 (429, 5xx)
    node_shares: list[float]
    discovery_bytes: int = 0  # out of Redis while the catalogue was published and every node learnt it
    discovery_seconds: float = 0.0
    reads_seconds: float = 0.0  # the measured reads' wall time, calibration included
    state_bytes: int = 0  # out of the limits' Redis during the measured reads
    loaded_cpu_per_read: float = 0.0  # CPU seconds per read of every process together, under the clients' load
    cores_used: float = 0.0  # the cores the cluster's processes kept busy under load (CPU seconds per second)
    load_average: float = 0.0  # the machine's 1-minute load average at the end (others' work included)
    refusals: dict[int, int] = field(default_factory=dict)  # the refused reads by HTTP status


@dataclass
class Predicted:
    replay: dict[str, float]  # per read
    replay_chunks: dict[str, float]  # per chunk read
    analytic: dict[str, float]  # per read (a document's chunks as one item)
    shared_bytes: float
    network: ClosedNetwork
    cores_bound: float  # reads/s this machine's cores allow at the measured CPU per read
    discovery_bytes: float
    bytes_parts: dict[str, float] = field(default_factory=dict)  # what the two byte predictions are made of

    @property
    def throughput(self) -> float:
        """The queueing network's throughput, bounded by what this machine's cores allow."""
        return min(self.network.throughput, self.cores_bound)

    @property
    def latency_seconds(self) -> float:
        """Mean latency of the closed loop at that throughput (Little's law: clients / throughput)."""
        return max(self.network.response_seconds, self.network.clients / self.throughput)


@dataclass
class Report:
    config: ValidationConfig
    measured: Measured
    predicted: Predicted
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        m, p, c = self.measured, self.predicted, self.config
        parts = p.bytes_parts
        rows = [f"### {c.router}: {c.reads:,} reads of {c.documents} documents (Zipf s={c.zipf_s}), 3 nodes, "
                f"{c.clients} clients, hot tier {c.ram_documents} documents per node\n",
                "Per read (the slowest tier any of its document's chunks came from):\n",
                "| source | RAM | disk | shared (Redis) | prefill |", "|---|---|---|---|---|",
                "| measured | " + " | ".join(f"{m.tiers[t]:.1%}" for t in TIERS) + " |",
                "| replay of the same reads | " + " | ".join(f"{p.replay[t]:.1%}" for t in TIERS) + " |",
                "| analytic model | " + " | ".join(f"{p.analytic[t]:.1%}" for t in TIERS) + " |", "",
                "Per chunk read (the tier that answered each):\n",
                "| source | RAM | disk | shared (Redis) | prefill |", "|---|---|---|---|---|",
                "| measured | " + " | ".join(f"{m.chunk_tiers[t]:.1%}" for t in TIERS) + " |",
                "| replay of the same reads | " + " | ".join(f"{p.replay_chunks[t]:.1%}" for t in TIERS) + " |", "",
                "| quantity | measured | predicted | gap |", "|---|---|---|---|",
                _gap("bytes out of Redis, catalogue discovery", m.discovery_bytes, p.discovery_bytes, "{:,.0f}"),
                _gap("bytes out of Redis, the reads", m.shared_bytes, p.shared_bytes, "{:,.0f}"),
                f"| bytes out of the limits' Redis, the reads | {m.state_bytes:,} | - | - |",
                _gap(f"throughput, {c.clients} clients (reads/s)", m.throughput, p.throughput, "{:.1f}"),
                _gap("mean latency (s)", m.latency_mean, p.latency_seconds, "{:.3f}"),
                f"| latency p50 / p99 (s) | {m.latency_p50:.3f} / {m.latency_p99:.3f} | - | - |",
                f"| a read alone (s) | {m.calibration_latency:.3f} | (the calibration) | - |",
                f"| reads refused (429/5xx) | {m.refused}{refusals(m)} | 0 | - |", "",
                f"Predicted bytes, by part: discovery {parts.get('discovery indexes', 0):,.0f} (indexes read by "
                f"the nodes that did not publish) + {parts.get('discovery changes', 0):,.0f} (the change log's "
                f"entries, every node) + {parts.get('discovery publishing', 0):,.0f} (node A's lookups and writes) "
                f"+ {parts.get('discovery polls', 0):,.0f} (polls, {m.discovery_seconds:.1f} s);"
                f" the reads {parts.get('chunk reads', 0):,.0f} ({parts.get('chunks from redis', 0):,.0f} chunks "
                f"read from Redis: index twice, bytes once) + {parts.get('read polls', 0):,.0f} (polls, "
                f"{m.reads_seconds:.1f} s).", "",
                "CPU seconds per read (calibration): " + ", ".join(f"{k} {v * 1000:.1f} ms"
                                                                 for k, v in m.cpu_per_read.items())
                + f" (all together {sum(m.cpu_per_read.values()) * 1000:.1f} ms; under the clients' load "
                  f"{m.loaded_cpu_per_read * 1000:.1f} ms); the queueing network's bottleneck: "
                  f"{p.network.bottleneck}; this machine's {os.cpu_count()} cores allow {p.cores_bound:.1f} "
                  f"reads/s at the calibration's CPU per read, {(os.cpu_count() or 1) / max(m.loaded_cpu_per_read, 1e-9):.1f} "
                  f"at the loaded one. Under load the cluster's processes kept {m.cores_used:.2f} cores busy; the "
                  f"machine's load average was {m.load_average:.1f} (its {os.cpu_count()} cores are shared with "
                  "other work).", ""]
        return "\n".join(rows + self.notes)


def _gap(label: str, measured: float, predicted: float, fmt: str) -> str:
    gap = f"{(measured - predicted) / predicted:+.0%}" if predicted else "-"
    return f"| {label} | {fmt.format(measured)} | {fmt.format(predicted)} | {gap} |"


def documents(count: int) -> list[str]:
    """`count` distinct documents of about TOKENS_GUESS tokens, cut from the bundled licences."""
    from kvmart.reuse.samples import sample_text

    texts = [sample_text(n) for n in ("mpl-2.0", "apache-2.0", "gpl-3.0", "bsd-3-clause")]
    out = []
    for i in range(count):
        text = texts[i % len(texts)]
        start = (i * 97) % max(1, len(text) - 1800)
        out.append(f"Document {i}.\n{text[start:start + 1500]}")
    return out


# -- the cluster -----------------------------------------------------------------------------------------------------
@dataclass
class LocalCluster:
    """Redis (the shared tier, and another for the limits), a ledger, three nodes and a router, on loopback;
    everything stopped at the end of `running`."""

    root: Path
    config: ValidationConfig
    ledger_url: str
    postgres_pid: int | None
    redis: RedisServer | None = None
    state_redis: RedisServer | None = None
    nodes: list[KvmartNode] = field(default_factory=list)
    router: object = None

    @property
    def ram_bytes(self) -> int:
        return self.config.ram_documents * TOKENS_GUESS * KV_BYTES_PER_TOKEN

    @contextmanager
    def running(self) -> Iterator["LocalCluster"]:
        try:
            self.redis = RedisServer(self.root / "redis").start()
            self.state_redis = RedisServer(self.root / "redis-state").start()
            models = self.root / "models"
            models.mkdir(exist_ok=True)
            limits = ("--ram-cache-bytes", str(self.ram_bytes), "--rate-limit-per-minute",
                      str(self.config.rate_limit_per_minute), "--max-concurrent-per-key", "16")
            state = {"KVMART_SHARED_STATE": f"{self.state_redis.url}?prefix={PREFIX}:state",
                     "KVMART_RATE_LIMIT_BURST": str(self.config.rate_limit_burst)}
            for i, name in enumerate(NODE_NAMES):
                node = KvmartNode(name, self.root, models, f"{self.redis.url}?prefix={PREFIX}", *limits,
                                  ledger_url=self.ledger_url, admin_key=ADMIN_KEY, env=state)
                self.nodes.append(node)
                if i == 0:
                    node.start()  # the first builds builtin:tiny into models/; the others start side by side
            starters = [threading.Thread(target=n.start) for n in self.nodes[1:]]
            for t in starters:
                t.start()
            for t in starters:
                t.join()
            for n in self.nodes[1:]:
                if n.process is None or n.process.poll() is not None or not hasattr(n, "http"):
                    raise RuntimeError(f"node {n.name} did not start (log: {n.log_path})")
            urls = [n.url for n in self.nodes]
            if self.config.router == "nginx":
                from kvmart.cluster.nginx import NginxServer

                self.router = NginxServer(urls, self.root / "nginx").start()
            else:
                self.router = RouterProcess(urls, self.root / "router.log").start()
            yield self
        finally:
            if self.router is not None:
                self.router.stop()  # type: ignore[attr-defined]  # RouterProcess or NginxServer
            for node in self.nodes:
                node.stop()
            for redis in (self.redis, self.state_redis):
                if redis is not None:
                    redis.stop()

    def pids(self) -> dict[str, list[int]]:
        """The processes whose CPU is counted, by role."""
        out = {f"node {n.name}": [n.process.pid] for n in self.nodes if n.process is not None}
        router = getattr(self.router, "process", None)
        if router is not None:
            out["router"] = [router.pid, *children(router.pid)]
        if self.redis is not None and self.redis.process is not None:
            out["redis"] = [self.redis.process.pid]
        if self.state_redis is not None and self.state_redis.process is not None:
            out["redis (limits)"] = [self.state_redis.process.pid]
        if self.postgres_pid is not None:
            out["postgres"] = [self.postgres_pid, *children(self.postgres_pid)]
        return out


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of the processes (those gone count 0)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / ticks


def snapshot_cpu(cluster: LocalCluster) -> dict[str, float]:
    out = {role: cpu_seconds(pids) for role, pids in cluster.pids().items()}
    out["client"] = time.process_time()
    return out


# -- the run ---------------------------------------------------------------------------------------------------------
def run(config: ValidationConfig, root: Path, postgres: PostgresServer | None = None, progress=None) -> Report:
    """The whole validation: start the cluster (and a PostgreSQL of its own unless given), publish, read, compare."""
    own = postgres is None
    pg = PostgresServer() if postgres is None else postgres
    if own:
        pg.__enter__()
    try:
        cluster = LocalCluster(root, config, pg.new_database(), pg.process.pid if pg.process else None)
        with cluster.running():
            return measure_and_predict(cluster, progress)
    finally:
        if own:
            pg.__exit__(None, None, None)


@dataclass
class Observed:
    """What the prediction is made from, besides the configuration: the documents as Redis holds them, the reads
    (document, agent, the node the router chose, tokens) and each node's hot tier at the start."""

    documents: list[PublishedDocument]
    reads: list[tuple[int, int]]  # (document index, agent index) of each measured read, in order
    results: list["ReadResult"]
    ram_held: list[int]  # bytes each node's hot tier held when the reads began (warm-up chunks)


def measure_and_predict(cluster: LocalCluster, progress=None) -> Report:
    measured, observed = measure(cluster, progress)
    return Report(cluster.config, measured, predict(cluster, measured, observed))


def measure(cluster: LocalCluster, progress=None) -> tuple[Measured, Observed]:
    """Publish the catalogue (discovery measured), warm up, then the reads and the calibration."""
    config = cluster.config
    info = info_reply_bytes(cluster.redis)  # each window below counts one reply to reading the counter: not KV
    discovery_before, started = net_output_bytes(cluster.redis), time.perf_counter()
    answers, keys = publish(cluster)
    discovery_bytes = net_output_bytes(cluster.redis) - discovery_before - info
    discovery_seconds = time.perf_counter() - started
    client = cluster.redis.client()  # type: ignore[union-attr]  # the validation cluster always runs redis
    published = [stored_document(client, answer) for answer in answers]  # read after the discovery is counted
    warm_up(cluster, keys[0])
    workload = Workload(documents=config.documents, zipf_s=config.zipf_s)
    docs, _ = sample_reads(workload, config.reads, seed=config.seed)
    order = docs.tolist()
    ram_held = [int(metric(n, "kvmart_hot_bytes")) for n in cluster.nodes]
    before, state_before = counters(cluster), net_output_bytes(cluster.state_redis)
    redis_before, reads_started = net_output_bytes(cluster.redis), time.perf_counter()
    split = config.reads - config.calibration_reads
    cpu0 = snapshot_cpu(cluster)
    main = concurrent_reads(cluster, [(published[d].id, keys[i % len(keys)]) for i, d in enumerate(order[:split])],
                            config.clients, progress)
    cpu1 = snapshot_cpu(cluster)
    with httpx.Client(base_url=cluster.router.url, timeout=120) as client:  # type: ignore[attr-defined]  # the router is a RouterProcess or NginxServer; both have url
        calibration = [read(client, published[d].id, keys[i % len(keys)])
                       for i, d in enumerate(order[split:], split)]
    cpu2 = snapshot_cpu(cluster)
    after = counters(cluster)
    shared_bytes = net_output_bytes(cluster.redis) - redis_before - info
    reads_seconds = time.perf_counter() - reads_started
    results = main + calibration
    cpu = {role: (cpu2[role] - cpu1[role]) / len(calibration) for role in cpu0}
    loaded_cpu = sum(cpu1[role] - cpu0[role] for role in cpu0) / max(1, len(main))
    prefilled = sum(1 for r, d in zip(results, order, strict=True)  # answered, with document tokens computed
                    if r.status == 200 and r.cached_tokens < published[d].num_tokens)
    tiers = tier_shares(before, after, "reads", len(results), prefilled)
    measured = summarise(results, calibration, main, tiers, shared_bytes, cpu, [n.url for n in cluster.nodes])
    measured.chunk_tiers = tier_shares(before, after, "chunks", None, 0)
    measured.loaded_cpu_per_read = loaded_cpu
    measured.cores_used = loaded_cpu * measured.throughput
    measured.load_average = os.getloadavg()[0]
    measured.discovery_bytes, measured.discovery_seconds = discovery_bytes, discovery_seconds
    measured.reads_seconds = reads_seconds
    measured.state_bytes = net_output_bytes(cluster.state_redis) - state_before
    reads = [(d, i % len(keys)) for i, d in enumerate(order)]
    return measured, Observed(published, reads, results, ram_held)


def tier_shares(before: dict[tuple[str, str], float], after: dict[tuple[str, str], float], what: str,
                total: int | None, prefilled: int) -> dict[str, float]:
    """Fractions by tier of the counters' growth (`what`: reads or chunks); `prefilled` reads counted apart, over
    `total` (None: the counted ones)."""
    grown = {t: after.get((what, t), 0.0) - before.get((what, t), 0.0) for t in TIERS if t != "prefill"}
    denominator = total if total is not None else sum(grown.values())
    shares = {t: v / max(1, denominator) for t, v in grown.items()}
    shares["prefill"] = prefilled / max(1, denominator)
    return shares


def predict(cluster: LocalCluster, measured: Measured, observed: Observed) -> Predicted:
    """The model's prediction for the configuration and the reads `observed`."""
    config, documents, nodes = cluster.config, observed.documents, len(cluster.nodes)
    urls = {n.url: k for k, n in enumerate(cluster.nodes)}
    chunk_reads = [ChunkRead(urls.get(r.node, 0),
                             tuple((c.key, tokens * KV_BYTES_PER_TOKEN) for tokens, c in documents[d].chunks),
                             (f"{d}/{agent}", max(0, r.prompt_tokens - documents[d].num_tokens) * KV_BYTES_PER_TOKEN))
                   for (d, agent), r in zip(observed.reads, observed.results, strict=True)]
    # node A published them all, and keeps its own copies raw (as every node keeps what it fetched)
    published = {0: [(c.key, tokens * KV_BYTES_PER_TOKEN) for doc in documents for tokens, c in doc.chunks]}
    replay = replay_chunks(chunk_reads, nodes, cluster.ram_bytes, None, published, observed.ram_held)
    question_bytes = statistics.mean(read.last[1] for read in chunk_reads)
    doc_bytes = statistics.mean(d.num_tokens * KV_BYTES_PER_TOKEN for d in documents)
    workload = Workload(documents=config.documents, zipf_s=config.zipf_s, agents=config.agents,
                        reads_per_agent=config.reads / config.agents, window_seconds=3600.0, model="qwen3-0.6b",
                        artifact_bytes=int(doc_bytes), private_chunk_bytes=int(question_bytes))
    model = analytic(workload, Cluster(nodes=nodes, ram_bytes=cluster.ram_bytes, disk_bytes=None, published_on=0))
    parts = predicted_bytes(cluster, measured, observed, replay.chunk_tiers)
    network, cores_bound = queueing(cluster, measured, observed.results[-config.calibration_reads:])
    return Predicted(replay.fractions, replay.chunk_fractions, model.fractions,
                     parts["chunk reads"] + parts["read polls"], network, cores_bound,
                     sum(v for k, v in parts.items() if k.startswith("discovery ")), parts)


def predicted_bytes(cluster: LocalCluster, measured: Measured, observed: Observed,
                    chunk_tiers: tuple[tuple[str, ...], ...]) -> dict[str, float]:
    """Bytes out of Redis by part (kvmart/economics/traffic.py): what the nodes that did not publish read to learn
    each document, the change log's entries and polls, and what the reads fetch (the chunks the replay reads from
    Redis)."""
    documents, nodes = observed.documents, len(cluster.nodes)
    interval = float(CATALOG_REFRESH_SECONDS)
    generation = len(documents) + 1  # the catalogue and the warm-up note
    from_redis = [chunk for (d, _), tiers in zip(observed.reads, chunk_tiers, strict=True)
                  for (_, chunk), tier in zip(documents[d].chunks, tiers, strict=True) if tier == "shared"]
    return {
        "discovery indexes": float((nodes - 1) * sum(traffic.discovery_bytes(d.index.index_json_bytes, d.index.size)
                                                     for d in documents)),
        "discovery changes": float(nodes * sum(traffic.change_bytes(n, d.cache_id)
                                               for n, d in enumerate(documents, 1))),
        "discovery publishing": float(sum(traffic.publish_bytes([c.size for _, c in d.chunks], d.index.size)
                                          for d in documents)),
        "discovery polls": nodes * measured.discovery_seconds / interval * traffic.poll_bytes(generation),
        "chunks from redis": float(len(from_redis)),
        "chunk reads": float(sum(traffic.chunk_read_bytes(c.index_json_bytes, c.size) for c in from_redis)),
        "read polls": nodes * measured.reads_seconds / interval * traffic.poll_bytes(generation),
    }


def queueing(cluster: LocalCluster, measured: Measured, calibration: list["ReadResult"]
             ) -> tuple[ClosedNetwork, float]:
    """The closed queueing network of the calibration's CPU seconds per read, and the reads/s the cores allow."""
    cpu, shares = measured.cpu_per_read, measured.node_shares
    node_cpu = [cpu.get(f"node {n.name}", 0.0) for n in cluster.nodes]
    # a node's CPU per read served: its CPU over the calibration reads it served
    served = [sum(1 for r in calibration if r.node == n.url) for n in cluster.nodes]
    per_served = [node_cpu[k] * len(calibration) / served[k] if served[k] else statistics.mean(node_cpu) * 3
                  for k in range(3)]
    stations = {f"node {n.name}": shares[k] * per_served[k] for k, n in enumerate(cluster.nodes)}
    stations.update({role: cpu[role] for role in ("router", "redis", "redis (limits)", "client") if role in cpu})
    busy = sum(stations.values()) + cpu.get("postgres", 0.0)
    delay = max(0.0, measured.calibration_latency - busy)
    network = closed_network(stations, delay, cluster.config.clients)
    total_cpu = sum(cpu.values())
    return network, (os.cpu_count() or 1) / total_cpu if total_cpu else float("inf")


def warm_up(cluster: LocalCluster, key: str) -> None:
    """Before anything is measured: every node lists the catalogue and answers questions about no document (its
    model's first passes), directly and through the router from every client (its first connections), and reads a
    tiny note of its own (its first read from Redis: with numba's codec the first reads waited 6-7 s without this,
    compiling the decoder), so that what is measured is reads, not first steps. No document of the workload is
    read: their tiers are untouched (the few small chunks this leaves in each hot tier are replayed as such)."""
    body = {"model": "builtin:tiny", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 1,
            "temperature": 0}
    for node in cluster.nodes:
        listed = node.http.get("/v1/documents", headers={"authorization": f"Bearer {key}"})
        if listed.status_code != 200:
            raise RuntimeError(f"node {node.name} could not list the catalogue: {listed.text[:300]}")
        for _ in range(3):
            answer = node.http.post("/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"})
            if answer.status_code != 200:
                raise RuntimeError(f"node {node.name} could not answer: {answer.text[:300]}")

    warm = cluster.nodes[0].publish("A warm-up note, read once by every node.")  # tiny: it takes no room
    if warm.status_code not in (200, 201):
        raise RuntimeError(f"could not publish the warm-up note: {warm.text[:300]}")
    for node in cluster.nodes:  # a node's first read from Redis: the codec's first use
        node.ask(warm.json()["id"], QUESTION, max_tokens=1, key=key)

    def through_router() -> None:  # the router's first connections to every node, from as many clients as will read
        with httpx.Client(base_url=cluster.router.url, timeout=120) as client:  # type: ignore[attr-defined]  # the router is a RouterProcess or NginxServer; both have url
            for _ in range(2 * len(cluster.nodes)):
                client.post("/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"})

    threads = [threading.Thread(target=through_router) for _ in range(cluster.config.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


@dataclass
class ReadResult:
    status: int
    seconds: float
    node: str
    started: float
    ended: float
    prompt_tokens: int = 0  # as the answer's usage says
    cached_tokens: int = 0


def read(client: httpx.Client, doc_id: str, key: str) -> ReadResult:
    """One read through the router (`client`'s base URL), its affinity key in the header (as a client or SDK would
    set it)."""
    body = {"model": "builtin:tiny", "messages": [{"role": "user", "content": QUESTION}], "documents": [doc_id],
            "max_tokens": 1, "temperature": 0}
    started = time.perf_counter()
    response = client.post("/v1/chat/completions", json=body,
                           headers={"authorization": f"Bearer {key}", "x-kvmart-document": doc_id})
    ended = time.perf_counter()
    node = response.headers.get("x-kvmart-node") or node_url(response.headers.get("x-kvmart-upstream", ""))
    usage = response.json().get("usage", {}) if response.status_code == 200 else {}
    return ReadResult(response.status_code, ended - started, node, started, ended, usage.get("prompt_tokens", 0),
                      usage.get("prompt_tokens_details", {}).get("cached_tokens", 0))


def refusals(m: Measured) -> str:
    """` (HTTP 429 x1, ...)` for the report, or nothing."""
    return f" ({', '.join(f'HTTP {s} x{n}' for s, n in sorted(m.refusals.items()))})" if m.refusals else ""


def node_url(upstream: str) -> str:
    """nginx's $upstream_addr lists every node it tried; the last one answered."""
    last = upstream.split(",")[-1].strip()
    return f"http://{last}" if last else ""


def concurrent_reads(cluster: LocalCluster, reads: list[tuple[str, str]], clients: int, progress=None
                     ) -> list[ReadResult]:
    """The reads from `clients` threads, each taking the next read in order (a closed loop: no think time)."""
    results: list[ReadResult | None] = [None] * len(reads)
    lock, position = threading.Lock(), [0]

    def worker() -> None:
        with httpx.Client(base_url=cluster.router.url, timeout=120) as client:  # type: ignore[attr-defined]  # the router is a RouterProcess or NginxServer; both have url
            while True:
                with lock:
                    i = position[0]
                    position[0] += 1
                if i >= len(reads):
                    return
                results[i] = read(client, *reads[i])
                if progress is not None:
                    progress()

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [r for r in results if r is not None]


def summarise(results: list[ReadResult], calibration: list[ReadResult], main: list[ReadResult],
              tiers: dict[str, float], shared_bytes: int, cpu: dict[str, float], node_urls: list[str]) -> Measured:
    """The measured figures; `node_shares` in the order of `node_urls` (the cluster's nodes)."""
    latencies = np.array([r.seconds for r in main]) if main else np.zeros(1)
    span = (max(r.ended for r in main) - min(r.started for r in main)) if main else 1.0
    counts = [sum(1 for r in results if r.node == u) for u in node_urls]
    return Measured(tiers=tiers, chunk_tiers={}, shared_bytes=shared_bytes, throughput=len(main) / span,
                    latency_mean=float(latencies.mean()), latency_p50=float(np.quantile(latencies, 0.5)),
                    latency_p99=float(np.quantile(latencies, 0.99)),
                    calibration_latency=statistics.mean(r.seconds for r in calibration), cpu_per_read=cpu,
                    refused=sum(1 for r in results if r.status != 200),
                    refusals=dict(Counter(r.status for r in results if r.status != 200)),
                    node_shares=[c / len(results) for c in counts])


def publish(cluster: LocalCluster) -> tuple[list[dict], list[str]]:
    """The catalogue, published on node A by a publisher (the API's answers), and learnt by every node (each node's
    catalogue holds every document: waited on, not timed); the agents' keys."""
    from kvmart.ledger import open_ledger

    ledger = open_ledger(cluster.ledger_url, cluster.root, environ={"KVMART_ADMIN_KEY": ADMIN_KEY})
    _, publisher = ledger.create_account("cdn-publisher", "publisher")
    ledger.deposit("cdn-publisher", Decimal("1000"))
    keys = []
    for i in range(cluster.config.agents):
        _, key = ledger.create_account(f"cdn-agent-{i}", "agent")
        ledger.deposit(f"cdn-agent-{i}", Decimal("1000"))
        keys.append(key)
    a = cluster.nodes[0]
    published = []
    for text in documents(cluster.config.documents):
        response = a.publish(text, key=publisher)
        if response.status_code not in (200, 201):
            raise RuntimeError(f"publishing failed: {response.status_code} {response.text[:300]}")
        published.append(response.json())
    for node in cluster.nodes:
        wait_for(lambda node=node: metric(node, "kvmart_documents") >= len(published),
                 f"node {node.name} to learn the catalogue")
    return published, keys


def stored(client, key: str) -> tuple[Stored, bytes]:
    """An artifact as Redis holds it (kvmart/store/redis.py's layout), and its bytes."""
    raw = client.get(f"{PREFIX}:index:{key}")
    index = json.loads(raw)
    data = b"".join(client.get(f"{PREFIX}:chunk:{key}:{index['nonce']}:{i}") for i in range(len(index["chunks"])))
    return Stored(key, index["size"], len(raw)), data


def stored_document(client, published: dict) -> PublishedDocument:
    """A published document (the API's answer) as Redis holds it: its index, and the chunks the index lists."""
    from kvmart.format.artifact import read_manifest

    index, data = stored(client, published["cache_id"])
    manifest, _ = read_manifest(io.BytesIO(data), len(data))
    chunks = tuple((tokens, stored(client, key)[0]) for tokens, key in manifest.chunks)
    return PublishedDocument(published["id"], published["cache_id"], published["num_tokens"], index, chunks)


def metric(node: KvmartNode, name: str, labels: str = "") -> float:
    """One sample of the node's /metrics (0 if absent)."""
    found = re.search(rf"^{re.escape(name + labels)} (\S+)", node.http.get("/metrics").text, re.M)
    return float(found.group(1)) if found else 0.0


def counters(cluster: LocalCluster) -> dict[tuple[str, str], float]:
    """Reads and chunk reads so far by the tier that served them (the model's tier names), summed over the nodes."""
    out: dict[tuple[str, str], float] = {}
    for node in cluster.nodes:
        text = node.http.get("/metrics").text
        for what, name in (("reads", "kvmart_reads_by_tier_total"), ("chunks", "kvmart_chunk_reads_total")):
            for tier, value in re.findall(rf'^{name}{{tier="([^"]+)"}} (\S+)', text, re.M):
                key = (what, TIER_OF.get(tier, tier))
                out[key] = out.get(key, 0.0) + float(value)
    return out


def net_output_bytes(redis: RedisServer | None) -> int:
    """Bytes Redis has sent to its clients so far (its own counter)."""
    return int(redis.client().info("stats")["total_net_output_bytes"])  # type: ignore[union-attr]  # the validation cluster always runs both


def info_reply_bytes(redis: RedisServer | None) -> int:
    """The bytes of one reply to reading the counter (read twice, back to back), which a window between two readings
    counts once."""
    first = net_output_bytes(redis)
    return net_output_bytes(redis) - first
