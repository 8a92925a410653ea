"""Accounts and their API keys. A key is shown once, when issued, and stored only as its sha256 (keys are 256
random bits, so a fast hash is enough: there is nothing to brute-force). Every function takes an open
connection and runs inside the caller's transaction.

Roles: `publisher` (publishes documents, earns royalties), `agent` (reads, pays), `admin` (the operator: may do
anything, is never charged). Three house accounts exist from the start: `provider` (earns what a request pays
beyond royalties), `external` (the other side of deposits: its balance is minus the money paid in) and `escrow`
(royalties held until a document's owner claims them, or refunded: kvmart/ledger/escrow.py)."""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection, Row

from kvmart.errors import AccountError, AuthenticationError
from kvmart.ledger.schema import accounts, api_keys

USER_ROLES = ("publisher", "agent", "admin")
HOUSE_ROLES = ("provider", "external", "escrow")
PROVIDER, EXTERNAL, ADMIN, ESCROW = "provider", "external", "admin", "escrow"
KEY_PREFIX = "kvm_"
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


@dataclass(frozen=True)
class Account:
    id: int
    name: str
    role: str
    tenant_salt: str
    balance_nanousd: int
    created_at: int

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN

    @property
    def may_go_negative(self) -> bool:
        """Only `external` (money from outside) may: every other balance stays at or above zero."""
        return self.role == EXTERNAL


def account_of(row: Row) -> Account:
    return Account(row.id, row.name, row.role, row.tenant_salt, row.balance_nanousd, row.created_at)


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise AccountError(f"account name {name!r} must be 1-64 characters of a-z, 0-9, '.', '_' or '-', "
                           "starting with a letter or digit")
    return name


def create_account(conn: Connection, name: str, role: str) -> Account:
    """A new account with a zero balance and its own tenant salt. AccountError if the name is taken."""
    if role not in USER_ROLES + HOUSE_ROLES:
        raise AccountError(f"role {role!r} is not one of {', '.join(USER_ROLES)}")
    if find_account(conn, check_name(name)) is not None:
        raise AccountError(f"an account named {name!r} already exists")
    conn.execute(insert(accounts).values(name=name, role=role, tenant_salt=secrets.token_hex(16), balance_nanousd=0,
                                         created_at=int(time.time())))
    found = find_account(conn, name)
    assert found is not None
    return found


def find_account(conn: Connection, name: str) -> Account | None:
    row = conn.execute(select(accounts).where(accounts.c.name == name)).first()
    return account_of(row) if row else None


def get_account(conn: Connection, name: str) -> Account:
    found = find_account(conn, name)
    if found is None:
        raise AccountError(f"no account named {name!r} (see `kvmart accounts list`)")
    return found


def account_by_id(conn: Connection, account_id: int) -> Account:
    return account_of(conn.execute(select(accounts).where(accounts.c.id == account_id)).one())


def list_accounts(conn: Connection) -> list[Account]:
    return [account_of(r) for r in conn.execute(select(accounts).order_by(accounts.c.id))]


def lock_accounts(conn: Connection, ids: set[int]) -> dict[int, Account]:
    """Lock the rows of `ids` for this transaction (in id order, so two transactions never wait on each other in
    a cycle) and return them fresh. SQLite holds its one write lock already."""
    query = select(accounts).where(accounts.c.id.in_(sorted(ids))).order_by(accounts.c.id).with_for_update()
    return {r.id: account_of(r) for r in conn.execute(query)}


def ensure_house_accounts(conn: Connection) -> None:
    """`provider`, `external`, `admin` and `escrow` exist (idempotent)."""
    for name, role in ((PROVIDER, PROVIDER), (EXTERNAL, EXTERNAL), (ADMIN, ADMIN), (ESCROW, ESCROW)):
        if find_account(conn, name) is None:
            create_account(conn, name, role)


def issue_key(conn: Connection, account: Account, key: str | None = None) -> str:
    """A new API key for `account` (or record the given one, e.g. an admin key from the environment)."""
    key = key or KEY_PREFIX + secrets.token_urlsafe(32)
    if len(key) < 16:
        raise AccountError("an API key must be at least 16 characters long")
    if conn.execute(select(api_keys.c.id).where(api_keys.c.key_hash == key_hash(key))).first():
        raise AccountError("this API key is already in use")
    conn.execute(insert(api_keys).values(account_id=account.id, key_hash=key_hash(key), prefix=key[:12],
                                         created_at=int(time.time()), revoked_at=None))
    return key


def has_key(conn: Connection, account: Account) -> bool:
    query = select(api_keys.c.id).where(api_keys.c.account_id == account.id, api_keys.c.revoked_at.is_(None))
    return conn.execute(query).first() is not None


def authenticate(conn: Connection, key: str) -> Account:
    """The account whose live key this is; AuthenticationError for an unknown or revoked key."""
    row = conn.execute(select(api_keys.c.account_id, api_keys.c.revoked_at)
                       .where(api_keys.c.key_hash == key_hash(key))).first()
    if row is None:
        raise AuthenticationError("invalid API key")
    if row.revoked_at is not None:
        raise AuthenticationError("this API key has been revoked")
    return account_by_id(conn, row.account_id)


def revoke_keys(conn: Connection, account: Account) -> int:
    """Revoke every live key of `account`; how many were."""
    result = conn.execute(update(api_keys).where(api_keys.c.account_id == account.id, api_keys.c.revoked_at.is_(None))
                          .values(revoked_at=int(time.time())))
    return result.rowcount
