"""Settings: one frozen, validated object. Every environment variable kvmart reads is in `ENV` below, with the
prefix KVMART_; command-line options override them by building a new Settings with `dataclasses.replace`."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path

from .codec import DEFAULT_CODEC, parse_spec
from .errors import ConfigError

DTYPES = ("float32", "bfloat16")
ATTENTION_IMPLEMENTATIONS = ("kvmart", "sdpa", "eager")  # kvmart: see kvmart/attention.py
DEFAULT_MODEL = "builtin:smollm2-135m"


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
    codec: str = DEFAULT_CODEC  # how new artifacts' tensors are encoded: NAME or NAME:LEVEL (kvmart.codec)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype {self.dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ConfigError(
                f"attention {self.attention!r} is not supported; choose one of {', '.join(ATTENTION_IMPLEMENTATIONS)}"
            )
        if not self.model:
            raise ConfigError("model must not be empty")
        parse_spec(self.codec)

    @property
    def store_url(self) -> str:
        return self.store or str(self.data_dir / "store")

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    def with_overrides(self, **overrides: object) -> "Settings":
        """A copy with every non-None override applied (CLI options that were not given are None)."""
        given = {k: v for k, v in overrides.items() if v is not None}
        if "data_dir" in given:
            given["data_dir"] = Path(str(given["data_dir"])).expanduser()
        return replace(self, **given)


# field name -> environment variable
ENV = {f.name: "KVMART_" + f.name.upper() for f in fields(Settings)}


def load_settings(environ: dict[str, str] | None = None) -> Settings:
    """Settings from the environment (KVMART_DATA_DIR, KVMART_MODEL, KVMART_DTYPE, KVMART_ATTENTION, KVMART_STORE,
    KVMART_CODEC)."""
    env = os.environ if environ is None else environ
    values: dict[str, object] = {name: env[var] for name, var in ENV.items() if env.get(var)}
    values["data_dir"] = Path(str(values.get("data_dir") or default_data_dir())).expanduser()
    return Settings(**values)  # type: ignore[arg-type]
