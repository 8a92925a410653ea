"""Reports, read from the ledger in one transaction: balances, per-document reads and money, one account's usage
(GET /v1/usage, `kvmart ledger report`). Amounts stay integer nano-dollars here; callers format them."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from kvmart.ledger.accounts import Account, list_accounts
from kvmart.ledger.entries import entries_sum, held_nanousd
from kvmart.ledger.schema import accounts, charges, entries, escrow, licences, transactions


@dataclass(frozen=True)
class Balance:
    name: str
    role: str
    balance_nanousd: int
    held_nanousd: int


@dataclass(frozen=True)
class DocumentReport:
    cache_id: str
    publisher: str | None
    licence: str  # public | private | priced ('public' without a licence)
    reads: int
    cached_tokens: int
    revenue_nanousd: int  # what the reads of this document paid in all (cache reads, computed and output tokens)
    cache_read_nanousd: int
    royalty_nanousd: int
    saved_nanousd: int
    precompute_nanousd: int  # the publisher's one-time charge
    royalty_share: str | None = None  # the licence's own terms (Decimal text); None: the tariff's
    cache_read_usd_per_mtok: str | None = None


@dataclass(frozen=True)
class Usage:
    """One account's side of the ledger: as an agent (what it paid and saved) and as a publisher (what it
    earned)."""

    account: str
    role: str
    balance_nanousd: int
    held_nanousd: int
    requests: int
    cached_tokens: int
    computed_tokens: int
    output_tokens: int
    spent_nanousd: int
    saved_nanousd: int
    royalties_nanousd: int  # paid to it: at once, or by escrow once it proved it owns the text
    documents: list[DocumentReport]  # the documents it published
    royalties_in_escrow_nanousd: int = 0  # its documents' royalties escrow holds until it proves it owns them

    def as_dict(self) -> dict:
        return asdict(self)


def balances(conn: Connection) -> list[Balance]:
    return [Balance(a.name, a.role, a.balance_nanousd, held_nanousd(conn, a.id)) for a in list_accounts(conn)]


def documents(conn: Connection, publisher_id: int | None = None) -> list[DocumentReport]:
    """Every document read or published (or only `publisher_id`'s), most revenue first."""
    c = charges.c
    per_doc = select(c.cache_id, func.count().label("reads"), func.sum(c.cached_tokens).label("cached"),
                     func.sum(c.total_nanousd).label("revenue"), func.sum(c.cache_read_nanousd).label("read"),
                     func.sum(c.royalty_nanousd).label("royalty"), func.sum(c.saved_nanousd).label("saved")
                     ).where(c.cache_id.is_not(None)).group_by(c.cache_id)
    read = {r.cache_id: r for r in conn.execute(per_doc)}
    fees = precompute_fees(conn)
    columns = (licences.c.cache_id, licences.c.kind, licences.c.publisher_id, licences.c.royalty_share,
               licences.c.cache_read_usd_per_mtok, accounts.c.name)
    terms = {r.cache_id: r for r in conn.execute(select(*columns).join(accounts, accounts.c.id ==
                                                                       licences.c.publisher_id))}
    ids = set(read) | set(terms)
    if publisher_id is not None:
        ids = {i for i in ids if i in terms and terms[i].publisher_id == publisher_id}
    reports = []
    for cache_id in ids:
        r, t = read.get(cache_id), terms.get(cache_id)
        reports.append(DocumentReport(
            cache_id, t.name if t else None, t.kind if t else "public", int(r.reads) if r else 0,
            int(r.cached) if r else 0, int(r.revenue) if r else 0, int(r.read) if r else 0,
            int(r.royalty) if r else 0, int(r.saved) if r else 0, fees.get(cache_id, 0),
            t.royalty_share if t else None, t.cache_read_usd_per_mtok if t else None))
    return sorted(reports, key=lambda d: (-d.revenue_nanousd, d.cache_id))


def precompute_fees(conn: Connection) -> dict[str, int]:
    """cache id -> what its publisher paid to have it prefilled (the debit of its `precompute` transaction)."""
    query = (select(transactions.c.memo, func.sum(entries.c.amount_nanousd))
             .join(entries, entries.c.transaction_id == transactions.c.id)
             .where(transactions.c.kind == "precompute", entries.c.amount_nanousd > 0)
             .group_by(transactions.c.memo))
    return {memo: int(total) for memo, total in conn.execute(query)}


def usage(conn: Connection, account: Account) -> Usage:
    c = charges.c
    spent = conn.execute(select(func.count(), func.coalesce(func.sum(c.cached_tokens), 0),
                                func.coalesce(func.sum(c.computed_tokens), 0), func.coalesce(func.sum(c.output_tokens), 0),
                                func.coalesce(func.sum(c.total_nanousd), 0), func.coalesce(func.sum(c.saved_nanousd), 0))
                         .where(c.account_id == account.id)).one()
    royalties = conn.execute(select(func.coalesce(func.sum(c.royalty_nanousd), 0))
                             .where(c.publisher_id == account.id)).scalar_one()
    royalties += conn.execute(select(func.coalesce(func.sum(escrow.c.amount_nanousd), 0))
                              .where(escrow.c.outcome == "owner", escrow.c.paid_to == account.id)).scalar_one()
    held = conn.execute(select(func.coalesce(func.sum(escrow.c.amount_nanousd), 0))
                        .join(charges, (charges.c.transaction_id == escrow.c.transaction_id)
                              & (charges.c.cache_id == escrow.c.cache_id))
                        .where(escrow.c.settled_at.is_(None), charges.c.licensee_id == account.id)).scalar_one()
    fresh = conn.execute(select(accounts.c.balance_nanousd).where(accounts.c.id == account.id)).scalar_one()
    return Usage(account.name, account.role, int(fresh), held_nanousd(conn, account.id), int(spent[0]),
                 int(spent[1]), int(spent[2]), int(spent[3]), int(spent[4]), int(spent[5]), int(royalties),
                 documents(conn, account.id), int(held))


def total_entries(conn: Connection) -> int:
    return entries_sum(conn)
