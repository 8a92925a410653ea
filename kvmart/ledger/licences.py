"""Licences: who may read a published document, and at what price.

- `public`: anyone with a key reads it at the default tariff.
- `private`: only its publisher and the accounts it lists. To everyone else it does not exist: naming it is a 404,
  listings leave it out, and a prompt pasting its text never matches its cache. Its cache id is salted with the
  publisher's tenant salt (set from the authenticated account, never from the request), so it never collides with
  another tenant's cache of the same text, nor with the public one.
- `priced`: anyone reads it, at the document's own cache-read price.
Each licence may also set its own royalty share. A cache id with no licence (precomputed by the operator's CLI)
is public and has no publisher: no royalty is paid on it."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from decimal import Decimal

from sqlalchemy import and_, delete, insert, or_, select, update
from sqlalchemy.engine import Connection

from kvmart.errors import AccountError, TariffError
from kvmart.ledger.accounts import Account, find_account, get_account
from kvmart.ledger.schema import licence_readers, licences, publications
from kvmart.ledger.tariffs import Tariff

KINDS = ("public", "private", "priced")


@dataclass(frozen=True)
class Terms:
    """What a publisher asks for when publishing."""

    kind: str = "public"
    readers: tuple[str, ...] = ()  # account names (private documents)
    cache_read_usd_per_mtok: Decimal | None = None  # priced documents
    royalty_share: Decimal | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise TariffError(f"licence {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.kind == "priced" and self.cache_read_usd_per_mtok is None:
            raise TariffError("a priced licence needs cache_read_usd_per_mtok")
        if self.kind != "priced" and self.cache_read_usd_per_mtok is not None:
            raise TariffError("cache_read_usd_per_mtok is for priced licences only")
        if self.readers and self.kind != "private":
            raise TariffError("readers are listed for private licences only")
        Tariff().with_overrides(royalty_share=self.royalty_share,  # validates the numbers
                                cache_read_usd_per_mtok=self.cache_read_usd_per_mtok)

    @property
    def is_private(self) -> bool:
        return self.kind == "private"

    def canonical(self) -> str:
        """These terms as part of a document's identity (kvmart/format/keys.py cache_id): '' for a public licence
        at the default price and share, else sorted compact JSON with decimals in plain notation."""
        if self == Terms():
            return ""
        return json.dumps({"kind": self.kind, "readers": sorted(self.readers),
                           "cache_read_usd_per_mtok": _plain(self.cache_read_usd_per_mtok),
                           "royalty_share": _plain(self.royalty_share)}, sort_keys=True, separators=(",", ":"))


def _plain(value: Decimal | None) -> str | None:
    return None if value is None else format(value.normalize(), "f")


@dataclass(frozen=True)
class Licence:
    cache_id: str
    publisher_id: int
    kind: str
    salt: str
    cache_read_usd_per_mtok: Decimal | None
    royalty_share: Decimal | None
    num_tokens: int
    readers: frozenset[int]
    source: str = ""  # the URL the publisher names as the text's origin ('' if none)
    owner_verified_at: int | None = None  # when the publisher proved control of the source's origin (ownership.py)

    @property
    def is_open(self) -> bool:
        """Anyone may read it (public or priced): whoever publishes a well-known text first could collect on it,
        so its royalties wait in escrow until its owner is verified (kvmart/ledger/escrow.py)."""
        return self.kind != "private"

    @property
    def is_owner_verified(self) -> bool:
        return self.owner_verified_at is not None

    def may_read(self, account: Account) -> bool:
        if self.kind != "private" or account.is_admin:
            return True
        return account.id == self.publisher_id or account.id in self.readers

    def tariff(self, base: Tariff) -> Tariff:
        return base.with_overrides(cache_read_usd_per_mtok=self.cache_read_usd_per_mtok,
                                   royalty_share=self.royalty_share)

    def read_usd_per_mtok(self, base: Tariff) -> Decimal:
        """What one million tokens read from this document cost."""
        return self.tariff(base).read_usd_per_mtok


def decimal_or_none(text: str | None) -> Decimal | None:
    return None if text is None else Decimal(text)


def register(conn: Connection, cache_id: str, publisher: Account, terms: Terms, salt: str, num_tokens: int,
             source: str = "", owner_verified_at: int | None = None) -> Licence:
    """Record the terms of a newly published document."""
    readers = {get_account(conn, name).id for name in terms.readers}
    conn.execute(insert(licences).values(
        cache_id=cache_id, publisher_id=publisher.id, kind=terms.kind, salt=salt, num_tokens=num_tokens,
        source=source or None, owner_verified_at=owner_verified_at,
        cache_read_usd_per_mtok=None if terms.cache_read_usd_per_mtok is None else str(terms.cache_read_usd_per_mtok),
        royalty_share=None if terms.royalty_share is None else str(terms.royalty_share), created_at=int(time.time())))
    if readers:
        conn.execute(insert(licence_readers), [{"cache_id": cache_id, "account_id": r} for r in readers])
    found = find_licence(conn, cache_id)
    assert found is not None
    return found


def find_licence(conn: Connection, cache_id: str) -> Licence | None:
    row = conn.execute(select(licences).where(licences.c.cache_id == cache_id)).first()
    if row is None:
        return None
    readers = frozenset(conn.execute(select(licence_readers.c.account_id)
                                     .where(licence_readers.c.cache_id == cache_id)).scalars())
    return Licence(row.cache_id, row.publisher_id, row.kind, row.salt, decimal_or_none(row.cache_read_usd_per_mtok),
                   decimal_or_none(row.royalty_share), row.num_tokens, readers, row.source or "",
                   row.owner_verified_at)


def readable_private(conn: Connection, account: Account) -> frozenset[str] | None:
    """Cache ids of the private documents `account` may read: those it published and those listing it. None for
    the admin, who reads everything. (Private caches are salted; the server hides every salted cache not in
    this set, so one whose licence is not yet, or no longer, recorded is hidden from everyone.)"""
    if account.is_admin:
        return None
    listed = select(licence_readers.c.cache_id).where(licence_readers.c.account_id == account.id)
    query = select(licences.c.cache_id).where(and_(licences.c.kind == "private",
                                                   or_(licences.c.publisher_id == account.id,
                                                       licences.c.cache_id.in_(listed))))
    return frozenset(conn.execute(query).scalars())


def forget(conn: Connection, cache_id: str) -> None:
    conn.execute(delete(licence_readers).where(licence_readers.c.cache_id == cache_id))
    conn.execute(delete(licences).where(licences.c.cache_id == cache_id))


def salt_of(conn: Connection, cache_id: str) -> str:
    """The salt a cache id was made with ('' for public documents and unknown ids)."""
    return conn.execute(select(licences.c.salt).where(licences.c.cache_id == cache_id)).scalar() or ""


READER_ROLES = ("publisher", "agent")


def check_readers(conn: Connection, names: tuple[str, ...]) -> None:
    """AccountError naming the first reader that cannot be given access: one message for every refusal, a name
    that is no account's included, so that listing readers does not tell a publisher which accounts exist beyond
    those it may grant (the admin and the house accounts are refused alike)."""
    for name in names:
        found = find_account(conn, name) if isinstance(name, str) else None
        if found is None or found.role not in READER_ROLES:
            raise AccountError(f"readers: {name!r} cannot be given access to a private document (name the publisher "
                               "or agent accounts that may read it)", "readers")


# -- publications in progress (a store and a ledger cannot share one transaction: this journal bridges them) ----
def begin_publication(conn: Connection, cache_id: str, publisher: Account, node: str, lease_seconds: int) -> int:
    """Note that `node` is about to store `cache_id` for `publisher`; the note's id. Written before the artifact
    is stored and deleted with the licence (`end_publication` in the same transaction as `register`), so one left
    behind marks an artifact that may be stored without its licence and fee."""
    now = int(time.time())
    inserted = conn.execute(insert(publications).values(cache_id=cache_id, publisher_id=publisher.id, node=node,
                                                        created_at=now, expires_at=now + lease_seconds))
    return int(inserted.inserted_primary_key[0])  # type: ignore[index]  # an insert always has a primary key


def end_publication(conn: Connection, publication_id: int) -> None:
    conn.execute(delete(publications).where(publications.c.id == publication_id))


def renew_publications(conn: Connection, node: str, lease_seconds: int) -> int:
    return conn.execute(update(publications).where(publications.c.node == node)
                        .values(expires_at=int(time.time()) + lease_seconds)).rowcount


def interrupted_publications(conn: Connection, node: str) -> list[tuple[int, str]]:
    """(id, cache id) of the publications `node` left (it died mid-publish) and of any whose lease lapsed."""
    rows = conn.execute(select(publications.c.id, publications.c.cache_id).where(
        (publications.c.node == node) | (publications.c.expires_at < int(time.time()))))
    return [(int(r.id), str(r.cache_id)) for r in rows]
