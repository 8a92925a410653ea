"""Fuzzing, bounded: random mutations and truncations of an artifact never get past the reader (ArtifactError, or
the very same KV; never another exception, never other numbers), and hypothesis-generated request bodies for
every POST endpoint never make the server answer 500."""

from __future__ import annotations

import io
import json

import pytest
import torch
from artifact_support import join, split
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_support import LiveServer

from kvmart.errors import ArtifactError
from kvmart.format.artifact import manifest_for, read_artifact, write_artifact

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
HTTP_FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.fixture(scope="module")
def artifact(model_f32) -> tuple[bytes, object]:
    ids = model_f32.tokenize("A small document to fuzz the artifact reader with.")
    kv = model_f32.prefill(ids)
    buffer = io.BytesIO()
    write_artifact(buffer, manifest_for(kv, ids, model_f32.fingerprint), kv)
    return buffer.getvalue(), kv


def read(model, data: bytes):
    return read_artifact(io.BytesIO(data), len(data), model.fingerprint)


def check_refused_or_identical(model, data: bytes, kv) -> None:
    try:
        _, got = read(model, data)
    except ArtifactError:
        return
    assert all(torch.equal(a, b) for a, b in zip(got.keys + got.values, kv.keys + kv.values, strict=True)), \
        "a mutated artifact was read as other numbers"


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**9), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10**9), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10**9), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, 10**9), st.integers(1, 64)),
)


def mutate(data: bytes, steps: list[tuple[str, int, int]]) -> bytes:
    out = bytearray(data)
    for kind, position, value in steps:
        at = position % max(1, len(out))
        if kind == "flip" and out:
            out[at] ^= value
        elif kind == "truncate":
            del out[at:]
        elif kind == "insert":
            out.insert(at, value)
        elif kind == "delete":
            del out[at:at + value]
    return bytes(out)


@FUZZ
@given(steps=st.lists(mutation, min_size=1, max_size=4))
def test_mutated_artifacts_are_refused_never_misread(model_f32, artifact, steps):
    data, kv = artifact
    check_refused_or_identical(model_f32, mutate(data, steps), kv)


@FUZZ
@given(edit=st.dictionaries(st.sampled_from(["token_ids", "num_layers", "kv_heads", "head_dim", "dtype", "codec",
                                             "format_version", "tensors", "cache_id", "salt_hash", "fingerprint"]),
                            st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.text(max_size=8),
                                         lambda inner: st.lists(inner, max_size=4)
                                         | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8),
                            min_size=1, max_size=3),
       rehash=st.booleans())
def test_hostile_manifests_are_refused(model_f32, artifact, edit, rehash):
    """A manifest rewritten field by field (and, with `rehash`, its hash recomputed as a forger would)."""
    import hashlib

    data, kv = artifact
    header, body, tensors = split(data)
    recorded = body.pop("manifest_sha256")
    body.update(edit)
    body["manifest_sha256"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest() if rehash \
        else recorded
    header["__metadata__"]["kvmart"] = json.dumps(body, sort_keys=True)
    forged = join(header, tensors)
    check_refused_or_identical(model_f32, forged, kv)


@pytest.fixture(scope="module")
def live(model_f32, tmp_path_factory):
    with LiveServer(model_f32, tmp_path_factory.mktemp("fuzz"), default_max_tokens=2) as server:
        server.admin_key = server.services.ledger.admin_key_issued
        yield server


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True)
                    | st.text(max_size=20), lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=10)
FIELDS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stream",
          "stop", "seed", "documents", "n", "logprobs", "top_logprobs", "system", "text", "title", "licence",
          "readers", "artifact", "royalty_share", "cache_read_usd_per_mtok", "stream_options", "kvmart"]
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", "x"]),
                                 "content": st.text(max_size=30) | JSON})
BODY = st.dictionaries(st.sampled_from(FIELDS), JSON | st.lists(MESSAGE, max_size=3)
                       | st.integers(-5, 50) | st.just("builtin:tiny"), max_size=6)
PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/documents"]


@HTTP_FUZZ
@given(path=st.sampled_from(PATHS), body=BODY | JSON, raw=st.booleans(), junk=st.binary(max_size=40))
def test_generated_bodies_never_get_a_500(live, path, body, raw, junk):
    key = live.publisher_key if path == "/v1/documents" else live.agent_key
    content = junk if raw else json.dumps(body, allow_nan=True).encode()
    response = live.http.post(path, content=content, headers={"Authorization": f"Bearer {key}",
                                                              "content-type": "application/json"})
    assert response.status_code < 500, (path, body, response.text)
    if response.status_code >= 400:
        assert "error" in response.json()


# -- every endpoint, from its OpenAPI schema, and hostile numbers and strings in every field ------------------------
HOSTILE = [1e-300, -1e-300, 5e-324, 2**70, -(2**70), 2**64, 2**63, -(2**63) - 1, 1e308, -1e308, 1.5, -1, 0, 0.0,
           True, None, "\ud800", "a\udfffb", "²", "1_000", "١٢", "\x00", "NaN", "1e10", "", " ", "x" * 5000,
           [[[[[[[[[["deep"]]]]]]]]]], {"a": {"b": {"c": 1e-300}}}, [], {}]
VALID = {
    "/v1/chat/completions": {"model": "builtin:tiny", "messages": [{"role": "user", "content": "Hi"}],
                             "max_tokens": 2, "temperature": 0.5, "top_p": 0.9, "seed": 1, "stop": ["x"]},
    "/v1/completions": {"model": "builtin:tiny", "prompt": "Hi", "max_tokens": 2, "temperature": 0.5, "seed": 1},
    "/v1/messages": {"model": "builtin:tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                     "temperature": 0.5, "top_p": 0.9, "system": "Be brief."},
    "/v1/documents": {"text": "A short note.", "title": "t", "licence": "priced", "cache_read_usd_per_mtok": "0.5",
                      "royalty_share": "0.3"},
    "/v1/accounts": {"name": "fuzzed", "role": "agent"},
    "/v1/accounts/agent/deposits": {"usd": "1"},
    "/v1/receipts/verify": {"receipt": "rcpt_1", "signature": "00"},
}


def paths_of(value: object, path: tuple = ()) -> list[tuple]:
    """Every place in a JSON value a hostile value can go: each key and each list item, at every depth."""
    found = [path] if path else []
    if isinstance(value, dict):
        for key, item in value.items():
            found += paths_of(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found += paths_of(item, (*path, i))
    return found


def put(value: object, path: tuple, new: object) -> object:
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)  # type: ignore[call-overload]  # JSON containers
    copy[path[0]] = put(copy[path[0]], path[1:], new)
    return copy


@HTTP_FUZZ
@given(data=st.data(), endpoint=st.sampled_from(sorted(VALID)))
def test_hostile_numbers_and_strings_in_any_field_never_get_a_500(live, data, endpoint):
    """Valid bodies of every POST endpoint with one to three of their fields (at any depth) replaced by values an
    outside review found to break servers: tiny and huge numbers, lone surrogates, Unicode digits, NUL, deep
    nesting. Every answer is below 500, and an error says what it is in the API's error body."""
    body = VALID[endpoint]
    for _ in range(data.draw(st.integers(1, 3))):
        body = put(body, data.draw(st.sampled_from(paths_of(body))), data.draw(st.sampled_from(HOSTILE)))
    key = {"/v1/documents": live.publisher_key, "/v1/accounts": live.admin_key,
           "/v1/accounts/agent/deposits": live.admin_key}.get(endpoint, live.agent_key)
    response = live.http.post(endpoint, content=json.dumps(body).encode(),
                              headers={"Authorization": f"Bearer {key}", "content-type": "application/json"})
    assert response.status_code < 500, (endpoint, body, response.text[:500])
    if response.status_code >= 400:
        assert "error" in response.json()
    assert live.services.ledger.health().is_sound


def test_every_operation_of_the_openapi_schema_never_gets_a_500(live):
    """schemathesis over kvmart's own OpenAPI schema (every path, method, parameter and request body it
    describes, kvmart/server/app.py REQUEST_BODIES), with valid and invalid data: no answer is a 5xx."""
    schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the test extras")
    from hypothesis import HealthCheck as Checks
    from hypothesis import given as given_case
    from hypothesis import settings as run_settings

    schema = schemathesis.openapi.from_url(live.url + "/openapi.json")
    seen: dict[str, int] = {}
    for result in schema.get_all_operations():
        operation = result.ok()

        @run_settings(max_examples=40, deadline=None, suppress_health_check=list(Checks), derandomize=True,
                      database=None)
        @given_case(case=operation.as_strategy())
        def one(case) -> None:
            key = live.admin_key if case.path.startswith("/v1/accounts") else live.agent_key
            response = case.call(base_url=live.url, headers={"Authorization": f"Bearer {key}"})
            assert response.status_code < 500, (case.method, case.formatted_path, case.body, response.text[:500])
            seen[case.operation.label] = seen.get(case.operation.label, 0) + 1

        one()
    assert len(seen) >= 13, sorted(seen)  # every operation was driven
    assert live.services.ledger.health().is_sound
