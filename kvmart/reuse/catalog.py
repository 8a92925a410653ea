"""The document catalogue: the store's documents for the loaded model, by document id, each with its token ids and
the chunks its KV is stored as (its index, kvmart/format/artifact.py), so that requests naming a document are laid
out without touching the store.

A document id is `doc_` + the first 24 hex digits of its cache id: stable, so the CLI and the server (one store)
agree on it, and publishing the same text under the same terms twice gives the same id (the terms are part of the
cache id: republished under other terms, a document gets a new id).

The catalogue learns of documents published elsewhere (the CLI, other nodes) by `refresh`, which a timer runs
(`start_refresher`), never a request: a request naming an unknown id is a 404 at once. A refresh asks the store what
changed since the last one (`Store.changes`: on Redis one small reply when nothing did) and reads only the documents
that changed; it lists every entry only when the store cannot tell (no change log, the first look, a log it fell
behind), so a node polling often costs its shared tier almost nothing however large the catalogue. A request naming
a known document checks that it is still stored (`still_stored`, one lookup, this node's tiers first): a deletion
through this node's store is seen at once; one on another node at this node's next refresh, when the change log
names it and a tiered store drops its local copies (kvmart/store/tiered.py).
Documents pasted into a prompt without being named are found by `pasted_at_start`: one lookup by the key of the
prompt's first chunk, whatever the catalogue's size."""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass

import torch

from kvmart.errors import ArtifactError, UnknownCacheError, UnknownDocumentError
from kvmart.format.artifact import check_requested, read_manifest
from kvmart.format.keys import chain_key
from kvmart.store import Entry, Store

log = logging.getLogger("kvmart.catalog")
ID_PREFIX = "doc_"
ID_HEX_DIGITS = 24
# an artifact up to this size is read whole when registered (an index: token ids and chunk keys, about 1 KB per 100
# tokens); a head read moves about as much (Redis' first value holds up to 8 MiB)
WHOLE_READ_BYTES = 4 << 20


def document_id(cache_id: str) -> str:
    return ID_PREFIX + cache_id[:ID_HEX_DIGITS]


# The private documents a caller may read (cache ids), or None: every document (the admin; no ledger). A document
# made with a tenant salt is private: visible only to callers whose set holds it, so a salted artifact is hidden
# from everyone by default, even before (or without) its licence.
Readable = frozenset[str] | None


@dataclass(frozen=True)
class Document:
    entry: Entry
    token_ids: torch.Tensor  # int64, 1-D: the document's token ids
    chunks: tuple[tuple[int, str], ...]  # (tokens, chained key) of each chunk; a whole artifact: (all, its cache id)
    is_salted: bool = False  # made with a tenant salt: a private document
    terms: str = ""  # the licence terms it was published under (canonical; part of its cache id)

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
    """Thread-safe. Holds every document of the store made by the model with fingerprint `fingerprint_digest`."""

    def __init__(self, store: Store, fingerprint_digest: str) -> None:
        self.store, self.fingerprint_digest = store, fingerprint_digest
        self._lock = threading.Lock()
        self._documents: dict[str, Document] = {}  # by document id
        self._by_first_chunk: dict[str, list[Document]] = {}  # public documents by their first chunk's key
        self._first_lengths: Counter[int] = Counter()  # how many of those have a first chunk of each length
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._refreshing = threading.Lock()  # one refresh at a time: they share the cursor
        self._cursor = ""  # where the store's change log was at the last refresh ('' : never looked)

    # -- learning what is stored ---------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Pick up documents added or removed by anyone since the last look: those the store's change log names
        (each read once), or, when the store cannot tell, one listing of every entry."""
        with self._refreshing:
            changes = self.store.changes(self._cursor)  # before any listing: what changes meanwhile is seen next time
            if changes.cache_ids is None:
                self._relist()
            else:
                for cache_id in dict.fromkeys(changes.cache_ids):
                    self._recheck(cache_id)
            self._cursor = changes.cursor

    def _relist(self) -> None:
        entries = {document_id(e.cache_id): e for e in self.store.entries()
                   if e.is_document and e.fingerprint == self.fingerprint_digest}
        with self._lock:
            gone = set(self._documents) - set(entries)
            known = set(self._documents)
        for doc_id in gone:
            self.remove(doc_id)
        for doc_id, entry in entries.items():
            if doc_id not in known:
                self._add_readable(entry)

    def _recheck(self, cache_id: str) -> None:
        """A document the change log names: added if it is stored (for this model) and new here, dropped if gone.
        A document's content is its cache id, so one already held needs no second read."""
        doc_id = document_id(cache_id)
        entry = self.store.entry(cache_id)
        if entry is None:
            self.remove(doc_id)
            return
        with self._lock:
            known = doc_id in self._documents
        if not known and entry.is_document and entry.fingerprint == self.fingerprint_digest:
            self._add_readable(entry)

    def start_refresher(self, interval_seconds: float) -> None:
        """Refresh every `interval_seconds` on a thread of its own until `stop_refresher` (0: never)."""
        if interval_seconds <= 0 or self._thread is not None:
            return

        def run() -> None:
            while not self._stop.wait(interval_seconds):
                try:
                    self.refresh()
                except Exception:  # noqa: BLE001  (a store hiccup must not end the refresher; the next look retries)
                    log.exception("catalogue refresh failed")

        self._thread = threading.Thread(target=run, name="kvmart-catalogue", daemon=True)
        self._thread.start()

    def stop_refresher(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def add(self, entry: Entry) -> Document:
        """Register a stored document (its token ids and chunks come from its index's manifest). A small artifact
        (an index) is read whole, once, so that a tiered store keeps a copy on this node (it answers `still_stored`
        locally, and for the document while a shared tier is down); of a large one (a document stored whole by an
        older version) only the header is read: no tensors are fetched."""
        read = self.store.open if entry.artifact_bytes <= WHOLE_READ_BYTES else self.store.open_head
        with read(entry.cache_id) as (f, size):
            manifest, _ = read_manifest(f, size)
        check_requested(manifest, entry.cache_id)
        chunks = manifest.chunks or ((manifest.num_tokens, manifest.cache_id),)
        return self.insert(Document(entry, torch.tensor(manifest.token_ids, dtype=torch.int64), chunks,
                                    bool(manifest.salt_hash), manifest.terms))

    def insert(self, document: Document) -> Document:
        """Hold `document` (already read from its index)."""
        first = first_chunk_key(self.fingerprint_digest, document)
        with self._lock:
            if document.id in self._documents:
                self._forget(document.id)
            self._documents[document.id] = document
            if first is not None:
                self._by_first_chunk.setdefault(first, []).append(document)
                self._first_lengths[document.chunks[0][0]] += 1
        return document

    def _add_readable(self, entry: Entry) -> None:
        try:
            self.add(entry)
        except (ArtifactError, UnknownCacheError) as e:  # one bad or vanished document must not fail a listing
            # (loading a refused one would refuse it too; one deleted since the store listed it is simply gone)
            log.warning("skipping document %s: %s", entry.cache_id[:16], e)

    def remove(self, doc_id: str) -> None:
        with self._lock:
            self._forget(doc_id)

    def _forget(self, doc_id: str) -> None:
        """Drop a document (the lock held)."""
        gone = self._documents.pop(doc_id, None)
        first = first_chunk_key(self.fingerprint_digest, gone) if gone is not None else None
        if gone is None or first is None:
            return
        kept = [d for d in self._by_first_chunk.get(first, ()) if d.id != doc_id]
        if kept:
            self._by_first_chunk[first] = kept
        else:
            self._by_first_chunk.pop(first, None)
        self._first_lengths[gone.chunks[0][0]] -= 1
        if not self._first_lengths[gone.chunks[0][0]]:
            del self._first_lengths[gone.chunks[0][0]]

    # -- finding documents ---------------------------------------------------------------------------------------
    def get(self, doc_id: str, readable: Readable = None) -> Document:
        """The document `doc_id`; UnknownDocumentError if the catalogue does not have it, or if it is private and
        not `readable` by the caller (another tenant's: the same 404). Never touches the store."""
        with self._lock:
            found = self._documents.get(doc_id)
        if found is None or not found.visible_to(readable):
            raise UnknownDocumentError(doc_id)
        return found

    def still_stored(self, document: Document) -> bool:
        """Whether `document` is still in the store (one lookup); a deleted one is dropped from the catalogue."""
        if self.store.entry(document.cache_id) is not None:
            return True
        self.remove(document.id)
        return False

    def documents(self, readable: Readable = None) -> list[Document]:
        """Every document the caller may see, newest first."""
        with self._lock:
            docs = [d for d in self._documents.values() if d.visible_to(readable)]
        return sorted(docs, key=lambda d: (-d.entry.created_at, d.id))

    def pasted_at_start(self, token_ids: list[int], first_keys: dict[int, str]) -> list[tuple[Document, int]]:
        """The public documents the prompt `token_ids` starts with, found by the key of their first chunk, each with
        how many of its tokens the prompt repeats in whole chunks (leaving at least one prompt token after them),
        most first. `first_keys`: the prompt's first-chunk key for each length a public document's first chunk may
        have (`first_chunk_lengths`)."""
        ids = torch.tensor(token_ids, dtype=torch.int64)
        with self._lock:
            candidates = {d.id: d for key in first_keys.values() for d in self._by_first_chunk.get(key, ())}
        found = []
        for document in candidates.values():
            common = min(common_prefix_tokens(ids, document.token_ids), len(token_ids) - 1)
            whole, end = 0, 0
            for n, _ in document.chunks:
                if end + n > common:
                    break
                end += n
                whole = end
            if whole:
                found.append((document, whole))
        return sorted(found, key=lambda f: (-f[1], f[0].entry.created_at, f[0].id))

    def first_chunk_lengths(self) -> set[int]:
        """The lengths of public documents' first chunks (a chunk size, and any document shorter than one)."""
        with self._lock:
            return set(self._first_lengths)

    def longest_prefix(self, token_ids: list[int], min_tokens: int, readable: Readable = None) -> Match | None:
        """The document sharing the longest prefix with `token_ids`, if at least `min_tokens` long, among those the
        caller may see. A scan of the whole catalogue: used only by the vLLM engine's connector, which reuses
        whole stored documents (docs/VLLM.md); kvmart's own path looks chunks up by key."""
        ids = torch.tensor(token_ids, dtype=torch.int64)
        with self._lock:
            docs = [d for d in self._documents.values() if d.visible_to(readable)]
        matches = [Match(doc, common_prefix_tokens(ids, doc.token_ids)) for doc in docs]
        usable = [m for m in matches if m.num_tokens >= max(min_tokens, 1)]
        return min(usable, key=lambda m: (-m.num_tokens, m.document.num_tokens, m.document.id), default=None)


def first_chunk_key(fingerprint_digest: str, document: Document) -> str | None:
    """The chained key of a public document's first chunk (None for a private one: pasted text never matches
    another tenant's chunks, and a document stored whole has no chunk keys to share)."""
    if document.is_salted or document.chunks[0][1] == document.cache_id:
        return None
    n = document.chunks[0][0]
    return chain_key("", fingerprint_digest, "", document.token_ids[:n].tolist())
