"""The CDN at scale, checked on a real cluster (kvmart/economics/validation.py; the full run is
`bench/cdn_sim.py --validate`, figures in docs/SCALE.md): three `kvmart serve` nodes over redis-server and one
PostgreSQL ledger, per-key limits on (cluster-wide) and set for the workload, `kvmart route` in front; a Zipf
workload against the model's prediction for the same configuration. And nginx with kvmart's configuration in front
of the same nodes: consistent hashing on the affinity header (or the body's document or prompt_cache_key), and
failover when a node dies."""

from __future__ import annotations

import shutil

import httpx
import pytest
from infra_support import wait_for
from service_support import missing_service

from kvmart.economics.simulation import TIERS
from kvmart.economics.validation import ADMIN_KEY, LocalCluster, ValidationConfig, measure_and_predict, node_url

SHORT = ValidationConfig(documents=30, reads=240, calibration_reads=24, clients=4, agents=3, ram_documents=6)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, postgres):
    if shutil.which("redis-server") is None:
        missing_service("redis-server is not installed (apt-get install redis-server; .ci/run does)")
    root = tmp_path_factory.mktemp("cdn")
    local = LocalCluster(root, SHORT, postgres.new_database(), postgres.process.pid)
    with local.running():
        yield local


def test_a_real_cluster_against_the_model(cluster, record_agreement):
    report = measure_and_predict(cluster)
    m, p = report.measured, report.predicted
    record_agreement(report.markdown())
    assert m.refused == 0  # the limits are on, cluster-wide, and set for the workload: nothing is refused
    # every read counted once, by the slowest tier of its chunks; none computed any of its document's tokens
    assert sum(m.tiers.values()) == pytest.approx(1.0) and m.tiers["prefill"] == 0.0
    assert sum(m.chunk_tiers.values()) == pytest.approx(1.0)
    for tier in TIERS:  # the replay mirrors each node's hot tier (LRU by bytes) and disk chunk by chunk
        assert m.tiers[tier] == pytest.approx(p.replay[tier], abs=0.03), (tier, m.tiers, p.replay)
        assert m.chunk_tiers[tier] == pytest.approx(p.replay_chunks[tier], abs=0.03), (tier, m.chunk_tiers,
                                                                                      p.replay_chunks)
    assert m.shared_bytes == pytest.approx(p.shared_bytes, rel=0.15)  # Redis' own byte counter vs the replay's
    assert m.discovery_bytes == pytest.approx(p.discovery_bytes, rel=0.15)
    assert m.throughput > 0 and p.network.throughput > 0 and 0 < m.latency_p50 <= m.latency_p99
    assert len([s for s in m.node_shares if s > 0]) >= 2  # affinity spread the catalogue over the nodes


@pytest.fixture(scope="module")
def nginx(cluster, tmp_path_factory):
    from kvmart.cluster.local import MissingBinaryError
    from kvmart.cluster.nginx import NginxServer

    try:
        server = NginxServer([n.url for n in cluster.nodes], tmp_path_factory.mktemp("nginx"))
    except MissingBinaryError as e:
        missing_service(f"{e} (Debian's nginx package; .ci/run installs it)")
    server.start()
    yield server
    server.stop()


def ask(client: httpx.Client, doc_id: str | None, how: str) -> httpx.Response:
    body: dict = {"model": "builtin:tiny", "messages": [{"role": "user", "content": "Who?"}], "max_tokens": 1,
                  "temperature": 0}
    headers = {"authorization": f"Bearer {ADMIN_KEY}"}
    if how == "header":
        headers["x-kvmart-document"] = doc_id
        body["documents"] = [doc_id]
    elif how == "body":
        body["documents"] = [doc_id]
    elif how == "prompt_cache_key":  # an OpenAI client's cache key, here the document id, and the prompt names it
        body["documents"], body["prompt_cache_key"] = [doc_id], doc_id
    return client.post("/v1/chat/completions", json=body, headers=headers)


def test_nginx_keeps_each_document_on_one_node_and_fails_over(cluster, nginx):
    a = cluster.nodes[0]
    published = [a.publish(f"Proxy document {i}.\n" + "A short text about proxies. " * (30 + i)).json()
                 for i in range(8)]
    homes = {}
    with httpx.Client(base_url=nginx.url, timeout=60) as client:
        for doc in published:
            served = {node_url(ask(client, doc["id"], how).headers["x-kvmart-upstream"])
                      for how in ("header", "header", "body", "prompt_cache_key")}
            assert len(served) == 1, (doc["id"], served)  # one node, whichever way the key is given
            homes[doc["id"]] = served.pop()
        assert len(set(homes.values())) >= 2  # keys spread over the nodes
        spread = [ask(client, None, "none").headers["x-kvmart-upstream"] for _ in range(6)]
        assert len(set(spread)) >= 2  # no key: requests are spread
        victim_url = homes[published[0]["id"]]
        victim = next(n for n in cluster.nodes if n.url == victim_url)
        victim.process.kill()  # the home node dies
        victim.process.wait()
        moved = [doc for doc in published if homes[doc["id"]] == victim_url]
        kept = [doc for doc in published if homes[doc["id"]] != victim_url]
        for doc in moved:
            answer = ask(client, doc["id"], "header")
            assert answer.status_code == 200, answer.text
            assert node_url(answer.headers["x-kvmart-upstream"]) != victim_url
            usage = answer.json()["usage"]
            assert usage["prompt_tokens_details"]["cached_tokens"] == doc["num_tokens"]  # from Redis: no prefill
        for doc in kept:  # consistent hashing: the other documents stay where they were
            assert node_url(ask(client, doc["id"], "header").headers["x-kvmart-upstream"]) == homes[doc["id"]]
    wait_for(lambda: victim.process.poll() is not None, "the killed node to be gone")
