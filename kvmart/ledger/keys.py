"""The provider's Ed25519 signing keys, which sign every receipt and statement so that anyone holding the public key
can check them (docs/LEDGER.md "Public-key receipts").

Keys live in the ledger's `signing_keys` table (the private key as its 32-byte seed, base64url): every server on one
database signs with the same current key, made at the first start. `rotate` retires the current key (its
`valid_until` set to now) and makes a new one current; retired keys stay listed with their validity, so receipts
they signed keep verifying. A key is named by its RFC 7638 JWK thumbprint, and published as a JWK (RFC 8037) at
GET /.well-known/kvmart.json. Whoever can read the ledger database can sign: protect it like the money it holds."""

from __future__ import annotations

import base64
import hashlib
import time
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat
from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection

from kvmart.canonical import canonical
from kvmart.ledger.schema import signing_keys

ALGORITHM = "Ed25519"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    """base64url without padding -> bytes; ValueError for anything else, including a spelling other than the one
    `b64url` writes (unused low bits set in the last character): one value, one text, so no signature has two."""
    if not isinstance(text, str) or "=" in text or not text.isascii():
        raise ValueError("not unpadded base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if b64url(data) != text:
        raise ValueError("not the canonical base64url spelling")
    return data


def thumbprint(public_key_b64: str) -> str:
    """RFC 7638 thumbprint of the Ed25519 JWK: base64url(sha256(canonical {crv, kty, x}))."""
    return b64url(hashlib.sha256(canonical({"crv": "Ed25519", "kty": "OKP", "x": public_key_b64})).digest())


@dataclass(frozen=True)
class PublicKey:
    """A key as published: verifies signatures made while it was valid."""

    key_id: str
    public_key: str  # base64url of the 32 raw bytes
    valid_from: int
    valid_until: int | None  # None: the current key

    def jwk(self) -> dict:
        return {"kid": self.key_id, "kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig",
                "x": self.public_key, "valid_from": self.valid_from, "valid_until": self.valid_until}

    def was_valid_at(self, when: int) -> bool:
        return self.valid_from <= when and (self.valid_until is None or when <= self.valid_until)

    def verifies(self, message: bytes, signature_b64: str) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(unb64url(self.public_key)).verify(unb64url(signature_b64), message)
            return True
        except (InvalidSignature, ValueError, TypeError):
            return False


@dataclass(frozen=True)
class SigningKey:
    public: PublicKey
    private: Ed25519PrivateKey

    @property
    def key_id(self) -> str:
        return self.public.key_id

    def sign(self, message: bytes) -> str:
        return b64url(self.private.sign(message))


def public_key_of(jwk: object) -> PublicKey:
    """A published key from its JWK (GET /.well-known/kvmart.json); ValueError if it is not one, or its id is
    not its thumbprint."""
    if not isinstance(jwk, dict) or (jwk.get("kty"), jwk.get("crv")) != ("OKP", "Ed25519"):
        raise ValueError("not an Ed25519 JWK")
    x, kid, start, end = jwk.get("x"), jwk.get("kid"), jwk.get("valid_from"), jwk.get("valid_until")
    if not isinstance(x, str) or len(unb64url(x)) != 32 or kid != thumbprint(x):
        raise ValueError("a key's kid must be the RFC 7638 thumbprint of its 32-byte x")
    if not isinstance(start, int) or not (end is None or isinstance(end, int)):
        raise ValueError("a key's valid_from must be an integer and valid_until an integer or null")
    return PublicKey(kid, x, start, end)


def _new_row(now: int) -> dict:
    private = Ed25519PrivateKey.generate()
    seed = private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    public = b64url(private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))
    return {"key_id": thumbprint(public), "algorithm": ALGORITHM, "public_key": public, "private_key": b64url(seed),
            "valid_from": now, "valid_until": None, "created_at": now}


def ensure_key(conn: Connection) -> None:
    """A current key exists (made at the first start)."""
    if conn.execute(select(signing_keys.c.key_id).where(signing_keys.c.valid_until.is_(None))).first() is None:
        conn.execute(insert(signing_keys).values(**_new_row(int(time.time()))))


def rotate(conn: Connection) -> tuple[str | None, str]:
    """Retire the current key and make a new one current; (old key id, new key id). The current key's row is
    locked first, so a charge signing with it finishes before the key is retired (its receipt's date stays within
    the key's validity)."""
    current = conn.execute(select(signing_keys.c.key_id).where(signing_keys.c.valid_until.is_(None))
                           .with_for_update()).first()
    now = int(time.time())
    if current is not None:
        conn.execute(update(signing_keys).where(signing_keys.c.key_id == current.key_id).values(valid_until=now))
    row = _new_row(now)
    conn.execute(insert(signing_keys).values(**row))
    return (current.key_id if current else None), row["key_id"]


def public_keys(conn: Connection) -> list[PublicKey]:
    """Every key, oldest first."""
    rows = conn.execute(select(signing_keys).order_by(signing_keys.c.valid_from, signing_keys.c.created_at))
    return [PublicKey(r.key_id, r.public_key, r.valid_from, r.valid_until) for r in rows]


class Keyring:
    """The ledger's view of its keys: the current signing key read in the signing transaction (a rotation by another
    process takes effect at once), private keys decoded once per id. Thread-safe (a dict of immutable values)."""

    def __init__(self) -> None:
        self._decoded: dict[str, SigningKey] = {}

    def current(self, conn: Connection) -> SigningKey:
        """The current key, its row locked for this transaction (see `rotate`)."""
        row = conn.execute(select(signing_keys).where(signing_keys.c.valid_until.is_(None))
                           .with_for_update(read=True)).first()
        if row is None:
            raise AssertionError("the ledger has no current signing key (bootstrap makes one)")
        key = self._decoded.get(row.key_id)
        if key is None:
            private = Ed25519PrivateKey.from_private_bytes(unb64url(row.private_key))
            key = SigningKey(PublicKey(row.key_id, row.public_key, row.valid_from, None), private)
            self._decoded[row.key_id] = key
        return key


def keys_of_well_known(document: object) -> list[PublicKey]:
    """The receipt keys a provider publishes (its /.well-known/kvmart.json); ValueError saying why otherwise."""
    if not isinstance(document, dict) or not isinstance(document.get("receipt_keys"), list):
        raise ValueError("not a kvmart well-known document: it has no receipt_keys list")
    return [public_key_of(jwk) for jwk in document["receipt_keys"]]
