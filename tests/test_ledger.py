"""The ledger (kvmart/ledger/), on SQLite and on a real PostgreSQL: accounts and keys, tariffs, 402, idempotency,
receipts, licences, the precompute fee and reports."""

from __future__ import annotations

import time
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from kvmart.errors import (
    AccountError,
    AuthenticationError,
    IdempotencyConflictError,
    InsufficientFundsError,
    TariffError,
)
from kvmart.ledger import Hold, Tariff, Terms, open_ledger, parse_money, quote
from kvmart.ledger.schema import api_keys, entries, licences
from kvmart.ledger.tariffs import NANO_PER_USD, load_tariff


@pytest.fixture
def ledger(ledger_url, tmp_path):
    book = open_ledger(ledger_url, tmp_path, environ={})
    yield book
    book.close()


def funded(ledger, name: str, role: str, usd: str) -> tuple:
    account, key = ledger.create_account(name, role)
    if Decimal(usd) > 0:
        ledger.deposit(name, Decimal(usd))
    return ledger.account(name), key


def test_keys_are_shown_once_and_stored_hashed(ledger):
    account, key = ledger.create_account("alice", "agent")
    assert key.startswith("kvm_") and len(key) > 40
    assert ledger.authenticate(key) == account
    stored = ledger.run(lambda conn: [tuple(r) for r in conn.execute(select(api_keys))])
    assert not any(key in str(v) for row in stored for v in row)
    for bad in ("kvm_nope", key + "x", ""):
        with pytest.raises(AuthenticationError):
            ledger.authenticate(bad)
    second = ledger.issue_key("alice")
    assert ledger.authenticate(second).name == "alice"
    assert ledger.revoke_keys("alice") == 2
    with pytest.raises(AuthenticationError, match="revoked"):
        ledger.authenticate(key)


def test_bad_accounts_are_refused(ledger):
    ledger.create_account("bob", "publisher")
    for name, role in (("bob", "agent"), ("Bad Name", "agent"), ("-x", "agent"), ("carol", "admin"),
                       ("dave", "provider"), ("provider", "agent")):
        with pytest.raises(AccountError):
            ledger.create_account(name, role)
    with pytest.raises(AccountError):
        ledger.deposit("nobody-here", Decimal(1))


def test_the_admin_key_is_made_once_or_taken_from_the_environment(ledger_url, tmp_path):
    first = open_ledger(ledger_url, tmp_path, environ={})
    key = first.admin_key_issued
    assert key and first.authenticate(key).is_admin
    again = open_ledger(ledger_url, tmp_path, environ={})
    assert again.admin_key_issued is None and again.authenticate(key).is_admin
    configured = open_ledger(ledger_url, tmp_path, environ={"KVMART_ADMIN_KEY": "operator-secret-0123456789"})
    assert configured.admin_key_issued is None
    assert configured.authenticate("operator-secret-0123456789").is_admin
    for book in (first, again, configured):
        book.close()


def test_tariff_defaults_and_exact_arithmetic():
    t = Tariff()
    assert all(isinstance(v, Decimal) for v in (t.prefill_usd_per_mtok, t.cache_read_fraction,
                                                t.output_usd_per_mtok, t.royalty_share, t.precompute_usd_per_mtok))
    q = quote(t, cached_tokens=3774, computed_tokens=20, output_tokens=10, has_publisher=True)
    # 3,774 x $1/1M x 0.1 = $0.0003774; royalty 0.4 of it; 20 x $1/1M; 10 x $4/1M
    assert (q.cache_read_nanousd, q.royalty_nanousd) == (377_400, 150_960)
    assert (q.computed_nanousd, q.output_nanousd) == (20_000, 40_000)
    assert q.saved_nanousd == 3_774_000 - 377_400
    assert q.total_nanousd == q.provider_nanousd + q.royalty_nanousd == 437_400
    assert quote(t, 3774, 20, 10, has_publisher=False).royalty_nanousd == 0


@settings(max_examples=300, deadline=None)
@given(cached=st.integers(0, 10**7), computed=st.integers(0, 10**7), output=st.integers(0, 10**6),
       price=st.decimals(0, 100, places=4), fraction=st.decimals(0, 1, places=3), share=st.decimals(0, 1, places=3),
       priced=st.one_of(st.none(), st.decimals(0, 50, places=5)))
def test_every_quote_splits_exactly(cached, computed, output, price, fraction, share, priced):
    t = Tariff(prefill_usd_per_mtok=price, cache_read_fraction=fraction, royalty_share=share,
               cache_read_usd_per_mtok=priced)
    q = quote(t, cached, computed, output, has_publisher=True)
    assert q.provider_nanousd + q.royalty_nanousd == q.total_nanousd  # the legs of a charge sum to zero
    assert 0 <= q.royalty_nanousd <= q.cache_read_nanousd and q.provider_nanousd >= 0
    exact_read = Decimal(cached) * t.read_usd_per_mtok / 10**6 * NANO_PER_USD
    assert abs(q.cache_read_nanousd - exact_read) <= Decimal("0.5")


def test_bad_prices_are_refused():
    for value in ("-1", "abc", "nan", "inf", True, None, [1]):
        with pytest.raises(TariffError):
            parse_money(value, "price")
    assert parse_money("0.25", "p") == Decimal("0.25") and parse_money(0.1, "p") == Decimal("0.1")
    with pytest.raises(TariffError):
        Tariff(prefill_usd_per_mtok=1.0)  # a float: never money
    with pytest.raises(TariffError):
        Tariff(royalty_share=Decimal("1.5"))
    with pytest.raises(TariffError):
        load_tariff({"KVMART_PREFILL_USD_PER_MTOK": "-3"})
    assert load_tariff({"KVMART_ROYALTY_SHARE": "0.25"}).royalty_share == Decimal("0.25")
    with pytest.raises(TariffError):
        Terms("priced")  # a priced licence needs its price
    with pytest.raises(TariffError):
        Terms("public", readers=("x",))


def test_insufficient_funds_is_refused_and_charges_nothing(ledger):
    agent, _ = funded(ledger, "poor", "agent", "0.0001")  # 100,000 nano-dollars
    before = ledger.run(lambda conn: conn.execute(select(entries)).all())
    with pytest.raises(InsufficientFundsError) as refused:
        ledger.open_hold(agent, 100_001, None, "h")
    assert refused.value.needed_nanousd == 100_001 and refused.value.available_nanousd == 100_000
    assert ledger.run(lambda conn: conn.execute(select(entries)).all()) == before
    hold = ledger.open_hold(agent, 60_000, None, "h")  # holds count against what is left
    with pytest.raises(InsufficientFundsError):
        ledger.open_hold(agent, 60_000, None, "h2")
    ledger.release(hold)
    assert isinstance(ledger.open_hold(agent, 60_000, None, "h2"), Hold)
    assert ledger.account("poor").balance_nanousd == 100_000 and ledger.health().is_sound


def test_an_idempotency_key_is_charged_once(ledger):
    agent, _ = funded(ledger, "agent", "agent", "1")
    hold = ledger.open_hold(agent, 50_000, "retry-1", "body-a")
    with pytest.raises(IdempotencyConflictError, match="still running"):
        ledger.open_hold(agent, 50_000, "retry-1", "body-a")
    charge = ledger.settle(hold, quote(Tariff(), 100, 10, 5, False), None, None)
    with pytest.raises(IdempotencyConflictError, match="already charged for this request"):
        ledger.open_hold(agent, 50_000, "retry-1", "body-a")  # never held (and computed) again: replayed or refused
    with pytest.raises(IdempotencyConflictError, match="no complete answer was kept"):
        ledger.stored_response(agent, "retry-1", "body-a")  # nothing was remembered for it
    ledger.remember_response(agent, "retry-1", '{"kept": true}')
    assert ledger.stored_response(agent, "retry-1", "body-a") == '{"kept": true}'
    with pytest.raises(IdempotencyConflictError, match="different request"):
        ledger.open_hold(agent, 50_000, "retry-1", "body-b")
    assert ledger.account("agent").balance_nanousd == NANO_PER_USD - charge.quote.total_nanousd
    assert ledger.usage(agent).requests == 1


def test_receipts_verify_and_tampered_ones_fail(ledger):
    agent, _ = funded(ledger, "agent", "agent", "1")
    hold = ledger.open_hold(agent, 10**6, None, "h")
    receipt = ledger.settle(hold, quote(Tariff(), 500, 12, 7, False), None, None).receipt
    assert ledger.verify_receipt(receipt)
    tampered = [{**receipt, "account": "mallory"}, {**receipt, "created_at": receipt["created_at"] + 1},
                {**receipt, "nanousd": {**receipt["nanousd"], "total": receipt["nanousd"]["total"] - 1}},
                {**receipt, "tokens": {**receipt["tokens"], "cached": 0}},
                {**receipt, "signature": "0" * 64}, {**receipt, "extra": 1},
                {k: v for k, v in receipt.items() if k != "signature"}, "not a receipt"]
    assert not any(ledger.verify_receipt(t) for t in tampered)


def verified_owner(ledger, account, source: str) -> None:
    """`account` proved control of the origin of `source` (the provider found its token: tests/test_market.py)."""
    ledger.mark_claim_verified(ledger.new_claim(account, source))


def test_a_charge_pays_provider_and_publisher_exactly(ledger):
    publisher, _ = funded(ledger, "pub", "publisher", "1")
    agent, _ = funded(ledger, "reader", "agent", "1")
    verified_owner(ledger, publisher, "https://pub.example/")  # an owner's royalties are paid at once, not escrowed
    fee = ledger.publish("c" * 64, publisher, Terms("priced", cache_read_usd_per_mtok=Decimal("0.5"),
                                                    royalty_share=Decimal("0.6")), "", 3774,
                         source="https://pub.example/notes.txt")
    assert fee == 3_774_000  # 3,774 tokens at the precompute price, $1/1M
    licence = ledger.licence("c" * 64)
    used = ledger.quote(licence, 3774, 30, 8)
    assert used.cache_read_nanousd == 1_887_000 and used.royalty_nanousd == 1_132_200
    hold = ledger.open_hold(agent, used.total_nanousd, None, "h")
    ledger.settle(hold, used, licence, "c" * 64)
    assert ledger.account("reader").balance_nanousd == NANO_PER_USD - used.total_nanousd
    assert ledger.account("pub").balance_nanousd == NANO_PER_USD - fee + used.royalty_nanousd
    assert ledger.account("provider").balance_nanousd == fee + used.provider_nanousd
    [doc] = ledger.documents()
    assert (doc.reads, doc.royalty_nanousd, doc.precompute_nanousd, doc.publisher) == (1, 1_132_200, fee, "pub")
    assert ledger.usage(publisher).royalties_nanousd == 1_132_200 and ledger.health().is_sound


def test_the_first_publisher_keeps_a_licence_and_a_second_publish_charges_nothing(ledger):
    first, _ = funded(ledger, "first", "publisher", "1")
    second, _ = funded(ledger, "second", "publisher", "1")
    assert ledger.publish("b" * 64, first, Terms("public"), "", 1000) == 1_000_000
    assert ledger.publish("b" * 64, second, Terms("priced", cache_read_usd_per_mtok=Decimal("9")), "", 1000) is None
    assert ledger.licence("b" * 64).kind == "public" and ledger.documents()[0].publisher == "first"
    assert ledger.account("second").balance_nanousd == NANO_PER_USD and ledger.health().is_sound


def test_a_publisher_who_cannot_pay_the_precompute_fee_records_nothing(ledger):
    publisher, _ = funded(ledger, "broke", "publisher", "0")
    with pytest.raises(InsufficientFundsError):
        ledger.publish("d" * 64, publisher, Terms(), "", 1000)
    assert ledger.licence("d" * 64) is None
    assert ledger.run(lambda conn: conn.execute(select(licences)).all()) == []


def test_private_documents_are_hidden_from_other_tenants(ledger):
    owner, _ = funded(ledger, "owner", "publisher", "1")
    friend, _ = funded(ledger, "friend", "agent", "1")
    stranger, _ = funded(ledger, "stranger", "agent", "1")
    ledger.publish("e" * 64, owner, Terms("private", readers=("friend",)), owner.tenant_salt, 10)
    ledger.publish("f" * 64, owner, Terms("public"), "", 10)
    assert ledger.readable(stranger) == frozenset()
    assert ledger.readable(friend) == ledger.readable(owner) == frozenset({"e" * 64})
    assert ledger.readable(ledger.account("admin")) is None
    assert ledger.salt_of("e" * 64) == owner.tenant_salt and ledger.salt_of("f" * 64) == ""
    assert owner.tenant_salt != friend.tenant_salt
    with pytest.raises(AccountError):
        ledger.publish("a" * 64, owner, Terms("private", readers=("ghost",)), owner.tenant_salt, 10)


def test_a_free_tariff_charges_nothing_and_still_balances(ledger_url, tmp_path):
    free = Tariff(prefill_usd_per_mtok=Decimal(0), output_usd_per_mtok=Decimal(0),
                  precompute_usd_per_mtok=Decimal(0))
    book = open_ledger(ledger_url, tmp_path, tariff=free, environ={})
    agent, _ = book.create_account("free-rider", "agent")
    used = book.quote(None, 1000, 10, 10)
    assert used.total_nanousd == 0
    charge = book.settle(book.open_hold(agent, 0, None, "h"), used, None, None)
    assert book.verify_receipt(charge.receipt) and book.health().is_sound
    assert book.usage(agent).requests == 1
    book.close()


def test_servers_starting_together_migrate_once(ledger_url, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from kvmart.ledger.migrations import MIGRATIONS
    from kvmart.ledger.schema import schema_migrations

    with ThreadPoolExecutor(4) as pool:
        books = list(pool.map(lambda _: open_ledger(ledger_url, tmp_path, environ={}), range(4)))
    assert sum(b.admin_key_issued is not None for b in books) == 1  # one admin key, made by whoever came first
    names = books[0].run(lambda conn: conn.execute(select(schema_migrations.c.name)).scalars().all())
    assert sorted(names) == [name for name, _ in MIGRATIONS]
    assert [a.name for a in books[0].accounts()] == ["provider", "external", "admin", "escrow"]
    for book in books:
        book.close()


def test_a_restarted_node_releases_its_own_holds_at_once(ledger):
    """Node `a` dies mid-request: its hold blocks the agent's money and its Idempotency-Key. When `a` starts again
    it releases its own holds at once (not an hour later); node `b`'s hold, still running, is kept."""
    agent, _ = funded(ledger, "agent", "agent", "0.001")
    ledger.start_node("a")
    ledger.open_hold(agent, 600_000, "order-1", "h")  # node a dies here: the request is never settled
    ledger.start_node("b")
    kept = ledger.open_hold(agent, 300_000, "order-2", "h")
    with pytest.raises(InsufficientFundsError):
        ledger.open_hold(agent, 200_000, None, "h")
    with pytest.raises(IdempotencyConflictError, match="still running"):
        ledger.open_hold(agent, 1, "order-1", "h")
    assert ledger.start_node("a") == 1  # a is back: its hold goes, b's stays
    assert isinstance(ledger.open_hold(agent, 600_000, "order-1", "h"), Hold)
    with pytest.raises(IdempotencyConflictError, match="still running"):
        ledger.open_hold(agent, 1, "order-2", "h")
    ledger.release(kept)
    assert ledger.health().is_sound


def test_no_hold_outlives_its_lease(ledger):
    """A node that never comes back stops renewing: its hold lapses with its lease (reserves nothing, blocks no
    key) and is deleted at any node's start; a running node's renewals keep its holds alive."""
    from sqlalchemy import update

    from kvmart.ledger.entries import HOLD_LEASE_SECONDS
    from kvmart.ledger.schema import holds

    agent, _ = funded(ledger, "agent", "agent", "0.001")
    ledger.start_node("dead")
    ledger.open_hold(agent, 10**6, "order-1", "h")
    with pytest.raises(InsufficientFundsError):
        ledger.open_hold(agent, 1, None, "h")
    expires = ledger.read(lambda conn: conn.execute(select(holds.c.expires_at)).scalar_one())
    assert expires <= int(time.time()) + HOLD_LEASE_SECONDS  # a lease, not an hour
    assert ledger.renew_holds() == 1  # while its node lives, renewed
    ledger.run(lambda conn: conn.execute(update(holds).values(expires_at=int(time.time()) - 1)))  # its lease lapsed
    ledger.start_node("live")
    assert ledger.renew_holds() == 0  # the live node has none: the dead node's is not renewed by anyone
    assert isinstance(ledger.open_hold(agent, 10**6, "order-1", "h"), Hold)  # its money and its key are free
    assert ledger.release_stale() == 0 and ledger.health().is_sound


def test_ledger_urls(tmp_path):
    from kvmart.errors import ConfigError
    from kvmart.ledger.db import ledger_url, redact

    assert ledger_url("", tmp_path) == f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    assert ledger_url("postgresql://kv@db:5432/ledger", tmp_path) == "postgresql+psycopg://kv@db:5432/ledger"
    assert ledger_url("postgres://kv@db/ledger", tmp_path) == "postgresql+psycopg://kv@db/ledger"
    assert ledger_url("postgresql+psycopg://kv@db/l", tmp_path) == "postgresql+psycopg://kv@db/l"
    with pytest.raises(ConfigError, match="known: sqlite"):
        ledger_url("mysql://root:hunter2@db/x", tmp_path)
    assert "hunter2" not in redact("postgresql://kv:hunter2@db/ledger")


def test_a_database_at_an_older_version_is_migrated_forward(ledger_url, tmp_path):
    from sqlalchemy import delete, inspect, text

    from kvmart.ledger.schema import holds, responses, schema_migrations

    old = open_ledger(ledger_url, tmp_path, environ={})
    old.create_account("kept", "agent")
    old.deposit("kept", Decimal(1))
    old.open_hold(old.account("kept"), 5, None, "h")
    old.run(lambda conn: responses.drop(conn))  # as a ledger made before 0002 was
    for ddl in ("DROP INDEX ix_holds_node", "ALTER TABLE holds DROP COLUMN node",  # and before 0007
                "ALTER TABLE holds DROP COLUMN expires_at"):
        old.run(lambda conn, ddl=ddl: conn.execute(text(ddl)))
    old.run(lambda conn: conn.execute(delete(schema_migrations).where(schema_migrations.c.name != "0001_initial")))
    assert "responses" not in old.read(lambda conn: inspect(conn).get_table_names())
    old.close()
    new = open_ledger(ledger_url, tmp_path, environ={})
    assert "responses" in new.read(lambda conn: inspect(conn).get_table_names())
    assert new.account("kept").role == "agent"  # data kept
    [hold] = new.read(lambda conn: conn.execute(select(holds)).all())
    assert hold.node == "" and hold.expires_at == hold.created_at + 3600  # an old hold keeps the hour it had
    names = new.read(lambda conn: conn.execute(select(schema_migrations.c.name)).scalars().all())
    assert sorted(names) == ["0001_initial", "0002_stored_responses", "0003_receipt_keys", "0004_ownership",
                            "0005_uploads", "0006_charge_reads", "0007_hold_leases",
                            "0008_pending_publications"]
    new.close()


def test_the_migrations_build_exactly_the_current_schema(ledger_url, tmp_path):
    """Each migration runs its own frozen DDL (kvmart/ledger/migrations.py); run in order on an empty database they
    must give the tables, columns, keys and indexes that kvmart/ledger/schema.py describes, or a change to the
    schema was made without its migration."""
    from kvmart.ledger.schema import metadata

    book = open_ledger(ledger_url, tmp_path, environ={})
    try:
        built = book.read(lambda conn: describe_database(conn))
        dialect = book.engine.dialect
    finally:
        book.close()
    assert built == describe_metadata(metadata, dialect)


def describe_database(conn) -> dict:
    from sqlalchemy import inspect

    found = inspect(conn)
    described = {}
    for name in found.get_table_names():
        unique = sorted(tuple(u["column_names"]) for u in found.get_unique_constraints(name))
        indexes = [(tuple(i["column_names"]), bool(i["unique"])) for i in found.get_indexes(name)]
        described[name] = {
            "columns": {c["name"]: (c["type"].compile(conn.dialect), c["nullable"]) for c in found.get_columns(name)},
            "primary_key": tuple(found.get_pk_constraint(name)["constrained_columns"]), "unique": unique,
            # a unique constraint is reported as an index too by some databases: count it once
            "indexes": sorted(i for i in indexes if not (i[1] and i[0] in unique))}
    return described


def describe_metadata(metadata, dialect) -> dict:
    from sqlalchemy import UniqueConstraint

    described = {}
    for table in metadata.tables.values():
        unique = {tuple(c.name for c in u.columns) for u in table.constraints if isinstance(u, UniqueConstraint)}
        unique |= {(c.name,) for c in table.columns if c.unique}
        indexes = [(tuple(c.name for c in i.columns), bool(i.unique)) for i in table.indexes]
        described[table.name] = {
            "columns": {c.name: (c.type.compile(dialect), c.nullable) for c in table.columns},
            "primary_key": tuple(c.name for c in table.primary_key.columns),
            "unique": sorted(unique), "indexes": sorted(indexes)}
    return described
