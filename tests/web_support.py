"""Helpers for the web page tests: a cookie-keeping client that signs in through the page's own form, the CSRF
token of a page, and the headless browser's binaries. Not a test module."""

from __future__ import annotations

import re
import shutil

import httpx
from service_support import missing_service

CSRF_META = re.compile(r'<meta name="csrf-token" content="([^"]+)">')


def browser_binaries() -> tuple[str, str]:
    """chromium's and chromedriver's paths, or `missing_service` saying they are not installed (a skip; a failure
    under CI)."""
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        missing_service("chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
    return chromium, chromedriver


def csrf_of(html: str) -> str:
    match = CSRF_META.search(html)
    assert match, "the page has no CSRF token"
    return match.group(1)


class WebClient:
    """A browser-like client of one visitor: keeps its session cookie, sends forms with the page's CSRF token."""

    def __init__(self, base_url: str) -> None:
        self.http = httpx.Client(base_url=base_url, timeout=60, follow_redirects=False)
        self.csrf = csrf_of(self.get("/").text)

    def get(self, path: str, **params: str) -> httpx.Response:
        response = self.http.get(path, params=params)
        if "csrf-token" in response.text:
            self.csrf = csrf_of(response.text)
        return response

    def post(self, path: str, csrf: str | None = None, **fields: str) -> httpx.Response:
        """A url-encoded form with this visitor's CSRF token (or `csrf`; '' sends none)."""
        token = self.csrf if csrf is None else csrf
        return self.http.post(path, data={**fields, **({"csrf": token} if token else {})})

    def sign_in(self, key: str) -> httpx.Response:
        self.get("/signin")
        response = self.post("/signin", api_key=key)
        assert response.status_code == 303, response.text
        self.get("/")  # the session changed: take its new CSRF token
        return response

    def close(self) -> None:
        self.http.close()
