"""The codec's compiled kernels (kvmart/codec/csrc/*.c), built by `pip install` with the machine's C compiler.

Imported on first use, so that kvmart imports without them; a kvmart installed without them (copied sources, no
compiler at install time) gets a CodecError saying how to build them, not an ImportError from deep inside."""

from __future__ import annotations

import importlib
from functools import cache
from types import ModuleType

from kvmart.errors import CodecError


@cache
def kernels() -> ModuleType:
    """The `_kernels` extension module; CodecError if it was not built."""
    try:
        return importlib.import_module("kvmart.codec._kernels")
    except ImportError as e:
        raise CodecError("kvmart's codec kernels are not built (kvmart/codec/csrc/): reinstall kvmart with a C "
                         f"compiler present, `pip install -e .` in its checkout ({e})") from e
