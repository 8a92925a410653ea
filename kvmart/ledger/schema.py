"""The ledger's tables (SQLAlchemy Core), the same on SQLite and PostgreSQL. Money columns are BigInteger
nano-dollars; prices kept per document are Decimal text (exact on every database). The schema changes only through
named migrations (migrations.py)."""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, ForeignKey, Index, Integer, MetaData, String, Table, Text, UniqueConstraint

metadata = MetaData()

# one row per party: publishers, agents, the admin, and the house accounts `provider` and `external`
accounts = Table(
    "accounts", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("role", String(16), nullable=False),  # admin | publisher | agent | provider | external
    Column("tenant_salt", String(64), nullable=False),  # salts this tenant's private caches; never sent out
    Column("balance_nanousd", BigInteger, nullable=False, default=0),  # always the sum of its entries
    Column("created_at", BigInteger, nullable=False),
)

api_keys = Table(
    "api_keys", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("account_id", Integer, ForeignKey("accounts.id"), nullable=False, index=True),
    Column("key_hash", String(64), nullable=False, unique=True),  # sha256 of the key; the key is never stored
    Column("prefix", String(16), nullable=False),  # the key's first characters, to name it in listings
    Column("created_at", BigInteger, nullable=False),
    Column("revoked_at", BigInteger, nullable=True),
)

# a published document's terms; a cache id without a row is public, with no publisher (precomputed by the CLI)
licences = Table(
    "licences", metadata,
    Column("cache_id", String(64), primary_key=True),
    Column("publisher_id", Integer, ForeignKey("accounts.id"), nullable=False, index=True),
    Column("kind", String(16), nullable=False),  # public | private | priced
    Column("salt", String(64), nullable=False),  # the publisher's tenant salt for private caches, else ''
    Column("cache_read_usd_per_mtok", String(40), nullable=True),  # Decimal text; priced documents
    Column("royalty_share", String(40), nullable=True),  # Decimal text; None: the tariff's
    Column("num_tokens", Integer, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("source", Text, nullable=True),  # the URL the publisher names as the text's origin (0004)
    Column("owner_verified_at", BigInteger, nullable=True),  # when the publisher proved control of it (0004)
)

licence_readers = Table(
    "licence_readers", metadata,
    Column("cache_id", String(64), ForeignKey("licences.cache_id", ondelete="CASCADE"), primary_key=True),
    Column("account_id", Integer, ForeignKey("accounts.id"), primary_key=True),
)

# double entry: every transaction's entries sum to zero
transactions = Table(
    "transactions", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("kind", String(16), nullable=False),  # deposit | charge | precompute
    Column("memo", Text, nullable=False, default=""),
    Column("created_at", BigInteger, nullable=False),
)

entries = Table(
    "entries", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("transaction_id", Integer, ForeignKey("transactions.id"), nullable=False, index=True),
    Column("account_id", Integer, ForeignKey("accounts.id"), nullable=False, index=True),
    Column("amount_nanousd", BigInteger, nullable=False),  # credit > 0, debit < 0
)

# the detail of each request charge (one transaction), with its signed receipt
charges = Table(
    "charges", metadata,
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
    Column("signature", String(64), nullable=False),  # the HMAC of the receipt's first fields (receipts.py)
    Column("created_at", BigInteger, nullable=False),
    Column("key_id", String(64), nullable=True),  # the Ed25519 key that signed the receipt; None: HMAC only (0003)
    Column("receipt_signature", String(128), nullable=True),  # its Ed25519 signature, base64url (0003)
    Column("licensee_id", Integer, nullable=True),  # the publisher of the document read, then (0004)
    UniqueConstraint("account_id", "idempotency_key", name="uq_charges_idempotency"),
    Index("ix_charges_account", "account_id"),
    Index("ix_charges_cache", "cache_id"),
)

# every document one charge read, in order (0006): its tokens, its publisher then (licensee), and where the royalty
# on them went (the publisher, or escrow)
charge_reads = Table(
    "charge_reads", metadata,
    Column("transaction_id", Integer, ForeignKey("transactions.id"), primary_key=True),
    Column("position", Integer, primary_key=True),
    Column("cache_id", String(64), nullable=False, index=True),
    Column("licensee_id", Integer, ForeignKey("accounts.id"), nullable=True, index=True),
    Column("royalty_to", Integer, ForeignKey("accounts.id"), nullable=True),
    Column("cached_tokens", Integer, nullable=False),
    Column("royalty_nanousd", BigInteger, nullable=False),
)

# money reserved for a request in flight (its largest possible charge); settled or released when it ends
holds = Table(
    "holds", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("account_id", Integer, ForeignKey("accounts.id"), nullable=False, index=True),
    Column("amount_nanousd", BigInteger, nullable=False),
    Column("idempotency_key", String(255), nullable=True),
    Column("created_at", BigInteger, nullable=False),
    Column("node", String(128), nullable=False, server_default=""),  # the node whose request it is (0007)
    Column("expires_at", BigInteger, nullable=False, server_default="0"),  # its lease: renewed while it runs (0007)
    UniqueConstraint("account_id", "idempotency_key", name="uq_holds_idempotency"),
    Index("ix_holds_node", "node"),
)

# the answer to a charged request sent with an Idempotency-Key, so that a retry gets the same answer (0002)
responses = Table(
    "responses", metadata,
    Column("account_id", Integer, ForeignKey("accounts.id"), primary_key=True),
    Column("idempotency_key", String(255), primary_key=True),
    Column("body", Text, nullable=False),  # the response's JSON
    Column("created_at", BigInteger, nullable=False),
)

# the provider's receipt signing keys: the current one has no valid_until; old ones stay, so old receipts verify (0003)
signing_keys = Table(
    "signing_keys", metadata,
    Column("key_id", String(64), primary_key=True),  # RFC 7638 thumbprint of the public key (base64url)
    Column("algorithm", String(16), nullable=False),  # Ed25519
    Column("public_key", String(64), nullable=False),  # base64url, 32 bytes
    Column("private_key", Text, nullable=False),  # base64url, the 32-byte seed
    Column("valid_from", BigInteger, nullable=False),
    Column("valid_until", BigInteger, nullable=True),
    Column("created_at", BigInteger, nullable=False),
)

# a publisher's claim to control an origin (scheme://host:port), proved by serving `token` at a well-known path (0004)
origin_claims = Table(
    "origin_claims", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("account_id", Integer, ForeignKey("accounts.id"), nullable=False, index=True),
    Column("origin", String(255), nullable=False, index=True),
    Column("token", String(64), nullable=False, unique=True),
    Column("created_at", BigInteger, nullable=False),
    Column("verified_at", BigInteger, nullable=True),
    UniqueConstraint("account_id", "origin", name="uq_origin_claims_account"),
)

# the royalty of a read of an unverified document anyone may read, held until its owner claims it or refunded (0004)
escrow = Table(
    "escrow", metadata,
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

# how an uploaded document was checked: chunks, checked chunks, the stated bound (kvmart/reuse/upload.py) (0005)
upload_checks = Table(
    "upload_checks", metadata,
    Column("cache_id", String(64), primary_key=True),
    Column("account_id", Integer, ForeignKey("accounts.id"), nullable=False),
    Column("checked", Text, nullable=False),  # the check plan's JSON
    Column("created_at", BigInteger, nullable=False),
)

# an upload whose recomputation differed: the account uploads no more until the operator allows it (0005)
upload_refusals = Table(
    "upload_refusals", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("account_id", Integer, ForeignKey("accounts.id"), nullable=False, index=True),
    Column("reason", Text, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("cleared_at", BigInteger, nullable=True),
)

# a publication in progress: written before its artifact is stored, deleted with its licence in one transaction;
# one left behind names an artifact that may be stored, public and unpaid: removed at start-up (0008)
publications = Table(
    "publications", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("cache_id", String(64), nullable=False),
    Column("publisher_id", Integer, ForeignKey("accounts.id"), nullable=False),
    Column("node", String(128), nullable=False, index=True),  # the node publishing it
    Column("created_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=False),  # its lease, renewed with the node's holds
)

meta = Table(
    "meta", metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

schema_migrations = Table(
    "schema_migrations", metadata,
    Column("name", String(128), primary_key=True),
    Column("applied_at", BigInteger, nullable=False),
)
