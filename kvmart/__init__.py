"""kvmart: compute a document's KV cache once, host it provider-side, reuse it token-exactly."""

__version__ = "0.1.0"
__all__ = ["__version__"]
