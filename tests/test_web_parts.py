"""The web page's pure parts: SVG charts (escaped labels, bar heights in proportion), time buckets of the ledger's
charges, money and size formats, the metrics registry's samples and histogram quantiles the provider's page uses, and
the session store."""

from __future__ import annotations

import re
import time
from decimal import Decimal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kvmart.ledger import Terms, open_ledger
from kvmart.web import charts, stats
from kvmart.web.formatting import latency_bound, price, seconds, size, usd
from kvmart.web.provider import Samples, endpoints, quantile
from kvmart.web.sessions import MemorySessions, Sessions


def test_charts_escape_labels_and_scale_bars():
    svg = charts.hbar_chart([("<script>x</script>", 10), ("b & c", 5)], "t <i>")
    assert "<script>" not in svg and "&lt;script&gt;" in svg and "b &amp; c" in svg and "t &lt;i&gt;" in svg
    widths = [float(w) for w in re.findall(r'<rect class="bar" x="\d+" y="[\d.]+" width="([\d.]+)"', svg)]
    assert len(widths) == 2 and abs(widths[0] - 2 * widths[1]) < 0.2
    bars = charts.bar_chart(["a", "b", "c"], [0, 4, 2], "reads")
    heights = [float(h) for h in re.findall(r'height="([\d.]+)"><title>', bars)]
    assert heights[0] == 0 and abs(heights[1] - 2 * heights[2]) < 0.2
    assert "<rect" not in charts.hbar_chart([], "empty")


def test_bucket_width_fits_the_span_in_24_buckets():
    assert stats.bucket_width(0) == 60 and stats.bucket_width(23 * 60) == 60
    assert stats.bucket_width(24 * 60) == 3600 and stats.bucket_width(2 * 86400) == 86400
    assert stats.bucket_width(10**9) == 7 * 86400


def test_money_and_sizes_read_exactly():
    assert usd(429_400) == "$0.0004294" and usd(1_500_000_000) == "$1.50" and usd(0) == "$0.00"
    assert usd(3_000 * 10**9) == "$3,000.00" and usd(-5) == "-$0.000000005"
    assert price(Decimal("0.250")) == "$0.25 / Mtok" and price(Decimal("1E+1")) == "$10 / Mtok"
    assert size(512) == "512 B" and size(1536) == "1.5 KiB" and size(3 * 2**30) == "3.0 GiB"


def test_samples_read_from_a_registry_and_quantiles():
    registry = CollectorRegistry()
    hits = Counter("kvmart_cache_hits_total", "h", ["tier"], registry=registry)
    hits.labels(tier="ram").inc(3)
    hits.labels(tier="store").inc()
    Gauge("kvmart_queue_active", "q", registry=registry).set(2)
    latency = Histogram("h", "l", ["endpoint"], buckets=(0.1, 1.0), registry=registry)
    for value in [0.05] + [0.5] * 18 + [5.0]:
        latency.labels(endpoint="a").observe(value)
    Counter("lbl", "l", ["v"], registry=registry).labels(v='a "q" b').inc(7)
    samples = Samples(registry.collect())
    assert samples.by_label("kvmart_cache_hits_total", "tier") == {"ram": 3, "store": 1}
    assert samples.total("kvmart_queue_active") == 2 and samples.get("kvmart_cache_hits_total", tier="ram") == 3
    assert samples.get("lbl_total", v='a "q" b') == 7  # label values as set, not as escaped in the text format
    assert samples.get("h_bucket", endpoint="a", le="1.0") == 19 and samples.get("h_count", endpoint="a") == 20
    assert [e.name for e in endpoints(samples, "h")] == ["a"] and endpoints(samples, "h")[0].requests == 20
    buckets = {0.1: 1, 1.0: 19, float("inf"): 20}
    assert quantile(buckets, 0.5) == 1.0 and quantile(buckets, 0.05) == 0.1 and quantile(buckets, 0.99) == float("inf")
    assert quantile({}, 0.95) == 0.0


def test_durations_read_in_seconds_and_a_p95_beyond_the_buckets_as_a_bound():
    assert [seconds(v) for v in (0.0042, 0.5, 3.414, 14377.7)] == ["0.004 s", "0.500 s", "3.41 s", "14,378 s"]
    assert latency_bound(2.5, 60.0) == "2.50 s" and latency_bound(float("inf"), 60.0) == "> 60 s"
    assert latency_bound(float("inf"), 300.0) == "> 300 s" and latency_bound(float("inf"), 2.5) == "> 2.50 s"
    registry = CollectorRegistry()
    latency = Histogram("h", "l", ["endpoint"], buckets=(10.0, 60.0), registry=registry)
    for value in (100.0, 150.0):
        latency.labels(endpoint="a").observe(value)
    (found,) = endpoints(Samples(registry.collect()), "h")
    assert (found.p95_seconds, found.top_bucket_seconds, found.mean_seconds) == (float("inf"), 60.0, 125.0)


def test_sessions_are_fresh_bounded_and_expire():
    sessions = Sessions(MemorySessions(max_sessions=2, idle_seconds=3600))
    a, b = sessions.new("kvm_a"), sessions.new("kvm_key")
    assert a.token != b.token and a.csrf != b.csrf and "kvm_key" not in repr(b)
    assert sessions.get(a.token) is a and a.csrf_matches(a.csrf) and not a.csrf_matches(b.csrf)
    assert not a.csrf_matches("") and not a.csrf_matches(None)
    sessions.new("kvm_c")  # over the bound: the least recently used (b) goes
    assert sessions.get(b.token) is None and sessions.get(a.token) is a and len(sessions.store) == 2
    expired = Sessions(MemorySessions(idle_seconds=-1))
    assert expired.get(expired.new("kvm_x").token) is None


def test_anonymous_sessions_store_nothing_and_their_csrf_is_bound_to_the_cookie():
    """Anonymous visitors cost the server nothing (issue 30: 10,050 anonymous GETs evicted a signed-in publisher):
    their CSRF token is an HMAC of the cookie's nonce, recomputed, never stored; a forged or foreign cookie gets no
    session, and another process (another secret) does not accept this one's tokens."""
    store = MemorySessions(max_sessions=2)
    sessions = Sessions(store)
    signed_in = sessions.new("kvm_publisher")
    visitors = [sessions.anonymous() for _ in range(50)]
    assert len(store) == 1 and sessions.get(signed_in.token) is signed_in
    first = visitors[0]
    again = sessions.get(first.token)
    assert again is not None and again.is_anonymous and again.api_key is None and again.csrf == first.csrf
    assert len({v.csrf for v in visitors}) == 50 and not first.csrf_matches(visitors[1].csrf)
    for forged in ("anon.", "anon.short", "anon." + "!" * 43, "anon." + first.token[5:-1] + "/"):
        assert sessions.get(forged) is None
    assert Sessions().get(first.token).csrf != first.csrf  # another node without a shared secret
    sessions.drop(first.token)  # nothing to drop: still valid, still nothing stored
    assert sessions.get(first.token) is not None and len(store) == 1


def test_reads_and_savings_over_time_from_real_charges(ledger_url, tmp_path):
    """On SQLite and on PostgreSQL: each charge lands in its time bucket; the licence terms come back exact."""
    ledger = open_ledger(ledger_url, tmp_path, environ={})
    try:
        for name, role in (("pub", "publisher"), ("reader", "agent")):
            ledger.create_account(name, role)
            ledger.deposit(name, Decimal("1"))
        cache_id, other = "a" * 64, "b" * 64
        priced = Terms("priced", cache_read_usd_per_mtok=Decimal("0.25"))
        ledger.publish(cache_id, ledger.account("pub"), priced, "", 100)
        ledger.publish(other, ledger.account("pub"), Terms("private"), "salt", 100)
        saved = 0
        for doc, reads in ((cache_id, 3), (other, 1)):
            licence = ledger.licence(doc)
            for _ in range(reads):
                used = ledger.quote(licence, 100, 5, 2)
                ledger.settle(ledger.open_hold(ledger.account("reader"), used.total_nanousd, None, "h"), used, licence,
                              doc)
                saved += used.saved_nanousd
        now = int(time.time())
        reads = stats.reads_over_time(ledger, cache_id, now)
        assert reads.bucket_seconds == 60 and len(reads.values) == stats.MAX_BUCKETS
        assert reads.values[-1] + reads.values[-2] == 3 and reads.total == 3  # this minute (or the one before)
        assert stats.reads_over_time(ledger, "c" * 64, now).total == 0
        assert stats.savings_over_time(ledger, now).total == saved > 0
        later = stats.reads_over_time(ledger, cache_id, now + 2 * 3600)  # two hours on: hourly buckets
        assert later.bucket_seconds == 3600 and later.total == 3 and later.values[-1] == 0
        terms = stats.licence_terms(ledger)
        assert terms[cache_id] == stats.Terms("priced", Decimal("0.25")) and terms[other].kind == "private"
    finally:
        ledger.close()
