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
    assert re.search(r"acme\s+│\s+publisher\s+│\s+10\.000000000", listing), listing
    assert re.search(r"external\s+│\s+external\s+│\s+-12\.500000000", listing), listing
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
