"""Prometheus text rendering (kvmart/server/metrics.py) and the server's settings (kvmart/server/config.py)."""

from __future__ import annotations

import pytest

from kvmart.errors import ConfigError
from kvmart.server.config import ServerSettings, load_server_settings, parse_bytes
from kvmart.server.metrics import Counter, Gauge, Histogram, Registry


def test_counters_gauges_and_histograms_render_in_the_text_format():
    registry = Registry()
    requests = registry.add(Counter("x_requests_total", "Requests."))
    requests.inc(endpoint="/a", status="200")
    requests.inc(2, endpoint="/a", status="200")
    requests.inc(endpoint='we"ird\\', status="500")
    registry.add(Gauge("x_depth", "Depth.", lambda: 3))
    latency = registry.add(Histogram("x_seconds", "Latency.", buckets=(0.1, 1.0)))
    for value in (0.05, 0.5, 5.0):
        latency.observe(value, endpoint="/a")
    assert registry.render() == (
        "# HELP x_requests_total Requests.\n# TYPE x_requests_total counter\n"
        'x_requests_total{endpoint="/a",status="200"} 3\n'
        'x_requests_total{endpoint="we\\"ird\\\\",status="500"} 1\n'
        "# HELP x_depth Depth.\n# TYPE x_depth gauge\nx_depth 3\n"
        "# HELP x_seconds Latency.\n# TYPE x_seconds histogram\n"
        'x_seconds_bucket{endpoint="/a",le="0.1"} 1\nx_seconds_bucket{endpoint="/a",le="1"} 2\n'
        'x_seconds_bucket{endpoint="/a",le="+Inf"} 3\nx_seconds_sum{endpoint="/a"} 5.55\n'
        'x_seconds_count{endpoint="/a"} 3\n'
    )


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
