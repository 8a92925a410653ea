"""Charging a request in two steps, each one database transaction:

1. `open_hold`, before any token is generated: reserve the request's largest possible charge (its prompt, and
   max_tokens of output) against the agent's available money (balance less its other holds); 402 if it does not
   cover it. With an Idempotency-Key, a key already charged is a 409 (the caller replays the stored answer before
   it gets here: a charged request is never computed again, free), and a key whose first request is still running
   is a 409 too.
2. `settle`, when the answer is complete (or the client hung up: what was sent): post the actual charge (agent ->
   provider + publisher) and delete the hold, in one transaction, with a signed receipt. `release` drops the hold
   of a request that failed: nothing is charged.

A hold names its node and lives on a lease (`expires_at`), which the node renews while the request runs
(`renew_holds`). A server killed between the two steps leaves a hold and no charge; the ledger still balances
(holds are not entries). When that node starts again it releases its own holds at once (`start_node`), and if it
never comes back its holds lapse with their lease: they reserve nothing and block no Idempotency-Key after it."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import Connection, Row

from kvmart.errors import IdempotencyConflictError
from kvmart.ledger.accounts import PROVIDER, Account, account_by_id, get_account, lock_accounts
from kvmart.ledger.entries import HOLD_LEASE_SECONDS, check_covers, post
from kvmart.ledger.keys import Keyring
from kvmart.ledger.receipts import issue, rebuild, sign
from kvmart.ledger.schema import charge_reads, charges, holds, responses
from kvmart.ledger.tariffs import Quote


@dataclass(frozen=True)
class Hold:
    id: int
    account_id: int
    amount_nanousd: int
    idempotency_key: str | None
    request_hash: str


@dataclass(frozen=True)
class Read:
    """The tokens one request read from one document, and the royalty they earned: `publisher_id` is the document's
    publisher (None: no publisher, a document the operator's CLI precomputed), `royalty_to` the account the royalty
    is paid to (the publisher, or escrow: kvmart/ledger/escrow.py; None: the publisher)."""

    cache_id: str
    publisher_id: int | None
    cached_tokens: int
    royalty_nanousd: int
    royalty_to: int | None = None

    @property
    def paid_to(self) -> int | None:
        return self.royalty_to if self.royalty_to is not None else self.publisher_id


@dataclass(frozen=True)
class Charge:
    """A settled charge; `receipt` is its signed receipt, `replayed` True when an idempotent retry found it.
    `cache_id` and `publisher_id` (where its royalty went) name its first document read, if any; `reads` every one."""

    transaction_id: int
    quote: Quote
    cache_id: str | None
    publisher_id: int | None
    receipt: dict
    replayed: bool = False
    reads: tuple[Read, ...] = ()


def open_hold(conn: Connection, account: Account, amount_nanousd: int, idempotency_key: str | None,
              request_hash: str, node: str = "", lease_seconds: int = HOLD_LEASE_SECONDS) -> Hold:
    """Reserve `amount_nanousd` for a request run by `node`, for `lease_seconds` unless renewed.
    IdempotencyConflictError if the key was already charged (for this request or another) or is held by a request
    still running; a hold of the key whose lease lapsed (its node died) is dropped and the key reused."""
    locked = lock_accounts(conn, {account.id})[account.id]
    now = int(time.time())
    if idempotency_key is not None:
        charged = conn.execute(select(charges.c.request_hash).where(
            charges.c.account_id == account.id, charges.c.idempotency_key == idempotency_key)).first()
        if charged is not None:
            if charged.request_hash != request_hash:
                raise IdempotencyConflictError(
                    f"Idempotency-Key {idempotency_key!r} was already used for a different request")
            raise IdempotencyConflictError(
                f"Idempotency-Key {idempotency_key!r} was already charged for this request: retry to receive its "
                "stored answer, or send a new key to ask again")
        running = conn.execute(select(holds.c.id, holds.c.expires_at).where(
            holds.c.account_id == account.id, holds.c.idempotency_key == idempotency_key)).first()
        if running is not None and running.expires_at >= now:
            raise IdempotencyConflictError(
                f"a request with Idempotency-Key {idempotency_key!r} is still running; retry when it has finished")
        if running is not None:  # its node died and its lease lapsed: the key is free again
            conn.execute(delete(holds).where(holds.c.id == running.id))
    check_covers(conn, locked, -amount_nanousd)
    hold_id = conn.execute(insert(holds).values(account_id=account.id, amount_nanousd=amount_nanousd,
                                                idempotency_key=idempotency_key, created_at=now, node=node,
                                                expires_at=now + lease_seconds)
                           .returning(holds.c.id)).scalar_one()
    return Hold(int(hold_id), account.id, amount_nanousd, idempotency_key, request_hash)


def settle(conn: Connection, hold: Hold, quote: Quote, reads: Sequence[Read], secret: bytes,
           keyring: Keyring) -> Charge:
    """Post the charge of a held request and drop its hold: the agent pays the total, each document read its
    royalty (to its publisher, or escrow: kvmart/ledger/escrow.py), the provider the rest. The charge never exceeds
    the hold, so it is always covered; InsufficientFundsError only if the hold was released meanwhile and the money
    spent. The receipt is signed with the ledger's current key (receipts.py)."""
    if quote.total_nanousd > hold.amount_nanousd:
        raise AssertionError(f"charge {quote.total_nanousd} exceeds its hold {hold.amount_nanousd}")
    if sum(r.royalty_nanousd for r in reads) != quote.royalty_nanousd:
        raise AssertionError("the reads' royalties do not add up to the quote's")
    agent = account_by_id(conn, hold.account_id)
    provider = get_account(conn, PROVIDER)
    first = reads[0] if reads else None
    cache_id = first.cache_id if first else None
    royalty_to = first.paid_to if first and first.royalty_nanousd else None
    legs = [(agent.id, -quote.total_nanousd), (provider.id, quote.provider_nanousd)]
    legs += [(r.paid_to, r.royalty_nanousd) for r in reads if r.paid_to is not None and r.royalty_nanousd]
    txn_id = post(conn, "charge", legs, memo=cache_id or "", hold_exempt=hold.id)
    conn.execute(delete(holds).where(holds.c.id == hold.id))
    now = int(time.time())
    payload = receipt_payload(txn_id, agent.name, cache_id, quote, now, documents_json(conn, reads))
    receipt = issue(conn, keyring, payload, account_by_id(conn, royalty_to).name if royalty_to is not None else None)
    if reads:
        conn.execute(insert(charge_reads), [
            {"transaction_id": txn_id, "position": i, "cache_id": r.cache_id, "licensee_id": r.publisher_id,
             "royalty_to": r.paid_to if r.royalty_nanousd else None, "cached_tokens": r.cached_tokens,
             "royalty_nanousd": r.royalty_nanousd} for i, r in enumerate(reads)])
    conn.execute(insert(charges).values(
        transaction_id=txn_id, account_id=agent.id, idempotency_key=hold.idempotency_key,
        request_hash=hold.request_hash, cache_id=cache_id, publisher_id=royalty_to,
        cached_tokens=quote.cached_tokens, computed_tokens=quote.computed_tokens, output_tokens=quote.output_tokens,
        total_nanousd=quote.total_nanousd, computed_nanousd=quote.computed_nanousd,
        cache_read_nanousd=quote.cache_read_nanousd, output_nanousd=quote.output_nanousd,
        royalty_nanousd=quote.royalty_nanousd, saved_nanousd=quote.saved_nanousd, signature=sign(secret, payload),
        created_at=now, key_id=receipt["key_id"], receipt_signature=receipt["signature"],
        licensee_id=first.publisher_id if first else None))
    return Charge(txn_id, quote, cache_id, royalty_to, receipt, reads=tuple(reads))


def documents_json(conn: Connection, reads: Sequence[Read]) -> list[dict]:
    """The documents a charge read as its receipt lists them: where each royalty went by account name."""
    return [{"cache_id": r.cache_id, "cached_tokens": r.cached_tokens, "royalty_nanousd": r.royalty_nanousd,
             "royalty_to": account_by_id(conn, r.paid_to).name if r.paid_to is not None and r.royalty_nanousd
             else None} for r in reads]


def stored_reads(conn: Connection, transaction_id: int) -> tuple[Read, ...]:
    rows = conn.execute(select(charge_reads).where(charge_reads.c.transaction_id == transaction_id)
                        .order_by(charge_reads.c.position))
    return tuple(Read(r.cache_id, r.licensee_id, r.cached_tokens, r.royalty_nanousd, r.royalty_to) for r in rows)


def remember_response(conn: Connection, account_id: int, idempotency_key: str, body: str) -> None:
    """Keep the answer of a charged idempotent request (the first one kept wins)."""
    exists = conn.execute(select(responses.c.account_id).where(responses.c.account_id == account_id,
                                                               responses.c.idempotency_key == idempotency_key)).first()
    if exists is None:
        conn.execute(insert(responses).values(account_id=account_id, idempotency_key=idempotency_key, body=body,
                                              created_at=int(time.time())))


def stored_response(conn: Connection, account_id: int, idempotency_key: str, request_hash: str) -> str | None:
    """The kept answer for this key if the same request was charged under it; None if the key was never charged.
    IdempotencyConflictError if it was charged for a different request (another body or another endpoint), or
    charged with no answer kept (cut off by its client, or its node died between charging and keeping it): a
    charged request is answered from what was kept or refused, never computed again for free."""
    charged = conn.execute(select(charges.c.request_hash).where(charges.c.account_id == account_id,
                                                                charges.c.idempotency_key == idempotency_key)).first()
    if charged is None:
        return None
    if charged.request_hash != request_hash:
        raise IdempotencyConflictError(f"Idempotency-Key {idempotency_key!r} was already used for a different request")
    body = conn.execute(select(responses.c.body).where(responses.c.account_id == account_id,
                                                       responses.c.idempotency_key == idempotency_key)).scalar()
    if body is None:
        raise IdempotencyConflictError(
            f"Idempotency-Key {idempotency_key!r} was already charged for this request, and no complete answer was "
            "kept (the client hung up, and was charged for what was sent); send a new key to ask again")
    return body


def release(conn: Connection, hold_id: int) -> None:
    conn.execute(delete(holds).where(holds.c.id == hold_id))


def renew_holds(conn: Connection, node: str, lease_seconds: int = HOLD_LEASE_SECONDS) -> int:
    """Push the lease of every hold of `node` (its requests still running) `lease_seconds` from now; how many."""
    return conn.execute(update(holds).where(holds.c.node == node)
                        .values(expires_at=int(time.time()) + lease_seconds)).rowcount


def start_node(conn: Connection, node: str) -> int:
    """What a node does as it starts: release every hold it left (its earlier run died mid-request: those requests
    are gone) and every hold whose lease lapsed (left by any node); how many."""
    return conn.execute(delete(holds).where((holds.c.node == node) | (holds.c.expires_at < int(time.time())))
                        ).rowcount


def release_stale(conn: Connection) -> int:
    """Drop holds whose lease lapsed (left by nodes that died mid-request); how many."""
    return conn.execute(delete(holds).where(holds.c.expires_at < int(time.time()))).rowcount


def receipt_payload(txn_id: int, account_name: str, cache_id: str | None, quote: Quote, created_at: int,
                    documents: list[dict]) -> dict:
    return {"receipt": f"rcpt_{txn_id}", "account": account_name, "document_cache_id": cache_id,
            "documents": documents,
            "tokens": {"cached": quote.cached_tokens, "computed": quote.computed_tokens, "output": quote.output_tokens},
            "nanousd": {"total": quote.total_nanousd, "cache_read": quote.cache_read_nanousd,
                        "computed": quote.computed_nanousd, "output": quote.output_nanousd,
                        "royalty": quote.royalty_nanousd, "saved_vs_prefill": quote.saved_nanousd},
            "created_at": created_at}


def charge_of(conn: Connection, row: Row, account_name: str, secret: bytes, replayed: bool) -> Charge:
    """A stored charge, its receipt rebuilt from the stored row exactly as it was issued."""
    quote = Quote(row.cached_tokens, row.computed_tokens, row.output_tokens, row.computed_nanousd,
                  row.cache_read_nanousd, row.output_nanousd, row.royalty_nanousd, row.saved_nanousd)
    reads = stored_reads(conn, row.transaction_id)
    payload = receipt_payload(row.transaction_id, account_name, row.cache_id, quote, row.created_at,
                              documents_json(conn, reads))
    royalty_to = account_by_id(conn, row.publisher_id).name if row.publisher_id is not None else None
    return Charge(row.transaction_id, quote, row.cache_id, row.publisher_id, rebuild(row, payload, royalty_to, secret),
                  replayed, reads)


def recent_charges(conn: Connection, account: Account, limit: int, secret: bytes) -> list[Charge]:
    """The account's latest charges, newest first, with their receipts."""
    rows = conn.execute(select(charges).where(charges.c.account_id == account.id)
                        .order_by(charges.c.transaction_id.desc()).limit(limit)).all()
    return [charge_of(conn, row, account.name, secret, replayed=False) for row in rows]
