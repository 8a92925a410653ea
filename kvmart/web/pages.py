"""The web page's plumbing: templates (Jinja2, autoescaped: a title holding a script tag shows as text), the
viewer of a request (its session and, once signed in, its account), CSRF checks, url-encoded form bodies, and the
headers every page carries. Routes live in routes.py."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl

from fastapi import Request
from fastapi.responses import HTMLResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.concurrency import run_in_threadpool

from kvmart.errors import AuthenticationError, ForbiddenError, KvmartError, RequestError
from kvmart.ledger import Account
from kvmart.server.body import read_body
from kvmart.server.errors import http_error
from kvmart.server.pipeline.services import Services
from kvmart.web.formatting import FILTERS
from kvmart.web.sessions import ANONYMOUS_PREFIX, COOKIE, CSRF_FIELD, CSRF_HEADER, Session, Sessions

HERE = Path(__file__).parent
FORM_TYPE = "application/x-www-form-urlencoded"
# Everything from this origin, nothing inline but the server's own SVG; no framing, no referrer (ids in paths).
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

templates = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(default=True),
                        trim_blocks=True, lstrip_blocks=True)
templates.filters.update(FILTERS)


@dataclass
class Viewer:
    """Who is looking: a session (always) and the signed-in account (or None)."""

    session: Session
    account: Account | None
    is_new_session: bool  # the cookie must be (re)set on the response


def services_of(request: Request) -> Services:
    return request.app.state.services


def sessions_of(request: Request) -> Sessions:
    return request.app.state.web_sessions


async def viewer_of(request: Request) -> Viewer:
    """The request's session (a new anonymous one, stored nowhere, at the first visit) and its account, re-checked
    against the ledger: a revoked key signs the session out."""
    sessions = sessions_of(request)
    token = request.cookies.get(COOKIE)
    session = sessions.get(token) if token is None or token.startswith(ANONYMOUS_PREFIX) else (
        await run_in_threadpool(sessions.get, token))  # a signed-in session may be in Redis: off the event loop
    if session is None:
        return Viewer(sessions.anonymous(), None, True)
    account = None
    if session.api_key is not None:
        try:
            account = await run_in_threadpool(services_of(request).ledger.authenticate, session.api_key)
        except AuthenticationError:
            session.api_key = None
    return Viewer(session, account, False)


def with_session(response: Response, request: Request, viewer: Viewer) -> Response:
    """The security headers, and the session cookie if it is new: HttpOnly (no script reads it), SameSite=Lax
    (never sent by another site's form), Secure when served over https."""
    response.headers.update(SECURITY_HEADERS)
    if viewer.is_new_session:
        response.set_cookie(COOKIE, viewer.session.token, httponly=True, samesite="lax", path="/",
                            secure=request.url.scheme == "https")
    return response


def render(request: Request, viewer: Viewer, name: str, status: int = 200, **context: object) -> Response:
    html = templates.get_template(name).render(viewer=viewer, account=viewer.account, csrf=viewer.session.csrf,
                                               path=request.url.path, **context)
    return with_session(HTMLResponse(html, status_code=status), request, viewer)


def error_page(request: Request, viewer: Viewer, error: KvmartError) -> Response:
    """A typed error as a page with its HTTP status and message (never a traceback)."""
    http = http_error(error)
    return render(request, viewer, "error.html", status=http.status, status_code=http.status, message=http.message)


async def form_fields(request: Request) -> dict[str, str]:
    """A url-encoded form body, {} if empty (RequestError for another content type; 413 beyond the server's body
    limit)."""
    raw = await read_body(request, services_of(request).server.max_body_bytes)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not raw:
        return {}
    if kind != FORM_TYPE:
        raise RequestError(f"forms are sent as {FORM_TYPE}, not {kind or 'nothing'}")
    try:
        return dict(parse_qsl(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=False))
    except UnicodeDecodeError as e:
        raise RequestError("the form is not valid UTF-8") from e


def require_csrf(request: Request, viewer: Viewer, fields: dict[str, str]) -> None:
    """ForbiddenError (403) unless the form (or the X-CSRF-Token header) carries this session's CSRF token."""
    submitted = fields.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER)
    if viewer.is_new_session or not viewer.session.csrf_matches(submitted):
        raise ForbiddenError("this form has expired or did not come from this page (missing or wrong CSRF "
                             "token): reload the page and send it again")


def require_account(viewer: Viewer) -> Account:
    if viewer.account is None:
        raise AuthenticationError("sign in with your API key first")
    return viewer.account
