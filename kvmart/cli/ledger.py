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
@click.argument("receipt", type=click.Path(exists=True, dir_okay=False))
@ledger_options
def verify(ledger: Ledger, receipt: str) -> None:
    """Exit 0 if RECEIPT (a JSON file: a response's usage.kvmart.charge.receipt) is one this ledger signed,
    unchanged; 1 otherwise."""

    try:
        body = json.loads(Path(receipt).read_text(encoding="utf-8"))
    except ValueError as e:
        raise click.BadParameter(f"not JSON: {e}", param_hint="RECEIPT") from None
    valid = ledger.verify_receipt(body)
    out.print("valid" if valid else "[red]INVALID[/red]: not signed by this ledger, or changed")
    if not valid:
        raise SystemExit(1)
