"""The server's settings: one frozen, validated object beside the core `Settings` (which says which model and
store). Every environment variable the server reads is in `ENV` below, with the prefix KVMART_; `kvmart serve`'s
options override them."""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass, fields, replace
from pathlib import Path

from kvmart.config import ENGINES, UNITS, parse_bytes  # noqa: F401  (re-exported: the server's options use them)
from kvmart.errors import ConfigError


@dataclass(frozen=True)
class ServerSettings:
    """How `kvmart serve` listens, queues and caches. Validated when built."""

    host: str = "127.0.0.1"
    port: int = 8000
    ram_cache_bytes: int = 2 * 2**30  # the hot tier's budget for decoded KV caches in RAM
    max_active: int = 64  # requests the model worker keeps active at most (memory may allow fewer: batch_memory_bytes)
    max_queue: int = 64  # requests waiting beyond those; more get HTTP 429
    # KV the active requests may hold in all (their computed prompt chunks and their answers' room); a request that
    # would pass it waits for others to end (the first one always runs); 0: only max_active limits them
    batch_memory_bytes: int = 2**30
    batching: bool = True  # decode steps of all active requests in one forward pass (off: one pass each)
    # prompt chunks of concurrent requests packed into shared forward passes (float32; the same bits): more tokens/s,
    # but a first token waits for the whole pack (bench/serve_load.py measures both; docs/SERVER.md)
    batch_prompts: bool = False
    max_body_bytes: int = 32 * 2**20  # larger request bodies get HTTP 413
    default_max_tokens: int = 256  # when a request names no max_tokens (never beyond the context)
    log_level: str = "info"
    engine: str = "transformers"  # transformers (kvmart's own path) | vllm (vLLM with kvmart's KV connector)
    # limits (docs/SECURITY.md); 0 turns a per-key limit off
    rate_limit_per_minute: int = 600  # requests one API key may start per minute (beyond: HTTP 429, Retry-After)
    rate_limit_burst: int = 60  # requests one key may send at once before the per-minute rate applies
    max_concurrent_per_key: int = 16  # requests of one key in flight at once (beyond: HTTP 429)
    signin_attempts_per_minute: int = 10  # web sign-ins one client address may try per minute (beyond: HTTP 429)
    # where per-key limits and web sessions live: `auto` (in the store's Redis when the store is redis://, shared by
    # every node; else this node's memory), `local` (this node's memory), or a redis:// URL (docs/SCALE.md)
    shared_state: str = "auto"
    max_document_tokens: int = 0  # longest document one may publish (beyond: HTTP 413); 0: the model's context
    max_artifact_bytes: int = 2**30  # largest artifact published or uploaded (beyond: HTTP 413); 1 GiB holds
    # SmolLM2's whole 8,192-token context in float32 (377 MB) and a 3,774-token Qwen3-0.6B-shape document (866 MB)
    # how much of an upload the provider recomputes (chunk 0 always; kvmart/reuse/upload.py): `bound`, the fewest
    # chunks that meet the stated escape bound; `percent`, upload_verify_percent of the others (100: all)
    upload_verify: str = "bound"
    upload_verify_percent: int = 100
    # ownership claims (kvmart/server/fetch.py): also fetch from loopback hosts, over http too (tests, local trials)
    claim_allow_loopback: bool = False
    cors_origin: str = ""  # origins (comma-separated) whose pages may call the API from a browser; empty: none

    @property
    def cors_origins(self) -> tuple[str, ...]:
        return tuple(o.strip() for o in self.cors_origin.split(",") if o.strip())
    # publish bodies beyond max_body_bytes (they carry an artifact: streamed to disk, verified from there) read and
    # verified at once; more get HTTP 429 (kvmart/server/publish_body.py states the memory bound)
    max_concurrent_uploads: int = 2
    # names this node in the ledger: its holds carry it, so the node releases its own when it starts again; unique
    # among live nodes (empty: host, port and data directory, `node_name`)
    node_name: str = ""
    # how often the catalogue looks for documents published or deleted elsewhere (the CLI, other nodes); requests
    # never trigger a look, and a named document is checked to be still stored when used
    catalog_refresh_seconds: float = 5.0

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ConfigError(f"unknown engine {self.engine!r}; known engines: {', '.join(ENGINES)}")
        for name in ("ram_cache_bytes", "max_queue", "batch_memory_bytes", "max_body_bytes", "rate_limit_per_minute",
                     "rate_limit_burst", "max_concurrent_per_key", "max_document_tokens", "max_artifact_bytes",
                     "signin_attempts_per_minute"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative (got {getattr(self, name)})")
        for name in ("max_active", "default_max_tokens", "max_concurrent_uploads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1 (got {getattr(self, name)})")
        if self.rate_limit_per_minute and self.rate_limit_burst < 1:
            raise ConfigError("rate_limit_burst must be at least 1 when rate_limit_per_minute is set")
        if not 1 <= self.upload_verify_percent <= 100:
            raise ConfigError(f"upload_verify_percent must be 1-100 (got {self.upload_verify_percent})")
        if self.shared_state not in ("auto", "local") and not self.shared_state.startswith(("redis://", "rediss://")):
            raise ConfigError(f"shared_state must be auto, local or a redis:// URL (got {self.shared_state!r})")
        if self.upload_verify not in ("bound", "percent"):
            raise ConfigError(f"upload_verify must be bound or percent (got {self.upload_verify!r})")
        for origin in self.cors_origins:
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise ConfigError(f"CORS origin {origin!r} is not an origin; write e.g. https://app.example.com or *")
        if self.catalog_refresh_seconds < 0:
            raise ConfigError(f"catalog_refresh_seconds must not be negative (got {self.catalog_refresh_seconds})")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port {self.port} is not a TCP port")

    @property
    def upload_sample_percent(self) -> int | None:
        """What kvmart/reuse/upload.py's `verify_upload` takes: None for the stated bound, else the percent."""
        return None if self.upload_verify == "bound" else self.upload_verify_percent

    def with_overrides(self, **overrides: object) -> "ServerSettings":
        """A copy with every non-None override applied (options that were not given are None). An explicit
        upload_verify_percent means upload_verify=percent unless that is given too."""
        given = {k: v for k, v in overrides.items() if v is not None}
        if "upload_verify_percent" in given:
            given.setdefault("upload_verify", "percent")
        return replace(self, **given)  # type: ignore[arg-type]  # fields checked in __post_init__


def node_name(server: ServerSettings, data_dir: Path) -> str:
    """The node's name in the ledger: `node_name` if set, else host:port:data-directory digest, the same for every
    run of the same node (so a restart finds its holds) and different for two nodes alive at once (one port per
    host, one data directory per node)."""
    if server.node_name:
        return server.node_name
    digest = hashlib.sha256(str(data_dir.expanduser().resolve()).encode()).hexdigest()[:12]
    return f"{socket.gethostname()[:80]}:{server.port}:{digest}"


# field name -> environment variable
ENV = {f.name: "KVMART_" + f.name.upper() for f in fields(ServerSettings) if f.name not in ("host", "port")}
ENV.update(host="KVMART_HOST", port="KVMART_PORT")


def load_server_settings(environ: dict[str, str] | None = None) -> ServerSettings:
    """ServerSettings from the environment (KVMART_HOST, KVMART_PORT, KVMART_RAM_CACHE_BYTES, ...)."""
    env = os.environ if environ is None else environ
    values: dict[str, object] = {}
    for f in fields(ServerSettings):
        raw = env.get(ENV[f.name])
        if raw:
            values[f.name] = _convert(f.name, raw, type(getattr(ServerSettings, f.name)))
    if "upload_verify_percent" in values:  # a percent set on its own means: use it
        values.setdefault("upload_verify", "percent")
    return ServerSettings(**values)  # type: ignore[arg-type]  # values converted per field above, checked in __post_init__


def _convert(name: str, raw: str, kind: type) -> object:
    if kind is str:
        return raw
    if kind is bool:
        if raw.strip().lower() not in ("1", "true", "yes", "0", "false", "no"):
            raise ConfigError(f"{ENV[name]}={raw!r} is not a yes/no value (1, true, yes, 0, false, no)")
        return raw.strip().lower() in ("1", "true", "yes")
    if name.endswith("_bytes"):
        return parse_bytes(raw)
    try:
        return float(raw) if kind is float else int(raw)
    except ValueError as e:
        raise ConfigError(f"{ENV[name]}={raw!r} is not a{' number' if kind is float else 'n integer'}") from e
