"""The vllm engine's plumbing that needs no vLLM (tests/test_vllm.py runs the real engine): the async runner and
its streams (engines/vllm_async.py) over a stand-in for vLLM's AsyncLLM, the worker waking from an engine's wait,
how the server passes vLLM's tokens and logprobs on (server/pipeline/vllm.py), and the rule that a private
document is reused only by name, with its own salt (engines/vllm.py)."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import pytest
import torch

from kvmart.engines.vllm import PARAMS_KEY, Reusable, document_prefix, request_params, reusable_prefix, salt_matches
from kvmart.engines.vllm_async import Runner
from kvmart.format.keys import cache_id as make_cache_id
from kvmart.reuse.catalog import Catalog, Document
from kvmart.store import Entry
from kvmart.store.memory import MemoryStore

DEADLINE_SECONDS = 60  # against hangs only: every wait below ends on a signal


def output(tokens: list[int], finished: bool = False, logprobs=None) -> SimpleNamespace:
    """Shaped like vLLM's RequestOutput, as far as kvmart reads it."""
    return SimpleNamespace(outputs=[SimpleNamespace(token_ids=tokens, logprobs=logprobs)], finished=finished,
                           num_cached_tokens=0, kv_transfer_params=None)


class FakeLLM:
    """Stands in for AsyncLLM: each request's outputs are what the test puts in its queue (None ends it)."""

    def __init__(self) -> None:
        self.queues: dict[str, asyncio.Queue] = {}
        self.started = threading.Semaphore(0)
        self.cancelled: list[str] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self.is_shut_down = False

    async def generate(self, prompt, params, request_id: str):  # noqa: ARG002
        queue = self.queues[request_id] = asyncio.Queue()
        self.loop = asyncio.get_running_loop()
        self.started.release()
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                yield item
        except asyncio.CancelledError:
            self.cancelled.append(request_id)
            raise

    def put(self, request_id: str, item) -> None:
        assert self.loop is not None
        self.loop.call_soon_threadsafe(self.queues[request_id].put_nowait, item)

    def shutdown(self) -> None:
        self.is_shut_down = True


@pytest.fixture
def runner():
    fake = FakeLLM()
    made = Runner(lambda: fake)
    yield made, fake
    made.close()


def submit(runner: Runner, fake: FakeLLM, request_id: str):
    stream = runner.submit(request_id, {"prompt_token_ids": [1, 2]}, None)
    assert fake.started.acquire(timeout=DEADLINE_SECONDS)
    return stream


def test_streams_get_their_outputs_as_they_come_and_concurrently(runner):
    made, fake = runner
    a, b = submit(made, fake, "a"), submit(made, fake, "b")  # both held by the engine at once
    assert a.take() == [] and not a.finished and a.is_live
    fake.put("b", output([7]))
    made.wait(DEADLINE_SECONDS)  # returns because b has something: a's outputs are not needed for it
    assert [o.outputs[0].token_ids for o in b.take()] == [[7]] and a.take() == []
    fake.put("a", output([1]))
    fake.put("a", output([2]))
    fake.put("a", None)
    a.wait(DEADLINE_SECONDS)
    taken = []
    while not a.finished:
        a.wait(DEADLINE_SECONDS)
        taken += a.take()
    assert [o.outputs[0].token_ids for o in taken] == [[1], [2]] and not a.is_live
    assert b.is_live and not b.finished  # b goes on, untouched by a's end
    b.abort()


def test_an_aborted_stream_cancels_its_request(runner):
    made, fake = runner
    stream = submit(made, fake, "gone")
    stream.abort()
    stream.abort()  # idempotent
    assert stream.finished and stream.take() == []
    made.call(lambda: asyncio.sleep(0))  # the cancellation has run on the loop by the time this call is done
    assert fake.cancelled == ["gone"]


def test_an_error_comes_after_the_outputs_before_it(runner):
    made, fake = runner
    stream = submit(made, fake, "fails")
    fake.put("fails", output([3]))
    fake.put("fails", RuntimeError("engine dead"))
    outputs: list = []
    with pytest.raises(RuntimeError, match="engine dead"):
        while True:
            stream.wait(DEADLINE_SECONDS)
            outputs += stream.take()
    assert [o.outputs[0].token_ids for o in outputs] == [[3]] and stream.finished


def test_wake_ends_a_wait_and_nothing_is_left_ready(runner):
    made, fake = runner
    stream = submit(made, fake, "idle")
    waited = threading.Event()
    thread = threading.Thread(target=lambda: (made.wait(DEADLINE_SECONDS), waited.set()))
    thread.start()
    made.wake()
    assert waited.wait(DEADLINE_SECONDS)
    thread.join()
    assert made.ready == set()  # a wait after this one would block: nothing has anything to take
    stream.abort()


def test_close_ends_the_loop_and_the_requests_left_open():
    fake = FakeLLM()
    made = Runner(lambda: fake)
    submit(made, fake, "left-open")
    made.close()
    made.close()  # idempotent
    assert fake.is_shut_down and fake.cancelled == ["left-open"] and not made._thread.is_alive()


def test_an_engine_that_fails_to_start_stops_the_loop():
    def fail():
        raise RuntimeError("no model")

    threads = threading.active_count()
    with pytest.raises(RuntimeError, match="no model"):
        Runner(fail)
    assert threading.active_count() == threads


def test_the_worker_is_woken_from_an_engines_wait_by_a_new_job():
    """An engine that computes elsewhere (vLLM) waits inside batch_step; a job queued meanwhile wakes it, so the
    job is admitted at once rather than after the wait (here the wait has no end but the wake)."""
    from kvmart.server.pipeline.worker import Batched, Worker

    woken, waiting = threading.Event(), threading.Event()

    def wait(payloads: list[object]) -> None:  # noqa: ARG001
        waiting.set()
        woken.wait()
        woken.clear()

    def parked_forever():
        while True:
            yield Batched(None)

    worker = Worker(4, 4, batch_step=wait, wake=woken.set)
    worker.start()
    loop = asyncio.new_event_loop()
    try:
        first = worker.submit(parked_forever(), loop)
        assert waiting.wait(DEADLINE_SECONDS)  # the worker waits inside batch_step: only a wake can end it
        second = worker.submit(iter(["second's event"]), loop)
        got = loop.run_until_complete(asyncio.wait_for(anext(second), DEADLINE_SECONDS))
        assert got == "second's event"
        first.cancel()
    finally:
        worker.stop(DEADLINE_SECONDS)
        loop.close()
    assert not worker.is_alive()


def test_tokens_pass_on_as_vllm_makes_them(runner):
    """The server's view of a vLLM request: (token, logprobs) pairs as outputs come, a Batched whenever none is
    there (the worker then waits), and closing it early aborts the request."""
    from kvmart.server.pipeline.vllm import tokens_of
    from kvmart.server.pipeline.worker import Batched

    made, fake = runner
    stream = submit(made, fake, "r")
    tokens = tokens_of(stream)
    assert isinstance(next(tokens), Batched)  # nothing yet
    fake.put("r", output([5, 6], logprobs=[{5: "lp5"}, {6: "lp6"}]))
    stream.wait(DEADLINE_SECONDS)
    assert [next(tokens), next(tokens)] == [(5, {5: "lp5"}), (6, {6: "lp6"})]
    fake.put("r", output([9]))
    stream.wait(DEADLINE_SECONDS)
    assert next(tokens) == (9, None)
    tokens.close()  # the client went away
    made.call(lambda: asyncio.sleep(0))
    assert fake.cancelled == ["r"] and stream.finished


def test_logprobs_come_from_vllms_ranks():
    from kvmart.server.pipeline.vllm import VllmServerEngine

    engine = object.__new__(VllmServerEngine)
    engine.model = SimpleNamespace(decode=lambda ids: f"<{ids[0]}>")
    lp = lambda value, rank: SimpleNamespace(logprob=value, rank=rank)  # noqa: E731  (vLLM's Logprob)
    step = {4: lp(-2.5, 3), 8: lp(-0.5, 1), 2: lp(-1.0, 2)}  # the chosen token (4) and the top two
    got = engine.logprob(step, 4, 2)
    assert (got.token, got.token_id, got.logprob) == ("<4>", 4, -2.5)
    assert got.top == (("<8>", 8, -0.5), ("<2>", 2, -1.0))  # most likely first, the chosen one only if it ranks
    assert engine.logprob(step, 4, 0).top == () and engine.logprob(step, 4, None) is None


def test_the_vllm_server_engine_refuses_uploaded_artifacts():
    """An upload is verified against the transformers engine's chunked prefill, not vLLM's kernels: refused (400)."""
    from kvmart.errors import UnsupportedParameterError
    from kvmart.server.pipeline.engine import PublishJob
    from kvmart.server.pipeline.vllm import VllmServerEngine

    engine = object.__new__(VllmServerEngine)
    with pytest.raises(UnsupportedParameterError, match="uploaded artifacts are not accepted by the vllm engine"):
        next(engine.publish(PublishJob([1, 2, 3], "title", "source", upload=b"artifact bytes"), "raw"))


# -- which document a prompt reuses ------------------------------------------------------------------------------
FINGERPRINT = "f" * 64
BLOCK = 4


def document(ids: list[int], salt: str = "", terms: str = "") -> Document:
    cid = make_cache_id(FINGERPRINT, ids, salt, terms)
    entry = Entry(cid, "t", "", "m", FINGERPRINT, len(ids), 0, 0.0, 0.0)
    return Document(entry, torch.tensor(ids, dtype=torch.int64), ((len(ids), cid),), bool(salt), terms)


@pytest.fixture
def catalog() -> Catalog:
    return Catalog(MemoryStore(), FINGERPRINT)


def test_a_private_document_is_never_matched_unnamed(catalog):
    private = catalog.insert(document(list(range(100, 112)), salt="tenant-a"))
    prompt = private.token_list() + [1, 2]
    assert reusable_prefix(catalog, prompt, BLOCK) is None  # the connector's rule for a prompt naming nothing
    found = reusable_prefix(catalog, prompt, BLOCK, readable=frozenset({private.cache_id}))
    assert found is not None and found.document is private and found.num_tokens == 12
    public = catalog.insert(document(list(range(100, 106))))  # a public one sharing its start is matched
    found = reusable_prefix(catalog, prompt, BLOCK)
    assert found is not None and found.document is public and found.num_tokens == 4  # in whole blocks


def test_a_named_document_is_checked_against_its_salt():
    private = document(list(range(10)), salt="tenant-a", terms='{"kind":"private"}')
    assert salt_matches(private, FINGERPRINT, "tenant-a")
    assert not salt_matches(private, FINGERPRINT, "tenant-b") and not salt_matches(private, FINGERPRINT, "")
    assert salt_matches(document(list(range(10))), FINGERPRINT, "")


def test_a_named_document_is_reused_in_whole_blocks_leaving_a_token():
    doc = document(list(range(10)))
    assert document_prefix(doc, list(range(10)) + [99], BLOCK).num_tokens == 8
    assert document_prefix(doc, list(range(9)), BLOCK).num_tokens == 8  # the prompt's last token is computed
    assert document_prefix(doc, [0, 1, 2, 7, 8], BLOCK) is None  # less than a block in common


def test_request_params_name_the_document_with_its_salt():
    doc = document(list(range(8)), salt="s")
    assert request_params(document=Reusable(doc, 8, "s")) == {
        PARAMS_KEY: {"document": {"cache_id": doc.cache_id, "salt": "s"}}}
    assert request_params(bypass=True, document=Reusable(doc, 8, "s")) == {PARAMS_KEY: {"bypass": True}}
    assert request_params() == {PARAMS_KEY: {}}
