"""Claim: a prefill CDN (RAM -> disk -> shared tiers across K nodes, cache-affinity routing) serves tens of
millions of agents with almost every read a cache hit, and the analytic model that says so agrees with a replay
of the same reads and with a real two-node run.

Three parts, printed as markdown tables for docs/SCALE.md:
  scale     : the analytic model (kvmart/economics/simulation.py) at 80M agents, Zipf catalogue, for several clusters;
  check     : analytic vs discrete-event replay of the same workload at 10^5-10^6 reads;
  validate  : a real run (redis-server + two `kvmart serve` nodes, builtin:tiny) against the replay of exactly its
              reads and against the analytic model: hit ratio per tier side by side. --validate to run it.

    python bench/cdn_sim.py                     # scale + check (seconds)
    python bench/cdn_sim.py --validate          # + the real two-node run (about a minute)
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from rich.progress import Progress

from kvmart.economics.simulation import TIERS, Cluster, Outcome, Workload, analytic, sample_reads, simulate

GIB, TB = 2**30, 10**12


def row(label: str, o: Outcome) -> str:
    f = o.fractions
    return (f"| {label} | {f['ram']:.1%} | {f['disk']:.1%} | {f['shared']:.1%} | {f['prefill']:.3%} | "
            f"{o.ttft_p50_seconds:.3f} | {o.ttft_p99_seconds:.3f} | {o.compute_saved_usd:,.0f} | "
            f"{o.egress_avoided_usd:,.0f} | {o.storage_usd:,.2f} | {o.margin_usd:,.0f} |")


HEADER = ("| cluster | RAM | disk | shared | prefill | TTFT p50 s | TTFT p99 s | compute saved $ | egress avoided $ | "
          "storage $ | margin $ |\n|---|---|---|---|---|---|---|---|---|---|---|")


def scale() -> None:
    w = Workload()
    print(f"## {w.agents / 1e6:.0f}M agents x {w.reads_per_agent:g} read over {w.window_seconds / 3600:.0f} h; "
          f"{w.documents:,} documents of {w.document_tokens:,} tokens, Zipf s={w.zipf_s}; {w.model} {w.dtype}\n")
    print(HEADER)
    clusters = [
        ("1 node, 128 GiB RAM, 2 TB disk", Cluster(nodes=1)),
        ("4 nodes, affinity", Cluster(nodes=4)),
        ("16 nodes, affinity", Cluster()),
        ("16 nodes, random routing", Cluster(routing="random")),
        ("64 nodes, affinity", Cluster(nodes=64)),
        ("16 nodes, 32 GiB RAM, no disk", Cluster(ram_bytes=32 * GIB, disk_bytes=0)),
        ("16 nodes, 32 GiB RAM, no disk, shared TTL 1 h", Cluster(ram_bytes=32 * GIB, disk_bytes=0,
                                                                  shared_ttl_seconds=3600)),
        ("16 nodes, 32 GiB RAM, no disk, shared TTL 5 min", Cluster(ram_bytes=32 * GIB, disk_bytes=0,
                                                                    shared_ttl_seconds=300)),
    ]
    for label, cluster in clusters:
        print(row(label, analytic(w, cluster)))
    print("\n### agents sweep: 16 nodes, 32 GiB RAM, no disk, shared TTL\n")
    print("| agents | TTL | RAM | shared | prefill | TTFT p99 s | margin $ |\n|---|---|---|---|---|---|---|")
    for agents in (1_000_000, 10_000_000, 80_000_000):
        for ttl in (300, 3600):
            o = analytic(replace(w, agents=agents), Cluster(ram_bytes=32 * GIB, disk_bytes=0, shared_ttl_seconds=ttl))
            f = o.fractions
            print(f"| {agents / 1e6:.0f}M | {ttl // 60} min | {f['ram']:.1%} | {f['shared']:.1%} | {f['prefill']:.2%} | "
                  f"{o.ttft_p99_seconds:.3f} | {o.margin_usd:,.0f} |")
    e = analytic(w, Cluster())
    print(f"\nartifact {e.extra['artifact_bytes'] / 1e6:.0f} MB; prefill {e.extra['prefill_seconds']:.2f} s, reuse "
          f"{e.extra['reuse_seconds']:.3f} s (kvmart.economics.model roofline, the paper's prices); all-prefill cost "
          f"${w.reads * float(e.extra['prefill_seconds']) * 4.6 / 3600:,.0f}\n")


def plot(path: Path) -> None:
    """Local hit ratio vs nodes (affinity vs random routing), and prefills vs agents for two shared TTLs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = Workload()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    counts = [1, 2, 4, 8, 16, 32, 64]
    for routing, style in (("affinity", "-o"), ("random", "--s")):
        outs = [analytic(w, Cluster(nodes=k, routing=routing)) for k in counts]
        left.plot(counts, [o.fractions["ram"] for o in outs], style, label=f"RAM, {routing}")
        left.plot(counts, [o.fractions["ram"] + o.fractions["disk"] for o in outs], style, label=f"RAM+disk, {routing}")
    left.set(xscale="log", xlabel="nodes (128 GiB RAM, 2 TB disk each)", ylabel="fraction of reads",
             title="80M reads, 100k documents, Qwen3-4B: local hits")
    left.legend(fontsize=8)
    agents = [10**5, 10**6, 10**7, 80_000_000]
    for ttl in (300, 3600):
        outs = [analytic(replace(w, agents=a), Cluster(ram_bytes=32 * GIB, disk_bytes=0, shared_ttl_seconds=ttl))
                for a in agents]
        right.plot(agents, [o.fractions["prefill"] for o in outs], "-o", label=f"shared TTL {ttl // 60} min")
    right.set(xscale="log", yscale="log", xlabel="agents (one read each, 24 h)", ylabel="reads that prefill",
              title="16 nodes, 32 GiB RAM, no disk")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"![CDN model]({path.name})\n" if path.parent.name == "docs" else f"wrote {path}\n")


def check(num_reads: int) -> None:
    w = Workload(documents=10_000, agents=num_reads, window_seconds=3600)
    print(f"## analytic vs discrete-event replay: {num_reads:,} reads, {w.documents:,} documents, Zipf "
          f"s={w.zipf_s}, 1 h\n")
    print("| cluster | model | RAM | disk | shared | prefill |\n|---|---|---|---|---|---|")
    size = analytic(w, Cluster()).extra["artifact_bytes"]
    docs, times = sample_reads(w, num_reads, seed=7)
    for label, cluster in (("4 nodes, RAM 200 docs, disk 1,000 docs", Cluster(4, 200 * size, 1000 * size)),
                           ("4 nodes random, RAM 200, disk 1,000", Cluster(4, 200 * size, 1000 * size, routing="random")),
                           ("4 nodes, RAM 200, no disk, TTL 5 min", Cluster(4, 200 * size, 0, 300.0, published_on=0))):
        for name, o in (("analytic", analytic(w, cluster)), ("replay", simulate(w, cluster, docs, times))):
            f = o.fractions
            print(f"| {label} | {name} | " + " | ".join(f"{f[t]:.1%}" for t in TIERS) + " |")
    print()


def validate(num_documents: int, num_reads: int) -> None:
    """Two real nodes over a real Redis; every read routed by the router's own affinity order."""
    from kvmart.cluster.local import KvmartNode, RedisServer
    from kvmart.cluster.router import node_order
    from kvmart.reuse.samples import sample_text

    root = Path(tempfile.mkdtemp(prefix="kvmart-cdn-"))
    redis = RedisServer(root / "redis").start()
    kv_bytes_per_token = 512  # builtin:tiny: 2 layers x 2 (K, V) x 2 KV heads x 16 dims x 4 bytes
    ram_docs = 3
    text = sample_text("mpl-2.0")
    texts = [f"Document {i}.\n{text[i * 40:i * 40 + 2400]}" for i in range(num_documents)]
    nodes = []
    try:
        sizes_guess = 700 * kv_bytes_per_token
        models = root / "models"
        models.mkdir()
        for name in ("a", "b"):  # one after the other: the first builds builtin:tiny into models/
            nodes.append(KvmartNode(name, root, models, redis.url, "--ram-cache-bytes", str(ram_docs * sizes_guess),
                                    ledger_url=f"sqlite:///{root / 'ledger.sqlite'}", admin_key="kvm_cdn_sim_admin"))
            nodes[-1].start()
        a, b = nodes
        published = [a.publish(t).json() for t in texts]  # everything published on node A (it is on A's disk)
        ids = [d["id"] for d in published]
        sizes = [d["num_tokens"] * kv_bytes_per_token for d in published]
        w = Workload(documents=num_documents, agents=num_reads, window_seconds=600, model="qwen3-0.6b")
        docs, times = sample_reads(w, num_reads, seed=3)
        urls = [n.url for n in nodes]
        route = [urls.index(node_order(ids[d], urls)[0]) for d in docs.tolist()]
        with Progress(transient=True) as bar:
            task = bar.add_task("real reads", total=num_reads)
            for d, k in zip(docs.tolist(), route, strict=True):
                nodes[k].ask(ids[d], "What is this?", max_tokens=1)
                bar.advance(task)
        measured = measure(nodes, num_reads)
        cluster = Cluster(nodes=2, ram_bytes=ram_docs * sizes_guess, disk_bytes=None, published_on=0)
        replay = simulate(w, cluster, docs, times, sizes=sizes, nodes_of=route)
        print(f"## validation: {num_reads} reads of {num_documents} documents (Zipf s={w.zipf_s}), 2 real nodes, "
              f"redis-server, builtin:tiny, hot tier {ram_docs} documents, all published on node A\n")
        print("| source | RAM | disk | shared (Redis) | prefill |\n|---|---|---|---|---|")
        print("| measured (2 kvmart serve nodes) | " + " | ".join(f"{measured[t]:.1%}" for t in TIERS) + " |")
        print("| replay of the same reads | " + " | ".join(f"{replay.fractions[t]:.1%}" for t in TIERS) + " |")
        model = analytic(replace(w, artifact_bytes=sum(sizes) // len(sizes)), cluster)
        print("| analytic model | " + " | ".join(f"{model.fractions[t]:.1%}" for t in TIERS) + " |\n")
    finally:
        for node in nodes:
            if node.process is not None:
                node.stop()
        redis.stop()


def measure(nodes, num_reads: int) -> dict[str, float]:
    counts = dict.fromkeys(TIERS, 0.0)
    for node in nodes:
        metrics = node.http.get("/metrics").text
        counts["ram"] += float(re.search(r"^kvmart_hot_hits_total (\S+)", metrics, re.M).group(1))
        health = node.health()["store"]
        tiers = {t["name"]: t for t in health["tiers"]}
        counts["disk"] += tiers["disk"]["hits"]
        counts["shared"] += tiers["redis"]["hits"]
        counts["prefill"] += health["misses"]
    return {t: counts[t] / num_reads for t in TIERS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check-reads", type=int, default=200_000)
    parser.add_argument("--validate", action="store_true", help="also run the real two-node validation")
    parser.add_argument("--documents", type=int, default=12)
    parser.add_argument("--reads", type=int, default=200)
    parser.add_argument("--plot", type=Path, help="also draw the scale plot (PNG)")
    args = parser.parse_args()
    started = time.perf_counter()
    scale()
    if args.plot:
        plot(args.plot)
    check(args.check_reads)
    if args.validate:
        validate(args.documents, args.reads)
    print(f"(ran in {time.perf_counter() - started:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
