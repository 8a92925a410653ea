"""HTTP behaviour of the whole server (kvmart/server/app.py): bad input, the queue limit (429), clients that go away,
graceful shutdown, the hot tier's hits and misses, /metrics and /healthz."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import ExitStack

import httpx
import pytest
from server_support import DEADLINE_SECONDS, LiveServer, wait_until

from kvmart.reuse.samples import sample_text

MODEL = "builtin:tiny"
DOC = sample_text("bsd-3-clause")


def chat(doc_id: str | None = None, **fields) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Who holds the copyright?"}], "max_tokens": 8,
            "temperature": 0, **fields}
    if doc_id:
        body["documents"] = [doc_id]
    return body


@pytest.fixture(scope="module")
def live(model_f32, tmp_path_factory):
    with LiveServer(model_f32, tmp_path_factory.mktemp("serve-http"), max_body_bytes=64 * 1024) as server:
        yield server


@pytest.fixture(scope="module")
def doc(live) -> dict:
    return live.publish(DOC).json()


def test_malformed_json_and_invalid_fields_are_400_never_422(live):
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        response = live.http.post("/v1/chat/completions", content=raw)
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"
    response = live.http.post("/v1/chat/completions", json={"model": MODEL})
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"
    response = live.http.post("/v1/chat/completions", json=chat(temperature=5))
    assert response.status_code == 400 and response.json()["error"]["param"] == "temperature"


def test_prompt_too_long_says_by_how_much(live, doc):
    response = live.http.post("/v1/chat/completions", json=chat(doc["id"]))
    prompt_tokens = response.json()["usage"]["prompt_tokens"]
    too_many = live.http.post("/v1/chat/completions", json=chat(doc["id"], max_tokens=4096 - prompt_tokens + 25))
    error = too_many.json()["error"]
    assert too_many.status_code == 400 and error["code"] == "context_length_exceeded"
    assert "(25 too many)" in error["message"], error["message"]


def test_oversized_body_is_413(live):
    response = live.http.post("/v1/chat/completions", json=chat(padding="x" * 100_000))
    assert response.status_code == 413 and "65,536 bytes" in response.json()["error"]["message"]
    assert live.http.get("/healthz").status_code == 200


def test_unknown_document_is_404_and_unknown_route_is_json(live):
    response = live.http.post("/v1/chat/completions", json=chat("doc_does_not_exist"))
    assert response.status_code == 404 and "doc_does_not_exist" in response.json()["error"]["message"]
    assert live.http.get("/v1/nothing").status_code == 404 and "error" in live.http.get("/v1/nothing").json()


def test_hot_tier_hits_after_the_first_load_and_metrics_count_them(live, doc):
    chunks = live.services.catalog.get(doc["id"]).chunks
    for _, key in chunks:
        live.services.hot.discard(key)
    before = live.metrics()
    tiers = [live.http.post("/v1/chat/completions", json=chat(doc["id"])).json()["usage"]["kvmart"]["cache"]
             for _ in range(3)]
    after = live.metrics()
    assert tiers == ["store", "ram", "ram"]

    def grew(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert grew('kvmart_cache_hits_total{tier="store"}') == 1 and grew('kvmart_cache_hits_total{tier="ram"}') == 2
    # per request by its slowest chunk, and per chunk; the store here has no tiers of its own
    assert grew('kvmart_reads_by_tier_total{tier="store"}') == 1 and grew('kvmart_reads_by_tier_total{tier="hot"}') == 2
    assert grew('kvmart_chunk_reads_total{tier="store"}') == len(chunks)
    assert grew('kvmart_chunk_reads_total{tier="hot"}') == 2 * len(chunks)
    assert grew("kvmart_hot_misses_total") == len(chunks) and grew("kvmart_hot_hits_total") == 2 * len(chunks)
    assert grew('kvmart_prompt_tokens_total{source="cache"}') == 3 * doc["num_tokens"]
    assert grew('kvmart_http_requests_total{endpoint="/v1/chat/completions",status="200"}') == 3
    assert after["kvmart_hot_bytes"] > 0 and after["kvmart_prefill_seconds_saved_total"] > 0
    assert grew('kvmart_time_to_first_token_seconds_count{endpoint="chat"}') == 3


def test_a_read_is_counted_by_the_slowest_tier_any_of_its_chunks_came_from(live, doc):
    chunks = live.services.catalog.get(doc["id"]).chunks
    assert len(chunks) >= 2
    live.http.post("/v1/chat/completions", json=chat(doc["id"]))  # every chunk in the hot tier
    live.services.hot.discard(chunks[-1][1])  # all but the last
    before = live.metrics()
    assert live.http.post("/v1/chat/completions", json=chat(doc["id"])).json()["usage"]["kvmart"]["cache"] == "ram+store"
    after = live.metrics()

    def grew(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert grew('kvmart_reads_by_tier_total{tier="store"}') == 1 and grew('kvmart_reads_by_tier_total{tier="hot"}') == 0
    assert grew('kvmart_chunk_reads_total{tier="hot"}') == len(chunks) - 1
    assert grew('kvmart_chunk_reads_total{tier="store"}') == 1


def test_a_zero_byte_hot_tier_loads_from_the_store_every_time(model_f32, tmp_path):
    with LiveServer(model_f32, tmp_path / "data", ram_cache_bytes=0) as server:
        doc_id = server.publish(DOC).json()["id"]
        tiers = [server.http.post("/v1/chat/completions", json=chat(doc_id)).json()["usage"]["kvmart"]["cache"]
                 for _ in range(2)]
        assert tiers == ["store", "store"] and server.metrics()["kvmart_hot_entries"] == 0


def test_requests_beyond_the_queue_get_429_with_retry_after(model_f32, tmp_path):
    with LiveServer(model_f32, tmp_path / "data", max_active=1, max_queue=1) as server:
        with ThreadPoolExecutor(4) as pool:
            with server.services.worker.hold():  # nothing runs: two requests fill the queue, two are refused
                futures = [pool.submit(server.http.post, "/v1/chat/completions", json=chat()) for _ in range(4)]
                first_two = _first(futures, 2)
            refused = [f.result() for f in first_two]
            accepted = [f.result() for f in futures if f not in first_two]
        assert [r.status_code for r in refused] == [429, 429]
        for response in refused:
            assert int(response.headers["retry-after"]) >= 1
            assert response.json()["error"]["code"] == "rate_limit_exceeded"
        assert [r.status_code for r in accepted] == [200, 200]
        assert server.metrics()["kvmart_rejected_requests_total"] == 2


def _first(futures, count: int) -> list:
    done = []
    for future in as_completed(futures, timeout=DEADLINE_SECONDS):
        done.append(future)
        if len(done) == count:
            return done
    raise AssertionError("fewer responses than expected")


def test_a_client_leaving_mid_stream_leaves_the_server_healthy(model_f32, tmp_path):
    with LiveServer(model_f32, tmp_path / "data") as server:
        worker = server.services.worker
        with ExitStack() as paused:
            with server.http.stream("POST", "/v1/chat/completions", json=chat(max_tokens=3000, stream=True)) as stream:
                assert next(stream.iter_lines()).startswith("data: ")
                paused.enter_context(worker.hold())  # the job is mid-answer: 3,000 tokens cannot be done yet
            wait_until(lambda: server.metrics().get("kvmart_cancelled_requests_total", 0) == 1, "the disconnect")
        wait_until(lambda: worker.depth() == (0, 0), "the cancelled job to end")
        assert worker.cancelled_jobs == 1
        assert server.http.get("/healthz").json()["status"] == "ok"
        assert server.http.post("/v1/chat/completions", json=chat()).status_code == 200


def test_a_client_that_stops_reading_blocks_nobody(live, doc):
    worker = live.services.worker
    with live.http.stream("POST", "/v1/chat/completions", json=chat(doc["id"], max_tokens=3000, stream=True)):
        # this client reads nothing more; its answer (3,000 tokens) keeps being generated into its own queue
        other = live.http.post("/v1/chat/completions", json=chat(doc["id"]))
        assert other.status_code == 200
        wait_until(lambda: worker.depth()[0] <= 1, "the answered request's job to end")
        assert worker.depth()[0] == 1  # the unread answer is still being generated: the two took turns
    wait_until(lambda: worker.depth() == (0, 0), "the abandoned answer to be cancelled")


def test_shutdown_finishes_requests_in_flight(model_f32, tmp_path):
    with LiveServer(model_f32, tmp_path / "data") as server:
        worker = server.services.worker
        with ThreadPoolExecutor(1) as pool:
            with worker.hold():
                in_flight = pool.submit(_stream_all, server.url, chat(max_tokens=12, stream=True), server.agent_key)
                wait_until(lambda: sum(worker.depth()) == 1, "the request to be queued")
                server.server.should_exit = True
                wait_until(lambda: _refused(server.url), "the server to stop listening")
            events = in_flight.result(timeout=DEADLINE_SECONDS)
        server.thread.join(DEADLINE_SECONDS)
        assert not server.thread.is_alive() and not worker.is_alive()
    assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] in ("stop", "length")


def _stream_all(url: str, body: dict, key: str) -> list[str]:
    with (httpx.Client(base_url=url, timeout=DEADLINE_SECONDS, headers={"Authorization": f"Bearer {key}"}) as client,
          client.stream("POST", "/v1/chat/completions", json=body) as response):
        assert response.status_code == 200
        return [line.removeprefix("data: ") for line in response.iter_lines() if line]


def _refused(url: str) -> bool:
    """Whether the server has stopped taking requests: a refused connection, or one it closes without a whole
    response (it was closing as the probe arrived). A probe that merely waits (a timeout) proves nothing."""
    try:
        httpx.get(url + "/healthz", timeout=DEADLINE_SECONDS)
    except httpx.TimeoutException:
        return False
    except httpx.TransportError:  # ConnectError, RemoteProtocolError, ReadError...: not serving any more
        return True
    return False
