"""The prefill CDN at scale: an analytic model and a discrete-event simulation of agents reading a catalogue of
documents (Zipf popularity) through K nodes with RAM -> disk -> shared tiers, priced by `kvmart.economics.model`.
Pure functions, no I/O; bench/cdn_sim.py prints the tables (docs/SCALE.md). What this module answers is *where*
each read is served from (the tier mix, per node); how long it waits for a device, a disk or a link at a given
load is kvmart/economics/capacity.py's, on top of the per-node loads computed here.

Analytic model (any scale: 80M agents in well under a second). Reads of document i arrive as a Poisson process
of rate lambda_i = reads x p_i / window. Routing places each document's reads on nodes: `affinity` gives each
document one home node (kvmart route, nginx `hash ... consistent`); `random` spreads every document over every
node; `bounded` is affinity with a load bound (consistent hashing with bounded loads: a node takes reads up to
`balance_factor` x the mean node load, the rest of a document's reads go to the next node in its order, as
HAProxy's `hash-balance-factor` does), so the hottest documents are served by several nodes.
- RAM, LRU (the server's hot tier): Che's approximation, hit_i = 1 - exp(-lambda_i T) with T solving
  sum_i (1 - exp(-lambda_i T)) = capacity in documents. A document's chunks are read together, so they are one
  item of its KV bytes. With `private_chunk_bytes`, every read also leaves its own last chunk (its question,
  under its agent's salt: the server keeps every computed chunk as its prefix cache) in RAM under a key of its
  own, one per (document, agent), read again only when that agent reads that document again: those take room
  too, and T solves sum_i S (1 - exp(-lambda_i T)) + sum_i A s (1 - exp(-lambda_i T / A)) = RAM bytes, with A
  agents spreading each document's reads.
- disk, cost-aware score (kvmart.store.policy): with one model and one document size, the score ranks by
  popularity, so the tier holds the node's top-C documents ("ideal LFU"); inclusive of RAM.
- the first read of a document on a node cannot be local unless it was published there: a fraction
  (1 - exp(-n_i)) / n_i of its n_i reads there.
- shared tier: every published document (pinned), or with a TTL a read misses when the document was not read
  anywhere for a TTL: exp(-lambda_shared_i x ttl); a miss is a prefill.

Discrete-event simulation (up to ~10^6 reads): the same workload as a concrete sequence of reads, through exact
LRU RAM tiers and disk tiers evicting with kvmart's own `Placement`; it validates the analytic model. Its
chunk-level form (`replay_chunks`) is what the real multi-node run is compared with (same reads, same order, the
nodes the router chose): every chunk of a read under its own key, as the server's Loader and hot tier see them."""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from decimal import Decimal

import numpy as np

from kvmart.economics.model import SHAPES, Economics, ModelShape, Prices, analyse
from kvmart.store.base import Entry
from kvmart.store.policy import Placement

MONTH_SECONDS = 30 * 86_400
TIERS = ("ram", "disk", "shared", "prefill")
ROUTINGS = ("affinity", "random", "bounded")
EVICTION_SAMPLE = 16


@dataclass(frozen=True)
class Workload:
    documents: int = 100_000
    zipf_s: float = 0.9
    agents: int = 80_000_000
    reads_per_agent: float = 1.0
    window_seconds: float = 86_400.0
    document_tokens: int = 3774
    question_tokens: int = 32
    model: str = "qwen3-4b"
    dtype: str = "bfloat16"
    artifact_bytes: int | None = None  # measured size per document; None: from the model's shape (economics)
    private_chunk_bytes: int = 0  # RAM each read leaves under a key of its own, per (document, agent): its last chunk

    @property
    def reads(self) -> float:
        return self.agents * self.reads_per_agent

    @property
    def shape(self) -> ModelShape:
        return SHAPES[self.model.lower()]


@dataclass(frozen=True)
class Cluster:
    nodes: int = 16
    ram_bytes: int = 128 * 2**30  # per node
    disk_bytes: int | None = 2 * 10**12  # per node; None: unbounded, 0: no disk tier
    shared_ttl_seconds: float = 0.0  # 0: published documents stay (pinned)
    routing: str = "affinity"  # affinity | random | bounded (affinity with a load bound: see the docstring)
    disk_bytes_per_second: float = 5e9  # NVMe read
    shared_bytes_per_second: float = 1.25e9  # each node's link to the Redis/S3 tier: 10 GbE
    published_on: int | None = None  # node that published every document (its disk starts with them); None: home
    # capacity (kvmart/economics/capacity.py): a node's devices, each serving one read at a time, and the reads
    # that may wait for one (kvmart serve's --max-queue: beyond it, HTTP 429); None: an unbounded queue
    devices_per_node: int = 8
    max_queue_per_node: int | None = 64
    shared_tier_bytes_per_second: float | None = None  # the shared tier's own egress, all nodes together; None: ample
    balance_factor: float = 1.25  # `bounded` routing: a node's load is kept under this x the mean

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.routing not in ROUTINGS or self.devices_per_node < 1 or self.balance_factor < 1:
            raise ValueError(f"bad cluster: {self}")


@dataclass(frozen=True)
class NodeLoad:
    """One node's share of the work: the reads it serves per second and the fraction from each tier."""

    reads_per_second: float
    fractions: dict[str, float]


@dataclass(frozen=True)
class Placed:
    """The documents one node serves, the rate of each there (reads/s), and whether each was published there."""

    docs: np.ndarray
    rates: np.ndarray
    published_here: np.ndarray


@dataclass(frozen=True)
class Outcome:
    """Fractions of reads served by each tier, latencies and money over the window."""

    fractions: dict[str, float]
    ttft_p50_seconds: float
    ttft_p99_seconds: float
    prefills: float
    compute_saved_usd: Decimal
    egress_avoided_usd: Decimal
    storage_usd: Decimal
    revenue_usd: Decimal
    cost_usd: Decimal
    shared_transfer_bytes: float
    extra: dict = field(default_factory=dict)
    nodes: tuple[NodeLoad, ...] = ()  # per node, in node order

    @property
    def margin_usd(self) -> Decimal:
        return self.revenue_usd - self.cost_usd

    @property
    def hit_ratio(self) -> float:
        return 1.0 - self.fractions["prefill"]


def zipf_pmf(documents: int, s: float) -> np.ndarray:
    weights = np.arange(1, documents + 1, dtype=np.float64) ** -s
    return weights / weights.sum()


def home_nodes(documents: int, nodes: int) -> np.ndarray:
    """Each document's home node under affinity routing: a fixed hash of its index, as the router hashes ids (a
    seeded draw beyond 200,000 documents, where hashing each in Python would dominate the run)."""
    if documents > 200_000:
        return np.random.default_rng(0).integers(0, nodes, documents)
    return np.array([int.from_bytes(hashlib.sha256(str(i).encode()).digest()[:8], "little") % nodes
                     for i in range(documents)])


def che_time(rates: np.ndarray, capacity: float) -> float:
    """T with sum(1 - exp(-rates T)) = capacity (Che's characteristic time); inf if everything fits."""
    if capacity >= len(rates):
        return math.inf
    if capacity <= 0:
        return 0.0
    lo, hi = 0.0, 1.0
    while np.sum(-np.expm1(-rates * hi)) < capacity:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.sum(-np.expm1(-rates * mid)) < capacity else (lo, mid)
    return (lo + hi) / 2


def che_time_bytes(rates: np.ndarray, item_bytes: float, capacity_bytes: float, private_bytes: float,
                   private_keys: float) -> float:
    """T with sum_i item_bytes (1 - exp(-r_i T)) + sum_i private_keys x private_bytes x (1 - exp(-r_i T /
    private_keys)) = capacity_bytes: Che's time for items of `item_bytes` read at `rates`, each read also keeping
    `private_bytes` under one of `private_keys` keys of its item; inf if everything fits."""
    def held(t: float) -> float:
        return float(item_bytes * np.sum(-np.expm1(-rates * t))
                     + private_keys * private_bytes * np.sum(-np.expm1(-rates * t / private_keys)))

    read = int(np.count_nonzero(rates > 0))
    if read * (item_bytes + private_keys * private_bytes) <= capacity_bytes:  # everything ever read fits
        return math.inf
    if capacity_bytes <= 0:
        return 0.0
    lo, hi = 0.0, 1.0
    while held(hi) < capacity_bytes:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if held(mid) < capacity_bytes else (lo, mid)
    return (lo + hi) / 2


def ram_hits(workload: Workload, rates: np.ndarray, ram_bytes: int, size: int) -> np.ndarray:
    """Each document's RAM hit ratio on a node whose reads of it come at `rates` (Che's approximation)."""
    if not len(rates):
        return rates
    if workload.private_chunk_bytes:
        keys = max(1.0, float(workload.agents))
        t = che_time_bytes(rates, size, ram_bytes, workload.private_chunk_bytes, keys)
    else:
        t = che_time(rates, ram_bytes // size)
    return -np.expm1(-rates * t)


def economics_of(workload: Workload, prices: Prices) -> Economics:
    return analyse(workload.shape, workload.document_tokens, workload.question_tokens, 1, prices, workload.dtype)


def rendezvous_order(doc: int, nodes: int, home: int) -> list[int]:
    """The nodes a document's reads go to when its home is full: home first, then the others by a hash of
    (document, node) (splitmix64, vectorized: the router hashes with sha256; any fixed hash spreads alike)."""
    with np.errstate(over="ignore"):
        x = np.uint64(doc) * np.uint64(0x9E3779B97F4A7C15) + np.arange(nodes, dtype=np.uint64)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    rest = [k for k in np.argsort(-x.astype(np.float64), kind="stable").tolist() if k != home]
    return [home, *rest]


def placements(workload: Workload, cluster: Cluster, rate: np.ndarray) -> list[Placed]:
    """Where each document's reads go, node by node (see the module docstring for the three routings)."""
    n, k_nodes = workload.documents, cluster.nodes
    homes = home_nodes(n, k_nodes)
    published = homes if cluster.published_on is None else np.full(n, cluster.published_on)
    if cluster.routing == "affinity":
        groups = [np.flatnonzero(homes == k) for k in range(k_nodes)]
        return [Placed(d, rate[d], published[d] == k) for k, d in enumerate(groups)]
    if cluster.routing == "random":
        every = np.arange(n)
        return [Placed(every, rate / k_nodes, published == k) for k in range(k_nodes)]
    cap = cluster.balance_factor * rate.sum() / k_nodes
    loads = np.zeros(k_nodes)
    picked: list[list[tuple[int, float]]] = [[] for _ in range(k_nodes)]
    for doc in np.argsort(-rate, kind="stable").tolist():  # the hottest first: they are the ones that spill
        remaining, home = float(rate[doc]), int(homes[doc])
        order = [home] if loads[home] + remaining <= cap else rendezvous_order(doc, k_nodes, home)
        for k in order:
            take = min(remaining, max(0.0, cap - loads[k]))
            if take > 0:
                picked[k].append((doc, take))
                loads[k] += take
                remaining -= take
            if remaining <= 1e-12:
                break
    out = []
    for k, pairs in enumerate(picked):
        docs = np.array([d for d, _ in pairs], dtype=np.int64)
        out.append(Placed(docs, np.array([r for _, r in pairs]), published[docs] == k))
    return out


def analytic(workload: Workload, cluster: Cluster, prices: Prices | None = None) -> Outcome:
    prices = prices or Prices()
    e = economics_of(workload, prices)
    size = workload.artifact_bytes or e.artifact_bytes
    p = zipf_pmf(workload.documents, workload.zipf_s)
    rate = workload.reads * p / workload.window_seconds
    disk_cap = workload.documents if cluster.disk_bytes is None else cluster.disk_bytes // size
    ram, disk = np.zeros(workload.documents), np.zeros(workload.documents)
    shared_rate = np.zeros(workload.documents)
    per_node = []  # (placed, local RAM and disk hit ratios there)
    for placed in placements(workload, cluster, rate):
        docs, r = placed.docs, placed.rates
        h_ram = ram_hits(workload, r, cluster.ram_bytes, size)
        in_disk = np.zeros(len(docs), dtype=bool)
        in_disk[np.argsort(-r, kind="stable")[:int(disk_cap)]] = True
        n = r * workload.window_seconds
        first = np.where(n > 1e-12, -np.expm1(-n) / np.maximum(n, 1e-300), 1.0)
        first = np.where(placed.published_here & in_disk, 0.0, first)  # published here: found on disk at once
        local_ram = (1 - first) * h_ram
        local_disk = (1 - first) * (1 - h_ram) * in_disk
        weight = r / np.maximum(rate[docs], 1e-300)  # this node's share of each document's reads
        np.add.at(ram, docs, weight * local_ram)
        np.add.at(disk, docs, weight * local_disk)
        np.add.at(shared_rate, docs, r * (1 - local_ram - local_disk))
        per_node.append((placed, local_ram, local_disk))
    to_shared = 1 - ram - disk
    miss = np.exp(-shared_rate * cluster.shared_ttl_seconds) if cluster.shared_ttl_seconds else np.zeros_like(p)
    fractions = {"ram": float(p @ ram), "disk": float(p @ disk), "shared": float(p @ (to_shared * (1 - miss))),
                 "prefill": float(p @ (to_shared * miss))}
    if cluster.shared_ttl_seconds:
        resident = float(np.sum(-np.expm1(-shared_rate * cluster.shared_ttl_seconds)))
    else:
        resident = float(workload.documents)
    loads = tuple(node_load(placed, local_ram, local_disk, miss) for placed, local_ram, local_disk in per_node)
    return replace(price(workload, cluster, prices, fractions, resident * size, e), nodes=loads)


def node_load(placed: Placed, local_ram: np.ndarray, local_disk: np.ndarray, miss: np.ndarray) -> NodeLoad:
    r = placed.rates
    total = float(r.sum())
    if total <= 0:
        return NodeLoad(0.0, {"ram": 1.0, "disk": 0.0, "shared": 0.0, "prefill": 0.0})
    remote = r * (1 - local_ram - local_disk)
    m = miss[placed.docs]
    return NodeLoad(total, {"ram": float(r @ local_ram) / total, "disk": float(r @ local_disk) / total,
                            "shared": float(remote @ (1 - m)) / total, "prefill": float(remote @ m) / total})


def price(workload: Workload, cluster: Cluster, prices: Prices, fractions: dict[str, float],
          stored_bytes: float, e: Economics | None = None) -> Outcome:
    """Money and latency of a tier mix: every read pays the cache-read tariff; the provider pays the reuse compute,
    a prefill on a miss, and the shared tier's storage for the window."""
    e = e or economics_of(workload, prices)
    size, reads = workload.artifact_bytes or e.artifact_bytes, workload.reads
    ttft = {"ram": e.reuse_seconds, "disk": e.reuse_seconds + size / cluster.disk_bytes_per_second,
            "shared": e.reuse_seconds + size / cluster.shared_bytes_per_second, "prefill": e.prefill_seconds}
    order = sorted(TIERS, key=lambda t: ttft[t])
    cumulative, p50, p99 = 0.0, None, None
    for tier in order:
        cumulative += fractions[tier]
        if p50 is None and cumulative >= 0.5:
            p50 = ttft[tier]
        if p99 is None and cumulative >= 0.99:
            p99 = ttft[tier]
    hits = Decimal(repr(reads * (1 - fractions["prefill"])))
    prefills = Decimal(repr(reads * fractions["prefill"]))
    months = Decimal(repr(workload.window_seconds / MONTH_SECONDS))
    storage = Decimal(repr(stored_bytes)) * months * prices.storage_usd_per_gb_month / 10**9
    cost = hits * e.reuse_usd + prefills * e.prefill_usd + storage
    return Outcome(
        fractions=fractions, ttft_p50_seconds=p50 or ttft[order[-1]], ttft_p99_seconds=p99 or ttft[order[-1]],
        prefills=float(prefills), compute_saved_usd=hits * (e.prefill_usd - e.reuse_usd),
        egress_avoided_usd=Decimal(repr(reads)) * e.egress_usd, storage_usd=storage,
        revenue_usd=Decimal(repr(reads)) * e.tariff.user_pays, cost_usd=cost,
        shared_transfer_bytes=reads * fractions["shared"] * size,
        extra={"artifact_bytes": size, "prefill_seconds": e.prefill_seconds, "reuse_seconds": e.reuse_seconds})


# -- discrete-event simulation -----------------------------------------------------------------------------------
@dataclass
class SimNode:
    """One node: an LRU RAM tier (like server/hot.py) and a disk tier evicting by kvmart's Placement score. The
    disk evicts the lowest score among `EVICTION_SAMPLE` random residents (as Redis' LFU does) instead of sorting
    every resident: the same score, at a cost that lets the replay reach 10^6 reads."""

    ram_bytes: int
    disk_bytes: int | None  # None: unbounded; 0: no disk tier
    placement: Placement
    rng: np.random.Generator
    ram: OrderedDict = field(default_factory=OrderedDict)
    ram_used: int = 0
    disk: dict = field(default_factory=dict)  # cache id -> Entry
    disk_used: int = 0

    def ram_put(self, doc: str, size: int) -> None:
        if size > self.ram_bytes:
            return
        self.ram_used -= self.ram.pop(doc, 0)
        while self.ram and self.ram_used + size > self.ram_bytes:
            self.ram_used -= self.ram.popitem(last=False)[1]
        self.ram[doc] = size
        self.ram_used += size

    def disk_put(self, entry: Entry) -> None:
        if self.disk_bytes == 0 or entry.cache_id in self.disk:
            return
        while self.disk_bytes is not None and self.disk and self.disk_used + entry.artifact_bytes > self.disk_bytes:
            keys = list(self.disk)
            sample = [keys[i] for i in self.rng.integers(0, len(keys), min(EVICTION_SAMPLE, len(keys)))]
            victim = min(sample, key=lambda c: self.placement.score(self.disk[c]))
            if self.placement.is_pinned(victim):
                return
            self.disk_used -= self.disk.pop(victim).artifact_bytes
        if self.disk_bytes is None or self.disk_used + entry.artifact_bytes <= self.disk_bytes:
            self.disk[entry.cache_id] = entry
            self.disk_used += entry.artifact_bytes


def sample_reads(workload: Workload, num_reads: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(document index, time) of `num_reads` reads: Zipf documents, uniform times over the window, in order."""
    rng = np.random.default_rng(seed)
    docs = rng.choice(workload.documents, size=num_reads, p=zipf_pmf(workload.documents, workload.zipf_s))
    return docs, np.sort(rng.uniform(0, workload.window_seconds, num_reads))


def simulate(workload: Workload, cluster: Cluster, docs: np.ndarray, times: np.ndarray,
             sizes: list[int] | None = None, prices: Prices | None = None, nodes_of: list[int] | None = None
             ) -> Outcome:
    """Replay reads (document indices at times) through the cluster. `sizes`: bytes of each document (default:
    the workload's artifact size); `nodes_of`: the node each read goes to (default: home or random routing;
    `bounded` routing depends on live loads, so it needs `nodes_of`)."""
    if cluster.routing == "bounded" and nodes_of is None:
        raise ValueError("a replay of bounded routing needs the node of each read (nodes_of)")
    prices = prices or Prices()
    e = economics_of(workload, prices)
    sizes = sizes or [workload.artifact_bytes or e.artifact_bytes] * workload.documents
    clock = [0.0]
    homes = home_nodes(workload.documents, cluster.nodes)
    nodes = [SimNode(cluster.ram_bytes, cluster.disk_bytes, Placement(clock=lambda: clock[0]),
                     np.random.default_rng(k)) for k in range(cluster.nodes)]
    entries = [Entry(cache_id=f"{i:064x}", title="", source="", model=workload.shape.name, fingerprint="",
                     num_tokens=workload.document_tokens, artifact_bytes=sizes[i], prefill_seconds=0.0, created_at=0.0)
               for i in range(workload.documents)]
    for i in np.random.default_rng(2).permutation(workload.documents).tolist():  # published in no particular
        entry = entries[i]  # order; publishing writes through to the publisher's disk
        nodes[cluster.published_on if cluster.published_on is not None else int(homes[i])].disk_put(entry)
    last_read = np.full(workload.documents, 0.0)
    counts = dict.fromkeys(TIERS, 0)
    per_node = [dict.fromkeys(TIERS, 0) for _ in nodes]
    rng = np.random.default_rng(1)
    for n, (doc, t) in enumerate(zip(docs.tolist(), times.tolist(), strict=True)):
        clock[0] = t
        k = nodes_of[n] if nodes_of is not None else (
            int(homes[doc]) if cluster.routing != "random" else int(rng.integers(cluster.nodes)))
        node, entry = nodes[k], entries[doc]
        if entry.cache_id in node.ram:
            node.ram.move_to_end(entry.cache_id)
            tier = "ram"
        else:
            node.placement.touch(entry.cache_id)
            if entry.cache_id in node.disk:
                tier = "disk"
            else:
                ttl = cluster.shared_ttl_seconds
                tier = "shared" if not ttl or t - last_read[doc] <= ttl else "prefill"
                node.disk_put(entry)
            node.ram_put(entry.cache_id, sizes[doc])
        if tier != "ram" and tier != "disk":
            last_read[doc] = t
        counts[tier] += 1
        per_node[k][tier] += 1
    total = max(1, len(docs))
    fractions = {tier: counts[tier] / total for tier in TIERS}
    run = replace(workload, agents=len(docs), reads_per_agent=1.0)
    loads = tuple(NodeLoad(sum(c.values()) / workload.window_seconds,
                           {t: c[t] / max(1, sum(c.values())) for t in TIERS}) for c in per_node)
    return replace(price(run, cluster, prices, fractions, float(sum(sizes)), e), nodes=loads)


# -- the chunk-level replay of a real run ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ChunkRead:
    """One read as a node serves it from the chunk store (kvmart/server/pipeline/plan.py's Loader): the document's
    chunks (key, KV bytes), each from the fastest tier that holds it (RAM, the node's disk, the shared tier) and
    kept in RAM; then the read's own last chunk (its question, under its agent's salt), computed and kept in RAM."""

    node: int
    chunks: tuple[tuple[str, int], ...]
    last: tuple[str, int]


@dataclass(frozen=True)
class ChunkReplay:
    """Where every chunk of every read came from (`chunk_tiers`), and each read's tier: the slowest of its chunks'
    (a read is as slow as its slowest chunk)."""

    chunk_tiers: tuple[tuple[str, ...], ...]

    @property
    def read_tiers(self) -> list[str]:
        return [max(tiers, key=TIERS.index) for tiers in self.chunk_tiers]

    @property
    def fractions(self) -> dict[str, float]:
        """Per read: the share of reads whose slowest chunk came from each tier."""
        tiers = self.read_tiers
        return {t: tiers.count(t) / max(1, len(tiers)) for t in TIERS}

    @property
    def chunk_fractions(self) -> dict[str, float]:
        """Per chunk read: the share of chunk reads each tier answered."""
        every = [t for tiers in self.chunk_tiers for t in tiers]
        return {t: every.count(t) / max(1, len(every)) for t in TIERS}


def replay_chunks(reads: list[ChunkRead], nodes: int, ram_bytes: int, disk_bytes: int | None,
                  published: dict[int, list[tuple[str, int]]], ram_held: list[int] | None = None) -> ChunkReplay:
    """Replay `reads` chunk by chunk through each node's RAM LRU (by bytes, as server/pipeline/hot.py) and disk
    (evicting by Placement, as the tiered store) over a shared tier that holds every chunk (published, pinned).
    `published`: node -> (key, stored bytes) of the chunks already on its disk (where they were published);
    `ram_held`: bytes each node's RAM holds at the start (warm-up chunks no read asks for: the oldest entries)."""
    clock = [0.0]
    sims = [SimNode(ram_bytes, disk_bytes, Placement(clock=lambda: clock[0]), np.random.default_rng(k))
            for k in range(nodes)]

    def entry(key: str, stored_bytes: int) -> Entry:
        return Entry(cache_id=key, title="", source="", model="", fingerprint="", num_tokens=0,
                     artifact_bytes=stored_bytes, prefill_seconds=0.0, created_at=0.0, kind="chunk")

    for k, chunks in published.items():
        for key, stored_bytes in chunks:
            sims[k].disk_put(entry(key, stored_bytes))
    for k, held in enumerate(ram_held or []):
        if held:
            sims[k].ram_put("(warm-up chunks)", held)
    found = []
    for n, read in enumerate(reads):
        clock[0] = float(n)
        node, tiers = sims[read.node], []
        for key, kv_bytes in read.chunks:
            if key in node.ram:
                node.ram.move_to_end(key)
                tiers.append("ram")
                continue
            node.placement.touch(key)
            if key in node.disk:
                tiers.append("disk")
            else:
                tiers.append("shared")
                node.disk_put(entry(key, kv_bytes))  # kept on the node's disk, decoded
            node.ram_put(key, kv_bytes)
        node.ram_put(*read.last)
        found.append(tuple(tiers))
    return ChunkReplay(tuple(found))
