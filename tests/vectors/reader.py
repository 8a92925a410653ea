"""An independent reader of kvmart artifacts, written from docs/FORMAT.md alone: it imports nothing of kvmart, only
the standard library and numpy (and `zstandard` for zstd-coded tensors; `xxhash`, if installed, to check the
xxh3-128 checksums too). It recomputes every hash the format defines (manifest hash, model fingerprint digest,
cache id, chunk keys, the signatures of artifacts and shared indexes) and decodes the tensors.

Codecs plug in by name: raw and zstd are here; any module `NAME_codec_reader.py` beside this file that defines
`CODEC = "name"` and `decode(data: bytes, params: dict, dtype: str, shape: tuple[int, ...]) -> bytes` (the decoded
tensor's little-endian bytes) adds a decoder for that codec (kvmart_codec_reader.py: kvmart's own codec).

    python tests/vectors/reader.py ARTIFACT.kvm [--salt SALT]"""

from __future__ import annotations

import hashlib
import hmac
import importlib.util
import json
import math
import struct
import sys
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import numpy as np

NUMPY_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2")}  # bf16: bits
SAFETENSORS = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


class FormatError(Exception):
    """The artifact breaks the format."""


# -- the two JSON forms (docs/FORMAT.md "JSON forms") ----------------------------------------------------------------
SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}


def spaced_string(text: str) -> str:
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch in SHORT_ESCAPES:
            out.append(SHORT_ESCAPES[ch])
        elif 0x20 <= code <= 0x7E:
            out.append(ch)
        elif code > 0xFFFF:
            code -= 0x10000
            out.append(f"\\u{0xD800 | (code >> 10):04x}\\u{0xDC00 | (code & 0x3FF):04x}")
        else:
            out.append(f"\\u{code:04x}")
    return "".join(out) + '"'


def spaced_float(value: float) -> str:
    """Shortest round-trip digits; positional for decimal exponents -4..15 (with at least one digit after the
    point), else d.ddde+XX / d.ddde-XX with at least two exponent digits."""
    if value != value or value in (float("inf"), float("-inf")):
        raise FormatError("NaN and infinities have no JSON form")
    if value == 0:
        return "-0.0" if math.copysign(1.0, value) < 0 else "0.0"
    sign = "-" if value < 0 else ""
    shortest = Decimal(repr(abs(value)))  # repr: the shortest digits that read back as the same double
    digits = "".join(map(str, shortest.normalize().as_tuple().digits))
    exponent = shortest.adjusted()  # the decimal exponent of the leading digit
    if -4 <= exponent < 16:
        point = exponent + 1  # digits before the decimal point
        if point <= 0:
            return sign + "0." + "0" * -point + digits
        if point >= len(digits):
            return sign + digits + "0" * (point - len(digits)) + ".0"
        return sign + digits[:point] + "." + digits[point:]
    tail = ("." + digits[1:]) if len(digits) > 1 else ""
    return f"{sign}{digits[0]}{tail}e{'-' if exponent < 0 else '+'}{abs(exponent):02d}"


def spaced(value, item_separator: str = ", ", key_separator: str = ": ") -> bytes:
    """The spaced form: sorted keys, ', ' and ': ' separators, ASCII with \\u escapes (other separators: the
    compact form)."""
    def write(v) -> str:
        if v is None:
            return "null"
        if v is True or v is False:
            return "true" if v else "false"
        if isinstance(v, int):
            return str(v)
        if isinstance(v, float):
            return spaced_float(v)
        if isinstance(v, str):
            return spaced_string(v)
        if isinstance(v, list):
            return "[" + item_separator.join(write(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + item_separator.join(f"{spaced_string(k)}{key_separator}{write(v[k])}" for k in sorted(v)) + "}"
        raise FormatError(f"not a JSON value: {v!r}")
    return write(value).encode("ascii")


def compact(value) -> bytes:
    """The compact form: the spaced form with ',' and ':' as separators."""
    return spaced(value, ",", ":")


def canonical_int_list(values: list[int]) -> bytes:
    """The canonical (RFC 8785) form of a list of integers: '[' digits joined by ',' ']'."""
    return ("[" + ",".join(str(int(v)) for v in values) + "]").encode("ascii")


# -- hashes ------------------------------------------------------------------------------------------------------------
def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cache_id(fingerprint_digest: str, token_ids: list[int], salt: str, terms: str = "") -> str:
    return sha256_hex(b"kvmart-cache-v1\x00" + fingerprint_digest.encode() + b"\x00" + salt.encode("utf-8")
                      + b"\x00" + canonical_int_list(token_ids)
                      + (b"\x00terms\x00" + terms.encode("utf-8") if terms else b""))


def chained_keys(fingerprint_digest: str, pieces: list[list[int]], salt: str) -> list[str]:
    """The chained keys of consecutive chunks of any lengths (a document index's chunks)."""
    keys, parent = [], ""
    for ids in pieces:
        parent = sha256_hex(b"kvmart-chunk-v1\x00" + parent.encode() + b"\x00" + fingerprint_digest.encode()
                            + b"\x00" + salt.encode("utf-8") + b"\x00" + canonical_int_list(ids))
        keys.append(parent)
    return keys


def chunk_keys(fingerprint_digest: str, token_ids: list[int], chunk_tokens: int, salt: str) -> list[str]:
    keys, parent = [], ""
    for start in range(0, len(token_ids) - chunk_tokens + 1, chunk_tokens):
        parent = sha256_hex(b"kvmart-chunk-v1\x00" + parent.encode() + b"\x00" + fingerprint_digest.encode()
                            + b"\x00" + salt.encode("utf-8") + b"\x00"
                            + canonical_int_list(token_ids[start:start + chunk_tokens]))
        keys.append(parent)
    return keys


def artifact_signature(key: str, cache_id: str, manifest_sha256: str) -> str:
    """An artifact header's `kvmart_signature` (docs/FORMAT.md "Hash inputs"): hex HMAC-SHA256."""
    message = b"kvmart-artifact-signature-v2:" + cache_id.encode() + b"\0" + manifest_sha256.encode()
    return hmac.new(key.encode(), message, hashlib.sha256).hexdigest()


def index_signature(key: str, stored_id: str, index: dict) -> str:
    """A shared tier's index `signature`, over the index without it, for the id it is stored under."""
    body = {k: v for k, v in index.items() if k != "signature"}
    message = b"kvmart-index-signature-v1:" + stored_id.encode() + b"\0" + compact(body)
    return hmac.new(key.encode(), message, hashlib.sha256).hexdigest()


def fingerprint_digest(components: dict[str, str]) -> str:
    return sha256_hex(spaced(components))


VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "dtype", "torch_dtype")


def config_component(config_json: str) -> str:
    config = json.loads(config_json)
    for key in VOLATILE_CONFIG_KEYS:
        config.pop(key, None)
    return sha256_hex(spaced(config))


def files_component(files: list[list[str]]) -> str:
    """[[file name, hex sha256 of the file], ...] in file-name order."""
    return sha256_hex(spaced(sorted(files, key=lambda f: f[0])))


# -- decoders ---------------------------------------------------------------------------------------------------------
def decode_raw(data: bytes, params: dict, dtype: str, shape: tuple[int, ...]) -> bytes:
    if params:
        raise FormatError("raw tensors take no params")
    return data


def decode_zstd(data: bytes, params: dict, dtype: str, shape: tuple[int, ...]) -> bytes:
    import zstandard

    expected = int(np.prod(shape)) * ITEMSIZE[dtype]
    if set(params) != {"level"}:
        raise FormatError(f"zstd params {params!r}")
    if zstandard.frame_content_size(data) != expected:
        raise FormatError("the zstd frame does not declare the tensor's size")
    return zstandard.ZstdDecompressor().decompress(data, max_output_size=expected)


DECODERS = {"raw": decode_raw, "zstd": decode_zstd}


def load_plugins(folder: Path = Path(__file__).parent) -> None:
    """Register NAME_codec_reader.py modules of `folder` (see the module docstring)."""
    for path in sorted(folder.glob("*_codec_reader.py")):
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        DECODERS[module.CODEC] = module.decode


# -- the artifact -----------------------------------------------------------------------------------------------------
@dataclass
class Artifact:
    manifest: dict
    tensors: dict[str, np.ndarray]  # name -> array (bfloat16 as its uint16 bit patterns)
    checksums_checked: bool


def xxh3_128(data: bytes) -> str | None:
    try:
        import xxhash
    except ImportError:
        return None
    return xxhash.xxh3_128_hexdigest(data)


def read(path: Path, salt: str = "", expected_key: str | None = None) -> Artifact:
    """Read and check an artifact (`expected_key`: a chunk's chained key, which is its cache id); FormatError saying
    what breaks the format."""
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n].decode("utf-8"))
    body = data[8 + n:]
    manifest = json.loads(header["__metadata__"]["kvmart"])
    if manifest.get("format") != "kvmart-kv" or manifest.get("format_version") not in (1, 2, 3):
        raise FormatError("not a kvmart artifact of a version this reader knows")
    unhashed = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    if sha256_hex(spaced(unhashed)) != manifest["manifest_sha256"]:
        raise FormatError("the manifest hash does not match")
    if fingerprint_digest(manifest["fingerprint"]) != manifest["fingerprint_digest"]:
        raise FormatError("the fingerprint digest does not match its components")
    chunks = manifest.get("chunks", [])  # version 3: a document index lists its chunks and holds no tensors
    if not chunks and expected_key is not None:
        if manifest["cache_id"] != expected_key:
            raise FormatError("the chunk's cache id is not the key its reader derived")
    elif cache_id(manifest["fingerprint_digest"], manifest["token_ids"], salt, manifest.get("terms", "")) \
            != manifest["cache_id"]:
        raise FormatError("the cache id does not match (wrong salt?)")
    if chunks:
        pieces, at = [], 0
        for n, _ in chunks:
            pieces.append(manifest["token_ids"][at:at + n])
            at += n
        if at != len(manifest["token_ids"]) or [k for _, k in chunks] != chained_keys(
                manifest["fingerprint_digest"], pieces, salt):
            raise FormatError("the index's chunk keys do not chain over its token ids")
    if manifest["salt_hash"] != (sha256_hex(salt.encode("utf-8")) if salt else ""):
        raise FormatError("the salt hash does not match")
    dtype = manifest["dtype"]
    shape = (1, manifest["kv_heads"], len(manifest["token_ids"]), manifest["head_dim"])
    names = [] if chunks else [f"layers.{i}.{kind}" for i in range(manifest["num_layers"])
                                for kind in ("keys", "values")]
    tensors, offset, checked = {}, 0, True
    for name in names:
        entry, record = header[name], manifest["tensors"][name]
        if manifest["format_version"] == 1:
            record = {"checksum": record, "codec": "raw", "params": {}, "stored_checksum": record}
        start, end = entry["data_offsets"]
        if start != offset:
            raise FormatError(f"{name} is not where the format puts it")
        offset = end
        stored = body[start:end]
        if record["codec"] == "raw":
            if (entry["dtype"], entry["shape"]) != (SAFETENSORS[dtype], list(shape)):
                raise FormatError(f"{name}: a raw tensor has the manifest's dtype and shape")
        elif (entry["dtype"], entry["shape"]) != ("U8", [end - start]):
            raise FormatError(f"{name}: an encoded tensor is a U8 vector of its bytes")
        if record["codec"] not in DECODERS:
            raise FormatError(f"{name}: no decoder for codec {record['codec']!r} (add {record['codec']}_codec_reader.py)")
        decoded = DECODERS[record["codec"]](bytes(stored), record["params"], dtype, shape)
        if len(decoded) != int(np.prod(shape)) * ITEMSIZE[dtype]:
            raise FormatError(f"{name} decodes to {len(decoded)} bytes")
        for what, digest in ((stored, record["stored_checksum"]), (decoded, record["checksum"])):
            found = xxh3_128(what)
            checked = checked and found is not None
            if found is not None and found != digest:
                raise FormatError(f"{name}: checksum mismatch")
        tensors[name] = np.frombuffer(decoded, dtype=NUMPY_DTYPES[dtype]).reshape(shape)
    if offset != len(body):
        raise FormatError("the file is longer or shorter than its header says")
    return Artifact(manifest, tensors, checked)


load_plugins()

if __name__ == "__main__":
    args = sys.argv[1:]
    salt = args[args.index("--salt") + 1] if "--salt" in args else ""
    found = read(Path(args[0]), salt)
    print(json.dumps({"cache_id": found.manifest["cache_id"], "tokens": len(found.manifest["token_ids"]),
                      "tensors": {n: [str(t.dtype), list(t.shape)] for n, t in found.tensors.items()},
                      "checksums_checked": found.checksums_checked}, indent=2))
