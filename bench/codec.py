"""Claim: kvmart's lossless codec stores real KV caches smaller than general-purpose and float-specific
compressors, decodes bit-exactly, at the speed of a fast disk (issue 32: >= 1.55x on bf16, >= 1.5 GB/s decode and
>= 300 MB/s encode per core), with no compile step on any request.

Side by side in one run, on KV prefilled by real models (SmolLM2-135M-Instruct's trained weights, and the built-in
random-weight Qwen3-0.6B shape) from the bundled licence texts, float32 and bfloat16:
  codecs  : ratio (raw bytes / encoded bytes), encode and decode MB/s (of raw bytes, one thread) for raw, zstd-3,
            zstd-19, lz4, gzip, zipnn, pcodec, blosc2 (shuffle + zstd), kvmart's codec and the candidates it was
            chosen over (bench/codec_candidates.py); every decode is checked bit for bit; baselines that are not
            installed are listed as such (pip install 'kvmart[bench]'). The same sample of layers for every codec
            (--sample-mb; all layers by default), keys and values apart; --repeats passes over it, each timed in CPU
            seconds of this process and in wall seconds: min / median / max of the passes' MB/s.
  entropy : bits per element of the exponent plane, order-0 vs modelled per channel vs given the previous token's
            exponent in the same channel (what an XOR/delta against the neighbouring token could gain).
  loads   : whole artifacts through the disk store: bytes per token, load time with the file in the page cache
            (warm, measured in CPU seconds of the process), and at a simulated 1 GB/s read (bytes / bandwidth +
            the measured warm load, no overlap of reading and decoding).

    python bench/codec.py --models builtin:smollm2-135m --lengths 3774      # the issue's measurement
    python bench/codec.py --models builtin:tiny --lengths 256 --sample-mb 4   # a quick look
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from codec_candidates import candidates  # noqa: I001  (bench/ is on the path: this script's folder)

from kvmart.codec.elements import as_uint, grid
from kvmart.codec.huffman import HuffmanCodec
from kvmart.config import load_settings
from kvmart.format.artifact import encode_artifact
from kvmart.reuse import core
from kvmart.reuse.samples import SAMPLES, sample_text
from kvmart.runtime.kv import KV
from kvmart.runtime.model import Model
from kvmart.store import Entry, open_store

warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' notices, once per forward pass

Encoder = Callable[[torch.Tensor], bytes]
Decoder = Callable[[bytes, torch.Tensor], None]  # fills the preallocated tensor


def raw_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def fill(out: torch.Tensor, data: bytes | memoryview) -> None:
    raw_bytes(out)[:] = data


def kvmart_codec(instance) -> tuple[Encoder, Decoder]:
    state: dict = {}

    def enc(t):
        data, state["params"] = instance.encode(t)
        return data

    return enc, lambda data, out: instance.decode(memoryview(data), state["params"], out)


def portable(pair: tuple[Encoder, Decoder]) -> tuple[Encoder, Decoder]:
    """The same codec with the kernels' portable loops (what a CPU without BMI2 and AVX2 runs)."""
    from kvmart.codec.kernels import kernels

    def run(fn, *args):
        before = kernels().portable(True)
        try:
            return fn(*args)
        finally:
            kernels().portable(before)

    encode, decode = pair
    return (lambda t: run(encode, t)), (lambda data, out: run(decode, data, out))


def baselines() -> dict[str, tuple[Encoder, Decoder] | str]:
    """name -> (encode, decode), or the reason it cannot run here."""
    import zstandard

    found: dict[str, tuple[Encoder, Decoder] | str] = {
        "zstd-3": (lambda t: zstandard.ZstdCompressor(level=3).compress(raw_bytes(t)),
                   lambda d, out: fill(out, zstandard.ZstdDecompressor().decompress(d))),
        "zstd-19": (lambda t: zstandard.ZstdCompressor(level=19).compress(raw_bytes(t)),
                    lambda d, out: fill(out, zstandard.ZstdDecompressor().decompress(d))),
        "gzip-6": (lambda t: zlib.compress(raw_bytes(t), 6), lambda d, out: fill(out, zlib.decompress(d))),
    }
    try:
        import lz4.frame

        found["lz4"] = (lambda t: lz4.frame.compress(raw_bytes(t)), lambda d, out: fill(out, lz4.frame.decompress(d)))
    except ImportError:
        found["lz4"] = "not installed"
    try:
        import blosc2

        blosc2.set_nthreads(1)
        found["blosc2 shuffle+zstd"] = (
            lambda t: blosc2.compress2(bytes(raw_bytes(t)), typesize=t.element_size(), clevel=5,
                                       codec=blosc2.Codec.ZSTD, filters=[blosc2.Filter.SHUFFLE]),
            lambda d, out: fill(out, blosc2.decompress2(d)))
    except ImportError:
        found["blosc2 shuffle+zstd"] = "not installed"
    found["pcodec"] = pcodec_codec()
    found["zipnn"] = zipnn_codec()
    return found


def pcodec_codec() -> tuple[Encoder, Decoder] | str:
    """pcodec on the numbers: float32 as floats; bfloat16 upcast to float32 (exact), decoded and cast back."""
    try:
        from pcodec import ChunkConfig, standalone
    except ImportError:
        return "not installed"

    def enc(t):
        return standalone.simple_compress(t.float().reshape(-1).numpy(), ChunkConfig())

    def dec(d, out):
        out.reshape(-1).copy_(torch.from_numpy(standalone.simple_decompress(d)).to(out.dtype))

    return enc, dec


def zipnn_codec() -> tuple[Encoder, Decoder] | str:
    try:
        from zipnn import ZipNN
    except ImportError:
        return "not installed"
    coders: dict[torch.dtype, object] = {}

    def coder(dtype):
        if dtype not in coders:
            coders[dtype] = ZipNN(input_format="byte", bytearray_dtype=str(dtype).removeprefix("torch."), threads=1)
        return coders[dtype]

    # zipnn 0.5 modifies the buffer given to compress() in place, even bytes: always hand it a copy
    return (lambda t: coder(t.dtype).compress(bytearray(raw_bytes(t))),
            lambda d, out: fill(out, coder(out.dtype).decompress(d)))


def rotate_left(u: np.ndarray) -> np.ndarray:
    bits = u.dtype.itemsize * 8
    return (u << u.dtype.type(1)) | (u >> u.dtype.type(bits - 1))


def codecs_to_measure(only: str) -> dict[str, tuple[Encoder, Decoder] | str]:
    found: dict[str, tuple[Encoder, Decoder] | str] = {
        "raw": (lambda t: bytes(raw_bytes(t)), lambda d, out: fill(out, d))}
    found.update(baselines())
    found["**kvmart** (format 3, default)"] = kvmart_codec(HuffmanCodec())
    found["kvmart format 3, portable loops (a CPU without BMI2 and AVX2)"] = portable(kvmart_codec(HuffmanCodec()))
    found["kvmart format 3, 1 code per tensor"] = kvmart_codec(HuffmanCodec(max_models=1))
    found["kvmart format 3, no mantissa bit in the symbol"] = kvmart_codec(HuffmanCodec(symbol_mantissa_bits=0))
    found["candidate: format 2 (4 streams, 12-bit symbols; kvmart 0.2, still read)"] = kvmart_codec(
        HuffmanCodec(version=2))
    found.update(candidates())
    return {k: v for k, v in found.items() if not only or any(w in k for w in only.split(","))}


def corpus_ids(model: Model, needed: int, first: str) -> list[int]:
    names = [first] + [n for n in SAMPLES if n != first]
    ids: list[int] = []
    while len(ids) < needed:
        ids += model.tokenize("".join(sample_text(n) for n in names))
    return ids[:needed]


def sample(kv: KV, max_bytes: int) -> dict[str, list[torch.Tensor]]:
    """Keys and values of evenly spaced layers, at most `max_bytes` in all."""
    per_layer = 2 * kv.keys[0].numel() * kv.keys[0].element_size()
    count = max(1, min(kv.num_layers, max_bytes // per_layer))
    layers = sorted({round(i * (kv.num_layers - 1) / max(1, count - 1)) for i in range(count)})
    return {"keys": [kv.keys[i] for i in layers], "values": [kv.values[i] for i in layers]}


@dataclass
class Measured:
    """Ratio, and MB/s of each pass: encode and decode, in CPU and in wall time."""

    ratio: float
    sizes: list[int]  # encoded bytes of each tensor
    encode_cpu: list[float]
    decode_cpu: list[float]
    encode_wall: list[float]
    decode_wall: list[float]


def measure(pair: tuple[Encoder, Decoder], tensors: list[torch.Tensor], repeats: int) -> Measured:
    """Every tensor encoded and decoded `repeats` times, each decode checked bit for bit. CPU time is of this
    process (every codec runs on one thread), so that other work on a shared machine counts less than in wall time.
    The first encode and decode of a tiny slice is untimed: what anything compiles or loads on first use."""
    encode, decode = pair
    warm = tensors[0][..., :8, :].contiguous()
    decode(encode(warm), torch.empty_like(warm))
    raw = sum(t.numel() * t.element_size() for t in tensors) / 1e6
    outs = [torch.empty_like(t) for t in tensors]
    result = Measured(0.0, [], [], [], [], [])
    for _ in range(repeats):
        cpu, wall = time.process_time(), time.perf_counter()
        encoded = [encode(t) for t in tensors]
        result.encode_cpu.append(raw / (time.process_time() - cpu))
        result.encode_wall.append(raw / (time.perf_counter() - wall))
        cpu, wall = time.process_time(), time.perf_counter()
        for data, out in zip(encoded, outs, strict=True):
            decode(data, out)
        result.decode_cpu.append(raw / (time.process_time() - cpu))
        result.decode_wall.append(raw / (time.perf_counter() - wall))
        for t, out in zip(tensors, outs, strict=True):
            if not torch.equal(out.view(_int(out)), t.contiguous().view(_int(t))):
                raise AssertionError("a codec did not decode bit-exactly")
        result.sizes = [len(data) for data in encoded]
        result.ratio = raw * 1e6 / sum(result.sizes)
    return result


def spread(values: list[float]) -> str:
    """min / median / max."""
    return f"{min(values):.0f} / {statistics.median(values):.0f} / {max(values):.0f}"


def _int(t: torch.Tensor) -> torch.dtype:
    return {2: torch.int16, 4: torch.int32}[t.element_size()]


def exponent_bits(tensors: list[torch.Tensor]) -> tuple[float, ...]:
    """Bits per element of the exponent byte, coded with a static model per context (empirical: the models' own
    cost is left out, so many-context figures are optimistic): no context (order-0); the channel; the previous
    token's exponent in the channel; both."""
    totals, count = np.zeros(4), 0
    for t in tensors:
        L, T, D = grid(tuple(t.shape))
        top = rotate_left(as_uint(t.contiguous())).view(np.uint8).reshape(L, T, D, t.element_size())[..., -1]
        e = top.transpose(0, 2, 1).reshape(L * D, T).astype(np.int64)[:, 1:]
        prev = top.transpose(0, 2, 1).reshape(L * D, T).astype(np.int64)[:, :-1]
        channel = np.broadcast_to(np.arange(L * D)[:, None], e.shape)
        for i, context in enumerate((np.zeros_like(e), channel, prev, channel * 256 + prev)):
            totals[i] += _code_bits(e.reshape(-1), context.reshape(-1))
        count += e.size
    return tuple(totals / max(count, 1))


def adaptive_bits(tensors: list[torch.Tensor], symbol_bits: int = 10) -> tuple[float, float]:
    """Bits per symbol (format 3's: the top `symbol_bits` bits) of an adaptive code, its model's cost included
    (counts from zero, each symbol coded with (n_s + 1/2) / (n + A/2) of what came before in its context), with
    contexts: the channel; the channel and the previous token's exponent in it. Unlike exponent_bits, a context
    that only memorizes its few samples pays for it."""
    totals, count = np.zeros(2), 0
    for t in tensors:
        L, T, D = grid(tuple(t.shape))
        u = as_uint(t.contiguous()).astype(np.int64).reshape(L, T, D).transpose(0, 2, 1).reshape(L * D, T)
        bits = 8 * t.element_size()
        symbols, exponent = u >> (bits - symbol_bits), (u >> (bits - 9)) & 0xFF
        previous = np.concatenate([np.zeros((L * D, 1), np.int64), exponent[:, :-1]], axis=1)
        channel = np.broadcast_to(np.arange(L * D)[:, None], u.shape)
        alphabet = len(np.unique(symbols))
        for i, context in enumerate((channel, channel * 256 + previous)):
            totals[i] += _adaptive(context.reshape(-1), symbols.reshape(-1), alphabet)
        count += u.size
    return totals[0] / count, totals[1] / count


def _adaptive(context: np.ndarray, symbols: np.ndarray, alphabet: int) -> float:
    """Total bits of coding `symbols` in order, each with its context's counts of what came before."""
    def seen_before(keys: np.ndarray) -> np.ndarray:  # earlier occurrences of each position's key
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        starts = np.r_[0, np.flatnonzero(sorted_keys[1:] != sorted_keys[:-1]) + 1]
        ranks = np.arange(len(keys)) - np.repeat(starts, np.diff(np.r_[starts, len(keys)]))
        out = np.empty(len(keys), np.int64)
        out[order] = ranks
        return out
    same = seen_before(context * (symbols.max() + 1) + symbols)
    total = seen_before(context)
    return float(-np.log2((same + 0.5) / (total + 0.5 * alphabet)).sum())


def _code_bits(symbols: np.ndarray, context: np.ndarray) -> float:
    """Total bits of `symbols` (bytes) coded with each context's own empirical distribution."""
    values, counts = np.unique(context * 256 + symbols, return_counts=True)
    groups = np.unique(values // 256, return_inverse=True)[1]
    totals = np.bincount(groups, weights=counts)[groups]
    return float(-(counts * np.log2(counts / totals)).sum())


def kv_sets(args) -> Iterator[tuple[str, Model, list[int], KV]]:
    for spec in args.models.split(","):
        for dtype in args.dtypes.split(","):
            settings = load_settings().with_overrides(model=spec, dtype=dtype)
            model = Model.load(settings)
            for length in (int(x) for x in args.lengths.split(",")):
                for doc in args.documents.split(","):
                    ids = corpus_ids(model, length, doc)
                    start = time.perf_counter()
                    kv = model.prefill(ids)
                    label = f"{spec.removeprefix('builtin:')} {dtype} {doc} {length:,} tokens"
                    print(f"\n### {label} (prefill {time.perf_counter() - start:.1f} s)", flush=True)
                    yield label, model, ids, kv
                    del kv
                    gc.collect()
            del model
            gc.collect()


def codec_table(kv: KV, max_bytes: int, found, repeats: int) -> None:
    tensors = sample(kv, max_bytes)
    sampled = sum(t.numel() * t.element_size() for ts in tensors.values() for t in ts)
    print(f"sample: {len(tensors['keys'])} of {kv.num_layers} layers, {sampled / 1e6:.1f} MB; {repeats} passes; "
          "MB/s min / median / max")
    print("| codec | ratio keys | ratio values | ratio all | encode MB/s CPU | decode MB/s CPU | encode MB/s wall "
          "| decode MB/s wall |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, pair in found.items():
        if isinstance(pair, str):
            print(f"| {name} | {pair} | | | | | | |")
            continue
        both = measure(pair, tensors["keys"] + tensors["values"], repeats)
        n = len(tensors["keys"])  # keys and values are the same size
        k = both.ratio * sum(both.sizes) / 2 / sum(both.sizes[:n])
        v = both.ratio * sum(both.sizes) / 2 / sum(both.sizes[n:])
        print(f"| {name} | {k:.3f}x | {v:.3f}x | **{both.ratio:.3f}x** | {spread(both.encode_cpu)} | "
              f"{spread(both.decode_cpu)} | {spread(both.encode_wall)} | {spread(both.decode_wall)} |", flush=True)
    bits = {kind: exponent_bits(ts) for kind, ts in tensors.items()}
    print("exponent bits per element, static model per context (order-0 / channel / previous token's exponent / "
          "both): " + "; ".join(f"{kind} {' / '.join(f'{x:.2f}' for x in b)}" for kind, b in bits.items()))
    adaptive = {kind: adaptive_bits(ts[::max(1, len(ts) // 4)]) for kind, ts in tensors.items()}
    print("bits per 10-bit symbol, adaptive (the model's cost paid), context: channel / channel and previous token's "
          "exponent: " + "; ".join(f"{kind} {a:.3f} / {b:.3f}" for kind, (a, b) in adaptive.items()))


def load_table(model: Model, ids: list[int], kv: KV, repeats: int, codecs: list[str], bandwidth: float) -> None:
    print(f"| artifact codec | bytes/token | vs raw | warm load CPU s | warm load wall s | at {bandwidth:g} GB/s s "
          "(read + warm load CPU) |")
    print("|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(dir=load_settings().data_dir) as tmp:
        for name in codecs:
            store = open_store(str(Path(tmp) / name.replace(":", "-")))
            artifact = encode_artifact(kv, ids, model.fingerprint, codec=name)
            entry = store.put(Entry(artifact.manifest.cache_id, "bench", "", model.spec, model.fingerprint.digest,
                                    len(ids), artifact.nbytes, 0.0, time.time()), artifact.write)
            path = store.object_path(entry.cache_id)
            path.read_bytes()  # in the page cache
            times, walls = [], []
            for _ in range(repeats + 1):  # the first load compiles the decoder: not counted
                start, wall = time.process_time(), time.perf_counter()
                loaded = core.load(model, store, entry.cache_id)
                times.append(time.process_time() - start)
                walls.append(time.perf_counter() - wall)
                del loaded
            warm, warm_wall = statistics.median(times[1:]), statistics.median(walls[1:])
            if name == "raw":
                raw_bytes_, raw_warm = entry.artifact_bytes, warm
            # the warm load of a raw artifact is a mapping (no copy): reading it at B GB/s costs bytes / B; a
            # compressed one costs its own bytes / B plus its decode (warm load minus the raw load's checks)
            read_s = entry.artifact_bytes / (bandwidth * 1e9)
            decode_s = 0.0 if name == "raw" else max(0.0, warm - raw_warm)
            print(f"| {name} | {entry.artifact_bytes / len(ids):,.0f} | {raw_bytes_ / entry.artifact_bytes:.3f}x | "
                  f"{warm:.3f} | {warm_wall:.3f} | {read_s + decode_s + raw_warm:.3f} |", flush=True)
            store.delete(entry.cache_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="builtin:smollm2-135m,builtin:qwen3-0.6b-shape")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--lengths", default="2048")
    parser.add_argument("--documents", default="mpl-2.0", help=f"first sample of the text: {', '.join(SAMPLES)}")
    parser.add_argument("--sample-mb", type=float, default=1e6, help="raw MB of KV per codec measurement (default: "
                        "all layers)")
    parser.add_argument("--codecs", default="", help="only the codecs whose names contain one of these words (comma-"
                        "separated), e.g. kvmart,zipnn")
    parser.add_argument("--no-loads", action="store_true", help="skip the whole-artifact load table")
    parser.add_argument("--load-codecs", default="raw,zstd,kvmart", help="codecs for the whole-artifact loads")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bandwidth", type=float, default=1.0, help="simulated read bandwidth, GB/s")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for prefill (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    found = codecs_to_measure(args.codecs)
    for _label, model, ids, kv in kv_sets(args):
        codec_table(kv, int(args.sample_mb * 1e6), found, args.repeats)
        if not args.no_loads:
            load_table(model, ids, kv, args.repeats, args.load_codecs.split(","), args.bandwidth)


if __name__ == "__main__":
    main()
