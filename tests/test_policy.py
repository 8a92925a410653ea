"""Placement: the cost-aware eviction score, popularity decay, pins and TTL classes."""

from __future__ import annotations

import pytest

from kvmart.errors import ConfigError
from kvmart.store import Entry
from kvmart.store.policy import Placement, flops_per_byte, ttl_seconds


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def entry(name: str, num_tokens: int, size: int, model: str = "Qwen3-0.6B", created_at: float = 0.0) -> Entry:
    return Entry(cache_id=name * 8, title=name, source="", model=model, fingerprint="f" * 64, num_tokens=num_tokens,
                 artifact_bytes=size, prefill_seconds=0.0, created_at=created_at)


def test_longer_prefill_is_worth_more_per_byte():
    # equal bytes: more tokens is more FLOPs; equal tokens per byte: attention's quadratic term still favours length
    assert flops_per_byte(entry("a", 4000, 10**6)) > flops_per_byte(entry("b", 100, 10**6))
    assert flops_per_byte(entry("a", 4000, 4000)) > flops_per_byte(entry("b", 100, 100))
    assert flops_per_byte(entry("c", 10, 100, model="/some/user/folder")) == pytest.approx(0.1)  # unknown shape


def test_popularity_decays_with_its_half_life():
    clock = Clock()
    p = Placement(half_life_seconds=100.0, clock=clock)
    for _ in range(4):
        p.touch("x" * 8)
    assert p.popularity("x" * 8) == pytest.approx(5.0)
    clock.now = 100.0
    assert p.popularity("x" * 8) == pytest.approx(3.0)  # 4 reads halved, plus the prior 1
    assert p.popularity("never read") == 1.0


def test_victims_lowest_score_first_pins_kept():
    p = Placement()
    cold, hot, pinned = entry("c", 1000, 100), entry("h", 1000, 100), entry("p", 1000, 100)
    for _ in range(10):
        p.touch(hot.cache_id)
    p.set_ttl_class(pinned.cache_id, "pinned")
    assert p.victims([hot, pinned, cold], 50) == [cold]
    assert p.victims([hot, pinned, cold], 150) == [cold, hot]
    assert p.victims([hot, pinned, cold], 250) is None  # only by evicting the pin: evict nothing
    assert p.victims([hot], 0) == []


def test_ttl_classes():
    clock = Clock()
    p = Placement(clock=clock)
    e = entry("e", 10, 10, created_at=0.0)
    p.set_ttl_class(e.cache_id, "5m")
    clock.now = 299.0
    assert not p.is_expired(e)
    p.touch(e.cache_id)  # a read restarts the clock
    clock.now = 299.0 + 301.0
    assert p.is_expired(e)
    p.set_ttl_class(e.cache_id, "pinned")
    assert not p.is_expired(e) and p.score(e) == float("inf")
    assert ttl_seconds("1h") == 3600
    with pytest.raises(ConfigError, match="known: 5m, 1h, pinned"):
        ttl_seconds("1d")
