"""kvmart's own lossless codec for float KV tensors (`kvmart`): per-channel-cluster Huffman codes in interleaved
streams, decoded by table lookups in C (kvmart/codec/csrc/, compiled at install).

    analysis.py  what the encoder decides: repeated rows, the symbol split, channel clusters, code lengths
    format3.py   the bitstream kvmart writes ({"version": 3}: eight streams)
    format2.py   kvmart 0.2's ({"version": 2}: four streams), decoded; written only when asked for
    legacy.py    kvmart 0.1's format 1 ({"level": N}, rANS), decoded

Measured in docs/BENCHMARKS.md (*Lossless KV compression*); specified in docs/FORMAT.md.
"""

from __future__ import annotations

import torch

from kvmart.codec import analysis, format2, format3, legacy
from kvmart.errors import CodecError

FORMATS = {3: format3, 2: format2}  # version -> module: what this kvmart decodes besides format 1
TABLE_LOG = 11  # the longest codeword


class HuffmanCodec:
    """Writes format 3 (or format 2: `version=2`); decodes formats 3, 2 and 1. Holds only its options: safe to
    share between threads. The options are the encoder's choices (docs/BENCHMARKS.md measures them); a decoder
    follows whatever the bitstream says."""

    name = "kvmart"

    def __init__(self, max_models: int = analysis.MAX_MODELS,
                 symbol_mantissa_bits: int = analysis.SYMBOL_MANTISSA_BITS, table_log: int = TABLE_LOG,
                 version: int = format3.VERSION) -> None:
        if version not in FORMATS or not 1 <= table_log <= FORMATS[version].MAX_TABLE_LOG or not 1 <= max_models <= 255:
            raise ValueError(f"HuffmanCodec: format {version} with codewords of at most {table_log} bits and "
                             f"{max_models} codes is not something kvmart writes")
        self.max_models, self.symbol_mantissa_bits = max_models, symbol_mantissa_bits
        self.table_log, self.version = table_log, version

    def encode(self, tensor: torch.Tensor) -> tuple[bytes, dict]:
        params = {"version": self.version}
        fmt = FORMATS[self.version]
        if tensor.numel() == 0:
            return fmt.EMPTY, params
        plan = analysis.plan(tensor, fmt.SYMBOL_BITS, self.max_models, self.symbol_mantissa_bits, self.table_log)
        return fmt.encode(plan, self.table_log), params

    def decode(self, data: memoryview, params: dict, out: torch.Tensor) -> None:
        version = params.get("version") if set(params) == {"version"} else None
        if isinstance(version, int) and not isinstance(version, bool) and version in FORMATS:
            FORMATS[version].decode(data, out)
        elif isinstance(version, int) and not isinstance(version, bool) and version > max(FORMATS):
            raise CodecError(f"kvmart tensor format {version} is not supported by this kvmart (it decodes formats "
                             f"{', '.join(map(str, FORMATS))} and 1): upgrade kvmart to read it")
        elif set(params) == {"level"}:
            legacy.decode(data, out)
        else:
            raise CodecError(f"corrupt kvmart tensor: params {params!r} (this kvmart decodes format 3, "
                             f"{{'version': 3}}, format 2, {{'version': 2}}, and format 1, {{'level': N}})")
