"""Codecs: every codec gives back every tensor bit for bit (NaN payloads, infinities, subnormals and -0.0
included); malformed or corrupt encoded data is refused with CodecError, never decoded into wrong numbers."""

from __future__ import annotations

import base64
import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from kvmart import codec
from kvmart.codec import format3
from kvmart.codec import raw as _raw  # noqa: F401  (codec.raw below)
from kvmart.codec.clusters import cluster
from kvmart.codec.huffman import HuffmanCodec
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
CODEC_SPECS = ["raw", "zstd", "zstd:19", "kvmart"]


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


@pytest.mark.parametrize("options", [{"max_models": 1}, {"symbol_mantissa_bits": 0}, {"symbol_mantissa_bits": 3},
                                     {"table_log": 9}, {"version": 2}, {"version": 2, "table_log": 12},
                                     {"version": 2, "max_models": 1}])
@settings(max_examples=30, deadline=None)
@given(t=tensors())
def test_round_trip_with_other_encoder_choices(options: dict, t: torch.Tensor):
    """The decoder follows what the bitstream says: one code, other symbol widths, other table sizes, and format 2
    (kvmart 0.2's, still decoded; written here on request)."""
    coder = HuffmanCodec(**options)
    data, params = coder.encode(t.contiguous())
    out = torch.empty_like(t)
    coder.decode(memoryview(data), params, out)
    assert_bit_equal(out, t)


@settings(max_examples=40, deadline=None)
@given(t=tensors(), repeats=st.lists(st.integers(0, 8), max_size=12))
def test_repeated_token_rows_round_trip_and_are_stored_once(t: torch.Tensor, repeats: list[int]):
    """Token rows copied from earlier ones (as layer 0's values repeat for a repeated token) come back exactly."""
    if t.dim() < 2 or t.shape[-2] < 2 or t.numel() == 0:
        return
    t = t.clone()
    T = t.shape[-2]
    for i, r in enumerate(repeats):
        dst = 1 + i % (T - 1)
        t[..., dst, :] = t[..., r % dst, :]
    assert_bit_equal(codec.decode(codec.encode(t, "kvmart")), t)


def test_repeated_rows_shrink_the_encoding():
    base = kv_like(torch.bfloat16, tokens=64)
    repeated = base.clone()
    repeated[..., 32:, :] = base[..., :32, :]
    size = lambda x: len(codec.encode(x, "kvmart").data)  # noqa: E731
    assert size(repeated) < 0.6 * size(base)
    assert_bit_equal(codec.decode(codec.encode(repeated, "kvmart")), repeated)


def kv_like(dtype: torch.dtype, tokens: int = 512, heads: int = 4, head_dim: int = 64) -> torch.Tensor:
    """Channels at very different scales (like keys' outlier channels), so that clustering finds several groups."""
    g = torch.Generator().manual_seed(7)
    scales = torch.logspace(-3, 2, head_dim, dtype=torch.float64)[torch.randperm(head_dim, generator=g)]
    return (torch.randn(1, heads, tokens, head_dim, generator=g, dtype=torch.float64) * scales).to(dtype)


def header(data: bytes) -> dict:
    names = ["version", "shift", "zero_bits", "table_log", "codes", "symbols", "copies", "side_bytes"]
    fields = format3.HEADER.unpack_from(data)
    return dict(zip(names, fields, strict=False)) | {"stream_bits": fields[8:]}


@pytest.mark.parametrize("dtype", list(WIDTH))
def test_kv_like_tensors_cluster_shrink_and_round_trip(dtype):
    t = kv_like(dtype)
    encoded = codec.encode(t, "kvmart")
    assert encoded.params == {"version": 3} and header(encoded.data)["version"] == 3
    assert len(header(encoded.data)["stream_bits"]) == 8 and min(header(encoded.data)["stream_bits"]) > 0
    assert header(encoded.data)["codes"] > 1  # channels of different scales are modelled apart
    assert len(encoded.data) < t.numel() * t.element_size()
    assert len(encoded.data) < len(codec.encode(t, "zstd").data)
    assert_bit_equal(codec.decode(encoded), t)


def test_cluster_separates_channels_of_different_distributions():
    rng = np.random.default_rng(0)
    hist = np.zeros((16, 32))
    for c in range(16):
        np.add.at(hist[c], rng.integers(0, 4, 4096) + (0 if c < 8 else 20), 1)
    order = rng.permutation(16)
    labels = cluster(hist[order], 16)
    assert len(set(labels.tolist())) == 2
    assert len(set(labels[order < 8].tolist())) == 1


def test_float32_holding_bfloat16_values_shrinks_far_more():
    upcast = kv_like(torch.bfloat16).to(torch.float32)
    full = kv_like(torch.float32)
    size = lambda t: len(codec.encode(t, "kvmart").data)  # noqa: E731
    assert size(upcast) < 0.6 * size(full)
    assert header(codec.encode(upcast, "kvmart").data)["zero_bits"] == 16  # the low half is zero: not stored


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


@pytest.mark.parametrize("spec", ["lzma", "zstd:0", "zstd:23", "raw:3", "kvmart:x", "kvmart:3", ""])
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
    for params in ({}, {"rotate": True, "level": 3}, {"version": 3, "extra": 1}, {"version": "3"}, {"version": True},
                   {"version": 1}, {"version": 0}):
        with pytest.raises(CodecError, match="params"):
            codec.decode(codec.Encoded("kvmart", params, encoded.dtype, encoded.shape, encoded.data))


def test_a_newer_format_is_refused_saying_so():
    data = bytes(codec.encode(kv_like(torch.bfloat16, tokens=16), "kvmart").data)
    with pytest.raises(CodecError, match="format 4 is not supported by this kvmart"):
        codec.decode(codec.Encoded("kvmart", {"version": 4}, "bfloat16", (1, 4, 16, 64), data))


def test_a_version_byte_that_contradicts_the_params_is_refused():
    data = bytearray(codec.encode(kv_like(torch.bfloat16, tokens=16), "kvmart").data)
    data[0] = 2
    with pytest.raises(CodecError, match="format 2 where its params say 3"):
        codec.decode(codec.Encoded("kvmart", {"version": 3}, "bfloat16", (1, 4, 16, 64), bytes(data)))


def test_cluster_labels_out_of_range_are_refused():
    t = kv_like(torch.bfloat16)
    encoded = codec.encode(t, "kvmart")
    fields = header(encoded.data)
    data = bytearray(encoded.data)
    data[format3.HEADER.size + 2 * fields["symbols"]] = fields["codes"]  # a channel with a code that does not exist
    with pytest.raises(CodecError, match="out of range"):
        codec.decode(codec.Encoded("kvmart", encoded.params, encoded.dtype, encoded.shape, bytes(data)))


def test_every_single_bit_flip_of_the_header_is_refused():
    """The fixed header's every field is checked against the shape and the sizes of what follows, so no flip of it
    decodes to other numbers: it is refused, or changes nothing (a table_log that still covers every code). A flip
    in the tables, planes or streams may decode to other numbers: the checksums refuse those (see
    test_packed_corruption_anywhere_is_refused)."""
    t = kv_like(torch.bfloat16, tokens=32, heads=2, head_dim=16)
    encoded = codec.encode(t, "kvmart")
    for position in range(format3.HEADER.size):
        for bit in range(8):
            data = bytearray(encoded.data)
            data[position] ^= 1 << bit
            with contextlib.suppress(CodecError):
                out = codec.decode(codec.Encoded("kvmart", encoded.params, encoded.dtype, encoded.shape, bytes(data)))
                assert position == 3, f"byte {position} bit {bit} of the header was not refused"
                assert_bit_equal(out, t)


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
SMALL_FLOAT32 = codec.encode(kv_like(torch.float32, tokens=16, heads=2, head_dim=8), "kvmart").data
SMALL_FORMAT2 = HuffmanCodec(version=2).encode(kv_like(torch.bfloat16, tokens=16, heads=2, head_dim=8))[0]


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=400), flips=st.lists(st.integers(0, 10_000), max_size=8))
def test_garbage_never_escapes_as_anything_but_codec_error(data: bytes, flips: list[int]):
    """Random bytes, and a real encoding with random bytes flipped: the compiled decoder either refuses them with
    CodecError or decodes something (a flip it cannot detect: what checksums are for), never crashes or reads out of
    bounds."""
    shape = (1, 2, 16, 8)
    for dtype, encoded in (("bfloat16", SMALL_ENCODED), ("float32", SMALL_FLOAT32), ("bfloat16", SMALL_FORMAT2)):
        real = bytearray(encoded)
        for position in flips:
            real[position % len(real)] ^= 0xFF
        for blob in (data, bytes(real), bytes(data[:1]) + bytes(real[1:])):
            for params in ({"version": 3}, {"version": 2}, {"level": 3}):  # formats 3, 2 and 1's decoders
                with contextlib.suppress(CodecError):
                    codec.decode(codec.Encoded("kvmart", params, dtype, shape, blob))


LEGACY = json.loads((Path(__file__).parent / "data" / "codec_v1.json").read_text())["tensors"]


@pytest.mark.parametrize("name", sorted(LEGACY))
def test_format_1_tensors_written_by_kvmart_0_1_still_decode(name: str):
    """Tensors encoded by kvmart 0.1's own codec (fixtures made by its encoder) decode bit for bit."""
    case = LEGACY[name]
    encoded = codec.Encoded("kvmart", case["params"], case["dtype"], tuple(case["shape"]),
                            base64.b64decode(case["encoded"]))
    assert case["params"].keys() == {"level"}
    out = codec.decode(encoded)
    assert bytes(codec.raw.byte_view(out)) == base64.b64decode(case["raw"])


def test_a_corrupt_format_1_tensor_is_refused():
    case = LEGACY["bf16_clusters"]
    data = bytearray(base64.b64decode(case["encoded"]))
    data[len(data) // 3] ^= 0x10
    with pytest.raises(CodecError):
        out = codec.decode(codec.Encoded("kvmart", case["params"], case["dtype"], tuple(case["shape"]), bytes(data)))
        if bytes(codec.raw.byte_view(out)) != base64.b64decode(case["raw"]):
            raise CodecError("decoded to other numbers (what the checksums are for)")


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
