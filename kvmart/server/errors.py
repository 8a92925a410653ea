"""The one table that translates any kvmart error (kvmart/errors.py) to an HTTP status. The OpenAI and Anthropic
modules only dress an `HttpError` in their own error body."""

from __future__ import annotations

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


def http_error(error: KvmartError) -> HttpError:
    """The HTTP form of a kvmart error."""
    status, kind = next((s, k) for cls, s, k in STATUS if isinstance(error, cls))
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
