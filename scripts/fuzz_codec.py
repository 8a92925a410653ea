"""Mutation fuzzing of the kvmart codec's compiled decoders (kvmart/codec/csrc/), for a run under AddressSanitizer
and UndefinedBehaviorSanitizer (scripts/fuzz-codec.sh builds the kernels so and runs this): real encodings of
KV-like tensors (both dtypes, 1 to 200 tokens, several tiles and streams) with bits flipped, bytes set, cut,
extended, copied over themselves, and decoded by the format 3, 2 and 1 decoders. A mutation must raise CodecError
or decode (a flip the codec cannot detect: what the artifact's checksums are for); a read or write out of bounds
stops the run with the sanitizer's report.

Usage: python scripts/fuzz_codec.py [--seed N] [--seconds S]"""

from __future__ import annotations

import argparse
import contextlib
import random
import time

import torch

from kvmart import codec
from kvmart.errors import CodecError


def kv_like(dtype: torch.dtype, tokens: int, heads: int = 3, head_dim: int = 64) -> torch.Tensor:
    """Channels at very different scales, as keys' outlier channels are (several channel groups)."""
    g = torch.Generator().manual_seed(tokens)
    scales = torch.logspace(-3, 2, head_dim, dtype=torch.float64)[torch.randperm(head_dim, generator=g)]
    return (torch.randn(1, heads, tokens, head_dim, generator=g, dtype=torch.float64) * scales).to(dtype)


def mutate(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice([1, 1, 2, 4, 16])):
        kind = rng.random()
        if kind < 0.4:
            p = rng.randrange(len(b))
            b[p] ^= 1 << rng.randrange(8)
        elif kind < 0.6:
            b[rng.randrange(len(b))] = rng.choice([0, 255, rng.randrange(256)])
        elif kind < 0.7:
            b = b[:rng.randrange(len(b) + 1)] or bytearray(b"\0")
        elif kind < 0.8:
            b += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
        elif kind < 0.9 and len(b) > 8:
            i, j, k = rng.randrange(len(b) - 4), rng.randrange(len(b) - 4), rng.randrange(1, 64)
            b[i:i + k] = b[j:j + k]
        else:
            p = rng.randrange(max(1, len(b) - 4))
            b[p:p + 4] = rng.randrange(1 << 32).to_bytes(4, "little")
    return bytes(b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=120.0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    cases = [codec.encode(kv_like(dtype, tokens), "kvmart") for dtype in (torch.bfloat16, torch.float32)
             for tokens in (1, 7, 64, 200)]
    tried = decoded = 0
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        encoded = rng.choice(cases)
        params = dict(encoded.params)
        if rng.random() < 0.1:  # another format's decoder over the same bytes
            params["version"] = rng.choice([1, 2, 3])
        tried += 1
        with contextlib.suppress(CodecError):
            codec.decode(codec.Encoded("kvmart", params, encoded.dtype, encoded.shape, mutate(encoded.data, rng)))
            decoded += 1
    print(f"seed {args.seed}: {tried:,} mutations, {decoded:,} decoded without a CodecError, none out of bounds")


if __name__ == "__main__":
    main()
