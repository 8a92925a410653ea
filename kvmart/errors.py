"""Typed errors. Every failure a user can cause or meet is one of these; the CLI and the server translate them
at the edge (to a message and exit code, or to an HTTP status). Anything else escaping is a bug."""

from __future__ import annotations


class KvmartError(Exception):
    """Base of every error kvmart raises on purpose. `exit_code` is what the CLI exits with."""

    exit_code: int = 1


class ConfigError(KvmartError):
    """A setting (environment variable or option) has a value kvmart cannot use."""

    exit_code = 2


class ModelNotFoundError(KvmartError):
    """A `--model` names no folder, file or built-in that exists."""

    exit_code = 2


class ModelLoadError(KvmartError):
    """A model folder or file exists but cannot be loaded (missing config, unsupported architecture...)."""


class InputError(KvmartError):
    """A document or question that cannot be used as given (empty, not UTF-8...)."""

    exit_code = 2


class ContextOverflowError(InputError):
    """The tokens asked for do not fit in the model's context window."""

    def __init__(self, what: str, num_tokens: int, limit_tokens: int) -> None:
        self.num_tokens = num_tokens
        self.limit_tokens = limit_tokens
        self.over_tokens = num_tokens - limit_tokens
        super().__init__(
            f"{what} needs {num_tokens:,} tokens but the model's context holds {limit_tokens:,} "
            f"({self.over_tokens:,} too many)"
        )


class InvalidIdError(InputError):
    """A cache id that is not one (kvmart/format/keys.py `parse_cache_id`): never used as a file name or key."""


class UnknownCacheError(KvmartError):
    """No artifact with this cache id (or prefix) is in the store."""

    exit_code = 3


class ArtifactError(KvmartError):
    """An artifact was refused: corrupt, truncated, foreign format or unsupported version. Never used."""

    exit_code = 4


class CodecError(ArtifactError):
    """Encoded tensor data that cannot be decoded exactly (corrupt, truncated, unknown codec or dtype). Never used."""


class ArtifactRejectedError(KvmartError):
    """An artifact a publisher uploaded failed verification (corrupt, foreign, other tokens, or KV the model does
    not compute for its tokens): refused, nothing stored, nothing charged (HTTP 422)."""

    exit_code = 4


class ForgedArtifactError(ArtifactRejectedError):
    """An uploaded artifact's KV differs from what the model computes for its tokens when recomputed: a forgery (or
    a publisher's broken setup). The account may not upload again until the operator allows it (HTTP 422)."""


class FingerprintMismatchError(ArtifactError):
    """An artifact was made by another model, tokenizer, dtype or attention implementation."""


class StoreError(KvmartError):
    """A store cannot be opened or written."""


class StoreUnavailableError(StoreError):
    """A shared tier (Redis, S3) cannot be reached right now. A tiered store degrades around it and retries later."""
class LedgerError(KvmartError):
    """The ledger's database cannot be opened, migrated or written."""

    exit_code = 5


class AuthenticationError(KvmartError):
    """No API key, or one the ledger does not know or has revoked (HTTP 401)."""

    exit_code = 6


class AccountError(InputError):
    """An account name or role that cannot be used (bad name, unknown account, name taken), or a deposit it cannot
    take. `param` names the field it came from, where one did."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class TariffError(InputError):
    """A price, share or amount that is negative, not a number, too large, or a fraction above 1 (HTTP 400).
    `param` names the field it came from, where one did."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class InsufficientFundsError(KvmartError):
    """The account's balance (less its holds for requests in flight) does not cover the charge (HTTP 402).
    Nothing was charged."""

    exit_code = 7

    def __init__(self, message: str, needed_nanousd: int = 0, available_nanousd: int = 0) -> None:
        super().__init__(message)
        self.needed_nanousd, self.available_nanousd = needed_nanousd, available_nanousd


class IdempotencyConflictError(KvmartError):
    """An Idempotency-Key reused with a different request, or while its first request is still running (HTTP 409)."""


# -- serving: what a request can meet (translated to HTTP statuses in kvmart/server/errors.py) ---------------
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


class InconsistentKernelError(KvmartError):
    """The model's matrix route would not give the bits its caches were computed with under the current thread count
    (kvmart/runtime/rows.py): kvmart refuses to compute rather than compute other bits (HTTP 500)."""


class InternalError(KvmartError):
    """A bug: an unexpected exception while serving a request. Logged with its traceback; HTTP 500."""


# -- the market between parties (docs/LEDGER.md): ownership claims, statements --------------------------------------
class UnknownClaimError(KvmartError):
    """No ownership claim with this id belongs to the caller (HTTP 404)."""


class ClaimCheckError(KvmartError):
    """A publisher's claim to control an origin could not be confirmed: the token was not served there, or fetching
    it was refused (a scheme, address, redirect, size or time the provider does not allow). HTTP 422; nothing
    changes."""


class UnknownReceiptError(KvmartError):
    """A receipt asked for is not in the statement named (HTTP 404)."""
