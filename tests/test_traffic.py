"""The byte model of the Redis shared tier (kvmart/economics/traffic.py) against Redis' own output counter: a chunk
read by a node's tiered store, a document its catalogue learns of, and a change-log poll cost exactly what the model
says (the validation's byte predictions are sums of these)."""

from __future__ import annotations

from pathlib import Path

import pytest
from infra_support import redis_server  # noqa: F401  (a fixture)

from kvmart.economics import traffic
from kvmart.reuse import core
from kvmart.reuse.catalog import Catalog
from kvmart.reuse.samples import sample_text
from kvmart.store import open_store


def output_bytes(server) -> int:
    return int(server.client().info("stats")["total_net_output_bytes"])


def measure(server, action) -> int:
    """Bytes Redis sent while `action` ran, less the counter's own readings (an INFO reply, measured alongside)."""
    first = output_bytes(server)
    info = output_bytes(server) - first
    action()
    return output_bytes(server) - first - 2 * info


def index_of(server, prefix: str, cache_id: str) -> tuple[int, int]:
    """(JSON bytes of the index, artifact bytes) as Redis holds them."""
    import json

    raw = server.client().get(f"{prefix}:index:{cache_id}")
    return len(raw), json.loads(raw)["size"]


def test_what_a_node_reads_from_redis_is_what_the_model_counts(model_f32, redis_server, tmp_path: Path):
    prefix = f"traffic{tmp_path.name[-10:]}"
    url = f"{redis_server.url}?prefix={prefix}"
    writer = open_store(url)
    stored = core.precompute(model_f32, writer, sample_text("bsd-3-clause")[:1500], codec="kvmart").entry
    node = open_store(url, local_dir=tmp_path / "node")
    catalog = Catalog(node, model_f32.fingerprint.digest)
    catalog.refresh()  # the first look: a listing (not modelled), and the change-log script loaded
    catalog.refresh()
    json_bytes, size = index_of(redis_server, prefix, stored.cache_id)

    second = core.precompute(model_f32, writer, sample_text("mpl-2.0")[:1500], codec="kvmart").entry
    learnt = measure(redis_server, catalog.refresh)
    json_bytes, size = index_of(redis_server, prefix, second.cache_id)
    assert learnt == pytest.approx(traffic.discovery_bytes(json_bytes, size) + traffic.poll_bytes(2, 1)
                                   + traffic.change_bytes(2, second.cache_id), abs=4)
    assert measure(redis_server, catalog.refresh) == pytest.approx(traffic.poll_bytes(2), abs=4)

    document = catalog.documents()[0]
    _, chunk_key = document.chunks[0]

    def read_chunk() -> None:  # the planner's lookup, then the Loader's read (kept on the node's disk)
        assert node.entry(chunk_key) is not None
        with node.open(chunk_key):
            pass

    chunk_json, chunk_size = index_of(redis_server, prefix, chunk_key)
    assert measure(redis_server, read_chunk) == pytest.approx(traffic.chunk_read_bytes(chunk_json, chunk_size), abs=4)
    assert measure(redis_server, read_chunk) == 0  # now on the node's disk: nothing from Redis


def test_values_are_fetched_in_batches_of_chunk_bytes():
    assert traffic.values_bytes(10, chunk_bytes=4) == traffic.array_bytes(3) + 2 * traffic.bulk_bytes(4) + \
        traffic.bulk_bytes(2)
    assert traffic.bulk_bytes(123) == len(b"$123\r\n") + 123 + 2
    assert traffic.poll_bytes(31) == len(b"*1\r\n:31\r\n")


def test_publishing_a_document_costs_its_node_what_the_model_counts(model_f32, redis_server, tmp_path: Path):
    prefix = f"publish{tmp_path.name[-10:]}"
    node = open_store(f"{redis_server.url}?prefix={prefix}", local_dir=tmp_path / "node")
    assert node.entry("0" * 64) is None  # its connection made (a new one's handshake is not what is counted)
    made: list = []
    moved = measure(redis_server, lambda: made.append(
        core.precompute(model_f32, node, sample_text("bsd-3-clause")[:1500], codec="kvmart")))
    document = made[0].entry
    keys = core.chunk_keys_of(node, document.cache_id)
    sizes = [index_of(redis_server, prefix, key)[1] for key in keys]
    assert len(keys) == 2
    assert moved == pytest.approx(traffic.publish_bytes(sizes, index_of(redis_server, prefix, document.cache_id)[1]),
                                  abs=4)
