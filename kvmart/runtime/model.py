"""The model adapter: loads a causal LM from a folder with transformers and runs the operations kvmart is built on,
on the CPU: `prefill` (tokens -> KV), `continue_from` (a prefix + tokens -> logits + the tokens' KV),
`prefill_pieces` (tokens cut into pieces, each continuing from the ones before) and generation after a prefix.
A prefix is one KV or the tuple of its pieces' KVs (kvmart/runtime/kv.py). Every forward pass goes through
`_forward` with a preallocated `WorkingCache`, so the cached and the uncached paths run the very same computation,
step for step."""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from kvmart.config import Settings
from kvmart.errors import ContextOverflowError, InputError, ModelLoadError, ModelNotFoundError
from kvmart.runtime import attention, rows
from kvmart.runtime.builtin import BUILTIN_NAMES, Progress, builtin_folder, describe_builtins, gguf_folder
from kvmart.runtime.fingerprint import ModelFingerprint, model_fingerprint
from kvmart.runtime.kv import KV, BatchCache, PackedCache, Prefix, WorkingCache, as_prefix, prefix_tokens
from kvmart.runtime.workspace import Workspace

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Prompt tokens of several requests in one forward pass at most (`continue_many`): a few chunks' worth, so that a
# pass stays short enough for the decode steps of the others to come between passes.
PACKED_PROMPT_TOKENS = 1024


@dataclass(frozen=True)
class Step:
    """The result of one forward pass: logits [num_positions, vocab] (float32) and the cache it left behind."""

    logits: torch.Tensor
    cache: WorkingCache

    @property
    def kv(self) -> KV:
        """The KV of everything so far (assembled on demand: with a long prefix this is a large copy)."""
        return self.cache.to_kv()

    @property
    def new_kv(self) -> KV:
        """The KV of the tokens this step computed, without the prefix (views of the step's buffers, no copy)."""
        return self.cache.new_kv()


class Decoder:
    """One sequence being generated: the token chosen last (`token`), the logits that chose it, and the working
    cache its decode steps write into. Made by `Model.begin`, advanced by `Model.step` (alone or with others: the
    same bits either way). Not thread-safe."""

    def __init__(self, cache: WorkingCache | None, logits: torch.Tensor, max_new_tokens: int, temperature: float,
                 top_p: float, generator: torch.Generator | None, stop_ids: frozenset[int]) -> None:
        self.cache, self.max_new_tokens, self.stop_ids = cache, max_new_tokens, stop_ids
        self.temperature, self.top_p, self.generator = temperature, top_p, generator
        self.token_ids: list[int] = []
        self.advance(logits)

    @property
    def token(self) -> int:
        return self.token_ids[-1]

    @property
    def done(self) -> bool:
        """True once the last token ended the sequence (an end-of-sequence token when stopping there) or
        `max_new_tokens` are generated: no decode step may follow."""
        return self.token in self.stop_ids or len(self.token_ids) >= self.max_new_tokens

    def advance(self, logits: torch.Tensor) -> None:
        """Choose the next token from `logits` [vocab] (float32)."""
        self.logits = logits
        self.token_ids.append(choose_token(logits, self.temperature, self.top_p, self.generator))


@dataclass(frozen=True)
class Generation:
    """Generated tokens, the logits that chose each one and the time the forward passes took."""

    token_ids: list[int]
    logits: list[torch.Tensor]
    seconds: float


def resolve_model_folder(spec: str, settings: Settings, progress: Progress | None = None) -> Path:
    """`builtin:NAME`, a model folder, or a `.gguf` file -> a loadable model folder."""
    if spec.startswith("builtin:"):
        return builtin_folder(spec.removeprefix("builtin:"), settings.models_dir, progress)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return gguf_folder(path, settings.models_dir, progress)
    if path.is_dir() and (path / "config.json").exists():
        return path
    hint = "it has no config.json" if path.is_dir() else "no such folder or .gguf file"
    raise ModelNotFoundError(
        f"model {spec!r} not found ({hint}). Pass a Hugging Face model folder, a .gguf file, or one of:\n"
        f"{describe_builtins()}"
    )


class Model:
    """A loaded model. Thread-safe for reads of a KV; forward passes are serialized by the caller."""

    def __init__(self, hf_model, tokenizer, folder: Path, spec: str, dtype: str, attention_name: str,
                 fingerprint: ModelFingerprint) -> None:
        self.hf_model, self.tokenizer, self.folder, self.spec = hf_model, tokenizer, folder, spec
        self.dtype_name, self.attention = dtype, attention_name
        config = hf_model.config
        self.num_layers: int = config.num_hidden_layers
        self.kv_heads: int = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.head_dim: int = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.context_tokens: int = config.max_position_embeddings
        self.eos_ids: frozenset[int] = _eos_ids(hf_model, tokenizer)
        self._cache_kwarg = _cache_kwarg(hf_model)  # once: inspecting the signature costs more than a dict lookup
        # the Rust tokenizer behind a fast tokenizer raises "Already borrowed" when two threads use it at once; the
        # server tokenizes prompts off the model thread, so every use goes through this lock
        self._text_lock = threading.Lock()
        self._scratch = threading.local()  # each thread's attention Workspace (kvmart/runtime/workspace.py)
        # the linear layers' route (kvmart/runtime/rows.py): oneDNN's packed product where its rows round alike
        # whatever their number and thread count (checked now), else sgemm with decode steps in fixed tiles; the
        # route is part of the fingerprint, as it changes the bits of every cache
        output = hf_model.get_output_embeddings()
        self._route = rows.Route()
        self._tiling = rows.RowTiling(self._route)
        rows.install(hf_model, self._tiling, output)
        self._route.packed = rows.choose(hf_model, self.dtype, output)
        self.fingerprint = replace(fingerprint, linear=rows.fingerprint_component() if self._tiling.packed else "")
        self.forward_passes = 0  # every forward pass this model ran (the server exports it: kvmart_forward_passes_total)

    @classmethod
    def load(cls, settings: Settings, progress: Progress | None = None) -> "Model":
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # kvmart draws its own progress; a bar per load is noise
        folder = resolve_model_folder(settings.model, settings, progress)
        if settings.attention == attention.NAME:
            attention.register()
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder))
            hf_model = AutoModelForCausalLM.from_pretrained(
                str(folder), dtype=TORCH_DTYPES[settings.dtype], attn_implementation=settings.attention
            )
        except (OSError, ValueError, KeyError) as e:
            raise ModelLoadError(f"cannot load model from {folder}: {e}") from e
        hf_model.eval()
        fp = model_fingerprint(folder, settings.dtype, settings.attention, settings.data_dir / "file-hashes.json")
        return cls(hf_model, tokenizer, folder, settings.model, settings.dtype, settings.attention, fp)

    @property
    def dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype_name]

    @property
    def vocab_size(self) -> int:
        return self.hf_model.config.vocab_size

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8

    # -- text ---------------------------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` exactly, with no special tokens added. Thread-safe. Never warns about a text longer
        than the tokenizer's `model_max_length` ("...will result in indexing errors"): kvmart checks lengths against
        the context itself and refuses what does not fit with a typed error, so the warning would only be noise."""
        with self._text_lock:
            return list(self.tokenizer.encode(text, add_special_tokens=False, verbose=False))

    def decode(self, token_ids: list[int]) -> str:
        """Thread-safe."""
        with self._text_lock:
            return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    # -- forward passes -----------------------------------------------------------------------------------------
    def check_fits(self, what: str, num_tokens: int) -> None:
        if num_tokens > self.context_tokens:
            raise ContextOverflowError(what, num_tokens, self.context_tokens)

    def prefill(self, token_ids: list[int], progress: Callable[[float], None] | None = None) -> KV:
        """The KV of `token_ids` computed from scratch, in one forward pass."""
        if not token_ids:
            raise InputError("cannot prefill an empty token sequence")
        self.check_fits("the document", len(token_ids))
        cache = self._cache((), len(token_ids))
        self._forward(cache, token_ids, logits_to_keep=1, progress=progress)
        return cache.new_kv()

    def prefill_pieces(self, pieces: list[list[int]], prefix: KV | Prefix | None = None,
                       progress: Callable[[float], None] | None = None) -> Prefix:
        """The KVs of `pieces`, each computed by one forward pass continuing from `prefix` and the pieces before it:
        the from-scratch reference that reusing any stored run of these pieces is bit-identical to."""
        done, total = as_prefix(prefix), sum(len(p) for p in pieces)
        computed: list[KV] = []
        for ids in pieces:
            computed.append(self.continue_from(done + tuple(computed), ids).new_kv)
            if progress:
                progress(sum(kv.num_tokens for kv in computed) / total)
        return tuple(computed)

    def continue_from(self, prefix: KV | Prefix | None, token_ids: list[int], all_logits: bool = False) -> Step:
        """Append `token_ids` after `prefix` (never modified). Logits of the last position, or of every new one."""
        if not token_ids:
            raise InputError("nothing to continue with: no tokens given")
        cache = self._cache(as_prefix(prefix), len(token_ids))
        logits = self._forward(cache, token_ids, logits_to_keep=0 if all_logits else 1)
        return Step(logits, cache)

    def generate(self, kv: KV | Prefix | None, token_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, stop_at_eos: bool = True) -> Generation:
        start = time.perf_counter()
        tokens, logits = [], []
        for token, step_logits in self.stream(kv, token_ids, max_new_tokens, temperature, top_p, seed, stop_at_eos):
            tokens.append(token)
            logits.append(step_logits)
        return Generation(tokens, logits, time.perf_counter() - start)

    def stream(self, kv: KV | Prefix | None, token_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
               top_p: float = 1.0, seed: int | None = None, stop_at_eos: bool = True,
               on_prompt: Callable[[KV], None] | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (token, logits that chose it) one by one: greedy at temperature 0, else sampled with top-p.
        Stops after `max_new_tokens`, or after an end-of-sequence token when `stop_at_eos`. One sequence alone:
        `begin`, then decode `step`s, exactly as a server decodes it among others."""
        decoder = self.begin(kv, token_ids, max_new_tokens, temperature, top_p, seed, stop_at_eos, on_prompt)
        while True:
            yield decoder.token, decoder.logits
            if decoder.done:
                return
            self.step([decoder])

    def begin(self, kv: KV | Prefix | None, token_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
              top_p: float = 1.0, seed: int | None = None, stop_at_eos: bool = True,
              on_prompt: Callable[[KV], None] | None = None, computed: Step | None = None) -> Decoder:
        """Compute the prompt's last piece and choose the first token: a Decoder ready for decode `step`s.

        `token_ids` are computed by one `continue_from` after the prefix, exactly as a chunk is, so their KV (given
        to `on_prompt` before the first token is chosen) is the same whether they end a prompt or are a chunk in the
        middle of a later one; the generated tokens then go into a working cache of their own after them.
        `computed`: that step, already computed (by `continue_many`, among other requests' pieces)."""
        prefix = as_prefix(kv)
        self.check_prompt(prefix, token_ids, max_new_tokens)
        step = computed if computed is not None else self.continue_from(prefix, token_ids)
        if on_prompt is not None:
            on_prompt(step.new_kv)
        cache = self._cache(prefix + (step.new_kv,), max_new_tokens - 1) if max_new_tokens > 1 else None
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        return Decoder(cache, step.logits[-1], max_new_tokens, temperature, top_p, generator,
                       self.eos_ids if stop_at_eos else frozenset())

    def check_prompt(self, prefix: Prefix, token_ids: list[int], max_new_tokens: int) -> None:
        """InputError or ContextOverflowError unless `begin` can generate `max_new_tokens` after these tokens."""
        if not token_ids:
            raise InputError("generation needs at least one prompt token after the cached prefix")
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        self.check_room(prefix_tokens(prefix) + len(token_ids), max_new_tokens)

    def check_room(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """ContextOverflowError unless a prompt of `prompt_tokens` leaves room for `max_new_tokens`: prompt +
        generated tokens <= context, as OpenAI and vLLM count (the last token is never fed back)."""
        self.check_fits("the prompt plus the tokens to generate", prompt_tokens + max_new_tokens)

    @property
    def packs_prompts(self) -> bool:
        """Whether `continue_many` puts several requests' pieces in one forward pass: on the packed route (rows
        round alike in any call) with kvmart's attention (each piece attends over its own cache)."""
        return self._tiling.packed is not None and self.attention == attention.NAME

    def continue_many(self, pieces: list[tuple[Prefix, list[int]]]) -> list[Step]:
        """`continue_from(prefix, token_ids)` of every piece (logits of its last position), with the same bits as
        each computed alone: where `packs_prompts`, all in forward passes of up to PACKED_PROMPT_TOKENS tokens, one
        piece after another along the token axis (their rows go through the linear layers together, which rounds
        no row otherwise on the packed route; each attends over its own cache with the kernel it uses alone; the
        output layer multiplies each one's last row alone); else one forward pass each."""
        caches = [self._cache(as_prefix(prefix), len(ids)) for prefix, ids in pieces]
        steps: list[Step] = []
        for group in self._packings([len(ids) for _, ids in pieces]):
            if len(group) == 1:
                i = group[0]
                steps.append(Step(self._forward(caches[i], pieces[i][1], logits_to_keep=1), caches[i]))
                continue
            logits = self._packed_forward([caches[i] for i in group], [pieces[i][1] for i in group])
            steps.extend(Step(piece_logits, caches[i]) for i, piece_logits in zip(group, logits, strict=True))
        return steps

    def _packings(self, lengths: list[int]) -> list[list[int]]:
        """The pieces (by index, in order) in forward passes: consecutive ones packed up to PACKED_PROMPT_TOKENS
        tokens where `packs_prompts`, else one each."""
        if not self.packs_prompts:
            return [[i] for i in range(len(lengths))]
        groups: list[list[int]] = []
        tokens = 0
        for i, n in enumerate(lengths):
            if groups and tokens + n <= PACKED_PROMPT_TOKENS:
                groups[-1].append(i)
                tokens += n
            else:
                groups.append([i])
                tokens = n
        return groups

    @torch.inference_mode()
    def _packed_forward(self, caches: list[WorkingCache], pieces: list[list[int]]) -> list[torch.Tensor]:
        """One forward pass of several pieces one after another along the token axis, each after its own cache:
        per piece, the logits [1, vocab] (float32) of its last position."""
        self.forward_passes += 1
        bounds, start = [], 0
        for ids in pieces:
            bounds.append((start, start + len(ids)))
            start += len(ids)
        positions = torch.cat([torch.arange(c.num_tokens, c.num_tokens + len(ids))
                               for c, ids in zip(caches, pieces, strict=True)]).unsqueeze(0)
        cache = PackedCache(caches, bounds)
        workspace = self.workspace()
        try:
            hidden = self.hf_model.get_decoder()(
                input_ids=torch.tensor([[t for ids in pieces for t in ids]]), position_ids=positions, use_cache=True,
                **{self._cache_kwarg: cache}, kvmart_cache=cache, kvmart_workspace=workspace,
            ).last_hidden_state
        finally:
            workspace.trim()
        output = self.hf_model.get_output_embeddings()
        return [output(hidden[:, end - 1:end, :]).float()[0] for _, end in bounds]

    def step(self, decoders: list[Decoder]) -> None:
        """One decode step for every decoder not done: feed each its last token, choose its next. With kvmart's
        attention all go through one forward pass (their rows batched through the linear layers, each attending
        over its own cache, chunks they share read once); with the contiguous implementations (sdpa, eager) one
        pass each. Either way each sequence gets the bits it gets alone (kvmart/runtime/rows.py and
        decode_attention.py say why)."""
        live = [d for d in decoders if not d.done]
        groups = [live] if self.attention == attention.NAME else [[d] for d in live]
        for group in groups:
            if group:
                for decoder, logits in zip(group, self._decode_forward(group), strict=True):
                    decoder.advance(logits)

    def _decode_forward(self, decoders: list[Decoder]) -> torch.Tensor:
        """Logits [len(decoders), vocab] (float32) of one forward pass feeding each decoder's last token."""
        caches = [d.cache for d in decoders if d.cache is not None]
        if len(caches) != len(decoders):
            raise AssertionError("a decoder with no room left was stepped")
        ids = [[d.token] for d in decoders]
        positions = torch.tensor([[c.num_tokens] for c in caches])
        batch = BatchCache(caches) if self.attention == attention.NAME else caches[0]
        with self._tiling.rows(rows.ROW_TILES[self.dtype]):
            return self._run(batch, ids, positions, logits_to_keep=1)[:, -1]

    def use_sgemm(self) -> None:
        """Multiply by BLAS's sgemm from now on (the benchmarks compare the routes); the fingerprint follows."""
        self._route.packed = None
        self.fingerprint = replace(self.fingerprint, linear="")

    @property
    def linear_route(self) -> str:
        """How the linear layers multiply (kvmart/runtime/rows.py): "onednn-packed" or "sgemm"."""
        return rows.PACKED if self._tiling.packed is not None else "sgemm"

    def _cache(self, prefix: Prefix, num_new_tokens: int) -> WorkingCache:
        self.check_fits("the prompt", prefix_tokens(prefix) + num_new_tokens)
        return WorkingCache.build(prefix, self.num_layers, self.kv_heads, self.head_dim, num_new_tokens, self.dtype,
                                  segmented=self.attention == attention.NAME)

    def workspace(self) -> Workspace:
        """The calling thread's attention workspace, kept between forward passes (so the hot path allocates
        nothing large) and never shared between threads."""
        workspace = getattr(self._scratch, "workspace", None)
        if workspace is None:
            workspace = self._scratch.workspace = Workspace()
        return workspace

    def _forward(self, cache: WorkingCache, token_ids: list[int], logits_to_keep: int,
                 progress: Callable[[float], None] | None = None) -> torch.Tensor:
        """Logits [positions kept, vocab] (float32) of one forward pass of `token_ids` after `cache`."""
        start = cache.num_tokens
        positions = torch.arange(start, start + len(token_ids)).unsqueeze(0)
        return self._run(cache, [token_ids], positions, logits_to_keep, progress)[0]

    @torch.inference_mode()
    def _run(self, cache: WorkingCache | BatchCache, token_ids: list[list[int]], positions: torch.Tensor,
             logits_to_keep: int, progress: Callable[[float], None] | None = None) -> torch.Tensor:
        """One forward pass of a batch of rows (one per sequence): logits [rows, positions kept, vocab], float32."""
        self.forward_passes += 1
        hooks = _layer_progress_hooks(self.hf_model, progress) if progress else []
        workspace = self.workspace()
        extra = {"kvmart_cache": cache, "kvmart_workspace": workspace} if self.attention == attention.NAME else {}
        try:
            out = self.hf_model(
                input_ids=torch.tensor(token_ids), position_ids=positions, use_cache=True,
                logits_to_keep=logits_to_keep, **{self._cache_kwarg: cache}, **extra,
            )
        finally:
            for h in hooks:
                h.remove()
            workspace.trim()
        return out.logits.float()


def _cache_kwarg(hf_model) -> str:
    """The forward keyword for the KV cache: `cache` in transformers >= 5.2x, `past_key_values` before (deprecated,
    removed in 5.40)."""
    return "cache" if "cache" in inspect.signature(hf_model.forward).parameters else "past_key_values"


def choose_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """Greedy at temperature 0, else sampled with top-p. Safe for any positive temperature and top_p: the logits
    are shifted by their maximum and scaled in float64 (the best token's is 0, and a temperature too small for the
    logits' dtype gives -inf to the others, never inf or nan), and the nucleus always keeps the most likely
    token."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax((logits - logits.max()).double() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < top_p
        keep[0] = True
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def _eos_ids(hf_model, tokenizer) -> frozenset[int]:
    ids = hf_model.generation_config.eos_token_id if hf_model.generation_config else None
    ids = ids if isinstance(ids, list) else [ids] if ids is not None else []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return frozenset(ids)


def _layer_progress_hooks(hf_model, progress: Callable[[float], None]) -> list:
    """Forward hooks that report the fraction of decoder layers done: a prefill is one long forward pass."""
    layers = hf_model.model.layers
    return [layer.register_forward_hook(lambda *_, i=i: progress((i + 1) / len(layers)))
            for i, layer in enumerate(layers)]


__all__ = ["Model", "Step", "Generation", "Decoder", "resolve_model_folder", "BUILTIN_NAMES"]
