"""Escrow: royalties on documents whose owner is not verified (docs/LEDGER.md "Owners, not first comers").

Anyone may publish a well-known text first. So the royalty of a read of a document anyone may read (licence `public`
or `priced`) whose publisher has not proved control of its `source` (kvmart/ledger/ownership.py) is not paid to
the publisher: it goes to the house account `escrow`, with an escrow row naming the charge, the reader who paid it
and the date it falls due. Then, whichever comes first:

- its owner is verified (the publisher proves control of the source's origin, or a verified owner publishes the
  same text and takes the licence over): every open row of that document is paid to the owner (`escrow_release`);
- the period ends (`escrow_days`, default 30, KVMART_ESCROW_DAYS): the row is refunded to the reader who paid it
  (`escrow_refund`; `refund_due`, run at each server start, hourly while it runs, and by `kvmart ledger escrow
  --refund-due`).

Private documents pay their publisher at once: their readers are accounts the publisher chose itself. Every move is
a balanced transaction; the escrow account's balance always equals the sum of the open rows (`mismatch`, part of
the ledger's health check)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import func, insert, select, update
from sqlalchemy.engine import Connection, Row

from kvmart.ledger.accounts import ESCROW, get_account
from kvmart.ledger.entries import post
from kvmart.ledger.licences import Licence
from kvmart.ledger.schema import accounts
from kvmart.ledger.schema import escrow as rows

DEFAULT_DAYS = 30
DAY_SECONDS = 86_400


@dataclass(frozen=True)
class Payout:
    transaction_id: int | None  # None: nothing was open
    amount_nanousd: int
    receipts: int  # escrow rows settled


def royalty_account(conn: Connection, licence: Licence | None) -> tuple[int | None, bool]:
    """Who a read of a document under `licence` pays its royalty to, and whether that is escrow."""
    if licence is None:
        return None, False
    if not licence.is_open or licence.is_owner_verified:
        return licence.publisher_id, False
    return get_account(conn, ESCROW).id, True


def hold(conn: Connection, transaction_id: int, cache_id: str, payer_id: int, amount_nanousd: int, now: int,
         period_seconds: int) -> None:
    """Record a royalty just posted to the escrow account (in the charge's transaction)."""
    conn.execute(insert(rows).values(transaction_id=transaction_id, cache_id=cache_id, payer_id=payer_id,
                                     amount_nanousd=amount_nanousd, created_at=now,
                                     release_after=now + period_seconds))


def release_to_owner(conn: Connection, cache_id: str, owner_id: int, now: int) -> Payout:
    """Pay every open escrow row of `cache_id` to its verified owner, in one transaction."""
    open_rows = conn.execute(select(rows.c.transaction_id, rows.c.cache_id, rows.c.amount_nanousd)
                             .where(rows.c.cache_id == cache_id, rows.c.settled_at.is_(None))).all()
    total = sum(r.amount_nanousd for r in open_rows)
    if not open_rows:
        return Payout(None, 0, 0)
    txn = post(conn, "escrow_release", [(get_account(conn, ESCROW).id, -total), (owner_id, total)], memo=cache_id)
    _settle(conn, open_rows, now, "owner", owner_id, txn)
    return Payout(txn, total, len(open_rows))


def refund_due(conn: Connection, now: int) -> Payout:
    """Refund every open row whose period has ended to the reader who paid it (one transaction per reader)."""
    due = conn.execute(select(rows.c.transaction_id, rows.c.cache_id, rows.c.payer_id, rows.c.amount_nanousd)
                       .where(rows.c.settled_at.is_(None), rows.c.release_after <= now)).all()
    by_payer: dict[int, list] = defaultdict(list)
    for row in due:
        by_payer[row.payer_id].append(row)
    escrow_id, total, last = get_account(conn, ESCROW).id, 0, None
    for payer_id, owed in sorted(by_payer.items()):
        amount = sum(r.amount_nanousd for r in owed)
        last = post(conn, "escrow_refund", [(escrow_id, -amount), (payer_id, amount)])
        _settle(conn, owed, now, "refunded", payer_id, last)
        total += amount
    return Payout(last, total, len(due))


def _settle(conn: Connection, settled: Sequence[Row], now: int, outcome: str, paid_to: int, txn: int) -> None:
    """Mark escrow rows (their transaction_id and cache_id: a charge that read several documents has several)."""
    for row in settled:
        conn.execute(update(rows).where(rows.c.transaction_id == row.transaction_id, rows.c.cache_id == row.cache_id)
                     .values(settled_at=now, outcome=outcome, paid_to=paid_to, settlement_id=txn))


def open_nanousd(conn: Connection, cache_id: str | None = None) -> int:
    """Money held in escrow (for one document, or in all)."""
    query = select(func.coalesce(func.sum(rows.c.amount_nanousd), 0)).where(rows.c.settled_at.is_(None))
    if cache_id is not None:
        query = query.where(rows.c.cache_id == cache_id)
    return int(conn.execute(query).scalar_one())


def mismatch(conn: Connection) -> int:
    """The escrow account's balance less the open rows: 0 in a sound ledger."""
    balance = conn.execute(select(accounts.c.balance_nanousd).where(accounts.c.name == ESCROW)).scalar()
    return int(balance or 0) - open_nanousd(conn)
