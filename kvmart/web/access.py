"""Who may see what on the web page: the one place the web views ask the ledger which documents a viewer may see
(the /v1 API asks the same ledger in kvmart/server/api/documents.py). A visitor who has not signed in sees no private
document; a signed-in account sees what its licences allow; the admin sees everything. Every view (catalogue,
search, document pages, charts, the publisher's tables) lists documents through `visible_documents` or
`visible_document`, so a private document never reaches a page it may not be shown on."""

from __future__ import annotations

from kvmart.ledger import Account
from kvmart.reuse.catalog import Document, Readable
from kvmart.server.pipeline.services import Services


def readable_by(account: Account | None, services: Services) -> Readable:
    """The private documents the viewer may read (None: all, for the admin); a visitor none."""
    return frozenset() if account is None else services.ledger.readable(account)


def visible_documents(services: Services, account: Account | None) -> list[Document]:
    """The catalogue as the viewer may see it, newest first (reads the store: call off the event loop)."""
    services.catalog.refresh()
    return services.catalog.documents(readable_by(account, services))


def visible_document(services: Services, account: Account | None, doc_id: str) -> Document:
    """One document; UnknownDocumentError (404) if it does not exist or the viewer may not see it, alike."""
    return services.catalog.get(doc_id, readable_by(account, services))
