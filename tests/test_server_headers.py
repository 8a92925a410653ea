"""The headers every response carries (kvmart/server/headers.py), read through the official clients' own accessors:
the request id (`_request_id`, an error's `request_id`), the rate-limit headers each client family names, and
CORS when `--cors-origin` is set."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import anthropic
import httpx
import openai
import pytest
from server_support import LiveServer

from kvmart.errors import ConfigError, RateLimitedError
from kvmart.server.config import ServerSettings
from kvmart.server.headers import budget_headers, duration_text
from kvmart.server.limits import KeyLimiter

MODEL = "builtin:tiny"
ORIGIN = "https://agents.example"
BURST = 3


@pytest.fixture(scope="module")
def live(model_f32, tmp_path_factory):
    # one request per minute after a burst of 3: the bucket refills one request a minute, far slower than the test
    with LiveServer(model_f32, tmp_path_factory.mktemp("serve-headers"), rate_limit_per_minute=1,
                    rate_limit_burst=BURST, cors_origin=ORIGIN) as server:
        yield server


def test_openai_clients_read_the_request_id_and_the_rate_limit(live):
    client = openai.OpenAI(base_url=live.url + "/v1", api_key=live.account("oa", "agent"), max_retries=0)
    raw = client.models.with_raw_response.list()
    assert raw.headers["x-request-id"].startswith("req_")
    assert raw.parse()._request_id == raw.headers["x-request-id"]
    assert raw.headers["x-ratelimit-limit-requests"] == "1"
    assert int(raw.headers["x-ratelimit-remaining-requests"]) == BURST - 1
    assert raw.headers["x-ratelimit-reset-requests"].endswith("s")
    again = client.models.with_raw_response.list()
    assert again.headers["x-request-id"] != raw.headers["x-request-id"]
    assert int(again.headers["x-ratelimit-remaining-requests"]) < int(raw.headers["x-ratelimit-remaining-requests"])
    with pytest.raises(openai.RateLimitError) as caught:
        for _ in range(BURST):
            client.models.list()
    refused = caught.value
    assert refused.request_id == refused.response.headers["x-request-id"]
    assert refused.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert int(refused.response.headers["retry-after"]) >= 1


def test_anthropic_clients_read_request_id_and_their_rate_limit_names(live):
    client = anthropic.Anthropic(base_url=live.url, api_key=live.account("an", "agent"), max_retries=0)
    raw = client.messages.with_raw_response.count_tokens(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert raw.request_id == raw.headers["request-id"] == raw.headers["x-request-id"]
    assert raw.parse()._request_id == raw.headers["request-id"]
    assert raw.headers["anthropic-ratelimit-requests-limit"] == "1"
    assert int(raw.headers["anthropic-ratelimit-requests-remaining"]) == BURST - 1
    reset = datetime.strptime(raw.headers["anthropic-ratelimit-requests-reset"], "%Y-%m-%dT%H:%M:%SZ")
    assert reset.replace(tzinfo=UTC) > datetime.now(UTC)
    assert "x-ratelimit-limit-requests" not in raw.headers
    with pytest.raises(anthropic.NotFoundError) as caught:  # /v1/models: the client's version header says Anthropic
        client.models.retrieve("claude-nonexistent")
    assert caught.value.request_id.startswith("req_") and caught.value.request_id != raw.request_id
    assert "anthropic-ratelimit-requests-remaining" in caught.value.response.headers


def test_pages_and_unauthenticated_requests_get_an_id_and_no_budget(live):
    page = httpx.get(live.url + "/healthz")
    assert page.headers["x-request-id"].startswith("req_") and "x-ratelimit-limit-requests" not in page.headers
    anonymous = httpx.get(live.url + "/v1/models")
    assert anonymous.status_code == 401 and anonymous.headers["x-request-id"]


def test_cors_preflight_and_exposed_headers_for_the_configured_origin(live):
    preflight = httpx.options(live.url + "/v1/chat/completions", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in preflight.headers["access-control-allow-methods"]
    listed = httpx.get(live.url + "/v1/models", headers={"Origin": ORIGIN,
                                                        "Authorization": f"Bearer {live.account('web', 'agent')}"})
    assert listed.headers["access-control-allow-origin"] == ORIGIN
    exposed = {h.strip() for h in listed.headers["access-control-expose-headers"].split(",")}
    assert {"x-request-id", "x-ratelimit-remaining-requests"} <= exposed
    assert "access-control-allow-credentials" not in listed.headers  # keys travel in headers, never cookies
    other = httpx.options(live.url + "/v1/models", headers={"Origin": "https://elsewhere.example",
                                                            "Access-Control-Request-Method": "GET"})
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers


def test_no_cors_headers_unless_an_origin_is_configured(model_f32, tmp_path):
    with LiveServer(model_f32, tmp_path) as server:
        response = httpx.get(server.url + "/v1/models", headers={"Origin": ORIGIN,
                                                                 "Authorization": f"Bearer {server.agent_key}"})
        assert response.status_code == 200 and "access-control-allow-origin" not in response.headers
        assert "x-ratelimit-limit-requests" not in response.headers  # no per-minute limit, no budget to tell


def test_cors_origins_are_checked():
    assert ServerSettings(cors_origin="https://a.example, http://b.example:3000").cors_origins == (
        "https://a.example", "http://b.example:3000")
    with pytest.raises(ConfigError, match="not an origin"):
        ServerSettings(cors_origin="a.example")


def test_the_budget_follows_the_bucket():
    now = [0.0]
    limiter = KeyLimiter(per_minute=60, burst=2, max_concurrent=0, clock=lambda: now[0])
    assert limiter.budget("k") is not None and limiter.budget("k").remaining == 2  # never seen: a full bucket
    limiter.acquire("k")
    limiter.release("k")
    limiter.acquire("k")
    limiter.release("k")
    empty = limiter.budget("k")
    assert (empty.limit_per_minute, empty.remaining, empty.reset_seconds) == (60, 0, 2.0)
    with pytest.raises(RateLimitedError):
        limiter.acquire("k")
    now[0] = 1.5
    assert limiter.budget("k").remaining == 1 and limiter.budget("k").reset_seconds == pytest.approx(0.5)
    assert KeyLimiter(per_minute=0, burst=0, max_concurrent=4).budget("k") is None


def test_budget_headers_in_each_family():
    from kvmart.server.limits import Budget

    budget = Budget(600, 59, 61.2)
    assert budget_headers(budget, anthropic=False) == {"x-ratelimit-limit-requests": "600",
                                                       "x-ratelimit-remaining-requests": "59",
                                                       "x-ratelimit-reset-requests": "1m2s"}
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert budget_headers(budget, anthropic=True, now=now)["anthropic-ratelimit-requests-reset"] == \
        (now + timedelta(seconds=62)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert [duration_text(s) for s in (0, 0.2, 59, 60, 3723)] == ["0s", "1s", "59s", "1m0s", "1h2m3s"]
