"""Double-entry postings. A transaction is a list of legs (account, signed nano-dollars) that sums to zero; it is
written with its entries and the balance updates in the caller's database transaction, after locking the accounts
it touches. No balance but `external`'s may end below zero: such a posting raises InsufficientFundsError and the
caller's transaction rolls back, so nothing of it is written."""

from __future__ import annotations

import time
from collections import defaultdict

from sqlalchemy import func, insert, select, update
from sqlalchemy.engine import Connection

from kvmart.errors import AccountError, InsufficientFundsError
from kvmart.ledger.accounts import EXTERNAL, Account, get_account, lock_accounts
from kvmart.ledger.schema import accounts, entries, holds, transactions
from kvmart.ledger.tariffs import usd_text

Leg = tuple[int, int]  # (account id, amount in nano-dollars: credit > 0, debit < 0)
# A hold lives on a lease: it reserves money until `expires_at`, which its node pushes forward every
# LEASE_RENEW_SECONDS while the request runs. A node that dies stops renewing, so its holds lapse within
# HOLD_LEASE_SECONDS (and a restarted node drops its own at once: kvmart/ledger/charges.py `start_node`).
HOLD_LEASE_SECONDS = 120
LEASE_RENEW_SECONDS = 30


def held_nanousd(conn: Connection, account_id: int) -> int:
    """Money reserved for the account's requests in flight (holds whose lease has not lapsed)."""
    total = conn.execute(select(func.coalesce(func.sum(holds.c.amount_nanousd), 0))
                         .where(holds.c.account_id == account_id, holds.c.expires_at >= int(time.time()))).scalar_one()
    return int(total)


def post(conn: Connection, kind: str, legs: list[Leg], memo: str = "", hold_exempt: int | None = None) -> int:
    """Write one balanced transaction; its id. `hold_exempt` names a hold whose money this posting spends (so it
    is not counted against the balance twice)."""
    net: dict[int, int] = defaultdict(int)
    for account_id, amount in legs:
        net[account_id] += amount
    if sum(net.values()) != 0:
        raise AssertionError(f"unbalanced transaction {kind}: legs sum to {sum(net.values())}")
    locked = lock_accounts(conn, set(net))
    for account_id, amount in net.items():
        check_covers(conn, locked[account_id], amount, hold_exempt)
    txn_id = conn.execute(insert(transactions).values(kind=kind, memo=memo, created_at=int(time.time()))
                          .returning(transactions.c.id)).scalar_one()
    rows = [{"transaction_id": txn_id, "account_id": a, "amount_nanousd": n} for a, n in net.items() if n]
    if rows:  # a free request (zero prices) is a transaction without entries
        conn.execute(insert(entries), rows)
    for account_id, amount in net.items():
        if amount:
            conn.execute(update(accounts).where(accounts.c.id == account_id)
                         .values(balance_nanousd=accounts.c.balance_nanousd + amount))
    return int(txn_id)


def check_covers(conn: Connection, account: Account, amount: int, hold_exempt: int | None = None) -> None:
    """InsufficientFundsError if adding `amount` would take the account's available money below zero."""
    if amount >= 0 or account.may_go_negative:
        return
    held = held_nanousd(conn, account.id)
    if hold_exempt is not None:
        held -= conn.execute(select(func.coalesce(func.sum(holds.c.amount_nanousd), 0))
                             .where(holds.c.id == hold_exempt, holds.c.expires_at >= int(time.time()))).scalar_one()
    available = account.balance_nanousd - held
    if available + amount < 0:
        raise InsufficientFundsError(
            f"insufficient funds: account {account.name!r} has ${usd_text(available)} available "
            f"(balance ${usd_text(account.balance_nanousd)}, ${usd_text(held)} held for requests in flight) "
            f"and this needs ${usd_text(-amount)}; nothing was charged", -amount, available)


MAX_DEPOSIT_NANOUSD = 10**6 * 10**9  # one deposit: at most $1,000,000 (tariffs.MAX_USD)
MAX_BALANCE_NANOUSD = 10**18  # $1,000,000,000: every balance stays well inside a 64-bit integer (9.2e18)
DEPOSIT_ROLES = ("publisher", "agent")  # the accounts that pay; the house accounts and the admin are not paid into


def deposit(conn: Connection, account: Account, amount_nanousd: int, memo: str = "") -> int:
    """Money paid in from outside: `external` -> the account (a publisher or an agent). AccountError for a
    house account or the admin, an amount not positive or above MAX_DEPOSIT_NANOUSD, or one that would take a
    balance beyond MAX_BALANCE_NANOUSD (the database's integers must never overflow)."""
    if account.role not in DEPOSIT_ROLES:
        raise AccountError(f"deposits are paid into publisher and agent accounts; {account.name!r} is "
                           f"{article(account.role)} {account.role} account", "name")
    if not 0 < amount_nanousd <= MAX_DEPOSIT_NANOUSD:
        raise AccountError(f"a deposit must be positive and at most ${usd_text(MAX_DEPOSIT_NANOUSD)}, got "
                           f"${usd_text(amount_nanousd)}", "usd")
    external = get_account(conn, EXTERNAL)
    if account.balance_nanousd + amount_nanousd > MAX_BALANCE_NANOUSD or \
            external.balance_nanousd - amount_nanousd < -MAX_BALANCE_NANOUSD:
        raise AccountError(f"this deposit would take a balance beyond the ledger's ${usd_text(MAX_BALANCE_NANOUSD)}",
                           "usd")
    return post(conn, "deposit", [(external.id, -amount_nanousd), (account.id, amount_nanousd)], memo)


def article(word: str) -> str:
    """'a' or 'an', as `word` is spoken (the roles: an agent, an admin, a publisher)."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def entries_sum(conn: Connection) -> int:
    """The sum of every entry ever written: zero in a sound ledger."""
    return int(conn.execute(select(func.coalesce(func.sum(entries.c.amount_nanousd), 0))).scalar_one())


def unbalanced_accounts(conn: Connection) -> list[str]:
    """Accounts whose balance column differs from the sum of their entries (none in a sound ledger)."""
    sums = dict(conn.execute(select(entries.c.account_id, func.sum(entries.c.amount_nanousd))
                             .group_by(entries.c.account_id)).all())
    return [r.name for r in conn.execute(select(accounts)) if int(sums.get(r.id, 0)) != r.balance_nanousd]
