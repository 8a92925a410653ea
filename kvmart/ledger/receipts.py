"""Signed receipts: every charge comes with a receipt, an HMAC-SHA256 over its canonical JSON. The key is the
ledger's secret (KVMART_LEDGER_SECRET, else generated once and kept in the database, so every server on one
database signs alike). An agent verifies a receipt with POST /v1/receipts/verify (or the operator with `kvmart
ledger verify`): a receipt whose any field was changed fails."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets

from sqlalchemy import insert, select
from sqlalchemy.engine import Connection

from kvmart.ledger.schema import meta

SECRET_KEY = "receipt_secret"
FIELDS = ("receipt", "account", "document_cache_id", "documents", "tokens", "nanousd", "created_at")


def canonical(payload: dict) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sign(secret: bytes, payload: dict) -> str:
    """The hex HMAC-SHA256 of the payload's fields (the signature itself excluded)."""
    body = {k: payload[k] for k in FIELDS}
    return hmac.new(secret, canonical(body), hashlib.sha256).hexdigest()


def signed(secret: bytes, payload: dict) -> dict:
    return {**payload, "signature": sign(secret, payload)}


def verify(secret: bytes, receipt: object) -> bool:
    """True only for a receipt exactly as signed: every field present and unchanged, nothing added."""
    if not isinstance(receipt, dict) or set(receipt) != set(FIELDS) | {"signature"}:
        return False
    signature = receipt.get("signature")
    if not isinstance(signature, str):
        return False
    try:
        expected = sign(secret, receipt)
    except (TypeError, ValueError):
        return False
    return hmac.compare_digest(expected, signature)


def ledger_secret(conn: Connection, configured: str | None) -> bytes:
    """The signing key: `configured` if given, else the one stored in the database (made on first use)."""
    if configured:
        return configured.encode()
    row = conn.execute(select(meta.c.value).where(meta.c.key == SECRET_KEY)).first()
    if row is None:
        value = secrets.token_hex(32)
        conn.execute(insert(meta).values(key=SECRET_KEY, value=value))
        return value.encode()
    return row.value.encode()
