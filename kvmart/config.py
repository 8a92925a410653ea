"""Settings: one frozen, validated object. Every environment variable kvmart reads is in `ENV` below, with the
prefix KVMART_; command-line options override them by building a new Settings with `dataclasses.replace`."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path

from kvmart.errors import ConfigError

SHARED_STORE_SCHEMES = ("redis", "rediss", "s3")  # stores other nodes share (kvmart.store.SHARED_SCHEMES)
SIGNING_KEY_ENV = "KVMART_SIGNING_KEY"  # a secret, so not a Settings field: read by kvmart/format/signing.py at each use
CHUNK_ALIGN_TOKENS = 8  # chunk sizes are multiples of this (kvmart/format/keys.py)

DTYPES = ("float32", "bfloat16")
ENGINES = ("transformers", "vllm")  # kvmart serve --engine: kvmart/engines
ATTENTION_IMPLEMENTATIONS = ("kvmart", "sdpa", "eager")  # kvmart: see kvmart/runtime/attention.py
DEFAULT_MODEL = "builtin:smollm2-135m"
UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
         "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'2GiB', '512MB', '1e9', '0' -> a byte count. ConfigError on anything else."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?(?:e[0-9]+)?)\s*([a-z]*)\s*", text.lower())
    if not match or match.group(2) not in UNITS:
        raise ConfigError(f"{text!r} is not a byte size; write e.g. 2GiB, 512MB or 1000000")
    return int(float(match.group(1)) * UNITS[match.group(2)])


def default_data_dir() -> Path:
    """`$XDG_DATA_HOME/kvmart`, else `~/.local/share/kvmart`."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "kvmart"


@dataclass(frozen=True)
class Settings:
    """Everything kvmart can be configured with. Validated when built."""

    data_dir: Path
    model: str = DEFAULT_MODEL
    dtype: str = "float32"
    attention: str = "kvmart"
    store: str = ""  # empty: the local disk store under data_dir/store
    ledger: str = ""  # empty: the SQLite ledger data_dir/ledger.sqlite; or postgresql://USER@HOST:PORT/DB
    codec: str = ""  # how new artifacts' tensors are encoded: NAME or NAME:LEVEL (kvmart.codec); empty: auto
    # tokens per chunk of a chunk chain (kvmart/reuse/chunks.py): documents are stored, and prompts reused, in chunks
    # of this size cut from each segment's start. The CLI and every node of a cluster must agree on it.
    chunk_tokens: int = 256

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype {self.dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ConfigError(
                f"attention {self.attention!r} is not supported; choose one of {', '.join(ATTENTION_IMPLEMENTATIONS)}"
            )
        if not self.model:
            raise ConfigError("model must not be empty")
        if self.codec:
            from kvmart.codec import parse_spec  # here, not at the top: the codecs import torch (kvmart --help)

            parse_spec(self.codec)
        if self.chunk_tokens < CHUNK_ALIGN_TOKENS or self.chunk_tokens % CHUNK_ALIGN_TOKENS:
            raise ConfigError(f"chunk_tokens must be a positive multiple of {CHUNK_ALIGN_TOKENS} "
                              f"(got {self.chunk_tokens})")

    @property
    def store_url(self) -> str:
        return self.store or str(self.data_dir / "store")

    @property
    def artifact_codec(self) -> str:
        """The codec new artifacts get: the one set, else kvmart's lossless codec (DEFAULT_CODEC) where the store
        is shared (redis://, s3://: bytes cross a network and are billed at rest), and `raw` for a local store,
        whose artifacts are mapped in place from the page cache (a warm load is 20-25x faster than decoding)."""
        if self.codec:
            return self.codec
        from kvmart.codec import DEFAULT_CODEC

        return DEFAULT_CODEC if self.store_url.partition("://")[0] in SHARED_STORE_SCHEMES else "raw"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    def with_overrides(self, **overrides: object) -> "Settings":
        """A copy with every non-None override applied (CLI options that were not given are None)."""
        given = {k: v for k, v in overrides.items() if v is not None}
        if "data_dir" in given:
            given["data_dir"] = Path(str(given["data_dir"])).expanduser()
        return replace(self, **given)  # type: ignore[arg-type]  # values are validated in __post_init__


# field name -> environment variable
ENV = {f.name: "KVMART_" + f.name.upper() for f in fields(Settings)}


def load_settings(environ: dict[str, str] | None = None) -> Settings:
    """Settings from the environment (KVMART_DATA_DIR, KVMART_MODEL, KVMART_DTYPE, KVMART_ATTENTION, KVMART_STORE,
    KVMART_LEDGER, KVMART_CODEC, KVMART_CHUNK_TOKENS)."""
    env = os.environ if environ is None else environ
    values: dict[str, object] = {name: env[var] for name, var in ENV.items() if env.get(var)}
    values["data_dir"] = Path(str(values.get("data_dir") or default_data_dir())).expanduser()
    if "chunk_tokens" in values:
        try:
            values["chunk_tokens"] = int(str(values["chunk_tokens"]))
        except ValueError as e:
            raise ConfigError(f"{ENV['chunk_tokens']}={values['chunk_tokens']!r} is not an integer") from e
    return Settings(**values)  # type: ignore[arg-type]  # values converted above, checked in __post_init__
