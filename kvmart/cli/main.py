"""The `kvmart` command line: parse, call the core loop, print. Errors are translated here, once.

Every command takes --model, --dtype, --attention, --data-dir and --store (also settable as KVMART_* variables).
Heavy modules (torch, transformers, the ledger's database layer, the MCP SDK) are imported inside the commands that
need them, so `kvmart --help` and `kvmart cost` start in well under a second (tests/test_cli.py checks it)."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.markup import escape
from rich.table import Table

from kvmart.cli.ledger import accounts, ledger
from kvmart.cli.output import console, listing, out, print_json
from kvmart.cli.progress import reporter, working
from kvmart.config import ATTENTION_IMPLEMENTATIONS, DTYPES, ENGINES, Settings, load_settings
from kvmart.errors import KvmartError
from kvmart.reuse.samples import SAMPLES, sample_text
from kvmart.store import Store, open_store

if TYPE_CHECKING:
    from kvmart.reuse import core
    from kvmart.runtime.model import Model

DOC_PREFIX = "doc_"  # the API's document ids: doc_ + the cache id's first 24 hex digits (kvmart/reuse/catalog.py)


def common_options(command: Callable) -> Callable:
    """--model/--dtype/--attention/--data-dir/--store on every command; they become `settings`."""

    @click.option("--store", help="Store URL (default: DATA_DIR/store; redis://HOST:PORT/DB or s3://BUCKET/PREFIX for "
                                  "a shared tier, docs/SCALE.md).")
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


def load_model(settings: Settings) -> Model:
    from kvmart.runtime.model import Model

    with reporter() as progress:
        return Model.load(settings, progress.stage)


def read_document(path: str) -> tuple[str, str]:
    """(text, title) of a file, or of a bundled sample named `sample:NAME`."""
    if path.startswith("sample:"):
        return sample_text(path.removeprefix("sample:")), path
    from kvmart.reuse import core

    p = Path(path)
    if not p.is_file():
        raise click.BadParameter(f"no such file: {path}", param_hint="FILE")
    return core.decode_utf8(p.read_bytes(), path), p.name


def precompute_document(model: Model, store: Store, path: str, settings: Settings) -> core.Precomputed:
    from kvmart.reuse import core

    text, title = read_document(path)
    with reporter() as progress:
        return core.precompute(model, store, text, title=title, source=path,
                                progress=progress.fraction(f"prefilling {title}"), codec=settings.artifact_codec,
                                chunk_tokens=settings.chunk_tokens)


def resolve_id(store: Store, given: str) -> str:
    """The cache id a user named: a cache id or unique prefix of one, or a document id as the API gives it
    (`doc_` + the cache id's first 24 hex digits; a prefix of one works too)."""
    return store.resolve(given.removeprefix(DOC_PREFIX) if given.startswith(DOC_PREFIX) else given)


def resolve_document(model: Model, store: Store, doc: str, settings: Settings) -> str:
    """A cache id, document id (or unique prefix of either) or a file to precompute first -> cache id."""
    if doc.startswith("sample:") or Path(doc).is_file():
        return precompute_document(model, store, doc, settings).entry.cache_id
    return resolve_id(store, doc)


@click.group()
@click.version_option(package_name="kvmart")
def cli() -> None:
    """kvmart: compute a document's KV cache once, store it, and answer questions from it, token-exactly."""


@cli.command()
@click.argument("file")
@click.option("--codec", help="How the KV tensors are stored: kvmart (lossless, ~1.3-1.6x smaller), zstd or raw; "
                              "NAME:LEVEL sets the zstd level (e.g. zstd:19). Also KVMART_CODEC.  [default: raw for a "
                              "local store (mapped in place), kvmart for redis:// and s3://]")
@common_options
def precompute(settings: Settings, file: str, codec: str | None) -> None:
    """Prefill FILE once and store its KV cache. FILE may be `sample:NAME` for a bundled document."""
    settings = settings.with_overrides(codec=codec)
    model, store = load_model(settings), open_store(settings.store_url)
    result = precompute_document(model, store, file, settings)
    e = result.entry
    state = (f"computed {result.computed_tokens:,} tokens, reused the rest" if 0 < result.computed_tokens <
             e.num_tokens else "computed" if result.is_new else "already stored, nothing computed")
    out.print(f"cache_id  {e.cache_id}\ntokens    {e.num_tokens:,}\nbytes     {e.kv_bytes or e.artifact_bytes:,}\n"
              f"seconds   {result.seconds:.2f} ({state})")


@cli.command()
@click.argument("doc")
@click.argument("question")
@click.option("--max-tokens", type=click.IntRange(min=1), default=64, show_default=True, help="Most tokens to generate.")
@click.option("--temperature", default=0.0, show_default=True, help="0 is greedy.")
@click.option("--seed", type=int, help="Sampling seed.")
@common_options
def ask(settings: Settings, doc: str, question: str, max_tokens: int, temperature: float, seed: int | None) -> None:
    """Answer QUESTION about DOC (a cache id, a doc_ id, or a file precomputed first) from its stored KV cache."""
    from kvmart.reuse import core

    model, store = load_model(settings), open_store(settings.store_url)
    loaded = core.load(model, store, resolve_document(model, store, doc, settings))
    answer = core.ask(model, loaded, question, max_tokens, temperature, seed)
    out.print(answer.text.strip(), markup=False)
    console.print(f"[dim]tokens from cache {answer.cached_tokens:,} · computed {answer.computed_tokens:,} · "
                  f"generated {len(answer.token_ids):,} · artifact load {answer.load_seconds:.2f}s · "
                  f"prefill time saved {answer.saved_seconds:.2f}s[/dim]")


@cli.command()
@click.argument("doc")
@click.option("--question", default="What is this document about?", show_default=True)
@click.option("--tokens", default=24, show_default=True, help="Greedy tokens to compare.")
@common_options
def verify(settings: Settings, doc: str, question: str, tokens: int) -> None:
    """Check DOC's artifact (a cache id, a doc_ id, or a file): bit-exact reuse, and agreement with single-pass
    prefill."""
    from kvmart.reuse import core
    from kvmart.reuse.verify import verify as run_verify
    from kvmart.runtime.chat import layout_for, question_ids

    model, store = load_model(settings), open_store(settings.store_url)
    loaded = core.load(model, store, resolve_document(model, store, doc, settings))
    q = question_ids(model.tokenize, layout_for(model.tokenizer), question)
    with working("comparing reuse against fresh prefills"):
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
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of the table.")
@common_options
def list_(settings: Settings, as_json: bool) -> None:
    """List stored documents (cache id, the API's doc_ id, title, model, tokens, bytes, prefill seconds); their
    chunks, shared between documents, are not listed."""
    entries = [e for e in open_store(settings.store_url).entries() if e.is_document]
    if as_json:
        print_json([{"cache_id": e.cache_id, "id": DOC_PREFIX + e.cache_id[:24], "title": e.title, "source": e.source,
                     "model": e.model, "num_tokens": e.num_tokens, "bytes": e.kv_bytes or e.artifact_bytes,
                     "prefill_seconds": e.prefill_seconds, "created_at": e.created_at} for e in entries])
        return
    columns = [("cache_id", False), ("title", False), ("model", False), ("tokens", True), ("bytes", True),
               ("prefill s", True)]
    rows = [[e.cache_id[:16], e.title, e.model, f"{e.num_tokens:,}", f"{e.kv_bytes or e.artifact_bytes:,}",
             f"{e.prefill_seconds:.2f}"] for e in entries]
    listing(columns, rows, empty="no documents stored")


@cli.command()
@click.argument("cache_ids", nargs=-1, required=True)
@common_options
def rm(settings: Settings, cache_ids: tuple[str, ...]) -> None:
    """Delete stored documents by cache id or doc_ id (or a unique prefix of either), with their chunks no other
    document shares. A running server stops answering from a deleted document at once (it checks that a named
    document is still stored on use)."""
    from kvmart.reuse import core

    store = open_store(settings.store_url)
    for prefix in cache_ids:
        cid = resolve_id(store, prefix)
        chunks = core.remove(store, cid)
        out.print(f"removed {cid}" + (f" and {chunks} chunks" if chunks else ""))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of the list.")
def models(as_json: bool) -> None:
    """List the built-in models."""
    from kvmart.runtime.builtin import builtin_descriptions

    found = builtin_descriptions()
    if as_json:
        print_json([{"model": spec, "description": what} for spec, what in found])
    else:
        listing([("model", False), ("what", False)], [list(pair) for pair in found])


@cli.command()
@click.option("--sample", type=click.Choice(list(SAMPLES)), default="mpl-2.0", show_default=True)
@click.option("--question", help="Question to ask (default: the sample's own).")
@click.option("--max-tokens", type=click.IntRange(min=1), default=48, show_default=True, help="Most tokens to generate.")
@common_options
def demo(settings: Settings, sample: str, question: str | None, max_tokens: int) -> None:
    """The main job end to end: precompute a bundled document, answer from its cache, verify exactness."""
    from kvmart.reuse import core
    from kvmart.reuse.verify import verify as run_verify
    from kvmart.runtime.chat import layout_for, question_ids

    model, store = load_model(settings), open_store(settings.store_url)
    console.print(f"model {settings.model} ({settings.dtype}) · store {settings.store_url}")
    result = precompute_document(model, store, f"sample:{sample}", settings)
    e = result.entry
    out.print(f"[bold]1. precompute[/bold] sample:{sample}: {e.num_tokens:,} tokens, {e.kv_bytes / 1e6:.1f} MB, "
              f"prefill {e.prefill_seconds:.2f}s{'' if result.is_new else ' (already stored)'} -> {e.cache_id[:16]}")
    question = question or SAMPLES[sample][1]
    loaded = core.load(model, store, e.cache_id)
    answer = core.ask(model, loaded, question, max_tokens)
    out.print(f"[bold]2. ask[/bold] {escape(question)}\n   {escape(answer.text.strip())}")
    out.print(f"   tokens from cache {answer.cached_tokens:,} · computed {answer.computed_tokens} · "
              f"load {answer.load_seconds:.2f}s + answer {answer.generate_seconds:.2f}s · "
              f"prefill saved {answer.saved_seconds:.2f}s")
    q = question_ids(model.tokenize, layout_for(model.tokenizer), question)
    with working("3. verifying against fresh prefills"):
        report = run_verify(model, loaded, q, 24)
    out.print("[bold]3. verify[/bold]")
    print_report(report)
    if not report.bit_exact:
        raise SystemExit(1)


def _decimal(ctx, param, value: str | None):
    """click callback: a money option as Decimal (never float)."""
    from decimal import Decimal, InvalidOperation

    try:
        return None if value is None else Decimal(value)
    except InvalidOperation:
        raise click.BadParameter(f"{value!r} is not a number") from None


def _count(ctx, param, value: str) -> int:
    """click callback: a whole count written plainly or as 80e6."""
    from decimal import Decimal, InvalidOperation

    try:
        number = Decimal(value)
    except InvalidOperation:
        raise click.BadParameter(f"{value!r} is not a number") from None
    if number != number.to_integral_value() or number < 0:
        raise click.BadParameter(f"{value!r} is not a whole, non-negative number")
    return int(number)


def cost_shape(spec: str):
    """A shape from the table, a built-in's spec, or a model folder's config.json; no weights are loaded."""
    import json

    from kvmart.economics.model import known_shapes, lookup_shape, shape_from_config
    from kvmart.errors import ModelLoadError, ModelNotFoundError

    shape = lookup_shape(spec)
    if shape is not None:
        return shape
    config = Path(spec).expanduser() / "config.json"
    if not config.is_file():
        raise ModelNotFoundError(f"{spec!r} is neither a known shape nor a model folder with a config.json; "
                                 f"known shapes: {', '.join(known_shapes())}")
    try:
        return shape_from_config(json.loads(config.read_text(encoding="utf-8")), Path(spec).name)
    except (KeyError, ValueError, TypeError) as e:
        raise ModelLoadError(f"cannot read a model shape from {config}: {e!r}") from e


@cli.command()
@click.option("--model", "spec", default="Qwen3-4B", show_default=True,
              help="A shape (Qwen3-0.6B, Qwen3-4B, Qwen3-8B, Llama-3.1-8B, SmolLM2-135M), builtin:NAME, or a model "
                   "folder (its config.json is read; no weights are loaded).")
@click.option("--tokens", default=3774, show_default=True, help="Document tokens.")
@click.option("--question-tokens", default=32, show_default=True, help="Tokens appended after the document.")
@click.option("--reads", default="1", show_default=True, callback=_count, help="Reads of the document (80e6 works).")
@click.option("--dtype", default="bfloat16", show_default=True,
              type=click.Choice(["float32", "float16", "bfloat16", "float8", "int8"]), help="KV and weight dtype.")
@click.option("--preset", type=click.Choice(["roofline", "paper"]), default="roofline", show_default=True,
              help="Where the times come from: `roofline`, the analytic estimate (from FLOPs, bytes and the device "
                   "figures below; not a measurement), or `paper`, the paper's measured times (Qwen3-4B fp16 on an "
                   "M1 Pro: 14.71 s / 0.296 s at 3,774 tokens, 0.67 s / 0.078 s at 255).")
@click.option("--prefill-seconds", type=float, help="Measured prefill time (with --reuse-seconds): price it "
                                                    "instead of the roofline estimate.")
@click.option("--reuse-seconds", type=float, help="Measured reuse time.")
@click.option("--usd-per-hour", callback=_decimal, help="Device price, $/hour [4.6, implied by the paper].")
@click.option("--flops", type=float, help="Achieved FLOP/s [2.15e12, the paper's M1 Pro, fitted].")
@click.option("--bandwidth", type=float, help="Memory bandwidth, GB/s [200, M1 Pro].")
@click.option("--overhead", type=float, help="Fixed seconds per forward pass [0].")
@click.option("--egress", callback=_decimal, help="Egress, $/GB [0.09].")
@click.option("--storage", callback=_decimal, help="Storage, $/GB-month [0.023].")
@click.option("--input-price", callback=_decimal, help="List input price, $/1M tokens [at cost: the prefill].")
@click.option("--cache-read-fraction", callback=_decimal, help="Cache reads at this fraction of list [0.1].")
@click.option("--royalty-share", callback=_decimal, help="Publisher's share of the margin [0.5].")
@click.option("--compression-ratio", type=float, help="Lossless ratio of a shipped artifact [1].")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of the table.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Also draw savings vs length and cost vs reads (PNG).")
@click.option("--measured", type=click.Path(exists=True, dir_okay=False),
              help="A bench/economics.py --json result to draw beside the analytic curves.")
def cost(spec: str, tokens: int, question_tokens: int, reads: int, dtype: str, preset: str,
         prefill_seconds: float | None, reuse_seconds: float | None, usd_per_hour, flops, bandwidth, overhead, egress,
         storage, input_price, cache_read_fraction, royalty_share, compression_ratio, as_json: bool, plot: str | None,
         measured: str | None) -> None:
    """The economics of one document: prefill vs reuse compute and dollars, egress vs hosting, N reads, and the
    tariff split of a read; no model is loaded.

    By default the times are a roofline estimate (analytic: FLOPs over the paper's fitted FLOP/s, bytes over M1
    Pro bandwidth), not a measurement: for the paper's Qwen3-4B at 3,774 tokens it gives 104.7x and $14,494 for
    80M reads. `--preset paper` prices the paper's measured times instead (49.7x, ~$0.03M for 80M reads), and
    --prefill-seconds/--reuse-seconds price your own. Prices default to the paper's setup (docs/ECONOMICS.md)."""
    import dataclasses
    import json

    from kvmart.economics import report as cost_report
    from kvmart.economics.model import Prices, analyse

    overrides = {"device_usd_per_hour": usd_per_hour, "achieved_flops_per_second": flops,
                 "memory_bytes_per_second": bandwidth * 1e9 if bandwidth else None,
                 "pass_overhead_seconds": overhead, "egress_usd_per_gb": egress,
                 "storage_usd_per_gb_month": storage, "input_usd_per_mtok": input_price,
                 "cache_read_fraction": cache_read_fraction, "royalty_share": royalty_share,
                 "compression_ratio": compression_ratio}
    try:
        prices = dataclasses.replace(Prices(), **{k: v for k, v in overrides.items() if v is not None})
        times = cost_report.preset_times(preset, spec, tokens, prefill_seconds, reuse_seconds)
        e = analyse(cost_shape(spec), tokens, question_tokens, reads, prices, dtype, times.prefill_seconds,
                    times.reuse_seconds)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    if as_json:
        click.echo(json.dumps(cost_report.as_json(e, times.source), indent=2))
    else:
        table = Table("quantity", "value", "how", title=escape(cost_report.title(e, times.source)),
                      title_justify="left")
        for heading, rows in cost_report.sections(e, times.source):
            table.add_row(f"[bold]{escape(heading)}[/bold]", "", "")
            for row in rows:
                table.add_row(*map(escape, row))  # a folder's name may hold [brackets]: text, not markup
            table.add_section()
        out.print(table)
    if plot:
        points = cost_report.paper_points(e)
        if measured:
            points += cost_report.measured_points(json.loads(Path(measured).read_text(encoding="utf-8")))
        cost_report.plot(e, Path(plot), points)
        console.print(f"wrote {plot}")


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
        console.print(f"[red]Error:[/red] {escape(str(e))}", highlight=False)
        sys.exit(e.exit_code)


@cli.command()
@click.option("--host", help="Address to listen on.  [default: 127.0.0.1]")
@click.option("--port", type=int, help="TCP port.  [default: 8000]")
@click.option("--ram-cache-bytes", help="Hot tier budget for decoded KV caches in RAM, e.g. 2GiB.  [default: 2GiB]")
@click.option("--max-active", type=int, help="Requests the model worker keeps active at most; their decode steps "
              "share one forward pass.  [default: 64]")
@click.option("--max-queue", type=int, help="Requests waiting beyond those; more get HTTP 429.  [default: 64]")
@click.option("--batch-memory", "batch_memory_bytes", help="KV the active requests may hold in all, e.g. 1GiB; "
              "more wait for others to end (0: only --max-active counts).  [default: 1GiB]")
@click.option("--batching/--no-batching", default=None, help="Decode steps of all active requests in one forward "
              "pass (off: one pass each, in turn).  [default: on]")
@click.option("--batch-prompts/--no-batch-prompts", default=None, help="Prompt chunks of concurrent requests packed "
              "into shared forward passes (float32; the same bits): more throughput, later first tokens.  "
              "[default: off]")
@click.option("--max-body-bytes", help="Largest request body accepted (HTTP 413 beyond).  [default: 32MiB]")
@click.option("--ledger", "--db", "ledger_url", help="Ledger database URL.  [default: DATA_DIR/ledger.sqlite; or "
                                             "postgresql://USER@HOST:PORT/DB]")
@click.option("--engine", type=click.Choice(ENGINES), help="Inference engine: kvmart's own (transformers) or vLLM "
              "with kvmart's KV connector (needs kvmart[vllm]; docs/VLLM.md).  [default: transformers]")
@click.option("--rate-limit-per-minute", type=int, help="Requests one API key may start per minute, 0 for no "
              "limit (HTTP 429 beyond).  [default: 600]")
@click.option("--max-concurrent-per-key", type=int, help="Requests of one API key in flight at once, 0 for no "
              "limit (HTTP 429 beyond).  [default: 16]")
@click.option("--max-document-tokens", type=int, help="Longest document one may publish (HTTP 413 beyond).  "
              "[default: the model's context]")
@click.option("--max-artifact-bytes", help="Largest artifact published or uploaded (HTTP 413 beyond).  "
              "[default: 1GiB]")
@click.option("--cors-origin", "cors_origins", multiple=True, help="An origin whose pages may call the API from a "
              "browser (repeat for several; * for any).  [default: none, no CORS headers]")
@click.option("--max-concurrent-uploads", type=int, help="Publish bodies beyond --max-body-bytes (with an "
              "artifact: streamed to disk) received at once; more get HTTP 429.  [default: 2]")
@click.option("--node-name", help="This node's name in the ledger, unique among live nodes: its holds carry it, "
              "so a restart releases them at once.  [default: host:port:data-directory digest]")
@common_options
def serve(settings: Settings, host: str | None, port: int | None, ram_cache_bytes: str | None,
          max_active: int | None, max_queue: int | None, batch_memory_bytes: str | None, batching: bool | None,
          batch_prompts: bool | None, max_body_bytes: str | None, ledger_url: str | None, engine: str | None,
          rate_limit_per_minute: int | None, max_concurrent_per_key: int | None, max_document_tokens: int | None,
          max_artifact_bytes: str | None, max_concurrent_uploads: int | None, node_name: str | None,
          cors_origins: tuple[str, ...]) -> None:
    """Serve OpenAI- and Anthropic-compatible HTTP APIs that answer from hosted KV caches (docs/SERVER.md).

    Documents published with POST /v1/documents (or `kvmart precompute`, same store) are prefilled once; every
    request that reads one, by name or by pasting its text, continues from its stored KV. Options can also be set
    as KVMART_HOST, KVMART_PORT, KVMART_RAM_CACHE_BYTES, KVMART_MAX_ACTIVE, KVMART_MAX_QUEUE,
    KVMART_BATCH_MEMORY_BYTES, KVMART_BATCHING, KVMART_BATCH_PROMPTS, KVMART_MAX_BODY_BYTES,
    KVMART_LEDGER, KVMART_ENGINE, and the limits (docs/SECURITY.md) as KVMART_RATE_LIMIT_PER_MINUTE,
    KVMART_RATE_LIMIT_BURST, KVMART_MAX_CONCURRENT_PER_KEY, KVMART_MAX_DOCUMENT_TOKENS, KVMART_MAX_ARTIFACT_BYTES,
    KVMART_UPLOAD_CHUNK_TOKENS, KVMART_UPLOAD_VERIFY_PERCENT, KVMART_MAX_CONCURRENT_UPLOADS, KVMART_NODE_NAME and
    KVMART_CORS_ORIGIN. Every request authenticates with an API key
    (`kvmart accounts create`); the admin key is KVMART_ADMIN_KEY, or printed once at the first start."""
    from kvmart.app import serve as run_server
    from kvmart.ledger import open_ledger
    from kvmart.server import load_server_settings
    from kvmart.server.config import parse_bytes

    server = load_server_settings().with_overrides(
        host=host, port=port, max_active=max_active, max_queue=max_queue, batching=batching,
        batch_prompts=batch_prompts,
        batch_memory_bytes=parse_bytes(batch_memory_bytes) if batch_memory_bytes else None,
        ram_cache_bytes=parse_bytes(ram_cache_bytes) if ram_cache_bytes else None,
        max_body_bytes=parse_bytes(max_body_bytes) if max_body_bytes else None, engine=engine,
        rate_limit_per_minute=rate_limit_per_minute, max_concurrent_per_key=max_concurrent_per_key,
        max_document_tokens=max_document_tokens,
        max_artifact_bytes=parse_bytes(max_artifact_bytes) if max_artifact_bytes else None,
        max_concurrent_uploads=max_concurrent_uploads, node_name=node_name, cors_origin=",".join(cors_origins) or None)
    check_port_free(server.host, server.port)  # before the minutes a model may take to load, not after
    settings = settings.with_overrides(ledger=ledger_url)
    ledger = open_ledger(settings.ledger, settings.data_dir)
    if ledger.admin_key_issued:
        console.print(f"[bold]admin API key (shown once, keep it):[/bold] {ledger.admin_key_issued}")
    model = load_model(settings) if server.engine == "transformers" else None  # vllm: started by the server
    console.print(f"serving {settings.model} on http://{server.host}:{server.port} · OpenAI /v1/chat/completions, "
                  f"/v1/completions, /v1/responses · Anthropic /v1/messages · documents /v1/documents · store "
                  f"{settings.store_url} (agents over MCP: kvmart mcp --url http://{server.host}:{server.port})")
    run_server(settings, server, model, ledger)


def check_port_free(host: str, port: int) -> None:
    """ConfigError if HOST:PORT cannot be listened on (in use, or not an address of this machine). Binds the way
    uvicorn will (SO_REUSEADDR), then lets go."""
    import socket

    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as e:
        import errno

        from kvmart.errors import ConfigError

        why = "is in use (another kvmart serve?)" if e.errno == errno.EADDRINUSE else f"cannot be listened on ({e})"
        raise ConfigError(f"port {port} on {host} {why}; choose another with --port") from None


@cli.command()
@click.option("--url", envvar="KVMART_URL", default="http://127.0.0.1:8000", show_default=True,
              help="The kvmart server (kvmart serve, or kvmart route) whose API the tools call. Also KVMART_URL.")
@click.option("--api-key", envvar="KVMART_API_KEY", help="The API key questions are charged to (over HTTP, a "
              "client's own `Authorization: Bearer KEY` takes precedence). Also KVMART_API_KEY.")
@click.option("--transport", type=click.Choice(["stdio", "http"]), default="stdio", show_default=True,
              help="stdio for one client that starts this command; http for streamable HTTP at /mcp.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (http).")
@click.option("--port", type=int, default=8001, show_default=True, help="TCP port (http).")
@click.option("--model", "served_model", help="The model to ask.  [default: the one the server serves]")
def mcp(url: str, api_key: str | None, transport: str, host: str, port: int, served_model: str | None) -> None:
    """Serve kvmart to agents over the Model Context Protocol: tools to search the catalogue, read a document's
    card (tokens, licence, price, publisher), ask about documents (served from their hosted caches, metered to the
    API key, usage and charge in the result) and check the balance and receipts. It calls a kvmart server's HTTP
    API as any client does (README "Agents: MCP and the Responses API").

    \b
    Claude Desktop, Cursor and other stdio clients:
      {"command": "kvmart", "args": ["mcp"], "env": {"KVMART_URL": "http://127.0.0.1:8000", "KVMART_API_KEY": "kvm_..."}}
    Streamable HTTP, each client sending its own key:
      kvmart mcp --transport http --port 8001        # http://127.0.0.1:8001/mcp"""
    from kvmart.mcp.server import build_server, run

    if transport == "http":
        check_port_free(host, port)
        console.print(f"kvmart MCP server on http://{host}:{port}/mcp -> {url}")
    run(build_server(url, api_key, served_model), transport, host, port)


@cli.command()
@click.argument("cache_id")
@click.option("--ttl", type=click.Choice(["5m", "1h", "pinned"]), default="pinned", show_default=True,
              help="Expire after this long unread, or never (pinned).")
@common_options
def pin(settings: Settings, cache_id: str, ttl: str) -> None:
    """Pin CACHE_ID (or a doc_ id; or give it a TTL class) in a shared store that keeps TTLs (Redis): paid hot
    documents."""
    from kvmart.errors import ConfigError
    from kvmart.store.policy import ttl_seconds

    store = open_store(settings.store_url)
    set_ttl = getattr(store, "set_ttl", None)
    if set_ttl is None:
        raise ConfigError(f"store {settings.store_url} keeps no TTLs (pinning applies to redis:// stores)")
    cid = resolve_id(store, cache_id)
    set_ttl(cid, ttl_seconds(ttl))
    out.print(f"{cid} {ttl}")


@cli.command()
@click.option("--node", "nodes", multiple=True, required=True, help="A kvmart serve base URL; repeat for each node.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=9000, show_default=True, help="TCP port.")
def route(nodes: tuple[str, ...], host: str, port: int) -> None:
    """Route requests to kvmart serve NODEs with cache affinity: the same document goes to the same node first
    (rendezvous hashing on its id), falling back to the others when it is down (docs/SCALE.md)."""
    import uvicorn

    from kvmart.cluster.router import create_router

    console.print(f"routing http://{host}:{port} -> {', '.join(nodes)}")
    uvicorn.run(create_router(list(nodes)), host=host, port=port, log_level="warning")


cli.add_command(accounts)
cli.add_command(ledger)
