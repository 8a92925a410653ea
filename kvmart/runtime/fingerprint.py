"""Fingerprints: what identifies a model for caching purposes, and the file hashes behind it.

A model fingerprint hashes everything that can change a KV cache bit: the config, the weight files, the tokenizer,
the dtype, the attention implementation and the route of the linear layers' products. Each component is kept so
that a refusal can say *which* differs. Hashing gigabytes of weights takes seconds, so file hashes are cached by
(path, size, mtime)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from kvmart.canonical import spaced

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt")
# config keys that record who wrote the file, not what the model computes
VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "dtype", "torch_dtype")


@dataclass(frozen=True)
class ModelFingerprint:
    """The components of a model's identity and their combined hash (`digest`, 64 hex chars)."""

    config: str
    weights: str
    tokenizer: str
    dtype: str
    attention: str
    # The engine that computed the KV, for engines other than kvmart's own transformers path, e.g.
    # "vllm 0.32.0; block_size 16". Empty (and then absent from `as_dict`, so that the digest of every
    # transformers-made artifact stays what it was) for the reference engine.
    engine: str = ""
    # The route the linear layers multiply by, when it is not BLAS's sgemm through nn.Linear (the route every earlier
    # release took), with the instruction set its kernels were picked for: "onednn-packed avx512"
    # (kvmart/runtime/rows.py). Empty, and then absent from `as_dict`, for sgemm, so that the digest of every cache
    # made that way stays what it was.
    linear: str = ""

    @property
    def digest(self) -> str:
        return hashlib.sha256(spaced(self.as_dict())).hexdigest()  # docs/FORMAT.md "Model fingerprint"

    def as_dict(self) -> dict[str, str]:
        components = {"config": self.config, "weights": self.weights, "tokenizer": self.tokenizer,
                      "dtype": self.dtype, "attention": self.attention}
        if self.engine:
            components["engine"] = self.engine
        if self.linear:
            components["linear"] = self.linear
        return components

    def differences(self, other: dict[str, str]) -> list[str]:
        """Names of the components whose values differ from `other` (a recorded `as_dict()`), including one
        that only one side has (an artifact made by another engine)."""
        mine = self.as_dict()
        return [k for k in sorted(mine.keys() | other.keys(), key=_component_order) if other.get(k) != mine.get(k)]


COMPONENTS = ("config", "weights", "tokenizer", "dtype", "attention", "engine", "linear")


def _component_order(name: str) -> tuple[int, str]:
    return (COMPONENTS.index(name) if name in COMPONENTS else len(COMPONENTS), name)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def file_sha256(path: Path, cache_file: Path | None = None) -> str:
    """sha256 of a file, remembered in `cache_file` keyed by resolved path, size and mtime."""
    path = path.resolve()
    stat = path.stat()
    key = f"{path}:{stat.st_size}:{stat.st_mtime_ns}"
    cache = _read_cache(cache_file)
    if key in cache:
        return cache[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    digest = h.hexdigest()
    if cache_file is not None:
        cache[key] = digest
        _write_cache(cache_file, cache)
    return digest


def _read_cache(cache_file: Path | None) -> dict[str, str]:
    if cache_file is None or not cache_file.exists():
        return {}
    try:
        return json.loads(cache_file.read_text())
    except (OSError, ValueError):
        return {}  # a damaged cache only costs a re-hash


def _write_cache(cache_file: Path, cache: dict[str, str]) -> None:
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(cache, sort_keys=True))
    os.replace(tmp, cache_file)


def config_hash(folder: Path) -> str:
    config = json.loads((folder / "config.json").read_text())
    for key in VOLATILE_CONFIG_KEYS:
        config.pop(key, None)
    return hashlib.sha256(spaced(config)).hexdigest()


def files_hash(paths: list[Path], cache_file: Path | None) -> str:
    """sha256 of the spaced JSON list of [file name, hex sha256 of its bytes], in file-name order."""
    return hashlib.sha256(spaced([[p.name, file_sha256(p, cache_file)] for p in sorted(paths, key=lambda p: p.name)])
                          ).hexdigest()


def model_fingerprint(folder: Path, dtype: str, attention: str, cache_file: Path | None = None) -> ModelFingerprint:
    weights = [p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES]
    tokenizer = [folder / n for n in TOKENIZER_FILES if (folder / n).exists()]
    return ModelFingerprint(
        config=config_hash(folder),
        weights=files_hash(weights, cache_file),
        tokenizer=files_hash(tokenizer, cache_file),
        dtype=dtype,
        attention=attention,
    )

