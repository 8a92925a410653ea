"""Cluster-wide state in Redis: the per-key limits and the web sessions that several `kvmart serve` nodes must
share, so that a key gets its limit once across the cluster (not once per node) and a browser signed in on one
node is signed in on every node. Each check-and-change is one atomic Lua script (or one atomic command), run on
Redis' own clock (TIME), so nodes with skewed clocks agree.

    PREFIX:bucket:<key digest>     hash {tokens, updated}: a token bucket; expires once it would be full again
    PREFIX:inflight:<key digest>   sorted set: request id -> lease expiry; the requests of a key in flight
    PREFIX:session:<sha256(token)> JSON {csrf, sealed}: a signed-in web session; expires when idle
    PREFIX:secret                  32 random bytes, set once by the first node (SET NX): the anonymous CSRF secret

A request in flight holds a lease, not a bare counter: a node killed mid-request leaves a lease that expires after
`lease_seconds`, so a crash never locks a key out for longer than that. A session's API key is sealed with a key
derived from the session token, which only the browser holds (Redis keeps its sha256): whoever reads Redis learns
neither a session token nor an API key.

Without Redis the same state lives in each node's memory (kvmart/server/limits.py, kvmart/web/sessions.py): limits
are then per node (docs/SCALE.md)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from kvmart.errors import ConfigError, RateLimitedError, StoreUnavailableError

DEFAULT_LEASE_SECONDS = 600  # longest a request of a dead node keeps counting against its key's concurrency
STATE_MODES = ("auto", "local")  # or a redis:// URL

# KEYS: bucket, inflight. ARGV: per_second, burst, max_concurrent, lease_seconds, request id.
# Returns {0, ""} admitted; {1, in flight} over the concurrency limit; {2, seconds to wait} over the rate.
ADMIT_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local per_second, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local max_concurrent, lease = tonumber(ARGV[3]), tonumber(ARGV[4])
if max_concurrent > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  local in_flight = redis.call('ZCARD', KEYS[2])
  if in_flight >= max_concurrent then return {1, tostring(in_flight)} end
end
if per_second > 0 then
  local state = redis.call('HMGET', KEYS[1], 'tokens', 'updated')
  local tokens, updated = tonumber(state[1]), tonumber(state[2])
  if tokens == nil then tokens, updated = burst, now end
  tokens = math.min(burst, tokens + math.max(0, now - updated) * per_second)
  if tokens < 1 then
    redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'updated', tostring(now))
    return {2, tostring((1 - tokens) / per_second)}
  end
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens - 1), 'updated', tostring(now))
  redis.call('EXPIRE', KEYS[1], math.ceil(burst / per_second) + 1)
end
if max_concurrent > 0 then
  redis.call('ZADD', KEYS[2], now + lease, ARGV[5])
  redis.call('EXPIRE', KEYS[2], math.ceil(lease) + 1)
end
return {0, ''}
"""

# KEYS: bucket. ARGV: per_second, burst. Returns the bucket's tokens now, as text (read-only).
TOKENS_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'updated')
local tokens, updated = tonumber(state[1]), tonumber(state[2])
if tokens == nil then return tostring(ARGV[2]) end
return tostring(math.min(tonumber(ARGV[2]), tokens + math.max(0, now - updated) * tonumber(ARGV[1])))
"""


@dataclass(frozen=True)
class StateConfig:
    """Where the cluster's state lives: a Redis base URL and a key prefix."""

    url: str
    prefix: str
    timeout_seconds: float = 2.0


def state_config(mode: str, store_url: str) -> StateConfig | None:
    """The Redis that holds the cluster's state, or None (each node keeps its own). `mode`: `auto` (the store's
    Redis, when the store is redis:// or rediss://, under the store's prefix + ':state'), `local`, or a redis:// URL
    (its `prefix` query option, default `kvmart:state`)."""
    if mode == "local":
        return None
    if mode == "auto":
        parts = urlsplit(store_url)
        if parts.scheme not in ("redis", "rediss"):
            return None
        prefix = dict(parse_qsl(parts.query)).get("prefix", "kvmart")
        return StateConfig(urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")), f"{prefix}:state")
    parts = urlsplit(mode)
    if parts.scheme not in ("redis", "rediss"):
        raise ConfigError(f"shared state {mode!r} is neither {' nor '.join(STATE_MODES)} nor a redis:// URL")
    prefix = dict(parse_qsl(parts.query)).get("prefix", "kvmart:state")
    return StateConfig(urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")), prefix)


class RedisState:
    """One node's handle on the cluster's state. Thread-safe (redis-py's connection pool). Every connection failure
    raises StoreUnavailableError; callers decide what a node does without it."""

    def __init__(self, config: StateConfig) -> None:
        try:
            import redis
        except ImportError as e:
            raise ConfigError("cluster-wide state in Redis needs the redis package: pip install 'kvmart[redis]'") from e
        self.config = config
        self._errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
        self._client = redis.Redis.from_url(config.url, socket_timeout=config.timeout_seconds,
                                            socket_connect_timeout=config.timeout_seconds)
        self._admit = self._client.register_script(ADMIT_SCRIPT)
        self._tokens = self._client.register_script(TOKENS_SCRIPT)

    def __repr__(self) -> str:
        return f"RedisState({self.config.url!r}, prefix={self.config.prefix!r})"

    def _key(self, *parts: str) -> str:
        return ":".join((self.config.prefix, *parts))

    @contextmanager
    def _reach(self) -> Iterator[None]:
        try:
            yield
        except self._errors as e:
            raise StoreUnavailableError(f"redis at {self.config.url} (cluster state) is unreachable: {e}") from e

    # -- limits ----------------------------------------------------------------------------------------------------
    def admit(self, digest: str, per_minute: int, burst: int, max_concurrent: int,
              lease_seconds: float = DEFAULT_LEASE_SECONDS) -> str:
        """Admit one request of the key whose sha256 is `digest`, atomically across every node: RateLimitedError
        when the key is over its rate or has `max_concurrent` requests in flight; else the request's id, to pass to
        `release` when it ends (or its lease expires)."""
        request_id = secrets.token_hex(8)
        with self._reach():
            code, value = self._admit(keys=[self._key("bucket", digest), self._key("inflight", digest)],
                                      args=[per_minute / 60.0, burst, max_concurrent, lease_seconds, request_id])
        code, value = int(code), value.decode() if isinstance(value, bytes) else str(value)
        if code == 1:
            raise RateLimitedError(f"too many concurrent requests for this API key: {value} in flight across the "
                                   f"cluster, the limit is {max_concurrent}; wait for one to finish", 1)
        if code == 2:
            wait = max(1, int(-(-float(value) // 1)))
            raise RateLimitedError(f"rate limit exceeded for this API key: at most {per_minute} requests per minute "
                                   f"across the cluster (bursts of {burst}); retry in {wait} s", wait)
        return request_id

    def tokens(self, digest: str, per_minute: int, burst: int) -> float:
        """Read-only: the requests the key whose sha256 is `digest` may start now, by its cluster-wide bucket."""
        with self._reach():
            value = self._tokens(keys=[self._key("bucket", digest)], args=[per_minute / 60.0, burst])
        return float(value.decode() if isinstance(value, bytes) else value)

    def release(self, digest: str, request_id: str) -> None:
        with self._reach():
            self._client.zrem(self._key("inflight", digest), request_id)

    # -- sessions --------------------------------------------------------------------------------------------------
    def secret(self) -> bytes:
        """The cluster's anonymous-CSRF secret: the first node to ask sets it (SET NX), every node reads the same."""
        key = self._key("secret")
        with self._reach():
            self._client.set(key, secrets.token_bytes(32), nx=True)
            value = self._client.get(key)
        if not isinstance(value, bytes) or len(value) != 32:
            raise StoreUnavailableError(f"redis at {self.config.url} holds no valid cluster secret at {key}")
        return value

    def put_session(self, token: str, csrf: str, api_key: str, idle_seconds: float) -> None:
        record = json.dumps({"csrf": csrf, "sealed": seal(token, api_key)})
        with self._reach():
            self._client.set(self._session_key(token), record, ex=max(1, int(idle_seconds)))

    def get_session(self, token: str, idle_seconds: float) -> tuple[str, str] | None:
        """(csrf, api key) of a live session, its idle clock restarted (GETEX: atomic); None if unknown, expired or
        not opened by this token."""
        with self._reach():
            raw = self._client.getex(self._session_key(token), ex=max(1, int(idle_seconds)))
        if raw is None:
            return None
        try:
            record = json.loads(raw)
            return str(record["csrf"]), unseal(token, str(record["sealed"]))
        except (ValueError, KeyError, TypeError):
            return None  # not ours, or tampered with: no session

    def drop_session(self, token: str) -> None:
        with self._reach():
            self._client.delete(self._session_key(token))

    def _session_key(self, token: str) -> str:
        return self._key("session", hashlib.sha256(token.encode()).hexdigest())


# -- sealing a session's API key with its token -------------------------------------------------------------------
# HMAC-SHA256 as a PRF in counter mode (the keystream) and as a MAC over the ciphertext (encrypt-then-MAC), both
# keyed from the session token (32 random bytes): each token seals exactly one API key, once.
def _seal_keys(token: str) -> tuple[bytes, bytes]:
    root = hashlib.sha256(b"kvmart-session-seal-v1\0" + token.encode()).digest()
    return (hmac.new(root, b"stream", hashlib.sha256).digest(), hmac.new(root, b"mac", hashlib.sha256).digest())


def _keystream(key: bytes, length: int) -> bytes:
    blocks = (hmac.new(key, i.to_bytes(4, "big"), hashlib.sha256).digest() for i in range(-(-length // 32)))
    return b"".join(blocks)[:length]


def seal(token: str, plaintext: str) -> str:
    stream_key, mac_key = _seal_keys(token)
    data = plaintext.encode()
    cipher = bytes(a ^ b for a, b in zip(data, _keystream(stream_key, len(data)), strict=True))
    tag = hmac.new(mac_key, cipher, hashlib.sha256).digest()[:16]
    return base64.urlsafe_b64encode(cipher + tag).decode()


def unseal(token: str, sealed: str) -> str:
    """The sealed text; ValueError if `sealed` was not sealed with `token` or was changed."""
    stream_key, mac_key = _seal_keys(token)
    raw = base64.urlsafe_b64decode(sealed.encode())
    cipher, tag = raw[:-16], raw[-16:]
    if len(raw) < 16 or not hmac.compare_digest(tag, hmac.new(mac_key, cipher, hashlib.sha256).digest()[:16]):
        raise ValueError("the session record was not sealed with this token")
    return bytes(a ^ b for a, b in zip(cipher, _keystream(stream_key, len(cipher)), strict=True)).decode()
