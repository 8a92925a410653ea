"""The market between parties who do not trust each other, as methods of the Ledger (docs/LEDGER.md): the provider's
public keys and their rotation, statements a publisher can audit, ownership claims, escrow. Each method is one
database transaction, like the rest of the Ledger's."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.engine import Connection

from kvmart.ledger import accounts as acc
from kvmart.ledger import escrow, keys, licences, ownership, statements, uploads
from kvmart.ledger.accounts import Account
from kvmart.ledger.escrow import Payout
from kvmart.ledger.licences import Terms
from kvmart.ledger.ownership import Claim

T = TypeVar("T")


class Market:
    """Mixed into Ledger, which provides the transactions, the HMAC secret and the keyring."""

    _secret: bytes
    keyring: keys.Keyring
    escrow_seconds: int
    run: Callable
    read: Callable
    forget_licences: Callable[[], None]

    # -- keys ----------------------------------------------------------------------------------------------------
    def public_keys(self) -> list[keys.PublicKey]:
        """Every receipt key, oldest first, the current one (no valid_until) last."""
        return self.read(keys.public_keys)

    def rotate_key(self) -> tuple[str | None, str]:
        """Retire the current key (it keeps verifying what it signed) and make a new one current; (old, new) ids."""
        return self.run(keys.rotate)

    def well_known(self) -> dict:
        """What GET /.well-known/kvmart.json publishes: the keys, and how receipts, statements and claims work."""
        return {"object": "kvmart.provider", "version": 1,
                "receipt_keys": [k.jwk() for k in self.public_keys()],
                "receipts": {"version": 2, "signature": "Ed25519 over 'kvmart-receipt-v2' NUL + canonical JSON of "
                             "the receipt without `signature`"},
                "statements": {"version": statements.VERSION, "merkle": statements.MERKLE,
                               "signature": "Ed25519 over 'kvmart-statement-v1' NUL + canonical JSON of the "
                               "statement without `signature` and `receipts`"},
                "canonical_json": "RFC 8785 (JCS); kvmart writes no fractional numbers in it",
                "claims": {"well_known_path": ownership.WELL_KNOWN_PATH},
                "escrow_seconds": self.escrow_seconds}

    # -- statements ----------------------------------------------------------------------------------------------
    def statement(self, publisher: Account, start: int, end: int | None) -> dict:
        """The publisher's signed statement of [start, end) (None: until now), receipts attached."""
        return self.run(lambda conn: statements.statement(conn, self.keyring, publisher, start, end, self._secret))

    # -- owners and escrow ---------------------------------------------------------------------------------------
    def new_claim(self, account: Account, source: str) -> Claim:
        return self.run(lambda conn: ownership.new_claim(conn, account, source))

    def claim(self, account: Account, claim_id: int) -> Claim:
        return self.read(lambda conn: ownership.get_claim(conn, account, claim_id))

    def claims(self, account: Account) -> list[Claim]:
        return self.read(lambda conn: ownership.list_claims(conn, account))

    def mark_claim_verified(self, claim: Claim) -> list[tuple[str, Payout]]:
        """Record a claim whose token the provider found (kvmart/server/fetch.py did the fetching): the account's
        documents with a source on the origin become owner-verified and escrow pays them what it held."""
        paid = self.run(lambda conn: ownership.mark_verified(conn, claim, int(time.time())))
        self.forget_licences()
        return paid

    def claim_document(self, cache_id: str, owner: Account, terms: Terms, source: str) -> Payout | None:
        """A verified owner publishing a text already published: take the licence over (ownership.take_over)."""

        def work(conn: Connection) -> Payout | None:
            found = licences.find_licence(conn, cache_id)
            if found is None:
                return None
            return ownership.take_over(conn, found, owner, terms, source, int(time.time()))

        paid = self.run(work)
        self.forget_licences()
        return paid

    def refund_due_escrow(self, now: int | None = None) -> Payout:
        """Refund every escrowed royalty whose period has ended to the reader who paid it."""
        return self.run(lambda conn: escrow.refund_due(conn, int(time.time()) if now is None else now))

    def escrow_held(self, cache_id: str | None = None) -> int:
        """Nano-dollars escrow holds (for one document, or in all)."""
        return self.read(lambda conn: escrow.open_nanousd(conn, cache_id))

    def escrow_account(self) -> Account:
        return self.read(lambda conn: acc.get_account(conn, acc.ESCROW))

    # -- uploads -------------------------------------------------------------------------------------------------
    def record_upload_check(self, cache_id: str, account: Account, checked: dict) -> None:
        """How much of an accepted upload was recomputed, and the bound that bought (kvmart/ledger/uploads.py)."""
        self.run(lambda conn: uploads.record_check(conn, cache_id, account, checked))

    def upload_check(self, cache_id: str) -> dict | None:
        return self.read(lambda conn: uploads.check_of(conn, cache_id))

    def record_forged_upload(self, account: Account, reason: str) -> None:
        self.run(lambda conn: uploads.record_refusal(conn, account, reason))

    def may_upload(self, account: Account) -> bool:
        return self.read(lambda conn: uploads.may_upload(conn, account))

    def allow_uploads(self, name: str) -> int:
        return self.run(lambda conn: uploads.allow(conn, acc.get_account(conn, name)))
