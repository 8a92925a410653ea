"""The artifact format: a round trip gives the KV back bit for bit, the file is plain safetensors, and every damaged,
foreign or mismatched file is refused with an ArtifactError that says why."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import struct
from pathlib import Path

import pytest
import torch
import xxhash
from artifact_support import rewrite, split
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file

from kvmart.errors import ArtifactError, FingerprintMismatchError
from kvmart.format.artifact import manifest_for, read_artifact, write_artifact
from kvmart.reuse import core
from kvmart.runtime.fingerprint import ModelFingerprint
from kvmart.runtime.kv import KV
from kvmart.runtime.model import Model
from kvmart.store.disk import DiskStore

TEXT = "Redistribution and use in source and binary forms, with or without modification, are permitted."


@dataclasses.dataclass(frozen=True)
class Made:
    kv: KV
    token_ids: list[int]
    fingerprint: ModelFingerprint
    data: bytes

    @property
    def header_bytes(self) -> int:
        return 8 + struct.unpack("<Q", self.data[:8])[0]


def make(model: Model, text: str = TEXT, salt: str = "") -> Made:
    ids = model.tokenize(text)
    kv = model.prefill(ids)
    buffer = io.BytesIO()
    written = write_artifact(buffer, manifest_for(kv, ids, model.fingerprint, salt), kv)
    assert written == len(buffer.getvalue())
    return Made(kv, ids, model.fingerprint, buffer.getvalue())


def read(data: bytes, fingerprint: ModelFingerprint, salt: str = ""):
    return read_artifact(io.BytesIO(data), len(data), fingerprint, salt)


def refused(data: bytes, fingerprint: ModelFingerprint, salt: str = "") -> str:
    """The message of the ArtifactError raised when reading `data` (fails the test if none is raised)."""
    with pytest.raises(ArtifactError) as e:
        read(data, fingerprint, salt)
    return str(e.value)


def flip(data: bytes, position: int, bit: int = 0) -> bytes:
    out = bytearray(data)
    out[position] ^= 1 << bit
    return bytes(out)


@pytest.fixture(scope="module")
def made(model_f32) -> Made:
    return make(model_f32)


# -- what a good artifact is -------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip(load_tiny, dtype):
    model = load_tiny(dtype)
    m = make(model)
    manifest, kv = read(m.data, m.fingerprint)
    assert manifest.token_ids == m.token_ids and manifest.num_tokens == len(m.token_ids)
    assert manifest.dtype == dtype and manifest.codec == "raw"
    assert manifest.fingerprint_digest == model.fingerprint.digest
    assert kv.num_layers == model.num_layers and kv.dtype == model.dtype
    for a, b in zip((*kv.keys, *kv.values), (*m.kv.keys, *m.kv.values), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_artifact_is_a_valid_safetensors_file(model_f32, made, tmp_path: Path):
    path = tmp_path / "a.kvm"
    path.write_bytes(made.data)
    tensors = load_file(str(path))
    expected = {f"layers.{i}.{kind}": t for i in range(model_f32.num_layers)
                for kind, t in (("keys", made.kv.keys[i]), ("values", made.kv.values[i]))}
    assert set(tensors) == set(expected)
    for name, t in expected.items():
        assert torch.equal(tensors[name], t), name
    with safe_open(str(path), framework="pt") as f:
        manifest = json.loads(f.metadata()["kvmart"])
    assert manifest["format"] == "kvmart-kv" and manifest["format_version"] == 3
    assert manifest["token_ids"] == made.token_ids
    assert made.header_bytes % 64 == 0  # tensor data starts 64-byte aligned


def test_bfloat16_artifact_is_valid_safetensors(model_bf16, tmp_path: Path):
    m = make(model_bf16)
    path = tmp_path / "b.kvm"
    path.write_bytes(m.data)
    tensors = load_file(str(path))
    assert tensors["layers.0.keys"].dtype == torch.bfloat16
    assert torch.equal(tensors["layers.1.values"], m.kv.values[1])


# -- damage ------------------------------------------------------------------------------------------------------
def test_truncated_anywhere_is_refused(made):
    h, size = made.header_bytes, len(made.data)
    cuts = sorted({0, 1, 7, 8, 9, 20, h // 2, h - 1, h, h + 1, h + (size - h) // 2, size - 4, size - 1})
    for cut in cuts:
        message = refused(made.data[:cut], made.fingerprint)
        assert "truncated" in message, (cut, message)


def test_padded_file_is_refused(made):
    assert "padded" in refused(made.data + b"\0" * 64, made.fingerprint)


def test_bit_flip_in_tensor_data_is_refused(made):
    h, size = made.header_bytes, len(made.data)
    positions = [h, h + 1, size - 1] + list(range(h, size, max(1, (size - h) // 40)))
    for pos in positions:
        message = refused(flip(made.data, pos, pos % 8), made.fingerprint)
        assert "checksum" in message, (pos, message)


def test_bit_flip_in_manifest_is_refused(made):
    """A token id digit changed inside the manifest: the manifest hash no longer matches."""
    n = made.header_bytes
    at = made.data.index(b"token_ids", 0, n)
    digit = next(i for i in range(at, n) if made.data[i:i + 1].isdigit())
    message = refused(flip(made.data, digit), made.fingerprint)
    assert "manifest does not match its recorded hash" in message


def header_flips(made: Made):
    """Every single-bit flip of the header: 8 bits of each byte, the length prefix included (about 13k reads)."""
    for pos in range(made.header_bytes):
        for bit in range(8):
            yield pos, bit, flip(made.data, pos, bit)


def test_no_single_bit_flip_in_the_header_is_read_silently(made):
    escaped = []
    for pos, bit, data in header_flips(made):
        try:
            read(data, made.fingerprint)
            escaped.append((pos, bit))
        except Exception:  # noqa: BLE001 - the typed-error check is the next test
            pass
    assert not escaped, f"bit flips read without error at (byte, bit) {escaped[:10]}"


def test_every_single_bit_flip_in_the_header_raises_artifact_error(made):
    for _pos, _bit, data in header_flips(made):
        with pytest.raises(ArtifactError):
            read(data, made.fingerprint)


def test_corrupt_file_in_a_store_is_refused_by_load(model_f32, kvmart_data_dir: Path):
    store = DiskStore(kvmart_data_dir / "store")
    entry = core.precompute(model_f32, store, TEXT).entry
    chunk = next(e for e in store.entries() if e.kind == "chunk")
    path = store.object_path(chunk.cache_id)
    data = path.read_bytes()
    path.write_bytes(flip(data, len(data) - 10))
    with pytest.raises(ArtifactError, match="checksum"):
        core.load(model_f32, store, entry.cache_id)


# -- foreign files -----------------------------------------------------------------------------------------------
def test_random_bytes_are_refused(made):
    data = os.urandom(4096)
    assert "not a kvmart artifact" in refused(data, made.fingerprint)
    small_header = struct.pack("<Q", 100) + os.urandom(400)
    assert "not a kvmart artifact" in refused(small_header, made.fingerprint)


def test_plain_safetensors_file_is_refused(made, tmp_path: Path):
    path = tmp_path / "plain.safetensors"
    save_file({"layers.0.keys": torch.zeros(1, 2, 3, 16)}, str(path))
    assert "no readable kvmart manifest" in refused(path.read_bytes(), made.fingerprint)
    other = save({"x": torch.ones(3)}, metadata={"kvmart": json.dumps({"format": "something-else"})})
    assert "format is 'something-else'" in refused(other, made.fingerprint)
    garbled = save({"x": torch.ones(3)}, metadata={"kvmart": "{not json"})
    assert "no readable kvmart manifest" in refused(garbled, made.fingerprint)


def test_manifest_that_is_not_an_object_is_refused(made):
    data = save({"x": torch.ones(3)}, metadata={"kvmart": "[]"})
    assert "not a kvmart artifact" in refused(data, made.fingerprint)


def test_manifest_with_missing_fields_is_refused(made):
    def drop(manifest: dict) -> None:
        del manifest["token_ids"]

    refused(rewrite(made.data, drop), made.fingerprint)


def test_data_offsets_disagreeing_with_shape_are_refused(made):
    header, manifest, tensors = split(made.data)
    keys, values = header["layers.0.keys"]["data_offsets"], header["layers.0.values"]["data_offsets"]
    keys[1] -= 8
    values[0] -= 8
    forged = {name: {**manifest["tensors"][name], "checksum": xxhash.xxh3_128_hexdigest(tensors[start:end]),
                     "stored_checksum": xxhash.xxh3_128_hexdigest(tensors[start:end])}
              for name, (start, end) in (("layers.0.keys", keys), ("layers.0.values", values))}
    raw = json.dumps(header, separators=(",", ":")).encode()
    data = struct.pack("<Q", len(raw)) + raw + tensors
    refused(rewrite(data, lambda m: m["tensors"].update(forged)), made.fingerprint)


def test_rewrite_helper_changes_nothing_by_itself(made):
    """The control for the tests below: a rewrite with no edit reads back fine."""
    manifest, kv = read(rewrite(made.data, lambda m: None), made.fingerprint)
    assert manifest.token_ids == made.token_ids and torch.equal(kv.keys[0], made.kv.keys[0])


@pytest.mark.parametrize("version", [0, 4, "2", None, True])
def test_unsupported_format_version_is_refused(made, version):
    message = refused(rewrite(made.data, lambda m: m.update(format_version=version)), made.fingerprint)
    assert f"format_version {version!r} is not supported" in message


def test_unsupported_codec_is_refused(made):
    message = refused(rewrite(made.data, lambda m: m.update(codec="lzma")), made.fingerprint)
    assert "codec 'lzma' is not supported" in message


def test_tokens_not_matching_cache_id_are_refused(made):
    """Token ids edited (with a consistent manifest hash): the cache id no longer matches the tokens."""
    message = refused(rewrite(made.data, lambda m: m["token_ids"].__setitem__(0, m["token_ids"][0] + 1)),
                      made.fingerprint)
    assert "cache id does not match" in message


def test_tensor_checksum_mismatch_is_refused(made):
    def change(m: dict) -> None:
        m["tensors"]["layers.1.values"].update(checksum="0" * 32, stored_checksum="0" * 32)

    assert "layers.1.values does not match its checksum" in refused(rewrite(made.data, change), made.fingerprint)


def test_salt_is_part_of_the_identity(model_f32):
    m = make(model_f32, salt="tenant-a")
    manifest, _ = read(m.data, m.fingerprint, salt="tenant-a")
    assert manifest.salt_hash == hashlib.sha256(b"tenant-a").hexdigest()
    assert "cache id does not match" in refused(m.data, m.fingerprint, salt="tenant-b")
    assert "cache id does not match" in refused(m.data, m.fingerprint)


# -- made by another model ---------------------------------------------------------------------------------------
def test_artifact_from_another_dtype_is_refused(made, model_bf16):
    with pytest.raises(FingerprintMismatchError) as e:
        read(made.data, model_bf16.fingerprint)
    message = str(e.value)
    assert "dtype" in message and "float32" in message and "bfloat16" in message
    assert "weights" not in message and "tokenizer" not in message


@pytest.mark.parametrize("component", ["weights", "tokenizer", "config", "attention"])
def test_artifact_from_another_model_names_the_component(made, component):
    other = dataclasses.replace(made.fingerprint, **{component: "f" * 64 if component != "attention" else "eager"})
    with pytest.raises(FingerprintMismatchError) as e:
        read(made.data, other)
    differing = str(e.value).split(": ", 1)[1].split(" differ", 1)[0]
    assert differing == component


def test_fingerprint_mismatch_through_the_store(model_f32, model_bf16, kvmart_data_dir: Path):
    store = DiskStore(kvmart_data_dir / "store")
    entry = core.precompute(model_f32, store, TEXT).entry
    with pytest.raises(FingerprintMismatchError, match="dtype"):
        core.load(model_bf16, store, entry.cache_id)
