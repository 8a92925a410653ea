"""The composition root of `kvmart serve`: the HTTP API (kvmart/server) and the market's web page (kvmart/web) in
one FastAPI app over one set of services, and `serve` to run it with uvicorn. Neither package imports the other's
app: the web page's routes call the server's request pipeline, and this module puts the two side by side."""

from __future__ import annotations

from fastapi import FastAPI

from kvmart.cluster.state import RedisState, state_config
from kvmart.config import Settings
from kvmart.ledger import Ledger
from kvmart.runtime.model import Model
from kvmart.server.app import add_middleware, build_api
from kvmart.server.config import ServerSettings
from kvmart.server.limits import limiter_for, signin_limiter_for
from kvmart.server.pipeline.services import build_services
from kvmart.store import Store
from kvmart.web import mount_web
from kvmart.web.sessions import COOKIE as SESSION_COOKIE


def create_app(settings: Settings, server: ServerSettings | None = None, model: Model | None = None,
               store: Store | None = None, ledger: Ledger | None = None) -> FastAPI:
    """The API and the web page over the model, store and ledger named by `settings` (or given)."""
    server = server or ServerSettings()
    services = build_services(settings, server, model, store, ledger)
    app = build_api(services)
    config = state_config(server.shared_state, settings.store_url)  # limits and sessions: cluster-wide in Redis?
    state = RedisState(config) if config is not None else None
    sessions = mount_web(app, signin_limiter_for(server, state), state)  # the market's web page at /

    def session_key(token: str) -> str | None:
        session = sessions.get(token)
        return None if session is None else session.api_key

    add_middleware(app, services, limiter_for(server, state), SESSION_COOKIE, session_key)
    return app


def serve(settings: Settings, server: ServerSettings, model: Model | None = None, ledger: Ledger | None = None
          ) -> None:
    """Run the server until SIGINT/SIGTERM; in-flight requests finish before it exits."""
    import uvicorn

    app = create_app(settings, server, model, ledger=ledger)
    uvicorn.run(app, host=server.host, port=server.port, log_level=server.log_level, timeout_graceful_shutdown=None)
