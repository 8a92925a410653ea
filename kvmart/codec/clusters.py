"""Channel clustering for the `kvmart` codec: channels whose symbols follow one distribution share one model.

A KV tensor's channels (per head and head_dim index) differ: keys have outlier channels whose exponent and sign
hardly vary, while most channels spread over a few binades. One model per channel would cost more in model bytes
than it saves; one per tensor wastes bits. So channels are clustered by their symbol histograms (a few k-means
steps on code length), and the number of clusters (1, 2, 4, ... up to `max_models`) is chosen by estimated coded
size, model bytes included. Pure numpy over [channels, symbols] histograms: a few milliseconds per tensor."""

from __future__ import annotations

import numpy as np

KMEANS_STEPS = 8
MODEL_OVERHEAD_BYTES = 48  # one model's frequencies in the side block, roughly
MIN_SYMBOLS_PER_MODEL = 4096  # fewer symbols than this cannot pay for a model of their own


def code_bits(hist: np.ndarray, labels: np.ndarray, groups: int) -> tuple[np.ndarray, float]:
    """(cost [C, groups] in bits of coding each channel with each group's distribution, total bits as assigned)."""
    counts = (labels[None, :] == np.arange(groups)[:, None]).astype(np.float64) @ hist
    probs = (counts + 1e-3) / (counts + 1e-3).sum(axis=1, keepdims=True)
    cost = -hist @ np.log2(probs).T
    return cost, float(cost[np.arange(len(labels)), labels].sum())


def kmeans(hist: np.ndarray, groups: int) -> tuple[np.ndarray, float]:
    """Channels clustered into `groups` by the code length of their histograms; (labels, estimated bits).
    Starts from the channels ranked by mean symbol, so that the result is deterministic."""
    mean = (hist @ np.arange(hist.shape[1])) / np.maximum(hist.sum(axis=1), 1)
    labels = np.minimum((np.argsort(np.argsort(mean, kind="stable")) * groups) // len(mean), groups - 1)
    cost, bits = code_bits(hist, labels, groups)
    for _ in range(KMEANS_STEPS):
        new = cost.argmin(axis=1)
        if np.array_equal(new, labels):
            break
        labels = new
        cost, bits = code_bits(hist, labels, groups)
    return labels, bits


def cluster(hist: np.ndarray, max_models: int) -> np.ndarray:
    """The model (0 .. K-1, every one used) of each channel, a row of `hist` [C, symbols] (float64 counts)."""
    channels = hist.shape[0]
    limit = min(max_models, channels, max(1, int(hist.sum()) // MIN_SYMBOLS_PER_MODEL))
    best = np.zeros(channels, dtype=np.int64)
    best_bytes = code_bits(hist, best, 1)[1] / 8 + MODEL_OVERHEAD_BYTES
    groups = 2
    while groups <= limit:
        labels, bits = kmeans(hist, groups)
        used = len(np.unique(labels))
        if bits / 8 + used * MODEL_OVERHEAD_BYTES + channels < best_bytes:
            best = np.unique(labels, return_inverse=True)[1]
            best_bytes = bits / 8 + used * MODEL_OVERHEAD_BYTES + channels
        groups *= 2
    return best
