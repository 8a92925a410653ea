"""Lossless tensor codecs: a small registry, and per-tensor encode/decode that any part of kvmart can call.

    raw      the tensor's bytes as they are in memory
    zstd     zstd over the raw bytes (the general-purpose baseline)
    kvmart   kvmart's own: sign, exponent and top mantissa bits Huffman-coded per cluster of channels in eight
             interleaved streams, the rest of the mantissa stored as it is, repeated token rows by reference
             (huffman.py and the modules it names; C kernels in csrc/, compiled at install; docs/FORMAT.md).
             Formats 2 and 1 of earlier kvmart versions are still decoded

`zstd` may carry a level: `zstd:19`. Decoding is bit-exact by contract: the decoded tensor
is `torch.equal` to the encoded one, NaN payloads, infinities, subnormals and -0.0 included. Malformed or corrupt
encoded data raises CodecError (an ArtifactError) and is never decoded into wrong numbers: `pack`/`unpack` and
artifacts check an xxh3-128 checksum of the stored bytes before decoding and of the decoded bytes after.

    encoded = encode(tensor, "kvmart")          # Encoded(codec, params, dtype, shape, data)
    tensor = decode(encoded)                    # or decode(encoded, out=preallocated) to decode in place
    blob = pack(tensor, "kvmart"); unpack(blob) # self-describing, checksummed bytes (for stores of chunks)
"""

from __future__ import annotations

import importlib
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Protocol

import torch
import xxhash

from kvmart.errors import CodecError, ConfigError

DEFAULT_CODEC = "kvmart"
# name -> (module, class), imported on first use
CODECS: dict[str, tuple[str, str]] = {
    "raw": ("kvmart.codec.raw", "RawCodec"),
    "zstd": ("kvmart.codec.zstd", "ZstdCodec"),
    "kvmart": ("kvmart.codec.huffman", "HuffmanCodec"),
}
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_LEVEL = 22
LEVELED = ("zstd",)  # the codecs that take a level


class Codec(Protocol):
    """One lossless encoding. Implementations hold only their options, so one instance is safe to share between
    threads. `encode` does not modify its input; `decode` writes only into `out`."""

    name: str

    def encode(self, tensor: torch.Tensor) -> tuple[bytes, dict]:
        """(bytes, params) of a contiguous tensor of a dtype in DTYPES; params is what `decode` needs (JSON-able)."""

    def decode(self, data: memoryview, params: dict, out: torch.Tensor) -> None:
        """Fill the contiguous tensor `out` (its dtype and shape are the encoded tensor's) from `data`; raises
        CodecError if `data` or `params` cannot have come from `encode` of a tensor of that dtype and shape."""


@dataclass(frozen=True)
class Spec:
    """A codec choice: a name from CODECS and, for zstd, an optional level."""

    name: str
    level: int | None = None

    def __str__(self) -> str:
        return self.name if self.level is None else f"{self.name}:{self.level}"


def parse_spec(text: str) -> Spec:
    """`NAME` or `zstd:LEVEL` -> Spec; ConfigError naming the known codecs otherwise."""
    name, sep, level = text.strip().partition(":")
    if name not in CODECS:
        raise ConfigError(f"unknown codec {text!r}; known codecs: {', '.join(CODECS)} (and zstd:LEVEL)")
    if not sep:
        return Spec(name)
    if name not in LEVELED or not level.isdigit() or not 1 <= int(level) <= MAX_LEVEL:
        raise ConfigError(f"codec {text!r}: of the known codecs ({', '.join(CODECS)}) only {', '.join(LEVELED)} takes "
                          f"a level, a whole number from 1 to {MAX_LEVEL} (kvmart's has none since its format 2)")
    return Spec(name, int(level))


def get_codec(spec: str | Spec) -> Codec:
    """The codec instance for `spec` (a name, `zstd:LEVEL`, or a Spec)."""
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    module, cls = CODECS[spec.name]
    factory = getattr(importlib.import_module(module), cls)
    codec: Codec = factory() if spec.level is None else factory(level=spec.level)
    return codec


def decoder(name: str) -> Codec:
    """The codec that decodes data recorded as written by `name`; CodecError if this kvmart has none."""
    if name not in CODECS:
        raise CodecError(f"codec {name!r} is not supported by this kvmart (known: {', '.join(CODECS)})")
    return get_codec(Spec(name))


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise CodecError(f"cannot encode {name} tensors; supported dtypes: {', '.join(DTYPES)}")
    return name


@dataclass(frozen=True)
class Encoded:
    """An encoded tensor: what `decode` needs besides the bytes is the codec, its params, dtype and shape."""

    codec: str
    params: dict
    dtype: str
    shape: tuple[int, ...]
    data: bytes | memoryview = field(repr=False)

    @property
    def decoded_bytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


def encode(tensor: torch.Tensor, codec: str | Spec = DEFAULT_CODEC) -> Encoded:
    """Encode one tensor (float32, bfloat16 or float16, any shape; the last two dims are read as tokens x channels,
    as in a KV tensor [1, heads, tokens, head_dim]). The input is not modified."""
    name = dtype_name(tensor.dtype)
    chosen = get_codec(codec)
    data, params = chosen.encode(tensor.detach().cpu().contiguous())
    return Encoded(chosen.name, params, name, tuple(tensor.shape), data)


def decode(encoded: Encoded, out: torch.Tensor | None = None) -> torch.Tensor:
    """The tensor back, bit-exact; written into `out` (contiguous, same dtype and shape) when given."""
    dtype = DTYPES.get(encoded.dtype)
    if dtype is None:
        raise CodecError(f"encoded dtype {encoded.dtype!r} is not supported; supported: {', '.join(DTYPES)}")
    if out is None:
        out = torch.empty(encoded.shape, dtype=dtype)
    elif out.dtype != dtype or tuple(out.shape) != tuple(encoded.shape) or not out.is_contiguous():
        raise AssertionError("decode: `out` must be contiguous with the encoded dtype and shape")
    decoder(encoded.codec).decode(memoryview(encoded.data), encoded.params, out)
    return out


def checksum(data: memoryview | bytes) -> str:
    """xxh3-128 hex digest: runs at memory speed, detects corruption (it is not a signature)."""
    return xxhash.xxh3_128_hexdigest(data)


def tensor_checksum(tensor: torch.Tensor) -> str:
    from kvmart.codec.raw import byte_view

    return checksum(byte_view(tensor.contiguous()))


PACK_MAGIC = b"KVMC1\0"
_PACK_PREFIX = len(PACK_MAGIC) + 4 + 16


def pack(tensor: torch.Tensor, codec: str | Spec = DEFAULT_CODEC) -> bytes:
    """A self-describing, checksummed blob of one encoded tensor:
    MAGIC | u32 n | xxh3-128 of the JSON header (16 bytes) | n bytes of JSON header | encoded data."""
    enc = encode(tensor, codec)
    head = json.dumps({"codec": enc.codec, "params": enc.params, "dtype": enc.dtype, "shape": list(enc.shape),
                       "checksum": tensor_checksum(tensor), "stored_checksum": checksum(enc.data)},
                      sort_keys=True).encode()
    return PACK_MAGIC + struct.pack("<I", len(head)) + xxhash.xxh3_128_digest(head) + head + enc.data


def unpack(blob: bytes | memoryview, out: torch.Tensor | None = None) -> torch.Tensor:
    """The tensor of a `pack` blob, verified before and after decoding; CodecError if anything is off."""
    view = memoryview(blob)
    if len(view) < _PACK_PREFIX or bytes(view[:len(PACK_MAGIC)]) != PACK_MAGIC:
        raise CodecError("not a kvmart packed tensor (bad magic or too short)")
    (n,) = struct.unpack("<I", view[len(PACK_MAGIC):len(PACK_MAGIC) + 4])
    head = bytes(view[_PACK_PREFIX:_PACK_PREFIX + n])
    if len(head) != n or xxhash.xxh3_128_digest(head) != bytes(view[_PACK_PREFIX - 16:_PACK_PREFIX]):
        raise CodecError("corrupt packed tensor: its header does not match its checksum")
    try:
        fields = json.loads(head)
        enc = Encoded(fields["codec"], fields["params"], fields["dtype"], tuple(fields["shape"]),
                      view[_PACK_PREFIX + n:])
        expected, stored = fields["checksum"], fields["stored_checksum"]
    except (ValueError, KeyError, TypeError) as e:
        raise CodecError(f"corrupt packed tensor: unreadable header ({e})") from e
    if not isinstance(enc.params, dict) or not all(isinstance(d, int) and d >= 0 for d in enc.shape):
        raise CodecError("corrupt packed tensor: malformed params or shape")
    if checksum(enc.data) != stored:
        raise CodecError("corrupt packed tensor: its data does not match its checksum")
    result = decode(enc, out)
    if tensor_checksum(result) != expected:
        raise CodecError("corrupt packed tensor: the decoded tensor does not match its checksum")
    return result


__all__ = ["CODECS", "DEFAULT_CODEC", "DTYPES", "Codec", "Encoded", "Spec", "checksum", "decode", "decoder", "encode",
           "get_codec", "pack", "parse_spec", "tensor_checksum", "unpack"]
