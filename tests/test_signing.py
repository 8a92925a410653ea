"""Signed artifacts (kvmart/format/signing.py): with KVMART_SIGNING_KEY set, every artifact a node writes carries the
cluster's HMAC of its manifest hash beside the manifest; an artifact fetched from a shared tier (a real Redis
server, and moto's standalone S3-compatible server) without that signature, or with another key's, is refused
with ArtifactError and never used. With no key, unsigned artifacts are read as before."""

from __future__ import annotations

import dataclasses
import io
import json
import struct
import time
from pathlib import Path

import pytest
import torch
from infra_support import BUCKET, fake_aws_credentials, moto_s3, redis_server  # noqa: F401 (fixtures)

from kvmart.errors import ArtifactError, UnknownCacheError
from kvmart.format.artifact import encode_artifact, read_artifact, read_manifest
from kvmart.format.keys import cache_id as make_cache_id
from kvmart.format.signing import SIGNATURE_FIELD, sign
from kvmart.reuse import core
from kvmart.runtime.model import Model
from kvmart.store import Entry, Store, open_shared
from kvmart.store.disk import DiskStore
from kvmart.store.tiered import Tier, TieredStore

KEY = "the-cluster-signing-key"
TEXT = "Redistribution and use in source and binary forms, with or without modification, are permitted."
_counter = iter(range(10**6))


@pytest.fixture(params=["redis", "s3 (moto server)"])
def shared_url(request) -> str:
    """A fresh, empty namespace on a shared tier; open it with open_shared (each node opens its own client)."""
    prefix = f"sign{next(_counter)}"
    if request.param == "redis":
        return f"{request.getfixturevalue('redis_server').url}?prefix={prefix}&chunk_bytes=4096"
    return f"s3://{BUCKET}/{prefix}?endpoint={request.getfixturevalue('moto_s3').endpoint}"


def node(shared_url: str, disk: Path) -> TieredStore:
    """One node: its own disk in front of the cluster's shared tier."""
    return TieredStore([Tier("disk", DiskStore(disk)), Tier("shared", open_shared(shared_url), is_shared=True)])


def artifact_bytes(model: Model, kv, ids: list[int]) -> bytes:
    buffer = io.BytesIO()
    encode_artifact(kv, ids, model.fingerprint, codec="raw").write(buffer)
    return buffer.getvalue()


def metadata(data: bytes) -> dict:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n])["__metadata__"]


def plant(store: Store, model: Model, ids: list[int], data: bytes) -> str:
    """Write `data` as the artifact of `ids` straight into a store, as someone with access to it could."""
    cid = make_cache_id(model.fingerprint.digest, ids)
    store.put(Entry(cache_id=cid, title="planted", source="", model=model.spec, fingerprint=model.fingerprint.digest,
                    num_tokens=len(ids), artifact_bytes=len(data), prefill_seconds=1.0, created_at=time.time()),
              lambda f: f.write(data))
    return cid


def forged(model: Model, ids: list[int]) -> bytes:
    """A valid artifact claiming `ids`, consistent checksums and all, holding the KV of other tokens."""
    other = [(t + 1) % model.vocab_size for t in ids]
    return artifact_bytes(model, model.prefill(other), ids)


def test_signature_sits_beside_the_manifest_and_keeps_its_hash(model_f32, monkeypatch):
    ids = model_f32.tokenize(TEXT)
    kv = model_f32.prefill(ids)
    unsigned = artifact_bytes(model_f32, kv, ids)
    monkeypatch.setenv("KVMART_SIGNING_KEY", KEY)
    signed = artifact_bytes(model_f32, kv, ids)
    assert SIGNATURE_FIELD not in metadata(unsigned)
    assert metadata(signed)["kvmart"] == metadata(unsigned)["kvmart"]  # the manifest, its hash included, unchanged
    manifest, _ = read_manifest(io.BytesIO(signed), len(signed))
    assert manifest.signature == metadata(signed)[SIGNATURE_FIELD] == sign(KEY.encode(), manifest.cache_id,
                                                                             manifest.manifest_sha256)
    assert manifest.manifest_sha256 == json.loads(metadata(unsigned)["kvmart"])["manifest_sha256"]
    _, back = read_artifact(io.BytesIO(signed), len(signed), model_f32.fingerprint)
    assert all(torch.equal(a, b) for a, b in zip(back.tensors().values(), kv.tensors().values(), strict=True))


def test_signed_artifact_round_trips_between_nodes(model_f32, shared_url, tmp_path, monkeypatch):
    monkeypatch.setenv("KVMART_SIGNING_KEY", KEY)
    ids = model_f32.tokenize(TEXT)
    made = core.precompute_ids(model_f32, node(shared_url, tmp_path / "a"), ids, codec="kvmart")
    other = node(shared_url, tmp_path / "b")  # an empty disk: the artifact comes from the shared tier
    loaded = core.load(model_f32, other, made.entry.cache_id)
    assert other.tiers[1].hits == 1  # its one chunk (the document's index is read from its head: not a hit)
    expected = model_f32.prefill(ids)
    assert all(torch.equal(a, b) for a, b in zip(loaded.kv.tensors().values(), expected.tensors().values(), strict=True))


@pytest.mark.parametrize("writer_key, message", [(None, "not signed by this cluster's key"),
                                                 ("another-key", "signature does not match")])
def test_forged_artifact_in_the_shared_tier_is_refused(model_f32, shared_url, tmp_path, monkeypatch, writer_key,
                                                       message):
    ids = model_f32.tokenize(TEXT)
    if writer_key:
        monkeypatch.setenv("KVMART_SIGNING_KEY", writer_key)
    cid = plant(open_shared(shared_url), model_f32, ids, forged(model_f32, ids))
    monkeypatch.setenv("KVMART_SIGNING_KEY", KEY)
    for store in (node(shared_url, tmp_path / "node"), open_shared(shared_url)):
        with pytest.raises(ArtifactError, match=message):
            core.load(model_f32, store, cid)
        with pytest.raises(ArtifactError, match=message), store.open_head(cid):  # nor is its header trusted
            pass
    assert DiskStore(tmp_path / "node").entry(cid) is None  # nor copied to the node's disk


def test_without_a_key_unsigned_artifacts_are_read_and_the_key_is_what_refuses_them(model_f32, shared_url, tmp_path,
                                                                                     monkeypatch):
    """The forged artifact is a valid one: without a key a node reads it (and would serve the wrong KV), so only
    the signature check stands between it and an answer."""
    ids = model_f32.tokenize(TEXT)
    data = forged(model_f32, ids)
    cid = plant(open_shared(shared_url), model_f32, ids, data)
    loaded = core.load(model_f32, node(shared_url, tmp_path / "a"), cid)
    _, planted = read_artifact(io.BytesIO(data), len(data), model_f32.fingerprint)
    assert all(torch.equal(a, b) for a, b in zip(loaded.kv.tensors().values(), planted.tensors().values(), strict=True))
    monkeypatch.setenv("KVMART_SIGNING_KEY", KEY)
    with pytest.raises(ArtifactError, match="not signed by this cluster's key"):
        core.load(model_f32, node(shared_url, tmp_path / "b"), cid)


def test_local_disk_artifacts_are_not_checked(model_f32, tmp_path, monkeypatch):
    """The node's own disk is written only by the node: an artifact it stored before the key was set still loads."""
    ids = model_f32.tokenize(TEXT)
    store = DiskStore(tmp_path / "disk")
    made = core.precompute_ids(model_f32, store, ids)
    monkeypatch.setenv("KVMART_SIGNING_KEY", KEY)
    loaded = core.load(model_f32, store, made.entry.cache_id)
    assert loaded.kv.num_tokens == len(ids)


def test_the_pipeline_recomputes_a_chunk_whose_shared_artifact_is_forged(model_f32, kvmart_data_dir, redis_server,
                                                                          tmp_path, monkeypatch):
    """A node that lost its own copy of a document's chunk finds a forgery in the shared tier: it is refused, the
    chunk recomputed from its token ids (the same KV a fresh prefill gives, bit for bit), the answer what a
    from-scratch run gives, and the node's store gets the genuine chunk back."""
    from kvmart.config import Settings
    from kvmart.reuse.prompt import ChatMessage, ChatPrompt
    from kvmart.runtime.chat import document_ids, layout_for
    from kvmart.server.config import ServerSettings
    from kvmart.server.pipeline.engine import Computed, PublishJob
    from kvmart.server.pipeline.plan import Caller, GenerationRequest, Sampling
    from kvmart.server.pipeline.services import build_services

    url = f"{redis_server.url}?prefix=sign{next(_counter)}"
    monkeypatch.setenv("KVMART_SIGNING_KEY", KEY)
    store = node(url, tmp_path / "node")
    services = build_services(Settings(data_dir=kvmart_data_dir, model=model_f32.spec),
                              ServerSettings(ram_cache_bytes=0), model_f32, store=store)
    ids = document_ids(model_f32.tokenize, layout_for(model_f32.tokenizer), TEXT)
    (published,) = services.engine.publish(PublishJob(ids, "doc", ""), "raw")
    doc = services.engine.register(published)
    ((n, key),) = doc.chunks
    for tier in store.tiers:
        tier.store.delete(key)
    monkeypatch.delenv("KVMART_SIGNING_KEY")
    forgery = io.BytesIO()
    encode_artifact(model_f32.prefill([(t + 1) % model_f32.vocab_size for t in ids]), ids, model_f32.fingerprint,
                    codec="raw", cache_id=key).write(forgery)
    open_shared(url).put(Entry(cache_id=key, title="forged", source="", model="", fingerprint=model_f32.fingerprint.digest,
                               num_tokens=n, artifact_bytes=0, prefill_seconds=0.0, created_at=time.time(),
                               kind="chunk"), lambda f: f.write(forgery.getvalue()))
    monkeypatch.setenv("KVMART_SIGNING_KEY", KEY)
    request = GenerationRequest(ChatPrompt((ChatMessage("user", "Q?"),), (doc.id,)), Sampling(max_tokens=4,
                                                                                              temperature=0.0))

    def answer(bypass: bool) -> list:
        plan = services.planner.plan(dataclasses.replace(request, bypass=bypass), Caller(None, None, "s"))
        loaded = services.loader.load(plan)
        return [loaded.num_tokens] + [e for e in services.engine.execute(plan, loaded) if not isinstance(e, Computed)]

    cached, fresh = answer(False), answer(True)
    assert cached[0] == 0 and cached[1:] == fresh[1:]  # the forged chunk was refused, not read
    services.engine.close()
    stored = core.load(model_f32, DiskStore(tmp_path / "node"), doc.cache_id)
    assert stored.kv.equal(model_f32.prefill(ids))


# -- the signature binds an artifact to its cache id and entry; a loader checks the id it asked for ----------------
OTHER_TEXT = "Permission is hereby granted, free of charge, to any person obtaining a copy of this software."


def copy_under(shared_url: str, source: str, target: str, rewrite_entry: bool, sign_with: str | None = None) -> None:
    """Copy the shared tier's artifact `source` (its index and stored bytes) under the id `target`, as someone with
    write access to Redis or S3 could: the index as it is, or with its entry (and S3 object name) rewritten to say
    `target`; `sign_with`: re-sign the rewritten index with this key (what only a holder of the key could do)."""
    from urllib.parse import parse_qsl, urlsplit

    from kvmart.format.signing import sign_index

    parts = urlsplit(shared_url)
    options = dict(parse_qsl(parts.query))
    if parts.scheme == "redis":
        import redis

        client = redis.Redis(host=parts.hostname, port=parts.port)
        prefix = options["prefix"]
        index = json.loads(client.get(f"{prefix}:index:{source}"))
        for i in range(len(index["chunks"])):
            client.set(f"{prefix}:chunk:{target}:{index['nonce']}:{i}",
                       client.get(f"{prefix}:chunk:{source}:{index['nonce']}:{i}"))
        client.sadd(f"{prefix}:catalog", target)
        put_index = lambda body: client.set(f"{prefix}:index:{target}", body)  # noqa: E731
    else:
        import boto3

        client = boto3.client("s3", endpoint_url=options["endpoint"], region_name="us-east-1")
        prefix = parts.path.strip("/")
        index = json.loads(client.get_object(Bucket=BUCKET, Key=f"{prefix}/entries/{source}.json")["Body"].read())
        if rewrite_entry:
            moved = index["object"].replace(source, target)
            client.copy_object(Bucket=BUCKET, Key=moved, CopySource={"Bucket": BUCKET, "Key": index["object"]})
            index["object"] = moved
        put_index = lambda body: client.put_object(Bucket=BUCKET, Key=f"{prefix}/entries/{target}.json",  # noqa: E731
                                                   Body=body)
    if rewrite_entry:
        index["entry"]["cache_id"] = target
        index.pop("signature", None)
        if sign_with:
            index["signature"] = sign_index(sign_with.encode(), target, index)
    put_index(json.dumps(index).encode())


@pytest.mark.parametrize("rewrite_entry, sign_with", [(False, None), (True, None), (True, KEY)],
                         ids=["index copied as it is", "entry rewritten", "entry rewritten and index re-signed"])
def test_an_artifact_copied_under_another_documents_id_is_refused(model_f32, shared_url, tmp_path, monkeypatch,
                                                                   rewrite_entry, sign_with):
    """Document X's correctly signed artifact and index copied under document Y's id: a fresh node never serves Y
    from X's tokens and KV. An index copied as it is names X (refused as another id's, dropped); one rewritten to
    name Y fails its signature (it names the id); one re-signed for Y (as only a key holder could) still carries
    X's artifact, whose header signature names X and whose manifest is X's: refused."""
    monkeypatch.setenv("KVMART_SIGNING_KEY", KEY)
    writer = node(shared_url, tmp_path / "a")
    x = core.precompute_ids(model_f32, writer, model_f32.tokenize(TEXT), codec="raw").entry.cache_id
    y_ids = model_f32.tokenize(OTHER_TEXT)
    y = core.precompute_ids(model_f32, writer, y_ids, codec="raw").entry.cache_id
    copy_under(shared_url, x, y, rewrite_entry, sign_with)
    fresh = node(shared_url, tmp_path / "b")
    with pytest.raises((ArtifactError, UnknownCacheError)):
        core.load(model_f32, fresh, y)
    assert DiskStore(tmp_path / "b").entry(y) is None  # nothing of it reached the node's disk
    if sign_with is None:  # nor is its entry believed (a key holder's index is, but not the artifact behind it)
        assert fresh.entry(y) is None and y not in [e.cache_id for e in fresh.entries()]


def test_without_a_key_the_loader_still_refuses_another_ids_artifact(model_f32, shared_url, tmp_path):
    """No signing key: whoever writes the shared tier can forge anything, but an honest copy under the wrong id
    (an operator's mistake, a bad migration) is still caught: the loader checks the id it asked for."""
    writer = node(shared_url, tmp_path / "a")
    x = core.precompute_ids(model_f32, writer, model_f32.tokenize(TEXT), codec="raw").entry.cache_id
    y = core.precompute_ids(model_f32, writer, model_f32.tokenize(OTHER_TEXT), codec="raw").entry.cache_id
    copy_under(shared_url, x, y, rewrite_entry=True)
    with pytest.raises(ArtifactError, match="returned artifact .* for cache id"):
        core.load(model_f32, node(shared_url, tmp_path / "b"), y)


def test_an_index_signed_but_an_unsigned_artifact_is_still_refused(model_f32, shared_url, tmp_path, monkeypatch):
    """Both statements are checked: an artifact written without the key behind an index signed with it (a node that
    lost its key mid-write, or a chunk swapped) is refused by its header's missing signature."""
    ids = model_f32.tokenize(TEXT)
    data = forged(model_f32, ids)  # made with no key: its header is unsigned
    monkeypatch.setenv("KVMART_SIGNING_KEY", KEY)
    cid = plant(open_shared(shared_url), model_f32, ids, data)  # the index is signed (the key is set now)
    with pytest.raises(ArtifactError, match=r"artifact \w+ is not signed by this cluster's key"):
        core.load(model_f32, node(shared_url, tmp_path / "node"), cid)


@pytest.mark.parametrize("with_key", [True, False], ids=["signing key", "no key"])
def test_a_chunk_copied_under_another_chunks_key_is_refused(model_f32, shared_url, tmp_path, monkeypatch, with_key):
    """Format 3 stores a document as chunks under their chained keys: document X's chunk, correctly signed, copied
    under the key of document Y's chunk (its index entry rewritten and, with a key, re-signed by a key holder) is
    refused by a fresh node: its header's signature names X's key, and the reader derives Y's key from Y's tokens
    and finds another in the manifest. Never served as Y's KV."""
    if with_key:
        monkeypatch.setenv("KVMART_SIGNING_KEY", KEY)
    writer = node(shared_url, tmp_path / "a")
    x = core.precompute_ids(model_f32, writer, model_f32.tokenize(TEXT), codec="raw").entry.cache_id
    y = core.precompute_ids(model_f32, writer, model_f32.tokenize(OTHER_TEXT), codec="raw").entry.cache_id
    (x_chunk,) = core.chunk_keys_of(writer, x)
    (y_chunk,) = core.chunk_keys_of(writer, y)
    assert x_chunk not in (x, y) and y_chunk not in (x, y)
    copy_under(shared_url, x_chunk, y_chunk, rewrite_entry=True, sign_with=KEY if with_key else None)
    fresh = node(shared_url, tmp_path / "b")
    with pytest.raises(ArtifactError, match="returned artifact|does not match"):
        core.load(model_f32, fresh, y)
    assert DiskStore(tmp_path / "b").entry(y_chunk) is None  # refused, and dropped: it will be computed again
