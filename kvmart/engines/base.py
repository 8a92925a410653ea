"""The engine interface: what kvmart needs from an inference engine to publish a document (prefill it once and
store its KV as an artifact) and to answer a prompt that starts with a published document from its stored KV.

Two implementations, picked by name in `kvmart.engines.ENGINES`: `transformers` (kvmart's own path, the embedded
default and the exactness reference) and `vllm` (vLLM with kvmart's KV connector). An artifact is only ever
loaded by the engine that made it: the engine is part of the fingerprint (`ModelFingerprint.engine`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from kvmart.reuse.core import Precomputed
from kvmart.runtime.fingerprint import ModelFingerprint
from kvmart.store import Entry


@dataclass(frozen=True)
class Completion:
    """One answered prompt. `cached_tokens` prompt tokens were read from `document`'s stored KV, the other
    `prompt_tokens - cached_tokens` were computed. `token_ids` are the generated tokens, an end-of-turn included."""

    token_ids: list[int]
    prompt_tokens: int
    cached_tokens: int
    document: Entry | None
    seconds: float
    tier: str = "none"  # where the cached tokens came from: store | ram (an engine's own memory) | none
    logprobs: list[dict[int, float]] | None = None  # per generated token, the top ones asked for (vllm engine)

    @property
    def computed_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens


class Engine(ABC):
    """A loaded model behind one engine. Not thread-safe: one thread drives it (the server's model worker).

    Text attributes (`tokenizer`, `tokenize`, `decode`, `eos_ids`, `vocab_size`, `context_tokens`) are the ones
    `kvmart.runtime.model.Model` has, so prompt layout (kvmart/runtime/chat.py, kvmart/reuse/prompt.py) is the same for every
    engine: the ids an engine publishes are the ids any engine would send."""

    name: str
    spec: str  # the model as the user named it (`builtin:tiny`, a folder...)
    fingerprint: ModelFingerprint  # of the KV this engine computes; artifacts are matched and checked against it

    @property
    @abstractmethod
    def tokenizer(self):
        """The Hugging Face tokenizer (chat template included)."""

    @property
    @abstractmethod
    def context_tokens(self) -> int: ...

    @property
    @abstractmethod
    def eos_ids(self) -> frozenset[int]: ...

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` exactly, with no special tokens added."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    @abstractmethod
    def publish(self, token_ids: list[int], title: str = "", source: str = "") -> Precomputed:
        """Prefill exactly `token_ids` and store the artifact, or return the stored one (nothing computed).
        Raises InputError / ContextOverflowError for ids the model cannot take, StoreError if the store fails."""

    @abstractmethod
    def complete(self, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0, seed: int | None = None,
                 bypass: bool = False) -> Completion:
        """Generate after `prompt_ids` (greedy at temperature 0), reusing the stored KV of the longest published
        document the prompt starts with, unless `bypass` (then everything is computed from scratch)."""

    def close(self) -> None:  # noqa: B027  (optional: most engines hold nothing to release)
        """Release the engine (processes, memory). Idempotent."""
