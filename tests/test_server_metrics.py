"""The server's metrics through prometheus_client (kvmart/server/metrics.py) and the server's settings
(kvmart/server/config.py)."""

from __future__ import annotations

import re
from pathlib import Path

import prometheus_client
import pytest
from server_support import parse_metrics

from kvmart.errors import ConfigError
from kvmart.server.config import ServerSettings, load_server_settings, parse_bytes
from kvmart.server.metrics import SECONDS_BUCKETS, ReadAtScrape, ServerMetrics

SERVER_DOC = Path(__file__).resolve().parents[1] / "docs" / "SERVER.md"


def server_metrics(live: dict[str, float] | None = None) -> ServerMetrics:
    """ServerMetrics whose scrape-time values are read from `live` (changed by the test between scrapes)."""
    live = live if live is not None else {}
    hot = ("hits", "misses", "evictions", "entries", "bytes", "budget_bytes")
    return ServerMetrics(read_active=lambda: live.get("active", 0), read_waiting=lambda: live.get("waiting", 0),
                         read_hot=lambda: {k: live.get(k, 0) for k in hot},
                         read_documents=lambda full: live.get("documents", 0))


def test_counters_and_histograms_render_in_the_prometheus_text_format():
    metrics = server_metrics()
    metrics.requests.inc(endpoint="/a", status="200")
    metrics.requests.inc(2, endpoint="/a", status="200")
    metrics.requests.inc(endpoint='we"ird\\', status="500")
    metrics.completion_tokens.inc(7)
    for value in (0.004, 0.5, 5.0):
        metrics.request_seconds.observe(value, endpoint="/a")
    body, content_type = metrics.render()
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    text = body.decode()
    assert "# TYPE kvmart_http_requests_total counter" in text.splitlines()
    values = parse_metrics(text)
    assert values['kvmart_http_requests_total{endpoint="/a",status="200"}'] == 3
    assert values['kvmart_http_requests_total{endpoint="we\\"ird\\\\",status="500"}'] == 1
    assert values["kvmart_completion_tokens_total"] == 7
    assert values['kvmart_http_request_seconds_bucket{endpoint="/a",le="0.005"}'] == 1
    assert values['kvmart_http_request_seconds_bucket{endpoint="/a",le="1.0"}'] == 2
    assert values['kvmart_http_request_seconds_bucket{endpoint="/a",le="+Inf"}'] == 3
    assert values['kvmart_http_request_seconds_sum{endpoint="/a"}'] == pytest.approx(5.504)
    assert values['kvmart_http_request_seconds_count{endpoint="/a"}'] == 3


def test_openmetrics_when_the_scraper_asks_for_it():
    metrics = server_metrics()
    metrics.cancelled.inc()
    body, content_type = metrics.render("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.decode().rstrip().endswith("# EOF") and "kvmart_cancelled_requests_total 1.0" in body.decode()


def test_values_read_at_scrape_time_follow_their_owner():
    live = {"active": 2, "waiting": 5, "documents": 3, "hits": 4, "bytes": 1024, "budget_bytes": 4096}
    metrics = server_metrics(live)
    first = parse_metrics(metrics.render()[0].decode())
    assert (first["kvmart_queue_active"], first["kvmart_queue_waiting"], first["kvmart_documents"]) == (2, 5, 3)
    assert (first["kvmart_hot_hits_total"], first["kvmart_hot_bytes"], first["kvmart_hot_budget_bytes"]) == (4, 1024,
                                                                                                             4096)
    live.update(active=0, hits=9)
    again = parse_metrics(metrics.render()[0].decode())
    assert (again["kvmart_queue_active"], again["kvmart_hot_hits_total"]) == (0, 9)


def test_each_app_has_its_own_registry():
    """Two apps in one process: no duplicate-registration error, no shared values, nothing in the global registry."""
    one, two = server_metrics(), server_metrics()
    one.cache_hits.inc(tier="ram")
    assert parse_metrics(one.render()[0].decode())['kvmart_cache_hits_total{tier="ram"}'] == 1
    assert 'kvmart_cache_hits_total{tier="ram"}' not in parse_metrics(two.render()[0].decode())
    assert "kvmart_" not in prometheus_client.generate_latest(prometheus_client.REGISTRY).decode()


def test_latency_buckets_cover_requests_of_several_minutes():
    metrics = server_metrics()
    metrics.request_seconds.observe(200.0, endpoint="chat")
    values = parse_metrics(metrics.render()[0].decode())
    assert SECONDS_BUCKETS[-1] >= 300
    assert values['kvmart_http_request_seconds_bucket{endpoint="chat",le="120.0"}'] == 0
    assert values['kvmart_http_request_seconds_bucket{endpoint="chat",le="300.0"}'] == 1


def test_labels_are_fixed_when_a_metric_is_made():
    metrics = server_metrics()
    with pytest.raises(ValueError):
        metrics.cache_hits.inc(colour="red")
    with pytest.raises(ValueError):
        metrics.charges.inc(-1, outcome="charged")


def test_a_scrape_time_value_cannot_take_a_name_in_use():
    metrics = server_metrics()
    with pytest.raises(ValueError, match="kvmart_queue_active"):
        metrics.registry.register(ReadAtScrape(lambda: {"n": 1}, [("kvmart_queue_active", "Again.", "n", "gauge")]))


def test_docs_name_every_metric_exported_and_no_other():
    documented = set(re.findall(r"`(kvmart_[a-z_]+)`", SERVER_DOC.read_text().split("## Metrics", 1)[1].split("\n## ")[0]))
    exported = {family.name + ("_total" if family.type == "counter" else "")
                for family in server_metrics().registry.collect()}
    assert documented == exported


@pytest.mark.parametrize("text, expected", [("0", 0), ("1000", 1000), ("2GiB", 2 * 2**30), ("512MB", 512 * 10**6),
                                            ("1.5k", 1500), ("1e9", 10**9), (" 4 mib ", 4 * 2**20)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "-1", "2 GiBs"])
def test_parse_bytes_refuses(text):
    with pytest.raises(ConfigError):
        parse_bytes(text)


def test_server_settings_from_the_environment_and_validation():
    settings = load_server_settings({"KVMART_RAM_CACHE_BYTES": "1GiB", "KVMART_MAX_QUEUE": "3", "KVMART_PORT": "9"})
    assert (settings.ram_cache_bytes, settings.max_queue, settings.port) == (2**30, 3, 9)
    assert settings.with_overrides(port=None, max_queue=5).max_queue == 5
    with pytest.raises(ConfigError, match="KVMART_MAX_QUEUE"):
        load_server_settings({"KVMART_MAX_QUEUE": "many"})
    with pytest.raises(ConfigError, match="max_active"):
        ServerSettings(max_active=0)
