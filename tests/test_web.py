"""The market's web page (kvmart/web/) over HTTP: the catalogue (search, sort, figures), a document page and its
streamed "try it" answer (the same tokens as the API's), the publisher's page (publish, revenue, delete), the
provider's page (admin only, the figures /metrics reports), and each security property: API keys never in URLs,
cookies or logs; HttpOnly SameSite session cookies; CSRF on every form; private documents invisible to others
everywhere; escaped titles."""

from __future__ import annotations

import json
import logging
from decimal import Decimal

import pytest
from server_support import LiveServer
from web_support import WebClient

from kvmart.reuse.samples import sample_text

MODEL = "builtin:tiny"
BSD = sample_text("bsd-3-clause")
MPL = sample_text("mpl-2.0")


@pytest.fixture(scope="module")
def live(model_f32, tmp_path_factory):
    with LiveServer(model_f32, tmp_path_factory.mktemp("web")) as server:
        server.admin_key = server.services.ledger.admin_key_issued
        yield server


@pytest.fixture
def visitor(live):
    client = WebClient(live.url)
    yield client
    client.close()


def signed_in(live, key: str) -> WebClient:
    client = WebClient(live.url)
    client.sign_in(key)
    return client


def ask_lines(client: WebClient, doc_id: str, question: str, max_tokens: int = 8) -> list[dict]:
    response = client.post("/ask", document=doc_id, question=question, max_tokens=str(max_tokens))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in response.text.splitlines() if line]


def test_catalogue_shows_searches_and_sorts_documents(live, visitor):
    bsd = live.publish("Catalogue copy.\n\n" + BSD, title="Zebra licence").json()
    mpl = live.publish("Catalogue copy.\n\n" + MPL, title="Aardvark licence").json()
    page = visitor.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for doc in (bsd, mpl):
        assert f'data-doc="{doc["id"]}"' in page.text and f'{doc["num_tokens"]:,}' in page.text
    found = visitor.get("/", q="aardvark").text
    assert mpl["id"] in found and bsd["id"] not in found
    by_title = visitor.get("/", sort="title").text
    assert by_title.index("Aardvark licence") < by_title.index("Zebra licence")
    by_tokens = visitor.get("/", sort="tokens").text
    longer, shorter = sorted((bsd, mpl), key=lambda d: -d["num_tokens"])
    assert by_tokens.index(longer["id"]) < by_tokens.index(shorter["id"])
    refused = visitor.get("/", sort="nonsense")
    assert refused.status_code == 400 and "sort must be one of" in refused.text


def test_try_it_streams_the_api_answer_with_cached_tokens(live):
    doc = live.publish("Try-it notes.\n\n" + BSD, title="try it").json()
    agent = signed_in(live, live.agent_key)
    page = agent.get(f"/documents/{doc['id']}")
    assert page.status_code == 200 and 'id="ask-form"' in page.text
    lines = ask_lines(agent, doc["id"], "Who holds the copyright?")
    pieces, done = [line["text"] for line in lines if "text" in line], lines[-1]
    assert len(pieces) >= 2 and done["done"] is True  # streamed piece by piece
    usage = done["usage"]
    assert usage["cached_tokens"] == doc["num_tokens"] and usage["computed_tokens"] > 0
    assert usage["prefill_seconds_saved"] >= 0 and Decimal(usage["charge"]["usd"]) > 0
    api = live.http.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "Who holds the copyright?"}], "max_tokens": 8,
        "temperature": 0, "documents": [doc["id"]]}).json()
    assert "".join(pieces) == api["choices"][0]["message"]["content"]  # the same computation as the API
    assert api["usage"]["prompt_tokens"] == usage["prompt_tokens"]
    assert agent.get(f"/documents/{doc['id']}").text.count('id="doc-reads">2<') == 1  # both reads counted
    requests = live.services.ledger.usage(live.services.ledger.account("agent")).requests
    mine = agent.get("/publisher").text  # an agent's own page: its spending, no publishing
    assert f'id="requests">{requests}<' in mine and 'id="publish-form"' not in mine


def test_publisher_publishes_earns_and_deletes(live):
    publisher = signed_in(live, live.publisher_key)
    live.verify_owner("publisher", "https://publisher.example/")  # a verified owner earns at once (not escrow)
    published = publisher.post("/publisher/documents", title="Publisher's notes", text="Publisher notes.\n\n" + MPL,
                               licence="priced", cache_read_usd_per_mtok="0.5",
                               source="https://publisher.example/notes.txt")
    assert published.status_code == 303, published.text
    doc_id = published.headers["location"].removeprefix("/documents/")
    mine = publisher.get("/publisher").text
    assert f'data-doc="{doc_id}"' in mine and "$0.5 / Mtok" in mine
    before = live.services.ledger.usage(live.services.ledger.account("publisher")).royalties_nanousd
    reader = signed_in(live, live.account("web-reader", "agent"))
    ask_lines(reader, doc_id, "What is covered?")
    after = live.services.ledger.usage(live.services.ledger.account("publisher")).royalties_nanousd
    assert after > before
    from kvmart.web.formatting import usd

    assert f'id="royalties">{usd(after)}<' in publisher.get("/publisher").text
    as_json = publisher.http.post("/publisher/documents", headers={"Accept": "application/json"},
                                  data={"csrf": publisher.csrf, "text": "x" * 5, "licence": "priced"})
    assert as_json.status_code == 400 and "cache_read_usd_per_mtok" in as_json.json()["error"]["message"]
    refused = reader.post(f"/publisher/documents/{doc_id}/delete")
    assert refused.status_code == 403 and live.http.get(f"/v1/documents/{doc_id}").status_code == 200
    deleted = publisher.post(f"/publisher/documents/{doc_id}/delete")
    assert deleted.status_code == 303 and live.http.get(f"/v1/documents/{doc_id}").status_code == 404
    assert doc_id not in publisher.get("/publisher").text


def test_provider_page_is_for_the_admin_and_shows_the_metrics(live, visitor):
    assert visitor.get("/provider").status_code == 303  # to the sign-in page
    agent = signed_in(live, live.agent_key)
    assert agent.get("/provider").status_code == 403
    doc = live.publish("Provider notes.\n\n" + BSD, title="provider doc").json()
    ask_lines(agent, doc["id"], "Who?")
    ask_lines(agent, doc["id"], "Who?")  # a hot-tier hit
    admin = signed_in(live, live.admin_key)
    page = admin.get("/provider")
    assert page.status_code == 200
    metrics = live.metrics()
    hits = {tier: int(metrics.get(f'kvmart_cache_hits_total{{tier="{tier}"}}', 0)) for tier in ("ram", "store")}
    assert hits["ram"] >= 1 and hits["store"] >= 1
    for tier, count in hits.items():
        assert f'<tr data-tier="{tier}"><td>{tier}</td><td class="num">{count}</td>' in page.text
    cached = int(metrics['kvmart_prompt_tokens_total{source="cache"}'])
    assert f'id="cached-total">{cached:,}<' in page.text
    assert "provider doc" in page.text and "<svg" in page.text


def test_api_keys_never_reach_urls_cookies_pages_or_logs(live, caplog):
    key = live.account("secretive", "publisher")
    caplog.set_level(logging.DEBUG)
    client = WebClient(live.url)
    form = client.get("/signin").text
    assert 'method="post" action="/signin"' in form and 'type="password" name="api_key"' in form
    signed = client.post("/signin", api_key=key)
    seen = [signed.headers.get("location", ""), signed.headers.get("set-cookie", ""), str(signed.url)]
    for path in ("/", "/publisher", "/signin"):
        response = client.get(path)
        seen += [response.text, str(response.url), response.headers.get("set-cookie", "")]
    assert not any(key in text for text in seen)
    assert not any(key in record.getMessage() for record in caplog.records)
    wrong = client.post("/signin", api_key=key + "x")
    assert wrong.status_code == 401 and key not in wrong.text
    by_url = WebClient(live.url)
    by_url.get("/signin", api_key=key)
    assert 'id="signed-in-as"' not in by_url.get("/publisher").text  # a key in a URL signs nobody in


def test_session_cookie_is_httponly_samesite_and_renewed_at_sign_in(live):
    client = WebClient(live.url)
    first = client.http.cookies["kvmart_session"]
    response = client.post("/signin", api_key=live.agent_key)
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=lax" in cookie and "path=/" in cookie
    assert client.http.cookies["kvmart_session"] != first
    headers = client.get("/").headers
    assert "script-src 'self'" in headers["content-security-policy"] and headers["x-frame-options"] == "DENY"
    assert client.post("/signout").status_code == 303
    assert 'id="signed-in-as"' not in client.get("/").text


def test_every_form_needs_the_session_csrf_token(live):
    doc = live.publish("CSRF notes.\n\n" + BSD, title="csrf doc").json()
    publisher, other = signed_in(live, live.publisher_key), WebClient(live.url)
    forms = [("/ask", {"document": doc["id"], "question": "Who?"}),
             ("/publisher/documents", {"text": "csrf attack text", "title": "forged"}),
             (f"/publisher/documents/{doc['id']}/delete", {}), ("/signout", {}),
             ("/signin", {"api_key": live.agent_key})]
    for path, fields in forms:
        for token in ("", other.csrf, "forged"):
            response = publisher.post(path, csrf=token, **fields)
            assert response.status_code == 403, (path, token, response.text)
    assert 'id="signed-in-as"' in publisher.get("/").text  # still signed in: the forged sign-out did nothing
    assert live.http.get(f"/v1/documents/{doc['id']}").status_code == 200
    assert "forged" not in publisher.get("/").text


def test_private_documents_are_invisible_to_everyone_else(live):
    owner_key, reader_key = live.account("owner", "publisher"), live.account("friend", "agent")
    stranger = signed_in(live, live.account("stranger", "agent"))
    private = live.publish("Private memo.\n\n" + BSD, key=owner_key, title="Secret merger memo",
                           licence="private", readers=["friend"]).json()
    friend, owner = signed_in(live, reader_key), signed_in(live, owner_key)
    ask_lines(friend, private["id"], "Who?")  # a read: it would show in charts
    for client in (stranger, WebClient(live.url)):
        for path, params in (("/", {}), ("/", {"q": "merger"}), ("/", {"sort": "reads"}), ("/publisher", {})):
            text = client.get(path, **params).text
            assert "Secret merger memo" not in text and private["id"] not in text and private["cache_id"] not in text
        assert client.get(f"/documents/{private['id']}").status_code == 404
    missing = stranger.post("/ask", document=private["id"], question="Who?")
    assert missing.status_code == 404 and "Secret" not in missing.text
    never, hidden = "doc_" + "0" * 24, stranger.get(f"/documents/{private['id']}").text
    assert hidden.replace(private["id"], "ID") == stranger.get(f"/documents/{never}").text.replace(never, "ID")
    for client in (friend, owner):
        assert "Secret merger memo" in client.get("/", q="merger").text
        assert client.get(f"/documents/{private['id']}").status_code == 200
    assert "Secret merger memo" in signed_in(live, live.admin_key).get("/provider").text


def test_titles_are_escaped_everywhere(live):
    title = '<script>alert("owned")</script><img src=x onerror=alert(1)>'
    doc = live.publish("Escaping notes.\n\n" + MPL, title=title).json()
    agent = signed_in(live, live.agent_key)
    ask_lines(agent, doc["id"], "Who?")  # so the title is drawn in the charts too
    pages = [agent.get("/").text, agent.get(f"/documents/{doc['id']}").text,
             signed_in(live, live.publisher_key).get("/publisher").text,
             signed_in(live, live.admin_key).get("/provider").text]
    for text in pages:
        assert "<script>alert" not in text and "<img src=x" not in text
        assert "&lt;script&gt;alert(" in text


def test_revoking_the_key_ends_the_session(live):
    key = live.account("revoked-soon", "agent")
    client = signed_in(live, key)
    assert 'id="signed-in-as">revoked-soon' in client.get("/").text
    live.services.ledger.revoke_keys("revoked-soon")
    assert 'id="signed-in-as"' not in client.get("/").text
    assert client.get("/publisher").headers["location"] == "/signin"
