"""Who may see what on the web page: the one place the web views ask the ledger which documents a viewer may see
(the /v1 API asks the same ledger in kvmart/server/documents.py). A visitor who has not signed in sees no private
document; a signed-in account sees what its licences allow; the admin sees everything. Every view (catalogue,
search, document pages, charts, the publisher's tables) lists documents through `visible_documents` or
`visible_document`, so a private document never reaches a page it may not be shown on."""

from __future__ import annotations

from ..ledger import Account
from ..server.catalog import Document
from ..server.services import Services


def hidden_from(services: Services, account: Account | None) -> frozenset[str]:
    """Cache ids the viewer may not see: for a visitor, every private document's."""
    if account is not None:
        return services.ledger.hidden(account)
    return frozenset(d.cache_id for d in services.ledger.documents() if d.licence == "private")


def visible_documents(services: Services, account: Account | None) -> list[Document]:
    """The catalogue as the viewer may see it, newest first (reads the store: call off the event loop)."""
    services.catalog.refresh()
    return services.catalog.documents(hidden_from(services, account))


def visible_document(services: Services, account: Account | None, doc_id: str) -> Document:
    """One document; UnknownDocumentError (404) if it does not exist or the viewer may not see it, alike."""
    return services.catalog.get(doc_id, hidden_from(services, account))
