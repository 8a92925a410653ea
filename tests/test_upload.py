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
        live.services.ledger.allow_uploads("publisher")  # one strike (test below): the operator lets it try again
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


def test_the_default_sample_is_the_fewest_chunks_that_meet_the_stated_bound():
    import itertools
    import math

    from kvmart.reuse.upload import ESCAPE_BOUND, FORGED_SHARE, checks_for_bound, escape_probability, plan

    for others in (1, 5, 10):  # a short document: the bound needs every chunk
        assert checks_for_bound(others) == others and plan(others + 1, None).forgery_escape == 0
    for others in (11, 40, 100, 1000, 10_000):
        m, forged = checks_for_bound(others), max(1, math.ceil(FORGED_SHARE * others))
        assert escape_probability(others, forged, m) <= ESCAPE_BOUND < escape_probability(others, forged, m - 1)
    assert checks_for_bound(100) < 100 and checks_for_bound(10_000) < 80  # tends to ln(1000)/0.1, about 69
    # the formula is the hypergeometric: counted by brute force over every sample of a small case
    samples = list(itertools.combinations(range(9), 4))
    escaped = sum(not {0, 1} & set(s) for s in samples)
    assert math.isclose(escape_probability(9, 2, 4), escaped / len(samples))
    shown = plan(41, None).as_json()
    assert shown["rule"] == "bound" and shown["checked_chunks"] == 1 + checks_for_bound(40)
    assert shown["forgery_escape"] <= shown["escape_bound"] == ESCAPE_BOUND
    assert shown["single_chunk_escape"] == (40 - checks_for_bound(40)) / 40
    assert plan(41, 25).checked_chunks == 11 and plan(41, 100).checked_chunks == 41


def test_the_bound_draws_its_count_and_always_checks_chunk_0(model_f32):
    from kvmart.reuse.upload import plan

    ids = ids_of(model_f32, BSD)
    chunk = 16  # short chunks: enough of them that the bound leaves one unchecked
    verified = verify_upload(model_f32, compute_upload(model_f32, ids, chunk), ids, chunk, percent=None,
                             rng=random.Random(3))
    expected = plan(verified.chunks, None)
    assert verified.chunks > 12 and len(verified.checked) == expected.checked_chunks < verified.chunks
    assert verified.checked[0] == 0 and verified.plan == expected
    with pytest.raises(ArtifactRejectedError, match="chunk 0 .* differs"):
        poisoned_ids = ids_of(model_f32, MIT_LIKE)[:len(ids)]
        kv = upload_prefill(model_f32, poisoned_ids, chunk)
        verify_upload(model_f32, artifact_bytes(model_f32, kv, ids), ids, chunk, percent=None)


def test_an_uploaded_document_records_its_check_and_a_forger_gets_one_strike(live, model_f32):
    ids = ids_of(model_f32, BSD)
    accepted = upload(live, BSD, compute_upload(model_f32, ids, CHUNK))
    assert accepted.status_code == 201, accepted.text
    check = live.http.get(f"/v1/documents/{accepted.json()['id']}").json()["upload_check"]
    assert check["rule"] == "bound" and check["chunk_tokens"] == CHUNK and check["escape_bound"] == 0.001
    assert check["chunks"] == check["checked_chunks"] == -(-len(ids) // CHUNK)  # short: every chunk checked
    assert live.publish("Computed, not uploaded.\n\n" + BSD).json()["upload_check"] is None
    forger = live.account("forger", "publisher")
    forged = "Forged.\n\n" + BSD
    assert upload(live, forged, poisoned(model_f32, forged, MIT_LIKE), key=forger).status_code == 422
    honest = compute_upload(model_f32, ids_of(model_f32, "Honest now.\n\n" + BSD), CHUNK)
    barred = upload(live, "Honest now.\n\n" + BSD, honest, key=forger)
    assert barred.status_code == 403 and "allow-uploads" in barred.json()["error"]["message"]
    assert live.publish("Honest now.\n\n" + BSD, key=forger).status_code == 201  # the text: the provider computes
    assert live.services.ledger.allow_uploads("forger") == 1
    again = upload(live, "Honest again.\n\n" + BSD, compute_upload(
        model_f32, ids_of(model_f32, "Honest again.\n\n" + BSD), CHUNK), key=forger)
    assert again.status_code == 201, again.text
