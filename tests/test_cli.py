"""The command line, driven through click's CliRunner with the tiny model. Commands go through `kvmart.cli.main.main`, the
real entry point, so that typed errors are translated to a message and an exit code exactly as users see them."""

from __future__ import annotations

import json
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
    # the dtype differs, and with it the route of the linear layers (bfloat16 multiplies by sgemm)
    assert "made by a different model: dtype" in " ".join(result.stderr.split())


def test_bad_settings(kvmart_cli, doc: Path):
    from_env = kvmart_cli("ls", env={"KVMART_DTYPE": "float16"})
    assert from_env.exit_code == 2 and "dtype 'float16' is not supported" in from_env.stderr
    option = kvmart_cli("ls", "--dtype", "float16")
    assert option.exit_code == 2 and "float16" in option.stderr
    store = kvmart_cli("ls", "--store", "ftp://bucket")
    assert store.exit_code == 2 and "unknown store scheme 'ftp'" in store.stderr and "file, memory" in store.stderr
    no_keys = kvmart_cli("ls", "--store", "s3://bucket", env={"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "",
                                                              "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
                                                              "AWS_CONFIG_FILE": "/nonexistent",
                                                              # no instance role either (a cloud VM may have one)
                                                              "AWS_EC2_METADATA_DISABLED": "true"})
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


# -- a new user's rough edges ----------------------------------------------------------------------------------------
HEAVY = ("torch", "transformers", "sqlalchemy", "numpy", "mcp", "kvmart.runtime.model", "kvmart.ledger")


def imported_after(code: str) -> list[str]:
    """The heavy modules a fresh interpreter has imported after running `code`."""
    probe = f"import sys\n{code}\nprint(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "COLUMNS": "80", "HOME": str(Path.home())})
    assert done.returncode == 0, done.stderr
    return eval(done.stdout.strip().splitlines()[-1])  # a list literal this test printed


def test_help_and_cost_import_no_heavy_module():
    """`kvmart --help` and `kvmart cost` start in well under a second because the CLI imports torch, transformers,
    the ledger and the MCP SDK only inside the commands that use them."""
    assert imported_after("import kvmart.cli.main") == []
    run = "from kvmart.cli.main import main\nsys.argv = ['kvmart', {}]\ntry:\n    main()\nexcept SystemExit:\n    pass"
    assert imported_after(run.format("'--help'")) == []
    assert imported_after(run.format("'cost', '--json'")) == []
    assert imported_after(run.format("'mcp', '--help'")) == []


def test_doc_ids_work_wherever_cache_ids_do(kvmart_cli, doc: Path):
    cid = precomputed_id(kvmart_cli("precompute", str(doc)))
    listed = json.loads(kvmart_cli("ls", "--json").stdout)
    assert [(e["cache_id"], e["id"]) for e in listed] == [(cid, "doc_" + cid[:24])]
    by_doc_id = kvmart_cli("ask", "doc_" + cid[:24], QUESTION, "--max-tokens", "4")
    by_cache_id = kvmart_cli("ask", cid[:8], QUESTION, "--max-tokens", "4")
    assert by_doc_id.exit_code == 0 and by_doc_id.stdout == by_cache_id.stdout
    assert kvmart_cli("verify", "doc_" + cid[:10], "--tokens", "2").exit_code == 0  # a prefix of one works too
    removed = kvmart_cli("rm", "doc_" + cid[:24])
    assert removed.exit_code == 0 and f"removed {cid}" in removed.stdout
    assert kvmart_cli("ask", "doc_" + cid[:24], QUESTION).exit_code == 3


def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(kvmart_cli, doc: Path):
    result = kvmart_cli("precompute", str(doc))
    lines = result.stderr.splitlines()
    assert f"prefilling {doc.name} ..." in lines
    assert any(re.fullmatch(rf"prefilling {re.escape(doc.name)}: done in [0-9.]+ s", line) for line in lines), lines
    assert "" not in lines and "\x1b" not in result.stderr  # no blank lines, no terminal control codes
    verified = kvmart_cli("verify", precomputed_id(result)[:8], "--tokens", "2")
    assert "comparing reuse against fresh prefills ..." in verified.stderr.splitlines()


def test_quiet_steps_still_report_every_interval():
    from kvmart.cli.progress import Lines

    now, written = [0.0], []
    with Lines(interval_seconds=10, write=written.append, clock=lambda: now[0]) as progress:
        progress.stage("prefilling notes.txt", 0.0)
        now[0] = 4
        progress.stage("prefilling notes.txt", 0.3)  # too soon for a line
        now[0] = 12
        progress.stage("prefilling notes.txt", 0.5)
        now[0] = 30
        progress.tick()  # nothing reported for 18 s: the ticker writes a line
        progress.stage("3. verifying", None)
        now[0] = 41
        progress.tick()
        now[0] = 42
    assert written == ["prefilling notes.txt ...", "prefilling notes.txt: 50% · 12 s so far",
                       "prefilling notes.txt: 50% · 30 s so far", "prefilling notes.txt: done in 30.0 s",
                       "3. verifying ...", "3. verifying: 11 s so far", "3. verifying: done in 12.0 s"]


def test_models_and_ls_print_json(kvmart_cli):
    models = json.loads(kvmart_cli("models", "--json").stdout)
    assert {m["model"] for m in models} >= {"builtin:tiny", "builtin:smollm2-135m"}
    assert json.loads(kvmart_cli("ls", "--json").stdout) == []


def test_serve_on_a_port_in_use_says_so_before_loading_the_model(kvmart_cli):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # a model that does not exist: loading it first would fail with another message
        result = kvmart_cli("serve", "--port", str(port), "--model", "builtin:no-such-model")
    assert result.exit_code == 2
    assert f"port {port} on 127.0.0.1 is in use" in result.stderr and "no-such-model" not in result.stderr


def test_serve_checks_its_cors_origins_before_loading_the_model(kvmart_cli):
    result = kvmart_cli("serve", "--port", "0", "--cors-origin", "app.example", "--model", "builtin:no-such-model")
    assert result.exit_code == 2 and "CORS origin 'app.example' is not an origin" in result.stderr
