"""Per-key limits (kvmart/server/limits.py) and size limits (documents, artifacts, bodies): each refused with the
right HTTP status and a message saying which limit, and each configurable."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from server_support import DEADLINE_SECONDS, LiveServer

from kvmart.errors import ConfigError, RateLimitedError
from kvmart.reuse.samples import sample_text
from kvmart.server.config import ServerSettings, load_server_settings
from kvmart.server.limits import KeyLimiter

BSD = sample_text("bsd-3-clause")


def chat(**fields) -> dict:
    return {"model": "builtin:tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
            "temperature": 0, **fields}


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_allows_a_burst_then_the_rate():
    clock = Clock()
    limiter = KeyLimiter(per_minute=60, burst=3, max_concurrent=0, clock=clock)
    for _ in range(3):
        limiter.acquire("k")
        limiter.release("k")
    with pytest.raises(RateLimitedError) as refused:
        limiter.acquire("k")
    assert refused.value.retry_after_seconds == 1 and "60 requests per minute" in str(refused.value)
    limiter.acquire("other")  # another key has its own bucket
    clock.now += 1.0  # one more token at 1/s
    limiter.acquire("k")
    with pytest.raises(RateLimitedError):
        limiter.acquire("k")


def test_concurrency_limit_counts_requests_in_flight():
    limiter = KeyLimiter(per_minute=0, burst=0, max_concurrent=2)
    limiter.acquire("k")
    limiter.acquire("k")
    with pytest.raises(RateLimitedError, match="2 in flight, the limit is 2"):
        limiter.acquire("k")
    limiter.release("k")
    limiter.acquire("k")


def test_limits_come_from_the_environment_and_are_validated():
    loaded = load_server_settings({"KVMART_RATE_LIMIT_PER_MINUTE": "30", "KVMART_MAX_CONCURRENT_PER_KEY": "2",
                                   "KVMART_MAX_DOCUMENT_TOKENS": "100", "KVMART_MAX_ARTIFACT_BYTES": "1MiB"})
    assert (loaded.rate_limit_per_minute, loaded.max_concurrent_per_key, loaded.max_document_tokens,
            loaded.max_artifact_bytes) == (30, 2, 100, 2**20)
    for bad in ({"max_document_tokens": -1}, {"upload_verify_percent": 0}, {"rate_limit_burst": 0}):
        with pytest.raises(ConfigError):
            ServerSettings(**bad)


def test_a_key_over_its_rate_gets_429_with_retry_after_and_others_are_served(model_f32, tmp_path):
    with LiveServer(model_f32, tmp_path / "data", rate_limit_per_minute=1, rate_limit_burst=2) as live:
        other = live.account("other", "agent")
        codes = [live.http.post("/v1/chat/completions", json=chat()).status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        refused = live.http.post("/v1/chat/completions", json=chat())
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert "rate limit exceeded for this API key" in refused.json()["error"]["message"]
        anthropic = live.http.post("/v1/messages", json={"model": "builtin:tiny", "max_tokens": 2,
                                                        "messages": [{"role": "user", "content": "Hi"}]})
        assert anthropic.status_code == 429 and anthropic.json()["error"]["type"] == "rate_limit_error"
        assert live.http.post("/v1/chat/completions", json=chat(), headers=auth(other)).status_code == 200
        assert live.metrics()["kvmart_rate_limited_requests_total"] == 3
        assert live.http.get("/healthz").status_code == 200  # not a /v1 path: never limited


def test_a_key_over_its_concurrency_gets_429_while_its_requests_run(model_f32, tmp_path):
    with LiveServer(model_f32, tmp_path / "data", max_concurrent_per_key=2) as live:
        other = live.account("other", "agent")
        with ThreadPoolExecutor(3) as pool:
            with live.services.worker.hold():  # two requests held in flight
                held = [pool.submit(live.http.post, "/v1/chat/completions", json=chat()) for _ in range(2)]
                _wait_for_waiting(live, 2)
                third = live.http.post("/v1/chat/completions", json=chat())
                assert third.status_code == 429
                assert "too many concurrent requests" in third.json()["error"]["message"]
                stranger = pool.submit(live.http.post, "/v1/chat/completions", json=chat(), headers=auth(other))
                _wait_for_waiting(live, 3)  # another key is not limited by this one's requests
            assert [f.result().status_code for f in held] == [200, 200] and stranger.result().status_code == 200
        assert live.http.post("/v1/chat/completions", json=chat()).status_code == 200  # released again


def _wait_for_waiting(live, count: int) -> None:
    done = threading.Event()
    for _ in range(int(DEADLINE_SECONDS / 0.01)):
        if sum(live.services.worker.depth()) >= count:
            done.set()
            break
        threading.Event().wait(0.01)
    assert done.is_set(), "the held requests never reached the worker"


def test_documents_and_artifacts_beyond_the_limits_are_413(model_f32, tmp_path):
    with LiveServer(model_f32, tmp_path / "data", max_document_tokens=50) as live:
        long = live.publish(BSD)
        assert long.status_code == 413 and "at most 50 tokens" in long.json()["error"]["message"]
        assert live.publish("A short note.").status_code == 201
        assert live.services.ledger.health().is_sound
    per_token = model_f32.kv_bytes_per_token
    with LiveServer(model_f32, tmp_path / "data2", max_artifact_bytes=per_token * 40) as live:
        big = live.publish(BSD)
        assert big.status_code == 413 and "artifacts of at most" in big.json()["error"]["message"]
        upload = live.publish("A short note.", artifact="QUFB" * (per_token * 20))
        assert upload.status_code == 413 and "uploaded artifact is" in upload.json()["error"]["message"]
        assert live.services.store.entries() == []


def words_filling(model, tokens: int) -> tuple[str, str]:
    """Two texts whose documents are `tokens` and `tokens` + 1 or more ids long (the layout's header included)."""
    from kvmart.runtime.chat import document_ids, layout_for

    layout = layout_for(model.tokenizer)
    size = lambda n: len(document_ids(model.tokenize, layout, " ".join(f"w{i % 97}" for i in range(n))))  # noqa: E731
    low, high = 1, tokens
    while size(high) <= tokens:
        high *= 2
    while low + 1 < high:  # the most words that fit: size(low) <= tokens < size(high)
        middle = (low + high) // 2
        low, high = (middle, high) if size(middle) <= tokens else (low, middle)
    fits, over = (" ".join(f"w{i % 97}" for i in range(n)) for n in (low, high))
    return fits, over


def test_a_document_no_request_could_use_is_refused_before_its_fee(model_f32, tmp_path):
    """A document that leaves no room in the context for a question and an answer is a 413 naming the usable
    limit, with nothing computed or charged; one at the limit is published, and a question on it is answered."""
    from kvmart.runtime.chat import layout_for, question_ids

    room = len(question_ids(model_f32.tokenize, layout_for(model_f32.tokenizer), "?")) + 1
    usable = model_f32.context_tokens - room
    fits, over = words_filling(model_f32, usable)
    with LiveServer(model_f32, tmp_path / "data") as live:
        refused = live.publish(over)
        assert refused.status_code == 413, refused.text
        message = refused.json()["error"]["message"]
        assert f"at most {usable:,} tokens" in message and "question and an answer" in message
        assert live.services.store.entries() == []
        assert live.services.ledger.usage(live.services.ledger.account("publisher")).balance_nanousd == 100 * 10**9
        published = live.publish(fits)
        assert published.status_code == 201 and published.json()["num_tokens"] <= usable
        answer = live.http.post("/v1/chat/completions", json=chat(
            messages=[{"role": "user", "content": "?"}], max_tokens=1, documents=[published.json()["id"]]))
        assert answer.status_code == 200, answer.text


def test_idle_keys_are_forgotten_so_random_keys_cannot_fill_memory(monkeypatch):
    import kvmart.server.limits as limits

    monkeypatch.setattr(limits, "MAX_TRACKED_KEYS", 10)
    limiter = KeyLimiter(per_minute=0, burst=0, max_concurrent=4)
    for i in range(100):
        limiter.acquire(f"key-{i}")
        limiter.release(f"key-{i}")
    assert len(limiter._keys) <= 11
    limiter.acquire("busy")  # a key with requests in flight is kept
    for i in range(100, 120):
        limiter.acquire(f"key-{i}")
        limiter.release(f"key-{i}")
    assert "busy" in limiter._keys


def test_unknown_keys_are_limited_too_no_free_guessing(model_f32, tmp_path):
    with LiveServer(model_f32, tmp_path / "data", rate_limit_per_minute=1, rate_limit_burst=3) as live:
        guessed = [live.http.get("/v1/documents", headers=auth("kvm_guess")).status_code for _ in range(5)]
        assert guessed == [401, 401, 401, 429, 429]


def test_the_web_pages_posts_are_limited_by_session(model_f32, tmp_path):
    from web_support import WebClient

    with LiveServer(model_f32, tmp_path / "data", rate_limit_per_minute=1, rate_limit_burst=3) as live:
        doc = live.publish("Web notes.\n\n" + BSD).json()
        browser = WebClient(live.url)
        browser.sign_in(live.agent_key)  # before signing in, POSTs are not a key's
        asked = [browser.post("/ask", document=doc["id"], question="Who?", max_tokens="2").status_code
                 for _ in range(2)]
        assert asked == [200, 200]
        assert live.http.post("/v1/chat/completions", json=chat()).status_code == 200  # the same key's budget
        assert browser.post("/ask", document=doc["id"], question="Who?", max_tokens="2").status_code == 429
        assert live.http.post("/v1/chat/completions", json=chat()).status_code == 429
        assert browser.get("/").status_code == 200  # pages are read freely
        browser.close()
