"""Statements a publisher can audit (docs/LEDGER.md "Statements"): for a closed period [from, to), every read of its
documents, with tokens, prices and what became of each royalty, signed with the provider's key, and a Merkle root
(kvmart/ledger/merkle.py) over the receipts of those reads.

A receipt belongs to publisher P's statement when P published the document it read at the time of the read, or when
escrow later paid its royalty to P (P proved it owns the text). Leaves are the receipts exactly as issued, in
receipt order; a leaf's bytes are the receipt's canonical JSON. So an agent's receipt for a read of P's document in
the period is either a leaf of the tree (an inclusion proof shows it), or the statement left it out, and the two
signed documents together prove it.

A statement covers only the past: `to` may not be later than the moment it is made. It is made in a transaction that
first locks the current signing key's row, which every charge also locks (shared) before it takes its date, so no
charge dated inside the period can commit after the statement was read."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

from sqlalchemy import or_, select
from sqlalchemy.engine import Connection

from kvmart.canonical import canonical
from kvmart.errors import RequestError
from kvmart.ledger import merkle
from kvmart.ledger.accounts import Account, account_by_id
from kvmart.ledger.charges import charge_of
from kvmart.ledger.keys import Keyring, PublicKey
from kvmart.ledger.licences import find_licence
from kvmart.ledger.schema import charges, escrow, signing_keys

VERSION = 1
DOMAIN = b"kvmart-statement-v1\x00"  # never verifies as a receipt, nor a receipt as a statement
UNSIGNED = ("signature", "receipts")  # the receipts travel with a statement; the Merkle root signs them
MERKLE = "RFC9162-SHA256"
ROYALTY_STATES = ("paid", "escrow_open", "escrow_paid", "escrow_refunded", "escrow_to_others")


@dataclass(frozen=True)
class Read:
    """One receipt of the statement and what became of its royalty, for this publisher."""

    receipt: dict
    royalty_state: str  # one of ROYALTY_STATES


def check_period(start: int, end: int, now: int) -> None:
    if start < 0 or end <= start:
        raise RequestError(f"the period must be from < to (unix seconds), got from={start} to={end}", "from")
    if end > now:
        raise RequestError(f"a statement covers a closed period: to={end} is later than now ({now})", "to")


def royalty_state(publisher_id: int, royalty_to_id: int | None, held) -> str:
    if held is None:
        return "paid" if royalty_to_id == publisher_id else "escrow_to_others"
    if held.outcome is None:
        return "escrow_open"
    if held.outcome == "refunded":
        return "escrow_refunded"
    return "escrow_paid" if held.paid_to == publisher_id else "escrow_to_others"


def reads(conn: Connection, publisher: Account, start: int, end: int, secret: bytes) -> list[Read]:
    """The publisher's reads of [start, end), in receipt order."""
    query = (select(charges, escrow.c.outcome, escrow.c.paid_to, escrow.c.transaction_id.label("held"))
             .outerjoin(escrow, (escrow.c.transaction_id == charges.c.transaction_id)
                        & (escrow.c.cache_id == charges.c.cache_id))  # the charge's first document's row
             .where(charges.c.created_at >= start, charges.c.created_at < end,
                    or_(charges.c.licensee_id == publisher.id, escrow.c.paid_to == publisher.id))
             .order_by(charges.c.transaction_id))
    names: dict[int, str] = {}
    found = []
    for row in conn.execute(query).all():
        if row.account_id not in names:
            names[row.account_id] = account_by_id(conn, row.account_id).name
        receipt = charge_of(conn, row, names[row.account_id], secret, replayed=False).receipt
        held = row if row.held is not None else None
        found.append(Read(receipt, royalty_state(publisher.id, row.publisher_id, held)))
    return found


def _sums() -> dict:
    return {"reads": 0, "tokens": {"cached": 0, "computed": 0, "output": 0},
            "nanousd": {"total": 0, "cache_read": 0, "royalty": 0, **{f"royalty_{s}": 0 for s in ROYALTY_STATES}}}


def _add(into: dict, read: Read) -> None:
    r = read.receipt
    into["reads"] += 1
    for kind in ("cached", "computed", "output"):
        into["tokens"][kind] += r["tokens"][kind]
    for kind in ("total", "cache_read", "royalty"):
        into["nanousd"][kind] += r["nanousd"][kind]
    into["nanousd"][f"royalty_{read.royalty_state}"] += r["nanousd"]["royalty"]


def body(conn: Connection, publisher: Account, start: int, end: int, found: list[Read], now: int) -> dict:
    """The statement's signed fields (without key id and signature)."""
    per_doc: dict[str, dict] = defaultdict(_sums)
    totals = _sums()
    for read in found:
        _add(per_doc[read.receipt["document_cache_id"]], read)
        _add(totals, read)
    documents = []
    for cache_id in sorted(per_doc):
        licence = find_licence(conn, cache_id)
        terms = None if licence is None else {
            "kind": licence.kind, "publisher": account_by_id(conn, licence.publisher_id).name,
            "cache_read_usd_per_mtok": None if licence.cache_read_usd_per_mtok is None
            else str(licence.cache_read_usd_per_mtok),
            "royalty_share": None if licence.royalty_share is None else str(licence.royalty_share),
            "source": licence.source or None, "owner_verified_at": licence.owner_verified_at}
        documents.append({"cache_id": cache_id, "licence": terms, **per_doc[cache_id]})
    leaves = [merkle.leaf_hash(canonical(r.receipt)) for r in found]
    return {"object": "statement", "version": VERSION, "publisher": publisher.name, "from": start, "to": end,
            "issued_at": now, "documents": documents, "totals": totals,
            "merkle": {"algorithm": MERKLE, "size": len(leaves), "root": merkle.root(leaves).hex()}}


def lock_period(conn: Connection) -> int:
    """Wait for every charge signing now to commit and keep new ones out (see the module docstring); now."""
    conn.execute(select(signing_keys.c.key_id).where(signing_keys.c.valid_until.is_(None)).with_for_update()).all()
    return int(time.time())


def statement(conn: Connection, keyring: Keyring, publisher: Account, start: int, end: int | None,
              secret: bytes) -> dict:
    """The signed statement of [start, end) (end None: now), its receipts attached under `receipts`."""
    now = lock_period(conn)
    end = now if end is None else end
    check_period(start, end, now)
    found = reads(conn, publisher, start, end, secret)
    signed = body(conn, publisher, start, end, found, now)
    key = keyring.current(conn)
    signed["key_id"] = key.key_id
    return {**signed, "signature": key.sign(signed_message(signed)), "receipts": [r.receipt for r in found]}


def signed_message(statement: dict) -> bytes:
    return DOMAIN + canonical({k: v for k, v in statement.items() if k not in UNSIGNED})


def why_invalid(statement: object, keys: list[PublicKey]) -> str | None:
    """None for a statement signed by one of `keys` while it was valid, exactly as signed, whose attached receipts
    (if any) make its Merkle root; else why not."""
    if not isinstance(statement, dict) or statement.get("object") != "statement":
        return "not a statement"
    key = next((k for k in keys if k.key_id == statement.get("key_id")), None)
    if key is None:
        return f"signed by key {statement.get('key_id')!r}, which is not among the provider's published keys"
    issued = statement.get("issued_at")
    if not isinstance(issued, int) or not key.was_valid_at(issued):
        return f"issued at {issued!r}, outside the validity of key {key.key_id}"
    try:
        message = signed_message(statement)
    except (TypeError, ValueError) as e:
        return f"not canonical JSON ({e})"
    if not isinstance(statement.get("signature"), str) or not key.verifies(message, statement["signature"]):
        return "its signature does not match its contents (changed, or not signed by this provider)"
    attached = statement.get("receipts")
    if attached is not None:
        leaves = [merkle.leaf_hash(canonical(r)) for r in attached]
        tree = statement.get("merkle") or {}
        if len(leaves) != tree.get("size") or merkle.root(leaves).hex() != tree.get("root"):
            return "its attached receipts do not make its Merkle root"
    return None


def proof(statement: dict, receipt: dict) -> dict | None:
    """The inclusion proof of `receipt` in a statement with its receipts attached, or None if it is not a leaf."""
    leaves = [merkle.leaf_hash(canonical(r)) for r in statement["receipts"]]
    target = merkle.leaf_hash(canonical(receipt))
    if target not in leaves:
        return None
    index = leaves.index(target)
    return {"object": "statement.proof", "receipt": receipt, "leaf_index": index, "size": len(leaves),
            "path": [h.hex() for h in merkle.inclusion_path(leaves, index)],
            "root": statement["merkle"]["root"]}
