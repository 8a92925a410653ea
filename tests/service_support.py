"""One rule for a test that needs a service this machine may lack (PostgreSQL, redis-server, Chromium and
chromedriver, and the test extras that drive them: psycopg, selenium, moto's S3 server): on a laptop without it
the test is skipped, with the reason; under CI (`CI=true`, as GitHub Actions, GitLab CI and `.ci/run` set it) it
fails, with the reason, because CI installs every one of them and a missing one is a broken CI, not a test to pass
over. Every such skip in the tests goes through `missing_service`. Not a test module."""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from types import ModuleType
from typing import NoReturn

import pytest

CI_VALUES = ("true", "1", "yes")


def is_ci(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the tests run under CI: the CI variable is true (case-insensitive), 1 or yes."""
    environ = os.environ if environ is None else environ
    return environ.get("CI", "").strip().lower() in CI_VALUES


def missing_service(reason: str) -> NoReturn:
    """Skip the running test because a service is missing (`reason` says which and how to install it), or, under
    CI, fail it with the same reason."""
    if is_ci():
        pytest.fail(f"{reason} [CI=true: a missing service fails instead of skipping]", pytrace=False)
    pytest.skip(reason)


def import_or_missing(module: str, reason: str) -> ModuleType:
    """`module`, imported; if it cannot be, `missing_service(reason)`."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        missing_service(f"{reason} ({e})")
