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
being drawn (docs/SECURITY.md)."""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

import torch

from kvmart.errors import ArtifactError, ArtifactRejectedError
from kvmart.format.artifact import manifest_for, read_artifact, write_artifact
from kvmart.runtime.kv import KV, Prefix
from kvmart.runtime.model import Model


@dataclass(frozen=True)
class Verified:
    pieces: Prefix  # the uploaded KV cut into its chunks, as the store keeps them
    chunks: int
    checked: tuple[int, ...]  # the chunk indices recomputed and found equal


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


def sample_chunks(num_chunks: int, percent: int, rng: random.Random) -> list[int]:
    """Chunk 0 and a random `percent` share of the others (at least one more, if there is one), in order."""
    others = list(range(1, num_chunks))
    count = min(len(others), max(1 if others else 0, round(len(others) * percent / 100)))
    return [0, *sorted(rng.sample(others, count))]


def verify_upload(model: Model, data: bytes, token_ids: list[int], chunk_tokens: int, percent: int = 100,
                  rng: random.Random | None = None) -> Verified:
    """The uploaded artifact's KV if it is the model's KV of exactly `token_ids`; ArtifactRejectedError saying why
    otherwise (never a partial acceptance)."""
    try:
        manifest, kv = read_artifact(io.BytesIO(data), len(data), model.fingerprint)
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
            raise ArtifactRejectedError(
                f"the uploaded artifact's KV is not what {model.spec} computes for this document: chunk {index} "
                f"(tokens {start:,}-{end:,}) differs when recomputed (chunked prefill of {chunk_tokens} tokens; "
                "a KV of another text, other weights or a tampered file)")
    return Verified(pieces, len(spans), tuple(checked))


def _equal(a: KV, b: KV) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.keys + a.values, b.keys + b.values, strict=True))


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
