"""The ledger: accounts and API keys, licences, tariffs, double-entry postings, signed receipts and reports, on
SQLAlchemy (SQLite embedded by default, PostgreSQL for production). `open_ledger(url, data_dir)` is the entry
point; `Ledger` the one object the server and the CLI use.

    accounts.py   accounts, roles, API keys (stored hashed)     licences.py   public / private / priced terms
    tariffs.py    prices (Decimal) and quotes (nano-dollars)    entries.py    balanced transactions, balances
    charges.py    hold -> settle / release, idempotency         receipts.py   receipts signed with the provider's key
    keys.py       the provider's Ed25519 keys, rotation         statements.py, merkle.py   auditable statements
    ownership.py  origin claims, verified owners                escrow.py     royalties waiting for their owner
    uploads.py    how uploads were checked, one strike          market.py     the Ledger's methods for all of these
    reports.py    balances, documents, usage                    schema.py, migrations.py, db.py   the database"""

from kvmart.ledger.accounts import Account
from kvmart.ledger.api import Health, Ledger, open_ledger
from kvmart.ledger.charges import Charge, Hold, Read
from kvmart.ledger.licences import KINDS, Licence, Terms
from kvmart.ledger.tariffs import Quote, Tariff, load_tariff, parse_money, quote, usd_text

__all__ = ["Account", "Charge", "Health", "Hold", "KINDS", "Ledger", "Licence", "Quote", "Read", "Tariff", "Terms",
           "load_tariff", "open_ledger", "parse_money", "quote", "usd_text"]
