"""The document catalogue: the store's artifacts for the loaded model, by document id, with their token ids in RAM
so that any request's prompt can be matched against every stored prefix.

A document id is `doc_` + the first 24 hex digits of its cache id: stable, so the CLI and the server (one store)
agree on it, and publishing the same text twice gives the same id. Matching is on token ids: the longest common
prefix of a prompt with any stored document. The first k positions of a longer document's KV are a valid prefix
KV (attention is causal: position i never saw a later token). They are not bit-identical to prefilling those k
tokens alone (the matrix shapes differ, so rounding does), which is why `"cache": "bypass"` prefills the whole
matched document and slices it, computing exactly what the cached path reuses."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import torch

from kvmart.errors import ArtifactError, UnknownDocumentError
from kvmart.format.artifact import check_requested, read_manifest
from kvmart.store import Entry, Store

log = logging.getLogger("kvmart.server")
ID_PREFIX = "doc_"
ID_HEX_DIGITS = 24


def document_id(cache_id: str) -> str:
    return ID_PREFIX + cache_id[:ID_HEX_DIGITS]


# The private documents a caller may read (cache ids), or None: every document (the admin; no ledger). A document
# made with a tenant salt is private: visible only to callers whose set holds it, so a salted artifact is hidden
# from everyone by default, even before (or without) its licence.
Readable = frozenset[str] | None


@dataclass(frozen=True)
class Document:
    entry: Entry
    token_ids: torch.Tensor  # int64, 1-D: the artifact's token ids
    is_salted: bool = False  # made with a tenant salt: a private document

    def visible_to(self, readable: Readable) -> bool:
        return readable is None or not self.is_salted or self.cache_id in readable

    @property
    def id(self) -> str:
        return document_id(self.entry.cache_id)

    @property
    def cache_id(self) -> str:
        return self.entry.cache_id

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def token_list(self) -> list[int]:
        return self.token_ids.tolist()


@dataclass(frozen=True)
class Match:
    document: Document
    num_tokens: int  # the prompt's first num_tokens ids equal the document's


def common_prefix_tokens(a: torch.Tensor, b: torch.Tensor) -> int:
    """Length of the longest common prefix of two 1-D id tensors."""
    n = min(len(a), len(b))
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0, 0]) if len(differ) else n


class Catalog:
    """Thread-safe. Holds every artifact of the store made by the model with fingerprint `fingerprint_digest`.
    Artifacts written by other processes (the CLI) appear at the next `refresh`, which `get` and listing do."""

    def __init__(self, store: Store, fingerprint_digest: str) -> None:
        self.store, self.fingerprint_digest = store, fingerprint_digest
        self._lock = threading.Lock()
        self._documents: dict[str, Document] = {}  # by document id

    def refresh(self) -> None:
        """Pick up artifacts added or removed by anyone since the last look."""
        entries = {document_id(e.cache_id): e for e in self.store.entries() if e.fingerprint == self.fingerprint_digest}
        with self._lock:
            for gone in set(self._documents) - set(entries):
                del self._documents[gone]
            known = set(self._documents)
        for doc_id, entry in entries.items():
            if doc_id not in known:
                self._add_readable(entry)

    def add(self, entry: Entry) -> Document:
        """Register a stored artifact (its token ids come from its manifest)."""
        with self.store.open_head(entry.cache_id) as (f, size):  # the header only: no tensors are fetched
            manifest, _ = read_manifest(f, size)
        check_requested(manifest, entry.cache_id)
        document = Document(entry, torch.tensor(manifest.token_ids, dtype=torch.int64), bool(manifest.salt_hash))
        with self._lock:
            self._documents[document.id] = document
        return document

    def _add_readable(self, entry: Entry) -> None:
        try:
            self.add(entry)
        except ArtifactError as e:  # one bad artifact must not hide the others; loading it would refuse it too
            log.warning("skipping artifact %s: %s", entry.cache_id[:16], e)

    def remove(self, doc_id: str) -> None:
        with self._lock:
            self._documents.pop(doc_id, None)

    def get(self, doc_id: str, readable: Readable = None) -> Document:
        """The document `doc_id`; UnknownDocumentError if neither the catalogue nor the store has it, or if it is
        private and not `readable` by the caller (another tenant's: the same 404)."""
        with self._lock:
            found = self._documents.get(doc_id)
        if found is None:
            self.refresh()
            with self._lock:
                found = self._documents.get(doc_id)
        if found is None or not found.visible_to(readable):
            raise UnknownDocumentError(doc_id)
        return found

    def documents(self, readable: Readable = None) -> list[Document]:
        """Every document the caller may see, newest first."""
        with self._lock:
            docs = [d for d in self._documents.values() if d.visible_to(readable)]
        return sorted(docs, key=lambda d: (-d.entry.created_at, d.id))

    def longest_prefix(self, token_ids: list[int], min_tokens: int, readable: Readable = None) -> Match | None:
        """The document sharing the longest prefix with `token_ids`, if at least `min_tokens` long, among those the
        caller may see (so another tenant's private cache is never reused, nor its existence revealed by a
        cache hit). Ties go to the shorter document (less to load), then to the smaller id."""
        ids = torch.tensor(token_ids, dtype=torch.int64)
        with self._lock:
            docs = [d for d in self._documents.values() if d.visible_to(readable)]
        matches = [Match(doc, common_prefix_tokens(ids, doc.token_ids)) for doc in docs]
        usable = [m for m in matches if m.num_tokens >= max(min_tokens, 1)]
        return min(usable, key=lambda m: (-m.num_tokens, m.document.num_tokens, m.document.id), default=None)
