"""Named, ordered schema migrations. `migrate` applies those not yet recorded in `schema_migrations`, each in the
same transaction as its record, under a lock (PostgreSQL: an advisory lock; SQLite: BEGIN IMMEDIATE), so several
servers starting at once on one database migrate it exactly once. A migration is never edited once released:
changes come as a new one appended to `MIGRATIONS`.

Each migration holds its own frozen copy of the DDL it runs (table definitions as they were when it was released),
never today's `schema` module: `schema` describes the tables as they are now, for queries, and changes with every
migration, so a migration that read it would build tomorrow's tables on an old database and then skip the step that
should have altered them. tests/test_ledger.py checks that the migrations, run in order on an empty database, build
exactly the tables `schema` describes."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import (
    BigInteger,
    Column,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    insert,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Connection, Engine

from kvmart.ledger import schema
from kvmart.ledger.db import in_transaction

ADVISORY_LOCK_ID = 0x6B766D6172  # 'kvmar'
T = TypeVar("T")


def initial(conn: Connection) -> None:
    """Accounts, API keys, licences, double-entry transactions and entries, charges, holds, meta (as released)."""
    md = MetaData()
    # one row per party: publishers, agents, the admin, and the house accounts `provider` and `external`
    Table(
        "accounts", md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("name", String(64), nullable=False, unique=True),
        Column("role", String(16), nullable=False),  # admin | publisher | agent | provider | external
        Column("tenant_salt", String(64), nullable=False),  # salts this tenant's private caches; never sent out
        Column("balance_nanousd", BigInteger, nullable=False, default=0),  # always the sum of its entries
        Column("created_at", BigInteger, nullable=False),
    )

    Table(
        "api_keys", md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("account_id", Integer, ForeignKey("accounts.id"), nullable=False, index=True),
        Column("key_hash", String(64), nullable=False, unique=True),  # sha256 of the key; the key is never stored
        Column("prefix", String(16), nullable=False),  # the key's first characters, to name it in listings
        Column("created_at", BigInteger, nullable=False),
        Column("revoked_at", BigInteger, nullable=True),
    )

    # a published document's terms; a cache id without a row is public, with no publisher (precomputed by the CLI)
    Table(
        "licences", md,
        Column("cache_id", String(64), primary_key=True),
        Column("publisher_id", Integer, ForeignKey("accounts.id"), nullable=False, index=True),
        Column("kind", String(16), nullable=False),  # public | private | priced
        Column("salt", String(64), nullable=False),  # the publisher's tenant salt for private caches, else ''
        Column("cache_read_usd_per_mtok", String(40), nullable=True),  # Decimal text; priced documents
        Column("royalty_share", String(40), nullable=True),  # Decimal text; None: the tariff's
        Column("num_tokens", Integer, nullable=False),
        Column("created_at", BigInteger, nullable=False),
    )

    Table(
        "licence_readers", md,
        Column("cache_id", String(64), ForeignKey("licences.cache_id", ondelete="CASCADE"), primary_key=True),
        Column("account_id", Integer, ForeignKey("accounts.id"), primary_key=True),
    )

    # double entry: every transaction's entries sum to zero
    Table(
        "transactions", md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("kind", String(16), nullable=False),  # deposit | charge | precompute
        Column("memo", Text, nullable=False, default=""),
        Column("created_at", BigInteger, nullable=False),
    )

    Table(
        "entries", md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("transaction_id", Integer, ForeignKey("transactions.id"), nullable=False, index=True),
        Column("account_id", Integer, ForeignKey("accounts.id"), nullable=False, index=True),
        Column("amount_nanousd", BigInteger, nullable=False),  # credit > 0, debit < 0
    )

    # the detail of each request charge (one transaction), with its signed receipt
    Table(
        "charges", md,
        Column("transaction_id", Integer, ForeignKey("transactions.id"), primary_key=True),
        Column("account_id", Integer, ForeignKey("accounts.id"), nullable=False),
        Column("idempotency_key", String(255), nullable=True),
        Column("request_hash", String(64), nullable=False),
        Column("cache_id", String(64), nullable=True),
        Column("publisher_id", Integer, ForeignKey("accounts.id"), nullable=True),
        Column("cached_tokens", Integer, nullable=False),
        Column("computed_tokens", Integer, nullable=False),
        Column("output_tokens", Integer, nullable=False),
        Column("total_nanousd", BigInteger, nullable=False),
        Column("computed_nanousd", BigInteger, nullable=False),
        Column("cache_read_nanousd", BigInteger, nullable=False),
        Column("output_nanousd", BigInteger, nullable=False),
        Column("royalty_nanousd", BigInteger, nullable=False),
        Column("saved_nanousd", BigInteger, nullable=False),
        Column("signature", String(64), nullable=False),
        Column("created_at", BigInteger, nullable=False),
        UniqueConstraint("account_id", "idempotency_key", name="uq_charges_idempotency"),
        Index("ix_charges_account", "account_id"),
        Index("ix_charges_cache", "cache_id"),
    )

    # money reserved for a request in flight (its largest possible charge); settled or released when it ends
    Table(
        "holds", md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("account_id", Integer, ForeignKey("accounts.id"), nullable=False, index=True),
        Column("amount_nanousd", BigInteger, nullable=False),
        Column("idempotency_key", String(255), nullable=True),
        Column("created_at", BigInteger, nullable=False),
        UniqueConstraint("account_id", "idempotency_key", name="uq_holds_idempotency"),
    )

    Table(
        "meta", md,
        Column("key", String(64), primary_key=True),
        Column("value", Text, nullable=False),
    )
    md.create_all(conn)


def stored_responses(conn: Connection) -> None:
    """The answers of idempotent requests, replayed to their retries (as released)."""
    md = MetaData()
    Table("accounts", md, Column("id", Integer, primary_key=True))  # referenced only: not created here
    # the answer to a charged request sent with an Idempotency-Key, so that a retry gets the same answer (0002)
    Table(
        "responses", md,
        Column("account_id", Integer, ForeignKey("accounts.id"), primary_key=True),
        Column("idempotency_key", String(255), primary_key=True),
        Column("body", Text, nullable=False),  # the response's JSON
        Column("created_at", BigInteger, nullable=False),
    )
    md.tables["responses"].create(conn, checkfirst=True)


def add_columns(conn: Connection, table: str, columns: list[Column]) -> None:
    """ALTER TABLE ... ADD COLUMN for each of `columns` the table lacks (nullable columns only, so existing rows
    need no value); the types are compiled for the database at hand."""
    present = {c["name"] for c in inspect(conn).get_columns(table)}
    for column in columns:
        if column.name not in present:
            assert column.nullable, f"{table}.{column.name}: an added column must be nullable"
            kind = column.type.compile(conn.dialect)
            conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {column.name} {kind}"))


def receipt_keys(conn: Connection) -> None:
    """The provider's Ed25519 receipt keys, and each charge's public-key signature (as released)."""
    md = MetaData()
    # the provider's receipt signing keys: the current one has no valid_until; old ones stay, so old receipts verify
    Table(
        "signing_keys", md,
        Column("key_id", String(64), primary_key=True),  # RFC 7638 thumbprint of the public key (base64url)
        Column("algorithm", String(16), nullable=False),  # Ed25519
        Column("public_key", String(64), nullable=False),  # base64url, 32 bytes
        Column("private_key", Text, nullable=False),  # base64url, the 32-byte seed
        Column("valid_from", BigInteger, nullable=False),
        Column("valid_until", BigInteger, nullable=True),
        Column("created_at", BigInteger, nullable=False),
    )
    md.tables["signing_keys"].create(conn, checkfirst=True)
    add_columns(conn, "charges", [Column("key_id", String(64), nullable=True),  # None: an HMAC-only receipt
                                  Column("receipt_signature", String(128), nullable=True)])


def ownership(conn: Connection) -> None:
    """Owners and escrow: a licence's source and when its publisher proved control of it, publishers' origin
    claims, royalties held in escrow, and whose document each charge read (as released)."""
    md = MetaData()
    Table("accounts", md, Column("id", Integer, primary_key=True))  # referenced only: not created here
    Table("transactions", md, Column("id", Integer, primary_key=True))  # referenced only: not created here
    # a publisher's claim to control an origin (scheme://host:port), proved by serving `token` at a well-known path
    Table(
        "origin_claims", md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("account_id", Integer, ForeignKey("accounts.id"), nullable=False, index=True),
        Column("origin", String(255), nullable=False, index=True),
        Column("token", String(64), nullable=False, unique=True),
        Column("created_at", BigInteger, nullable=False),
        Column("verified_at", BigInteger, nullable=True),
        UniqueConstraint("account_id", "origin", name="uq_origin_claims_account"),
    )
    # the royalty of a read of an unverified document anyone may read, held until its owner claims it or refunded
    Table(
        "escrow", md,
        Column("transaction_id", Integer, ForeignKey("transactions.id"), primary_key=True),  # the charge
        Column("cache_id", String(64), primary_key=True, index=True),  # one row per document the charge read
        Column("payer_id", Integer, ForeignKey("accounts.id"), nullable=False),
        Column("amount_nanousd", BigInteger, nullable=False),
        Column("created_at", BigInteger, nullable=False),
        Column("release_after", BigInteger, nullable=False),  # refunded to the payer from then on, if unclaimed
        Column("settled_at", BigInteger, nullable=True),
        Column("outcome", String(16), nullable=True),  # owner | refunded
        Column("paid_to", Integer, nullable=True),  # the account credited
        Column("settlement_id", Integer, nullable=True),  # the transaction that paid it out
    )
    for name in ("origin_claims", "escrow"):
        md.tables[name].create(conn, checkfirst=True)
    add_columns(conn, "licences", [Column("source", Text, nullable=True),
                                   Column("owner_verified_at", BigInteger, nullable=True)])
    add_columns(conn, "charges", [Column("licensee_id", Integer, nullable=True)])
    # charges made before: the document's publisher then is its publisher now
    conn.execute(text("UPDATE charges SET licensee_id = (SELECT publisher_id FROM licences "
                      "WHERE licences.cache_id = charges.cache_id) WHERE licensee_id IS NULL"))


def uploads(conn: Connection) -> None:
    """Uploaded artifacts: how much of each the provider recomputed, and accounts whose upload was refused as a
    forgery (as released)."""
    md = MetaData()
    Table("accounts", md, Column("id", Integer, primary_key=True))  # referenced only: not created here
    # how an uploaded document was checked: chunks, checked chunks, the stated bound (kvmart/reuse/upload.py)
    Table(
        "upload_checks", md,
        Column("cache_id", String(64), primary_key=True),
        Column("account_id", Integer, ForeignKey("accounts.id"), nullable=False),
        Column("checked", Text, nullable=False),  # the check plan's JSON
        Column("created_at", BigInteger, nullable=False),
    )
    # an upload whose recomputation differed: the account uploads no more until the operator allows it
    Table(
        "upload_refusals", md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("account_id", Integer, ForeignKey("accounts.id"), nullable=False, index=True),
        Column("reason", Text, nullable=False),
        Column("created_at", BigInteger, nullable=False),
        Column("cleared_at", BigInteger, nullable=True),
    )
    for name in ("upload_checks", "upload_refusals"):
        md.tables[name].create(conn, checkfirst=True)


def charge_reads(conn: Connection) -> None:
    """Every document a charge read, with the royalty paid on it and where it went (a request may read several
    documents) (as released)."""
    md = MetaData()
    Table("accounts", md, Column("id", Integer, primary_key=True))  # referenced only: not created here
    Table("transactions", md, Column("id", Integer, primary_key=True))
    Table(
        "charge_reads", md,
        Column("transaction_id", Integer, ForeignKey("transactions.id"), primary_key=True),
        Column("position", Integer, primary_key=True),
        Column("cache_id", String(64), nullable=False, index=True),
        Column("licensee_id", Integer, ForeignKey("accounts.id"), nullable=True, index=True),
        Column("royalty_to", Integer, ForeignKey("accounts.id"), nullable=True),
        Column("cached_tokens", Integer, nullable=False),
        Column("royalty_nanousd", BigInteger, nullable=False),
    )
    md.tables["charge_reads"].create(conn, checkfirst=True)


def hold_leases(conn: Connection) -> None:
    """Holds name their node and carry a lease (as released): a restarted node releases its own holds at once, and
    no hold outlives its lease. Holds made before keep the hour they were given."""
    present = {c["name"] for c in inspect(conn).get_columns("holds")}
    if "node" not in present:
        conn.execute(text("ALTER TABLE holds ADD COLUMN node VARCHAR(128) DEFAULT '' NOT NULL"))
    if "expires_at" not in present:
        conn.execute(text("ALTER TABLE holds ADD COLUMN expires_at BIGINT DEFAULT 0 NOT NULL"))
        conn.execute(text("UPDATE holds SET expires_at = created_at + 3600"))
    if "ix_holds_node" not in {i["name"] for i in inspect(conn).get_indexes("holds")}:
        conn.execute(text("CREATE INDEX ix_holds_node ON holds (node)"))


def pending_publications(conn: Connection) -> None:
    """Publications in progress, so that one interrupted between storing its artifact and recording its licence
    is repaired at start-up (as released)."""
    md = MetaData()
    Table("accounts", md, Column("id", Integer, primary_key=True))  # referenced only: not created here
    Table(
        "publications", md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("cache_id", String(64), nullable=False),
        Column("publisher_id", Integer, ForeignKey("accounts.id"), nullable=False),
        Column("node", String(128), nullable=False, index=True),
        Column("created_at", BigInteger, nullable=False),
        Column("expires_at", BigInteger, nullable=False),
    )
    md.tables["publications"].create(conn, checkfirst=True)


MIGRATIONS: tuple[tuple[str, Callable[[Connection], None]], ...] = (
    ("0001_initial", initial),
    ("0002_stored_responses", stored_responses),
    ("0003_receipt_keys", receipt_keys),
    ("0004_ownership", ownership),
    ("0005_uploads", uploads),
    ("0006_charge_reads", charge_reads),
    ("0007_hold_leases", hold_leases),
    ("0008_pending_publications", pending_publications),
)


def migrate(engine: Engine, then: Callable[[Connection], T]) -> T:
    """Apply every pending migration, then run `then` (bootstrap) in the same transaction, under the lock."""

    def work(conn: Connection) -> T:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": ADVISORY_LOCK_ID})
        schema.schema_migrations.create(conn, checkfirst=True)
        done = set(conn.execute(select(schema.schema_migrations.c.name)).scalars())
        for name, step in MIGRATIONS:
            if name not in done:
                step(conn)
                conn.execute(insert(schema.schema_migrations).values(name=name, applied_at=int(time.time())))
        return then(conn)

    return in_transaction(engine, work)
