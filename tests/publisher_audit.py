"""A publisher's audit script, written from docs/LEDGER.md alone (it imports nothing of kvmart): check the
provider's signed statement with the provider's published keys, recompute its Merkle root from its receipts, and
find any receipt an agent shows that the statement left out. Standard library + `cryptography` only.

    problems = audit(statement, well_known, receipts_agents_showed)   # [] when everything holds"""

from __future__ import annotations

import base64
import hashlib
import json

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey


def canonical(value) -> bytes:
    """RFC 8785 for values without fractional numbers: sorted keys, no whitespace, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def keys_of(well_known: dict) -> dict:
    """kid -> (public key, valid_from, valid_until), each kid checked to be its key's RFC 7638 thumbprint."""
    found = {}
    for jwk in well_known["receipt_keys"]:
        thumb = base64.urlsafe_b64encode(hashlib.sha256(canonical(
            {"crv": jwk["crv"], "kty": jwk["kty"], "x": jwk["x"]})).digest()).rstrip(b"=").decode()
        assert thumb == jwk["kid"], "a key id that is not its key's thumbprint"
        found[jwk["kid"]] = (Ed25519PublicKey.from_public_bytes(unb64(jwk["x"])), jwk["valid_from"], jwk["valid_until"])
    return found


def signature_ok(keys: dict, key_id: str, when: int, domain: bytes, signed: dict, signature: str) -> bool:
    if key_id not in keys:
        return False
    key, start, end = keys[key_id]
    if when < start or (end is not None and when > end):
        return False
    try:
        key.verify(unb64(signature), domain + canonical(signed))
        return True
    except (InvalidSignature, ValueError):
        return False


def receipt_ok(receipt: dict, keys: dict) -> bool:
    signed = {k: v for k, v in receipt.items() if k != "signature"}
    return signature_ok(keys, receipt["key_id"], receipt["created_at"], b"kvmart-receipt-v2\x00", signed,
                        receipt["signature"])


def leaf(receipt: dict) -> bytes:
    return hashlib.sha256(b"\x00" + canonical(receipt)).digest()


def tree_root(leaves: list[bytes]) -> bytes:
    """RFC 9162 2.1.1 MTH."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return hashlib.sha256(b"\x01" + tree_root(leaves[:k]) + tree_root(leaves[k:])).digest()


def proof_ok(proof: dict) -> bool:
    """RFC 9162 2.1.3.2, over a proof from GET /v1/statements/proof."""
    fn, sn, r = proof["leaf_index"], proof["size"] - 1, leaf(proof["receipt"])
    if fn > sn:
        return False
    for p in (bytes.fromhex(h) for h in proof["path"]):
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = hashlib.sha256(b"\x01" + p + r).digest()
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = hashlib.sha256(b"\x01" + r + p).digest()
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and r.hex() == proof["root"]


def share(receipt: dict, mine: set[str]) -> int:
    """The royalty of `receipt` on the documents in `mine`, as its `documents` list splits it (a receipt without
    that list read one document: all of it)."""
    if not receipt.get("documents"):
        return receipt["nanousd"]["royalty"] if receipt["document_cache_id"] in mine else 0
    return sum(d["royalty_nanousd"] for d in receipt["documents"] if d["cache_id"] in mine)


def audit(statement: dict, well_known: dict, shown: list[dict], documents: set[str]) -> list[str]:
    """Every problem found: a bad signature, receipts that do not make the root or the totals, a receipt an agent
    showed for one of the publisher's `documents` (cache ids), dated in the period, left out."""
    keys, problems = keys_of(well_known), []
    signed = {k: v for k, v in statement.items() if k not in ("signature", "receipts")}
    if not signature_ok(keys, statement["key_id"], statement["issued_at"], b"kvmart-statement-v1\x00", signed,
                        statement["signature"]):
        problems.append("the statement's signature does not verify")
    receipts = statement["receipts"]
    leaves = [leaf(r) for r in receipts]
    if tree_root(leaves).hex() != statement["merkle"]["root"] or len(leaves) != statement["merkle"]["size"]:
        problems.append("the receipts do not make the statement's Merkle root")
    if any(not receipt_ok(r, keys) for r in receipts):
        problems.append("a receipt in the statement is not signed by the provider")
    listed = {d["cache_id"] for d in statement["documents"]}  # the publisher's documents: its shares of a receipt
    royalty = sum(share(r, listed) for r in receipts)
    if royalty != statement["totals"]["nanousd"]["royalty"] or len(receipts) != statement["totals"]["reads"]:
        problems.append("the totals are not the sum of the receipts")
    for receipt in shown:
        in_period = statement["from"] <= receipt["created_at"] < statement["to"]
        read = [d["cache_id"] for d in receipt.get("documents") or []] or [receipt["document_cache_id"]]
        mine = [c for c in read if c in documents]
        if receipt_ok(receipt, keys) and in_period and mine and leaf(receipt) not in leaves:
            problems.append(f"{receipt['receipt']} (a read of {mine[0][:12]}) is missing")
    return problems
