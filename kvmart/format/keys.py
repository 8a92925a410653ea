"""Identity of stored KV. A whole token sequence's cache id (`cache_id`), and prefix-chunk keys: a token sequence
cut into fixed-size chunks, each keyed by a hash chain, as vLLM's and LMCache's prefix caches do.

    key_0 = H("kvmart-chunk-v1", "",    fingerprint, salt, ids[0:C])
    key_i = H("kvmart-chunk-v1", key_{i-1}, fingerprint, salt, ids[i*C:(i+1)*C])

A chunk's KV depends on every token before it, and so does its key: two sequences share key_i exactly when their
first (i+1)*C ids are equal, under the same model (fingerprint) and tenant (salt: empty for public documents, set
by the server from the authenticated account for private ones, never by a client). Only full chunks get keys."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

from kvmart.canonical import canonical
from kvmart.config import CHUNK_ALIGN_TOKENS
from kvmart.errors import InvalidIdError

ALIGN_TOKENS = CHUNK_ALIGN_TOKENS  # chunk sizes are multiples of this (vector-friendly shapes)
DEFAULT_CHUNK_TOKENS = 256
CACHE_ID_HEX_DIGITS = 64  # a sha256, as `cache_id` and `chain_key` write it
_CACHE_ID = re.compile(f"[0-9a-f]{{{CACHE_ID_HEX_DIGITS}}}")


def parse_cache_id(value: object, where: str = "cache id") -> str:
    """`value` if it is a cache id (exactly 64 lowercase hex digits, what `cache_id` and `chain_key` make);
    InvalidIdError otherwise. The one parser for ids crossing a boundary: every store runs an id through it before
    building a file name or a key from it, and a shared tier's index is refused when its ids fail it, so an id
    read from outside (`..`, `/`, a NUL, a prefix) is never a path."""
    if isinstance(value, str) and _CACHE_ID.fullmatch(value):
        return value
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    raise InvalidIdError(f"{where} {shown} is not a cache id ({CACHE_ID_HEX_DIGITS} lowercase hex digits)")


def is_cache_id(value: object) -> bool:
    """Whether `value` passes `parse_cache_id` (a cache id or a chunk's chain key: both are 64 hex digits)."""
    return isinstance(value, str) and _CACHE_ID.fullmatch(value) is not None


def check_chunk_tokens(chunk_tokens: int) -> int:
    if chunk_tokens < ALIGN_TOKENS or chunk_tokens % ALIGN_TOKENS:
        raise ValueError(f"chunk size {chunk_tokens} must be a positive multiple of {ALIGN_TOKENS} tokens")
    return chunk_tokens


def chain_key(parent_key: str, fingerprint_digest: str, salt: str, chunk_ids: list[int]) -> str:
    h = hashlib.sha256()
    for part in (b"kvmart-chunk-v1", parent_key.encode(), fingerprint_digest.encode(), salt.encode()):
        h.update(part)
        h.update(b"\0")
    h.update(canonical(chunk_ids))
    return h.hexdigest()


def chunk_keys(fingerprint_digest: str, token_ids: list[int], chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
               salt: str = "") -> list[str]:
    """One key per full chunk of `token_ids`, in order."""
    check_chunk_tokens(chunk_tokens)
    full = len(token_ids) // chunk_tokens * chunk_tokens
    return chain_keys(fingerprint_digest, [token_ids[s:s + chunk_tokens] for s in range(0, full, chunk_tokens)], salt)


def chain_keys(fingerprint_digest: str, chunks: Sequence[Sequence[int]], salt: str = "", parent: str = ""
               ) -> list[str]:
    """The chained keys of consecutive chunks (of any lengths), continuing the chain after `parent`."""
    keys = []
    for ids in chunks:
        parent = chain_key(parent, fingerprint_digest, salt, list(ids))
        keys.append(parent)
    return keys


def cache_id(fingerprint_digest: str, token_ids: list[int], salt: str = "", terms: str = "") -> str:
    """The content address of a document (or of a whole-sequence KV artifact): sha256 over the model fingerprint,
    the token ids, an optional tenant salt (set by the server from the authenticated account, never by a client) and
    the document's licence terms in canonical form (kvmart.ledger.Terms.canonical; empty for a public document with
    no price, which keeps every such id what it was before terms were part of it). A document republished under
    other terms is another document, with another id; its chunks (chained keys, which hold no terms) are shared."""
    h = hashlib.sha256()
    h.update(b"kvmart-cache-v1\0")
    h.update(fingerprint_digest.encode())
    h.update(b"\0")
    h.update(salt.encode())
    h.update(b"\0")
    h.update(canonical(list(token_ids)))  # "[1,2,3]": docs/FORMAT.md "Cache id"
    if terms:
        h.update(b"\0terms\0")
        h.update(terms.encode())
    return h.hexdigest()
