"""Browser sessions: an opaque random token in an HttpOnly, SameSite=Lax cookie (Secure over https).

A visitor who has not signed in has no state on the server at all: the cookie holds `anon.<random nonce>` and the
visitor's CSRF token is an HMAC of that nonce under the cluster's secret, recomputed on every request. So anonymous
traffic, however much, creates nothing and evicts nobody. Only a sign-in creates a session: a fresh token mapped to
a new CSRF token and the API key the visitor typed. The key never goes back to the browser, into a URL or a log
line; it is re-checked against the ledger on every request, so revoking it ends the session.

Where signed-in sessions live: in this process (`MemorySessions`: a restart signs everyone out, and another node
does not know them), or, when the cluster has a Redis tier, in Redis (`RedisSessions`, kvmart/cluster/state.py:
every node knows every session; the API key is sealed with the session's token). The anonymous CSRF secret is then
shared through Redis too, so a form rendered by one node is accepted by another."""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol

from kvmart.cluster.state import RedisState
from kvmart.errors import StoreUnavailableError

log = logging.getLogger("kvmart.web")
COOKIE = "kvmart_session"
CSRF_FIELD = "csrf"
CSRF_HEADER = "x-csrf-token"
ANONYMOUS_PREFIX = "anon."
NONCE = re.compile(r"[A-Za-z0-9_-]{43}")  # secrets.token_urlsafe(32)
MAX_SESSIONS = 10_000  # signed-in sessions kept in memory; the least recently used are dropped beyond this
IDLE_SECONDS = 8 * 3600


@dataclass
class Session:
    token: str
    csrf: str
    api_key: str | None = field(default=None, repr=False)
    is_anonymous: bool = False
    last_seen: float = field(default_factory=time.monotonic)

    def csrf_matches(self, submitted: str | None) -> bool:
        return bool(submitted) and hmac.compare_digest(self.csrf.encode(), str(submitted).encode())


class SessionStore(Protocol):
    """Where signed-in sessions are kept. Thread-safe."""

    def put(self, session: Session) -> None: ...

    def get(self, token: str) -> Session | None:
        """The live session of `token`, its idle clock restarted; None if unknown or idle too long."""
        ...

    def drop(self, token: str) -> None: ...


class MemorySessions:
    """In this process, least recently used first out beyond `max_sessions`."""

    def __init__(self, max_sessions: int = MAX_SESSIONS, idle_seconds: float = IDLE_SECONDS) -> None:
        self.max_sessions, self.idle_seconds = max_sessions, idle_seconds
        self._lock = threading.Lock()
        self._by_token: OrderedDict[str, Session] = OrderedDict()

    def put(self, session: Session) -> None:
        with self._lock:
            self._by_token[session.token] = session
            while len(self._by_token) > self.max_sessions:
                self._by_token.popitem(last=False)

    def get(self, token: str) -> Session | None:
        with self._lock:
            session = self._by_token.get(token)
            if session is None:
                return None
            if time.monotonic() - session.last_seen > self.idle_seconds:
                del self._by_token[token]
                return None
            session.last_seen = time.monotonic()
            self._by_token.move_to_end(token)
            return session

    def drop(self, token: str) -> None:
        with self._lock:
            self._by_token.pop(token, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_token)


class RedisSessions:
    """In the cluster's Redis: every node sees every session; each expires after `idle_seconds` unused."""

    def __init__(self, state: RedisState, idle_seconds: float = IDLE_SECONDS) -> None:
        self.state, self.idle_seconds = state, idle_seconds

    def put(self, session: Session) -> None:
        if session.api_key is None:
            raise ValueError("only signed-in sessions are stored")
        self.state.put_session(session.token, session.csrf, session.api_key, self.idle_seconds)

    def get(self, token: str) -> Session | None:
        try:
            found = self.state.get_session(token, self.idle_seconds)
        except StoreUnavailableError as e:
            log.warning("web sessions are unreachable; treating the visitor as signed out: %s", e)
            return None
        return None if found is None else Session(token, found[0], found[1])

    def drop(self, token: str) -> None:
        try:
            self.state.drop_session(token)
        except StoreUnavailableError as e:
            log.warning("could not drop a web session (it expires by itself): %s", e)


class Sessions:
    """The page's sessions: anonymous ones computed from the cookie, signed-in ones kept in `store`."""

    def __init__(self, store: SessionStore | None = None, state: RedisState | None = None) -> None:
        """`state`: the cluster's Redis, which holds the anonymous CSRF secret (else a secret of this process)."""
        self.store: SessionStore = store if store is not None else MemorySessions()  # (an empty one is falsy)
        self.state = state
        self._secret: bytes | None = None if state is not None else secrets.token_bytes(32)
        self._fallback_secret = secrets.token_bytes(32)

    def secret(self) -> bytes:
        """The anonymous CSRF secret: the cluster's (fetched once), or this process's while Redis is down."""
        if self._secret is None and self.state is not None:
            try:
                self._secret = self.state.secret()
            except StoreUnavailableError as e:
                log.warning("the cluster's CSRF secret is unreachable; using this node's for now: %s", e)
                return self._fallback_secret
        return self._secret or self._fallback_secret

    def get(self, token: str | None) -> Session | None:
        """The session of a cookie's `token`: anonymous (checked, not looked up) or signed in (looked up, touched);
        None if the token is malformed, unknown or idle too long."""
        if not token:
            return None
        if token.startswith(ANONYMOUS_PREFIX):
            nonce = token.removeprefix(ANONYMOUS_PREFIX)
            return self._anonymous(nonce) if NONCE.fullmatch(nonce) else None
        return self.store.get(token)

    def anonymous(self) -> Session:
        """A new anonymous session: a fresh nonce for the cookie; nothing is stored."""
        return self._anonymous(secrets.token_urlsafe(32))

    def _anonymous(self, nonce: str) -> Session:
        mac = hmac.new(self.secret(), b"kvmart-anonymous-csrf\0" + nonce.encode(), hashlib.sha256).digest()
        return Session(ANONYMOUS_PREFIX + nonce, base64.urlsafe_b64encode(mac).decode().rstrip("="),
                       is_anonymous=True)

    def new(self, api_key: str) -> Session:
        """A signed-in session (new token, new CSRF token), stored: at every sign-in, so a token seen before signing
        in is worth nothing after. StoreUnavailableError if the sessions' Redis cannot be reached."""
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), api_key)
        self.store.put(session)
        return session

    def drop(self, token: str) -> None:
        if not token.startswith(ANONYMOUS_PREFIX):
            self.store.drop(token)
