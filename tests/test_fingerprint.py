"""Fingerprints: stable for the same model, different (in exactly the right component) when anything that can
change a KV bit changes; cache ids; the file hash cache keyed by size and mtime."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from kvmart.format.keys import cache_id
from kvmart.runtime import rows
from kvmart.runtime.fingerprint import file_sha256, model_fingerprint

HASHES = "hashes.json"


@pytest.fixture
def folder(tiny_folder: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny model folder, free to modify."""
    return Path(shutil.copytree(tiny_folder, tmp_path / "tiny"))


def fp(folder: Path, dtype: str = "float32", attention: str = "sdpa"):
    return model_fingerprint(folder, dtype, attention, folder.parent / HASHES)


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data, indent=2))


def test_stable_across_computations(folder: Path, tiny_folder: Path):
    first, second = fp(folder), fp(folder)
    assert first == second and first.digest == second.digest
    assert len(first.digest) == 64 and int(first.digest, 16) >= 0
    assert model_fingerprint(folder, "float32", "sdpa") == first  # with or without the hash cache
    # the copy is the same model as the original, wherever it lives
    assert model_fingerprint(tiny_folder, "float32", "sdpa") == first


def test_loaded_model_carries_its_folder_fingerprint(model_f32, model_bf16, tiny_folder: Path):
    folder_fp = model_fingerprint(tiny_folder, "float32", model_f32.attention)
    # the folder's components, and the route its linear layers multiply by (kvmart/runtime/rows.py)
    assert model_f32.fingerprint == replace(folder_fp, linear="" if model_f32.linear_route == "sgemm" else
                                            rows.fingerprint_component())
    assert model_f32.fingerprint.attention == model_f32.attention
    expected = ["dtype"] + (["linear"] if model_f32.linear_route != "sgemm" else [])  # bfloat16 multiplies by sgemm
    assert model_bf16.fingerprint.differences(model_f32.fingerprint.as_dict()) == expected


@pytest.mark.parametrize("change, component", [
    (lambda f: flip_byte(f / "model.safetensors", -5), "weights"),
    (lambda f: flip_byte(f / "model.safetensors", (f / "model.safetensors").stat().st_size // 2), "weights"),
    (lambda f: (f / "extra.safetensors").write_bytes(b"x"), "weights"),
    (lambda f: edit_json(f / "tokenizer_config.json", model_max_length=123), "tokenizer"),
    (lambda f: (f / "tokenizer.json").write_text((f / "tokenizer.json").read_text().replace('"<|im_end|>"', '"<|im_stop|>"')),
     "tokenizer"),
    (lambda f: (f / "chat_template.jinja").write_text((f / "chat_template.jinja").read_text() + " "), "tokenizer"),
    (lambda f: edit_json(f / "config.json", rms_norm_eps=1e-5), "config"),
    (lambda f: edit_json(f / "config.json", rope_theta=12345.0), "config"),
], ids=["weights-tail", "weights-middle", "weights-extra-file", "tokenizer-config", "tokenizer-vocab",
        "chat-template", "config-eps", "config-rope"])
def test_changes_name_the_component(folder: Path, change, component):
    before = fp(folder)
    change(folder)
    after = fp(folder)
    assert after.digest != before.digest
    assert after.differences(before.as_dict()) == [component]


def test_volatile_config_keys_do_not_count(folder: Path):
    before = fp(folder)
    edit_json(folder / "config.json", transformers_version="0.0.1", _name_or_path="/elsewhere", dtype="bfloat16")
    assert fp(folder) == before


def test_dtype_and_attention_are_components(folder: Path):
    base = fp(folder)
    assert fp(folder, dtype="bfloat16").differences(base.as_dict()) == ["dtype"]
    assert fp(folder, attention="eager").differences(base.as_dict()) == ["attention"]
    assert len({base.digest, fp(folder, dtype="bfloat16").digest, fp(folder, attention="eager").digest}) == 3


# -- cache ids ---------------------------------------------------------------------------------------------------
def test_cache_id_depends_on_tokens_fingerprint_and_salt():
    d1, d2 = "a" * 64, "b" * 64
    base = cache_id(d1, [1, 2, 3])
    assert base == cache_id(d1, [1, 2, 3]) and len(base) == 64
    others = [cache_id(d2, [1, 2, 3]), cache_id(d1, [1, 2, 4]), cache_id(d1, [3, 2, 1]), cache_id(d1, [1, 2]),
              cache_id(d1, [1, 2, 3], salt="tenant"), cache_id(d1, [12, 3])]
    assert base not in others and len(set(others)) == len(others)


def test_cache_id_fields_cannot_bleed_into_each_other():
    assert cache_id("ab", [1], "c") != cache_id("a", [1], "bc")
    assert cache_id("a", [1], "") != cache_id("a", [1], "\0")


# -- the file hash cache -----------------------------------------------------------------------------------------
def test_file_hash_cache_is_keyed_by_mtime(tmp_path: Path):
    path, hashes = tmp_path / "weights.bin", tmp_path / HASHES
    path.write_bytes(b"A" * 100)
    first = file_sha256(path, hashes)
    assert hashes.exists() and first in json.loads(hashes.read_text()).values()
    stat = path.stat()

    # same size and mtime: the cached hash is trusted (this is what makes re-fingerprinting gigabytes cheap)
    path.write_bytes(b"B" * 100)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert file_sha256(path, hashes) == first

    # a new mtime: hashed again, and the new content's hash comes back
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    second = file_sha256(path, hashes)
    assert second != first and second == file_sha256(path, None)


def test_file_hash_survives_a_damaged_cache(tmp_path: Path):
    path, hashes = tmp_path / "w.bin", tmp_path / HASHES
    path.write_bytes(b"data")
    hashes.write_text("{not json")
    assert file_sha256(path, hashes) == file_sha256(path, None)
    assert json.loads(hashes.read_text())  # rewritten whole
