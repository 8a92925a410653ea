"""Browser sessions: an opaque random token in an HttpOnly, SameSite=Lax cookie (Secure over https), mapped in
server memory to a CSRF token and, once signed in, the API key the visitor typed. The key itself never goes back
to the browser, into a URL or a log line; it is re-checked against the ledger on every request, so revoking it
ends the session. Every visitor gets a session (and a CSRF token) at the first page, so every form, the sign-in
form included, carries one. Sessions live in this process: a restart signs everyone out."""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

COOKIE = "kvmart_session"
CSRF_FIELD = "csrf"
CSRF_HEADER = "x-csrf-token"
MAX_SESSIONS = 10_000  # the oldest idle ones are dropped beyond this
IDLE_SECONDS = 8 * 3600


@dataclass
class Session:
    token: str
    csrf: str
    api_key: str | None = field(default=None, repr=False)
    last_seen: float = field(default_factory=time.monotonic)

    def csrf_matches(self, submitted: str | None) -> bool:
        return bool(submitted) and hmac.compare_digest(self.csrf.encode(), str(submitted).encode())


class Sessions:
    """Thread-safe, in memory, least recently used first out."""

    def __init__(self, max_sessions: int = MAX_SESSIONS, idle_seconds: float = IDLE_SECONDS) -> None:
        self.max_sessions, self.idle_seconds = max_sessions, idle_seconds
        self._lock = threading.Lock()
        self._by_token: OrderedDict[str, Session] = OrderedDict()

    def get(self, token: str | None) -> Session | None:
        """The live session of `token`, touched; None if unknown or idle too long."""
        if not token:
            return None
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

    def new(self, api_key: str | None = None) -> Session:
        """A fresh session (new token, new CSRF token): at first visit, and at every sign-in and sign-out, so a
        token seen before signing in is worth nothing after."""
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), api_key)
        with self._lock:
            self._by_token[session.token] = session
            while len(self._by_token) > self.max_sessions:
                self._by_token.popitem(last=False)
        return session

    def drop(self, token: str) -> None:
        with self._lock:
            self._by_token.pop(token, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_token)
