"""The one table that translates any kvmart error (kvmart/errors.py) to an HTTP status. The OpenAI and Anthropic
modules only dress an `HttpError` in their own error body.

A client sees the message of an error it caused (4xx). A server-side failure (5xx: a store, the ledger, an
artifact, a bug) is logged in full and answered with a fixed text and a reference to the log line: its message may
hold server paths, a store's URL, a traceback's words, which are nobody else's business."""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field

from kvmart.errors import (
    ArtifactError,
    ArtifactRejectedError,
    AuthenticationError,
    BodyTooLargeError,
    ClaimCheckError,
    ContextOverflowError,
    ForbiddenError,
    IdempotencyConflictError,
    InputError,
    InsufficientFundsError,
    KvmartError,
    LedgerError,
    QueueFullError,
    RateLimitedError,
    ShuttingDownError,
    StoreError,
    StoreUnavailableError,
    TooLargeError,
    UnknownCacheError,
    UnknownClaimError,
    UnknownDocumentError,
    UnknownModelError,
    UnknownReceiptError,
)

log = logging.getLogger("kvmart.server")


@dataclass(frozen=True)
class HttpError:
    """What an error becomes on the wire, before an API dresses it. `kind` is API-neutral."""

    status: int
    kind: str  # invalid_request | authentication | payment | permission | not_found | conflict | too_large |
    # rate_limit | unavailable | server
    message: str
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


# first match wins: subclasses before their bases
STATUS: tuple[tuple[type[KvmartError], int, str], ...] = (
    (ContextOverflowError, 400, "invalid_request"),
    (InputError, 400, "invalid_request"),
    (AuthenticationError, 401, "authentication"),
    (InsufficientFundsError, 402, "payment"),
    (ForbiddenError, 403, "permission"),
    (UnknownDocumentError, 404, "not_found"),
    (UnknownModelError, 404, "not_found"),
    (UnknownCacheError, 404, "not_found"),
    (UnknownClaimError, 404, "not_found"),
    (UnknownReceiptError, 404, "not_found"),
    (IdempotencyConflictError, 409, "conflict"),
    (BodyTooLargeError, 413, "too_large"),
    (TooLargeError, 413, "too_large"),
    (ArtifactRejectedError, 422, "invalid_request"),
    (ClaimCheckError, 422, "invalid_request"),
    (QueueFullError, 429, "rate_limit"),
    (RateLimitedError, 429, "rate_limit"),
    (ShuttingDownError, 503, "unavailable"),
    (ArtifactError, 500, "server"),
    (StoreUnavailableError, 503, "unavailable"),
    (StoreError, 500, "server"),
    (LedgerError, 500, "server"),
    (KvmartError, 500, "server"),
)


# what a client is told of a server-side failure, by class (first match wins); the full message goes to the log
PUBLIC_MESSAGES: tuple[tuple[type[KvmartError], str], ...] = (
    (StoreUnavailableError, "a shared store tier cannot be reached right now; retry later"),
    (ArtifactError, "a stored cache could not be used"),
    (StoreError, "the store failed"),
    (LedgerError, "the ledger failed"),
    (KvmartError, "internal error"),
)


def http_error(error: KvmartError) -> HttpError:
    """The HTTP form of a kvmart error (a 5xx's message replaced by `public_message`'s)."""
    status, kind = next((s, k) for cls, s, k in STATUS if isinstance(error, cls))
    if status >= 500 and not isinstance(error, ShuttingDownError):
        return HttpError(status, kind, public_message(error))
    param, code = getattr(error, "param", None), getattr(error, "code", None)
    headers: dict[str, str] = {}
    if isinstance(error, ContextOverflowError):
        param, code = param or "messages", "context_length_exceeded"
    if isinstance(error, UnknownDocumentError):
        param, code = "documents", "document_not_found"
    if isinstance(error, UnknownModelError):
        param, code = "model", "model_not_found"
    if isinstance(error, AuthenticationError):
        code = "invalid_api_key"
    if isinstance(error, InsufficientFundsError):
        code = "insufficient_funds"
    if isinstance(error, ArtifactRejectedError):
        param, code = "artifact", "artifact_rejected"
    if isinstance(error, ClaimCheckError):
        code = "claim_not_verified"
    if isinstance(error, QueueFullError | RateLimitedError):
        headers["Retry-After"] = str(error.retry_after_seconds)
        code = "rate_limit_exceeded"
    return HttpError(status, kind, str(error), param, code, headers)


def public_message(error: KvmartError) -> str:
    """A server-side failure as a client may see it: a fixed text and a reference to the log line that holds the
    error's own message (logged here, once per translation)."""
    reference = secrets.token_hex(6)
    log.error("%s (reference %s): %s", type(error).__name__, reference, error)
    text = next(message for cls, message in PUBLIC_MESSAGES if isinstance(error, cls))
    return f"{text} (reference {reference}; the server's log has the details)"
