"""kvmart's vLLM KV connector (V1 API), loaded by vLLM from `kv_connector_module_path`.

Scheduler side (vLLM's engine-core process): a request whose prompt starts with a published document (matched on
token ids, in whole blocks; `vllm.reusable_prefix`) reports those tokens as loadable; the blocks vLLM allocates for
them are handed to the worker in the step's metadata. A request flagged `publish` (see `vllm.request_params`) is
stored as a document once its whole prompt has been prefilled.

Worker side: before the forward pass, the matched documents' artifacts are read from kvmart's store (verified,
fingerprint included) and copied into vLLM's paged KV buffers; after it, the KV of a completed publish is
gathered from the buffers and written to the store as an ordinary kvmart artifact (format: docs/FORMAT.md).
A document that cannot be loaded (missing, corrupt, made by another engine) is reported to vLLM as failed blocks,
and vLLM recomputes them: never used, never fatal."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import vllm
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorMetadata, KVConnectorRole
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from kvmart.engines.vllm import PARAMS_KEY, Reusable, document_prefix, reusable_prefix, salt_matches, vllm_fingerprint
from kvmart.engines.vllm_paged import gather, paged_views, scatter
from kvmart.errors import ConfigError, KvmartError, UnknownDocumentError
from kvmart.format.artifact import artifact_size, manifest_for, read_artifact, write_artifact
from kvmart.format.keys import cache_id as make_cache_id
from kvmart.format.keys import is_cache_id
from kvmart.reuse.catalog import Catalog, document_id
from kvmart.runtime.kv import KV
from kvmart.store import Entry, open_store

log = logging.getLogger("kvmart.vllm")


@dataclass(frozen=True)
class LoadSpec:
    """Copy tokens [start, end) of artifact `cache_id` into `block_ids` (one per block of those tokens)."""

    req_id: str
    cache_id: str
    start: int
    end: int
    block_ids: list[int]
    salt: str = ""  # the document's (a private one's tenant salt): its artifact is verified with it


@dataclass(frozen=True)
class SaveSpec:
    """Store the KV of `token_ids`, held in `block_ids`, as a document."""

    req_id: str
    token_ids: list[int]
    block_ids: list[int]
    title: str
    source: str
    model: str
    started_at: float  # wall clock when vLLM first scheduled the prefill (same host: the worker measures to it)
    salt: str = ""  # a private document's tenant salt ('' public)
    terms: str = ""  # its licence terms, canonical: both are part of its cache id, as with the transformers engine


@dataclass
class KvmartMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)


@dataclass
class _Publishing:
    token_ids: list[int]
    params: dict
    block_ids: list[int] = field(default_factory=list)
    started_at: float = 0.0


def attention_backend_name(vllm_config) -> str:
    """The attention backend vLLM selects for this model (part of the fingerprint of the KV it computes). Every
    process asks vLLM's selector, so the frontend, the scheduler and the worker agree; the worker then checks it
    against the backend its layers really use (`register_kv_caches`)."""
    from vllm.config import set_current_vllm_config
    from vllm.v1.attention.selector import get_attn_backend

    model = vllm_config.model_config
    with set_current_vllm_config(vllm_config):
        backend = get_attn_backend(model.get_head_size(), model.dtype, vllm_config.cache_config.cache_dtype,
                                   num_heads=model.get_num_attention_heads(vllm_config.parallel_config))
    return backend.get_name()


def check_supported(vllm_config) -> None:
    """Refuse what the connector would get wrong: several workers (each holds a slice of the heads or layers,
    and an artifact holds them all) and a quantized KV cache (the fingerprint's dtype is the model's)."""
    parallel = vllm_config.parallel_config
    workers = parallel.tensor_parallel_size * parallel.pipeline_parallel_size
    if workers != 1:
        raise ConfigError(f"kvmart's vLLM connector runs with one worker; this engine has {workers} "
                          "(tensor x pipeline parallel)")
    if vllm_config.cache_config.cache_dtype != "auto":
        raise ConfigError(f"kvmart's vLLM connector stores KV in the model's dtype; kv_cache_dtype "
                          f"{vllm_config.cache_config.cache_dtype!r} is not supported")


def layers_backend_name(vllm_config, layer_names: list[str]) -> str | None:
    """The backend the worker's attention layers use (None where they cannot be seen from this process)."""
    layers = getattr(vllm_config.compilation_config, "static_forward_context", None) or {}
    for name in layer_names:
        backend = getattr(layers.get(name), "attn_backend", None)
        if backend is not None:
            return backend.get_name()
    return None


class KvmartConnector(KVConnectorBase_V1):
    _cache_hit_source = CacheHitSource.DISK  # vLLM's metrics: external hits come from kvmart's store

    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        check_supported(vllm_config)
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        self.store = open_store(extra["store"])
        self.spec = extra.get("spec", vllm_config.model_config.model)
        self.data_dir = Path(extra["data_dir"])
        self.block_size = vllm_config.cache_config.block_size
        self.folder = Path(vllm_config.model_config.model)
        self.dtype = str(vllm_config.model_config.dtype).removeprefix("torch.")
        self.fingerprint = self._fingerprint(attention_backend_name(vllm_config))
        # scheduler side
        self.catalog = Catalog(self.store, self.fingerprint.digest)
        self._matched: dict[str, Reusable] = {}  # req_id -> the document it reuses, until its blocks are allocated
        self._loads: dict[str, tuple[Reusable, int]] = {}  # req_id -> (what to load, num_external)
        self._publishing: dict[str, _Publishing] = {}
        self._loaded: dict[str, tuple[int, set[int]]] = {}  # req_id -> (tokens loaded, their blocks)
        self._refused: dict[str, int] = {}  # req_id -> tokens whose load the worker refused
        # worker side
        self._kv_caches: dict[str, torch.Tensor] = {}
        self._layer_names: list[str] = []
        self._failed_blocks: set[int] = set()
        self._backend = self.fingerprint.attention.removeprefix("vllm:")

    def _fingerprint(self, backend: str):
        return vllm_fingerprint(self.folder, self.dtype, backend, self.block_size, vllm.__version__,
                                self.data_dir / "file-hashes.json")

    # -- scheduler side ---------------------------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int, bool]:
        """Tokens loadable from kvmart's store beyond those vLLM already has; never blocking (loads are
        synchronous, done before the step's forward pass)."""
        self._matched.pop(request.request_id, None)
        found = self._match(request)
        if found is None or found.num_tokens <= num_computed_tokens:
            return 0, False
        self._matched[request.request_id] = found
        return found.num_tokens - num_computed_tokens, False

    def _match(self, request) -> Reusable | None:
        """What a request reuses: nothing for a publish or a bypass; the document kvmart's frontend named (it
        chose it among those the caller may read); else the longest public document the prompt starts with. A
        private document is matched only when named with its own salt, so a request that cannot name the salt
        (another tenant's, or a client of a vLLM server that passes kv_transfer_params through) never reuses it."""
        ours = _ours(request)
        if ours.get("publish") is not None or ours.get("bypass"):
            return None
        self.catalog.refresh()
        ids = list(request.prompt_token_ids or [])
        named = ours.get("document")
        if named is None:
            return reusable_prefix(self.catalog, ids, self.block_size)
        return self._named(named, ids, request.request_id)

    def _named(self, named: object, ids: list[int], req_id: str) -> Reusable | None:
        """The named document as the prompt starts with it, if it is stored for this engine and the salt sent
        with it is its own; else None (logged: kvmart's frontend names only documents it found)."""
        cache_id = named.get("cache_id") if isinstance(named, dict) else None
        salt = named.get("salt", "") if isinstance(named, dict) else None
        if not isinstance(cache_id, str) or not is_cache_id(cache_id) or not isinstance(salt, str):
            log.warning("kvmart: request %s names no valid document (%r): nothing loaded", req_id, named)
            return None
        try:
            document = self.catalog.get(document_id(cache_id))
        except UnknownDocumentError:
            log.warning("kvmart: request %s names document %s, not stored for this engine", req_id, cache_id[:16])
            return None
        if document.cache_id != cache_id or not salt_matches(document, self.fingerprint.digest, salt):
            log.warning("kvmart: request %s names document %s with another salt: refused", req_id, cache_id[:16])
            return None
        return document_prefix(document, ids, self.block_size, salt)

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        """Remember what to load into the blocks vLLM just allocated, and which requests to publish."""
        ours = _ours(request)
        if ours.get("publish") is not None:
            self._publishing[request.request_id] = _Publishing(list(request.prompt_token_ids or []), ours["publish"])
        found = self._matched.pop(request.request_id, None)
        if num_external_tokens > 0:
            assert found is not None, "vLLM allocated blocks for tokens the connector did not match"
            self._loads[request.request_id] = (found, num_external_tokens)

    def build_connector_meta(self, scheduler_output) -> KvmartMetadata:
        meta = KvmartMetadata()
        now = time.time()
        for new in scheduler_output.scheduled_new_reqs:
            self._plan_load(meta, new.req_id, new.block_ids[0])
            if new.req_id in self._publishing:
                publishing = self._publishing[new.req_id]
                publishing.block_ids, publishing.started_at = list(new.block_ids[0]), now
                self._plan_save(meta, new.req_id, new.num_computed_tokens, scheduler_output)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            new_blocks = cached.new_block_ids[i]
            resumed = req_id in getattr(cached, "resumed_req_ids", ())
            if resumed and new_blocks is not None:
                self._plan_load(meta, req_id, new_blocks[0])  # resumed: new_block_ids holds all its blocks
            if req_id in self._publishing:
                publishing = self._publishing[req_id]
                if new_blocks is not None:
                    publishing.block_ids = list(new_blocks[0]) if resumed else publishing.block_ids + list(new_blocks[0])
                self._plan_save(meta, req_id, cached.num_computed_tokens[i], scheduler_output)
        return meta

    def _plan_load(self, meta: KvmartMetadata, req_id: str, block_ids: list[int]) -> None:
        planned = self._loads.pop(req_id, None)
        if planned is None:
            return
        found, num_external = planned
        end = found.num_tokens
        start = end - num_external  # vLLM's own prefix cache holds [0, start): those blocks are shared, left alone
        blocks = list(block_ids[start // self.block_size:end // self.block_size])
        meta.loads.append(LoadSpec(req_id, found.document.cache_id, start, end, blocks, found.salt))
        self._loaded[req_id] = (end - start, set(blocks))

    def _plan_save(self, meta: KvmartMetadata, req_id: str, num_computed: int, scheduler_output) -> None:
        """Once the step that prefills a publish request's last prompt token is scheduled, save after it."""
        publishing = self._publishing[req_id]
        scheduled = scheduler_output.num_scheduled_tokens.get(req_id, 0)
        if num_computed + scheduled < len(publishing.token_ids):
            return  # chunked prefill: more chunks to come
        del self._publishing[req_id]
        p = publishing.params
        meta.saves.append(SaveSpec(req_id, publishing.token_ids, publishing.block_ids, str(p.get("title", "")),
                                   str(p.get("source", "")), str(p.get("model", self.spec)), publishing.started_at,
                                   str(p.get("salt", "")), str(p.get("terms", ""))))

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Blocks are freed at once (saves and loads are synchronous). The request's output says how many tokens
        were loaded from kvmart's store (`kv_transfer_params["kvmart"]["loaded_tokens"]`), for metering."""
        self._publishing.pop(request.request_id, None)
        self._matched.pop(request.request_id, None)
        self._loads.pop(request.request_id, None)
        loaded, _ = self._loaded.pop(request.request_id, (0, set()))
        refused = self._refused.pop(request.request_id, 0)
        if not loaded and not refused:
            return False, None
        return False, {PARAMS_KEY: {"loaded_tokens": loaded, "refused_tokens": refused}}

    def update_connector_output(self, connector_output) -> None:
        """A load the worker refused (its blocks came back invalid; vLLM recomputes them) loaded nothing. vLLM
        still counts those tokens in `num_cached_tokens`, so the refusal is reported for metering."""
        invalid = set(getattr(connector_output, "invalid_block_ids", None) or ())
        for req_id, (tokens, blocks) in list(self._loaded.items()):
            if blocks & invalid:
                self._loaded[req_id] = (0, blocks)
                self._refused[req_id] = tokens

    # -- worker side ------------------------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._kv_caches = kv_caches
        self._layer_names = sorted(kv_caches, key=_layer_index)
        used = layers_backend_name(self._vllm_config, self._layer_names)
        if used is not None and used != self.fingerprint.attention.removeprefix("vllm:"):
            # the layers are the truth: KV is saved under their backend, and what this engine's scheduler
            # matches (another fingerprint) is refused when loaded, never used
            log.error("kvmart: vLLM's selector names attention backend %s but the layers use %s",
                      self.fingerprint.attention, used)
            self.fingerprint = self._fingerprint(used)
        self._backend = used or self.fingerprint.attention.removeprefix("vllm:")

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        """Copy each planned document prefix from the store into the paged buffers, before the forward pass."""
        meta = self._get_connector_metadata()
        assert isinstance(meta, KvmartMetadata)
        for spec in meta.loads:
            try:
                self._load(spec)
            except KvmartError as e:
                log.warning("kvmart: cannot load %s for request %s (%s); vLLM recomputes it", spec.cache_id[:16],
                            spec.req_id, e)
                self._failed_blocks.update(spec.block_ids)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs: Any) -> None:
        return  # saved whole, after the forward pass (wait_for_save)

    def wait_for_save(self) -> None:
        """Store the documents whose prefill this step completed."""
        meta = self._get_connector_metadata()
        assert isinstance(meta, KvmartMetadata)
        for spec in meta.saves:
            try:
                self._save(spec)
            except KvmartError as e:  # the frontend finds no artifact and reports it; serving goes on
                log.error("kvmart: cannot store the document of request %s: %s", spec.req_id, e)

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def _load(self, spec: LoadSpec) -> None:
        with self.store.open(spec.cache_id) as (f, size):
            _, kv = read_artifact(f, size, self.fingerprint, spec.salt, requested_cache_id=spec.cache_id)
        if kv.num_tokens < spec.end:
            raise KvmartError(f"artifact {spec.cache_id[:16]} holds {kv.num_tokens} tokens, {spec.end} were matched")
        for i, name in enumerate(self._layer_names):
            keys, values = paged_views(self._kv_caches[name], self.block_size, self._backend)
            scatter(keys, kv.keys[i], spec.start, spec.end, spec.block_ids, self.block_size)
            scatter(values, kv.values[i], spec.start, spec.end, spec.block_ids, self.block_size)

    def _save(self, spec: SaveSpec) -> None:
        num_tokens = len(spec.token_ids)
        keys, values = [], []
        for name in self._layer_names:
            k, v = paged_views(self._kv_caches[name], self.block_size, self._backend)
            keys.append(gather(k, spec.block_ids, num_tokens, self.block_size))
            values.append(gather(v, spec.block_ids, num_tokens, self.block_size))
        kv = KV(tuple(keys), tuple(values))
        manifest = manifest_for(kv, spec.token_ids, self.fingerprint, spec.salt,
                                cache_id=make_cache_id(self.fingerprint.digest, spec.token_ids, spec.salt, spec.terms))
        manifest = dataclasses.replace(manifest, terms=spec.terms)
        entry = Entry(cache_id=manifest.cache_id, title=spec.title, source=spec.source, model=spec.model,
                      fingerprint=self.fingerprint.digest, num_tokens=num_tokens,
                      artifact_bytes=artifact_size(manifest, kv), prefill_seconds=max(0.0, time.time() - spec.started_at),
                      created_at=time.time())
        self.store.put(entry, lambda f: write_artifact(f, manifest, kv))


def _ours(request) -> dict:
    params = getattr(request, "kv_transfer_params", None) or {}
    ours = params.get(PARAMS_KEY) if isinstance(params, dict) else None
    return ours if isinstance(ours, dict) else {}


def _layer_index(name: str) -> int:
    digits = [int(part) for part in name.split(".") if part.isdigit()]
    assert digits, f"attention layer name without an index: {name}"
    return digits[0]
