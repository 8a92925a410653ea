"""The `vllm` engine: vLLM computes, kvmart's KV connector (engines/vllm_connector.py) loads published documents'
KV from kvmart's store into vLLM's paged buffers and saves newly published ones.

vLLM runs its scheduler and worker in other processes, so everything the frontend and the connector must agree
on is computed here from plain values by both sides: the fingerprint of vLLM-made KV (`vllm_fingerprint`), what a
request tells the connector (`request_params`: publish it, load nothing, or load exactly this document) and the
rules for the document a prompt reuses (`reusable_prefix` for the public ones, `document_prefix` and
`salt_matches` for a named one). The frontend drives vLLM's async engine (engines/vllm_async.py): requests from any
thread go to vLLM at once and stream their tokens back. vllm itself is imported lazily: this module loads without
it."""

from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from kvmart.config import Settings
from kvmart.engines.base import Completion, Engine
from kvmart.engines.vllm_async import Runner, Stream
from kvmart.errors import ConfigError, InputError, StoreError
from kvmart.format.keys import cache_id as make_cache_id
from kvmart.reuse.catalog import Catalog, Document, Readable, common_prefix_tokens
from kvmart.reuse.core import Precomputed
from kvmart.runtime.fingerprint import ModelFingerprint, model_fingerprint
from kvmart.runtime.model import resolve_model_folder
from kvmart.store import Store, open_store

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
    salt: str = ""  # the salt the document was published with ('' for a public one): its artifact is checked with it


def vllm_fingerprint(folder: Path, dtype: str, backend: str, block_size: int, vllm_version: str,
                     hash_cache: Path | None) -> ModelFingerprint:
    """The fingerprint of KV computed by vLLM: the model's, with vLLM's attention backend as the attention
    component and vLLM's version and block size as the engine. KV from different kernels is not bit-identical,
    so an artifact is only ever loaded by the engine that made it."""
    base = model_fingerprint(folder, dtype, f"vllm:{backend}", hash_cache)
    return dataclasses.replace(base, engine=f"vllm {vllm_version}; block_size {block_size}")


def reusable_prefix(catalog: Catalog, prompt_ids: list[int], block_size: int, readable: Readable = frozenset()
                    ) -> Reusable | None:
    """The stored document sharing the longest prefix with the prompt, among those `readable` (by default the
    public ones only), in whole blocks, leaving at least one prompt token to compute (vLLM needs one to produce
    logits). None if that is less than one block."""
    if len(prompt_ids) < 2:
        return None
    found = catalog.longest_prefix(prompt_ids[:-1], block_size, readable)
    if found is None:
        return None
    num_tokens = found.num_tokens // block_size * block_size
    return Reusable(found.document, num_tokens) if num_tokens else None


def document_prefix(document: Document, prompt_ids: list[int], block_size: int, salt: str = "") -> Reusable | None:
    """`document` as the prompt starts with it, in whole blocks, leaving at least one prompt token to compute;
    None if that is less than one block."""
    ids = torch.tensor(prompt_ids[:-1], dtype=torch.int64)
    num_tokens = common_prefix_tokens(ids, document.token_ids) // block_size * block_size
    return Reusable(document, num_tokens, salt) if num_tokens else None


def salt_matches(document: Document, fingerprint_digest: str, salt: str) -> bool:
    """Whether `salt` is the one `document` was published with (its cache id is made with it)."""
    return make_cache_id(fingerprint_digest, document.token_list(), salt, document.terms) == document.cache_id


def request_params(publish: dict | None = None, bypass: bool = False, document: Reusable | None = None) -> dict:
    """kv_transfer_params for kvmart's connector: store this request's prompt as a document (`publish`: title,
    source, model, and the salt and terms its cache id is made with), load nothing for it (`bypass`), or load
    exactly `document` (a private one too: its salt goes with it, and the connector loads it only if the salt is
    the document's). With none of these the connector looks for a public document the prompt starts with."""
    ours: dict = {}
    if publish is not None:
        ours["publish"] = publish
    if bypass:
        ours["bypass"] = True
    elif document is not None:
        ours["document"] = {"cache_id": document.document.cache_id, "salt": document.salt}
    return {PARAMS_KEY: ours}


class VllmEngine(Engine):
    """vLLM's async engine (`AsyncLLM`, on a thread of its own: engines/vllm_async.py) with kvmart's connector.
    Thread-safe: requests from any thread go to vLLM at once, and its scheduler batches them; each request's
    tokens come back as vLLM makes them (`stream`)."""

    name = "vllm"

    def __init__(self, runner: Runner, tokenizer, folder: Path, spec: str, store: Store,
                 fingerprint: ModelFingerprint, options: VllmOptions) -> None:
        self.runner, self._tokenizer, self.folder, self.spec, self.store = runner, tokenizer, folder, spec, store
        self.fingerprint, self.options = fingerprint, options
        self.config = runner.engine.vllm_config
        self.catalog = Catalog(store, fingerprint.digest)
        self._eos_ids = _eos_ids(folder, tokenizer)

    @classmethod
    def open(cls, settings: Settings, options: VllmOptions | None = None) -> "VllmEngine":
        """Start vLLM on the model of `settings` with kvmart's connector over the store of `settings`."""
        options = options or VllmOptions()
        try:
            import vllm
            from vllm.config import KVTransferConfig
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
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
        args = AsyncEngineArgs(
            model=str(folder), tokenizer=str(folder), dtype=settings.dtype, seed=0, runner="generate",
            hf_overrides=_causal_lm_overrides(folder), block_size=options.block_size,
            enable_prefix_caching=options.prefix_caching, gpu_memory_utilization=options.memory_fraction,
            max_model_len=options.max_model_len, max_num_batched_tokens=options.max_num_batched_tokens,
            enforce_eager=options.enforce_eager, kv_transfer_config=transfer, disable_log_stats=True)
        runner = Runner(lambda: AsyncLLM.from_engine_args(args))
        try:
            config = runner.engine.vllm_config
            from kvmart.engines.vllm_connector import attention_backend_name  # needs vllm: imported only here

            fingerprint = vllm_fingerprint(folder, settings.dtype, attention_backend_name(config),
                                           config.cache_config.block_size, vllm.__version__,
                                           settings.data_dir / "file-hashes.json")
            tokenizer = AutoTokenizer.from_pretrained(str(folder))
            return cls(runner, tokenizer, folder, settings.model, store, fingerprint, options)
        except BaseException:
            runner.close()
            raise

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def context_tokens(self) -> int:
        return self.config.model_config.max_model_len

    @property
    def eos_ids(self) -> frozenset[int]:
        return self._eos_ids

    @property
    def vocab_size(self) -> int:
        return self.config.model_config.get_vocab_size()

    @property
    def block_size(self) -> int:
        return self.config.cache_config.block_size

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of KV one token takes in vLLM's cache (and in an artifact): keys and values of every layer."""
        model, parallel = self.config.model_config, self.config.parallel_config
        return (2 * model.get_num_layers(parallel) * model.get_num_kv_heads(parallel) * model.get_head_size()
                * model.dtype.itemsize)

    # -- requests ------------------------------------------------------------------------------------------------
    def stream(self, prompt_ids: list[int], params, cache_salt: str = "") -> Stream:
        """Hand one request to vLLM now; its outputs (new tokens each) come to the stream returned. `cache_salt`:
        vLLM's own prefix cache shares blocks only between requests with the same salt (the server gives each
        tenant its own, so one tenant's prompts never hit another's blocks)."""
        from vllm.inputs import TokensPrompt

        prompt = TokensPrompt(prompt_token_ids=list(prompt_ids))
        if cache_salt:
            prompt["cache_salt"] = cache_salt
        return self.runner.submit(uuid.uuid4().hex, prompt, params)

    def params(self, max_tokens: int, temperature: float = 0.0, seed: int | None = None, top_p: float = 1.0,
               transfer: dict | None = None, logprobs: int | None = None):
        """vLLM's SamplingParams for one request: new tokens only in each output (streamed), kvmart's stop ids,
        `transfer` (request_params) for the connector, and the top `logprobs` log-probabilities of every step."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                              stop_token_ids=sorted(self.eos_ids), detokenize=False, logprobs=logprobs,
                              output_kind=RequestOutputKind.DELTA,
                              extra_args={"kv_transfer_params": transfer or request_params()})

    def match(self, prompt_ids: list[int], readable: Readable = frozenset()) -> Reusable | None:
        """The document a prompt reuses: the longest public one it starts with (or among `readable`)."""
        self.catalog.refresh()
        return reusable_prefix(self.catalog, prompt_ids, self.block_size, readable)

    def publish(self, token_ids: list[int], title: str = "", source: str = "", salt: str = "",
                terms: str = "") -> Precomputed:
        """Run the document through vLLM once (one generated token); the connector stores its KV, under `salt`
        (a private document's tenant salt) and `terms` (its licence terms, canonical) as kvmart's transformers
        engine would."""
        start = time.perf_counter()
        cid, stream = self.start_publish(token_ids, title, source, salt, terms)
        if stream is not None:
            drain(stream)
        return self.published(cid, stream is not None, time.perf_counter() - start)

    def start_publish(self, token_ids: list[int], title: str = "", source: str = "", salt: str = "",
                      terms: str = "") -> tuple[str, Stream | None]:
        """The document's cache id, and the request that prefills it (None: it is stored already). Once the
        stream has finished, `published` says what was stored."""
        if not token_ids:
            raise InputError("cannot publish an empty token sequence")
        if len(token_ids) >= self.context_tokens:
            raise InputError(f"the document ({len(token_ids):,} tokens) leaves no room in vLLM's context "
                             f"({self.context_tokens:,} tokens)")
        cid = make_cache_id(self.fingerprint.digest, token_ids, salt, terms)
        if self.store.entry(cid) is not None:
            return cid, None
        publish = {"title": title, "source": source, "model": self.spec, "salt": salt, "terms": terms}
        return cid, self.stream(token_ids, self.params(1, transfer=request_params(publish=publish)), salt)

    def published(self, cid: str, is_new: bool, seconds: float) -> Precomputed:
        """The document `start_publish` prefilled, registered in the catalogue; StoreError if nothing was stored."""
        entry = self.store.entry(cid)
        if entry is None:
            raise StoreError(f"vLLM prefilled the document but kvmart's connector stored no artifact {cid[:16]} "
                             "(see the engine's log for the connector's error)")
        if is_new:
            self.catalog.add(entry)
        return Precomputed(entry, is_new, seconds)

    def complete(self, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0, seed: int | None = None,
                 bypass: bool = False, top_p: float = 1.0, logprobs: int | None = None,
                 reuse: Reusable | None = None, cache_salt: str = "") -> Completion:
        """As `Engine.complete`, reusing `reuse` (a private document, with its salt) or else the longest public
        document the prompt starts with; `logprobs`: also return the top `logprobs` log-probabilities of every
        step; `cache_salt`: see `stream` (a bypass request gets one of its own: nothing comes from vLLM's prefix
        cache either). Blocks until vLLM has finished (other threads' requests run meanwhile)."""
        start = time.perf_counter()
        found = reuse if reuse is not None else self.match(prompt_ids)
        transfer = request_params(bypass=bypass, document=found)
        cache_salt = uuid.uuid4().hex if bypass else cache_salt
        outputs = drain(self.stream(prompt_ids, self.params(max_new_tokens, temperature, seed, top_p, transfer,
                                                            logprobs), cache_salt))
        tokens = [t for out in outputs for t in out.outputs[0].token_ids]
        steps = [step for out in outputs for step in (out.outputs[0].logprobs or [])]
        top = [{int(t): float(lp.logprob) for t, lp in step.items()} for step in steps] if logprobs is not None else None
        cached = 0 if bypass or found is None else reused_tokens(outputs, found.num_tokens)
        tier = _tier(outputs[-1]) if cached else "none"
        return Completion(tokens, len(prompt_ids), cached, found.document.entry if found else None,
                          time.perf_counter() - start, tier, top)

    def close(self) -> None:
        self.runner.close()  # idempotent


def drain(stream: Stream) -> list:
    """Every output of `stream`, waiting for vLLM to finish the request."""
    outputs: list = []
    while not stream.finished:
        stream.wait()
        outputs += stream.take()
    return outputs


def reused_tokens(outputs: list, matched_tokens: int) -> int:
    """Prompt tokens of the matched document vLLM did not compute. vLLM reports every token it did not compute
    (`num_cached_tokens`: loaded by the connector, or found in its own prefix cache); only those within the
    document the connector was told to load are the document's (the chat template's header alone, say, is not),
    and a load the connector refused was recomputed."""
    not_computed = (outputs[0].num_cached_tokens or 0) - _reported(outputs[-1], "refused_tokens")
    return max(0, min(not_computed, matched_tokens))


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
