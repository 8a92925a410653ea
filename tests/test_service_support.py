"""A test that needs PostgreSQL, redis-server or Chromium skips where the service is missing, with the reason, and
fails under CI=true (tests/service_support.py); each place that looks for a service goes through that rule."""

from __future__ import annotations

import shutil

import infra_support
import pg_support
import pytest
import web_support
from service_support import import_or_missing, is_ci, missing_service

from kvmart.cluster.local import MissingBinaryError

SKIPPED, FAILED = pytest.skip.Exception, pytest.fail.Exception


def outcome(call, *args) -> tuple[type[BaseException] | None, str]:
    """What `call` raised (a skip, a failure, anything) and its message. Caught here, not by pytest.raises: a skip
    that escaped would mark this test skipped instead of failing it."""
    try:
        call(*args)
    except BaseException as e:  # pytest's skip and fail outcomes are BaseExceptions
        return type(e), str(e)
    return None, ""


@pytest.mark.parametrize("value, expected", [("true", True), ("True", True), ("1", True), ("yes", True),
                                             ("", False), ("false", False), ("0", False)])
def test_is_ci(value, expected):
    assert is_ci({"CI": value}) is expected
    assert is_ci({}) is False


@pytest.mark.parametrize("ci, expected", [(None, SKIPPED), ("false", SKIPPED), ("true", FAILED)])
def test_a_missing_service_skips_on_a_laptop_and_fails_under_ci(monkeypatch, ci, expected):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    kind, message = outcome(missing_service, "redis-server is not installed (apt-get install redis-server)")
    assert kind is expected and "redis-server is not installed (apt-get install redis-server)" in message
    kind, message = outcome(import_or_missing, "no_such_module_kvmart", "a test extra is not installed")
    assert kind is expected and "a test extra is not installed" in message and "no_such_module_kvmart" in message


def _redis_missing(directory):
    raise MissingBinaryError("redis-server is not installed")


@pytest.mark.parametrize("ci, expected", [("", SKIPPED), ("true", FAILED)])
def test_every_service_lookup_goes_through_the_rule(monkeypatch, tmp_path, ci, expected):
    monkeypatch.setenv("CI", ci)
    monkeypatch.setattr(infra_support, "_RedisServer", _redis_missing)
    monkeypatch.setattr(pg_support, "find_bin", lambda name: None)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    for call, args, service in ((infra_support.RedisServer, (tmp_path,), "redis-server"),
                                (pg_support.postgres_or_missing, (), "initdb"),
                                (web_support.browser_binaries, (), "chromium")):
        kind, message = outcome(call, *args)
        assert kind is expected and service in message, (service, kind, message)
