"""Transcoding an artifact keeps its identity, and a node keeps what it fetched encoded from a shared tier raw on its
own tiers: decoded once, mapped in place afterwards."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest

from kvmart.errors import ArtifactError, UnknownCacheError
from kvmart.format.artifact import encode_artifact, read_artifact, read_manifest
from kvmart.format.signing import SIGNING_KEY_ENV, cluster_key
from kvmart.format.signing import check as check_signature
from kvmart.format.transcode import transcode
from kvmart.reuse import core
from kvmart.reuse.samples import sample_text
from kvmart.store.base import Entry
from kvmart.store.disk import DiskStore
from kvmart.store.memory import MemoryStore
from kvmart.store.tiered import Tier, TieredStore

TEXT = sample_text("bsd-3-clause")


def artifact(model, codec: str) -> tuple:
    ids = model.tokenize(TEXT)
    kv = model.prefill(ids)
    encoded = encode_artifact(kv, ids, model.fingerprint, codec=codec)
    buffer = io.BytesIO()
    encoded.write(buffer)
    return kv, ids, encoded.manifest, buffer.getvalue()


def written(encoded) -> bytes:
    buffer = io.BytesIO()
    encoded.write(buffer)
    return buffer.getvalue()


def manifest_of(data: bytes):
    return read_manifest(io.BytesIO(data), len(data))[0]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_transcoding_keeps_the_artifacts_identity(load_tiny, dtype):
    model = load_tiny(dtype)
    kv, ids, manifest, data = artifact(model, "kvmart")
    assert {r.codec for r in manifest.tensors.values()} == {"kvmart"}
    raw = written(transcode(data, "raw"))
    kept = manifest_of(raw)
    assert {r.codec for r in kept.tensors.values()} == {"raw"}
    assert len(raw) == len(written(encode_artifact(kv, ids, model.fingerprint, codec="raw")))
    assert (kept.cache_id, kept.token_ids, kept.fingerprint, kept.codec) == (
        manifest.cache_id, manifest.token_ids, manifest.fingerprint, "kvmart")
    assert {n: r.checksum for n, r in kept.tensors.items()} == {n: r.checksum for n, r in manifest.tensors.items()}
    _, back = read_artifact(io.BytesIO(raw), len(raw), model.fingerprint)
    assert back.equal(kv)
    again = written(transcode(raw, "kvmart"))  # and back: the same stored bytes as a fresh encoding
    assert again == data


def test_transcoding_refuses_a_corrupt_tensor(model_bf16):
    _, _, _, data = artifact(model_bf16, "kvmart")
    damaged = bytearray(data)
    damaged[-100] ^= 0x01
    with pytest.raises(ArtifactError, match="does not match its checksum"):
        transcode(bytes(damaged), "raw")


def node(tmp_path: Path, shared: MemoryStore) -> TieredStore:
    return TieredStore([Tier("ram", MemoryStore(), 1 << 30), Tier("disk", DiskStore(tmp_path / "disk")),
                        Tier("shared", shared, is_shared=True)])


def publish(shared: MemoryStore, model, data: bytes, cache_id: str) -> None:
    """What another node's write-through leaves on the shared tier: the artifact as encoded."""
    shared.put(Entry(cache_id, "bsd", "", model.spec, model.fingerprint.digest, 100, len(data), 1.0, time.time()),
               lambda f: f.write(data))


def test_a_node_keeps_what_it_fetched_encoded_raw_on_its_own_tiers(model_bf16, tmp_path: Path):
    kv, _, manifest, data = artifact(model_bf16, "kvmart")
    shared = MemoryStore()
    publish(shared, model_bf16, data, manifest.cache_id)
    reader = node(tmp_path, shared)
    loaded = core.load(model_bf16, reader, manifest.cache_id)  # a miss on RAM and disk: fetched from the shared tier
    assert loaded.kv.equal(kv)
    assert [t.hits for t in reader.tiers] == [0, 0, 1] and [t.fills for t in reader.tiers] == [1, 1, 0]
    for tier in reader.tiers[:2]:  # RAM and disk hold it raw, under the same id, with the same checksums
        with tier.store.open(manifest.cache_id) as (f, size):
            local = f.read()
        kept = manifest_of(local)
        assert {r.codec for r in kept.tensors.values()} == {"raw"}
        assert kept.cache_id == manifest.cache_id
        assert {n: r.checksum for n, r in kept.tensors.items()} == {n: r.checksum for n, r in manifest.tensors.items()}
        assert tier.store.entry(manifest.cache_id).artifact_bytes == len(local) > len(data)
    with shared.open(manifest.cache_id) as (f, _):
        assert f.read() == data  # the shared tier keeps the encoded artifact
    disk_only = TieredStore([Tier("disk", DiskStore(tmp_path / "disk")), Tier("shared", shared, is_shared=True)])
    again = core.load(model_bf16, disk_only, manifest.cache_id)  # later loads: from the local disk, mapped raw
    assert again.kv.equal(kv) and [t.hits for t in disk_only.tiers] == [1, 0]


def test_the_publishing_node_keeps_its_own_copy_raw_and_the_shared_tier_the_encoded_one(model_bf16, tmp_path: Path):
    kv, _, manifest, data = artifact(model_bf16, "kvmart")
    shared = MemoryStore()
    publisher = node(tmp_path, shared)
    publisher.put(Entry(manifest.cache_id, "bsd", "", model_bf16.spec, model_bf16.fingerprint.digest, 100, len(data),
                        1.0, time.time()), lambda f: f.write(data))
    with shared.open(manifest.cache_id) as (f, _):
        assert f.read() == data  # the shared tier gets the encoded artifact, as written
    for tier in publisher.tiers[:2]:  # this node's RAM and disk: raw, the same id and checksums
        with tier.store.open(manifest.cache_id) as (f, _):
            local = f.read()
        kept = manifest_of(local)
        assert {r.codec for r in kept.tensors.values()} == {"raw"} and kept.cache_id == manifest.cache_id
        assert {n: r.checksum for n, r in kept.tensors.items()} == {n: r.checksum for n, r in manifest.tensors.items()}
        assert tier.store.entry(manifest.cache_id).artifact_bytes == len(local) > len(data)
    assert core.load(model_bf16, publisher, manifest.cache_id).kv.equal(kv)
    assert [t.hits for t in publisher.tiers] == [1, 0, 0]


def test_a_fetched_copy_is_signed_with_the_nodes_key(model_bf16, tmp_path: Path, monkeypatch):
    monkeypatch.setenv(SIGNING_KEY_ENV, "cluster secret")
    _, _, manifest, data = artifact(model_bf16, "kvmart")
    shared = MemoryStore()
    publish(shared, model_bf16, data, manifest.cache_id)
    reader = node(tmp_path, shared)
    core.load(model_bf16, reader, manifest.cache_id)
    with reader.tiers[1].store.open(manifest.cache_id) as (f, _):
        kept = manifest_of(f.read())
    assert kept.manifest_sha256 != manifest_of(data).manifest_sha256  # the stored bytes changed, so its hash did
    check_signature(cluster_key(), kept.manifest_sha256, kept.signature, kept.cache_id)  # and it is signed anew


def test_a_fetched_artifact_that_cannot_be_decoded_is_refused_not_filled_decoded(model_bf16, tmp_path: Path):
    _, _, manifest, data = artifact(model_bf16, "kvmart")
    damaged = bytearray(data)
    damaged[-100] ^= 0x01  # inside the last encoded tensor
    shared = MemoryStore()
    publish(shared, model_bf16, bytes(damaged), manifest.cache_id)
    reader = node(tmp_path, shared)
    with pytest.raises(ArtifactError, match="does not match its checksum"):
        core.load(model_bf16, reader, manifest.cache_id)
    # nothing decoded was kept anywhere: the refused artifact was dropped from every tier (kvmart/reuse/chunks.py),
    # so it is computed again rather than refused on every read
    for tier in reader.tiers:
        assert tier.store.entry(manifest.cache_id) is None, tier.name
    with pytest.raises(UnknownCacheError):
        core.load(model_bf16, reader, manifest.cache_id)
