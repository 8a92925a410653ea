"""The two JSON byte forms kvmart hashes or signs, each specified byte by byte in docs/FORMAT.md ("JSON forms"), so
that another implementation can produce the same bytes without Python's `json` module.

- `canonical(value)`: compact canonical JSON, RFC 8785 (JCS) for every value kvmart writes with it: objects with
  ASCII keys sorted by byte, no whitespace, strings escaped minimally and sent as UTF-8, integers in decimal. No
  fractional numbers (they are refused: none occurs in what it is used for). Used by receipts, statements and
  their Merkle leaves, cache ids (the token id list) and chunk keys.
- `spaced(value)`: the older form kept where changing it would change every cache id and manifest hash already
  written (the model fingerprint's digest and its file lists, the artifact manifest hash): keys sorted by code point, `", "`
  between items, `": "` after keys, every character outside printable ASCII escaped as `\\uXXXX`, floats as
  Python's shortest round-trip repr. NaN and infinities are refused.
- `compact(value)`: the spaced form without its spaces (`,` and `:`): what a shared tier's index signature covers
  (kvmart/format/signing.py; the index holds floats and any title, which canonical JSON does not take).

Both raise TypeError/ValueError for a value they cannot write; they never guess."""

from __future__ import annotations

import json

MAX_EXACT_INTEGER = 2**53 - 1  # beyond this RFC 8785 (IEEE doubles) would round; kvmart writes exact digits anyway


def _check(value: object, allow_floats: bool) -> None:
    """TypeError for anything but dict (str keys: ASCII ones unless floats are allowed, i.e. in the spaced form),
    list, str, int, bool, None (and finite floats if allowed)."""
    if value is None or isinstance(value, (str, bool, int)):
        return
    if isinstance(value, float):
        if not allow_floats:
            raise TypeError(f"canonical JSON holds no fractional numbers, got {value!r}")
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"JSON has no {value!r}")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str) or not (key.isascii() or allow_floats):
                raise TypeError(f"JSON object keys must be ASCII strings, got {key!r}")
            _check(item, allow_floats)
        return
    if isinstance(value, (list, tuple)):
        for item in value:
            _check(item, allow_floats)
        return
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def canonical(value: object) -> bytes:
    """The canonical UTF-8 bytes of `value` (see the module docstring). A lone surrogate in a string is a
    UnicodeEncodeError (a ValueError): it has no UTF-8 form."""
    _check(value, allow_floats=False)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def compact(value: object) -> bytes:
    """The compact ASCII bytes of `value` (see the module docstring): what `json.dumps(value, sort_keys=True,
    separators=(",", ":"))` writes, checked first."""
    _check(value, allow_floats=True)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("ascii")


def spaced(value: object) -> bytes:
    """The spaced ASCII bytes of `value` (see the module docstring): what `json.dumps(value, sort_keys=True)`
    writes, checked first."""
    _check(value, allow_floats=True)
    return json.dumps(value, sort_keys=True, allow_nan=False).encode("ascii")
