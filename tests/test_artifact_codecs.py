"""Artifacts whose tensors are encoded (kvmart.codec): they read back bit for bit, continue exactly as the raw
artifact does, stay valid safetensors, version 1 artifacts are still read, and damage is refused before decoding."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
import torch
from artifact_support import join, rewrite, split
from cli_support import EntryPoint
from click.testing import CliRunner
from safetensors.torch import load_file

from kvmart.errors import ArtifactError
from kvmart.format.artifact import encode_artifact, read_artifact
from kvmart.reuse import core
from kvmart.reuse.samples import sample_text
from kvmart.reuse.verify import pieces_of
from kvmart.runtime.kv import KV
from kvmart.store.disk import DiskStore
from kvmart.store.memory import MemoryStore

TEXT = sample_text("bsd-3-clause")
QUESTION = " Who may redistribute it?"


def encoded(model, codec: str) -> tuple:
    ids = model.tokenize(TEXT)
    kv = model.prefill(ids)
    artifact = encode_artifact(kv, ids, model.fingerprint, codec=codec)
    buffer = io.BytesIO()
    assert artifact.write(buffer) == artifact.nbytes == len(buffer.getvalue())
    return kv, ids, buffer.getvalue()


def read(model, data: bytes):
    """Read from a stream (not mappable): the streamed decode path."""
    return read_artifact(io.BytesIO(data), len(data), model.fingerprint)


def refused(model, data: bytes) -> str:
    with pytest.raises(ArtifactError) as e:
        read(model, data)
    return str(e.value)


@pytest.fixture(scope="module")
def bf16_kvmart(model_bf16):
    return encoded(model_bf16, "kvmart")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("codec", ["raw", "zstd", "zstd:19", "kvmart"])
def test_every_codec_reads_back_bit_exactly(load_tiny, dtype, codec):
    model = load_tiny(dtype)
    kv, ids, data = encoded(model, codec)
    manifest, back = read(model, data)
    assert back.equal(kv) and manifest.token_ids == ids
    assert manifest.codec == codec.partition(":")[0]
    if codec != "raw":
        raw_bytes = encoded(model, "raw")[2]
        assert len(data) < len(raw_bytes)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_compressed_artifact_continues_bit_exactly_like_the_raw_one(load_tiny, tmp_path: Path, dtype):
    model = load_tiny(dtype)
    question = model.tokenize(QUESTION)
    runs = {}
    for name, store, codec in (("raw", DiskStore(tmp_path / "raw"), "raw"),
                               ("kvmart, mapped", DiskStore(tmp_path / "kvmart"), "kvmart"),
                               ("kvmart, streamed", MemoryStore(), "kvmart")):
        entry = core.precompute(model, store, TEXT, codec=codec).entry
        loaded = core.load(model, store, entry.cache_id)
        runs[name] = (entry, loaded, model.continue_from(loaded.prefix, question, all_logits=True),
                      model.generate(loaded.prefix, question, 8, stop_at_eos=False))
    raw_entry, raw_loaded, raw_step, raw_gen = runs.pop("raw")
    fresh = KV.concat(list(model.prefill_pieces(pieces_of(raw_loaded))))
    assert raw_loaded.kv.equal(fresh)
    for name, (entry, loaded, step, gen) in runs.items():
        assert entry.cache_id == raw_entry.cache_id and entry.kv_bytes < raw_entry.kv_bytes, name
        assert loaded.kv.equal(fresh), name
        assert torch.equal(step.logits, raw_step.logits) and step.kv.equal(raw_step.kv), name
        assert gen.token_ids == raw_gen.token_ids, name
        assert all(torch.equal(a, b) for a, b in zip(gen.logits, raw_gen.logits, strict=True)), name


def test_compressed_artifact_is_valid_safetensors(bf16_kvmart, tmp_path: Path):
    kv, _, data = bf16_kvmart
    path = tmp_path / "a.kvm"
    path.write_bytes(data)
    tensors = load_file(str(path))
    header, manifest, _ = split(data)
    assert manifest["format_version"] == 3 and manifest["codec"] == "kvmart"
    for name, record in manifest["tensors"].items():
        start, end = header[name]["data_offsets"]
        assert tensors[name].dtype == torch.uint8 and tensors[name].numel() == end - start
        assert record["codec"] in ("kvmart", "raw") and set(record) == {"checksum", "codec", "params",
                                                                         "stored_checksum"}


def as_version_1(data: bytes) -> bytes:
    """A raw version-2 artifact rewritten as version 1 wrote it: `tensors` maps names to checksums."""
    def change(m: dict) -> None:
        m["format_version"] = 1
        m["tensors"] = {name: record["checksum"] for name, record in m["tensors"].items()}

    return rewrite(data, change)


def test_version_1_artifacts_are_still_read(model_f32, tmp_path: Path):
    kv, ids, data = encoded(model_f32, "raw")
    old = as_version_1(data)
    manifest, back = read(model_f32, old)
    assert back.equal(kv) and manifest.codec == "raw"
    path = tmp_path / "old.kvm"
    path.write_bytes(old)
    with open(path, "rb") as f:  # the mapped path too
        assert read_artifact(f, len(old), model_f32.fingerprint)[1].equal(kv)
    assert "codec 'kvmart' is not supported" in refused(model_f32, rewrite(old, lambda m: m.update(codec="kvmart")))


# -- damage ------------------------------------------------------------------------------------------------------
def test_bit_flips_in_compressed_data_are_refused_before_decoding(model_bf16, bf16_kvmart):
    _, _, data = bf16_kvmart
    start = len(data) - len(split(data)[2])
    for position in range(start, len(data), max(1, (len(data) - start) // 60)):
        damaged = bytearray(data)
        damaged[position] ^= 1 << (position % 8)
        assert "checksum" in refused(model_bf16, bytes(damaged)), position


def test_truncated_compressed_artifact_is_refused(model_bf16, bf16_kvmart):
    _, _, data = bf16_kvmart
    for cut in (len(data) - 1, len(data) - 1000, len(data) // 2):
        assert "truncated" in refused(model_bf16, data[:cut])


def first_encoded(manifest: dict) -> dict:
    return next(r for r in manifest["tensors"].values() if r["codec"] == "kvmart")


def test_decoded_bytes_are_checked_against_their_checksum(model_bf16, bf16_kvmart):
    message = refused(model_bf16, rewrite(bf16_kvmart[2], lambda m: first_encoded(m).update(checksum="0" * 32)))
    assert "decodes to data that does not match its checksum" in message


@pytest.mark.parametrize("change", [{"params": {"rotate": True, "level": 3}}, {"codec": "zstd"}, {"params": {}}])
def test_undecodable_tensor_is_refused(model_bf16, bf16_kvmart, change):
    message = refused(model_bf16, rewrite(bf16_kvmart[2], lambda m: first_encoded(m).update(change)))
    assert "cannot be decoded" in message


@pytest.mark.parametrize("change", [lambda r: r.pop("params"), lambda r: r.update(codec="lzma"),
                                    lambda r: r.update(extra=1), lambda r: r.update(params=[])])
def test_malformed_tensor_record_is_refused(model_bf16, bf16_kvmart, change):
    refused(model_bf16, rewrite(bf16_kvmart[2], lambda m: change(first_encoded(m))))


def test_raw_record_with_two_checksums_is_refused(model_f32):
    data = encoded(model_f32, "raw")[2]
    message = refused(model_f32, rewrite(data, lambda m: m["tensors"]["layers.0.keys"].update(
        stored_checksum="0" * 32)))
    assert "inconsistent" in message


def test_encoded_tensor_claiming_a_float_dtype_is_refused(model_bf16, bf16_kvmart):
    """The header of an encoded tensor must say U8: a reader must not take compressed bytes for floats."""
    header, _, tensors = split(bf16_kvmart[2])
    name = next(n for n in header if n != "__metadata__")
    header[name]["dtype"] = "BF16"
    assert "U8" in refused(model_bf16, join(header, tensors))


# -- the command line --------------------------------------------------------------------------------------------
def run_cli(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(EntryPoint(), list(args), env={"KVMART_MODEL": "builtin:tiny", **(env or {})},
                              catch_exceptions=False)


def stored_codec(kvmart_data_dir: Path) -> str:
    """The codec of the stored document's chunks (one codec for all of them)."""
    store = DiskStore(kvmart_data_dir / "store")
    (codec,) = {split(store.object_path(e.cache_id).read_bytes())[1]["codec"] for e in store.entries()
                if e.kind == "chunk"}
    return codec


@pytest.mark.parametrize("args, env, expected", [((), {}, "raw"), (("--codec", "zstd:19"), {}, "zstd"),
                                                 (("--codec", "kvmart"), {}, "kvmart"),
                                                 ((), {"KVMART_CODEC": "kvmart"}, "kvmart")])
def test_precompute_codec_option(tiny_folder, kvmart_data_dir: Path, monkeypatch, args, env, expected):
    monkeypatch.setattr(sys, "argv", ["kvmart"])
    result = run_cli("precompute", "sample:bsd-3-clause", *args, env=env)
    assert result.exit_code == 0, result.output
    assert stored_codec(kvmart_data_dir) == expected


def test_unknown_codec_is_a_clear_error(tiny_folder, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["kvmart"])
    result = run_cli("precompute", "sample:bsd-3-clause", "--codec", "lzma")
    assert result.exit_code == 2
    assert "unknown codec 'lzma'" in result.output and "kvmart" in result.output


def test_a_tensor_the_codec_cannot_shrink_is_stored_raw(model_bf16):
    """Random bit patterns do not compress: that tensor is stored raw inside a kvmart artifact, and the artifact
    still reads back bit for bit (mixed raw and encoded tensors)."""
    g = torch.Generator().manual_seed(3)
    shape = (1, 2, 64, 16)
    noise = torch.randint(-2**15, 2**15, shape, generator=g, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    smooth = torch.randn(shape, generator=g).to(torch.bfloat16)
    kv = KV((noise, smooth), (smooth * 3, noise))
    ids = list(range(64))
    artifact = encode_artifact(kv, ids, model_bf16.fingerprint, codec="kvmart")
    codecs_used = {name: record.codec for name, record in artifact.manifest.tensors.items()}
    assert codecs_used == {"layers.0.keys": "raw", "layers.0.values": "kvmart", "layers.1.keys": "kvmart",
                           "layers.1.values": "raw"}
    buffer = io.BytesIO()
    artifact.write(buffer)
    _, back = read(model_bf16, buffer.getvalue())
    assert all(torch.equal(a.view(torch.int16), b.view(torch.int16))
               for a, b in zip((*back.keys, *back.values), (*kv.keys, *kv.values), strict=True))
