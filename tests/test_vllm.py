"""kvmart as a vLLM KV connector, on vLLM's CPU backend: publish documents through vLLM (the connector stores their
KV in kvmart's store), restart the engine (vLLM's in-memory prefix cache is then empty), and ask questions about
them: the documents' KV is loaded from kvmart's store (cached tokens reported) and the greedy tokens equal those of
the same prompts prefilled from scratch by vLLM (prefix caching off, nothing loaded).

Each engine runs in its own process (tests/vllm_driver.py): a fresh process is a real restart, and vLLM spawns
workers that must not inherit pytest. Run with the venv of scripts/install-vllm.sh: `.venv-vllm/bin/python -m
pytest -m vllm tests/test_vllm.py`."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvmart.errors import FingerprintMismatchError
from kvmart.format.artifact import read_artifact, read_manifest
from kvmart.reuse.samples import sample_text
from kvmart.runtime.builtin import TOKENIZER_VOCAB_SIZE, RandomQwen3Spec, _write_atomically, write_random_qwen3
from kvmart.runtime.chat import document_ids, layout_for, question_ids
from kvmart.store.disk import DiskStore

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vllm is not installed in this venv: run scripts/install-vllm.sh, then "
                              ".venv-vllm/bin/python -m pytest -m vllm"),
]

# Qwen3-shaped like builtin:tiny, with a head size vLLM's CPU attention kernels support.
SPEC = RandomQwen3Spec("vllm-test", 256, 2, 4, 2, 64, 512, TOKENIZER_VOCAB_SIZE, 4096,
                       "Qwen3-shaped, 2 layers, head_dim 64, seeded random weights: vLLM tests")
DOCS = [("bsd-3-clause", 1400), ("mpl-2.0", 2500), ("apache-2.0", 1800)]
QUESTIONS = ["Who may use it?", "What must be kept in copies?", "What is a Contributor?"]
MAX_TOKENS = 12
CHUNK = 256  # the first engine's chunked-prefill size: every document spans several steps
CORRUPTED = 2  # this document's artifact gets a flipped bit between the two engines: refused, recomputed
DRIVER = Path(__file__).with_name("vllm_driver.py")
DEADLINE_SECONDS = 900  # vLLM starts in about a minute on 2 CPU cores; a deadline against hangs, not a timing


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("vllm-model") / "model"
    _write_atomically(target, lambda tmp: write_random_qwen3(SPEC, tmp))
    return target


@pytest.fixture(scope="module")
def tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def run_engine(data_dir: Path, folder: Path, **spec) -> dict:
    """One fresh vLLM engine in its own process; what it did."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
           "TOKENIZERS_PARALLELISM": "false"}
    args = json.dumps({"data_dir": str(data_dir), "model": str(folder), **spec})
    done = subprocess.run([sys.executable, str(DRIVER), args], env=env, capture_output=True, text=True,
                          timeout=DEADLINE_SECONDS)
    lines = [line for line in done.stdout.splitlines() if line.startswith("KVMART-RESULT ")]
    assert done.returncode == 0 and lines, f"vLLM run failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
    return json.loads(lines[-1].removeprefix("KVMART-RESULT "))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, folder: Path, tokenizer):
    """Publish every document and answer every question from scratch (first engine), then answer them again in
    a second engine that only has kvmart's store."""
    data_dir = tmp_path_factory.mktemp("vllm-data")
    layout = layout_for(tokenizer)
    tokenize = lambda text: list(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    docs = [document_ids(tokenize, layout, sample_text(name)[:chars]) for name, chars in DOCS]
    prompts = [doc + question_ids(tokenize, layout, q) for doc in docs for q in QUESTIONS[:2]]
    # the first engine prefills in chunks of CHUNK tokens: publishing saves a document once its last chunk is done
    first = run_engine(data_dir, folder, publish=docs, prompts=prompts, bypass=True, max_tokens=MAX_TOKENS,
                       logprobs=1, max_num_batched_tokens=CHUNK)
    corrupt(DiskStore(data_dir / "store"), first["published"][CORRUPTED]["cache_id"])
    second = run_engine(data_dir, folder, publish=docs[:1], prompts=prompts, max_tokens=MAX_TOKENS, logprobs=1)
    return {"data_dir": data_dir, "docs": docs, "prompts": prompts, "first": first, "second": second}


def corrupt(store: DiskStore, cache_id: str) -> None:
    path = store.object_path(cache_id)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01  # in the last layer's values
    path.write_bytes(bytes(data))


def test_publishing_stores_vllm_made_artifacts(runs):
    first, block = runs["first"], runs["first"]["block_size"]
    assert [p["is_new"] for p in first["published"]] == [True] * len(DOCS)
    assert [p["num_tokens"] for p in first["published"]] == [len(d) for d in runs["docs"]]
    assert all(len(d) > CHUNK for d in runs["docs"])  # so each publish was prefilled in several chunks
    assert runs["second"]["published"][0] == {**first["published"][0], "is_new": False}  # stored once
    assert first["fingerprint"]["engine"] == f"vllm {_vllm_version()}; block_size {block}"
    assert first["fingerprint"]["attention"].startswith("vllm:")
    store = DiskStore(runs["data_dir"] / "store")
    for p in first["published"]:
        with store.open(p["cache_id"]) as (f, size):
            manifest, _ = read_manifest(f, size)
        assert manifest.fingerprint == first["fingerprint"] and manifest.fingerprint_digest == first["digest"]
        assert store.entry(p["cache_id"]).prefill_seconds > 0


def test_a_restarted_engine_loads_documents_from_the_store(runs):
    block = runs["first"]["block_size"]
    for _prompt, answer, doc in zip(runs["prompts"], runs["second"]["answers"], _doc_of_each_prompt(runs), strict=True):
        aligned = len(runs["docs"][doc]) // block * block
        assert answer["document"] == runs["first"]["published"][doc]["cache_id"]
        if doc == CORRUPTED:  # refused on load (checksum), recomputed by vLLM, and not metered as cached
            assert answer["cached_tokens"] == 0
        else:
            assert answer["cached_tokens"] == aligned and answer["tier"] == "store"
    for answer in runs["first"]["answers"]:  # from scratch: nothing was loaded
        assert answer["cached_tokens"] == 0


def test_tokens_from_the_store_equal_a_from_scratch_run(runs, record_agreement):
    worst = 0.0
    for scratch, reused in zip(runs["first"]["answers"], runs["second"]["answers"], strict=True):
        assert reused["tokens"] == scratch["tokens"]
        assert len(set(scratch["tokens"])) > 1  # a run that repeats one token would make this vacuous
        for a, b in zip(scratch["logprobs"], reused["logprobs"], strict=True):
            shared = a.keys() & b.keys()
            worst = max([worst, *(abs(a[t] - b[t]) for t in shared)])
    record_agreement(f"vllm: {len(runs['prompts'])} prompts, greedy tokens equal from store and from scratch; "
                     f"largest logprob difference {worst:.3g}")


def test_vllm_artifacts_are_refused_by_the_transformers_engine(runs, folder: Path):
    from kvmart.runtime.fingerprint import model_fingerprint

    store = DiskStore(runs["data_dir"] / "store")
    cache_id = runs["first"]["published"][0]["cache_id"]
    with store.open(cache_id) as (f, size):
        data = f.read()
    assert CORRUPTED != 0
    transformers_fp = model_fingerprint(folder, "float32", "kvmart")
    with pytest.raises(FingerprintMismatchError, match="engine"):
        read_artifact(io.BytesIO(data), len(data), transformers_fp)


def _doc_of_each_prompt(runs) -> list[int]:
    return [i for i in range(len(runs["docs"])) for _ in QUESTIONS[:2]]


def _vllm_version() -> str:
    import vllm

    return vllm.__version__


@pytest.fixture(scope="module")
def served(runs, folder: Path):
    """`kvmart serve --engine vllm` (one vLLM engine for every test below) over the store the runs above filled,
    with its own ledger: an agent, a publisher and two more tenants, each with money."""
    import threading
    from decimal import Decimal

    import uvicorn

    from kvmart.app import create_app
    from kvmart.config import Settings
    from kvmart.ledger import open_ledger
    from kvmart.server import ServerSettings

    patch = pytest.MonkeyPatch()
    patch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    patch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    patch.setenv("OMP_NUM_THREADS", "1")  # as run_engine's: more OpenMP threads than free cores spin, and crawl
    settings = Settings(data_dir=runs["data_dir"], model=str(folder), dtype="float32")
    ledger = open_ledger("", settings.data_dir, environ={})  # the server's own SQLite ledger in the data dir
    keys = {}
    for name, role in (("vllm-agent", "agent"), ("vllm-publisher", "publisher"), ("vllm-reader", "agent"),
                       ("vllm-other", "agent")):
        _, keys[name] = ledger.create_account(name, role)
        ledger.deposit(name, Decimal("1"))
    app = create_app(settings, ServerSettings(port=0, engine="vllm", log_level="warning"))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        _wait(lambda: server.started)
        url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
        yield {"url": url, "ledger": ledger, "keys": keys, "engine": app.state.services.model}
    finally:
        server.should_exit = True
        thread.join(DEADLINE_SECONDS)
        patch.undo()


def _client(served, name: str = "vllm-agent"):
    import httpx

    return httpx.Client(base_url=served["url"], timeout=DEADLINE_SECONDS,
                        headers={"Authorization": f"Bearer {served['keys'][name]}"})


def test_kvmart_serve_on_vllm_meters_the_documents_it_loads(runs, served, folder: Path, tokenizer):
    """A chat request naming a document is answered by vLLM from the stored KV, and usage reports the document's
    cached tokens as the transformers engine does (what the ledger charges)."""
    from decimal import Decimal

    from kvmart.reuse.catalog import document_id

    ledger, block = served["ledger"], runs["first"]["block_size"]
    with _client(served) as http:
        listed = {d["id"] for d in http.get("/v1/documents").json()["data"]}
        published = runs["first"]["published"]
        assert {document_id(p["cache_id"]) for p in published} <= listed
        reply = http.post("/v1/chat/completions", json={
            "model": str(folder), "temperature": 0, "max_tokens": MAX_TOKENS,
            "messages": [{"role": "user", "content": QUESTIONS[0]}],
            "documents": [document_id(published[1]["cache_id"])]}).json()
        usage = reply["usage"]
        assert usage["prompt_tokens"] == len(runs["prompts"][2])
        assert usage["prompt_tokens_details"]["cached_tokens"] == len(runs["docs"][1]) // block * block
        assert usage["kvmart"]["cache"] == "store" and usage["kvmart"]["cache_id"] == published[1]["cache_id"]
        charge = usage["kvmart"]["charge"]  # metered like the transformers engine: the cached tokens at the
        assert Decimal(charge["cache_read_usd"]) > 0 and ledger.verify_receipt(charge["receipt"])  # cache tariff
        assert ledger.usage(ledger.account("vllm-agent")).cached_tokens == usage["prompt_tokens_details"][
            "cached_tokens"]
        scratch = [t for t in runs["first"]["answers"][2]["tokens"] if t != tokenizer.eos_token_id]
        assert reply["choices"][0]["message"]["content"] == tokenizer.decode(scratch, skip_special_tokens=True)


def test_logprobs_are_vllms_own(runs, served, folder: Path):
    """`logprobs` on --engine vllm: each generated token's log-probability and the top ones, as vLLM computed
    them for the same prompt (asked directly of the engine), most likely first."""
    from kvmart.reuse.catalog import document_id

    top = 3
    with _client(served) as http:
        reply = http.post("/v1/chat/completions", json={
            "model": str(folder), "temperature": 0, "max_tokens": MAX_TOKENS, "logprobs": True,
            "top_logprobs": top, "messages": [{"role": "user", "content": QUESTIONS[0]}],
            "documents": [document_id(runs["first"]["published"][1]["cache_id"])]})
    assert reply.status_code == 200, reply.text
    content = reply.json()["choices"][0]["logprobs"]["content"]
    direct = served["engine"].complete(runs["prompts"][2], MAX_TOKENS, logprobs=top)
    decode = served["engine"].decode
    tokens = [t for t in direct.token_ids if t not in served["engine"].eos_ids]
    assert [entry["token"] for entry in content] == [decode([t]) for t in tokens]
    for entry, token, step in zip(content, tokens, direct.logprobs, strict=False):
        assert entry["logprob"] == step[token] <= 0
        best = sorted(step.items(), key=lambda item: -item[1])[:top]
        assert [t["logprob"] for t in entry["top_logprobs"]] == [lp for _, lp in best]
        assert entry["top_logprobs"][0]["logprob"] == entry["logprob"]  # greedy: the chosen one is the likeliest


LONG_TOKENS = 200  # long enough that an answer is still being generated while the test looks


def test_concurrent_requests_reach_vllm_together_and_stream(served, folder: Path):
    """Requests from concurrent clients go to vLLM at once (its scheduler batches them), and their tokens stream
    as vLLM makes them, on the OpenAI and the Anthropic streaming endpoints alike. vLLM's scheduler is paused
    first, so both requests must be inside vLLM together (one request per vLLM call would wait forever for the
    first to end); then each client's answer comes as many events, as vLLM makes its tokens (counted, not timed: when
    a client reads its first token depends on the machine's load)."""
    import json as _json
    import threading

    engine = served["engine"]
    prompts = _long_answers(served, folder, 2)
    bodies = [("/v1/chat/completions", {"model": str(folder), "temperature": 0, "max_tokens": LONG_TOKENS,
                                        "stream": True, "messages": [{"role": "user", "content": prompts[0]}]}),
              ("/v1/messages", {"model": str(folder), "temperature": 0, "max_tokens": LONG_TOKENS, "stream": True,
                                "messages": [{"role": "user", "content": prompts[1]}]})]
    pieces = [0, 0]
    texts, ends, errors = ["", ""], [None, None], []

    def consume(i: int) -> None:
        try:
            with _client(served) as http, http.stream("POST", bodies[i][0], json=bodies[i][1]) as response:
                assert response.status_code == 200, response.read()
                for line in response.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = _json.loads(line.removeprefix("data: "))
                    piece, end = _piece(event)
                    pieces[i] += bool(piece)
                    texts[i] += piece
                    ends[i] = end or ends[i]
        except BaseException as e:  # noqa: BLE001  (reported by the test thread)
            errors.append(e)

    _pause(engine)
    threads = [threading.Thread(target=consume, args=(i,), daemon=True) for i in range(2)]
    try:
        for thread in threads:
            thread.start()
        _wait(lambda: _unfinished(engine) == 2 or bool(errors))  # both inside vLLM at once, none generating yet
    finally:
        _resume(engine)
    for thread in threads:
        thread.join(DEADLINE_SECONDS)
    assert not errors, errors
    assert min(pieces) > LONG_TOKENS // 4, pieces  # streamed as made, not sent as one block at the end
    assert ends == ["length", "max_tokens"] and all(texts), (ends, texts)
    assert _unfinished(engine) == 0


def _long_answers(served, folder: Path, count: int) -> list[str]:
    """`count` questions whose greedy answers run to LONG_TOKENS (no end-of-turn before), asked one at a time."""
    found = []
    with _client(served) as http:
        for i in range(40):
            question = f"Tell me a long story number {i}."
            reply = http.post("/v1/chat/completions", json={
                "model": str(folder), "temperature": 0, "max_tokens": LONG_TOKENS,
                "messages": [{"role": "user", "content": question}]}).json()
            if reply["choices"][0]["finish_reason"] == "length":
                found.append(question)
                if len(found) == count:
                    return found
    raise AssertionError("no question among 40 has a greedy answer of LONG_TOKENS tokens on this model")


def _piece(event: dict) -> tuple[str, str | None]:
    """(text, finish reason) of one streamed event, OpenAI's or Anthropic's."""
    if "choices" in event:
        choice = event["choices"][0] if event["choices"] else {}
        return (choice.get("delta") or {}).get("content") or "", choice.get("finish_reason")
    if event.get("type") == "content_block_delta":
        return event["delta"].get("text", ""), None
    if event.get("type") == "message_delta":
        return "", event["delta"].get("stop_reason")
    return "", None


def _unfinished(engine) -> int:
    """Requests vLLM holds (waiting or running)."""
    return engine.runner.engine.get_num_unfinished_requests()


def _pause(engine) -> None:
    asyncllm = engine.runner.engine
    engine.runner.call(lambda: asyncllm.pause_generation(mode="keep", clear_cache=False))


def _resume(engine) -> None:
    asyncllm = engine.runner.engine
    engine.runner.call(asyncllm.resume_generation)


def test_private_documents_are_reused_by_their_readers_only(served, folder: Path, tokenizer):
    """A private document published through --engine vllm is stored under its publisher's tenant salt; a reader
    it names reuses it from the store; another tenant cannot name it (404), and a prompt that merely repeats its
    tokens reuses nothing of it: the connector loads a private document only when named with its own salt, and
    vLLM's own prefix cache is salted per tenant."""
    from kvmart.engines.vllm import Reusable, drain, request_params

    engine, ledger = served["engine"], served["ledger"]
    # no public document shares a block with it (the public mpl-2.0 one above would, were its start the same)
    text = "Confidential: this copy belongs to the vllm-publisher tenant.\n\n" + sample_text("mpl-2.0")[:1300]
    with _client(served, "vllm-publisher") as http:
        answer = http.post("/v1/documents", json={"text": text, "title": "private", "licence": "private",
                                                  "readers": ["vllm-reader"]})
    assert answer.status_code == 201, answer.text
    doc_id, cache_id = answer.json()["id"], answer.json()["cache_id"]
    document = engine.catalog.get(doc_id)
    assert document.is_salted and document.cache_id == cache_id
    block = engine.block_size
    aligned = document.num_tokens // block * block
    question = {"model": str(folder), "temperature": 0, "max_tokens": 4,
                "messages": [{"role": "user", "content": QUESTIONS[0]}]}
    with _client(served, "vllm-reader") as http:
        read = http.post("/v1/chat/completions", json={**question, "documents": [doc_id]})
    assert read.status_code == 200, read.text
    assert read.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == aligned
    with _client(served, "vllm-other") as http:
        refused = http.post("/v1/chat/completions", json={**question, "documents": [doc_id]})
        assert refused.status_code == 404
        ids = document.token_list() + tokenizer.encode("Who may use it?", add_special_tokens=False)
        pasted = http.post("/v1/completions", json={"model": str(folder), "prompt": ids, "max_tokens": 4,
                                                    "temperature": 0})
    assert pasted.status_code == 200, pasted.text
    assert pasted.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0

    # inside vLLM: what the connector loaded and what vLLM's prefix cache gave (num_cached_tokens)
    salt = ledger.account("vllm-publisher").tenant_salt
    other = ledger.account("vllm-other").tenant_salt
    ask = lambda transfer, cache_salt: drain(engine.stream(ids, engine.params(2, transfer=transfer),  # noqa: E731
                                                           cache_salt))
    # (the other tenant's own blocks of these ids, from its request above, are its own to reuse: fresh salts here)
    repeated = ask(request_params(), other + "-1")  # nothing matched, nothing in vLLM's cache for that salt
    assert repeated[0].num_cached_tokens == 0 and not repeated[-1].kv_transfer_params
    forged = ask(request_params(document=Reusable(document, aligned, "guessed-salt")), other + "-2")
    assert forged[0].num_cached_tokens == 0 and not forged[-1].kv_transfer_params  # named without its salt
    named = ask(request_params(document=Reusable(document, aligned, salt)), other + "-3")  # the checks above can
    assert named[0].num_cached_tokens == aligned  # fail: with the salt, the connector loads it
    assert named[-1].kv_transfer_params == {"kvmart": {"loaded_tokens": aligned, "refused_tokens": 0}}
    again = ask(request_params(), other + "-3")  # and vLLM's prefix cache holds it for that salt only
    assert again[0].num_cached_tokens >= aligned
    assert ask(request_params(), other + "-4")[0].num_cached_tokens == 0


def _wait(condition) -> None:
    import time

    end = time.monotonic() + DEADLINE_SECONDS
    while not condition():
        assert time.monotonic() < end, "gave up waiting for the server to start"
        time.sleep(0.05)


def test_each_tenant_and_each_bypass_request_has_its_own_prefix_cache_salt(served, folder: Path, monkeypatch):
    """vLLM's prefix cache is shared only within a tenant: the server salts each request with its caller's tenant
    salt, and a `"cache": "bypass"` request with a salt of its own (so nothing of it is served from vLLM's
    memory either: every token computed)."""
    engine, ledger = served["engine"], served["ledger"]
    salts: list[str] = []
    stream = engine.stream

    def recording(prompt_ids, params, cache_salt=""):
        salts.append(cache_salt)
        return stream(prompt_ids, params, cache_salt)

    monkeypatch.setattr(engine, "stream", recording)
    body = {"model": str(folder), "temperature": 0, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    for name, cache in (("vllm-agent", "default"), ("vllm-other", "default"), ("vllm-agent", "bypass"),
                        ("vllm-agent", "bypass")):
        with _client(served, name) as http:
            assert http.post("/v1/chat/completions", json={**body, "cache": cache}).status_code == 200
    agent, other = ledger.account("vllm-agent").tenant_salt, ledger.account("vllm-other").tenant_salt
    assert agent and other and agent != other
    assert salts[:2] == [agent, other]
    assert len(set(salts)) == 4  # each bypass request's salt is its own, no tenant's
