"""The server's typed errors, and the one table that translates any kvmart error to an HTTP status. The OpenAI
and Anthropic modules only dress an `HttpError` in their own error body."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import (ArtifactError, ArtifactRejectedError, AuthenticationError, ContextOverflowError, IdempotencyConflictError,
                      InputError, InsufficientFundsError, KvmartError, LedgerError, StoreError, StoreUnavailableError,
                      UnknownCacheError)


class RequestError(InputError):
    """A request that cannot be served as sent (HTTP 400). `param` names the offending field, if one does."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code


class UnsupportedParameterError(RequestError):
    """A known parameter with a value kvmart does not implement (n > 1, tools...): refused, never silently wrong."""

    def __init__(self, param: str, why: str) -> None:
        super().__init__(f"{param} is not supported by this server: {why}", param, "unsupported_parameter")


class UnknownDocumentError(KvmartError):
    """A request names a document id that is not in the catalogue (HTTP 404)."""

    def __init__(self, document_id: str) -> None:
        super().__init__(f"document {document_id!r} not found: publish it with POST /v1/documents, or list the "
                         "catalogue with GET /v1/documents")
        self.document_id = document_id


class UnknownModelError(KvmartError):
    """A request names a model this server does not serve (HTTP 404, as OpenAI answers)."""

    def __init__(self, requested: str, served: str) -> None:
        super().__init__(f"the model {requested!r} does not exist on this server; it serves {served!r} "
                         "(see GET /v1/models)")


class ForbiddenError(KvmartError):
    """The caller may not do this to this resource (HTTP 403)."""


class BodyTooLargeError(KvmartError):
    """The request body exceeds the server's limit (HTTP 413)."""

    def __init__(self, limit_bytes: int) -> None:
        super().__init__(f"request body too large: this server accepts at most {limit_bytes:,} bytes")


class QueueFullError(KvmartError):
    """Every slot of the model worker's queue is taken (HTTP 429 with Retry-After)."""

    def __init__(self, capacity: int, retry_after_seconds: int) -> None:
        super().__init__(f"the server is busy: {capacity} requests are already running or queued; retry in "
                         f"{retry_after_seconds} s")
        self.retry_after_seconds = retry_after_seconds


class TooLargeError(KvmartError):
    """A document or artifact beyond the server's limit (HTTP 413)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class RateLimitedError(KvmartError):
    """One API key sent more requests than its rate or concurrency limit allows (HTTP 429 with Retry-After)."""

    def __init__(self, message: str, retry_after_seconds: int) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class ShuttingDownError(KvmartError):
    """The server is shutting down and takes no new work (HTTP 503)."""


class InternalError(KvmartError):
    """A bug: an unexpected exception while serving a request. Logged with its traceback; HTTP 500."""


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
    (IdempotencyConflictError, 409, "conflict"),
    (BodyTooLargeError, 413, "too_large"),
    (TooLargeError, 413, "too_large"),
    (ArtifactRejectedError, 422, "invalid_request"),
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
    if isinstance(error, QueueFullError | RateLimitedError):
        headers["Retry-After"] = str(error.retry_after_seconds)
        code = "rate_limit_exceeded"
    return HttpError(status, kind, str(error), param, code, headers)
