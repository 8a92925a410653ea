"""The CDN model against a real cluster on this machine (bench/cdn_sim.py --validate, tests/test_cdn_validation.py).
Unlike the rest of kvmart/economics this module does I/O: it starts servers and measures them.

A cluster as a provider would run one, shrunk onto loopback: three `kvmart serve` nodes (builtin:tiny) over a
real redis-server shared tier, one PostgreSQL ledger, per-key limits on (cluster-wide, in Redis) and configured
for the workload, and a router in front (`kvmart route`, or nginx with kvmart/cluster/nginx.py's configuration).
A publisher publishes a catalogue on node A; every node lists it and warms up; agents, each with its own key, read
it in Zipf order through the router: from `clients` concurrent clients (the measured load), then the last reads
one at a time (calibration: the service demands the model is given, taken with warm caches, as under load).

Measured: the tier that served each read (RAM, disk, shared Redis, prefill; the nodes' counters), bytes moved
out of Redis (its own counter), throughput, latency, and each process's CPU seconds (from /proc). Predicted, for
the same configuration: the tier mix by the replay of the same reads (exact LRU and Placement, the nodes the
router chose) and by the analytic model; bytes from the replay's shared reads and Redis' stored sizes; throughput
and latency by a closed queueing network (kvmart/economics/capacity.py's `closed_network`) whose service demands
are the CPU seconds per read measured in the calibration (each Python process one server: one GIL), bounded by
this machine's cores. The gaps are reported, not tuned away."""

from __future__ import annotations

import json
import os
import re
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path

import httpx
import numpy as np

from kvmart.cluster.local import KvmartNode, PostgresServer, RedisServer, RouterProcess
from kvmart.economics.capacity import ClosedNetwork, closed_network
from kvmart.economics.simulation import TIERS, Cluster, Workload, analytic, sample_reads, simulate
from kvmart.store.redis import DEFAULT_CHUNK_BYTES

KV_BYTES_PER_TOKEN = 512  # builtin:tiny in float32: 2 layers x 2 (K, V) x 2 KV heads x 16 dims x 4 bytes
ADMIN_KEY = "kvm_cdn_validation_admin_key"
TOKENS_GUESS = 420  # tokens of one generated document (the hot tier's budget is set in these before publishing)
QUESTION = "What is this?"


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


@dataclass
class Measured:
    tiers: dict[str, float]  # fractions of the measured reads
    shared_bytes: int  # bytes out of Redis during the measured reads
    throughput: float  # reads per second under `clients` concurrent clients
    latency_mean: float
    latency_p50: float
    latency_p99: float
    calibration_latency: float  # mean seconds of a read alone
    cpu_per_read: dict[str, float]  # process -> CPU seconds per read (calibration)
    refused: int  # reads answered other than 200 (429, 5xx)
    node_shares: list[float]
    discovery_bytes: int = 0  # out of Redis while the nodes first listed the catalogue (before the reads)
    loaded_cpu_per_read: float = 0.0  # CPU seconds per read of every process together, under the clients' load
    cores_used: float = 0.0  # the cores the cluster's processes kept busy under load (CPU seconds per second)
    load_average: float = 0.0  # the machine's 1-minute load average at the end (others' work included)


@dataclass
class Predicted:
    replay: dict[str, float]
    analytic: dict[str, float]
    shared_bytes: float
    network: ClosedNetwork
    cores_bound: float  # reads/s this machine's cores allow at the measured CPU per read
    discovery_bytes: float  # catalogue discovery: nodes B and C read the header of every document

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
        rows = [f"### {c.router}: {c.reads:,} reads of {c.documents} documents (Zipf s={c.zipf_s}), 3 nodes, "
                f"{c.clients} clients, hot tier {c.ram_documents} documents per node\n",
                "| source | RAM | disk | shared (Redis) | prefill |", "|---|---|---|---|---|",
                "| measured | " + " | ".join(f"{m.tiers[t]:.1%}" for t in TIERS) + " |",
                "| replay of the same reads | " + " | ".join(f"{p.replay[t]:.1%}" for t in TIERS) + " |",
                "| analytic model | " + " | ".join(f"{p.analytic[t]:.1%}" for t in TIERS) + " |", "",
                "| quantity | measured | predicted | gap |", "|---|---|---|---|",
                _gap("bytes out of Redis, catalogue discovery", m.discovery_bytes, p.discovery_bytes, "{:,.0f}"),
                _gap("bytes out of Redis, the reads", m.shared_bytes, p.shared_bytes, "{:,.0f}"),
                _gap(f"throughput, {c.clients} clients (reads/s)", m.throughput, p.throughput, "{:.1f}"),
                _gap("mean latency (s)", m.latency_mean, p.latency_seconds, "{:.3f}"),
                f"| latency p50 / p99 (s) | {m.latency_p50:.3f} / {m.latency_p99:.3f} | - | - |",
                f"| a read alone (s) | {m.calibration_latency:.3f} | (the calibration) | - |",
                f"| reads refused (429/5xx) | {m.refused} | 0 | - |", "",
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
    """Redis, a ledger, three nodes and a router, on loopback; everything stopped at the end of `running`."""

    root: Path
    config: ValidationConfig
    ledger_url: str
    postgres_pid: int | None
    redis: RedisServer | None = None
    nodes: list[KvmartNode] = field(default_factory=list)
    router: object = None

    @property
    def ram_bytes(self) -> int:
        return self.config.ram_documents * TOKENS_GUESS * KV_BYTES_PER_TOKEN

    @contextmanager
    def running(self) -> Iterator["LocalCluster"]:
        try:
            self.redis = RedisServer(self.root / "redis").start()
            models = self.root / "models"
            models.mkdir(exist_ok=True)
            limits = ("--ram-cache-bytes", str(self.ram_bytes), "--rate-limit-per-minute",
                      str(self.config.rate_limit_per_minute), "--max-concurrent-per-key", "16")
            for i, name in enumerate("abc"):
                node = KvmartNode(name, self.root, models, f"{self.redis.url}?prefix=cdn", *limits,
                                  ledger_url=self.ledger_url, admin_key=ADMIN_KEY)
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
            if self.redis is not None:
                self.redis.stop()

    def pids(self) -> dict[str, list[int]]:
        """The processes whose CPU is counted, by role."""
        out = {f"node {n.name}": [n.process.pid] for n in self.nodes if n.process is not None}
        router = getattr(self.router, "process", None)
        if router is not None:
            out["router"] = [router.pid, *children(router.pid)]
        if self.redis is not None and self.redis.process is not None:
            out["redis"] = [self.redis.process.pid]
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


def measure_and_predict(cluster: LocalCluster, progress=None) -> Report:
    config = cluster.config
    ids, sizes, redis_sizes, keys = publish(cluster)
    workload = Workload(documents=config.documents, agents=config.reads, window_seconds=3600.0,
                        zipf_s=config.zipf_s, model="qwen3-0.6b")
    docs, times = sample_reads(workload, config.reads, seed=config.seed)
    order = docs.tolist()
    discovery_before = net_output_bytes(cluster)
    warm_up(cluster, keys[0])
    discovery_bytes = net_output_bytes(cluster) - discovery_before
    before = counters(cluster)
    redis_before = net_output_bytes(cluster)
    split = config.reads - config.calibration_reads
    cpu0 = snapshot_cpu(cluster)
    main = concurrent_reads(cluster, [(ids[d], keys[i % len(keys)]) for i, d in enumerate(order[:split])],
                            config.clients, progress)
    cpu1 = snapshot_cpu(cluster)
    with httpx.Client(base_url=cluster.router.url, timeout=120) as client:  # type: ignore[attr-defined]  # the router is a RouterProcess or NginxServer; both have url
        calibration = [read(client, ids[d], keys[i % len(keys)]) for i, d in enumerate(order[split:], split)]
    cpu2 = snapshot_cpu(cluster)
    after = counters(cluster)
    shared_bytes = net_output_bytes(cluster) - redis_before
    results = main + calibration
    urls = {n.url: k for k, n in enumerate(cluster.nodes)}
    nodes_of = [urls.get(r.node, 0) for r in results]
    tiers = {t: (after[t] - before[t]) / len(results) for t in TIERS}
    cpu = {role: (cpu2[role] - cpu1[role]) / len(calibration) for role in cpu0}
    loaded_cpu = sum(cpu1[role] - cpu0[role] for role in cpu0) / max(1, len(main))
    measured = summarise(results, calibration, main, tiers, shared_bytes, cpu, len(cluster.nodes))
    measured.loaded_cpu_per_read = loaded_cpu
    measured.cores_used = loaded_cpu * measured.throughput
    measured.load_average = os.getloadavg()[0]
    measured.discovery_bytes = discovery_bytes
    shares = measured.node_shares
    cluster_model = Cluster(nodes=3, ram_bytes=cluster.ram_bytes, disk_bytes=None, published_on=0)
    trace: list[str] = []
    replay = simulate(workload, cluster_model, docs, times, sizes=sizes, nodes_of=nodes_of, trace=trace)
    mean_size = sum(sizes) // len(sizes)
    model = analytic(replace(workload, artifact_bytes=mean_size), cluster_model)
    predicted_bytes = float(sum(redis_sizes[d] for d, t in zip(order, trace, strict=True) if t == "shared"))
    node_cpu = [cpu.get(f"node {n.name}", 0.0) for n in cluster.nodes]
    # a node's CPU per read served: its CPU over the calibration reads it served
    served = [sum(1 for r in calibration if r.node == n.url) for n in cluster.nodes]
    per_served = [node_cpu[k] * len(calibration) / served[k] if served[k] else statistics.mean(node_cpu) * 3
                  for k in range(3)]
    stations = {f"node {n.name}": shares[k] * per_served[k] for k, n in enumerate(cluster.nodes)}
    stations.update({role: cpu[role] for role in ("router", "redis", "client") if role in cpu})
    busy = sum(stations.values()) + cpu.get("postgres", 0.0)
    delay = max(0.0, measured.calibration_latency - busy)
    network = closed_network(stations, delay, config.clients)
    total_cpu = sum(cpu.values())
    cores_bound = (os.cpu_count() or 1) / total_cpu if total_cpu else float("inf")
    # catalogue discovery: a node that has not seen a document reads its header, chunk 0 of the artifact (up to the
    # store's chunk size: the whole artifact, for these small ones), once per document per node
    chunk = DEFAULT_CHUNK_BYTES
    discovery = float(sum(min(size, chunk) for size in redis_sizes) * (len(cluster.nodes) - 1))
    predicted = Predicted(replay.fractions, model.fractions, predicted_bytes, network, cores_bound, discovery)
    return Report(config, measured, predicted)


def warm_up(cluster: LocalCluster, key: str) -> None:
    """Before anything is measured: every node lists the catalogue (it reads the headers of documents it has not
    seen from Redis) and answers questions about no document (its model's first passes), directly and through the
    router from every client (its first connections), and reads a tiny note of its own (its first read from Redis:
    with numba's codec the first reads waited 6-7 s without this, compiling the decoder), so that what is measured
    is reads, not first steps. No document of the workload is read: their tiers are untouched."""
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
    return ReadResult(response.status_code, ended - started, node, started, ended)


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
              tiers: dict[str, float], shared_bytes: int, cpu: dict[str, float], nodes: int) -> Measured:
    latencies = np.array([r.seconds for r in main]) if main else np.zeros(1)
    span = (max(r.ended for r in main) - min(r.started for r in main)) if main else 1.0
    urls = sorted({r.node for r in results})
    counts = [sum(1 for r in results if r.node == u) for u in urls]
    return Measured(tiers=tiers, shared_bytes=shared_bytes, throughput=len(main) / span,
                    latency_mean=float(latencies.mean()), latency_p50=float(np.quantile(latencies, 0.5)),
                    latency_p99=float(np.quantile(latencies, 0.99)),
                    calibration_latency=statistics.mean(r.seconds for r in calibration), cpu_per_read=cpu,
                    refused=sum(1 for r in results if r.status != 200),
                    node_shares=[c / len(results) for c in counts] + [0.0] * (nodes - len(counts)))


def publish(cluster: LocalCluster) -> tuple[list[str], list[int], list[int], list[str]]:
    """The catalogue, published on node A by a publisher; the agents' keys. Returns ids, KV bytes (what a hot tier
    holds), stored bytes in Redis, keys."""
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
    client = cluster.redis.client()  # type: ignore[union-attr]  # the validation cluster always runs redis
    redis_sizes = [json.loads(client.get(f"cdn:index:{d['cache_id']}"))["size"] for d in published]
    return ([d["id"] for d in published], [d["num_tokens"] * KV_BYTES_PER_TOKEN for d in published], redis_sizes,
            keys)


def counters(cluster: LocalCluster) -> dict[str, float]:
    """Reads served by each tier so far, summed over the nodes (their /metrics and /healthz)."""
    out = dict.fromkeys(TIERS, 0.0)
    for node in cluster.nodes:
        metrics = node.http.get("/metrics").text
        found = re.search(r"^kvmart_hot_hits_total (\S+)", metrics, re.M)
        out["ram"] += float(found.group(1)) if found else 0.0
        store = node.health()["store"]
        by_name = {t["name"]: t for t in store["tiers"]}
        out["disk"] += by_name["disk"]["hits"]
        out["shared"] += by_name["redis"]["hits"]
        out["prefill"] += store["misses"]
    return out


def net_output_bytes(cluster: LocalCluster) -> int:
    return int(cluster.redis.client().info("stats")["total_net_output_bytes"])  # type: ignore[union-attr]  # the validation cluster always runs redis
