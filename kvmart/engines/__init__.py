"""Engines by name: `open_engine(name, settings)` picks the implementation from `ENGINES`, imported lazily (vLLM
is an optional extra, `pip install 'kvmart[vllm]'`; on CPU machines `scripts/install-vllm.sh`).

    transformers   kvmart's own path: the embedded default and the exactness reference (engines/transformers.py)
    vllm           vLLM with kvmart's KV connector (engines/vllm.py, engines/vllm_connector.py)"""

from __future__ import annotations

from kvmart.config import ENGINES, Settings
from kvmart.engines.base import Completion, Engine
from kvmart.errors import ConfigError


def open_engine(name: str, settings: Settings, **options: object) -> Engine:
    """The engine `name` with the model and store of `settings`; `options` go to the engine (vllm: see
    `VllmOptions`). ConfigError for an unknown name, or for vllm when it is not installed."""
    if name == "transformers":
        from kvmart.engines.transformers import TransformersEngine

        return TransformersEngine.open(settings)
    if name == "vllm":
        from kvmart.engines.vllm import VllmEngine, VllmOptions

        return VllmEngine.open(settings, VllmOptions(**options))  # type: ignore[arg-type]  # options come from the CLI's typed flags
    raise ConfigError(f"unknown engine {name!r}; known engines: {', '.join(ENGINES)}")


__all__ = ["ENGINES", "Completion", "Engine", "open_engine"]
