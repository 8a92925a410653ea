"""Engines: the registry, the transformers engine (publish, then answer from the stored KV exactly as a two-step
from-scratch run does), and the engine as a fingerprint component: transformers artifacts keep their digest, and
an artifact made by another engine is refused by name. (vLLM itself: tests/test_vllm.py.)"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import json

import pytest

from kvmart.config import Settings
from kvmart.engines import ENGINES, open_engine
from kvmart.engines.transformers import TransformersEngine
from kvmart.errors import ConfigError, FingerprintMismatchError
from kvmart.format.artifact import manifest_for, read_artifact, write_artifact
from kvmart.reuse.samples import sample_text
from kvmart.runtime.chat import document_ids, layout_for, question_ids
from kvmart.runtime.fingerprint import sha256_text
from kvmart.store.memory import MemoryStore

VLLM_ENGINE = "vllm 0.32.0; block_size 16"


def test_unknown_engine_lists_the_known_ones(tmp_path):
    with pytest.raises(ConfigError) as e:
        open_engine("tensorrt", Settings(data_dir=tmp_path))
    assert all(name in str(e.value) for name in ENGINES)


def test_transformers_fingerprint_digest_is_unchanged_by_the_engine_component(model_f32):
    fp = model_f32.fingerprint
    assert fp.engine == "" and "engine" not in fp.as_dict()
    five = {"config": fp.config, "weights": fp.weights, "tokenizer": fp.tokenizer, "dtype": fp.dtype,
            "attention": fp.attention}
    # the sgemm route of the linear layers (every release before the packed one) adds no component either: the
    # digests of caches made that way stay what they were; the packed route is a sixth component
    assert dataclasses.replace(fp, linear="").digest == sha256_text(json.dumps(five, sort_keys=True))
    assert fp.digest == sha256_text(json.dumps({**five, "linear": fp.linear} if fp.linear else five, sort_keys=True))


def test_engine_is_a_component_named_when_it_differs(model_f32):
    fp = model_f32.fingerprint
    made_by_vllm = dataclasses.replace(fp, engine=VLLM_ENGINE)
    assert made_by_vllm.digest != fp.digest
    assert made_by_vllm.differences(fp.as_dict()) == ["engine"]
    assert fp.differences(made_by_vllm.as_dict()) == ["engine"]
    other_block = dataclasses.replace(fp, engine="vllm 0.32.0; block_size 32")
    assert other_block.differences(made_by_vllm.as_dict()) == ["engine"]


def test_an_artifact_of_another_engine_is_refused_naming_it(model_f32):
    ids = model_f32.tokenize(sample_text("bsd-3-clause")[:400])
    kv = model_f32.prefill(ids)
    made_by_vllm = dataclasses.replace(model_f32.fingerprint, attention="vllm:CPU_ATTN", engine=VLLM_ENGINE)
    buffer = io.BytesIO()
    write_artifact(buffer, manifest_for(kv, ids, made_by_vllm), kv)
    data = buffer.getvalue()
    with pytest.raises(FingerprintMismatchError) as e:
        read_artifact(io.BytesIO(data), len(data), model_f32.fingerprint)
    assert "attention, engine differ" in str(e.value) and "block_size 16" in str(e.value)
    manifest, loaded = read_artifact(io.BytesIO(data), len(data), made_by_vllm)  # its own engine reads it
    assert loaded.equal(kv) and manifest.fingerprint["engine"] == VLLM_ENGINE


@pytest.fixture
def engine(model_f32) -> TransformersEngine:
    return TransformersEngine(model_f32, MemoryStore())


@pytest.mark.parametrize("sample, question", [("bsd-3-clause", "Who may use it?"),
                                              ("mpl-2.0", "What is a Contributor?")])
def test_transformers_engine_answers_from_the_store_exactly(engine, model_f32, sample, question):
    layout = layout_for(model_f32.tokenizer)
    doc = document_ids(model_f32.tokenize, layout, sample_text(sample)[:1500])
    q = question_ids(model_f32.tokenize, layout, question)
    published = engine.publish(doc, title=sample)
    assert published.is_new and published.entry.num_tokens == len(doc)
    assert not engine.publish(doc).is_new  # stored once

    reused = engine.complete(doc + q, max_new_tokens=12)
    assert reused.cached_tokens == len(doc) and reused.computed_tokens == len(q)
    assert reused.document is not None and reused.document.cache_id == published.entry.cache_id
    two_step = model_f32.generate(model_f32.prefill(doc), q, 12)
    assert reused.token_ids == two_step.token_ids

    fresh = engine.complete(doc + q, max_new_tokens=12, bypass=True)
    assert fresh.cached_tokens == 0 and fresh.token_ids == reused.token_ids


def test_transformers_engine_without_a_document(engine, model_f32):
    prompt = model_f32.tokenize("No document was published for this prompt.")
    done = engine.complete(prompt, max_new_tokens=5)
    assert done.cached_tokens == 0 and done.document is None
    assert done.token_ids == model_f32.generate(None, prompt, 5).token_ids


def test_the_server_picks_its_engine_by_name():
    from kvmart.server.config import ServerSettings, load_server_settings

    assert ServerSettings().engine == "transformers"
    assert load_server_settings({"KVMART_ENGINE": "vllm"}).engine == "vllm"
    with pytest.raises(ConfigError) as e:
        load_server_settings({"KVMART_ENGINE": "tgi"})
    assert "transformers, vllm" in str(e.value)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_the_vllm_engine_without_vllm_says_how_to_install_it(tmp_path):
    with pytest.raises(ConfigError) as e:
        open_engine("vllm", Settings(data_dir=tmp_path, model="builtin:tiny"))
    assert "kvmart[vllm]" in str(e.value) and "install-vllm.sh" in str(e.value)


def test_vllm_options_are_validated():
    from kvmart.engines.vllm import VllmOptions

    with pytest.raises(ConfigError):
        VllmOptions(block_size=0)
    with pytest.raises(ConfigError):
        VllmOptions(memory_fraction=1.5)
