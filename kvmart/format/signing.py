"""Signed artifacts: a cluster's nodes share one key (KVMART_SIGNING_KEY). Two signed statements, HMAC-SHA256:

- an artifact's header carries, in its `kvmart_signature` metadata field (beside the manifest, outside its body, so
  the manifest hash is unchanged), the signature of its cache id and manifest hash (which covers every tensor's
  checksums and the manifest's own cache id);
- a shared tier's index of an artifact (Redis, S3) carries the signature of the id it is stored under and of
  everything else it says: the catalogue entry, the size, the checksums of the stored bytes.

Both name the cache id, so an artifact or an index copied under another id (document X's signed chunks and index
written under document Y's key) fails its check there, and a loader also checks the id it asked for against the
one it got. A document is stored as a chunk chain (docs/FORMAT.md, format 3): its document index is an artifact
under the document's cache id, each chunk one under its chained key, so each is signed for its own id; and the
index's manifest hash covers its chunks' keys, so a signed index names exactly the chunks it is made of (and a
reader checks each chunk's key against the tokens it reads them for). When a key is configured, an artifact fetched from a shared tier, which anyone with access to that
tier could have written, is refused with ArtifactError unless both signatures match; the caller treats it as
corrupt (never used; recomputed). The node's own disk needs no check: only the node writes it. With no key,
nothing is signed or checked (a single node, or a cluster that trusts its shared tier)."""

from __future__ import annotations

import hashlib
import hmac
import os

from kvmart.canonical import compact
from kvmart.config import SIGNING_KEY_ENV
from kvmart.errors import ArtifactError

SIGNATURE_FIELD = "kvmart_signature"  # in the safetensors header's __metadata__, beside "kvmart" (the manifest)
# a signature made for anything else never verifies as one; v2 names the cache id (v1 signed the manifest hash
# alone: an artifact signed so is refused and recomputed, as an unsigned one is)
DOMAIN = b"kvmart-artifact-signature-v2:"
INDEX_DOMAIN = b"kvmart-index-signature-v1:"


def cluster_key(environ: dict[str, str] | None = None) -> bytes | None:
    """The cluster's signing key from KVMART_SIGNING_KEY, or None where it is unset or empty. Read at each use,
    so a node started with it signs everything it writes."""
    value = (os.environ if environ is None else environ).get(SIGNING_KEY_ENV, "")
    return value.encode() if value else None


def sign(key: bytes, cache_id: str, manifest_sha256: str) -> str:
    """The hex HMAC-SHA256 of an artifact's cache id and manifest hash."""
    return hmac.new(key, DOMAIN + cache_id.encode() + b"\0" + manifest_sha256.encode(), hashlib.sha256).hexdigest()


def check(key: bytes, manifest_sha256: str, signature: str, cache_id: str) -> None:
    """ArtifactError unless `signature` is this key's signature of `manifest_sha256` for `cache_id`, the id the
    caller asked its store for."""
    if not signature:
        raise ArtifactError(f"artifact {cache_id[:16]} is not signed by this cluster's key (KVMART_SIGNING_KEY); "
                            "refused: it will be recomputed")
    if not hmac.compare_digest(sign(key, cache_id, manifest_sha256), signature):
        raise ArtifactError(f"artifact {cache_id[:16]}: its signature does not match this cluster's key "
                            "(KVMART_SIGNING_KEY) for this cache id; refused: it will be recomputed")


def sign_index(key: bytes, cache_id: str, index: dict) -> str:
    """The hex HMAC-SHA256 of a shared tier's index (without its signature), for the id it is stored under."""
    return hmac.new(key, INDEX_DOMAIN + cache_id.encode() + b"\0" + compact(index), hashlib.sha256).hexdigest()


def check_index(key: bytes, cache_id: str, index: dict, signature: object) -> None:
    """ArtifactError unless `signature` is this key's signature of `index` stored under `cache_id`."""
    if not isinstance(signature, str) or not signature:
        raise ArtifactError(f"the shared tier's index of {cache_id[:16]} is not signed by this cluster's key "
                            "(KVMART_SIGNING_KEY); refused: it will be recomputed")
    if not hmac.compare_digest(sign_index(key, cache_id, index), signature):
        raise ArtifactError(f"the shared tier's index of {cache_id[:16]}: its signature does not match this "
                            "cluster's key (KVMART_SIGNING_KEY) for this cache id; refused: it will be recomputed")
