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
    """An account name or role that cannot be used (bad name, unknown account, name taken)."""


class TariffError(InputError):
    """A price or share that is negative, not a number, or a fraction above 1 (HTTP 400)."""


class InsufficientFundsError(KvmartError):
    """The account's balance (less its holds for requests in flight) does not cover the charge (HTTP 402).
    Nothing was charged."""

    exit_code = 7

    def __init__(self, message: str, needed_nanousd: int = 0, available_nanousd: int = 0) -> None:
        super().__init__(message)
        self.needed_nanousd, self.available_nanousd = needed_nanousd, available_nanousd


class IdempotencyConflictError(KvmartError):
    """An Idempotency-Key reused with a different request, or while its first request is still running (HTTP 409)."""
