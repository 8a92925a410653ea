"""The documents API (kvmart/server/api/documents.py): publish once, catalogue, owner-only delete, one store with the
CLI."""

from __future__ import annotations

from decimal import Decimal

import httpx
import pytest
from server_support import LiveServer

from kvmart.ledger import usd_text
from kvmart.reuse import core
from kvmart.reuse.catalog import document_id
from kvmart.reuse.samples import sample_text
from kvmart.store import open_store

BSD = sample_text("bsd-3-clause")


@pytest.fixture
def live(model_f32, tmp_path):
    with LiveServer(model_f32, tmp_path / "data") as server:
        yield server


def test_publishing_twice_returns_the_same_id_and_computes_nothing(live):
    first = live.publish(BSD, title="bsd")
    assert first.status_code == 201, first.text
    body = first.json()
    assert body["id"] == document_id(body["cache_id"]) and body["computed"] is True
    assert body["num_tokens"] > 0 and body["artifact_bytes"] > 0 and body["prefill_seconds"] > 0
    again = live.publish(BSD, title="another title")
    assert again.status_code == 200 and again.json()["computed"] is False
    assert again.json()["id"] == body["id"] and again.json()["title"] == "bsd"
    assert len([e for e in live.services.store.entries() if e.is_document]) == 1
    assert live.metrics()['kvmart_documents_published_total{outcome="already_stored"}'] == 1
    fetched = live.http.get(f"/v1/documents/{body['id']}").json()
    card = {k: fetched.pop(k) for k in ("publisher", "price")}
    assert fetched == {k: v for k, v in body.items() if k not in ("computed", "seconds", "precompute_charge_usd")}
    tariff = live.services.ledger.tariff
    assert card == {"publisher": "publisher", "price": {
        "cache_read_usd_per_mtok": str(tariff.read_usd_per_mtok), "output_usd_per_mtok": str(tariff.output_usd_per_mtok),
        "read_once_usd": usd_text(live.services.ledger.quote(None, body["num_tokens"], 0, 0).total_nanousd)}}


def test_a_card_names_the_publisher_and_the_price_a_priced_document_sets(live):
    priced = live.publish(sample_text("apache-2.0")[:4000], title="priced", licence="priced",
                          cache_read_usd_per_mtok="2.5").json()
    card = live.http.get(f"/v1/documents/{priced['id']}").json()
    assert card["publisher"] == "publisher" and card["licence"]["kind"] == "priced"
    assert card["price"]["cache_read_usd_per_mtok"] == "2.5"
    assert Decimal(card["price"]["read_once_usd"]) == Decimal("2.5") * priced["num_tokens"] / 10**6


def test_catalogue_pages_newest_first(live):
    ids = [live.publish(sample_text(name)).json()["id"] for name in ("bsd-3-clause", "apache-2.0", "mpl-2.0")]
    first = live.http.get("/v1/documents", params={"limit": 2}).json()
    assert [d["id"] for d in first["data"]] == ids[::-1][:2] and first["has_more"] is True
    rest = live.http.get("/v1/documents", params={"limit": 2, "after": first["last_id"]}).json()
    assert [d["id"] for d in rest["data"]] == [ids[0]] and rest["has_more"] is False
    assert live.http.get("/v1/documents", params={"limit": 0}).status_code == 400
    assert live.http.get("/v1/documents", params={"limit": "many"}).status_code == 400


def test_the_catalogue_is_searched_by_title_source_or_id_and_pages_within_the_search(live):
    ids = {name: live.publish(sample_text(name), title=f"{name} licence", source=f"https://example.org/{name}"
                              ).json()["id"] for name in ("bsd-3-clause", "apache-2.0", "mpl-2.0")}

    def found(**params) -> list[str]:
        return [d["id"] for d in live.http.get("/v1/documents", params=params).json()["data"]]

    assert found(q="APACHE") == [ids["apache-2.0"]]  # the title, ignoring case
    assert found(q="example.org/mpl") == [ids["mpl-2.0"]]  # the source
    assert found(q=ids["bsd-3-clause"][4:14]) == [ids["bsd-3-clause"]]  # the id
    assert found(q="no such text") == []
    assert found(q="-2.0 licence") == [ids["mpl-2.0"], ids["apache-2.0"]]  # newest first
    first = live.http.get("/v1/documents", params={"q": "-2.0", "limit": 1}).json()
    assert first["has_more"] is True
    assert found(q="-2.0", limit=1, after=first["last_id"]) == [ids["apache-2.0"]]
    assert live.http.get("/v1/documents", params={"q": "x" * 201}).status_code == 400


def test_only_the_publisher_may_delete(live):
    alice, mallory = live.account("alice", "publisher"), live.account("mallory", "publisher")
    doc = live.publish(BSD, key=alice).json()
    for key in (mallory, live.agent_key):
        refused = live.http.delete(f"/v1/documents/{doc['id']}", headers={"Authorization": f"Bearer {key}"})
        assert refused.status_code == 403 and "only its publisher" in refused.json()["error"]["message"]
    anonymous = httpx.delete(f"{live.url}/v1/documents/{doc['id']}")
    assert anonymous.status_code == 401
    deleted = httpx.delete(f"{live.url}/v1/documents/{doc['id']}", headers={"x-api-key": alice})  # Anthropic's header
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    assert live.http.get(f"/v1/documents/{doc['id']}").status_code == 404
    asked = live.http.post("/v1/chat/completions", json={"model": "builtin:tiny", "documents": [doc["id"]],
                                                         "messages": [{"role": "user", "content": "Who?"}]})
    assert asked.status_code == 404 and doc["id"] in asked.json()["error"]["message"]


def test_the_cli_and_the_server_share_one_store(live, model_f32):
    store = open_store(live.services.settings.store_url)
    cid = core.precompute(model_f32, store, BSD, title="from the cli").entry.cache_id
    listed = live.http.get("/v1/documents").json()["data"]
    assert [d["id"] for d in listed] == [document_id(cid)]
    published = live.publish(BSD)
    assert published.json()["id"] == document_id(cid) and published.json()["computed"] is False
    refused = live.http.delete(f"/v1/documents/{document_id(cid)}",
                               headers={"Authorization": f"Bearer {live.publisher_key}"})
    assert refused.status_code == 403  # published by the CLI: `kvmart rm` deletes it


def test_bad_documents(live, model_f32):
    assert live.publish("   ").status_code == 400
    assert live.publish(None, title="no text").status_code == 400
    assert live.publish("x", colour="red").status_code == 400
    too_long = live.publish(BSD * 12)  # far beyond the tiny model's 4,096-token context
    assert too_long.status_code == 413 and "no request could use it" in too_long.json()["error"]["message"]
    assert live.http.get("/v1/documents/doc_nope").status_code == 404


def test_a_document_published_with_a_system_prompt_is_reused_by_requests_with_it(live):
    doc = live.publish(BSD, system="Answer from the licence.").json()
    body = {"model": "builtin:tiny", "max_tokens": 4, "documents": [doc["id"]], "temperature": 0,
            "messages": [{"role": "system", "content": "Answer from the licence."},
                         {"role": "user", "content": "Who?"}]}
    usage = live.http.post("/v1/chat/completions", json=body).json()["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == doc["num_tokens"]


def test_one_unreadable_entry_file_fails_nothing_and_no_path_reaches_a_client(live, tmp_path):
    """An entry file of the local store turned to garbage (a disk error, a half-restored backup): the API's and the
    web page's catalogues, a lookup of an unknown id and a chat on the good document all answer; the bad entry is
    quarantined, and no response anywhere shows the server's paths."""
    good = live.publish(BSD, title="good").json()
    bad = live.publish(sample_text("apache-2.0"), title="bad").json()
    store_root = live.services.settings.data_dir / "store"
    (store_root / "entries" / f"{bad['cache_id']}.json").write_bytes(b"\x00garbage{")
    live.services.catalog.remove(bad["id"])  # as a fresh node would: it learns of documents from the store
    responses = [live.http.get("/v1/documents"), live.http.get("/"), live.http.get("/v1/documents/doc_" + "0" * 24),
                 live.http.get(f"/v1/documents/{bad['id']}"),
                 live.http.post("/v1/chat/completions", json={
                     "model": live.services.model_id, "messages": [{"role": "user", "content": "Who?"}],
                     "documents": [good["id"]], "max_tokens": 2, "temperature": 0})]
    assert [r.status_code for r in responses] == [200, 200, 404, 404, 200], [r.text[:300] for r in responses]
    assert [d["id"] for d in responses[0].json()["data"]] == [good["id"]]
    assert list((store_root / "quarantine").iterdir())
    for response in responses:
        assert str(tmp_path) not in response.text and "/store" not in response.text


def test_a_server_side_failure_shows_a_reference_never_its_message(caplog):
    """A 5xx keeps its details (a store path, a URL) in the server's log and gives the client a reference."""
    from kvmart.errors import StoreError
    from kvmart.server.errors import http_error

    error = http_error(StoreError("cannot write /srv/secret/store/objects/ab: disk full"))
    assert error.status == 500 and "/srv/secret" not in error.message and "reference" in error.message
    reference = error.message.split("reference ")[1].split(";")[0]
    assert reference in caplog.text and "/srv/secret/store" in caplog.text
