"""The command line, driven through click's CliRunner with the tiny model. Commands go through `kvmart.cli.main.main`, the
real entry point, so that typed errors are translated to a message and an exit code exactly as users see them."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from cli_support import EntryPoint
from click.testing import CliRunner, Result

from kvmart.reuse import core
from kvmart.reuse.samples import sample_text
from kvmart.runtime.chat import document_ids, layout_for
from kvmart.store.disk import DiskStore

TINY = "builtin:tiny"
QUESTION = "Who holds the copyright?"


@pytest.fixture
def kvmart_cli(tiny_folder: Path, monkeypatch: pytest.MonkeyPatch):
    """`kvmart_cli(*args, env=...)` -> click Result. Exceptions that escape `main` fail the test with a traceback."""
    monkeypatch.setattr(sys, "argv", ["kvmart"])  # restored after the test
    runner = CliRunner()

    def run(*args: str, env: dict[str, str] | None = None) -> Result:
        return runner.invoke(EntryPoint(), list(args), env={"KVMART_MODEL": TINY, "COLUMNS": "200", **(env or {})},
                             catch_exceptions=False)

    return run


@pytest.fixture
def doc(tmp_path: Path) -> Path:
    path = tmp_path / "bsd.txt"
    path.write_text(sample_text("bsd-3-clause"), encoding="utf-8")
    return path


def precomputed_id(result: Result) -> str:
    assert result.exit_code == 0, result.output
    match = re.search(r"^cache_id  ([0-9a-f]{64})$", result.stdout, re.M)
    assert match, result.stdout
    return match.group(1)


# -- the core loop -----------------------------------------------------------------------------------------------
def test_precompute_prints_id_tokens_and_bytes(kvmart_cli, doc: Path, model_f32, kvmart_data_dir: Path):
    result = kvmart_cli("precompute", str(doc))
    precomputed_id(result)
    expected_tokens = len(document_ids(model_f32.tokenize, layout_for(model_f32.tokenizer), doc.read_text()))
    assert re.search(rf"^tokens    {expected_tokens:,}$", result.stdout, re.M), result.stdout
    store = DiskStore(kvmart_data_dir / "store")
    size = sum(store.object_path(e.cache_id).stat().st_size for e in store.entries() if e.kind == "chunk")
    assert re.search(rf"^bytes     {size:,}$", result.stdout, re.M), result.stdout  # its chunks' bytes
    assert "(computed)" in result.stdout


def test_precompute_again_computes_nothing(kvmart_cli, doc: Path, kvmart_data_dir: Path):
    first = precomputed_id(kvmart_cli("precompute", str(doc)))
    again = kvmart_cli("precompute", str(doc))
    assert precomputed_id(again) == first
    assert "already stored, nothing computed" in again.stdout
    assert len([e for e in DiskStore(kvmart_data_dir / "store").entries() if e.is_document]) == 1


def test_ls(kvmart_cli, doc: Path):
    assert "no documents stored" in kvmart_cli("ls").stdout
    cid = precomputed_id(kvmart_cli("precompute", str(doc)))
    listing = kvmart_cli("ls")
    assert listing.exit_code == 0
    row = next(line for line in listing.stdout.splitlines() if cid[:16] in line)
    assert "bsd.txt" in row and TINY in row


def test_ask_by_cache_id_prefix(kvmart_cli, doc: Path, model_f32, kvmart_data_dir: Path):
    cid = precomputed_id(kvmart_cli("precompute", str(doc)))
    result = kvmart_cli("ask", cid[:10], QUESTION, "--max-tokens", "8")
    assert result.exit_code == 0, result.output

    store = DiskStore(kvmart_data_dir / "store")
    loaded = core.load(model_f32, store, cid)
    expected = core.ask(model_f32, loaded, QUESTION, 8)
    assert expected.text.strip() and result.stdout.strip() == expected.text.strip()
    assert f"tokens from cache {loaded.kv.num_tokens:,}" in result.stderr
    assert f"generated {len(expected.token_ids)}" in result.stderr


def test_ask_with_a_file_precomputes_it_first(kvmart_cli, doc: Path, kvmart_data_dir: Path):
    result = kvmart_cli("ask", str(doc), QUESTION, "--max-tokens", "4")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() and "tokens from cache" in result.stderr
    assert len([e for e in DiskStore(kvmart_data_dir / "store").entries() if e.is_document]) == 1


def test_verify_is_bit_exact_in_float32(kvmart_cli, doc: Path):
    cid = precomputed_id(kvmart_cli("precompute", str(doc)))
    result = kvmart_cli("verify", cid[:8])
    assert result.exit_code == 0, result.output
    assert "bit-exact vs two-step prefill: yes" in result.stdout
    assert "NO" not in result.stdout
    assert "24/24 greedy tokens identical" in result.stdout


def test_rm(kvmart_cli, doc: Path, kvmart_data_dir: Path):
    cid = precomputed_id(kvmart_cli("precompute", str(doc)))
    removed = kvmart_cli("rm", cid[:12])
    assert removed.exit_code == 0 and f"removed {cid}" in removed.stdout and "chunks" in removed.stdout
    assert "no documents stored" in kvmart_cli("ls").stdout
    assert DiskStore(kvmart_data_dir / "store").entries() == []  # its chunks, shared with nothing, went too
    again = kvmart_cli("rm", cid[:12])
    assert again.exit_code == 3 and "no artifact with cache id" in again.stderr


def test_sampled_answers_are_reproducible_by_seed(kvmart_cli, doc: Path):
    cid = precomputed_id(kvmart_cli("precompute", str(doc)))
    args = ("ask", cid[:8], QUESTION, "--max-tokens", "12", "--temperature", "1.0")
    first, second = kvmart_cli(*args, "--seed", "5"), kvmart_cli(*args, "--seed", "5")
    assert first.exit_code == second.exit_code == 0
    assert first.stdout == second.stdout and first.stdout.strip()


def test_version_and_help(kvmart_cli):
    version = kvmart_cli("--version")
    assert version.exit_code == 0 and "0.1.0" in version.stdout
    helped = kvmart_cli("--help")
    assert helped.exit_code == 0
    assert all(c in helped.stdout for c in ("precompute", "ask", "verify", "ls", "rm", "demo", "models"))


def test_models_lists_the_builtins(kvmart_cli):
    result = kvmart_cli("models")
    assert result.exit_code == 0 and "builtin:tiny" in result.stdout and "builtin:smollm2-135m" in result.stdout


def test_demo(kvmart_cli):
    result = kvmart_cli("demo", "--sample", "bsd-3-clause", "--max-tokens", "8")
    assert result.exit_code == 0, result.output
    for line in ("1. precompute sample:bsd-3-clause", "2. ask", "3. verify", "bit-exact vs two-step prefill: yes",
                 "24/24 greedy tokens identical"):
        assert line in result.stdout, (line, result.stdout)


# -- bad inputs: a clear message and a non-zero exit code --------------------------------------------------------
def write(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("data, message", [
    (b"", "the document is empty"),
    (b" \n\t\n  ", "the document is empty"),
    (b"\xff\xfe not utf-8", "is not UTF-8 text (invalid byte at offset 0)"),
    (b"caf\xe9 latin-1", "is not UTF-8 text (invalid byte at offset 3)"),
], ids=["empty", "whitespace", "utf16-bom", "latin1"])
def test_unusable_documents(kvmart_cli, tmp_path: Path, data: bytes, message: str):
    result = kvmart_cli("precompute", write(tmp_path, "bad.txt", data))
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.output


def test_missing_file(kvmart_cli, tmp_path: Path):
    result = kvmart_cli("precompute", str(tmp_path / "nope.txt"))
    assert result.exit_code == 2 and "no such file" in result.stderr


def test_document_longer_than_context(kvmart_cli, tmp_path: Path, model_f32):
    text = sample_text("gpl-3.0")
    n = len(document_ids(model_f32.tokenize, layout_for(model_f32.tokenizer), text))
    result = kvmart_cli("precompute", write(tmp_path, "gpl.txt", text.encode()))
    assert result.exit_code == 2
    assert f"the document needs {n:,} tokens but the model's context holds 4,096 ({n - 4096:,} too many)" in " ".join(
        result.stderr.split())


def test_unknown_cache_id(kvmart_cli):
    result = kvmart_cli("ask", "abcdef123456", QUESTION)
    assert result.exit_code == 3 and "no artifact with cache id 'abcdef123456'" in result.stderr
    short = kvmart_cli("ask", "abc", QUESTION)
    assert short.exit_code == 3 and "too short" in short.stderr


def test_empty_question(kvmart_cli, doc: Path):
    cid = precomputed_id(kvmart_cli("precompute", str(doc)))
    result = kvmart_cli("ask", cid[:8], "   ")
    assert result.exit_code == 2 and "the question is empty" in result.stderr


def test_unknown_builtin_model_lists_the_builtins(kvmart_cli, doc: Path):
    result = kvmart_cli("precompute", str(doc), "--model", "builtin:nope")
    assert result.exit_code == 2
    assert "unknown built-in model 'builtin:nope'" in result.stderr
    assert "builtin:tiny" in result.stderr and "builtin:smollm2-135m" in result.stderr


@pytest.mark.parametrize("make, hint", [
    (lambda tmp: tmp / "no-such-model", "no such folder or .gguf file"),
    (lambda tmp: (tmp / "empty-model").mkdir() or tmp / "empty-model", "it has no config.json"),
], ids=["missing", "no-config"])
def test_missing_model_folder(kvmart_cli, doc: Path, tmp_path: Path, make, hint):
    result = kvmart_cli("precompute", str(doc), "--model", str(make(tmp_path)))
    assert result.exit_code == 2
    assert hint in result.stderr and "builtin:tiny" in result.stderr


def test_artifact_of_another_dtype_is_refused(kvmart_cli, doc: Path):
    cid = precomputed_id(kvmart_cli("precompute", str(doc)))
    result = kvmart_cli("ask", cid[:8], QUESTION, "--dtype", "bfloat16")
    assert result.exit_code == 4
    assert "made by a different model: dtype differ" in " ".join(result.stderr.split())


def test_bad_settings(kvmart_cli, doc: Path):
    from_env = kvmart_cli("ls", env={"KVMART_DTYPE": "float16"})
    assert from_env.exit_code == 2 and "dtype 'float16' is not supported" in from_env.stderr
    option = kvmart_cli("ls", "--dtype", "float16")
    assert option.exit_code == 2 and "float16" in option.stderr
    store = kvmart_cli("ls", "--store", "ftp://bucket")
    assert store.exit_code == 2 and "unknown store scheme 'ftp'" in store.stderr and "file, memory" in store.stderr
    no_keys = kvmart_cli("ls", "--store", "s3://bucket", env={"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "",
                                                              "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
                                                              "AWS_CONFIG_FILE": "/nonexistent"})
    assert no_keys.exit_code == 2 and "AWS_ACCESS_KEY_ID" in no_keys.stderr, no_keys.stderr


def test_unknown_sample(kvmart_cli):
    result = kvmart_cli("precompute", "sample:nope")
    assert result.exit_code == 2 and "unknown sample 'nope'" in result.stderr


def test_installed_script_translates_errors(tmp_path: Path, kvmart_data_dir: Path):
    """The console script from pyproject, end to end in a real process (once: starting Python costs seconds)."""
    script = Path(sys.executable).with_name("kvmart")
    proc = subprocess.run([str(script), "ask", "abcdef123456", QUESTION], capture_output=True, text=True,
                          timeout=120, env={"PATH": "/usr/bin:/bin", "KVMART_DATA_DIR": str(kvmart_data_dir),
                                            "KVMART_MODEL": TINY, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 3, proc.stderr
    assert "no artifact with cache id 'abcdef123456'" in proc.stderr and "Traceback" not in proc.stderr


# -- regressions of bugs found by these tests ----------------------------------------------------------------------
def test_error_message_with_brackets_in_path(kvmart_cli, tmp_path: Path):
    (tmp_path / "d[").mkdir()
    result = kvmart_cli("precompute", write(tmp_path, "d[/x].txt", b"\xff\xfe"))
    assert result.exit_code == 2 and "d[/x].txt" in result.stderr


def test_ls_shows_titles_verbatim(kvmart_cli, tmp_path: Path):
    precomputed_id(kvmart_cli("precompute", write(tmp_path, "notes[draft].txt", b"some notes")))
    assert "notes[draft].txt" in kvmart_cli("ls").stdout


def test_ls_keeps_cache_ids_whole_in_a_narrow_terminal(kvmart_cli, tmp_path: Path):
    cid = precomputed_id(kvmart_cli("precompute", write(tmp_path, "a-rather-long-document-file-name.txt", b"text")))
    assert cid[:16] in kvmart_cli("ls", env={"COLUMNS": "70"}).stdout


class EscapedAssertion(Exception):
    """kvmart's internal AssertionError escaped to the user (kept apart from this test's own asserts)."""


def test_negative_max_tokens_is_a_usage_error(kvmart_cli, doc: Path):
    cid = precomputed_id(kvmart_cli("precompute", str(doc)))
    try:
        result = kvmart_cli("ask", cid[:8], QUESTION, "--max-tokens", "-1")
    except AssertionError as e:
        raise EscapedAssertion(str(e)) from e
    assert result.exit_code == 2 and "max-tokens" in result.stderr
