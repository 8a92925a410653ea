"""Channel clustering for the `kvmart` codec: channels whose symbols follow one distribution share one model.

A KV tensor's channels (per head and head_dim index) differ: keys have outlier channels whose exponent and sign
hardly vary, while most channels spread over a few binades. One model per channel would cost more in model bytes
than it saves; one per tensor wastes bits. So channels are clustered by their symbol histograms (a few k-means
steps on code length), and the number of clusters (1, 2, 4, ... up to `max_models`) is chosen by estimated coded
size, model bytes included. Over [channels, symbols] histograms: a fraction of a millisecond per tensor."""

from __future__ import annotations

import numpy as np

from kvmart.codec.kernels import kernels

KMEANS_STEPS = 8
MODEL_OVERHEAD_BYTES = 48  # one model's frequencies in the side block, roughly
MIN_SYMBOLS_PER_MODEL = 4096  # fewer symbols than this cannot pay for a model of their own
NEGLIGIBLE = 0.002  # model bytes below this share of a tensor's size are not worth another k-means run


def code_bits(hist: np.ndarray, labels: np.ndarray, groups: int) -> tuple[np.ndarray, float]:
    """(cost [C, groups] in bits of coding each channel with each group's distribution, total bits as assigned)."""
    counts = (labels[None, :] == np.arange(groups)[:, None]).astype(np.float64) @ hist
    probs = (counts + 1e-3) / (counts + 1e-3).sum(axis=1, keepdims=True)
    cost = -hist @ np.log2(probs).T
    return cost, float(cost[np.arange(len(labels)), labels].sum())


def kmeans(hist: np.ndarray, groups: int) -> tuple[np.ndarray, float]:
    """Channels clustered into `groups` by the code length of their histograms; (labels, estimated bits).
    Starts from the channels ranked by mean symbol, so that the result is deterministic. The loop is compiled
    (kvmart/codec/csrc/clusters.c); code_bits above is what each step computes."""
    labels = np.zeros(hist.shape[0], dtype=np.int64)
    bits = kernels().kmeans(np.ascontiguousarray(hist, dtype=np.float64), hist.shape[0], hist.shape[1], groups,
                            KMEANS_STEPS, labels)
    return labels, bits


def cluster(hist: np.ndarray, max_models: int) -> np.ndarray:
    """The model (0 .. K-1, every one used) of each channel, a row of `hist` [C, symbols] (float64 counts).
    k-means with as many clusters as the symbols can pay for (the largest power of two up to `max_models`), then
    with half as many, and so on while the estimated coded size, model bytes included, keeps shrinking, and the
    model bytes halving could save are a noticeable share of it: on real KV, one run (docs/BENCHMARKS.md)."""
    channels = hist.shape[0]
    limit = min(max_models, channels, max(1, int(hist.sum()) // MIN_SYMBOLS_PER_MODEL))
    best, best_bytes = np.zeros(channels, dtype=np.int64), float("inf")
    groups = 1 << (limit.bit_length() - 1)
    while groups >= 1:
        labels, bits = kmeans(hist, groups)
        used = np.unique(labels, return_inverse=True)
        size = bits / 8 + len(used[0]) * MODEL_OVERHEAD_BYTES + (channels if len(used[0]) > 1 else 0)
        if size >= best_bytes:
            break
        best, best_bytes = used[1].astype(np.int64), size
        # fewer clusters code no better; they can only save model bytes, and not enough to matter here
        if (groups // 2) * MODEL_OVERHEAD_BYTES + channels < NEGLIGIBLE * size:
            break
        groups //= 2
    return best
