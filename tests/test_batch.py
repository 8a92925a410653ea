"""Continuous batching is exact: a sequence decoded in a batch with others gets the very bits it gets alone.

How (kvmart/runtime/rows.py): in a decode step the rows of every sequence go through each float32 linear layer in
one oneDNN product over weights reordered once (its rows round alike from 2 rows up: checked on first use, and
by these tests), or, where that does not hold and in bfloat16, in fixed tiles of ROW_TILES rows, one BLAS call per
tile, so a row is computed by a call of the same shape whatever the batch; the attention multiplies the rows of
sequences sharing a document's chunks together where the row counts were checked to round alike
(kvmart/runtime/decode_attention.py), else in fixed tiles; every other operation works row by row. The tests check
what BLAS does not promise (a row's result depends neither on the other rows nor on its place among them, in a call
of fixed shape, or of any row count on the packed route), that the checks refuse a route whose rows differ, then
the whole: batched decoding equals decoding alone, logits and tokens, in both dtypes, on every route, and through
the server's worker."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from kvmart.errors import InconsistentKernelError, InputError
from kvmart.runtime import decode_attention, rows
from kvmart.runtime.model import Model
from kvmart.runtime.rows import ROW_TILES, PackedRows, row_calls, tiled_linear
from kvmart.server.pipeline.worker import Batched, Worker

DTYPES = ("float32", "bfloat16")
# (out, in) of every linear layer of the built-in shapes: tiny, SmolLM2-135M, Qwen3-0.6B (their vocabularies left out:
# the tiny model's own lm_head stands for them, and the model-level tests below run it)
LINEAR_SHAPES = sorted({(64, 64), (32, 64), (128, 64), (64, 128), (2048, 64),
                        (576, 576), (192, 576), (1536, 576), (576, 1536),
                        (2048, 1024), (1024, 1024), (1024, 2048), (3072, 1024), (1024, 3072)})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPES)
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=[f"{o}x{i}" for o, i in LINEAR_SHAPES])
def test_a_rows_product_in_a_tile_depends_on_nothing_else(dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    weight = torch.randn(shape, generator=g).to(dtype)
    tile = ROW_TILES[dtype]
    row = torch.randn(1, shape[1], generator=g).to(dtype)
    results = []
    for place in (0, 1, tile // 2, tile - 1):
        rows = torch.randn(tile, shape[1], generator=g).to(dtype)
        rows[place] = row[0]
        results.append(F.linear(rows, weight)[place])
    results.append(tiled_linear(row, weight, None, tile)[0])  # alone: padded with zeros
    assert all(torch.equal(r, results[0]) for r in results[1:])


def test_without_tiles_float32_rows_round_by_the_batch(dtype="float32"):
    """The control: multiplied untiled, a row alone and the same row among 16 differ (so the test above can fail,
    and the tiles are needed)."""
    g = torch.Generator().manual_seed(0)
    weight, rows = torch.randn(1536, 576, generator=g), torch.randn(16, 576, generator=g)
    assert not torch.equal(F.linear(rows[:1], weight)[0], F.linear(rows, weight)[0])
    assert torch.equal(tiled_linear(rows[:1], weight, None, 16)[0], tiled_linear(rows, weight, None, 16)[0])


needs_packed = pytest.mark.skipif(not rows.packed_available(), reason="this torch has no oneDNN reordered-weight "
                                  "product (torch.ops.mkldnn._reorder_linear_weight); kvmart multiplies by sgemm")


def packed_layer(shape: tuple[int, int], seed: int) -> tuple[torch.nn.Linear, PackedRows]:
    layer = torch.nn.Linear(shape[1], shape[0], bias=False)
    layer.weight.data = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return layer, PackedRows(layer, None)


@needs_packed
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=[f"{o}x{i}" for o, i in LINEAR_SHAPES])
def test_on_the_packed_route_a_row_rounds_alike_in_any_number_of_rows(shape, threads):
    layer, packed = packed_layer(shape, sum(shape))
    g = torch.Generator().manual_seed(1)
    row = torch.randn(1, shape[1], generator=g)
    alone = packed.linear(row, layer.weight, None)[0]
    for count in (2, 3, 16, 17, 40, 65, 129, 300, 600):
        others = torch.randn(count, shape[1], generator=g)
        for place in (0, count // 2, count - 1):
            batch = others.clone()
            batch[place] = row[0]
            assert torch.equal(packed.linear(batch, layer.weight, None)[place], alone), (count, place)
    assert torch.allclose(alone, F.linear(row, layer.weight)[0], rtol=1e-4, atol=1e-4)  # the same product


@needs_packed
def test_on_the_packed_route_a_row_rounds_alike_on_any_number_of_threads(default_threads):
    """Why the packed route is every pass's, prompts included: with sgemm, 256 rows of the Qwen3-0.6B shape's down
    projection (a chunk's worth) round differently on one thread and on two, so a cache computed on one node would
    not be bit-exact with a reader's own prefill on another; on the packed route they agree."""
    if default_threads < 2:
        pytest.skip("one CPU: there is no second thread count to compare with")
    layer, packed = packed_layer((1024, 3072), 0)
    x = torch.randn(256, 3072, generator=torch.Generator().manual_seed(2))
    results = {}
    for threads in (1, default_threads):
        torch.set_num_threads(threads)
        results[threads] = (F.linear(x, layer.weight), packed.linear(x, layer.weight, None))
    torch.set_num_threads(1)
    assert torch.equal(results[1][1], results[default_threads][1])
    assert not torch.equal(results[1][0], results[default_threads][0])  # the control: sgemm does differ


def test_packed_calls_cover_every_row_and_never_take_one_alone():
    for count in [*range(1, 140), 1000]:
        calls = row_calls(count, 64)
        assert [i for a, b in calls for i in range(a, b)] == list(range(count))
        assert all(b - a <= 64 for a, b in calls)
        assert count == 1 or all(b - a >= 2 for a, b in calls)


@needs_packed
def test_float32_models_take_the_packed_route_and_say_so_in_their_fingerprint(model_f32, model_bf16):
    assert model_f32.linear_route == rows.PACKED
    # the route and the instruction set its kernels were picked for: another kind of CPU may round otherwise
    assert model_f32.fingerprint.linear == f"{rows.PACKED} {torch.backends.cpu.get_cpu_capability().lower()}"
    assert model_bf16.linear_route == "sgemm" and "linear" not in model_bf16.fingerprint.as_dict()


@needs_packed
def test_every_thread_multiplies_by_the_models_route(model_f32):
    """The server computes on its worker thread: the route (and so the bits of every cache) is the model's there
    too, not only on the thread that loaded it."""
    from concurrent.futures import ThreadPoolExecutor

    ids = model_f32.tokenize("the holder may copy and share the work, and must keep this notice " * 3)
    here = model_f32.continue_from(None, ids)
    with ThreadPoolExecutor(1) as pool:
        route, there = pool.submit(lambda: (model_f32.linear_route, model_f32.continue_from(None, ids))).result()
    assert route == rows.PACKED
    assert torch.equal(here.logits, there.logits) and here.new_kv.equal(there.new_kv)


@needs_packed
@pytest.mark.parametrize("differs", ["by rows", "by threads"])
def test_a_packed_route_whose_rows_differ_is_not_taken(model_f32, monkeypatch, differs, default_threads):
    """The control: a oneDNN that rounded large calls, or calls on several threads, differently (simulated: one ulp
    off) fails the check, so the model takes sgemm; and a packed route whose check fails under a later thread count
    refuses to compute."""
    if differs == "by threads" and default_threads < 2:
        pytest.skip("one CPU: there is no second thread count to compare with")
    product = rows._packed_product

    def rounding_differently(x, packed, bias):
        out = product(x, packed, bias)
        odd = x.shape[0] > 16 if differs == "by rows" else torch.get_num_threads() > 1
        return torch.nextafter(out, torch.full_like(out, float("inf"))) if odd else out

    monkeypatch.setattr(rows, "_packed_product", rounding_differently)
    torch.set_num_threads(default_threads)
    try:
        output = model_f32.hf_model.get_output_embeddings()
        assert rows.choose(model_f32.hf_model, torch.float32, output) is None
        refused = PackedRows(model_f32.hf_model, output)
        with pytest.raises(InconsistentKernelError, match="threads"):
            refused.linear(torch.ones(3, model_f32.hf_model.config.hidden_size), output.weight, None)
    finally:
        torch.set_num_threads(1)


def test_on_the_sgemm_route_batched_decoding_is_exact_too(load_tiny):
    """The other route (fixed tiles in decode steps), as a model whose check failed takes it: batched equals
    alone."""
    model = load_tiny("float32", fresh=True)
    model.use_sgemm()
    assert model.linear_route == "sgemm" and "linear" not in model.fingerprint.as_dict()
    cases = prompts(model)
    alone = [model.generate(p, q, 4, stop_at_eos=False).token_ids for p, q in cases]
    decoders = [model.begin(p, q, 4, stop_at_eos=False) for p, q in cases]
    for _ in range(3):
        model.step(decoders)
    assert [d.token_ids for d in decoders] == alone


@needs_packed
def test_a_prompts_kv_is_the_same_on_any_number_of_threads(model_f32, default_threads):
    """Caches move between nodes with other core counts: a chunk and a question continued after it give the same
    KV and logits on one thread and on all of them."""
    if default_threads < 2:
        pytest.skip("one CPU: there is no second thread count to compare with")
    ids = model_f32.tokenize(" ".join(f"clause {i}: the holder may copy and share the work." for i in range(60)))
    results = []
    for threads in (1, default_threads):
        torch.set_num_threads(threads)
        chunks = model_f32.prefill_pieces([ids[:256], ids[256:300]])
        results.append((chunks, model_f32.continue_from(chunks, ids[300:337])))
    torch.set_num_threads(1)
    (one, step_one), (many, step_many) = results
    assert all(a.equal(b) for a, b in zip(one, many, strict=True))
    assert step_one.new_kv.equal(step_many.new_kv) and torch.equal(step_one.logits, step_many.logits)


def prompts(model: Model) -> list[tuple[tuple, list[int]]]:
    """(prefix, question ids) of sequences unlike each other: prefixes of 0-3 chunks, questions of 1-40 tokens."""
    ids = model.tokenize(" ".join(f"line {i}: the licence grants and limits rights in turn." for i in range(120)))
    docs = [ids[:300], ids[40:90], ids[:256], ids[5:700], []]
    questions = [ids[300:320], ids[400:405], ids[600:601], ids[700:740], ids[10:30]]
    return [(model.prefill_pieces([d[i:i + 256] for i in range(0, len(d), 256)]) if d else (), q)
            for d, q in zip(docs, questions, strict=True)]


SAMPLING = [dict(temperature=0.0), dict(temperature=0.9, top_p=0.9, seed=5), dict(temperature=0.0),
            dict(temperature=1.0, seed=11), dict(temperature=0.0)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_decoding_in_a_batch_gives_each_sequence_the_bits_it_gets_alone(load_tiny, dtype):
    model = load_tiny(dtype)
    steps = 8
    alone = [model.generate(prefix, q, steps, stop_at_eos=False, **s)
             for (prefix, q), s in zip(prompts(model), SAMPLING, strict=True)]
    decoders = [model.begin(prefix, q, steps, stop_at_eos=False, **s)
                for (prefix, q), s in zip(prompts(model), SAMPLING, strict=True)]
    logits = [[d.logits] for d in decoders]
    passes = model.forward_passes
    for _ in range(steps - 1):
        model.step(decoders)
        for d, seen in zip(decoders, logits, strict=True):
            seen.append(d.logits)
    assert model.forward_passes - passes == steps - 1  # one forward pass per step for all five
    for d, seen, a in zip(decoders, logits, alone, strict=True):
        assert d.token_ids == a.token_ids
        assert all(torch.equal(x, y) for x, y in zip(seen, a.logits, strict=True))


def test_sequences_join_and_leave_a_batch_without_changing_a_bit(model_f32):
    """Continuous batching: a sequence that ends leaves the batch, one that starts joins it mid-way."""
    (p0, q0), (p1, q1), (p2, q2) = prompts(model_f32)[:3]
    alone = [model_f32.generate(p, q, n, stop_at_eos=False).token_ids for p, q, n in ((p0, q0, 9), (p1, q1, 3),
                                                                                      (p2, q2, 6))]
    first, short = model_f32.begin(p0, q0, 9, stop_at_eos=False), model_f32.begin(p1, q1, 3, stop_at_eos=False)
    model_f32.step([first, short])
    model_f32.step([first, short])
    assert short.done
    late = model_f32.begin(p2, q2, 6, stop_at_eos=False)
    for _ in range(6):
        model_f32.step([first, short, late])  # the finished one is skipped
    assert [first.token_ids, short.token_ids, late.token_ids] == alone


@pytest.fixture(params=["1-thread", "default-threads"])
def threads(request, default_threads):
    """BLAS may split a product between threads differently by its shape: check under both."""
    torch.set_num_threads(1 if request.param == "1-thread" else default_threads)
    yield
    torch.set_num_threads(1)  # what conftest sets for the fast tests


@pytest.mark.parametrize("route", ["checked", "refused"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sequences_sharing_a_cached_document_are_batched_exactly(load_tiny, dtype, threads, route, monkeypatch):
    """Requests about one hot document share its chunks (the same tensors): their rows are multiplied by each chunk
    together (kvmart/runtime/decode_attention.py), in one product where the row counts were checked to round alike,
    else in fixed tiles ("refused": the check made to fail, as on a BLAS whose rows differ). Eleven sequences: nine
    on one document (more than a fixed tile holds), two on another; each must decode as it does alone."""
    model = load_tiny(dtype)
    monkeypatch.setattr(decode_attention, "_checked", {})
    if route == "refused":
        monkeypatch.setattr(decode_attention, "_check", lambda *args: False)
    tiles: list[int] = []
    tile = decode_attention._tile
    monkeypatch.setattr(decode_attention, "_tile", lambda q, views, users, n, *rest: (tiles.append(n),
                                                                                       tile(q, views, users, n, *rest)))
    ids = model.tokenize(" ".join(f"clause {i}: the holder may copy, change and share the work." for i in range(90)))
    shared = model.prefill_pieces([ids[:256], ids[256:512], ids[512:600]])
    other = model.prefill_pieces([ids[600:856]])
    cases = [(shared, ids[700 + 7 * i:705 + 9 * i]) for i in range(9)] + [(other, ids[20:41]), (other, ids[50:53])]
    steps = 6
    alone = [model.generate(p, q, steps, stop_at_eos=False) for p, q in cases]
    decoders = [model.begin(p, q, steps, stop_at_eos=False) for p, q in cases]
    logits = [[d.logits] for d in decoders]
    tiles.clear()
    for _ in range(steps - 1):
        model.step(decoders)
        for d, seen in zip(decoders, logits, strict=True):
            seen.append(d.logits)
    for d, seen, a in zip(decoders, logits, alone, strict=True):
        assert d.token_ids == a.token_ids
        assert all(torch.equal(x, y) for x, y in zip(seen, a.logits, strict=True))
    group = model.hf_model.config.num_attention_heads // model.kv_heads
    least = decode_attention.tile_rows(group)
    # nine sequences on one document: one product of their 9 groups of rows where checked, fixed tiles where refused
    assert max(tiles) == (9 * group if route == "checked" else least)


@pytest.mark.parametrize("dtype", DTYPES)
def test_prompt_pieces_packed_together_get_the_bits_each_gets_alone(load_tiny, dtype, threads):
    """Requests' prompt pieces computed in one batch step (Model.continue_many): pieces of 1 to 300 tokens, after a
    cached document, after nothing (the from-scratch kernel), after other chunks; more tokens in all than one packed
    pass takes. Each piece's logits and KV equal `continue_from` alone. float32 packs them (one forward pass for
    several); bfloat16, on sgemm, computes each alone."""
    model = load_tiny(dtype)
    ids = model.tokenize(" ".join(f"clause {i}: the holder may copy, change and share the work." for i in range(150)))
    shared = model.prefill_pieces([ids[:256], ids[256:512]])
    other = model.prefill_pieces([ids[600:856]])
    pieces = [(shared, ids[700:730]), ((), ids[10:50]), (other, ids[900:901]), (shared, ids[1000:1300]),
              (other, ids[905:925]), ((), ids[1300:1600]), (shared, ids[1600:1605]), (other, ids[40:440])]
    alone = [model.continue_from(p, q) for p, q in pieces]
    passes = model.forward_passes
    together = model.continue_many(pieces)
    for a, b in zip(alone, together, strict=True):
        assert torch.equal(a.logits, b.logits) and a.new_kv.equal(b.new_kv)
    packed = dtype == "float32"
    assert model.packs_prompts == packed
    assert model.forward_passes - passes == (2 if packed else len(pieces))  # 1,096 tokens: two packed passes


def test_a_finished_or_empty_decoder_cannot_be_misused(model_f32):
    prefix, q = prompts(model_f32)[1]
    one = model_f32.begin(prefix, q, 1)
    assert one.done and one.cache is None
    model_f32.step([one])  # nothing to do: it is done
    assert len(one.token_ids) == 1
    with pytest.raises(InputError):
        model_f32.begin(prefix, q, 0)


@pytest.mark.parametrize("attention", ["sdpa"])
def test_contiguous_attention_decodes_one_sequence_per_pass_with_the_same_bits(load_tiny, attention):
    model = load_tiny("float32", attention)
    cases = prompts(model)[:3]
    alone = [model.generate(p, q, 5, stop_at_eos=False).token_ids for p, q in cases]
    decoders = [model.begin(p, q, 5, stop_at_eos=False) for p, q in cases]
    passes = model.forward_passes
    for _ in range(4):
        model.step(decoders)
    assert model.forward_passes - passes == 4 * 3
    assert [d.token_ids for d in decoders] == alone


# -- the worker: parked jobs share one batch step ------------------------------------------------------------------


def decoding_job(name: str, tokens: int, log: list[str]):
    for i in range(tokens):
        yield f"{name}{i}"
        if i < tokens - 1:
            yield Batched(name)


async def drain(ticket) -> list:
    return [event async for event in ticket]


def run_jobs(worker: Worker, jobs: dict[str, tuple[int, int]]) -> dict[str, list]:
    """Submit name -> (tokens, memory bytes) jobs while the worker is held (so they start together), drain them."""
    async def scenario():
        loop, log = asyncio.get_running_loop(), []
        with worker.hold():
            tickets = {n: worker.submit(decoding_job(n, t, log), loop, m) for n, (t, m) in jobs.items()}
        return {n: await drain(t) for n, t in tickets.items()}

    worker.start()
    try:
        return asyncio.run(scenario())
    finally:
        worker.stop(timeout_seconds=10)


def test_the_worker_runs_the_parked_jobs_decode_steps_together():
    batches: list[list[object]] = []
    worker = Worker(max_active=8, max_queue=8, batch_step=batches.append)
    events = run_jobs(worker, {"a": (4, 0), "b": (2, 0), "c": (3, 0)})
    assert events == {"a": ["a0", "a1", "a2", "a3"], "b": ["b0", "b1"], "c": ["c0", "c1", "c2"]}
    assert batches == [["a", "b", "c"], ["a", "c"], ["a"]]  # b and then c leave the batch as they end
    assert (worker.batch_steps, worker.batched_payloads) == (3, 6)


def test_with_batching_off_each_parked_job_steps_alone():
    batches: list[list[object]] = []
    worker = Worker(max_active=8, max_queue=8, batch_step=batches.append, batching=False)
    run_jobs(worker, {"a": (3, 0), "b": (3, 0)})
    assert batches == [["a"], ["b"], ["a"], ["b"]]


def test_memory_admits_jobs_in_order_and_the_first_always():
    batches: list[list[object]] = []
    worker = Worker(max_active=8, max_queue=8, batch_step=batches.append, memory_bytes=100)
    # a (60) and b (60) do not fit together: b waits for a; c (30) fits beside b; d (500) is too big for anything but
    # running alone, so it waits until the others end
    run_jobs(worker, {"a": (3, 60), "b": (3, 60), "c": (3, 30), "d": (2, 500)})
    assert batches == [["a"], ["a"], ["b", "c"], ["b", "c"], ["d"]]


def test_a_failed_batch_step_fails_every_job_in_it_and_the_worker_goes_on():
    def failing_step(payloads: list[object]) -> None:
        if "bad" in payloads:
            raise ZeroDivisionError("in the batch")

    worker = Worker(max_active=2, max_queue=8, batch_step=failing_step)

    async def scenario():
        loop = asyncio.get_running_loop()
        with worker.hold():
            tickets = [worker.submit(decoding_job(n, 3, []), loop) for n in ("bad", "fine", "later")]
        outcomes = []
        for ticket in tickets:
            try:
                outcomes.append(await drain(ticket))
            except Exception as e:  # noqa: BLE001
                outcomes.append(type(e).__name__)
        return outcomes

    worker.start()
    try:
        outcomes = asyncio.run(scenario())
    finally:
        worker.stop(timeout_seconds=10)
    assert outcomes == ["InternalError", "InternalError", ["later0", "later1", "later2"]]
    assert worker.failed_jobs == 2


# -- through the server: concurrent requests are batched, and answered as they are alone ---------------------------


def test_concurrent_requests_are_batched_and_answered_exactly_as_alone(model_f32, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from server_support import LiveServer, wait_until

    from kvmart.reuse.samples import sample_text

    with LiveServer(model_f32, tmp_path / "data") as live:
        doc = live.publish(sample_text("bsd-3-clause"), title="bsd").json()
        questions = ["Who holds the copyright?", "May I redistribute it?", "What is disclaimed?", "Name a condition."]
        bodies = [{"model": live.services.model_id, "documents": [doc["id"]], "max_tokens": 8 + 3 * i,
                   "messages": [{"role": "user", "content": q}], "logprobs": True, "top_logprobs": 3,
                   **({"temperature": 0} if i % 2 == 0 else {"temperature": 0.8, "seed": i})}
                  for i, q in enumerate(questions)]

        def answer(body: dict) -> tuple:
            response = live.http.post("/v1/chat/completions", json=body)
            assert response.status_code == 200, response.text
            choice = response.json()["choices"][0]
            return choice["message"]["content"], choice["logprobs"], choice["finish_reason"]

        alone = [answer(body) for body in bodies]  # one at a time: every decode step is a batch of one
        worker, engine, model = live.services.worker, live.services.engine, live.services.model
        assert not engine.batch_prompts  # the default: each prompt chunk its own forward pass
        for batch_prompts in (False, True):
            engine.batch_prompts = batch_prompts
            steps, rows, passes = engine.decode_steps, engine.decode_rows, model.forward_passes
            with ThreadPoolExecutor(len(bodies)) as pool:
                with worker.hold():  # all four queue up, then start together
                    futures = [pool.submit(answer, body) for body in bodies]
                    wait_until(lambda: sum(worker.depth()) == len(bodies), "the requests to queue")
                together = [f.result() for f in futures]
            assert together == alone  # texts, and every logprob (floats, exactly)
            assert engine.decode_rows - rows > engine.decode_steps - steps  # some steps carried several
            # the four questions' prompt pieces: one forward pass each, or one for all four when packed
            prompt_passes = 1 if batch_prompts else len(bodies)
            assert model.forward_passes - passes == prompt_passes + engine.decode_steps - steps
        engine.batch_prompts = False
        metrics = live.metrics()
        assert metrics["kvmart_decode_batch_rows_total"] == engine.decode_rows > metrics[
            "kvmart_decode_batches_total"] == engine.decode_steps


def test_a_batch_step_computes_prompt_pieces_up_to_its_budget_and_the_rest_ask_again():
    """A batch step computes the parked prompt pieces first come first up to PROMPT_TOKENS_PER_STEP tokens (one at
    least), so a first token is not held back by every waiting prompt; a piece left over is asked for again."""
    from kvmart.server.pipeline.engine import PROMPT_TOKENS_PER_STEP, Engine, Piece

    computed: list[list[int]] = []

    class Counting:
        def continue_many(self, items):
            computed.append([len(ids) for _, ids in items])
            return [len(ids) for _, ids in items]  # stands for each piece's Step

        def step(self, decoders):
            raise AssertionError("no decoder was parked")

    from kvmart.server.config import ServerSettings

    fake: Any = Counting()  # stands for the model: only continue_many and step are called
    nothing: Any = None  # the catalogue, hot tier and chunk store: a batch step uses none of them
    engine = Engine(fake, nothing, nothing, nothing, ServerSettings(batch_prompts=True), 256)
    try:
        budget = PROMPT_TOKENS_PER_STEP
        pieces = [Piece((), [7] * n) for n in (budget - 56, 50, 10, budget + 44)]
        for _ in range(3):
            engine.step([p for p in pieces if p.step is None])
        assert computed == [[budget - 56, 50], [10], [budget + 44]]  # the last, alone, beyond the budget
        asking = engine._compute((), [7] * 5, batched=True)
        first, again = next(asking), next(asking)  # not computed yet: it asks again, for the same piece
        assert isinstance(first, Batched) and again.payload is first.payload
        first.payload.step = "done"
        with pytest.raises(StopIteration) as stop:
            next(asking)
        assert stop.value.value == "done"
    finally:
        engine.close()
