"""Makes the test vectors of docs/FORMAT.md from builtin:tiny (kvmart's seeded random model), into this folder:

    model.json             the model fingerprint: config.json as written, [name, sha256] of its weight and tokenizer
                           files, dtype and attention, and the components and digest they hash to
    NAME.kvm               an artifact, as kvmart writes it (raw, or each codec asked for)
    NAME.json              what a reader must find: cache id, salt, token ids, manifest hash, chunk keys, codecs
    NAME.tensors.bin       the decoded tensors, raw little-endian bytes, back to back in file order
    chain.*                a document stored as a chunk chain: its index, its chunks, what a reader must find
    chain.signatures.json  the signatures of the chain's index and chunks, and of a shared tier's index, under a
                           test key (docs/FORMAT.md "Hash inputs"): kvmart writes them when KVMART_SIGNING_KEY is set

    python tests/vectors/generate.py [--codec raw --codec zstd ...]
    python tests/vectors/generate.py --signatures-only   # from the chain vector already written

Vectors are data: regenerate them only when the format changes on purpose (the artifacts record kvmart's, torch's
and transformers' versions, so a new run gives new files). tests/test_vectors.py checks that both kvmart and the
independent reader (reader.py) read every vector."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import tempfile
from pathlib import Path

from kvmart.codec.raw import byte_view
from kvmart.config import Settings
from kvmart.format.artifact import encode_artifact, read_artifact
from kvmart.format.keys import chunk_keys
from kvmart.runtime.fingerprint import TOKENIZER_FILES, WEIGHT_SUFFIXES
from kvmart.runtime.model import Model

HERE = Path(__file__).parent
TEXT = "The licence steward is the Mozilla Foundation. Copyright holders may relicense."
CASES = [  # name, dtype, salt, tokens
    ("f32-plain", "float32", "", 11),
    ("bf16-salted", "bfloat16", "tenant-salt-0123456789abcdef", 17),
]
CHUNK_TOKENS = 8
SIGNING_KEY = "kvmart-test-vector-signing-key"  # a key for the vectors only


def model_vector(model: Model, folder: Path) -> dict:
    files = lambda paths: [[p.name, hashlib.sha256(p.read_bytes()).hexdigest()]  # noqa: E731
                           for p in sorted(paths, key=lambda p: p.name)]
    weights = [p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES]
    tokenizer = [folder / n for n in TOKENIZER_FILES if (folder / n).exists()]
    fp = model.fingerprint
    return {"config_json": (folder / "config.json").read_text(), "weight_files": files(weights),
            "tokenizer_files": files(tokenizer), "dtype": fp.dtype, "attention": fp.attention,
            "components": fp.as_dict(), "digest": fp.digest}


def write_case(name: str, model: Model, salt: str, num_tokens: int, codec: str) -> None:
    ids = model.tokenize(TEXT)[:num_tokens]
    assert len(ids) == num_tokens, f"the text has {len(ids)} tokens"
    kv = model.prefill(ids)
    encoded = encode_artifact(kv, ids, model.fingerprint, salt, codec)
    data = io.BytesIO()
    encoded.write(data)
    manifest, decoded = read_artifact(io.BytesIO(data.getvalue()), len(data.getvalue()), model.fingerprint, salt)
    if codec != "raw":
        assert any(r.codec == codec.split(":")[0] for r in manifest.tensors.values()), f"{codec} shrank nothing"
    stem = HERE / f"{name}-{codec.split(':')[0]}"
    stem.with_suffix(".kvm").write_bytes(data.getvalue())
    tensors = b"".join(bytes(byte_view(t.contiguous())) for t in decoded.tensors().values())
    stem.with_suffix(".tensors.bin").write_bytes(tensors)
    expected = {"artifact": stem.name + ".kvm", "tensors": stem.name + ".tensors.bin", "salt": salt,
                "cache_id": manifest.cache_id, "token_ids": ids, "dtype": manifest.dtype,
                "shape": [1, manifest.kv_heads, len(ids), manifest.head_dim], "num_layers": manifest.num_layers,
                "manifest_sha256": manifest.manifest_sha256, "fingerprint_digest": manifest.fingerprint_digest,
                "codecs": {n: r.codec for n, r in manifest.tensors.items()}, "chunk_tokens": CHUNK_TOKENS,
                "chunk_keys": chunk_keys(manifest.fingerprint_digest, ids, CHUNK_TOKENS, salt),
                "tensors_sha256": hashlib.sha256(tensors).hexdigest()}
    stem.with_suffix(".json").write_text(json.dumps(expected, indent=2, sort_keys=True) + "\n")
    print(f"{stem.name}: {len(data.getvalue()):,} bytes, cache id {manifest.cache_id[:16]}", file=sys.stderr)


def write_chain(model: Model, salt: str, num_tokens: int, chunk_tokens: int) -> None:
    """A document stored as a chunk chain: its index (chain.index.kvm) and its chunks (chain.chunk-N.kvm, raw),
    with chain.chain.json saying what a reader must find (docs/FORMAT.md "What is stored")."""
    from kvmart.reuse import core
    from kvmart.store.memory import MemoryStore

    ids = model.tokenize(TEXT)[:num_tokens]
    store = MemoryStore()
    entry = core.precompute_ids(model, store, ids, "chain", salt=salt, chunk_tokens=chunk_tokens).entry
    with store.open(entry.cache_id) as (f, _):
        (HERE / "chain.index.kvm").write_bytes(f.read())
    chunks = core.document_chunks(model, ids, salt, chunk_tokens)
    files = []
    for n, chunk in enumerate(chunks):
        with store.open(chunk.key) as (f, _):
            data = f.read()
        (HERE / f"chain.chunk-{n}.kvm").write_bytes(data)
        files.append({"artifact": f"chain.chunk-{n}.kvm", "key": chunk.key, "token_ids": list(chunk.token_ids)})
    expected = {"index": "chain.index.kvm", "salt": salt, "cache_id": entry.cache_id, "token_ids": ids,
                "chunk_tokens": chunk_tokens, "chunks": files}
    (HERE / "chain.chain.json").write_text(json.dumps(expected, indent=2, sort_keys=True) + "\n")
    print(f"chain: {len(chunks)} chunks, cache id {entry.cache_id[:16]}", file=sys.stderr)


def write_signatures() -> None:
    """chain.signatures.json: under SIGNING_KEY, the signature each artifact of the chain vector carries when
    written with that key (its cache id and manifest hash), and a shared tier's index with its signature."""
    from kvmart.format.artifact import read_manifest
    from kvmart.format.signing import sign, sign_index

    chain = json.loads((HERE / "chain.chain.json").read_text())
    artifacts = []
    for name in [chain["index"], *(c["artifact"] for c in chain["chunks"])]:
        data = (HERE / name).read_bytes()
        manifest, _ = read_manifest(io.BytesIO(data), len(data))
        artifacts.append({"artifact": name, "cache_id": manifest.cache_id, "manifest_sha256": manifest.manifest_sha256,
                          "signature": sign(SIGNING_KEY.encode(), manifest.cache_id, manifest.manifest_sha256)})
    index = {"entry": {"cache_id": chain["cache_id"], "title": "cha\u00eene \u2014 \U0001f4c4", "source": "",
                       "model": "builtin:tiny", "fingerprint": "0" * 64, "num_tokens": len(chain["token_ids"]),
                       "artifact_bytes": 1216, "prefill_seconds": 0.015625, "created_at": 1700000000.5,
                       "kind": "document", "owner": "", "kv_bytes": 9664},
             "size": 1216, "chunk_bytes": 4096, "nonce": "0123456789abcdef", "chunks": ["0" * 32]}
    expected = {"key": SIGNING_KEY, "artifacts": artifacts,
                "shared_index": {"stored_id": chain["cache_id"], "index": index,
                                 "signature": sign_index(SIGNING_KEY.encode(), chain["cache_id"], index)}}
    (HERE / "chain.signatures.json").write_text(json.dumps(expected, indent=2, sort_keys=True) + "\n")
    print(f"signatures: {len(artifacts)} artifacts and a shared index", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--codec", action="append", help="codecs to write (default: raw, zstd and kvmart)")
    parser.add_argument("--chain-only", action="store_true", help="write only the chunk-chain vector")
    parser.add_argument("--signatures-only", action="store_true",
                        help="write only the signatures of the chunk-chain vector already written")
    args = parser.parse_args()
    if args.signatures_only:
        write_signatures()
        return
    with tempfile.TemporaryDirectory() as data_dir:
        if args.chain_only:
            write_chain(Model.load(Settings(data_dir=Path(data_dir), model="builtin:tiny")), "", 11, CHUNK_TOKENS)
            write_signatures()
            return
        for name, dtype, salt, num_tokens in CASES:
            model = Model.load(Settings(data_dir=Path(data_dir), model="builtin:tiny", dtype=dtype))
            for codec in args.codec or ["raw", "zstd", "kvmart"]:
                write_case(name, model, salt, num_tokens, codec)
            if dtype == "float32":
                write_chain(model, "", num_tokens, CHUNK_TOKENS)
                write_signatures()
        folder = next(Path(data_dir, "models").glob("builtin-tiny-*"))
        (HERE / "model.json").write_text(json.dumps(model_vector(model, folder), indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
