"""Large publish bodies (kvmart/server/publish_body.py): streamed to disk and scanned once, the artifact decoded
piece by piece to a file and verified from there; the same fields and bytes `json.loads` would give, the same
400/413 for what it would refuse; a bounded heap whatever the body's size; at most `max_concurrent_uploads` at
once (429 beyond)."""

from __future__ import annotations

import base64
import io
import json
import threading
import tracemalloc

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_support import DEADLINE_SECONDS, LiveServer, wait_until

from kvmart.errors import RequestError, TooLargeError
from kvmart.reuse import core
from kvmart.reuse.samples import sample_text
from kvmart.reuse.upload import compute_upload, upload_prefill
from kvmart.runtime.chat import document_ids, layout_for
from kvmart.server import publish_body
from kvmart.server.publish_body import split_publish_json

CHUNK = 64
BSD = sample_text("bsd-3-clause")


def split(raw: bytes, max_fields: int = 1 << 20, max_artifact: int = 1 << 30) -> tuple[dict, bytes | None]:
    out = io.BytesIO()
    fields, has = split_publish_json(io.BytesIO(raw), out, max_fields, max_artifact)
    return fields, out.getvalue() if has else None


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
                           max_leaves=8)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(fields=st.dictionaries(st.text(max_size=10).filter(lambda k: k != "artifact"), JSON_VALUES, max_size=5),
       artifact=st.none() | st.binary(max_size=3000), position=st.integers(0, 5), indent=st.sampled_from([None, 0, 2]),
       escape_slashes=st.booleans(), chunk=st.sampled_from([1, 3, 4, 7, 64]))
def test_the_scan_reads_what_json_loads_reads(monkeypatch, fields, artifact, position, indent, escape_slashes, chunk):
    """Any object, the artifact anywhere in it, any whitespace, `\\/` escapes, any read size: the same fields, and
    the artifact's very bytes."""
    monkeypatch.setattr(publish_body, "CHUNK_BYTES", chunk)
    items = list(fields.items())
    if artifact is not None:
        items.insert(min(position, len(items)), ("artifact", base64.b64encode(artifact).decode()))
    raw = json.dumps(dict(items), indent=indent)
    if escape_slashes:
        raw = raw.replace("/", "\\/")
    got_fields, got_artifact = split(raw.encode())
    expected = json.loads(raw)
    expected.pop("artifact", None)
    assert got_fields == expected and got_artifact == artifact


@pytest.mark.parametrize("raw, error, match", [
    (b'{"artifact": "QUJD', RequestError, "ends inside"),
    (b'{"artifact": "QU=D"}', RequestError, "padding before its end"),
    (b'{"artifact": "QUJD\\nQUJD"}', RequestError, "no escapes"),
    (b'{"artifact": "QUJ*"}', RequestError, "base64"),
    (b'{"artifact": 12}', RequestError, "as a JSON string"),
    (b'{"artifact": "QUJD", "artifact": "QUJD"}', RequestError, "twice"),
    (b'{"text": "a" "b"}', RequestError, "not valid JSON"),
    (b'{"text": "x"} trailing', RequestError, "extra data"),
    (b'{"text": NaN}', RequestError, "NaN"),
    (b'{"text": "\\ud800"}', RequestError, "lone surrogate"),
    (b'{"text": "' + b"x" * 2000 + b'"}', TooLargeError, "other than its artifact"),
    (b'{"artifact": "' + base64.b64encode(b"y" * 3000) + b'"}', TooLargeError, "more than 2,000 bytes"),
    (b"[1, 2]", RequestError, "expected"),
])
def test_what_the_scan_refuses(raw, error, match):
    with pytest.raises(error, match=match):
        split(raw, max_fields=1000, max_artifact=2000)


def test_the_scan_holds_a_bounded_buffer_whatever_the_artifacts_size(tmp_path):
    """A 24 MB artifact in a 32 MB body: the scan's Python heap stays within its fields' budget and some read
    buffers (CHUNK_BYTES each), independent of the body's size."""
    max_fields = 64 * 1024
    artifact = bytes(range(256)) * (24 * 4096)
    with (tmp_path / "body.json").open("wb") as f:
        f.write(b'{"text": "' + b"t" * 30_000 + b'", "artifact": "')
        for i in range(0, len(artifact), 3 << 16):
            f.write(base64.b64encode(artifact[i:i + (3 << 16)]))
        f.write(b'", "title": "big"}')
    with (tmp_path / "body.json").open("rb") as body, (tmp_path / "artifact").open("w+b") as out:
        tracemalloc.start()
        try:
            fields, has = split_publish_json(body, out, max_fields, 1 << 30)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        out.seek(0)
        assert has and fields == {"text": "t" * 30_000, "title": "big"} and out.read() == artifact
    assert peak < 2 * max_fields + 16 * publish_body.CHUNK_BYTES, f"peak {peak:,} bytes"


# -- over HTTP ------------------------------------------------------------------------------------------------------
def long_document(model) -> tuple[str, list[int]]:
    """A document of about 3,800 tokens (an artifact of about 1.9 MB on the tiny model)."""
    text = ""
    while len(model.tokenize(text + BSD)) < 3800:
        text += BSD
    return text, document_ids(model.tokenize, layout_for(model.tokenizer), text)


def streamed(body: bytes, gate: threading.Event | None = None):
    """The body in 64 KiB pieces (as a client streams a large file), pausing after two (beyond the server's
    max_body_bytes: the body is being streamed to disk) until `gate` opens."""
    for i in range(0, len(body), 1 << 16):
        yield body[i:i + (1 << 16)]
        if gate is not None and i == 1 << 16:
            gate.wait(DEADLINE_SECONDS)


@pytest.fixture
def live(model_f32, tmp_path):
    with LiveServer(model_f32, tmp_path / "data", chunk_tokens=CHUNK, max_body_bytes=64 * 1024,
                    max_concurrent_uploads=1) as server:
        yield server


def test_a_large_upload_is_verified_from_disk_with_a_bounded_heap(live, model_f32):
    text, ids = long_document(model_f32)
    artifact = compute_upload(model_f32, ids, CHUNK)
    body = json.dumps({"text": text, "title": "large", "artifact": base64.b64encode(artifact).decode()}).encode()
    assert len(body) > 30 * 64 * 1024  # far beyond max_body_bytes: the streamed path
    tracemalloc.start()
    try:
        response = live.http.post("/v1/documents", content=streamed(body), headers={
            "Authorization": f"Bearer {live.publisher_key}", "content-type": "application/json"})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert response.status_code == 201, response.text
    # the whole process's Python heap (client, uvicorn and the server's fixed costs) never held the body whole: read
    # whole, it was held three times over (its bytes, the JSON string, the decoded artifact)
    assert peak < len(body), f"peak {peak:,} bytes of Python heap for a {len(body):,}-byte body"
    doc = response.json()
    assert doc["num_tokens"] == len(ids) and doc["computed"] is True
    loaded = core.load(model_f32, live.services.store, doc["cache_id"])
    reference = upload_prefill(model_f32, ids, CHUNK)
    assert all(torch.equal(a, b) for a, b in zip(loaded.kv.keys + loaded.kv.values,
                                                 reference.keys + reference.values, strict=True))
    assert not any((live.services.settings.data_dir / "uploads").iterdir())  # nothing left on disk
    assert live.app.state.uploads.taken == 0


def test_large_uploads_beyond_the_cap_get_429_and_the_slot_comes_back(live, model_f32):
    text, ids = long_document(model_f32)
    body = json.dumps({"text": text, "artifact": base64.b64encode(compute_upload(model_f32, ids, CHUNK)).decode()})
    headers = {"Authorization": f"Bearer {live.publisher_key}", "content-type": "application/json"}
    gate, results = threading.Event(), []
    first = threading.Thread(target=lambda: results.append(live.http.post(
        "/v1/documents", content=streamed(body.encode(), gate), headers=headers)))
    first.start()
    try:
        wait_until(lambda: live.app.state.uploads.taken == 1, "the first large body to take the slot")
        refused = live.http.post("/v1/documents", content=body.replace("large", "other"), headers=headers)
        assert refused.status_code == 429 and "Retry-After" in refused.headers, refused.text
        small = live.publish("A small document needs no slot.")
        assert small.status_code == 201
    finally:
        gate.set()
        first.join(DEADLINE_SECONDS)
    assert results[0].status_code == 201, results[0].text
    assert live.app.state.uploads.taken == 0
    assert live.http.post("/v1/documents", content=body, headers=headers).status_code == 200  # stored already
