"""Uploaded artifacts in the ledger (kvmart/reuse/upload.py checks them): how much of each the provider recomputed
and the bound that bought, recorded on the document; and a strike rule that keeps a sampled check honest. A forger
whose upload was caught could otherwise retry until a sample misses its forgery; so an account with an upload
refused as a forgery uploads no more (it may still publish the text, which the provider prefills itself) until the
operator allows it again (`kvmart accounts allow-uploads NAME`). Functions run in the caller's transaction."""

from __future__ import annotations

import json
import time

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection

from kvmart.ledger.accounts import Account
from kvmart.ledger.schema import upload_checks, upload_refusals


def record_check(conn: Connection, cache_id: str, account: Account, checked: dict) -> None:
    if conn.execute(select(upload_checks.c.cache_id).where(upload_checks.c.cache_id == cache_id)).first() is None:
        conn.execute(insert(upload_checks).values(cache_id=cache_id, account_id=account.id,
                                                  checked=json.dumps(checked, sort_keys=True),
                                                  created_at=int(time.time())))


def check_of(conn: Connection, cache_id: str) -> dict | None:
    row = conn.execute(select(upload_checks.c.checked).where(upload_checks.c.cache_id == cache_id)).first()
    return None if row is None else json.loads(row.checked)


def record_refusal(conn: Connection, account: Account, reason: str) -> None:
    conn.execute(insert(upload_refusals).values(account_id=account.id, reason=reason[:2000],
                                                created_at=int(time.time())))


def may_upload(conn: Connection, account: Account) -> bool:
    return conn.execute(select(upload_refusals.c.id).where(upload_refusals.c.account_id == account.id,
                                                           upload_refusals.c.cleared_at.is_(None))).first() is None


def allow(conn: Connection, account: Account) -> int:
    """Clear the account's refusals; how many."""
    return conn.execute(update(upload_refusals).where(upload_refusals.c.account_id == account.id,
                                                      upload_refusals.c.cleared_at.is_(None))
                        .values(cleared_at=int(time.time()))).rowcount
