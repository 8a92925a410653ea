"""Codecs: every codec gives back every tensor bit for bit (NaN payloads, infinities, subnormals and -0.0
included); malformed or corrupt encoded data is refused with CodecError, never decoded into wrong numbers."""

from __future__ import annotations

import contextlib
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from kvmart import codec
from kvmart.codec.planes import PlanesCodec, cluster
from kvmart.errors import CodecError, ConfigError

WIDTH = {torch.float32: (np.uint32, np.int32, torch.int32), torch.bfloat16: (np.uint16, np.int16, torch.int16),
         torch.float16: (np.uint16, np.int16, torch.int16)}
# bit patterns every codec must keep exactly: signed zeros, infinities, quiet/signalling NaNs with payloads,
# the smallest and largest subnormals, the largest finite values
SPECIAL = {
    torch.float32: [0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001, 0x7F800001, 0x7FBFFFFF,
                    0x00000001, 0x807FFFFF, 0x7F7FFFFF, 0xFF7FFFFF],
    torch.bfloat16: [0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0xFFC1, 0x7F81, 0x0001, 0x807F, 0x7F7F, 0xFF7F],
    torch.float16: [0x0000, 0x8000, 0x7C00, 0xFC00, 0x7E00, 0xFE01, 0x7C01, 0x0001, 0x83FF, 0x7BFF, 0xFBFF],
}
CODEC_SPECS = ["raw", "zstd", "zstd:19", "kvmart", "kvmart:1"]


def from_bits(bits: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(bits.view(WIDTH[dtype][1])).view(dtype)


def bits_of(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(WIDTH[t.dtype][2])


def assert_bit_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    """torch.equal on the bit patterns: a NaN is not equal to itself as a float, but its bits must come back."""
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(bits_of(a), bits_of(b))


@st.composite
def tensors(draw) -> torch.Tensor:
    """A tensor of a supported dtype and any small shape: arbitrary bit patterns, special values, or KV-like
    normal values at a drawn scale (where the exponent planes are skewed, as in real KV)."""
    dtype = draw(st.sampled_from(list(WIDTH)))
    unsigned = WIDTH[dtype][0]
    shape = draw(array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=9))
    kind = draw(st.sampled_from(["bits", "special", "normal"]))
    if kind == "normal":
        seed, scale = draw(st.integers(0, 2**32 - 1)), draw(st.sampled_from([1e-30, 1e-3, 1.0, 300.0]))
        values = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
        return values.to(dtype)
    limit = np.iinfo(unsigned).max
    elements = (st.sampled_from(SPECIAL[dtype]) if kind == "special"
                else st.one_of(st.integers(0, limit), st.sampled_from(SPECIAL[dtype])))
    return from_bits(draw(arrays(unsigned, shape, elements=elements)), dtype)


@pytest.mark.parametrize("spec", CODEC_SPECS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(t=tensors())
def test_round_trip_is_bit_exact(spec: str, t: torch.Tensor):
    encoded = codec.encode(t, spec)
    assert encoded.dtype == str(t.dtype).removeprefix("torch.") and encoded.shape == tuple(t.shape)
    assert_bit_equal(codec.decode(encoded), t)
    assert_bit_equal(codec.unpack(codec.pack(t, spec)), t)


@settings(max_examples=30, deadline=None)
@given(t=tensors())
def test_round_trip_with_one_cluster(t: torch.Tensor):
    planes = PlanesCodec(max_groups=1)
    data, params = planes.encode(t.contiguous())
    out = torch.empty_like(t)
    planes.decode(memoryview(data), params, out)
    assert_bit_equal(out, t)


def kv_like(dtype: torch.dtype, tokens: int = 512, heads: int = 4, head_dim: int = 64) -> torch.Tensor:
    """Channels at very different scales (like keys' outlier channels), so that clustering finds several groups."""
    g = torch.Generator().manual_seed(7)
    scales = torch.logspace(-3, 2, head_dim, dtype=torch.float64)[torch.randperm(head_dim, generator=g)]
    return (torch.randn(1, heads, tokens, head_dim, generator=g, dtype=torch.float64) * scales).to(dtype)


@pytest.mark.parametrize("dtype", list(WIDTH))
def test_kv_like_tensors_cluster_shrink_and_round_trip(dtype):
    t = kv_like(dtype)
    encoded = codec.encode(t, "kvmart")
    groups = struct.unpack("<H", encoded.data[:2])[0]
    assert groups > 1  # channels of different scales are modelled apart
    assert len(encoded.data) < t.numel() * t.element_size()
    assert len(encoded.data) < len(codec.encode(t, "zstd").data)
    assert_bit_equal(codec.decode(encoded), t)


def test_cluster_separates_channels_of_different_distributions():
    rng = np.random.default_rng(0)
    top = np.concatenate([rng.integers(100, 104, (8, 4096)), rng.integers(120, 124, (8, 4096))]).astype(np.uint8)
    labels = cluster(top[rng.permutation(16)])
    assert len(set(labels.tolist())) == 2


def test_float32_holding_bfloat16_values_shrinks_far_more():
    upcast = kv_like(torch.bfloat16).to(torch.float32)
    full = kv_like(torch.float32)
    size = lambda t: len(codec.encode(t, "kvmart").data)  # noqa: E731
    assert size(upcast) < 0.6 * size(full)


def test_decode_into_a_preallocated_tensor():
    t = kv_like(torch.bfloat16, tokens=64)
    out = torch.empty_like(t)
    assert codec.decode(codec.encode(t), out) is out
    assert_bit_equal(out, t)


def test_encode_does_not_modify_its_input():
    t = kv_like(torch.float32, tokens=64)
    before = t.clone()
    for spec in CODEC_SPECS:
        codec.encode(t, spec)
    assert_bit_equal(t, before)


def test_non_contiguous_input_is_encoded_as_its_values():
    t = kv_like(torch.bfloat16, tokens=64).transpose(2, 3)
    assert_bit_equal(codec.decode(codec.encode(t)), t.contiguous())


# -- refusals ----------------------------------------------------------------------------------------------------
def test_unsupported_dtype_is_refused():
    with pytest.raises(CodecError, match="cannot encode int64"):
        codec.encode(torch.arange(4), "kvmart")


@pytest.mark.parametrize("spec", ["lzma", "zstd:0", "zstd:23", "raw:3", "kvmart:x", ""])
def test_unknown_codec_spec_is_refused_listing_the_known(spec):
    with pytest.raises(ConfigError, match="raw"):
        codec.parse_spec(spec)


def test_unknown_codec_in_data_is_refused():
    encoded = codec.encode(torch.ones(3), "raw")
    with pytest.raises(CodecError, match="not supported"):
        codec.decode(codec.Encoded("lzma", {}, "float32", (3,), encoded.data))


@pytest.mark.parametrize("spec", ["raw", "zstd", "kvmart"])
def test_every_truncation_is_refused(spec):
    t = kv_like(torch.bfloat16, tokens=32)
    encoded = codec.encode(t, spec)
    n = len(encoded.data)
    for cut in sorted({0, 1, 2, 3, 5, n // 3, n // 2, n - 2, n - 1}):
        short = codec.Encoded(encoded.codec, encoded.params, encoded.dtype, encoded.shape, encoded.data[:cut])
        with pytest.raises(CodecError):
            codec.decode(short)


@pytest.mark.parametrize("spec", ["raw", "zstd", "kvmart"])
def test_trailing_bytes_are_refused(spec):
    encoded = codec.encode(kv_like(torch.float16, tokens=16), spec)
    longer = codec.Encoded(encoded.codec, encoded.params, encoded.dtype, encoded.shape, encoded.data + b"\0")
    with pytest.raises(CodecError):
        codec.decode(longer)


def test_malformed_params_are_refused():
    encoded = codec.encode(kv_like(torch.bfloat16, tokens=16), "kvmart")
    for params in ({}, {"rotate": True, "level": 3}, {"level": 3, "extra": 1}):
        with pytest.raises(CodecError, match="params"):
            codec.decode(codec.Encoded("kvmart", params, encoded.dtype, encoded.shape, encoded.data))


def test_cluster_labels_out_of_range_are_refused():
    encoded = codec.encode(kv_like(torch.bfloat16), "kvmart")
    groups = struct.unpack("<H", encoded.data[:2])[0]
    data = bytearray(encoded.data)
    data[2] = groups  # a channel in a cluster that does not exist
    with pytest.raises(CodecError):
        codec.decode(codec.Encoded("kvmart", encoded.params, encoded.dtype, encoded.shape, bytes(data)))


@pytest.mark.parametrize("spec", ["raw", "zstd", "kvmart"])
def test_packed_corruption_anywhere_is_refused(spec):
    """Every byte of a packed tensor, flipped in turn (sampled): header, structure or data, never decoded."""
    blob = codec.pack(kv_like(torch.bfloat16, tokens=32), spec)
    for position in range(0, len(blob), max(1, len(blob) // 300)):
        damaged = bytearray(blob)
        damaged[position] ^= 1 << (position % 8)
        with pytest.raises(CodecError):
            codec.unpack(bytes(damaged))
    for cut in (0, 5, len(blob) // 2, len(blob) - 1):
        with pytest.raises(CodecError):
            codec.unpack(blob[:cut])


SMALL_ENCODED = codec.encode(kv_like(torch.bfloat16, tokens=16, heads=2, head_dim=8), "kvmart").data


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=400), flips=st.lists(st.integers(0, 10_000), max_size=8))
def test_garbage_never_escapes_as_anything_but_codec_error(data: bytes, flips: list[int]):
    """Random bytes, and a real encoding with random bytes flipped: the compiled decoder either refuses them with
    CodecError or decodes something (a flip it cannot detect: what checksums are for), never crashes or reads out of
    bounds."""
    shape = (1, 2, 16, 8)
    real = bytearray(SMALL_ENCODED)
    for position in flips:
        real[position % len(real)] ^= 0xFF
    for blob in (data, bytes(real)):
        with contextlib.suppress(CodecError):
            codec.decode(codec.Encoded("kvmart", {"level": 3}, "bfloat16", shape, blob))


def test_settings_codec_is_validated(tmp_path):
    from kvmart.config import load_settings

    assert load_settings({"KVMART_DATA_DIR": str(tmp_path), "KVMART_CODEC": "zstd:19"}).codec == "zstd:19"
    assert load_settings({"KVMART_DATA_DIR": str(tmp_path), "KVMART_CODEC": "zstd:19"}).artifact_codec == "zstd:19"
    local = load_settings({"KVMART_DATA_DIR": str(tmp_path)})
    assert local.codec == "" and local.artifact_codec == "raw"  # a local store maps raw artifacts in place
    for shared in ("redis://127.0.0.1:6379/0", "s3://bucket/prefix"):
        settings = load_settings({"KVMART_DATA_DIR": str(tmp_path), "KVMART_STORE": shared})
        assert settings.artifact_codec == codec.DEFAULT_CODEC == "kvmart"
    with pytest.raises(ConfigError, match="unknown codec 'nope'"):
        load_settings({"KVMART_DATA_DIR": str(tmp_path), "KVMART_CODEC": "nope"})
