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


def test_kvmart_serve_on_vllm_meters_the_documents_it_loads(runs, folder: Path, tokenizer, monkeypatch):
    """`kvmart serve --engine vllm` over the store the runs above filled: a chat request naming a document is
    answered by vLLM from the stored KV, and usage reports the document's cached tokens as the transformers
    engine does (what the ledger charges)."""
    import threading

    import httpx
    import uvicorn

    from kvmart.app import create_app
    from kvmart.config import Settings
    from kvmart.reuse.catalog import document_id
    from kvmart.server import ServerSettings

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    from decimal import Decimal

    from kvmart.ledger import open_ledger

    settings = Settings(data_dir=runs["data_dir"], model=str(folder), dtype="float32")
    ledger = open_ledger("", settings.data_dir, environ={})  # the server's own SQLite ledger in the data dir
    _, agent_key = ledger.create_account("vllm-agent", "agent")
    ledger.deposit("vllm-agent", Decimal("1"))
    app = create_app(settings, ServerSettings(port=0, engine="vllm", log_level="warning"))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        _wait(lambda: server.started)
        url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
        block = runs["first"]["block_size"]
        with httpx.Client(base_url=url, timeout=DEADLINE_SECONDS,
                          headers={"Authorization": f"Bearer {agent_key}"}) as http:
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
            refused = http.post("/v1/chat/completions", json={
                "model": str(folder), "messages": [{"role": "user", "content": "hi"}], "logprobs": True})
            assert refused.status_code == 400 and "vllm" in refused.json()["error"]["message"]
    finally:
        server.should_exit = True
        thread.join(DEADLINE_SECONDS)


def _wait(condition) -> None:
    import time

    end = time.monotonic() + DEADLINE_SECONDS
    while not condition():
        assert time.monotonic() < end, "gave up waiting for the server to start"
        time.sleep(0.05)
