"""The market between parties who do not trust each other, at the ledger (kvmart/ledger/keys.py, receipts.py,
statements.py, merkle.py, ownership.py, escrow.py) and in the fetch policy (kvmart/server/fetch.py): receipts that
verify with the public key alone, key rotation, statements and their Merkle proofs, escrow and claims, SSRF."""

from __future__ import annotations

import json
import socket
from decimal import Decimal

import publisher_audit
import pytest
from cli_support import EntryPoint
from click.testing import CliRunner
from origin_support import Origin

from kvmart.canonical import canonical, spaced
from kvmart.errors import ClaimCheckError, RequestError
from kvmart.ledger import Tariff, Terms, merkle, open_ledger, quote, receipts, statements
from kvmart.ledger.keys import keys_of_well_known
from kvmart.ledger.ownership import origin_of
from kvmart.server.fetch import check_target, fetch_text, has_token

DOC, OTHER = "a" * 64, "b" * 64


@pytest.fixture
def ledger(ledger_url, tmp_path):
    book = open_ledger(ledger_url, tmp_path, environ={"KVMART_ESCROW_DAYS": "1"})
    yield book
    book.close()


def funded(ledger, name: str, role: str, usd: str = "1"):
    ledger.create_account(name, role)
    ledger.deposit(name, Decimal(usd))
    return ledger.account(name)


def read(ledger, agent, cache_id: str | None, cached: int = 1000):
    """One charged read of `cache_id`; its Charge."""
    licence = ledger.licence(cache_id) if cache_id else None
    used = ledger.quote(licence, cached, 10, 5)
    return ledger.settle(ledger.open_hold(agent, used.total_nanousd, None, "h"), used, licence, cache_id)


def next_second() -> None:
    """Wait for the clock's next second: a statement covers [from, to) with to at most now, so reads dated this
    second belong to the next period."""
    import time

    start = int(time.time())
    while int(time.time()) == start:
        time.sleep(0.01)


def published_keys(ledger):
    """The keys as a verifier sees them: through the well-known document's JSON."""
    return keys_of_well_known(json.loads(json.dumps(ledger.well_known())))


def test_canonical_json_is_rfc8785_for_what_kvmart_writes():
    assert canonical({"b": [1, -2, 10**20], "a": {"z": None, "é": "x"}.get("z"), "c": "é\n\"\\\x01"}) == \
        b'{"a":null,"b":[1,-2,100000000000000000000],"c":"\xc3\xa9\\n\\"\\\\\\u0001"}'
    assert spaced({"b": [1, 2.5e-07], "a": "é"}) == b'{"a": "\\u00e9", "b": [1, 2.5e-07]}'
    for bad in ({"x": 1.5}, {1: 2}, {"k": "\ud800"}, {"é": 1}):
        with pytest.raises((TypeError, ValueError)):
            canonical(bad)
    with pytest.raises(ValueError):
        spaced({"x": float("nan")})


def test_a_receipt_verifies_with_the_public_key_alone_and_fails_when_any_byte_changes(ledger, tmp_path):
    agent = funded(ledger, "agent", "agent")
    receipt = read(ledger, agent, None).receipt
    keys = published_keys(ledger)
    assert receipt["version"] == 2 and receipts.why_invalid(receipt, keys) is None
    assert ledger.verify_receipt(receipt)
    text = json.dumps(receipt)
    changed = 0
    for i in range(len(text)):  # every single character of the file, changed
        for other in {"0", "9", "x", "A"} - {text[i]}:
            try:
                mutated = json.loads(text[:i] + other + text[i + 1:])
            except ValueError:
                continue  # no longer JSON: refused as such
            if mutated == receipt:
                continue  # whitespace or an equivalent spelling
            changed += 1
            assert receipts.why_invalid(mutated, keys) is not None, (i, other)
            assert not ledger.verify_receipt(mutated)
    assert changed > 300
    signed_by_other = open_ledger(f"sqlite:///{tmp_path / 'other.sqlite'}", tmp_path, environ={})
    try:
        assert receipts.why_invalid(receipt, published_keys(signed_by_other)) is not None  # another provider's keys
    finally:
        signed_by_other.close()


def test_rotation_keeps_old_receipts_verifying_and_signs_new_ones_with_the_new_key(ledger):
    agent = funded(ledger, "agent", "agent")
    old = read(ledger, agent, None).receipt
    retired, current = ledger.rotate_key()
    assert retired == old["key_id"] and current != retired
    new = read(ledger, agent, None).receipt
    keys = published_keys(ledger)
    assert new["key_id"] == current and receipts.why_invalid(old, keys) is None
    assert receipts.why_invalid(new, keys) is None
    [was] = [k for k in keys if k.key_id == retired]
    assert was.valid_until is not None and [k.valid_until for k in keys if k.key_id == current] == [None]
    # a receipt dated after its key was retired (a stolen retired key) is refused
    from sqlalchemy import select

    from kvmart.ledger.schema import signing_keys

    seed = ledger.read(lambda c: c.execute(select(signing_keys.c.private_key)
                                           .where(signing_keys.c.key_id == retired)).scalar_one())
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from kvmart.ledger.keys import b64url, unb64url

    late = {**{k: v for k, v in old.items() if k != "signature"}, "created_at": was.valid_until + 10}
    late["signature"] = b64url(Ed25519PrivateKey.from_private_bytes(unb64url(seed)).sign(receipts.signed_message(late)))
    assert "outside the validity" in receipts.why_invalid(late, keys)


def test_receipts_issued_before_public_keys_still_verify_by_their_hmac(ledger):
    agent = funded(ledger, "agent", "agent")
    charge = read(ledger, agent, None)
    from sqlalchemy import update

    from kvmart.ledger.schema import charges

    ledger.run(lambda c: c.execute(update(charges).values(key_id=None, receipt_signature=None)))  # a 0002 charge
    [old] = ledger.recent_charges(agent, 1)
    assert "key_id" not in old.receipt and old.receipt["signature"] != charge.receipt["signature"]
    assert ledger.verify_receipt(old.receipt) and not ledger.verify_receipt({**old.receipt, "account": "x"})


def test_the_merkle_tree_is_rfc9162():
    leaves = [merkle.leaf_hash(bytes([i])) for i in range(7)]
    assert merkle.root([]) == bytes.fromhex("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
    for n in range(1, 8):
        for i in range(n):
            path = merkle.inclusion_path(leaves[:n], i)
            assert merkle.verify_inclusion(leaves[i], i, n, path, merkle.root(leaves[:n]))
            assert not merkle.verify_inclusion(leaves[(i + 1) % 7], i, n, path, merkle.root(leaves[:n])) or n == 1 \
                and (i + 1) % 7 == i
    # the three-leaf tree, by hand: node(node(l0, l1), l2)
    assert merkle.root(leaves[:3]) == merkle.node_hash(merkle.node_hash(leaves[0], leaves[1]), leaves[2])


def test_a_statement_covers_the_publishers_reads_and_verifies_offline(ledger):
    owner, squatter = funded(ledger, "owner", "publisher"), funded(ledger, "squatter", "publisher")
    agent = funded(ledger, "agent", "agent")
    ledger.mark_claim_verified(ledger.new_claim(owner, "https://owner.example/"))
    ledger.publish(DOC, owner, Terms(), "", 1000, source="https://owner.example/doc.txt")
    ledger.publish(OTHER, squatter, Terms(), "", 1000)
    mine = [read(ledger, agent, DOC).receipt for _ in range(3)]
    theirs = read(ledger, agent, OTHER).receipt
    next_second()
    body = ledger.statement(owner, 0, None)
    keys = published_keys(ledger)
    assert statements.why_invalid(body, keys) is None
    assert body["receipts"] == mine and body["merkle"]["size"] == 3
    assert body["totals"]["nanousd"]["royalty"] == body["totals"]["nanousd"]["royalty_paid"] == sum(
        r["nanousd"]["royalty"] for r in mine) > 0
    assert statements.proof(body, theirs) is None and statements.proof(body, mine[1])["leaf_index"] == 1
    for field, value in (("publisher", "squatter"), ("to", body["to"] + 1), ("totals", {})):
        assert statements.why_invalid({**body, field: value}, keys) is not None
    assert "Merkle root" in statements.why_invalid({**body, "receipts": mine[:2]}, keys)
    with pytest.raises(RequestError, match="closed period"):
        ledger.statement(owner, 0, body["issued_at"] + 3600)
    assert ledger.health().is_sound


def test_a_read_of_two_publishers_documents_is_in_both_statements_each_with_its_own_share(ledger):
    """One request read a document of each of two publishers (and some of the agent's own prefix): the receipt is a
    leaf of both publishers' statements, and each statement sums only its publisher's share of the tokens and
    royalties, as the receipt's `documents` list splits them."""
    first, second = funded(ledger, "first", "publisher"), funded(ledger, "second", "publisher")
    agent = funded(ledger, "agent", "agent")
    ledger.mark_claim_verified(ledger.new_claim(first, "https://first.example/"))
    ledger.mark_claim_verified(ledger.new_claim(second, "https://second.example/"))
    ledger.publish(DOC, first, Terms(), "", 1000, source="https://first.example/a.txt")
    ledger.publish(OTHER, second, Terms(), "", 1000, source="https://second.example/b.txt")
    used, parts = ledger.quote_reads([(DOC, ledger.licence(DOC), 300), (OTHER, ledger.licence(OTHER), 700),
                                      (None, None, 50)], 10, 5)
    both = ledger.settle_reads(ledger.open_hold(agent, used.total_nanousd, None, "h"), used, parts).receipt
    alone = read(ledger, agent, OTHER, cached=200).receipt
    next_second()
    keys = published_keys(ledger)
    shares = {d["cache_id"]: d for d in both["documents"]}
    assert shares[DOC]["royalty_nanousd"] > 0 and shares[OTHER]["royalty_nanousd"] > 0
    for publisher, doc, receipts_in in ((first, DOC, [both]), (second, OTHER, [both, alone])):
        body = ledger.statement(publisher, 0, None)
        assert statements.why_invalid(body, keys) is None
        assert body["receipts"] == receipts_in and statements.proof(body, both) is not None
        assert [d["cache_id"] for d in body["documents"]] == [doc]
        royalty = sum({d["cache_id"]: d for d in r["documents"]}[doc]["royalty_nanousd"] for r in receipts_in)
        cached = sum({d["cache_id"]: d for d in r["documents"]}[doc]["cached_tokens"] for r in receipts_in)
        for block in (body["totals"], body["documents"][0]):
            assert block["reads"] == len(receipts_in)
            assert block["nanousd"]["royalty"] == block["nanousd"]["royalty_paid"] == royalty
            assert block["tokens"]["cached"] == cached
        assert publisher_audit.audit(body, json.loads(json.dumps(ledger.well_known())), [both, alone], {doc}) == []
    assert ledger.health().is_sound


def test_escrow_holds_unverified_royalties_and_pays_the_verified_owner_who_published_second(ledger):
    """Someone else published the text first: its royalties wait in escrow; the verified owner publishes the same
    text, takes the licence over and is paid what escrow held."""
    squatter, owner = funded(ledger, "squatter", "publisher"), funded(ledger, "owner", "publisher")
    agent = funded(ledger, "agent", "agent")
    ledger.publish(DOC, squatter, Terms(), "", 1000, source="https://owner.example/LICENSE")
    first, second = read(ledger, agent, DOC), read(ledger, agent, DOC)
    royalty = first.quote.royalty_nanousd + second.quote.royalty_nanousd
    assert first.receipt["royalty_to"] == "escrow" and royalty > 0
    assert ledger.escrow_held(DOC) == royalty and ledger.usage(squatter).royalties_nanousd == 0
    assert ledger.usage(squatter).royalties_in_escrow_nanousd == royalty
    assert ledger.health().is_sound
    # an unverified owner does not take it over
    assert ledger.claim_document(DOC, owner, Terms(), "https://owner.example/LICENSE") is None
    claim = ledger.new_claim(owner, "https://owner.example/anything")
    assert claim.url == "https://owner.example/.well-known/kvmart-claim" and claim.verified_at is None
    ledger.mark_claim_verified(claim)
    before = ledger.account("owner").balance_nanousd
    paid = ledger.claim_document(DOC, owner, Terms("priced", cache_read_usd_per_mtok=Decimal("0.2")),
                                 "https://owner.example/LICENSE")
    assert paid.amount_nanousd == royalty and paid.receipts == 2
    assert ledger.account("owner").balance_nanousd == before + royalty and ledger.escrow_held() == 0
    assert ledger.usage(owner).royalties_nanousd == royalty and ledger.usage(squatter).royalties_in_escrow_nanousd == 0
    licence = ledger.licence(DOC)
    assert licence.publisher_id == owner.id and licence.is_owner_verified and licence.kind == "priced"
    third = read(ledger, agent, DOC)
    assert third.receipt["royalty_to"] == "owner" and ledger.escrow_held() == 0
    # the owner's statement holds every read of its text; the squatter's, the two it published, paid to another
    next_second()
    owners = ledger.statement(owner, 0, None)
    assert [r["receipt"] for r in owners["receipts"]] == [c.receipt["receipt"] for c in (first, second, third)]
    assert owners["totals"]["nanousd"]["royalty_escrow_paid"] == royalty
    squatters = ledger.statement(squatter, 0, None)
    assert squatters["totals"]["nanousd"]["royalty_escrow_to_others"] == royalty
    # a second verified claimant does not displace the first verified owner
    rival = funded(ledger, "rival", "publisher")
    ledger.mark_claim_verified(ledger.new_claim(rival, "https://rival.example/"))
    assert ledger.claim_document(DOC, rival, Terms(), "https://rival.example/LICENSE") is None
    assert ledger.licence(DOC).publisher_id == owner.id and ledger.health().is_sound


def test_verifying_an_origin_pays_the_publishers_own_escrowed_documents(ledger):
    publisher, agent = funded(ledger, "pub", "publisher"), funded(ledger, "agent", "agent")
    ledger.publish(DOC, publisher, Terms(), "", 1000, source="https://pub.example/a.txt")
    ledger.publish(OTHER, publisher, Terms(), "", 1000, source="https://elsewhere.example/b.txt")
    held = read(ledger, agent, DOC).quote.royalty_nanousd + read(ledger, agent, OTHER).quote.royalty_nanousd
    assert ledger.escrow_held() == held
    verified = ledger.mark_claim_verified(ledger.new_claim(publisher, "https://PUB.example:443/x"))
    assert [cache_id for cache_id, _ in verified] == [DOC]  # the other document's source is on another origin
    assert ledger.escrow_held(DOC) == 0 and ledger.escrow_held(OTHER) > 0 and ledger.health().is_sound


def test_unclaimed_royalties_return_to_their_readers_after_the_period(ledger):
    squatter = funded(ledger, "squatter", "publisher")
    alice, bob = funded(ledger, "alice", "agent"), funded(ledger, "bob", "agent")
    ledger.publish(DOC, squatter, Terms(), "", 1000)
    a, b = read(ledger, alice, DOC), read(ledger, bob, DOC, cached=2000)
    assert ledger.refund_due_escrow().receipts == 0  # the period (1 day here) has not ended
    # the later of the two reads (on a loaded machine they may fall in different seconds)
    due = max(a.receipt["created_at"], b.receipt["created_at"]) + ledger.escrow_seconds
    paid = ledger.refund_due_escrow(now=due)
    assert paid.receipts == 2 and paid.amount_nanousd == a.quote.royalty_nanousd + b.quote.royalty_nanousd
    assert ledger.account("alice").balance_nanousd == 10**9 - a.quote.total_nanousd + a.quote.royalty_nanousd
    assert ledger.account("bob").balance_nanousd == 10**9 - b.quote.total_nanousd + b.quote.royalty_nanousd
    assert ledger.escrow_held() == 0 and ledger.refund_due_escrow(now=due).receipts == 0
    next_second()
    owner = funded(ledger, "owner", "publisher")  # a claim after the refund finds nothing left to pay
    ledger.mark_claim_verified(ledger.new_claim(owner, "https://o.example/"))
    assert ledger.claim_document(DOC, owner, Terms(), "https://o.example/doc").amount_nanousd == 0
    assert ledger.statement(squatter, 0, None)["totals"]["nanousd"]["royalty_escrow_refunded"] == paid.amount_nanousd
    assert ledger.health().is_sound


def test_private_documents_pay_their_publisher_at_once(ledger):
    publisher, agent = funded(ledger, "pub", "publisher"), funded(ledger, "agent", "agent")
    ledger.publish(DOC, publisher, Terms("private", readers=("agent",)), publisher.tenant_salt, 1000)
    charge = read(ledger, agent, DOC)
    assert charge.receipt["royalty_to"] == "pub" and ledger.escrow_held() == 0
    assert ledger.usage(publisher).royalties_nanousd == charge.quote.royalty_nanousd > 0


def test_the_health_check_catches_escrow_that_does_not_add_up(ledger):
    from sqlalchemy import update

    from kvmart.ledger.schema import escrow

    squatter, agent = funded(ledger, "squatter", "publisher"), funded(ledger, "agent", "agent")
    ledger.publish(DOC, squatter, Terms(), "", 1000)
    read(ledger, agent, DOC)
    assert ledger.health().is_sound
    ledger.run(lambda c: c.execute(update(escrow).values(settled_at=1)))  # a row closed without paying it out
    health = ledger.health()
    assert not health.is_sound and health.escrow_mismatch_nanousd > 0


def test_origins_are_normalized_and_bad_sources_refused():
    assert origin_of("HTTPS://Example.ORG:443/a/b?c") == "https://example.org"
    assert origin_of("http://example.org:8080/") == "http://example.org:8080"
    assert origin_of("https://[::1]:8443/x") == "https://[::1]:8443"
    for bad in ("ftp://example.org/", "https://user:pw@example.org/", "example.org", "", "https://", "https://é.org",
                "https://example.org:99999/"):
        with pytest.raises(RequestError):
            origin_of(bad)


def resolver(*addresses: str):
    def resolve(host, port, type=0):  # noqa: A002  (getaddrinfo's name)
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, type, 6, "", (a, port)) for a in addresses]
    return resolve


@pytest.mark.parametrize("url, addresses, why", [
    ("http://example.org/.well-known/kvmart-claim", ["93.184.216.34"], "only https on port 443"),
    ("https://example.org:8443/x", ["93.184.216.34"], "only https on port 443"),
    ("https://internal.example/x", ["10.0.0.7"], "not a public address"),
    ("https://metadata.example/x", ["169.254.169.254"], "not a public address"),
    ("https://mixed.example/x", ["93.184.216.34", "192.168.1.1"], "not a public address"),
    ("https://mapped.example/x", ["::ffff:127.0.0.1"], "not a public address"),
    ("https://local.example/x", ["127.0.0.1"], "not a public address"),
    ("https://cgnat.example/x", ["100.64.0.1"], "not a public address"),
    ("file:///etc/passwd", [], "only https"),
    ("https://user:pw@example.org/x", ["93.184.216.34"], "only https"),
])
def test_the_claim_fetch_refuses_what_ssrf_would_use(url, addresses, why):
    with pytest.raises(ClaimCheckError, match=why):
        check_target(url, allow_loopback=False, resolve=resolver(*addresses))


def test_the_claim_fetch_allows_public_https_and_loopback_only_when_set():
    target = check_target("https://example.org/.well-known/kvmart-claim", False, resolver("93.184.216.34"))
    assert (target.address, target.port, target.host) == ("93.184.216.34", 443, "example.org")
    with pytest.raises(ClaimCheckError, match="not a public address"):
        check_target("http://127.0.0.1:8080/x", False, resolver("127.0.0.1"))
    assert check_target("http://127.0.0.1:8080/x", True, resolver("127.0.0.1")).port == 8080
    with pytest.raises(ClaimCheckError, match="not a public address"):  # the setting opens loopback, nothing else
        check_target("http://10.1.2.3:8080/x", True, resolver("10.1.2.3"))


def test_the_claim_fetch_against_a_loopback_origin():
    with Origin() as origin:
        origin.serve_token("kvmart-claim-abc")
        text = fetch_text(origin.url + "/.well-known/kvmart-claim", allow_loopback=True)
        assert has_token(text, "kvmart-claim-abc") and not has_token(text, "kvmart-claim-ab")
        with pytest.raises(ClaimCheckError, match="not a public address"):
            fetch_text(origin.url + "/.well-known/kvmart-claim")  # without the setting
        origin.pages["/same"] = (302, {"Location": "/.well-known/kvmart-claim"}, b"")
        assert has_token(fetch_text(origin.url + "/same", allow_loopback=True), "kvmart-claim-abc")
        origin.pages["/away"] = (302, {"Location": "http://localhost:1/x"}, b"")
        with pytest.raises(ClaimCheckError, match="another origin"):
            fetch_text(origin.url + "/away", allow_loopback=True)
        origin.pages["/loop"] = (302, {"Location": "/loop"}, b"")
        with pytest.raises(ClaimCheckError, match="redirected more than"):
            fetch_text(origin.url + "/loop", allow_loopback=True)
        origin.pages["/big"] = (200, {}, b"x" * 5000)
        with pytest.raises(ClaimCheckError, match="longer than 4096 bytes"):
            fetch_text(origin.url + "/big", allow_loopback=True)
        with pytest.raises(ClaimCheckError, match="HTTP 404"):
            fetch_text(origin.url + "/missing", allow_loopback=True)


@pytest.fixture
def kvmart_cli(monkeypatch: pytest.MonkeyPatch):
    import sys

    monkeypatch.setattr(sys, "argv", ["kvmart"])
    runner = CliRunner()
    return lambda *args: runner.invoke(EntryPoint(), list(args), env={"COLUMNS": "200"}, catch_exceptions=False)


def test_the_cli_verifies_offline_rotates_keys_and_prints_statements(kvmart_cli, kvmart_data_dir, tmp_path):
    book = open_ledger("", kvmart_data_dir)
    funded(book, "pub", "publisher")
    agent = funded(book, "bot", "agent")
    book.mark_claim_verified(book.new_claim(book.account("pub"), "https://pub.example/"))
    book.publish(DOC, book.account("pub"), Terms(), "", 500, source="https://pub.example/d")
    receipt = read(book, agent, DOC).receipt
    other = read(book, agent, None).receipt
    book.close()
    next_second()
    assert kvmart_cli("ledger", "rotate-key").exit_code == 0
    files = {name: tmp_path / f"{name}.json" for name in ("keys", "receipt", "bad", "statement", "other")}
    files["keys"].write_text(kvmart_cli("ledger", "keys", "--json").stdout)
    files["receipt"].write_text(json.dumps(receipt))
    files["other"].write_text(json.dumps(other))
    files["bad"].write_text(json.dumps({**receipt, "tokens": {**receipt["tokens"], "cached": 1}}))
    files["statement"].write_text(kvmart_cli("ledger", "statement", "pub").stdout)
    offline = ("--keys", str(files["keys"]), "--data-dir", str(tmp_path / "nowhere"))
    good = kvmart_cli("ledger", "verify", str(files["receipt"]), *offline)
    assert good.exit_code == 0 and "valid" in good.stdout
    assert not (tmp_path / "nowhere").exists()  # no database was opened
    bad = kvmart_cli("ledger", "verify", str(files["bad"]), *offline)
    assert bad.exit_code == 1 and "signature does not match" in bad.stdout
    assert kvmart_cli("ledger", "verify", str(files["statement"]), *offline).exit_code == 0
    assert kvmart_cli("ledger", "verify", str(files["statement"]), *offline, "--includes",
                      str(files["receipt"])).exit_code == 0
    missing = kvmart_cli("ledger", "verify", str(files["statement"]), *offline, "--includes", str(files["other"]))
    assert missing.exit_code == 1 and "is not in this statement" in missing.stdout
    assert kvmart_cli("ledger", "verify", str(files["receipt"])).exit_code == 0  # on the database, as before
    listing = kvmart_cli("ledger", "keys").stdout
    assert listing.count("Ed25519") == 2 and "current" in listing
    assert "escrow holds $0.000000000" in kvmart_cli("ledger", "escrow", "--refund-due").stdout
    assert quote(Tariff(), 1, 0, 0, True).royalty_nanousd == 40  # the tariff the reads above were charged at
