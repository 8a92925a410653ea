"""Clear errors, never a 500 (kvmart/server/body.py, kvmart/server/api/params.py, the ledger's amounts): each value
an outside review found answering 500 is a 400 naming its parameter; and the small leaks it found (document
counts on /metrics and /healthz, which account names exist, the client `salt`, deposits into house accounts)."""

from __future__ import annotations

import json

import pytest
from server_support import LiveServer, parse_metrics
from web_support import WebClient

from kvmart.reuse.samples import sample_text

MODEL = "builtin:tiny"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0}
COMPLETION = {"model": MODEL, "prompt": "Hi", "max_tokens": 2, "temperature": 0}
MESSAGE = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0}
ENDPOINTS = {"/v1/chat/completions": CHAT, "/v1/completions": COMPLETION, "/v1/messages": MESSAGE}


@pytest.fixture(scope="module")
def live(model_f32, tmp_path_factory):
    with LiveServer(model_f32, tmp_path_factory.mktemp("params"), default_max_tokens=2) as server:
        server.admin_key = server.services.ledger.admin_key_issued
        yield server


def error_of(response) -> tuple[str, str | None]:
    """(message, param) of an OpenAI- or Anthropic-shaped error body."""
    body = response.json()
    error = body["error"]
    return error["message"], error.get("param")


def nested(depth: int) -> object:
    value: object = "deep"
    for _ in range(depth):
        value = [value]
    return value


# (what, endpoints, fields changed, the parameter the 400 must name)
CASES = [
    ("temperature 1e-300", list(ENDPOINTS), {"temperature": 1e-300}, "temperature"),
    ("temperature 2 with top_p 1e-300", ["/v1/chat/completions", "/v1/completions"], {"temperature": 2,
                                                                                      "top_p": 1e-300}, "top_p"),
    ("top_p 1e-300", ["/v1/messages"], {"temperature": 1, "top_p": 1e-300}, "top_p"),
    ("seed 2**70", ["/v1/chat/completions", "/v1/completions"], {"seed": 2**70}, "seed"),
    ("a client salt", list(ENDPOINTS), {"salt": "copied-from-tenant-a"}, "salt"),
]


@pytest.mark.parametrize("what, endpoints, fields, param", CASES, ids=[c[0] for c in CASES])
def test_hostile_numbers_are_a_400_naming_the_parameter(live, what, endpoints, fields, param):
    for endpoint in endpoints:
        response = live.http.post(endpoint, json={**ENDPOINTS[endpoint], **fields})
        assert response.status_code == 400, (endpoint, response.text)
        message, named = error_of(response)
        assert param in message and (named == param or endpoint == "/v1/messages"), (endpoint, message, named)


def test_a_lone_surrogate_is_a_400_naming_where_it_is(live):
    for endpoint, where in (("/v1/chat/completions", "messages.0.content"), ("/v1/messages", "messages.0.content"),
                            ("/v1/completions", "prompt")):
        raw = json.dumps(ENDPOINTS[endpoint]).replace('"Hi"', '"Hi \\ud800 there"')  # valid JSON, not text
        response = live.http.post(endpoint, content=raw, headers={"content-type": "application/json"})
        assert response.status_code == 400, (endpoint, response.text)
        message, _ = error_of(response)
        assert "lone surrogate" in message and where in message, message


@pytest.mark.parametrize("depth", [40, 100_000])
def test_deeply_nested_json_is_a_400(live, depth):
    body = json.dumps({**CHAT, "metadata": nested(depth)}) if depth < 1000 else (
        json.dumps(CHAT)[:-1] + ', "metadata": ' + "[" * depth + "]" * depth + "}")
    for endpoint in ENDPOINTS:
        response = live.http.post(endpoint, content=body, headers={"content-type": "application/json"})
        assert response.status_code == 400 and "nested too deeply" in error_of(response)[0], response.text[:300]


def test_nan_and_infinity_are_not_json_numbers(live):
    for constant in ("NaN", "Infinity", "-Infinity"):
        body = json.dumps(CHAT).replace('"temperature": 0', f'"temperature": {constant}')
        response = live.http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        assert response.status_code == 400 and constant in error_of(response)[0], response.text


def test_the_web_forms_max_tokens_takes_ascii_digits_only(live):
    doc = live.publish(sample_text("bsd-3-clause")).json()
    client = WebClient(live.url)
    try:
        client.sign_in(live.agent_key)
        for value in ("²", "١٢", "1e3", "-1"):
            response = client.post("/ask", document=doc["id"], question="Who?", max_tokens=value)
            assert response.status_code == 400, (value, response.text)
            assert "max_tokens" in response.text
    finally:
        client.close()


# -- money read from outside ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def depositor(live) -> str:
    live.account("depositor", "agent", usd="0")
    return "depositor"


@pytest.mark.parametrize("usd, why", [("1e10", "at most"), (1e10, "at most"), ("1000001", "at most"),
                                      ("1_000", "plain decimal"), ("١٠", "plain decimal"), ("1 000", "plain decimal"),
                                      ("0x10", "plain decimal"), ("NaN", "plain decimal"), ("0", "positive")])
def test_a_deposit_is_a_plain_amount_within_the_maximum(live, depositor, usd, why):
    response = live.http.post("/v1/accounts/depositor/deposits", json={"usd": usd},
                              headers={"Authorization": f"Bearer {live.admin_key}"})
    assert response.status_code == 400, response.text
    message, param = error_of(response)
    assert why in message and param == "usd", (message, param)
    assert live.services.ledger.account("depositor").balance_nanousd == 0 and live.services.ledger.health().is_sound


def test_deposits_go_to_publishers_and_agents_only(live):
    admin = {"Authorization": f"Bearer {live.admin_key}"}
    for house in ("provider", "external", "admin"):
        response = live.http.post(f"/v1/accounts/{house}/deposits", json={"usd": "5"}, headers=admin)
        assert response.status_code == 400 and "publisher and agent accounts" in error_of(response)[0]
    assert live.http.post("/v1/accounts/agent/deposits", json={"usd": "1000000"}, headers=admin).status_code == 201
    assert live.services.ledger.health().is_sound


# -- small leaks and mismatches -------------------------------------------------------------------------------------
def test_readers_answer_alike_for_a_missing_account_and_any_other_refusal(live):
    """A publisher naming readers learns nothing about which account names exist beyond those it may grant."""
    answers = {}
    for name in ("no-such-account", "provider", "external", "admin"):
        response = live.publish("Private notes.", licence="private", readers=[name])
        assert response.status_code == 400
        answers[name] = error_of(response)[0].replace(repr(name), "NAME")
    assert len(set(answers.values())) == 1, answers
    live.account("a-real-reader", "agent")
    assert live.publish("Private notes.", licence="private", readers=["a-real-reader"]).status_code == 201


def test_metrics_and_healthz_count_private_documents_for_the_admin_only(live):
    import httpx

    owner = live.account("counted-publisher", "publisher")
    live.publish("A public document for the counts.")
    live.publish("A private document for the counts.", key=owner, licence="private")
    everyone = live.services.catalog.documents()
    public = [d for d in everyone if not d.is_salted]
    assert len(everyone) > len(public)
    anonymous = httpx.Client(base_url=live.url, timeout=60)
    admin = {"Authorization": f"Bearer {live.admin_key}"}
    for headers, expected in (({}, len(public)), ({"Authorization": f"Bearer {live.agent_key}"}, len(public)),
                              ({"Authorization": "Bearer kvm_not-a-key"}, len(public)), (admin, len(everyone))):
        assert anonymous.get("/healthz", headers=headers).json()["documents"] == expected
        metrics = parse_metrics(anonymous.get("/metrics", headers=headers).text)
        assert metrics["kvmart_documents"] == expected, (headers, expected)
    anonymous.close()


def test_a_role_is_named_with_its_article(live):
    response = live.publish("An agent may not publish.", key=live.agent_key)
    assert response.status_code == 403 and "is an agent; this needs a publisher account" in error_of(response)[0]
