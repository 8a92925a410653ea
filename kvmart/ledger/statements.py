"""Statements a publisher can audit (docs/LEDGER.md "Statements"): for a closed period [from, to), every read of its
documents, with tokens, prices and what became of each royalty, signed with the provider's key, and a Merkle root
(kvmart/ledger/merkle.py) over the receipts of those reads.

A receipt belongs to publisher P's statement when P published a document it read at the time of the read, or when
escrow later paid a document's royalty to P (P proved it owns the text); of a request that read documents of several
publishers, P's statement counts P's share (its documents' cached tokens and royalties). Leaves are the receipts
exactly as issued, in receipt order; a leaf's bytes are the receipt's canonical JSON. So an agent's receipt for a
read of P's document in the period is either a leaf of the tree (an inclusion proof shows it), or the statement left
it out, and the two signed documents together prove it.

A statement covers only the past: `to` may not be later than the moment it is made. It is made in a transaction that
first locks the current signing key's row, which every charge also locks (shared) before it takes its date, so no
charge dated inside the period can commit after the statement was read."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

from sqlalchemy import select, union
from sqlalchemy.engine import Connection

from kvmart.canonical import canonical
from kvmart.errors import RequestError
from kvmart.ledger import merkle
from kvmart.ledger.accounts import Account, account_by_id
from kvmart.ledger.charges import charge_of
from kvmart.ledger.keys import Keyring, PublicKey
from kvmart.ledger.licences import find_licence
from kvmart.ledger.schema import charge_reads, charges, escrow, signing_keys

VERSION = 1
DOMAIN = b"kvmart-statement-v1\x00"  # never verifies as a receipt, nor a receipt as a statement
UNSIGNED = ("signature", "receipts")  # the receipts travel with a statement; the Merkle root signs them
MERKLE = "RFC9162-SHA256"
ROYALTY_STATES = ("paid", "escrow_open", "escrow_paid", "escrow_refunded", "escrow_to_others")


@dataclass(frozen=True)
class Share:
    """The publisher's part of one receipt: one of its documents the request read, and what became of its royalty."""

    cache_id: str
    cached_tokens: int
    royalty_nanousd: int
    royalty_state: str  # one of ROYALTY_STATES


@dataclass(frozen=True)
class Read:
    """One receipt of the statement and the publisher's shares of it (a request may have read documents of several
    publishers: each is in every such publisher's statement, with that publisher's shares only)."""

    receipt: dict
    shares: tuple[Share, ...]


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
    """The publisher's reads of [start, end), in receipt order: every charge that read a document the publisher
    published then, or whose royalty escrow paid to the publisher, with the publisher's shares of it."""
    theirs = union(select(charge_reads.c.transaction_id).where(charge_reads.c.licensee_id == publisher.id),
                   select(escrow.c.transaction_id).where(escrow.c.paid_to == publisher.id),
                   select(charges.c.transaction_id).where(charges.c.licensee_id == publisher.id))
    query = (select(charges).where(charges.c.created_at >= start, charges.c.created_at < end,
                                   charges.c.transaction_id.in_(select(theirs.subquery())))
             .order_by(charges.c.transaction_id))
    names: dict[int, str] = {}
    found = []
    for row in conn.execute(query).all():
        if row.account_id not in names:
            names[row.account_id] = account_by_id(conn, row.account_id).name
        charge = charge_of(conn, row, names[row.account_id], secret, replayed=False)
        held = {e.cache_id: e for e in conn.execute(select(escrow).where(
            escrow.c.transaction_id == row.transaction_id)).all()}
        # a charge from before 0006 has no per-document rows: it read one document, its licensee on the charge
        documents = [(d.cache_id, d.publisher_id, d.cached_tokens, d.royalty_nanousd, d.paid_to)
                     for d in charge.reads] or [(row.cache_id, row.licensee_id, row.cached_tokens,
                                                 row.royalty_nanousd, row.publisher_id)]
        shares = tuple(Share(cache_id, tokens, royalty, royalty_state(publisher.id, paid_to, held.get(cache_id)))
                       for cache_id, licensee, tokens, royalty, paid_to in documents
                       if licensee == publisher.id or getattr(held.get(cache_id), "paid_to", None) == publisher.id)
        found.append(Read(charge.receipt, shares))
    return found


def _sums() -> dict:
    return {"reads": 0, "tokens": {"cached": 0, "computed": 0, "output": 0},
            "nanousd": {"total": 0, "cache_read": 0, "royalty": 0, **{f"royalty_{s}": 0 for s in ROYALTY_STATES}}}


def _add(into: dict, read: Read, shares: tuple[Share, ...]) -> None:
    """Add one receipt: its request's computed and output tokens, total and cache-read price as a whole; of the
    cached tokens and royalties, only `shares` (the publisher's documents)."""
    r = read.receipt
    into["reads"] += 1
    for kind in ("computed", "output"):
        into["tokens"][kind] += r["tokens"][kind]
    for kind in ("total", "cache_read"):
        into["nanousd"][kind] += r["nanousd"][kind]
    for share in shares:
        into["tokens"]["cached"] += share.cached_tokens
        into["nanousd"]["royalty"] += share.royalty_nanousd
        into["nanousd"][f"royalty_{share.royalty_state}"] += share.royalty_nanousd


def body(conn: Connection, publisher: Account, start: int, end: int, found: list[Read], now: int) -> dict:
    """The statement's signed fields (without key id and signature)."""
    per_doc: dict[str, dict] = defaultdict(_sums)
    totals = _sums()
    for read in found:
        for cache_id in dict.fromkeys(share.cache_id for share in read.shares):
            _add(per_doc[cache_id], read, tuple(share for share in read.shares if share.cache_id == cache_id))
        _add(totals, read, read.shares)
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
