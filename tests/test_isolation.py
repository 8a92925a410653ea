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
from kvmart.reuse.samples import sample_text
from kvmart.runtime.chat import document_ids, layout_for

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
    owner, other = live.account("owner", "publisher"), live.account("other-tenant", "agent")
    doc = live.publish(SECRET, key=owner, licence="private").json()
    prefix = SECRET[:200]  # a guessed prefix, as an attacker probing for a hit would send
    for content in (SECRET + "\n\nSummarize.", prefix):
        probing = ask(live, other, content)
        assert probing["cached_tokens"] == 0 and probing["document"] is None and probing["cache"] == "none"
    baseline = ask(live, other, DECOY + "\n\nSummarize.")  # never published: the same path, the same work
    assert (baseline["cache"], baseline["cached_tokens"]) == ("none", 0)
    owners = ask(live, owner, SECRET + "\n\nSummarize.")
    assert owners["document"] == doc["id"] and owners["cached_tokens"] > 0
    services = live.services
    readable = services.ledger.readable(services.ledger.account("other-tenant"))
    ids = document_ids(services.model.tokenize, layout_for(services.model.tokenizer), SECRET)
    assert services.catalog.longest_prefix(ids + [5], 1, readable) is None  # not even considered


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


def test_the_engine_refuses_to_match_private_documents_it_is_not_given(live):
    owner = live.account("engine-owner", "publisher")
    text = "Engine-level secret.\n\n" + SECRET
    live.publish(text, key=owner, licence="private")
    services = live.services
    ids = document_ids(services.model.tokenize, layout_for(services.model.tokenizer), text) + [5, 6]
    assert services.engine.match(ids, [], frozenset()) is None
    assert services.engine.match(ids, [], None) is not None  # the admin (None: all) sees it: the filter hides it
