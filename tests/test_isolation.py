"""Tenant isolation of private caches, against what prefix caches elsewhere ran into: a prefix hit detectable from
response time, salts written by clients (copyable), salts dropped on the way to a shared tier. Here a private
document is never a prefix candidate for another tenant (so there is no hit to time), its salt is the server's
(never taken from a request) and is part of its cache id in every tier. (404s for another tenant's private
documents: tests/test_server_ledger.py.)"""

from __future__ import annotations

import pytest
from server_support import LiveServer

from kvmart.errors import ArtifactError
from kvmart.reuse import core
from kvmart.reuse.catalog import first_chunk_key
from kvmart.reuse.samples import sample_text

SECRET = "Tenant A's merger plan, strictly private.\n\n" + sample_text("bsd-3-clause")
DECOY = "Tenant C's unrelated notes, never published.\n\n" + sample_text("bsd-3-clause")


@pytest.fixture(scope="module")
def live(model_f32, tmp_path_factory):
    with LiveServer(model_f32, tmp_path_factory.mktemp("isolation")) as server:
        yield server


def ask(live, key: str, content: str) -> dict:
    body = {"model": "builtin:tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 2,
            "temperature": 0}
    response = live.http.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    return response.json()["usage"]["kvmart"]


def test_another_tenants_private_prefix_is_never_a_candidate(live):
    owner = live.account("owner", "publisher")
    doc = live.publish(SECRET, key=owner, licence="private").json()
    prefix = SECRET[:200]  # a guessed prefix, as an attacker probing for a hit would send
    for n, content in enumerate((SECRET + "\n\nSummarize.", prefix)):
        prober = live.account(f"other-tenant-{n}", "agent")  # a first request: no prefix of its own cached yet
        probing = ask(live, prober, content)
        assert probing["cached_tokens"] == 0 and probing["document"] is None and probing["cache"] == "none"
    baseline = ask(live, live.account("decoy-tenant", "agent"), DECOY + "\n\nSummarize.")  # the same path, work
    assert (baseline["cache"], baseline["cached_tokens"]) == ("none", 0)
    named = live.http.post("/v1/chat/completions", headers={"Authorization": f"Bearer {owner}"}, json={
        "model": "builtin:tiny", "messages": [{"role": "user", "content": "Summarize."}], "max_tokens": 2,
        "temperature": 0, "documents": [doc["id"]]}).json()["usage"]["kvmart"]
    assert named["document"] == doc["id"] and named["cached_tokens"] == doc["num_tokens"]  # its readers name it
    document = live.services.catalog.get(doc["id"])
    assert first_chunk_key(live.services.model.fingerprint.digest, document) is None  # not indexed for pasting


def test_the_salt_is_the_servers_never_the_clients(live):
    refused = live.publish(SECRET, licence="private", salt="copied-from-tenant-a")
    assert refused.status_code == 400 and "salt" in refused.json()["error"]["message"]
    owner, stranger = live.account("salt-owner", "publisher"), live.account("salt-stranger", "agent")
    live.publish("Salted.\n\n" + SECRET, key=owner, licence="private")
    body = {"model": "builtin:tiny", "max_tokens": 1, "temperature": 0, "cache_salt": "anything",
            "messages": [{"role": "user", "content": "Salted.\n\n" + SECRET + "\n\nQ?"}]}
    sent = live.http.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {stranger}"})
    assert sent.status_code == 200 and sent.json()["usage"]["kvmart"]["cached_tokens"] == 0  # a client salt: ignored


def test_a_private_artifact_cannot_be_read_without_its_tenants_salt(live, model_f32):
    a, b = live.account("salted-a", "publisher"), live.account("salted-b", "publisher")
    first = live.publish("Same words.\n\n" + SECRET, key=a, licence="private").json()
    second = live.publish("Same words.\n\n" + SECRET, key=b, licence="private").json()
    assert first["cache_id"] != second["cache_id"]  # the same text: one cache per tenant, no shared entry
    store = live.services.store
    salt = live.services.ledger.salt_of(first["cache_id"])
    assert core.load(model_f32, store, first["cache_id"], salt).kv.num_tokens == first["num_tokens"]
    for wrong in ("", live.services.ledger.salt_of(second["cache_id"])):  # salt dropped, or another tenant's
        with pytest.raises(ArtifactError, match="cache id does not match"):
            core.load(model_f32, store, first["cache_id"], wrong)


def test_the_planner_refuses_private_documents_it_is_not_given(live):
    """Named by another tenant, a private document is the same 404 as a missing one; pasted, it is never matched,
    for anyone: it is only ever read when named by an account that may read it."""
    from kvmart.errors import UnknownDocumentError
    from kvmart.reuse.prompt import ChatMessage, ChatPrompt
    from kvmart.server.pipeline.plan import Caller, GenerationRequest, Sampling

    owner = live.account("engine-owner", "publisher")
    text = "Engine-level secret.\n\n" + SECRET
    doc = live.publish(text, key=owner, licence="private").json()
    planner = live.services.planner
    named = GenerationRequest(ChatPrompt((ChatMessage("user", "Q?"),), (doc["id"],)), Sampling(max_tokens=1))
    with pytest.raises(UnknownDocumentError):
        planner.plan(named, Caller(None, frozenset(), "stranger-salt"))
    assert planner.plan(named, Caller(None, frozenset({doc["cache_id"]}), "owner-salt")).documents[0].id == doc["id"]
    pasted = GenerationRequest(ChatPrompt((ChatMessage("user", text + "\n\nQ?"),)), Sampling(max_tokens=1))
    for readable in (frozenset(), frozenset({doc["cache_id"]}), None):
        assert planner.plan(pasted, Caller(None, readable, "any-salt")).documents == ()
