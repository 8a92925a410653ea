"""The Ledger: the one object the server and the CLI use. Each method is one database transaction (all or
nothing) and is safe to call from any thread, and from several processes on one database."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from kvmart.errors import AccountError, AuthenticationError, LedgerError
from kvmart.ledger import accounts as acc
from kvmart.ledger import charges, entries, escrow, keys, licences, ownership, receipts, reports
from kvmart.ledger.accounts import Account
from kvmart.ledger.charges import Charge, Hold, Read
from kvmart.ledger.db import in_transaction, ledger_url, open_engine, redact
from kvmart.ledger.entries import HOLD_LEASE_SECONDS
from kvmart.ledger.licences import Licence, Terms
from kvmart.ledger.market import Market
from kvmart.ledger.migrations import migrate
from kvmart.ledger.tariffs import Quote, Tariff, load_tariff, precompute_cost, quote, to_nanousd

ADMIN_KEY_ENV = "KVMART_ADMIN_KEY"
LICENCE_TTL_SECONDS = 5.0
SECRET_ENV = "KVMART_LEDGER_SECRET"
ESCROW_DAYS_ENV = "KVMART_ESCROW_DAYS"
T = TypeVar("T")


@dataclass(frozen=True)
class Health:
    entries_sum_nanousd: int  # 0 in a sound ledger
    unbalanced_accounts: list[str]  # balance column != sum of entries
    negative_accounts: list[str]  # below zero (only `external` may be)
    escrow_mismatch_nanousd: int = 0  # the escrow account's balance less its open rows: 0 in a sound ledger

    @property
    def is_sound(self) -> bool:
        return (self.entries_sum_nanousd == 0 and not self.unbalanced_accounts and not self.negative_accounts
                and self.escrow_mismatch_nanousd == 0)


class Ledger(Market):
    """Accounts, licences and money. Build with `open_ledger`. The market between parties (public-key receipts,
    statements, ownership claims, escrow) is in kvmart/ledger/market.py."""

    def __init__(self, url: str, tariff: Tariff, secret: str | None,
                 escrow_seconds: int = escrow.DEFAULT_DAYS * escrow.DAY_SECONDS) -> None:
        self.url = url
        self.engine = open_engine(url)
        self.tariff = tariff
        self._configured_secret = secret
        self.admin_key_issued: str | None = None  # the admin key made at first start, to print once
        self._secret = b""
        self._salts: dict[str, str] = {}
        self.node = ""  # the server node this object serves (`start_node`); its holds carry the name
        # licences looked up by requests, kept LICENCE_TTL_SECONDS: a document's terms are part of its cache id and
        # change only by a verified owner's claim (this process forgets at once; another node's, within the TTL);
        # a charge reads the licence afresh when it settles, so royalties always go where the licence says then
        self._licences: dict[str, tuple[float, Licence]] = {}
        self.keyring = keys.Keyring()  # the provider's Ed25519 keys (receipts, statements)
        self.escrow_seconds = escrow_seconds  # how long escrow holds an unclaimed royalty before refunding it

    def __repr__(self) -> str:
        return f"Ledger({redact(self.url)})"

    def run(self, work: Callable[[Connection], T]) -> T:
        """`work` in one transaction (see db.in_transaction)."""
        return in_transaction(self.engine, work)

    def read(self, work: Callable[[Connection], T]) -> T:
        """`work`, which only reads, in one transaction (a snapshot)."""
        return in_transaction(self.engine, work, write=False)

    def bootstrap(self, admin_key: str | None) -> None:
        """Migrate; make the house accounts, the receipt secret and (first start) the admin key. All under the
        migration lock, so servers starting together on one database do it once."""

        def work(conn: Connection) -> str | None:
            acc.ensure_house_accounts(conn)
            self._secret = receipts.ledger_secret(conn, self._configured_secret)
            keys.ensure_key(conn)
            admin = acc.get_account(conn, acc.ADMIN)
            if admin_key:
                if not is_live_key(conn, admin_key):
                    acc.issue_key(conn, admin, admin_key)
                return None
            return None if acc.has_key(conn, admin) else acc.issue_key(conn, admin)

        self.admin_key_issued = migrate(self.engine, work)

    # -- accounts ------------------------------------------------------------------------------------------------
    def create_account(self, name: str, role: str) -> tuple[Account, str]:
        """A new account and its first API key (shown once)."""
        if role not in ("publisher", "agent"):
            raise AccountError(f"role {role!r}: accounts are created as publisher or agent")

        def work(conn: Connection) -> tuple[Account, str]:
            account = acc.create_account(conn, name, role)
            return account, acc.issue_key(conn, account)

        return self.run(work)

    def issue_key(self, name: str) -> str:
        return self.run(lambda conn: acc.issue_key(conn, acc.get_account(conn, name)))

    def revoke_keys(self, name: str) -> int:
        return self.run(lambda conn: acc.revoke_keys(conn, acc.get_account(conn, name)))

    def accounts(self) -> list[Account]:
        return self.read(acc.list_accounts)

    def account(self, name: str) -> Account:
        return self.read(lambda conn: acc.get_account(conn, name))

    def authenticate(self, key: str) -> Account:
        return self.read(lambda conn: acc.authenticate(conn, key))

    def deposit(self, name: str, usd) -> int:
        """Credit `usd` (a Decimal) to an account from outside; the transaction id."""
        return self.run(lambda conn: entries.deposit(conn, acc.get_account(conn, name), to_nanousd(usd)))

    # -- licences ------------------------------------------------------------------------------------------------
    def readable(self, account: Account) -> frozenset[str] | None:
        """Cache ids of the private documents `account` may read (None: all, for the admin)."""
        return self.read(lambda conn: licences.readable_private(conn, account))

    def publisher_name(self, licence: Licence) -> str:
        """The name of the account that holds `licence` (a document card shows who publishes it)."""
        return self.read(lambda conn: acc.account_by_id(conn, licence.publisher_id).name)

    def licence(self, cache_id: str) -> Licence | None:
        """The licence of `cache_id` (None: public, no publisher), remembered for LICENCE_TTL_SECONDS."""
        kept = self._licences.get(cache_id)
        if kept is not None and time.monotonic() - kept[0] < LICENCE_TTL_SECONDS:
            return kept[1]
        found = self.read(lambda conn: licences.find_licence(conn, cache_id))
        if found is not None:
            self._licences[cache_id] = (time.monotonic(), found)
        return found

    def forget_licences(self) -> None:
        """Drop the remembered licences (after a claim changed who owns what)."""
        self._licences.clear()

    def request_context(self, account: Account, idempotency_key: str | None, request_hash: str
                        ) -> tuple[frozenset[str] | None, str | None]:
        """In one read: the private documents `account` may read (`readable`) and the stored answer of an
        idempotent retry (`stored_response`; None without a key or a stored answer)."""

        def work(conn: Connection) -> tuple[frozenset[str] | None, str | None]:
            readable = licences.readable_private(conn, account)
            if idempotency_key is None or account.is_admin:
                return readable, None
            return readable, charges.stored_response(conn, account.id, idempotency_key, request_hash)

        return self.read(work)

    def salt_of(self, cache_id: str) -> str:
        """The tenant salt a private cache id was made with ('' if its licence is not recorded). Remembered once
        found: a cache id's salt never changes (it is part of the id)."""
        salt = self._salts.get(cache_id)
        if salt is None:
            salt = self.read(lambda conn: licences.salt_of(conn, cache_id))
            if salt:
                self._salts[cache_id] = salt
        return salt

    def check_readers(self, names: tuple[str, ...]) -> None:
        self.read(lambda conn: licences.check_readers(conn, names))

    def begin_publication(self, cache_id: str, publisher: Account) -> int:
        """Note, before storing its artifact, that this node publishes `cache_id` (see licences.begin_publication);
        the note's id, for `publish` (which ends it with the licence) or `end_publication`."""
        return self.run(lambda conn: licences.begin_publication(conn, cache_id, publisher, self.node,
                                                                HOLD_LEASE_SECONDS))

    def end_publication(self, publication_id: int) -> None:
        self.run(lambda conn: licences.end_publication(conn, publication_id))

    def interrupted_publications(self) -> list[tuple[int, str]]:
        """(note id, cache id) of publications this node left unfinished (a kill between storing an artifact and
        recording its licence) and of any whose lease lapsed: for the start-up repair."""
        return self.read(lambda conn: licences.interrupted_publications(conn, self.node))

    def precompute_fee(self, publisher: Account, num_tokens: int) -> int:
        """What publishing a document of `num_tokens` costs `publisher`, in nano-dollars (the admin: nothing)."""
        return 0 if publisher.is_admin else precompute_cost(self.tariff, num_tokens)

    def publish(self, cache_id: str, publisher: Account, terms: Terms, salt: str, num_tokens: int,
                source: str = "", hold: Hold | None = None, publication_id: int | None = None) -> int | None:
        """Record a newly published document's licence and charge its publisher the precompute fee, together;
        the fee in nano-dollars. `hold`: the fee held before the document was computed, spent (and dropped) by
        this charge. `publication_id`: the note `begin_publication` made, deleted in the same transaction (the
        licence and the note: both or neither). InsufficientFundsError (nothing recorded) if the publisher cannot
        pay it.
        None, with nothing recorded or charged (and the hold dropped), if the document already has a licence: the
        first publisher keeps it, whether another node published the same text at the same moment or the artifact
        was deleted or evicted (`kvmart rm`, a shared tier's TTL) and computed again (a verified owner may still
        take it over: `claim_document`). A `source` on an origin the publisher has verified makes it the document's
        verified owner (docs/LEDGER.md "Owners, not first comers")."""
        fee = self.precompute_fee(publisher, num_tokens)

        def work(conn: Connection) -> int | None:
            if publication_id is not None:  # the note goes with the licence: both or neither
                licences.end_publication(conn, publication_id)
            if hold is not None:
                charges.release(conn, hold.id)
            if licences.find_licence(conn, cache_id) is not None:
                return None
            verified = int(time.time()) if source and ownership.is_verified_origin(conn, publisher.id, source) else None
            licences.register(conn, cache_id, publisher, terms, salt, num_tokens, source, verified)
            if fee:
                provider = acc.get_account(conn, acc.PROVIDER)
                entries.post(conn, "precompute", [(publisher.id, -fee), (provider.id, fee)], memo=cache_id)
            return fee

        try:
            return self.run(work)
        except LedgerError as e:  # two nodes inserted the same licence at once: the other one's committed first
            if isinstance(e.__cause__, IntegrityError) and self.licence(cache_id) is not None:
                return None
            raise

    def forget(self, cache_id: str) -> None:
        self.run(lambda conn: licences.forget(conn, cache_id))
        self._licences.pop(cache_id, None)

    # -- charges -------------------------------------------------------------------------------------------------
    def quote(self, licence: Licence | None, cached_tokens: int, computed_tokens: int, output_tokens: int) -> Quote:
        tariff = licence.tariff(self.tariff) if licence else self.tariff
        return quote(tariff, cached_tokens, computed_tokens, output_tokens, has_publisher=licence is not None)

    def open_hold(self, account: Account, amount_nanousd: int, idempotency_key: str | None,
                  request_hash: str) -> Hold:
        """A hold of this node (`start_node`), on a lease its `renew_holds` keeps alive."""
        return self.run(lambda conn: charges.open_hold(conn, account, amount_nanousd, idempotency_key,
                                                       request_hash, self.node))

    def quote_reads(self, reads: Sequence[tuple[str | None, Licence | None, int]], computed_tokens: int,
                    output_tokens: int) -> tuple[Quote, list[Read]]:
        """The charge of a request that read `reads` ((document cache id, its licence, tokens) each; a None cache id
        is the caller's own prefix cache, read at the default tariff with no royalty) and computed and generated the
        rest, and each document's share of it."""
        total = quote(self.tariff, 0, computed_tokens, output_tokens, has_publisher=False)
        lines = []
        for cache_id, licence, tokens in reads:
            part = self.quote(licence, tokens, 0, 0)
            total = total + part
            if cache_id is not None:
                lines.append(Read(cache_id, licence.publisher_id if licence else None, tokens, part.royalty_nanousd))
        return total, lines

    def settle(self, hold: Hold, charged: Quote, licence: Licence | None, cache_id: str | None) -> Charge:
        """Settle a request that read at most one document (`settle_reads` for any number)."""
        reads = [Read(cache_id, licence.publisher_id if licence else None, charged.cached_tokens,
                      charged.royalty_nanousd)] if cache_id is not None else []
        return self.settle_reads(hold, charged, reads)

    def settle_reads(self, hold: Hold, charged: Quote, reads: Sequence[Read],
                     keep: Callable[[Charge], str] | None = None) -> Charge:
        """Post the charge; each document's royalty goes to its publisher or, for an open document whose owner is
        not verified, to escrow (kvmart/ledger/escrow.py), as its licence stands now (a verified owner may have
        taken it over since the hold); the receipt signed with the current key. `keep`: the answer to keep for the
        hold's Idempotency-Key, made from the charge, in the same transaction (a crash keeps both or neither)."""

        def work(conn: Connection) -> Charge:
            routed, escrowed = [], []
            for read in reads:
                current = licences.find_licence(conn, read.cache_id) if read.publisher_id is not None else None
                to, held = escrow.royalty_account(conn, current)
                routed.append(dataclasses.replace(read, publisher_id=current.publisher_id if current else None,
                                                  royalty_to=to))
                if held and read.royalty_nanousd:
                    escrowed.append(read)
            self.keyring.current(conn)  # lock the key (shared) before the charge takes its date: statements.py
            charge = charges.settle(conn, hold, charged, routed, self._secret, self.keyring)
            for read in escrowed:
                escrow.hold(conn, charge.transaction_id, read.cache_id, hold.account_id, read.royalty_nanousd,
                            charge.receipt["created_at"], self.escrow_seconds)
            if keep is not None and hold.idempotency_key is not None:
                charges.remember_response(conn, hold.account_id, hold.idempotency_key, keep(charge))
            return charge

        return self.run(work)

    def remember_response(self, account: Account, idempotency_key: str, body: str) -> None:
        self.run(lambda conn: charges.remember_response(conn, account.id, idempotency_key, body))

    def stored_response(self, account: Account, idempotency_key: str, request_hash: str) -> str | None:
        return self.read(lambda conn: charges.stored_response(conn, account.id, idempotency_key, request_hash))

    def release(self, hold: Hold) -> None:
        self.run(lambda conn: charges.release(conn, hold.id))

    def release_stale(self) -> int:
        return self.run(charges.release_stale)

    def start_node(self, node: str) -> int:
        """Name the node this ledger object serves (its holds carry the name) and release the holds an earlier run
        of that node left, with every hold whose lease lapsed; how many were released."""
        self.node = node
        return self.run(lambda conn: charges.start_node(conn, node))

    def renew_holds(self) -> int:
        """Extend the leases of this node's holds (its requests in flight); call every LEASE_RENEW_SECONDS."""
        return self.run(lambda conn: charges.renew_holds(conn, self.node))

    def renew_leases(self) -> None:
        """Extend the leases of this node's holds and publications in progress, in one transaction."""

        def work(conn: Connection) -> None:
            charges.renew_holds(conn, self.node)
            licences.renew_publications(conn, self.node, HOLD_LEASE_SECONDS)

        self.run(work)

    def verify_receipt(self, receipt: object) -> bool:
        """A version 2 receipt checked with the provider's public keys; a version 1 one with the HMAC secret."""
        if isinstance(receipt, dict) and "key_id" in receipt:
            return receipts.why_invalid(receipt, self.public_keys()) is None
        return receipts.verify(self._secret, receipt)

    # -- reports -------------------------------------------------------------------------------------------------
    def usage(self, account: Account) -> reports.Usage:
        return self.read(lambda conn: reports.usage(conn, account))

    def recent_charges(self, account: Account, limit: int) -> list[Charge]:
        return self.read(lambda conn: charges.recent_charges(conn, account, limit, self._secret))

    def balances(self) -> list[reports.Balance]:
        return self.read(reports.balances)

    def documents(self) -> list[reports.DocumentReport]:
        return self.read(reports.documents)

    def health(self) -> Health:
        def work(conn: Connection) -> Health:
            negative = [a.name for a in acc.list_accounts(conn) if a.balance_nanousd < 0 and not a.may_go_negative]
            return Health(entries.entries_sum(conn), entries.unbalanced_accounts(conn), negative,
                          escrow.mismatch(conn))

        return self.read(work)

    def close(self) -> None:
        self.engine.dispose()


def is_live_key(conn: Connection, key: str) -> bool:
    try:
        acc.authenticate(conn, key)
        return True
    except AuthenticationError:
        return False


def escrow_seconds(env: dict[str, str]) -> int:
    """KVMART_ESCROW_DAYS (default 30; fractions allowed) in seconds; ConfigError for a negative or bad value."""
    from decimal import Decimal, InvalidOperation

    from kvmart.errors import ConfigError

    raw = env.get(ESCROW_DAYS_ENV) or str(escrow.DEFAULT_DAYS)
    try:
        days = Decimal(raw)
    except InvalidOperation:
        raise ConfigError(f"{ESCROW_DAYS_ENV}={raw!r} is not a number of days") from None
    if not days.is_finite() or days < 0:
        raise ConfigError(f"{ESCROW_DAYS_ENV}={raw!r} must be a non-negative number of days")
    return int(days * escrow.DAY_SECONDS)


def open_ledger(url: str, data_dir: Path, tariff: Tariff | None = None, environ: dict[str, str] | None = None
                ) -> Ledger:
    """The ledger at `url` (empty: SQLite in `data_dir`), migrated and bootstrapped. The admin key is
    KVMART_ADMIN_KEY if set; else one is made at first start (`ledger.admin_key_issued`)."""
    env = dict(os.environ) if environ is None else environ
    ledger = Ledger(ledger_url(url, data_dir), tariff or load_tariff(env),
                    env.get(SECRET_ENV) or None, escrow_seconds(env))
    ledger.bootstrap(env.get(ADMIN_KEY_ENV) or None)
    return ledger
