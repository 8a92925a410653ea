"""`kvmart accounts ...` and `kvmart ledger ...` (kvmart/cli/ledger.py) through the real entry point, on the
embedded SQLite ledger of the test's data dir."""

from __future__ import annotations

import json
import re
import sys
from decimal import Decimal
from pathlib import Path

import pytest
from cli_support import EntryPoint
from click.testing import CliRunner

from kvmart.ledger import Tariff, open_ledger, quote


@pytest.fixture
def kvmart_cli(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(sys, "argv", ["kvmart"])
    runner = CliRunner()
    return lambda *args: runner.invoke(EntryPoint(), list(args), env={"COLUMNS": "200"}, catch_exceptions=False)


def test_accounts_are_created_funded_and_listed(kvmart_cli):
    first = kvmart_cli("accounts", "create", "acme", "--role", "publisher", "--deposit", "10")
    assert first.exit_code == 0, first.output
    assert "admin API key (shown once" in first.output  # the first start of this ledger
    key = re.search(r"api key (kvm_\S+)", first.stdout).group(1)
    second = kvmart_cli("accounts", "create", "bot", "--role", "agent")
    assert second.exit_code == 0 and "admin API key" not in second.output
    assert kvmart_cli("accounts", "deposit", "bot", "2.5").stdout.strip() == "bot: balance $2.500000000"
    listing = kvmart_cli("accounts", "list").stdout
    assert re.search(r"acme\s+│\s+publisher\s+│\s+10\.00 ", listing), listing
    assert re.search(r"external\s+│\s+external\s+│\s+-12\.50 ", listing), listing
    listed = json.loads(kvmart_cli("accounts", "list", "--json").stdout)
    assert {"account": "acme", "role": "publisher", "balance_usd": "10.000000000", "held_usd": "0.000000000"} in listed
    revoked = kvmart_cli("accounts", "key", "acme", "--revoke")
    assert "revoked 1 key(s)" in revoked.stdout
    assert kvmart_cli("ledger", "check").exit_code == 0
    assert key.startswith("kvm_")


def test_bad_input_is_refused_with_a_message(kvmart_cli):
    kvmart_cli("accounts", "create", "acme", "--role", "agent")
    taken = kvmart_cli("accounts", "create", "acme", "--role", "agent")
    assert taken.exit_code == 2 and "already exists" in taken.output
    for amount in ("-5", "abc", "0"):
        refused = kvmart_cli("accounts", "deposit", "acme", amount)
        assert refused.exit_code == 2, (amount, refused.output)
    missing = kvmart_cli("accounts", "deposit", "ghost", "1")
    assert missing.exit_code == 2 and "no account named 'ghost'" in missing.output
    assert kvmart_cli("accounts", "create", "x", "--role", "admin").exit_code == 2


def test_report_check_and_receipt_verification(kvmart_cli, kvmart_data_dir: Path, tmp_path: Path):
    kvmart_cli("accounts", "create", "bot", "--role", "agent", "--deposit", "1")
    ledger = open_ledger("", kvmart_data_dir)
    used = quote(Tariff(), 3774, 20, 10, has_publisher=False)
    hold = ledger.open_hold(ledger.account("bot"), used.total_nanousd, None, "h")
    receipt = ledger.settle(hold, used, None, "c" * 64).receipt
    ledger.close()
    report = kvmart_cli("ledger", "report")
    assert report.exit_code == 0 and "sound" in report.stdout and "doc_cccccccc" in report.stdout
    data = json.loads(kvmart_cli("ledger", "report", "--json").stdout)
    bot = next(b for b in data["balances"] if b["account"] == "bot")
    assert Decimal(bot["balance_usd"]) == 1 - Decimal(used.total_nanousd) / 10**9
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(receipt))
    bad.write_text(json.dumps({**receipt, "account": "someone-else"}))
    assert kvmart_cli("ledger", "verify", str(good)).exit_code == 0
    refused = kvmart_cli("ledger", "verify", str(bad))
    assert refused.exit_code == 1 and "INVALID" in refused.stdout


def test_report_keeps_ids_and_amounts_whole_at_80_columns(monkeypatch: pytest.MonkeyPatch, kvmart_data_dir: Path):
    """In a pipe the tables keep their natural width; on an 80-column terminal a table too wide for it becomes one
    block per row. Either way no id or amount is cut."""
    monkeypatch.setattr(sys, "argv", ["kvmart"])
    runner = CliRunner()
    runner.invoke(EntryPoint(), ["accounts", "create", "bot", "--role", "agent", "--deposit", "1"])
    ledger = open_ledger("", kvmart_data_dir)
    used = quote(Tariff(), 3774, 20, 10, has_publisher=False)
    ledger.settle(ledger.open_hold(ledger.account("bot"), used.total_nanousd, None, "h"), used, None, "d" * 64)
    ledger.close()
    piped = runner.invoke(EntryPoint(), ["ledger", "report"], env={"COLUMNS": "80"}, catch_exceptions=False)
    assert piped.exit_code == 0 and "…" not in piped.stdout
    assert "doc_" + "d" * 24 in piped.stdout
    revenue = str(Decimal(used.total_nanousd) / 10**9).rstrip("0")
    assert revenue in piped.stdout and "saved $" in piped.stdout


def test_wide_listings_become_records_on_a_narrow_terminal():
    from io import StringIO

    from rich.console import Console

    from kvmart.cli.ledger import DOCUMENT_COLUMNS
    from kvmart.cli.output import listing

    rows = [["doc_" + "e" * 24, "acme-legal", "priced", "1,234", "4,657,116", "0.0004604", "0.00018416",
             "0.0033966", "0.003774"]]
    for width, is_table in ((80, False), (200, True)):
        screen = StringIO()
        listing(DOCUMENT_COLUMNS, rows, title="documents",
                console_=Console(file=screen, width=width, force_terminal=True, color_system=None))
        text = screen.getvalue()
        assert all(len(line) <= width for line in text.splitlines()), text
        assert ("┃" in text) is is_table and "…" not in text
        assert all(cell in text for cell in rows[0]), text
