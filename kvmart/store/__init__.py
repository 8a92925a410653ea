"""Stores by URL: `open_store(url)` picks the implementation from the scheme in `SCHEMES`.

    /path/to/dir or file:///path   DiskStore (the embedded default)
    memory://                      MemoryStore (tests, throwaway runs)
    redis://host:port/db?...       RedisStore, a shared tier (redis.py); rediss:// for TLS
    s3://bucket/prefix?...         S3Store, a shared tier (s3.py); any S3-compatible endpoint

Query options of the shared tiers: redis `prefix`, `chunk_bytes` (8MiB), `ttl` (5m, 1h, pinned or seconds);
s3 `endpoint`, `region`; both `disk_bytes` and `ram_bytes`, the budgets of the node's local tiers in front.
Given `local_dir`, a shared URL opens a TieredStore: [RAM if ram_bytes] -> disk at local_dir -> shared."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from kvmart.config import SHARED_STORE_SCHEMES
from kvmart.errors import ConfigError
from kvmart.store.base import Entry, Store

SCHEMES = ("file", "memory", "redis", "rediss", "s3")
SHARED_SCHEMES = SHARED_STORE_SCHEMES
COMMON_OPTIONS = ("disk_bytes", "ram_bytes")
OPTIONS = {"redis": ("prefix", "chunk_bytes", "ttl"), "s3": ("endpoint", "region")}


def open_store(url: str, local_dir: Path | None = None) -> Store:
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "file", url
    if scheme == "file":
        from kvmart.store.disk import DiskStore

        return DiskStore(Path(rest).expanduser())
    if scheme == "memory":
        from kvmart.store.memory import MemoryStore

        return MemoryStore()
    if scheme in SHARED_SCHEMES:
        return _open_shared(url, local_dir)
    raise ConfigError(f"unknown store scheme {scheme!r} in {url!r}; known schemes: {', '.join(SCHEMES)}")


def _options(url: str, known: tuple[str, ...]) -> dict[str, str]:
    options = dict(parse_qsl(urlsplit(url).query, keep_blank_values=True))
    unknown = sorted(set(options) - set(known) - set(COMMON_OPTIONS))
    if unknown:
        raise ConfigError(f"unknown store option {unknown[0]!r} in {url!r}; known: "
                          f"{', '.join(known + COMMON_OPTIONS)}")
    return options


def _bytes(options: dict[str, str], name: str, default: int) -> int:
    from kvmart.config import parse_bytes

    return parse_bytes(options[name]) if name in options else default


def _ttl(text: str) -> int:
    from kvmart.store.policy import TTL_CLASSES

    if text in TTL_CLASSES:
        return TTL_CLASSES[text]
    if text.isdigit():
        return int(text)
    raise ConfigError(f"ttl {text!r} is neither a TTL class ({', '.join(TTL_CLASSES)}) nor a number of seconds")


def open_shared(url: str) -> Store:
    """The shared tier a redis:// or s3:// URL names, without local tiers."""
    try:
        return _open_shared_tier(url)
    except ImportError as e:
        extra = "redis" if url.startswith("redis") else "s3"
        raise ConfigError(f"{url.split('://')[0]}:// stores need the {e.name} package: pip install "
                          f"'kvmart[{extra}]'") from e


def _open_shared_tier(url: str) -> Store:
    parts = urlsplit(url)
    kind = "redis" if parts.scheme in ("redis", "rediss") else "s3"
    options = _options(url, OPTIONS[kind])
    if kind == "redis":
        from kvmart.store.redis import DEFAULT_CHUNK_BYTES, RedisConfig, RedisStore

        base = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
        return RedisStore(RedisConfig(base, options.get("prefix", "kvmart"),
                                      _bytes(options, "chunk_bytes", DEFAULT_CHUNK_BYTES),
                                      _ttl(options.get("ttl", "pinned"))))
    from kvmart.store.s3 import S3Config, S3Store

    return S3Store(S3Config(parts.netloc, parts.path.strip("/") or "kvmart", options.get("endpoint") or None,
                            options.get("region", "us-east-1")))


def _open_shared(url: str, local_dir: Path | None) -> Store:
    shared = open_shared(url)
    if local_dir is None:
        return shared
    from kvmart.store.disk import DiskStore
    from kvmart.store.memory import MemoryStore
    from kvmart.store.tiered import Tier, TieredStore

    options = dict(parse_qsl(urlsplit(url).query))
    tiers = []
    if _bytes(options, "ram_bytes", 0):
        tiers.append(Tier("ram", MemoryStore(), _bytes(options, "ram_bytes", 0)))
    tiers.append(Tier("disk", DiskStore(local_dir), _bytes(options, "disk_bytes", 0)))
    tiers.append(Tier("redis" if url.startswith("redis") else "s3", shared, is_shared=True))
    return TieredStore(tiers)


__all__ = ["Entry", "Store", "open_store", "open_shared", "SCHEMES"]
