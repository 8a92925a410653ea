"""Signed artifacts: a cluster's nodes share one key (KVMART_SIGNING_KEY) and every artifact a node writes carries
an HMAC-SHA256 of its manifest hash (which covers every tensor's checksums) in the header's `kvmart_signature`
metadata field, beside the manifest and outside its body: the manifest hash is unchanged and unsigned artifacts
stay readable by older code. When a key is configured, an artifact fetched from a shared tier (Redis, S3), which
anyone with access to that tier could have written, is refused with ArtifactError unless its signature matches;
the caller treats it as corrupt (never used; recomputed). The node's own disk needs no check: only the node
writes it. With no key, nothing is signed or checked (a single node, or a cluster that trusts its shared tier)."""

from __future__ import annotations

import hashlib
import hmac
import os

from kvmart.config import SIGNING_KEY_ENV
from kvmart.errors import ArtifactError

SIGNATURE_FIELD = "kvmart_signature"  # in the safetensors header's __metadata__, beside "kvmart" (the manifest)
DOMAIN = b"kvmart-artifact-signature-v1:"  # a signature made for anything else never verifies as one


def cluster_key(environ: dict[str, str] | None = None) -> bytes | None:
    """The cluster's signing key from KVMART_SIGNING_KEY, or None where it is unset or empty. Read at each use,
    so a node started with it signs everything it writes."""
    value = (os.environ if environ is None else environ).get(SIGNING_KEY_ENV, "")
    return value.encode() if value else None


def sign(key: bytes, manifest_sha256: str) -> str:
    """The hex HMAC-SHA256 of an artifact's manifest hash."""
    return hmac.new(key, DOMAIN + manifest_sha256.encode(), hashlib.sha256).hexdigest()


def check(key: bytes, manifest_sha256: str, signature: str, cache_id: str) -> None:
    """ArtifactError unless `signature` is this key's signature of `manifest_sha256`."""
    if not signature:
        raise ArtifactError(f"artifact {cache_id[:16]} is not signed by this cluster's key (KVMART_SIGNING_KEY); "
                            "refused: it will be recomputed")
    if not hmac.compare_digest(sign(key, manifest_sha256), signature):
        raise ArtifactError(f"artifact {cache_id[:16]}: its signature does not match this cluster's key "
                            "(KVMART_SIGNING_KEY); refused: it will be recomputed")

