"""The `kvmart` command line: parse, call the core loop, print. Errors are translated here, once.

Every command takes --model, --dtype, --attention, --data-dir and --store (also settable as KVMART_* variables)."""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import cache
from .chat import layout_for, question_ids
from .config import ATTENTION_IMPLEMENTATIONS, DTYPES, Settings, load_settings
from .errors import KvmartError
from .model import Model
from .samples import SAMPLES, sample_text
from .store import Store, open_store

console = Console(stderr=True)
out = Console(highlight=False, soft_wrap=True)


def common_options(command: Callable) -> Callable:
    """--model/--dtype/--attention/--data-dir/--store on every command; they become `settings`."""

    @click.option("--store", help="Store URL (default: DATA_DIR/store).")
    @click.option("--data-dir", type=click.Path(file_okay=False), help="Where models and the store live.")
    @click.option("--attention", type=click.Choice(ATTENTION_IMPLEMENTATIONS), help="Attention implementation.")
    @click.option("--dtype", type=click.Choice(DTYPES), help="Model and KV dtype.")
    @click.option("--model", help="Model folder, .gguf file, or builtin:NAME (see `kvmart models`).")
    @functools.wraps(command)
    def wrapper(model, dtype, attention, data_dir, store, **kwargs):
        settings = load_settings().with_overrides(model=model, dtype=dtype, attention=attention, data_dir=data_dir,
                                                  store=store)
        return command(settings=settings, **kwargs)

    return wrapper


class Bars:
    """Rich progress bars for the long steps (building or converting a model, prefilling a document)."""

    def __init__(self) -> None:
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                                 TimeElapsedColumn(), console=console, transient=True)
        self.tasks: dict[str, int] = {}

    def __enter__(self) -> "Bars":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def stage(self, message: str, fraction: float | None) -> None:
        """Advance the bar of `message` (a new message completes the bars before it); None: no known end."""
        if message not in self.tasks:
            for task in self.tasks.values():
                self.progress.update(task, total=1.0, completed=1.0)
            self.tasks[message] = self.progress.add_task(message, total=None if fraction is None else 1.0)
        if fraction is not None:
            self.progress.update(self.tasks[message], total=1.0, completed=fraction)

    def fraction(self, message: str) -> Callable[[float], None]:
        return lambda f: self.stage(message, f)


def load_model(settings: Settings) -> Model:
    with Bars() as bars:
        return Model.load(settings, bars.stage)


def read_document(path: str) -> tuple[str, str]:
    """(text, title) of a file, or of a bundled sample named `sample:NAME`."""
    if path.startswith("sample:"):
        return sample_text(path.removeprefix("sample:")), path
    p = Path(path)
    if not p.is_file():
        raise click.BadParameter(f"no such file: {path}", param_hint="FILE")
    return cache.decode_utf8(p.read_bytes(), path), p.name


def precompute_document(model: Model, store: Store, path: str) -> cache.Precomputed:
    text, title = read_document(path)
    with Bars() as bars:
        return cache.precompute(model, store, text, title=title, source=path,
                                progress=bars.fraction(f"prefilling {title}"))


def resolve_document(model: Model, store: Store, doc: str) -> str:
    """A cache id (or unique prefix) or a file to precompute first -> cache id."""
    if doc.startswith("sample:") or Path(doc).is_file():
        return precompute_document(model, store, doc).entry.cache_id
    return store.resolve(doc)


@click.group()
@click.version_option(package_name="kvmart")
def cli() -> None:
    """kvmart: compute a document's KV cache once, store it, and answer questions from it, token-exactly."""


@cli.command()
@click.argument("file")
@common_options
def precompute(settings: Settings, file: str) -> None:
    """Prefill FILE once and store its KV cache. FILE may be `sample:NAME` for a bundled document."""
    model, store = load_model(settings), open_store(settings.store_url)
    result = precompute_document(model, store, file)
    e = result.entry
    state = "computed" if result.is_new else "already stored, nothing computed"
    out.print(f"cache_id  {e.cache_id}\ntokens    {e.num_tokens:,}\nbytes     {e.artifact_bytes:,}\n"
              f"seconds   {result.seconds:.2f} ({state})")


@cli.command()
@click.argument("doc")
@click.argument("question")
@click.option("--max-tokens", default=64, show_default=True, help="Most tokens to generate.")
@click.option("--temperature", default=0.0, show_default=True, help="0 is greedy.")
@click.option("--seed", type=int, help="Sampling seed.")
@common_options
def ask(settings: Settings, doc: str, question: str, max_tokens: int, temperature: float, seed: int | None) -> None:
    """Answer QUESTION about DOC (a cache id, or a file precomputed first) from its stored KV cache."""
    model, store = load_model(settings), open_store(settings.store_url)
    loaded = cache.load(model, store, resolve_document(model, store, doc))
    answer = cache.ask(model, loaded, question, max_tokens, temperature, seed)
    out.print(answer.text.strip())
    console.print(f"[dim]tokens from cache {answer.cached_tokens:,} · computed {answer.computed_tokens:,} · "
                  f"generated {len(answer.token_ids):,} · artifact load {answer.load_seconds:.2f}s · "
                  f"prefill time saved {answer.saved_seconds:.2f}s[/dim]")


@cli.command()
@click.argument("doc")
@click.option("--question", default="What is this document about?", show_default=True)
@click.option("--tokens", default=24, show_default=True, help="Greedy tokens to compare.")
@common_options
def verify(settings: Settings, doc: str, question: str, tokens: int) -> None:
    """Check DOC's artifact: bit-exact reuse, and agreement with single-pass prefill."""
    from .verify import verify as run_verify

    model, store = load_model(settings), open_store(settings.store_url)
    loaded = cache.load(model, store, resolve_document(model, store, doc))
    q = question_ids(model.tokenize, layout_for(model.tokenizer), question)
    with console.status("comparing reuse against fresh prefills"):
        report = run_verify(model, loaded, q, tokens)
    print_report(report)
    if not report.bit_exact:
        raise SystemExit(1)


def print_report(r) -> None:
    mark = lambda ok: "[green]yes[/green]" if ok else "[red]NO[/red]"  # noqa: E731
    out.print(f"artifact {r.cache_id[:16]} · {r.document_tokens:,} document + {r.question_tokens} question tokens · {r.dtype}")
    out.print(f"bit-exact vs two-step prefill: {mark(r.bit_exact)} (stored KV = fresh prefill {mark(r.reloaded_equals_fresh)}, "
              f"logits {mark(r.bit_exact_logits)}, KV {mark(r.bit_exact_kv)}, greedy run {mark(r.bit_exact_generation)})")
    out.print(f"vs single-pass prefill: {r.greedy_matching}/{r.greedy_tokens} greedy tokens identical, "
              f"max |logit diff| {r.max_logit_diff:.3g}")


@cli.command(name="ls")
@common_options
def list_(settings: Settings) -> None:
    """List stored artifacts."""
    entries = open_store(settings.store_url).entries()
    table = Table("cache_id", "title", "model", "tokens", "bytes", "prefill s")
    for e in entries:
        table.add_row(e.cache_id[:16], e.title, e.model, f"{e.num_tokens:,}", f"{e.artifact_bytes:,}",
                      f"{e.prefill_seconds:.2f}")
    out.print(table if entries else "no artifacts stored")


@cli.command()
@click.argument("cache_ids", nargs=-1, required=True)
@common_options
def rm(settings: Settings, cache_ids: tuple[str, ...]) -> None:
    """Delete stored artifacts by cache id (or unique prefix)."""
    store = open_store(settings.store_url)
    for prefix in cache_ids:
        cid = store.resolve(prefix)
        store.delete(cid)
        out.print(f"removed {cid}")


@cli.command()
def models() -> None:
    """List the built-in models."""
    from .builtin import describe_builtins

    out.print(describe_builtins())


@cli.command()
@click.option("--sample", type=click.Choice(list(SAMPLES)), default="mpl-2.0", show_default=True)
@click.option("--question", help="Question to ask (default: the sample's own).")
@click.option("--max-tokens", default=48, show_default=True)
@common_options
def demo(settings: Settings, sample: str, question: str | None, max_tokens: int) -> None:
    """The main job end to end: precompute a bundled document, answer from its cache, verify exactness."""
    from .verify import verify as run_verify

    model, store = load_model(settings), open_store(settings.store_url)
    console.print(f"model {settings.model} ({settings.dtype}) · store {settings.store_url}")
    result = precompute_document(model, store, f"sample:{sample}")
    e = result.entry
    out.print(f"[bold]1. precompute[/bold] sample:{sample}: {e.num_tokens:,} tokens, {e.artifact_bytes / 1e6:.1f} MB, "
              f"prefill {e.prefill_seconds:.2f}s{'' if result.is_new else ' (already stored)'} -> {e.cache_id[:16]}")
    question = question or SAMPLES[sample][1]
    loaded = cache.load(model, store, e.cache_id)
    answer = cache.ask(model, loaded, question, max_tokens)
    out.print(f"[bold]2. ask[/bold] {question}\n   {answer.text.strip()}")
    out.print(f"   tokens from cache {answer.cached_tokens:,} · computed {answer.computed_tokens} · "
              f"load {answer.load_seconds:.2f}s + answer {answer.generate_seconds:.2f}s · "
              f"prefill saved {answer.saved_seconds:.2f}s")
    q = question_ids(model.tokenize, layout_for(model.tokenizer), question)
    with console.status("3. verifying against fresh prefills"):
        report = run_verify(model, loaded, q, 24)
    out.print("[bold]3. verify[/bold]")
    print_report(report)
    if not report.bit_exact:
        raise SystemExit(1)


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        console.print("aborted")
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KvmartError as e:
        console.print(f"[red]Error:[/red] {e}", highlight=False)
        sys.exit(e.exit_code)
