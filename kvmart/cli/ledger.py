"""`kvmart accounts ...` and `kvmart ledger ...`: the operator's side of the ledger, straight on its database
(the same one `kvmart serve` uses: --ledger URL or KVMART_LEDGER, default DATA_DIR/ledger.sqlite)."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.markup import escape

from kvmart.cli.output import Column, console, listing, out, print_json
from kvmart.config import load_settings

if TYPE_CHECKING:  # the ledger (SQLAlchemy) is imported by the commands that open it, not by `kvmart --help`
    from kvmart.ledger import Ledger


def ledger_options(command: Callable) -> Callable:
    """--data-dir and --ledger; the command gets an open `ledger`."""

    @click.option("--ledger", "--db", "ledger_url", help="Ledger database URL (default: DATA_DIR/ledger.sqlite; "
                                                 "postgresql://USER@HOST:PORT/DB).")
    @click.option("--data-dir", type=click.Path(file_okay=False), help="Where the embedded ledger lives.")
    @functools.wraps(command)
    def wrapper(ledger_url: str | None, data_dir: str | None, **kwargs):
        from kvmart.ledger import open_ledger

        settings = load_settings().with_overrides(data_dir=data_dir, ledger=ledger_url)
        ledger = open_ledger(settings.ledger, settings.data_dir)
        try:
            if ledger.admin_key_issued:
                console.print(f"[bold]admin API key (shown once, keep it):[/bold] {ledger.admin_key_issued}")
            return command(ledger=ledger, **kwargs)
        finally:
            ledger.close()

    return wrapper


def money(ctx, param, value: str | None):
    """click callback: dollars as Decimal (never float)."""
    from kvmart.errors import TariffError
    from kvmart.ledger import parse_money

    try:
        return None if value is None else parse_money(value, param.name)
    except TariffError as e:
        raise click.BadParameter(str(e)) from None


@click.group()
def accounts() -> None:
    """Accounts and API keys: publishers publish and earn royalties, agents read and pay."""


@accounts.command("create")
@click.argument("name")
@click.option("--role", type=click.Choice(["publisher", "agent"]), required=True)
@click.option("--deposit", callback=money, help="Credit this many dollars at once.")
@ledger_options
def create_account(ledger: Ledger, name: str, role: str, deposit) -> None:
    """Create account NAME and print its API key (shown once: it is stored only hashed)."""

    account, key = ledger.create_account(name, role)
    if deposit:
        ledger.deposit(name, deposit)
    out.print(f"account {escape(account.name)} ({account.role})" + (f", balance ${deposit}" if deposit else ""))
    out.print(f"api key {key}")


def usd(nanousd: int) -> str:
    """Exact dollars with the trailing zeros of the nano-dollar trimmed to cents: 460_400 -> '0.0004604'."""
    from kvmart.ledger import usd_text

    whole, _, frac = usd_text(nanousd).partition(".")
    return f"{whole}.{frac.rstrip('0').ljust(2, '0')}"


@accounts.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of the table.")
@ledger_options
def list_accounts(ledger: Ledger, as_json: bool) -> None:
    """Every account with its balance and the money held for its requests in flight."""
    from kvmart.ledger import usd_text

    balances = ledger.balances()
    if as_json:
        print_json([{"account": b.name, "role": b.role, "balance_usd": usd_text(b.balance_nanousd),
                     "held_usd": usd_text(b.held_nanousd)} for b in balances])
        return
    listing([("name", False), ("role", False), ("balance $", True), ("held $", True)],
            [[b.name, b.role, usd(b.balance_nanousd), usd(b.held_nanousd)] for b in balances])


@accounts.command("deposit")
@click.argument("name")
@click.argument("usd", callback=money)
@ledger_options
def deposit(ledger: Ledger, name: str, usd) -> None:
    """Credit USD dollars paid in to account NAME (a balanced transaction from `external`)."""

    from kvmart.ledger import usd_text

    if usd <= 0:
        raise click.BadParameter("a deposit must be positive", param_hint="USD")
    ledger.deposit(name, usd)
    out.print(f"{escape(name)}: balance ${usd_text(ledger.account(name).balance_nanousd)}")


@accounts.command("key")
@click.argument("name")
@click.option("--revoke", is_flag=True, help="Revoke every key of NAME instead of issuing a new one.")
@ledger_options
def key(ledger: Ledger, name: str, revoke: bool) -> None:
    """Issue another API key for NAME (printed once), or revoke all of its keys."""

    if revoke:
        out.print(f"revoked {ledger.revoke_keys(name)} key(s) of {escape(name)}")
    else:
        out.print(f"api key {ledger.issue_key(name)}")


@accounts.command("allow-uploads")
@click.argument("name")
@ledger_options
def allow_uploads(ledger: Ledger, name: str) -> None:
    """Let NAME upload artifacts again after an upload of it was refused as a forgery (docs/SECURITY.md)."""
    out.print(f"cleared {ledger.allow_uploads(name)} refused upload(s) of {escape(name)}")


@click.group()
def ledger() -> None:
    """The ledger's books: reports, soundness check, receipt verification."""


@ledger.command("report")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@ledger_options
def report(ledger: Ledger, as_json: bool) -> None:
    """Balances, and per document: reads, revenue, royalties and what readers saved against re-prefilling. Tables
    that do not fit the terminal are printed one block per row; ids and amounts are never cut (--json for
    scripts)."""
    from kvmart.ledger import usd_text
    from kvmart.ledger.db import redact
    from kvmart.server.api.accounts import document_report_json

    balances, documents = ledger.balances(), ledger.documents()
    if as_json:
        print_json({"balances": [{"account": b.name, "role": b.role, "balance_usd": usd_text(b.balance_nanousd)}
                                 for b in balances], "documents": [document_report_json(d) for d in documents]})
        return
    listing([("account", False), ("role", False), ("balance $", True)],
            [[b.name, b.role, usd(b.balance_nanousd)] for b in balances], title="balances")
    listing(DOCUMENT_COLUMNS, [document_row(d) for d in documents], title="documents")
    health = ledger.health()
    out.print(f"entries sum to ${usd_text(health.entries_sum_nanousd)} · ledger {redact(ledger.url)} · "
              + ("sound" if health.is_sound else "[red]NOT SOUND[/red]"))


DOCUMENT_COLUMNS: list[Column] = [("document", False), ("publisher", False), ("licence", False), ("reads", True),
                                  ("cached tokens", True), ("revenue $", True), ("royalties $", True),
                                  ("saved $", True), ("precompute $", True)]


def document_row(d) -> list[str]:
    return ["doc_" + d.cache_id[:24], d.publisher or "-", d.licence, f"{d.reads:,}", f"{d.cached_tokens:,}",
            usd(d.revenue_nanousd), usd(d.royalty_nanousd), usd(d.saved_nanousd), usd(d.precompute_nanousd)]


@ledger.command("check")
@ledger_options
def check(ledger: Ledger) -> None:
    """Exit 1 unless every entry sums to zero, every balance equals its entries and none is negative."""
    from kvmart.ledger import usd_text

    health = ledger.health()
    out.print(f"entries sum ${usd_text(health.entries_sum_nanousd)}; unbalanced accounts: "
              f"{', '.join(health.unbalanced_accounts) or 'none'}; negative: {', '.join(health.negative_accounts) or 'none'}")
    if not health.is_sound:
        raise SystemExit(1)


@ledger.command("verify")
@click.argument("document", type=click.Path(exists=True, dir_okay=False))
@click.option("--keys", "keys_file", type=click.Path(exists=True, dir_okay=False),
              help="The provider's /.well-known/kvmart.json: check offline with its public keys, no database.")
@click.option("--includes", "receipt_file", type=click.Path(exists=True, dir_okay=False),
              help="With a statement: also check that this receipt is one of its leaves.")
@click.option("--ledger", "--db", "ledger_url", help="Ledger database URL (without --keys).")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Where the embedded ledger lives (without --keys).")
def verify(document: str, keys_file: str | None, receipt_file: str | None, ledger_url: str | None,
           data_dir: str | None) -> None:
    """Exit 0 if DOCUMENT (a JSON file: a receipt, as in a response's usage.kvmart.charge.receipt, or a statement
    from GET /v1/statements) is one the provider signed, unchanged; 1 otherwise. With --keys it needs nothing but
    the provider's published keys; without, it checks against this ledger (which also checks receipts issued
    before public-key receipts, by their HMAC)."""
    from kvmart.ledger import keys, open_ledger, receipts, statements

    body, included = read_json_file(document, "DOCUMENT"), None
    if receipt_file is not None:
        included = read_json_file(receipt_file, "--includes")
    if keys_file is not None:
        try:
            published = keys.keys_of_well_known(read_json_file(keys_file, "--keys"))
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--keys") from None
        why = (statements.why_invalid(body, published) if is_statement(body)
               else receipts.why_invalid(body, published))
    else:
        settings = load_settings().with_overrides(data_dir=data_dir, ledger=ledger_url)
        book = open_ledger(settings.ledger, settings.data_dir)
        try:
            if is_statement(body):
                why = statements.why_invalid(body, book.public_keys())
            else:
                why = None if book.verify_receipt(body) else "not signed by this ledger, or changed"
        finally:
            book.close()
    if why is None and included is not None:
        why = inclusion_problem(body, included)
    out.print("valid" if why is None else f"[red]INVALID[/red]: {escape(why)}")
    if why is not None:
        raise SystemExit(1)


def read_json_file(path: str, hint: str) -> object:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise click.BadParameter(f"not JSON: {e}", param_hint=hint) from None


def is_statement(body: object) -> bool:
    return isinstance(body, dict) and body.get("object") == "statement"


def inclusion_problem(statement: object, receipt: object) -> str | None:
    """None if `receipt` is a leaf of `statement` (with its receipts attached), else why not."""
    from kvmart.ledger import statements

    if not is_statement(statement) or not isinstance(statement, dict) or statement.get("receipts") is None:
        return "--includes needs a statement with its receipts attached"
    if not isinstance(receipt, dict):
        return "the receipt to look for is not a JSON object"
    if statements.proof(statement, receipt) is None:
        return (f"receipt {receipt.get('receipt')!r} is not in this statement: for a read of one of the "
                "publisher's documents in its period, the statement left it out")
    return None


@ledger.command("keys")
@click.option("--json", "as_json", is_flag=True, help="Print the well-known document (/.well-known/kvmart.json).")
@ledger_options
def list_keys(ledger: Ledger, as_json: bool) -> None:
    """The provider's receipt signing keys, oldest first, with their validity (the current one has no end)."""
    if as_json:
        print_json(ledger.well_known())
        return
    listing([("key id", False), ("algorithm", False), ("valid from", False), ("valid until", False)],
            [[k.key_id, "Ed25519", str(k.valid_from), "current" if k.valid_until is None else str(k.valid_until)]
             for k in ledger.public_keys()])


@ledger.command("rotate-key")
@ledger_options
def rotate_key(ledger: Ledger) -> None:
    """Retire the current receipt key and make a new one current. Receipts and statements signed with the old key
    keep verifying: it stays published with its validity period. Servers on this ledger sign with the new key
    from their next charge."""
    old, new = ledger.rotate_key()
    out.print(f"retired {old or '(none)'}; signing with {new}")


@ledger.command("statement")
@click.argument("publisher")
@click.option("--from", "start", type=int, default=0, show_default=True, help="Start of the period (unix seconds).")
@click.option("--to", "end", type=int, help="End of the period, excluded (unix seconds; default: now).")
@click.option("--no-receipts", is_flag=True, help="Leave the receipts out (the Merkle root still covers them).")
@ledger_options
def statement(ledger: Ledger, publisher: str, start: int, end: int | None, no_receipts: bool) -> None:
    """Print PUBLISHER's signed statement (JSON) for the period: reads of its documents, tokens, prices, royalties
    and where they went, and a Merkle root over the period's receipts (GET /v1/statements gives the same)."""
    body = ledger.statement(ledger.account(publisher), start, end)
    if no_receipts:
        body.pop("receipts")
    click.echo(json.dumps(body, indent=2))


@ledger.command("escrow")
@click.option("--refund-due", is_flag=True, help="Refund every royalty whose escrow period has ended.")
@ledger_options
def escrow(ledger: Ledger, refund_due: bool) -> None:
    """What escrow holds (royalties of open documents whose owner is not verified), and refund what is due."""
    from kvmart.ledger import usd_text

    if refund_due:
        paid = ledger.refund_due_escrow()
        out.print(f"refunded ${usd_text(paid.amount_nanousd)} of {paid.receipts} royalties to their readers")
    out.print(f"escrow holds ${usd_text(ledger.escrow_held())}; "
              f"royalties unclaimed after {ledger.escrow_seconds / 86400:g} days return to their readers")
