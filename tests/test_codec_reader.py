"""The `kvmart` codec's formats 3 and 2 as docs/FORMAT.md specifies them: tensors encoded by kvmart decode bit for bit with
tests/vectors/kvmart_codec_reader.py, a reader written from the specification alone (numpy and the standard
library, no kvmart import). Small tensors: that reader walks the streams bit by bit."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from kvmart import codec
from kvmart.codec.huffman import HuffmanCodec

spec = importlib.util.spec_from_file_location("kvmart_codec_reader", Path(__file__).parent / "vectors" / "kvmart_codec_reader.py")
reader = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reader)


def kv_like(dtype: torch.dtype, shape: tuple, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-3, 2, shape[-1], dtype=torch.float64)[torch.randperm(shape[-1], generator=g)]
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scales).to(dtype)


def with_repeats(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t[..., 5, :] = t[..., 1, :]
    t[..., 7, :] = t[..., 1, :]
    t[..., 9, :] = t[..., 2, :]
    return t


CASES = {
    "bf16 kv, several codes": lambda: kv_like(torch.bfloat16, (1, 2, 256, 32), 1),
    "f32 kv": lambda: kv_like(torch.float32, (1, 2, 24, 16), 2),
    "f16 kv": lambda: kv_like(torch.float16, (1, 3, 12, 8), 3),
    "bf16 repeated rows": lambda: with_repeats(kv_like(torch.bfloat16, (1, 2, 12, 8), 4)),
    "f32 holding bf16 (zero low bits)": lambda: kv_like(torch.bfloat16, (1, 2, 10, 8), 5).float(),
    "bf16 arbitrary bits (wide symbols)": lambda: torch.randint(-2**15, 2**15, (2, 9, 7), dtype=torch.int16,
                                                                generator=torch.Generator().manual_seed(6))
    .view(torch.bfloat16),
    "f32 odd shape": lambda: kv_like(torch.float32, (3, 5), 7),
    "bf16 one value": lambda: torch.full((1, 1, 6, 4), 1.5, dtype=torch.bfloat16),
    "bf16 empty": lambda: torch.zeros((1, 2, 0, 8), dtype=torch.bfloat16),
    "f32 arbitrary bits (raw bits wider than a byte)": lambda: torch.randint(
        -2**31, 2**31 - 1, (1, 2, 6, 16), dtype=torch.int32, generator=torch.Generator().manual_seed(10))
    .view(torch.float32),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("version", [3, 2])
def test_the_independent_reader_decodes_what_kvmart_encodes(name: str, version: int):
    t = CASES[name]().contiguous()
    data, params = HuffmanCodec(version=version).encode(t)
    encoded = codec.Encoded("kvmart", params, str(t.dtype).removeprefix("torch."), tuple(t.shape), data)
    assert params == {"version": version}
    got = reader.decode_array(encoded.params, encoded.dtype, encoded.shape, bytes(encoded.data))
    unsigned = {2: np.uint16, 4: np.uint32}[t.element_size()]
    expected = t.reshape(-1).view({2: torch.int16, 4: torch.int32}[t.element_size()]).numpy().view(unsigned)
    assert got.dtype == unsigned and got.shape == tuple(t.shape)
    assert np.array_equal(got.reshape(-1), expected)
    if name == "bf16 kv, several codes":
        assert encoded.data[4] > 1  # the header's number of codes: channels coded apart


@pytest.mark.parametrize("version", [3, 2])
def test_the_reader_follows_other_encoder_choices(version: int):
    """One code per tensor and a narrower table: what the bitstream says, not what kvmart's encoder picks today."""
    t = kv_like(torch.bfloat16, (1, 2, 40, 16), 8)
    data, params = HuffmanCodec(max_models=1, table_log=9, symbol_mantissa_bits=0, version=version).encode(t)
    got = reader.decode_array(params, "bfloat16", tuple(t.shape), data)
    assert np.array_equal(got.reshape(-1), t.reshape(-1).view(torch.int16).numpy().view(np.uint16))


def test_the_reader_refuses_a_truncated_stream():
    t = kv_like(torch.bfloat16, (1, 1, 8, 8), 9)
    encoded = codec.encode(t, "kvmart")
    with pytest.raises((ValueError, IndexError, struct_error())):
        reader.decode_array(encoded.params, encoded.dtype, encoded.shape, bytes(encoded.data)[:-3])


def struct_error():
    import struct

    return struct.error
