"""Signed receipts: every charge comes with a receipt that anyone can verify with the provider's public key.

Version 2 (every receipt issued now): the charge's fields, `version: 2`, where its royalty went (`royalty_to`: the
publisher's account name, `escrow`, or null: the first document's), every document it read (`documents`: cache id,
cached tokens, royalty in nano-dollars and where it went, in the order read) and the signing key's id, signed with Ed25519 (kvmart/ledger/keys.py)
over `DOMAIN + canonical(receipt without "signature")` (kvmart/canonical.py). `verify_public` needs only the
published keys (GET /.well-known/kvmart.json): `kvmart ledger verify RECEIPT --keys kvmart.json` works offline.

Version 1 (receipts issued before): an HMAC-SHA256 over the canonical JSON of `FIELDS`, keyed with the ledger's
secret (KVMART_LEDGER_SECRET, else made once and kept in the database); only the provider can check those, and it
still does (POST /v1/receipts/verify, `kvmart ledger verify` on the database). Every charge row keeps that HMAC too,
as the provider's own check of its stored rows.

A receipt whose any field was changed, added or removed fails either check."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import insert, select
from sqlalchemy.engine import Connection, Row

from kvmart.canonical import canonical
from kvmart.ledger.keys import Keyring, PublicKey
from kvmart.ledger.schema import meta

SECRET_KEY = "receipt_secret"
FIELDS = ("receipt", "account", "document_cache_id", "tokens", "nanousd", "created_at")
VERSION = 2
FIELDS_V2 = (*FIELDS, "version", "royalty_to", "key_id", "signature", "documents")
DOMAIN = b"kvmart-receipt-v2\x00"  # a signature made for anything else (a statement) never verifies as a receipt


def sign(secret: bytes, payload: dict) -> str:
    """The hex HMAC-SHA256 of the payload's version 1 fields (the signature itself excluded; `documents`, which
    version 1 did not have, is covered by version 2's public-key signature)."""
    body = {k: payload[k] for k in FIELDS}
    return hmac.new(secret, canonical(body), hashlib.sha256).hexdigest()


def signed(secret: bytes, payload: dict) -> dict:
    """A version 1 receipt: the payload's version 1 fields and their HMAC."""
    return {**{k: payload[k] for k in FIELDS}, "signature": sign(secret, payload)}


def verify(secret: bytes, receipt: object) -> bool:
    """True only for a version 1 receipt exactly as signed: every field present and unchanged, nothing added."""
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


def signed_message(receipt: dict) -> bytes:
    """What a version 2 receipt's signature signs."""
    return DOMAIN + canonical({k: v for k, v in receipt.items() if k != "signature"})


def issue(conn: Connection, keyring: Keyring, payload: dict, royalty_to: str | None) -> dict:
    """The version 2 receipt of a charge's `payload` (charges.receipt_payload), signed with the current key."""
    key = keyring.current(conn)
    receipt = {**payload, "version": VERSION, "royalty_to": royalty_to, "key_id": key.key_id}
    return {**receipt, "signature": key.sign(signed_message(receipt))}


def rebuild(row: Row, payload: dict, royalty_to: str | None, secret: bytes) -> dict:
    """A stored charge's receipt exactly as it was issued: version 2 from its stored signature, or version 1
    (charges made before public-key receipts) re-signed with the HMAC secret."""
    if row.key_id is None:
        return signed(secret, payload)
    receipt = {**payload, "version": VERSION, "royalty_to": royalty_to, "key_id": row.key_id}
    return {**receipt, "signature": row.receipt_signature}


def why_invalid(receipt: object, keys: list[PublicKey]) -> str | None:
    """None for a version 2 receipt signed by one of `keys` while it was valid, exactly as signed; else why not."""
    if not isinstance(receipt, dict) or set(receipt) != set(FIELDS_V2):
        return "not a version 2 receipt (its fields are not exactly " + ", ".join(FIELDS_V2) + ")"
    if receipt["version"] != VERSION:
        return f"receipt version {receipt['version']!r} is not {VERSION}"
    key = next((k for k in keys if k.key_id == receipt["key_id"]), None)
    if key is None:
        return f"signed by key {receipt['key_id']!r}, which is not among the provider's published keys"
    created = receipt["created_at"]
    if not isinstance(created, int) or isinstance(created, bool) or not key.was_valid_at(created):
        return f"dated {created!r}, outside the validity of key {key.key_id}"
    try:
        message = signed_message(receipt)
    except (TypeError, ValueError) as e:
        return f"not canonical JSON ({e})"
    if not isinstance(receipt["signature"], str) or not key.verifies(message, receipt["signature"]):
        return "its signature does not match its contents (changed, or not signed by this provider)"
    return None


def ledger_secret(conn: Connection, configured: str | None) -> bytes:
    """The HMAC key: `configured` if given, else the one stored in the database (made on first use)."""
    if configured:
        return configured.encode()
    row = conn.execute(select(meta.c.value).where(meta.c.key == SECRET_KEY)).first()
    if row is None:
        value = secrets.token_hex(32)
        conn.execute(insert(meta).values(key=SECRET_KEY, value=value))
        return value.encode()
    return row.value.encode()
