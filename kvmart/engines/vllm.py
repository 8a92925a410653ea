"""The `vllm` engine: vLLM computes, kvmart's KV connector (engines/vllm_connector.py) loads published documents'
KV from kvmart's store into vLLM's paged buffers and saves newly published ones.

vLLM runs its scheduler and worker in other processes, so everything the frontend and the connector must agree
on is computed here from plain values by both sides: the fingerprint of vLLM-made KV (`vllm_fingerprint`) and the
rule that picks the stored document a prompt reuses (`reusable_prefix`). vllm itself is imported lazily: this
module loads without it."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from kvmart.config import Settings
from kvmart.engines.base import Completion, Engine
from kvmart.errors import ConfigError, InputError, StoreError
from kvmart.format.keys import cache_id as make_cache_id
from kvmart.reuse.catalog import Catalog, Document
from kvmart.reuse.core import Precomputed
from kvmart.runtime.fingerprint import ModelFingerprint, model_fingerprint
from kvmart.runtime.model import resolve_model_folder
from kvmart.store import Entry, Store, open_store

CONNECTOR_NAME = "KvmartConnector"
CONNECTOR_MODULE = "kvmart.engines.vllm_connector"
PARAMS_KEY = "kvmart"  # our key inside a request's kv_transfer_params


@dataclass(frozen=True)
class VllmOptions:
    """How vLLM is started. On the CPU backend vLLM's KV cache size comes from VLLM_CPU_KVCACHE_SPACE (GiB)."""

    block_size: int | None = None  # tokens per KV block (None: vLLM's default); documents are reused in whole blocks
    prefix_caching: bool = True  # vLLM's own in-memory prefix cache (kvmart's store is the tier below it)
    memory_fraction: float = 0.3  # gpu_memory_utilization: on CPU, the fraction of RAM vLLM may reserve
    max_model_len: int | None = None  # None: the model's context
    max_num_batched_tokens: int | None = None  # None: vLLM's default (chunked prefill beyond it)
    enforce_eager: bool = True  # no graph capture: faster start-up, and what the CPU backend does anyway

    def __post_init__(self) -> None:
        if self.block_size is not None and self.block_size < 1:
            raise ConfigError(f"block_size must be at least 1 (got {self.block_size})")
        if not 0 < self.memory_fraction <= 1:
            raise ConfigError(f"memory_fraction must be in (0, 1] (got {self.memory_fraction})")


@dataclass(frozen=True)
class Reusable:
    document: Document
    num_tokens: int  # whole blocks, and at least one prompt token left to compute


def vllm_fingerprint(folder: Path, dtype: str, backend: str, block_size: int, vllm_version: str,
                     hash_cache: Path | None) -> ModelFingerprint:
    """The fingerprint of KV computed by vLLM: the model's, with vLLM's attention backend as the attention
    component and vLLM's version and block size as the engine. KV from different kernels is not bit-identical,
    so an artifact is only ever loaded by the engine that made it."""
    base = model_fingerprint(folder, dtype, f"vllm:{backend}", hash_cache)
    return dataclasses.replace(base, engine=f"vllm {vllm_version}; block_size {block_size}")


def reusable_prefix(catalog: Catalog, prompt_ids: list[int], block_size: int) -> Reusable | None:
    """The stored document sharing the longest prefix with the prompt, in whole blocks, leaving at least one
    prompt token to compute (vLLM needs one to produce logits). None if that is less than one block."""
    if len(prompt_ids) < 2:
        return None
    found = catalog.longest_prefix(prompt_ids[:-1], block_size)
    if found is None:
        return None
    num_tokens = found.num_tokens // block_size * block_size
    return Reusable(found.document, num_tokens) if num_tokens else None


def request_params(publish: dict | None = None, bypass: bool = False) -> dict:
    """kv_transfer_params telling the connector to store this request's prompt as a document (`publish`: title,
    source, model) or not to load anything for it (`bypass`)."""
    ours: dict = {}
    if publish is not None:
        ours["publish"] = publish
    if bypass:
        ours["bypass"] = True
    return {PARAMS_KEY: ours}


class VllmEngine(Engine):
    """vLLM's offline engine (`vllm.LLM`) with kvmart's connector. Not thread-safe: one thread drives it."""

    name = "vllm"

    def __init__(self, llm, tokenizer, folder: Path, spec: str, store: Store, fingerprint: ModelFingerprint,
                 options: VllmOptions, context_tokens: int) -> None:
        self.llm, self._tokenizer, self.folder, self.spec, self.store = llm, tokenizer, folder, spec, store
        self.fingerprint, self.options, self._context_tokens = fingerprint, options, context_tokens
        self.catalog = Catalog(store, fingerprint.digest)
        self._eos_ids = _eos_ids(folder, tokenizer)

    @classmethod
    def open(cls, settings: Settings, options: VllmOptions | None = None) -> "VllmEngine":
        """Start vLLM on the model of `settings` with kvmart's connector over the store of `settings`."""
        options = options or VllmOptions()
        try:
            import vllm
            from vllm import LLM
            from vllm.config import KVTransferConfig
        except ImportError as e:
            raise ConfigError(f"the vllm engine needs vLLM: pip install 'kvmart[vllm]' (on CPU machines: "
                              f"scripts/install-vllm.sh) ({e})") from e
        from transformers import AutoTokenizer

        if settings.store_url.startswith("memory://"):
            raise ConfigError("the vllm engine needs a store its worker processes can open too: a memory:// store "
                              "lives in one process. Use a directory (the default) or another shared store.")
        folder = resolve_model_folder(settings.model, settings)
        store = open_store(settings.store_url)
        transfer = KVTransferConfig(
            kv_connector=CONNECTOR_NAME, kv_connector_module_path=CONNECTOR_MODULE, kv_role="kv_both",
            kv_load_failure_policy="recompute",  # an artifact refused on load is recomputed, never fatal
            kv_connector_extra_config={"store": settings.store_url, "data_dir": str(settings.data_dir),
                                       "spec": settings.model})
        llm = LLM(model=str(folder), tokenizer=str(folder), dtype=settings.dtype, seed=0, runner="generate",
                  hf_overrides=_causal_lm_overrides(folder),
                  block_size=options.block_size, enable_prefix_caching=options.prefix_caching,
                  gpu_memory_utilization=options.memory_fraction, max_model_len=options.max_model_len,
                  max_num_batched_tokens=options.max_num_batched_tokens, enforce_eager=options.enforce_eager,
                  kv_transfer_config=transfer)
        config = llm.llm_engine.vllm_config
        from kvmart.engines.vllm_connector import attention_backend_name  # needs vllm: imported only here

        fingerprint = vllm_fingerprint(folder, settings.dtype, attention_backend_name(config),
                                       config.cache_config.block_size, vllm.__version__,
                                       settings.data_dir / "file-hashes.json")
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        return cls(llm, tokenizer, folder, settings.model, store, fingerprint, options,
                   config.model_config.max_model_len)

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def context_tokens(self) -> int:
        return self._context_tokens

    @property
    def eos_ids(self) -> frozenset[int]:
        return self._eos_ids

    @property
    def vocab_size(self) -> int:
        return self.llm.llm_engine.vllm_config.model_config.get_vocab_size()

    @property
    def block_size(self) -> int:
        return self.llm.llm_engine.vllm_config.cache_config.block_size

    def publish(self, token_ids: list[int], title: str = "", source: str = "") -> Precomputed:
        """Run the document through vLLM once (one generated token); the connector stores its KV."""
        start = time.perf_counter()
        if not token_ids:
            raise InputError("cannot publish an empty token sequence")
        if len(token_ids) >= self.context_tokens:
            raise InputError(f"the document ({len(token_ids):,} tokens) leaves no room in vLLM's context "
                             f"({self.context_tokens:,} tokens)")
        cid = make_cache_id(self.fingerprint.digest, token_ids)
        existing = self.store.entry(cid)
        if existing is None:
            publish = {"title": title, "source": source, "model": self.spec}
            self._generate(token_ids, self._params(1, 0.0, None, 1.0, request_params(publish=publish)))
            existing = self.store.entry(cid)
            if existing is None:
                raise StoreError(f"vLLM prefilled the document but kvmart's connector stored no artifact {cid[:16]} "
                                 "(see the engine's log for the connector's error)")
            self.catalog.add(existing)
            return Precomputed(existing, True, time.perf_counter() - start)
        return Precomputed(existing, False, time.perf_counter() - start)

    def complete(self, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0, seed: int | None = None,
                 bypass: bool = False, top_p: float = 1.0, logprobs: int | None = None) -> Completion:
        """As `Engine.complete`; `logprobs`: also return the top `logprobs` log-probabilities of every step."""
        start = time.perf_counter()
        params = self._params(max_new_tokens, temperature, seed, top_p, request_params(bypass=bypass), logprobs)
        output = self._generate(prompt_ids, params)
        cached, document = self.reused(prompt_ids, output, bypass)
        tier = _tier(output) if cached else "none"
        steps = output.outputs[0].logprobs
        top = [{int(t): float(lp.logprob) for t, lp in step.items()} for step in steps] if steps else None
        return Completion(list(output.outputs[0].token_ids), len(prompt_ids), cached, document,
                          time.perf_counter() - start, tier, top)

    def reused(self, prompt_ids: list[int], output, bypass: bool) -> tuple[int, Entry | None]:
        """(prompt tokens read from a published document's KV, that document). vLLM reports every token it did
        not compute (`num_cached_tokens`: loaded by the connector, or found in its own prefix cache); only those
        within the document the connector matched are the document's (the chat template's header alone, say, is
        not)."""
        self.catalog.refresh()
        found = reusable_prefix(self.catalog, prompt_ids, self.block_size)
        if found is None:
            return 0, None
        if bypass:
            return 0, found.document.entry
        not_computed = (output.num_cached_tokens or 0) - _reported(output, "refused_tokens")
        return max(0, min(not_computed, found.num_tokens)), found.document.entry

    def _params(self, max_tokens: int, temperature: float, seed: int | None, top_p: float, transfer: dict,
                logprobs: int | None = None):
        from vllm import SamplingParams

        return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                              stop_token_ids=sorted(self.eos_ids), detokenize=False, logprobs=logprobs,
                              extra_args={"kv_transfer_params": transfer})

    def _generate(self, prompt_ids: list[int], params):
        from vllm.inputs import TokensPrompt

        return self.llm.generate([TokensPrompt(prompt_token_ids=list(prompt_ids))], params, use_tqdm=False)[0]

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
            if shutdown is not None:
                shutdown()


def _causal_lm_overrides(folder: Path) -> dict:
    """A config.json without `architectures` (kvmart's built-in models are written from a bare config) makes
    vLLM load the headless model; name the causal-LM class transformers maps the model type to."""
    import json

    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = json.loads((folder / "config.json").read_text())
    if config.get("architectures") or config.get("model_type") not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return {}
    return {"architectures": [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config["model_type"]]]}


def _reported(output, name: str) -> int:
    """What kvmart's connector reported for the request in its kv_transfer_params (`loaded_tokens`: read from the
    store; `refused_tokens`: matched but refused on load, then recomputed by vLLM)."""
    params = getattr(output, "kv_transfer_params", None) or {}
    ours = params.get(PARAMS_KEY) if isinstance(params, dict) else None
    return int(ours.get(name, 0)) if isinstance(ours, dict) else 0


def _tier(output) -> str:
    """`store` if kvmart's connector loaded KV for the request, else `ram`: vLLM's own prefix cache held it."""
    return "store" if _reported(output, "loaded_tokens") else "ram"


def _eos_ids(folder: Path, tokenizer) -> frozenset[int]:
    """End-of-sequence ids as kvmart's transformers engine takes them: the generation config's and the
    tokenizer's."""
    import json

    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        path = folder / name
        if path.exists():
            value = json.loads(path.read_text()).get("eos_token_id")
            ids += value if isinstance(value, list) else [value] if value is not None else []
            break
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return frozenset(ids)
