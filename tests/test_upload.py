"""Uploaded artifacts (kvmart/reuse/upload.py, POST /v1/documents with `artifact`): accepted only when the provider's
recomputation of their chunks is bit-identical (torch.equal); a poisoned artifact (the KV of another text under
this text's token ids, valid checksums and cache id) is refused with 422, nothing stored, nothing charged."""

from __future__ import annotations

import base64
import io
import random

import pytest
import torch
from server_support import LiveServer

from kvmart.errors import ArtifactRejectedError
from kvmart.format.artifact import manifest_for, write_artifact
from kvmart.reuse import core
from kvmart.reuse.samples import sample_text
from kvmart.reuse.upload import compute_upload, sample_chunks, upload_prefill, verify_upload
from kvmart.runtime.chat import document_ids, layout_for
from kvmart.runtime.kv import KV

BSD = sample_text("bsd-3-clause")
MIT_LIKE = sample_text("apache-2.0")
CHUNK = 64


def ids_of(model, text: str) -> list[int]:
    return document_ids(model.tokenize, layout_for(model.tokenizer), text)


def artifact_bytes(model, kv: KV, ids: list[int]) -> bytes:
    buffer = io.BytesIO()
    write_artifact(buffer, manifest_for(kv, ids, model.fingerprint), kv)
    return buffer.getvalue()


def poisoned(model, text: str, other: str) -> bytes:
    """The KV of `other` (cut to `text`'s length) under `text`'s token ids: every check but recomputation passes."""
    ids, other_ids = ids_of(model, text), ids_of(model, other)
    assert len(other_ids) >= len(ids)
    kv = upload_prefill(model, other_ids[:len(ids)], CHUNK)
    return artifact_bytes(model, kv, ids)


def tampered_last_chunk(model, text: str) -> bytes:
    ids = ids_of(model, text)
    kv = upload_prefill(model, ids, CHUNK)
    keys = list(kv.keys)
    keys[-1] = keys[-1].clone()
    keys[-1][:, :, -1] += 1.0  # one position of one layer of the last chunk
    return artifact_bytes(model, KV(tuple(keys), kv.values), ids)


def test_an_honest_upload_verifies_every_chunk(model_f32):
    ids = ids_of(model_f32, BSD)
    verified = verify_upload(model_f32, compute_upload(model_f32, ids, CHUNK), ids, CHUNK)
    assert verified.chunks == -(-len(ids) // CHUNK) > 2 and verified.checked == tuple(range(verified.chunks))
    whole = KV.concat(list(verified.pieces))
    assert all(torch.equal(a, b) for a, b in zip(whole.keys, upload_prefill(model_f32, ids, CHUNK).keys, strict=True))


@pytest.mark.parametrize("model_name", ["model_f32", "model_bf16"])
def test_a_poisoned_artifact_is_refused_even_when_only_a_sample_is_checked(model_name, request):
    model = request.getfixturevalue(model_name)
    ids = ids_of(model, BSD)
    with pytest.raises(ArtifactRejectedError, match="chunk 0 .* differs when recomputed"):
        verify_upload(model, poisoned(model, BSD, MIT_LIKE), ids, CHUNK, percent=1)


def test_one_tampered_chunk_is_caught_when_checked(model_f32):
    ids = ids_of(model_f32, BSD)
    last = -(-len(ids) // CHUNK) - 1
    with pytest.raises(ArtifactRejectedError, match=f"chunk {last} "):
        verify_upload(model_f32, tampered_last_chunk(model_f32, BSD), ids, CHUNK, percent=100)


def test_other_tokens_other_weights_and_corrupt_files_are_refused(model_f32, model_bf16):
    ids = ids_of(model_f32, BSD)
    other = compute_upload(model_f32, ids_of(model_f32, MIT_LIKE), CHUNK)
    with pytest.raises(ArtifactRejectedError, match="other tokens than this document"):
        verify_upload(model_f32, other, ids, CHUNK)
    with pytest.raises(ArtifactRejectedError, match="different model"):
        verify_upload(model_f32, compute_upload(model_bf16, ids, CHUNK), ids, CHUNK)
    honest = bytearray(compute_upload(model_f32, ids, CHUNK))
    honest[-5] ^= 0x01
    with pytest.raises(ArtifactRejectedError, match="checksum"):
        verify_upload(model_f32, bytes(honest), ids, CHUNK)
    with pytest.raises(ArtifactRejectedError, match="truncated"):
        verify_upload(model_f32, bytes(honest[:100]), ids, CHUNK)


def test_the_sample_always_holds_chunk_0_and_the_asked_share():
    rng = random.Random(7)
    assert sample_chunks(1, 1, rng) == [0]
    assert sample_chunks(10, 100, rng) == list(range(10))
    drawn = sample_chunks(101, 10, rng)
    assert drawn[0] == 0 and len(drawn) == 11 and drawn == sorted(set(drawn))


@pytest.fixture
def live(model_f32, tmp_path):
    with LiveServer(model_f32, tmp_path / "data", chunk_tokens=CHUNK) as server:
        yield server


def upload(live, text: str, data: bytes, **fields):
    return live.publish(text, artifact=base64.b64encode(data).decode(), **fields)


def test_a_poisoned_upload_is_422_nothing_stored_nothing_charged(live, model_f32):
    before = live.services.ledger.usage(live.services.ledger.account("publisher")).balance_nanousd
    for data in (poisoned(model_f32, BSD, MIT_LIKE), tampered_last_chunk(model_f32, BSD)):
        refused = upload(live, BSD, data)
        assert refused.status_code == 422, refused.text
        error = refused.json()["error"]
        assert error["code"] == "artifact_rejected" and "differs when recomputed" in error["message"]
    assert live.services.store.entries() == [] and live.http.get("/v1/documents").json()["data"] == []
    assert live.services.ledger.usage(live.services.ledger.account("publisher")).balance_nanousd == before
    assert live.metrics()['kvmart_documents_published_total{outcome="refused"}'] == 2
    assert upload(live, BSD, b"not an artifact").status_code == 422
    assert live.publish(BSD, artifact="***").status_code == 400


def test_an_honest_upload_is_stored_charged_and_answers_from_its_kv(live, model_f32):
    ids = ids_of(model_f32, BSD)
    accepted = upload(live, BSD, compute_upload(model_f32, ids, CHUNK), title="bsd")
    assert accepted.status_code == 201, accepted.text
    doc = accepted.json()
    assert doc["computed"] is True and doc["num_tokens"] == len(ids) and float(doc["precompute_charge_usd"]) > 0
    loaded = core.load(model_f32, live.services.store, doc["cache_id"])
    reference = upload_prefill(model_f32, ids, CHUNK)
    assert all(torch.equal(a, b) for a, b in zip(loaded.kv.keys + loaded.kv.values,
                                                 reference.keys + reference.values, strict=True))
    assert live.metrics()['kvmart_documents_published_total{outcome="uploaded"}'] == 1
    private = upload(live, BSD, compute_upload(model_f32, ids, CHUNK), licence="private")
    assert private.status_code == 201 and private.json()["cache_id"] != doc["cache_id"]  # the tenant's salt
    again = upload(live, BSD, poisoned(model_f32, BSD, MIT_LIKE))  # already stored: the upload is never used
    assert again.status_code == 200 and again.json()["computed"] is False
