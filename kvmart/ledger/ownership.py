"""Owners, not first comers: a publisher proves it controls the origin of a document's `source` URL, and a
verified owner outranks whoever published the same text first (docs/LEDGER.md).

A claim names an origin (`scheme://host[:port]`, from any URL on it) and carries a random token. The publisher
serves the token as a line of `ORIGIN/.well-known/kvmart-claim` (text/plain, several lines allowed); the provider
fetches it (kvmart/server/fetch.py, constrained against SSRF: docs/SECURITY.md) and, if the token is there, marks
the claim verified. From then on:

- every document of that publisher whose `source` is on the origin is owner-verified: its royalties are paid to it
  directly, and what escrow held for it is paid out (kvmart/ledger/escrow.py);
- when the publisher publishes a text someone else published first (same cache id) with a `source` on a verified
  origin, and the first publisher is not a verified owner, the licence passes to the verified owner with its terms
  (`take_over`). A verified owner is never displaced: the first verified claim on a text stands.

Functions run inside the caller's transaction."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import Connection, Row

from kvmart.errors import RequestError, UnknownClaimError
from kvmart.ledger.accounts import Account
from kvmart.ledger.escrow import Payout, release_to_owner
from kvmart.ledger.licences import Licence, Terms, find_licence
from kvmart.ledger.schema import licence_readers, licences, origin_claims

WELL_KNOWN_PATH = "/.well-known/kvmart-claim"
TOKEN_PREFIX = "kvmart-claim-"
SCHEMES = {"https": 443, "http": 80}
MAX_SOURCE_CHARS = 2048


@dataclass(frozen=True)
class Claim:
    id: int
    account_id: int
    origin: str
    token: str
    created_at: int
    verified_at: int | None

    @property
    def url(self) -> str:
        """Where the provider looks for the token."""
        return self.origin + WELL_KNOWN_PATH


def origin_of(source: str) -> str:
    """The origin of an http(s) URL, normalized (lower-case scheme and host, default port dropped); RequestError
    (400, param `source`) for anything else."""
    if not isinstance(source, str) or not source or len(source) > MAX_SOURCE_CHARS or not source.isascii():
        raise RequestError(f"source must be an http(s) URL of at most {MAX_SOURCE_CHARS} ASCII characters", "source")
    try:
        parts = urlsplit(source.strip())
        port = parts.port
    except ValueError as e:
        raise RequestError(f"source {source!r:.100} is not a URL ({e})", "source") from None
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    if scheme not in SCHEMES or not host or parts.username is not None or parts.password is not None:
        raise RequestError(f"source {source!r:.100} must be an http:// or https:// URL with a host and no "
                           "user name or password", "source")
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}" + ("" if port in (None, SCHEMES[scheme]) else f":{port}")


def claim_of(row: Row) -> Claim:
    return Claim(row.id, row.account_id, row.origin, row.token, row.created_at, row.verified_at)


def new_claim(conn: Connection, account: Account, source: str) -> Claim:
    """The account's claim on the origin of `source`: its existing one, or a new one with a fresh token."""
    origin = origin_of(source)
    row = conn.execute(select(origin_claims).where(origin_claims.c.account_id == account.id,
                                                   origin_claims.c.origin == origin)).first()
    if row is None:
        conn.execute(insert(origin_claims).values(account_id=account.id, origin=origin, created_at=int(time.time()),
                                                  token=TOKEN_PREFIX + secrets.token_urlsafe(24)))
        row = conn.execute(select(origin_claims).where(origin_claims.c.account_id == account.id,
                                                       origin_claims.c.origin == origin)).one()
    return claim_of(row)


def get_claim(conn: Connection, account: Account, claim_id: int) -> Claim:
    """The account's claim `claim_id`; UnknownClaimError (404) for another account's or a missing one."""
    row = conn.execute(select(origin_claims).where(origin_claims.c.id == claim_id,
                                                   origin_claims.c.account_id == account.id)).first()
    if row is None:
        raise UnknownClaimError(f"no claim claim_{claim_id} of account {account.name!r} (see GET /v1/claims)")
    return claim_of(row)


def list_claims(conn: Connection, account: Account) -> list[Claim]:
    rows = conn.execute(select(origin_claims).where(origin_claims.c.account_id == account.id)
                        .order_by(origin_claims.c.id))
    return [claim_of(r) for r in rows]


def is_verified_origin(conn: Connection, account_id: int, source: str) -> bool:
    """Whether the account has proved control of the origin of `source` ('' or a bad URL: no)."""
    try:
        origin = origin_of(source)
    except RequestError:
        return False
    row = conn.execute(select(origin_claims.c.id).where(origin_claims.c.account_id == account_id,
                                                        origin_claims.c.origin == origin,
                                                        origin_claims.c.verified_at.is_not(None))).first()
    return row is not None


def mark_verified(conn: Connection, claim: Claim, now: int) -> list[tuple[str, Payout]]:
    """Record that the token was found; verify every document of the account whose source is on the origin and pay
    it what escrow held for them. [(cache id, payout)] of the documents verified now."""
    conn.execute(update(origin_claims).where(origin_claims.c.id == claim.id).values(verified_at=now))
    mine = conn.execute(select(licences.c.cache_id, licences.c.source)
                        .where(licences.c.publisher_id == claim.account_id,
                               licences.c.owner_verified_at.is_(None))).all()
    verified = []
    for row in mine:
        if row.source and is_verified_origin(conn, claim.account_id, row.source):
            conn.execute(update(licences).where(licences.c.cache_id == row.cache_id).values(owner_verified_at=now))
            verified.append((row.cache_id, release_to_owner(conn, row.cache_id, claim.account_id, now)))
    return verified


def take_over(conn: Connection, licence: Licence, owner: Account, terms: Terms, source: str, now: int
              ) -> Payout | None:
    """A verified owner publishing a text already published: the licence becomes the owner's (its terms, its source,
    verified) and escrow pays it what it held. None, with nothing changed, unless `source` is on an origin the owner
    verified, the licence is open (public or priced; a private one has its own salted id) and not already held
    by a verified owner."""
    if terms.is_private or not licence.is_open or licence.is_owner_verified:
        return None
    if not is_verified_origin(conn, owner.id, source):
        return None
    price, share = terms.cache_read_usd_per_mtok, terms.royalty_share
    conn.execute(delete(licence_readers).where(licence_readers.c.cache_id == licence.cache_id))
    conn.execute(update(licences).where(licences.c.cache_id == licence.cache_id).values(
        publisher_id=owner.id, kind=terms.kind, source=source, owner_verified_at=now,
        cache_read_usd_per_mtok=None if price is None else str(price),
        royalty_share=None if share is None else str(share)))
    found = find_licence(conn, licence.cache_id)
    assert found is not None and found.publisher_id == owner.id
    return release_to_owner(conn, licence.cache_id, owner.id, now)
