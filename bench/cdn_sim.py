"""Claim: a prefill CDN (RAM -> disk -> shared tiers across K nodes, cache-affinity routing) serves tens of
millions of agents with almost every read a cache hit, *if* it has the devices, disks and links to carry the load;
the model that says how many agrees with a replay of the same reads and with a real cluster on this machine.

Parts, printed as markdown tables for docs/SCALE.md:
  scale     : the analytic model (kvmart/economics/simulation.py) and its capacity (kvmart/economics/capacity.py)
              at 80M agents: tier mix, utilisation of devices, disks and links, the bottleneck, reads refused, TTFT
              with queueing, and the nodes a 1 s p99 needs; for the roofline's and the paper's service times;
  check     : analytic vs discrete-event replay of the same workload at 10^5-10^6 reads;
  validate  : a real cluster (kvmart/economics/validation.py: redis-server, PostgreSQL, three `kvmart serve` nodes
              on builtin:tiny, `kvmart route` or nginx in front) against the model's prediction for it.

    python bench/cdn_sim.py                                   # scale + check (a few minutes: the node searches)
    python bench/cdn_sim.py --validate --router kvmart,nginx  # + the real cluster, both routers (minutes each)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

from rich.progress import Progress

from kvmart.economics.capacity import (
    Capacity,
    ServiceTimes,
    capacity,
    nodes_needed,
    paper_times,
    roofline_times,
)
from kvmart.economics.model import Prices
from kvmart.economics.simulation import TIERS, Cluster, Outcome, Workload, analytic, sample_reads, simulate

GIB, TB = 2**30, 10**12
TARGET_P99_SECONDS = 1.0


def row(label: str, o: Outcome) -> str:
    f = o.fractions
    return (f"| {label} | {f['ram']:.1%} | {f['disk']:.1%} | {f['shared']:.1%} | {f['prefill']:.3%} | "
            f"{o.ttft_p50_seconds:.3f} | {o.ttft_p99_seconds:.3f} | {o.compute_saved_usd:,.0f} | "
            f"{o.egress_avoided_usd:,.0f} | {o.storage_usd:,.2f} | {o.margin_usd:,.0f} |")


HEADER = ("| cluster | RAM | disk | shared | prefill | unloaded TTFT p50 s | p99 s | compute saved $ | "
          "egress avoided $ | storage $ | margin on busy time $ |\n|---|---|---|---|---|---|---|---|---|---|---|")
CAPACITY_HEADER = ("| cluster | nodes x devices | RAM / disk / shared / prefill | device / disk / link rho (busiest node) "
                   "| bottleneck | carries reads/s | refused (429) | TTFT p50 / p99 s | fleet $/day | margin $/day |\n"
                   "|---|---|---|---|---|---|---|---|---|---|")


def fleet_usd(cluster: Cluster, w: Workload, prices: Prices) -> Decimal:
    """Every device of the fleet for the window, busy or idle, at the device price."""
    hours = Decimal(repr(w.window_seconds / 3600))
    return cluster.nodes * cluster.devices_per_node * hours * prices.device_usd_per_hour


def capacity_row(label: str, cluster: Cluster, o: Outcome, cap: Capacity, w: Workload, prices: Prices) -> str:
    f, u = o.fractions, cap.utilisation
    fleet = fleet_usd(cluster, w, prices)
    prefills = Decimal(repr(o.prefills)) * Decimal(repr(cap.times.prefill_seconds)) * prices.device_usd_per_hour / 3600
    served = Decimal(repr(1 - cap.refused))
    margin = o.revenue_usd * served - fleet - o.storage_usd - (prefills if cap.times.prefill_seconds else 0)
    latency = "unbounded" if cap.ttft_p99_seconds == float("inf") else (
        f"{cap.ttft_p50_seconds:.2f} / {cap.ttft_p99_seconds:.2f}")
    return (f"| {label} | {cluster.nodes} x {cluster.devices_per_node} | {f['ram']:.0%} / {f['disk']:.0%} / "
            f"{f['shared']:.0%} / {f['prefill']:.2%} | {u['device']:.2f} / {u['disk']:.2f} / {u['link']:.2f} | "
            f"{cap.bottleneck} | {cap.max_reads_per_second:,.0f} | {cap.refused:.1%} | {latency} | {fleet:,.0f} | "
            f"{margin:,.0f} |")


def capacity_table(w: Workload, times: ServiceTimes, prices: Prices) -> None:
    offered = w.reads / w.window_seconds
    print(f"#### service times: {times.source}: reuse {times.reuse_seconds:.3f} s, prefill "
          f"{times.prefill_seconds:.2f} s; offered load {offered:,.0f} reads/s (80M over 24 h, steady)\n")
    print(CAPACITY_HEADER)
    fixed = [("1 node", Cluster(nodes=1)), ("16 nodes, affinity", Cluster()),
             ("16 nodes, random routing", Cluster(routing="random"))]
    for label, cluster in fixed:
        o = analytic(w, cluster, prices)
        print(capacity_row(f"{label} (too few)", cluster, o, capacity(o, w, cluster, times), w, prices))
    searches = [("affinity", Cluster()), ("bounded load 1.25", Cluster(routing="bounded")),
                ("affinity, 4 NVMe (20 GB/s) + 100 GbE", Cluster(disk_bytes_per_second=20e9,
                                                                 shared_bytes_per_second=12.5e9))]
    for label, cluster in searches:
        sized = nodes_needed(w, cluster, times, TARGET_P99_SECONDS, prices)
        if sized.nodes is None or sized.outcome is None or sized.capacity is None:
            hottest = w.reads / w.window_seconds * float(zipf_top(w))
            print(f"| {label}: nodes for p99 <= {TARGET_P99_SECONDS:g} s | none up to 1,024 | - | - | device | - | - "
                  f"| the hottest document alone needs {hottest * times.reuse_seconds:.1f} devices on its one "
                  f"home node (it has {cluster.devices_per_node}) | - | - |")
            continue
        final = replace(cluster, nodes=sized.nodes)
        print(capacity_row(f"{label}: nodes for p99 <= {TARGET_P99_SECONDS:g} s", final, sized.outcome,
                           sized.capacity, w, prices))
    print()


def zipf_top(w: Workload) -> float:
    from kvmart.economics.simulation import zipf_pmf

    return float(zipf_pmf(w.documents, w.zipf_s)[0])


def scale() -> None:
    w, prices = Workload(), Prices()
    print(f"## {w.agents / 1e6:.0f}M agents x {w.reads_per_agent:g} read over {w.window_seconds / 3600:.0f} h; "
          f"{w.documents:,} documents of {w.document_tokens:,} tokens, Zipf s={w.zipf_s}; {w.model} {w.dtype}\n")
    print("### capacity: enough nodes, and too few\n")
    print(f"Each node: 8 devices of the paper's kind (each serves one read at a time), 128 GiB RAM, 2 TB NVMe at "
          f"5 GB/s, 10 GbE to the shared tier, a queue of 64 reads (kvmart serve's --max-queue; beyond it: HTTP "
          f"429). Nodes needed: the fewest with p99 TTFT <= {TARGET_P99_SECONDS:g} s, no station at rho >= 1 and "
          f"nothing refused. Fleet: every device for 24 h at ${prices.device_usd_per_hour}/h, busy or not; margin: "
          f"revenue of the reads served less the fleet, prefills and storage.\n")
    for times in (roofline_times(w, prices), paper_times()):
        capacity_table(w, times, prices)
    print("### the tier mix (the model without capacity, as before)\n")
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
    print("\n#### agents sweep: 16 nodes, 32 GiB RAM, no disk, shared TTL\n")
    print("| agents | TTL | RAM | shared | prefill | unloaded TTFT p99 s | margin on busy time $ |\n"
          "|---|---|---|---|---|---|---|")
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


def validate(documents: int, reads: int, clients: int, routers: list[str]) -> None:
    """The real cluster, once per router, against the model's prediction for it."""
    from kvmart.economics.validation import ValidationConfig, run

    print("## validation: a real cluster on this machine against the model\n")
    for router in routers:
        config = ValidationConfig(documents=documents, reads=reads, clients=clients, router=router,
                                  calibration_reads=max(20, reads // 20))
        root = Path(tempfile.mkdtemp(prefix=f"kvmart-cdn-{router}-"))
        with Progress(transient=True) as bar:
            task = bar.add_task(f"{router}: reads", total=reads - config.calibration_reads)
            report = run(config, root, progress=lambda task=task: bar.advance(task))
        print(report.markdown())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check-reads", type=int, default=200_000)
    parser.add_argument("--validate", action="store_true", help="also run the real cluster")
    parser.add_argument("--documents", type=int, default=300)
    parser.add_argument("--reads", type=int, default=3000)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--router", default="kvmart", help="kvmart, nginx, or both: kvmart,nginx")
    parser.add_argument("--no-scale", action="store_true", help="skip the 80M tables and the check")
    parser.add_argument("--plot", type=Path, help="also draw the scale plot (PNG)")
    args = parser.parse_args()
    started = time.perf_counter()
    if not args.no_scale:
        scale()
        if args.plot:
            plot(args.plot)
        check(args.check_reads)
    if args.validate:
        validate(args.documents, args.reads, args.clients, [r.strip() for r in args.router.split(",") if r.strip()])
    print(f"(ran in {time.perf_counter() - started:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
