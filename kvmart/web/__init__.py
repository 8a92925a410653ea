"""The market's web page, served by `kvmart serve` at `/`: a catalogue, a publisher's page and a provider's page,
rendered on the server (Jinja2 templates, inline SVG charts, a little vanilla JavaScript; nothing loaded from
elsewhere, no build step). See docs/WEB.md.

    routes.py     the routes                      pages.py      templates, viewer, CSRF, forms, headers
    sessions.py   cookie sessions                 access.py     what a viewer may see
    views.py      catalogue, document, publisher  provider.py   the provider's figures (/metrics, ledger)
    stats.py      figures over time (ledger)      charts.py     SVG charts
    formatting.py number formats                  templates/, static/"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI

    from kvmart.cluster.state import RedisState
    from kvmart.server.limits import Limiter
    from kvmart.web.sessions import Sessions


def mount_web(app: "FastAPI", signin_limiter: "Limiter", state: "RedisState | None" = None) -> "Sessions":
    """Add the web page's routes and static files to the server's app (kvmart/app.py composes them); returns the
    page's sessions: in the cluster's Redis when `state` is given, else in this process. `signin_limiter` limits
    sign-in attempts per client address."""
    from starlette.staticfiles import StaticFiles

    from kvmart.web.pages import HERE
    from kvmart.web.routes import router
    from kvmart.web.sessions import RedisSessions, Sessions

    sessions = app.state.web_sessions = Sessions(RedisSessions(state) if state is not None else None, state)
    app.state.signin_limiter = signin_limiter
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    return sessions
