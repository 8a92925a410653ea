"""Artifacts a publisher computed and uploads (rather than the provider prefilling the text itself), and why the
provider can trust them: an uploaded artifact is accepted only if its KV is what the loaded model computes for
the document's tokens, checked bit for bit.

The contract: the publisher computes the KV by *chunked prefill* with the provider's `chunk_tokens`, exactly as
the provider stores documents (kvmart/reuse/chunks.py: chunk 0 prefilled, each next chunk, the last partial one
included, continued from the chunks before it, held as separate pieces; `compute_upload`), and uploads their
concatenation. Then chunk i's KV is a function of the tokens and of chunks 0..i-1 only, so the provider can
recompute any chunk alone from the uploaded prefix and compare it with `torch.equal` (docs/SCALE.md "Exactness").
A sample of chunks (chunk 0 always, so a KV of another text is caught) or all of them are recomputed. Checking
chunk i against the uploaded prefix proves the chain link by link: with every chunk checked, the whole KV is
exactly the model's; with a sample, a forgery confined to unchecked chunks escapes with the probability of not
being drawn (docs/SECURITY.md).

The default sample (`plan(num_chunks, None)`) is the smallest that meets a stated bound: of the N chunks after
chunk 0, m are drawn uniformly so that a forgery touching at least FORGED_SHARE of them (at least one) escapes with
probability at most ESCAPE_BOUND, the hypergeometric C(N-K, m) / C(N, m) with K = max(1, ceil(FORGED_SHARE N)).
A short document needs every chunk for that (up to N = 10 the bound asks for all of them); a long one a
shrinking share (m tends to ln(1/ESCAPE_BOUND) / FORGED_SHARE, about 66 chunks). A forgery of one chunk escapes with
probability (N - m) / N; both figures are recorded on the document (`CheckPlan`)."""

from __future__ import annotations

import io
import math
import os
import random
from dataclasses import dataclass
from typing import BinaryIO

import torch

from kvmart.errors import ArtifactError, ArtifactRejectedError, ForgedArtifactError
from kvmart.format.artifact import manifest_for, read_artifact, write_artifact
from kvmart.runtime.kv import KV, Prefix
from kvmart.runtime.model import Model

FORGED_SHARE = 0.1  # a forgery touching at least this share of the chunks after chunk 0...
ESCAPE_BOUND = 0.001  # ...escapes the default sample with at most this probability


def escape_probability(others: int, forged: int, checked: int) -> float:
    """The chance that none of `forged` chunks is among `checked` drawn uniformly from `others`."""
    if checked > others - forged:
        return 0.0
    return math.comb(others - forged, checked) / math.comb(others, checked)


def checks_for_bound(others: int, forged_share: float = FORGED_SHARE, bound: float = ESCAPE_BOUND) -> int:
    """The fewest of `others` chunks to draw so that a forgery of max(1, ceil(forged_share * others)) of them
    escapes with probability at most `bound`."""
    forged = max(1, math.ceil(forged_share * others))
    return next((m for m in range(others + 1) if escape_probability(others, forged, m) <= bound), others)


@dataclass(frozen=True)
class CheckPlan:
    """How much of an upload is recomputed: chunk 0 and `checked_others` of the `num_chunks - 1` others, and what
    that buys. `percent` None: the stated bound chose the count; else the operator's share."""

    num_chunks: int
    checked_others: int
    percent: int | None
    forged_share: float = FORGED_SHARE
    escape_bound: float = ESCAPE_BOUND

    @property
    def checked_chunks(self) -> int:
        return 1 + self.checked_others if self.num_chunks else 0

    @property
    def forgery_escape(self) -> float:
        """The chance a forgery touching forged_share of the chunks after chunk 0 escapes."""
        others = self.num_chunks - 1
        return escape_probability(others, max(1, math.ceil(self.forged_share * others)), self.checked_others) \
            if others > 0 else 0.0

    @property
    def single_chunk_escape(self) -> float:
        """The chance a forgery of one chunk after chunk 0 escapes."""
        others = self.num_chunks - 1
        return (others - self.checked_others) / others if others > 0 else 0.0

    def as_json(self) -> dict:
        return {"chunks": self.num_chunks, "checked_chunks": self.checked_chunks,
                "checked_share": round(self.checked_chunks / self.num_chunks, 6) if self.num_chunks else 1.0,
                "rule": "bound" if self.percent is None else f"{self.percent}% of the chunks after chunk 0",
                "forged_share": self.forged_share, "escape_bound": self.escape_bound,
                "forgery_escape": self.forgery_escape, "single_chunk_escape": self.single_chunk_escape}


def plan(num_chunks: int, percent: int | None) -> CheckPlan:
    """The check of an upload of `num_chunks` chunks: by the stated bound (`percent` None), or chunk 0 and
    `percent` of the others (at least one, if there is one)."""
    others = max(0, num_chunks - 1)
    if percent is None:
        return CheckPlan(num_chunks, checks_for_bound(others), None)
    return CheckPlan(num_chunks, min(others, max(1 if others else 0, round(others * percent / 100))), percent)


@dataclass(frozen=True)
class Verified:
    pieces: Prefix  # the uploaded KV cut into its chunks, as the store keeps them
    chunks: int
    checked: tuple[int, ...]  # the chunk indices recomputed and found equal
    plan: CheckPlan | None = None


def chunk_spans(num_tokens: int, chunk_tokens: int) -> list[tuple[int, int]]:
    """[start, end) of each chunk, the last one partial."""
    return [(s, min(s + chunk_tokens, num_tokens)) for s in range(0, num_tokens, chunk_tokens)]


def upload_prefill(model: Model, token_ids: list[int], chunk_tokens: int) -> KV:
    """The KV an uploaded artifact must hold: chunked prefill of every chunk, the last partial one included."""
    spans = chunk_spans(len(token_ids), chunk_tokens)
    return KV.concat(list(model.prefill_pieces([list(token_ids[s:e]) for s, e in spans])))


def compute_upload(model: Model, token_ids: list[int], chunk_tokens: int) -> bytes:
    """What a publisher uploads for `token_ids` (unsalted: the provider stores it under its own tenant salt)."""
    kv = upload_prefill(model, token_ids, chunk_tokens)
    buffer = io.BytesIO()
    write_artifact(buffer, manifest_for(kv, token_ids, model.fingerprint), kv)
    return buffer.getvalue()


def sample_chunks(num_chunks: int, percent: int | None, rng: random.Random) -> list[int]:
    """Chunk 0 and a random sample of the others, as `plan` counts them, in order."""
    return [0, *sorted(rng.sample(range(1, num_chunks), plan(num_chunks, percent).checked_others))]


def upload_size(data: bytes | BinaryIO) -> int:
    """The size of an uploaded artifact: bytes, or an open file (a large upload, spooled to disk)."""
    return len(data) if isinstance(data, bytes) else os.fstat(data.fileno()).st_size


def verify_upload(model: Model, data: bytes | BinaryIO, token_ids: list[int], chunk_tokens: int,
                  percent: int | None = 100, rng: random.Random | None = None) -> Verified:
    """The uploaded artifact's KV if it is the model's KV of exactly `token_ids`; ArtifactRejectedError saying why
    otherwise (never a partial acceptance). `percent` None: the sample the stated bound asks for (`plan`). `data`:
    the artifact's bytes, or an open file holding them (read in place, mapped: a large upload is never copied into
    memory)."""
    try:
        source = io.BytesIO(data) if isinstance(data, bytes) else data
        source.seek(0)
        manifest, kv = read_artifact(source, upload_size(data), model.fingerprint)
    except ArtifactError as e:
        raise ArtifactRejectedError(f"the uploaded artifact was refused: {e}") from e
    if manifest.token_ids != list(token_ids):
        raise ArtifactRejectedError(
            f"the uploaded artifact holds the KV of other tokens than this document ({manifest.num_tokens:,} "
            f"tokens; the text tokenizes to {len(token_ids):,}, first difference at position "
            f"{_first_difference(manifest.token_ids, token_ids):,})")
    spans = chunk_spans(len(token_ids), chunk_tokens)
    pieces = tuple(kv.slice(start, end) for start, end in spans)
    checked = sample_chunks(len(spans), percent, rng or random.SystemRandom())
    for index in checked:
        start, end = spans[index]
        chunk = list(token_ids[start:end])
        recomputed = model.continue_from(pieces[:index], chunk).new_kv
        if not _equal(recomputed, pieces[index]):
            raise ForgedArtifactError(
                f"the uploaded artifact's KV is not what {model.spec} computes for this document: chunk {index} "
                f"(tokens {start:,}-{end:,}) differs when recomputed (chunked prefill of {chunk_tokens} tokens; "
                "a KV of another text, other weights or a tampered file)")
    return Verified(pieces, len(spans), tuple(checked), plan(len(spans), percent))


def _equal(a: KV, b: KV) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.keys + a.values, b.keys + b.values, strict=True))


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
