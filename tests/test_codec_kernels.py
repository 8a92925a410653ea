"""The `kvmart` codec's compiled paths (kvmart/codec/csrc/): the portable loops and the fast ones (BMI2, AVX2) write
the same bytes and decode the same tensors; the paths only long tensors take (encoder blocks, unchecked rows,
vector merges) and the ones odd shapes take (rows not a multiple of 8, wide raw parts) are bit-exact; corrupt
streams of long tensors are refused or decoded, never read out of bounds; k-means in C is numpy's definition."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmart import codec
from kvmart.codec import analysis, clusters, format3
from kvmart.codec.huffman import HuffmanCodec
from kvmart.codec.kernels import kernels
from kvmart.errors import CodecError

INTS = {2: torch.int16, 4: torch.int32}


@contextlib.contextmanager
def portable(flag: bool) -> Iterator[None]:
    """Run the kernels' portable loops (flag) or the fastest this CPU has, restoring the setting after."""
    before = kernels().portable(flag)
    try:
        yield
    finally:
        kernels().portable(before)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(INTS[t.element_size()])


def kv_like(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-3, 2, shape[-1], dtype=torch.float64)[torch.randperm(shape[-1], generator=g)]
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scales).to(dtype)


def random_bits(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    size = {torch.float32: 4}.get(dtype, 2)
    info = torch.iinfo(INTS[size])
    g = torch.Generator().manual_seed(seed)
    return torch.randint(info.min, info.max, shape, dtype=INTS[size], generator=g).view(dtype)


def round_trip_both_ways(t: torch.Tensor) -> bytes:
    """Encode and decode with each set of loops; the bytes must agree and every decode be bit-exact."""
    encodings = []
    for flag in (True, False):
        with portable(flag):
            encoded = codec.encode(t, "kvmart")
            encodings.append(bytes(encoded.data))
            for data in encodings:  # each path decodes what either wrote
                out = codec.decode(codec.Encoded("kvmart", encoded.params, encoded.dtype, encoded.shape, data))
                assert torch.equal(bits(out), bits(t))
    assert encodings[0] == encodings[1]
    return encodings[1]


LONG = {  # shapes whose encoder crosses blocks of 32,768 elements and whose decoder runs unchecked rows
    "bf16 keys": lambda: kv_like(torch.bfloat16, (1, 4, 640, 64), 1),
    "f32": lambda: kv_like(torch.float32, (1, 2, 700, 64), 2),
    "f16": lambda: kv_like(torch.float16, (1, 3, 500, 64), 3),
    "f32 holding bf16": lambda: kv_like(torch.bfloat16, (1, 2, 600, 64), 4).float(),
    "bf16, head_dim 80": lambda: kv_like(torch.bfloat16, (1, 2, 500, 80), 5),
    "bf16, head_dim 100 (not a multiple of 8)": lambda: kv_like(torch.bfloat16, (1, 2, 400, 100), 6),
    "f32 arbitrary bits": lambda: random_bits(torch.float32, (1, 2, 300, 64), 7),
    "bf16 arbitrary bits": lambda: random_bits(torch.bfloat16, (1, 2, 300, 64), 8),
}


@pytest.mark.parametrize("name", list(LONG))
def test_long_tensors_round_trip_with_either_loops(name: str):
    t = LONG[name]()
    data = round_trip_both_ways(t)
    assert len(data) < t.numel() * t.element_size() or "arbitrary" in name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_narrow_symbols_leave_wide_raw_parts_that_decode_element_by_element(dtype):
    """A narrower symbol (the encoder's choice; the bitstream allows it) leaves more than 8 raw bits per element,
    which the vector merge does not take: the scalar merge does, with either loops."""
    t = kv_like(dtype, (1, 2, 300, 64), 16)
    for flag in (True, False):
        with portable(flag):
            plan = analysis.plan(t, format3.SYMBOL_BITS, symbol_mantissa_bits=-3)
            data = format3.encode(plan)
            planes, raw_bits = analysis.split(plan.shift - plan.zero_bits)
            assert raw_bits > 8 or dtype == torch.bfloat16
            out = codec.decode(codec.Encoded("kvmart", {"version": 3}, str(dtype)[6:], tuple(t.shape), data))
            assert torch.equal(bits(out), bits(t))


def test_long_tensors_with_copied_rows_round_trip():
    t = kv_like(torch.bfloat16, (1, 4, 600, 64), 9)
    t[..., 17, :] = t[..., 3, :]
    t[..., 300:, :] = t[..., :300, :]
    data = round_trip_both_ways(t)
    assert format3.HEADER.unpack_from(data)[6] == 301  # the copied rows
    assert len(data) < 0.6 * len(codec.encode(kv_like(torch.bfloat16, (1, 4, 600, 64), 9), "kvmart").data)


def test_rows_whose_ends_agree_are_compared_in_full():
    """Rows that the copy finder's sampled hash cannot tell apart (the same first and last 8 bytes in every block)
    are compared in full: none of them is taken for a copy of another unless it is one (a repeat among the first
    candidates is found; past a few candidates a row is coded in full, which bounds the work on crafted input)."""
    t = kv_like(torch.bfloat16, (1, 2, 300, 64), 10)
    t[..., :, :4] = t[..., :1, :4]
    t[..., :, -4:] = t[..., :1, -4:]
    t[..., 5, :] = t[..., 2, :]
    data = round_trip_both_ways(t)
    assert format3.HEADER.unpack_from(data)[6] == 1


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]), heads=st.integers(1, 3),
       tokens=st.integers(1, 90), dim=st.sampled_from([1, 3, 8, 16, 24, 64]), seed=st.integers(0, 2**16),
       kind=st.sampled_from(["kv", "bits"]))
def test_either_loops_write_the_same_bytes(dtype, heads, tokens, dim, seed, kind):
    shape = (1, heads, tokens, dim)
    round_trip_both_ways(kv_like(dtype, shape, seed) if kind == "kv" else random_bits(dtype, shape, seed))


def test_counting_per_channel_and_in_two_passes_agree():
    """The plan counts each channel's values in one pass, or (where that takes more memory than the tensor) counts
    the whole tensor first and each channel's symbols in a second pass: the same plan either way."""
    t = kv_like(torch.bfloat16, (1, 3, 200, 64), 11)
    one, two = (analysis.plan(t, format3.SYMBOL_BITS, per_channel=flag) for flag in (True, False))
    for field in ("sources", "highs", "lut", "models", "lengths"):
        assert np.array_equal(getattr(one, field), getattr(two, field)), field
    assert (one.shift, one.zero_bits) == (two.shift, two.zero_bits)


@pytest.mark.parametrize("flag", [True, False])
def test_corrupt_streams_of_a_long_tensor_are_refused_or_decoded_never_overrun(flag: bool):
    t = kv_like(torch.bfloat16, (1, 2, 400, 64), 12)
    encoded = codec.encode(t, "kvmart")
    data = bytes(encoded.data)
    rng = np.random.default_rng(13)
    with portable(flag):
        for _ in range(60):
            damaged = bytearray(data)
            for at in rng.integers(len(data) // 2, len(data), size=int(rng.integers(1, 6))):
                damaged[at] ^= int(rng.integers(1, 256))
            with contextlib.suppress(CodecError):
                codec.decode(codec.Encoded("kvmart", encoded.params, encoded.dtype, encoded.shape, bytes(damaged)))
        for cut in (len(data) - 1, len(data) - 9, len(data) - 100, len(data) // 2):
            with pytest.raises(CodecError):
                codec.decode(codec.Encoded("kvmart", encoded.params, encoded.dtype, encoded.shape, data[:cut]))


def test_a_stream_that_is_read_past_its_end_is_refused():
    """Shortening one stream's recorded length (its bits moved to the next) leaves every byte accounted for, so only
    the decoder's end-of-stream check can refuse it."""
    t = kv_like(torch.bfloat16, (1, 2, 200, 64), 14)
    data = bytearray(codec.encode(t, "kvmart").data)
    fields = list(format3.HEADER.unpack_from(data))
    fields[8], fields[9] = fields[8] - 8, fields[9] + 8  # one byte from stream 0 to stream 1
    format3.HEADER.pack_into(data, 0, *fields)
    with pytest.raises(CodecError, match="runs out|left over"):
        codec.decode(codec.Encoded("kvmart", {"version": 3}, "bfloat16", tuple(t.shape), bytes(data)))


def test_a_plan_that_is_not_the_tensors_is_refused_by_the_encoder():
    """The encoder checks what it writes against the plan: each stream's length against the one the counts give."""
    t = kv_like(torch.bfloat16, (1, 2, 200, 64), 17)
    plan = analysis.plan(t, format3.SYMBOL_BITS)
    counts = plan.counts.copy()
    counts[0, int(np.argmax(counts[0]))] += 1
    with pytest.raises(ValueError, match="streams of other lengths than the counts give"):
        format3.encode(dataclasses.replace(plan, counts=counts))


def numpy_kmeans(hist: np.ndarray, groups: int) -> tuple[np.ndarray, float]:
    """k-means as clusters.py defines it, in numpy: the ranking start, then moves to the cheapest group."""
    mean = (hist @ np.arange(hist.shape[1])) / np.maximum(hist.sum(axis=1), 1)
    labels = np.minimum((np.argsort(np.argsort(mean, kind="stable")) * groups) // len(mean), groups - 1)
    cost, total = clusters.code_bits(hist, labels, groups)
    for _ in range(clusters.KMEANS_STEPS):
        new = cost.argmin(axis=1)
        if np.array_equal(new, labels):
            break
        labels = new
        cost, total = clusters.code_bits(hist, labels, groups)
    return labels, total


@settings(max_examples=60, deadline=None)
@given(channels=st.integers(1, 120), symbols=st.integers(1, 50), groups=st.sampled_from([1, 2, 4, 8, 16]),
       seed=st.integers(0, 2**16), flag=st.booleans())
def test_kmeans_in_c_is_the_numpy_definition(channels, symbols, groups, seed, flag):
    groups = min(groups, channels)
    rng = np.random.default_rng(seed)
    hist = rng.integers(0, 60, (channels, symbols)).astype(np.float64) * (rng.random((channels, symbols)) < 0.4)
    expected, expected_bits = numpy_kmeans(hist, groups)
    with portable(flag):
        labels, estimated = clusters.kmeans(hist, groups)
    assert np.array_equal(labels, expected)
    assert estimated == pytest.approx(expected_bits, rel=1e-9, abs=1e-9)


def test_format_2_is_still_written_on_request_and_read():
    t = kv_like(torch.bfloat16, (1, 2, 300, 64), 15)
    for flag in (True, False):
        with portable(flag):
            data, params = HuffmanCodec(version=2).encode(t)
            out = torch.empty_like(t)
            HuffmanCodec().decode(memoryview(data), params, out)
            assert params == {"version": 2} and torch.equal(bits(out), bits(t))
