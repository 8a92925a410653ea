"""The format's test vectors (tests/vectors/, made by generate.py from builtin:tiny) read by the independent reader
written from docs/FORMAT.md (tests/vectors/reader.py, which imports nothing of kvmart) and by kvmart itself: both
recompute the cache id, manifest hash, fingerprint digest and chunk keys, and decode every tensor bit for bit."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmart.canonical import canonical, spaced
from kvmart.codec.raw import byte_view
from kvmart.errors import ArtifactError
from kvmart.format.artifact import read_artifact
from kvmart.format.keys import cache_id, chunk_keys
from kvmart.runtime.fingerprint import ModelFingerprint

VECTORS = Path(__file__).parent / "vectors"
CASES = sorted(p.stem for p in VECTORS.glob("*.json") if p.name != "model.json" and not p.name.startswith("chain."))


def load_reader():
    spec = importlib.util.spec_from_file_location("kvmart_vector_reader", VECTORS / "reader.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


reader = load_reader()


def expected_of(case: str) -> dict:
    return json.loads((VECTORS / f"{case}.json").read_text())


def test_the_vectors_cover_raw_and_zstd_in_both_dtypes_salted_and_not():
    found = {(e["dtype"], bool(e["salt"]), codec) for e in map(expected_of, CASES) for codec in e["codecs"].values()}
    assert {("float32", False, "raw"), ("float32", False, "zstd"), ("bfloat16", True, "raw"),
            ("bfloat16", True, "zstd")} <= found


@pytest.mark.parametrize("case", CASES)
def test_the_independent_reader_decodes_every_vector_bit_exactly(case):
    expected = expected_of(case)
    artifact = reader.read(VECTORS / expected["artifact"], expected["salt"])
    manifest = artifact.manifest
    assert manifest["cache_id"] == expected["cache_id"] == reader.cache_id(
        manifest["fingerprint_digest"], expected["token_ids"], expected["salt"])
    assert manifest["manifest_sha256"] == expected["manifest_sha256"]
    assert reader.chunk_keys(manifest["fingerprint_digest"], expected["token_ids"], expected["chunk_tokens"],
                             expected["salt"]) == expected["chunk_keys"] and expected["chunk_keys"]
    decoded = b"".join(t.tobytes() for t in artifact.tensors.values())
    assert decoded == (VECTORS / expected["tensors"]).read_bytes()
    assert hashlib.sha256(decoded).hexdigest() == expected["tensors_sha256"]
    assert artifact.checksums_checked  # xxhash is installed with kvmart: the reader checked every checksum too
    with pytest.raises(reader.FormatError, match="cache id"):
        reader.read(VECTORS / expected["artifact"], expected["salt"] + "x")


@pytest.mark.parametrize("case", CASES)
def test_kvmart_reads_every_vector_and_agrees(case):
    expected = expected_of(case)
    data = (VECTORS / expected["artifact"]).read_bytes()
    recorded = reader.read(VECTORS / expected["artifact"], expected["salt"]).manifest["fingerprint"]
    fingerprint = ModelFingerprint(**recorded)
    manifest, kv = read_artifact(io.BytesIO(data), len(data), fingerprint, expected["salt"])
    assert manifest.cache_id == cache_id(fingerprint.digest, expected["token_ids"], expected["salt"])
    assert chunk_keys(fingerprint.digest, expected["token_ids"], expected["chunk_tokens"], expected["salt"]) == \
        expected["chunk_keys"]
    assert b"".join(bytes(byte_view(t.contiguous())) for t in kv.tensors().values()) == \
        (VECTORS / expected["tensors"]).read_bytes()


def test_the_model_fingerprint_is_recomputed_from_the_spec():
    model = json.loads((VECTORS / "model.json").read_text())
    components = {"config": reader.config_component(model["config_json"]),
                  "weights": reader.files_component(model["weight_files"]),
                  "tokenizer": reader.files_component(model["tokenizer_files"]),
                  "dtype": model["dtype"], "attention": model["attention"]}
    assert components == model["components"] and reader.fingerprint_digest(components) == model["digest"]


def test_a_flipped_manifest_byte_is_refused_by_the_reader(tmp_path):
    expected = expected_of(CASES[0])
    data = bytearray((VECTORS / expected["artifact"]).read_bytes())
    at = data.index(b'head_dim\\": ') + len(b'head_dim\\": ')
    data[at] = ord("9") if data[at] != ord("9") else ord("8")
    (tmp_path / "bad.kvm").write_bytes(bytes(data))
    with pytest.raises(reader.FormatError, match="manifest hash"):
        reader.read(tmp_path / "bad.kvm", expected["salt"])


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.text(max_size=8)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_the_spec_of_the_spaced_form_is_what_kvmart_writes(value):
    assert reader.spaced(value) == spaced(value)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 2**31), max_size=20))
def test_the_spec_of_the_canonical_int_list_is_what_kvmart_writes(ids):
    assert reader.canonical_int_list(ids) == canonical(ids)


def test_floats_are_written_as_the_spec_says():
    for value, text in ((1e-06, "1e-06"), (10000.0, "10000.0"), (0.0001, "0.0001"), (1e16, "1e+16"),
                        (123.456, "123.456"), (-2.5e-07, "-2.5e-07"), (-0.0, "-0.0"), (1e15, "1000000000000000.0"),
                        (math.pi, "3.141592653589793")):
        assert reader.spaced_float(value) == text == json.dumps(value)
    assert np.dtype("<u2") == reader.NUMPY_DTYPES["bfloat16"]


def test_the_independent_reader_follows_a_documents_chunk_chain():
    """A document stored as a chunk chain (docs/FORMAT.md "What is stored"): the reader checks the index (its cache id,
    and its chunk keys chained over its token ids), then each chunk under the key it derived, and kvmart's own
    loader gives the same tensors, bit for bit."""
    expected = json.loads((VECTORS / "chain.chain.json").read_text())
    index = reader.read(VECTORS / expected["index"], expected["salt"])
    assert index.manifest["cache_id"] == expected["cache_id"] and index.tensors == {}
    assert [k for _, k in index.manifest["chunks"]] == [c["key"] for c in expected["chunks"]]
    assert len(expected["chunks"]) == 2 and [len(c["token_ids"]) for c in expected["chunks"]] == [8, 3]
    for chunk in expected["chunks"]:
        read = reader.read(VECTORS / chunk["artifact"], expected["salt"], expected_key=chunk["key"])
        assert read.manifest["token_ids"] == chunk["token_ids"] and len(read.tensors) == 2 * read.manifest["num_layers"]
        with pytest.raises(reader.FormatError, match="key its reader derived"):
            reader.read(VECTORS / chunk["artifact"], expected["salt"], expected_key="0" * 64)


def test_the_signatures_are_what_the_spec_says_and_bind_each_artifact_to_its_id(monkeypatch):
    """docs/FORMAT.md "Hash inputs": the independent reader computes the signature of the chain's index and of each
    chunk (each under its own id: the document's cache id, the chunk's key) and of a shared tier's index exactly as
    kvmart writes them with the key set; and a signature made for one of them never verifies for another id."""
    from kvmart.canonical import compact
    from kvmart.format.signing import SIGNATURE_FIELD, check, sign, sign_index
    from kvmart.format.transcode import transcode

    expected = json.loads((VECTORS / "chain.signatures.json").read_text())
    key = expected["key"]
    artifacts = expected["artifacts"]
    assert [a["artifact"] for a in artifacts] == ["chain.index.kvm", "chain.chunk-0.kvm", "chain.chunk-1.kvm"]
    monkeypatch.setenv("KVMART_SIGNING_KEY", key)
    for a in artifacts:
        data = (VECTORS / a["artifact"]).read_bytes()
        read = reader.read(VECTORS / a["artifact"], "", expected_key=None if a["artifact"] == "chain.index.kvm"
                           else a["cache_id"]).manifest
        assert (read["cache_id"], read["manifest_sha256"]) == (a["cache_id"], a["manifest_sha256"])
        assert reader.artifact_signature(key, a["cache_id"], a["manifest_sha256"]) == a["signature"] == \
            sign(key.encode(), a["cache_id"], a["manifest_sha256"])
        rewritten = io.BytesIO()
        transcode(data, "raw").write(rewritten)  # kvmart re-writes the header, signing it with the key now set
        (n,) = np.frombuffer(rewritten.getvalue()[:8], "<u8")
        assert json.loads(rewritten.getvalue()[8:8 + int(n)])["__metadata__"][SIGNATURE_FIELD] == a["signature"]
        for other in artifacts:
            if other is not a:  # signed for one id, refused for any other
                with pytest.raises(ArtifactError, match="signature does not match"):
                    check(key.encode(), a["manifest_sha256"], a["signature"], other["cache_id"])
    shared = expected["shared_index"]
    assert reader.compact(shared["index"]) == compact(shared["index"])
    assert reader.index_signature(key, shared["stored_id"], shared["index"]) == shared["signature"] == \
        sign_index(key.encode(), shared["stored_id"], shared["index"])
    assert reader.index_signature(key, artifacts[1]["cache_id"], shared["index"]) != shared["signature"]
