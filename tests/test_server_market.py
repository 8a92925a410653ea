"""The market over HTTP (kvmart/server/api/market.py, claims.py, documents.py): the well-known keys, a publisher's
statement checked by a publisher's own script (tests/publisher_audit.py, written from docs/LEDGER.md) which catches
a receipt left out, and the ownership claim against a real origin on loopback, with "someone else published it
first" and escrow, the books checked sound after each."""

from __future__ import annotations

import copy
import time

import pytest
from origin_support import Origin
from publisher_audit import audit, keys_of, proof_ok
from server_support import LiveServer

from kvmart.canonical import canonical
from kvmart.ledger import merkle
from kvmart.ledger.statements import signed_message
from kvmart.reuse.samples import sample_text

MODEL = "builtin:tiny"
BSD = sample_text("bsd-3-clause")


@pytest.fixture(scope="module")
def live(model_f32, tmp_path_factory):
    with LiveServer(model_f32, tmp_path_factory.mktemp("serve-market"),
                    claim_allow_loopback=True) as server:
        yield server


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def ask(live, key: str, doc_id: str) -> dict:
    """One chat on the document; its charge's receipt."""
    response = live.http.post("/v1/chat/completions", headers=auth(key), json={
        "model": MODEL, "messages": [{"role": "user", "content": "Who?"}], "max_tokens": 3, "temperature": 0,
        "documents": [doc_id]})
    assert response.status_code == 200, response.text
    return response.json()["usage"]["kvmart"]["charge"]["receipt"]


def next_second() -> None:
    """Statements cover [from, to) with `to` at most now: reads dated this second belong to the next period."""
    start = int(time.time())
    while int(time.time()) == start:
        time.sleep(0.01)


def claim_origin(live, key: str, origin: Origin) -> dict:
    """The full claim flow against `origin`: ask for a claim, serve its token, have the provider check it."""
    made = live.http.post("/v1/claims", headers=auth(key), json={"source": origin.url + "/docs/notes.txt"})
    assert made.status_code == 201, made.text
    claim = made.json()
    assert claim["status"] == "pending" and claim["well_known_url"] == origin.url + "/.well-known/kvmart-claim"
    refused = live.http.post(f"/v1/claims/{claim['id']}/verify", headers=auth(key))
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "claim_not_verified"  # not served yet
    origin.serve_token(claim["token"])
    verified = live.http.post(f"/v1/claims/{claim['id']}/verify", headers=auth(key))
    assert verified.status_code == 200, verified.text
    assert verified.json()["status"] == "verified" and "/.well-known/kvmart-claim" in origin.requests
    return verified.json()


def test_the_well_known_keys_are_open_to_anyone(live):
    import httpx

    body = httpx.get(live.url + "/.well-known/kvmart.json").json()
    [key] = body["receipt_keys"]
    assert key["kty"] == "OKP" and key["crv"] == "Ed25519" and key["valid_until"] is None
    assert body["claims"]["well_known_path"] == "/.well-known/kvmart-claim"


def test_a_publishers_script_verifies_its_statement_and_catches_a_receipt_left_out(live):
    pub = live.account("audited", "publisher")
    agents = [live.account(f"audit-agent-{i}", "agent") for i in range(2)]
    start = int(time.time())
    docs = [live.publish(f"Audited notes {i}.\n\n" + BSD, key=pub).json() for i in range(2)]
    shown = [ask(live, agents[i % 2], docs[i % 2]["id"]) for i in range(5)]  # what the agents hold
    elsewhere = ask(live, agents[0], live.publish("Not audited.\n\n" + BSD).json()["id"])  # another publisher's
    next_second()
    well_known = live.http.get("/.well-known/kvmart.json").json()
    statement = live.http.get("/v1/statements", params={"from": start}, headers=auth(pub)).json()
    mine = {d["cache_id"] for d in docs}
    assert audit(statement, well_known, shown + [elsewhere], mine) == []
    assert statement["totals"]["reads"] == 5 and statement["merkle"]["size"] == 5
    assert statement["totals"]["nanousd"]["royalty_escrow_open"] == statement["totals"]["nanousd"]["royalty"] > 0
    proof = live.http.get("/v1/statements/proof", params={"from": start, "to": statement["to"],
                                                          "receipt": shown[2]["receipt"]}, headers=auth(pub)).json()
    assert proof_ok(proof) and proof["root"] == statement["merkle"]["root"]
    assert not proof_ok({**proof, "leaf_index": (proof["leaf_index"] + 1) % 5})
    missing = live.http.get("/v1/statements/proof", params={"from": start, "receipt": elsewhere["receipt"]},
                            headers=auth(pub))
    assert missing.status_code == 404
    # any byte of the statement changed: its signature fails
    tampered = copy.deepcopy(statement)
    tampered["documents"][0]["nanousd"]["royalty"] -= 1
    assert "the statement's signature does not verify" in audit(tampered, well_known, shown, mine)
    # a dishonest provider drops one read and re-signs a consistent statement: the agent's receipt gives it away
    forged = forge_without(live, statement, shown[3]["receipt"])
    problems = audit(forged, well_known, shown, mine)
    assert problems == [f"{shown[3]['receipt']} (a read of {shown[3]['document_cache_id'][:12]}) is missing"]
    assert live.services.ledger.health().is_sound


def forge_without(live, statement: dict, receipt_id: str) -> dict:
    """The statement re-made without one receipt, its root, size and totals made consistent, and signed with the
    provider's own key: everything a dishonest provider could do."""
    forged = copy.deepcopy(statement)
    dropped = next(r for r in forged["receipts"] if r["receipt"] == receipt_id)
    forged["receipts"].remove(dropped)
    forged["merkle"]["size"] -= 1
    forged["merkle"]["root"] = merkle.root([merkle.leaf_hash(canonical(r)) for r in forged["receipts"]]).hex()
    forged["totals"]["reads"] -= 1
    for kind in ("total", "cache_read", "royalty", "royalty_escrow_open"):
        forged["totals"]["nanousd"][kind] -= dropped["nanousd"]["royalty" if kind.startswith("royalty") else kind]
    forged["signature"] = live.services.ledger.run(
        lambda conn: live.services.ledger.keyring.current(conn)).sign(signed_message(forged))
    assert keys_of(live.http.get("/.well-known/kvmart.json").json())  # the same published keys verify it
    return forged


def test_someone_else_published_it_first_and_the_verified_owner_takes_it_over(live):
    squatter = live.account("squatter", "publisher")
    owner = live.account("owner", "publisher")
    reader = live.account("escrow-reader", "agent")
    text = "The Owner's Licence.\n\n" + BSD
    with Origin() as origin:
        first = live.publish(text, key=squatter, source=origin.url + "/LICENSE").json()
        assert first["ownership"] == {"source": origin.url + "/LICENSE", "owner_verified": False,
                                      "royalties_to": "escrow", "escrow_held_usd": "0.000000000"}
        receipts = [ask(live, reader, first["id"]) for _ in range(2)]
        assert all(r["royalty_to"] == "escrow" for r in receipts)
        held = sum(r["nanousd"]["royalty"] for r in receipts)
        assert live.services.ledger.escrow_held(first["cache_id"]) == held > 0
        # the squatter cannot claim an origin it does not control: the token it is given is not served there
        theirs = live.http.post("/v1/claims", headers=auth(squatter), json={"source": origin.url + "/"}).json()
        assert live.http.post(f"/v1/claims/{theirs['id']}/verify", headers=auth(squatter)).status_code == 422
        before = live.services.ledger.account("owner").balance_nanousd
        claim_origin(live, owner, origin)
        again = live.publish(text, key=owner, source=origin.url + "/LICENSE")
        assert again.status_code == 200, again.text
        body = again.json()
        assert body["computed"] is False and body["precompute_charge_usd"] == "0.000000000"
        assert body["ownership"]["claimed_now"] is True and body["ownership"]["owner_verified"] is True
        assert body["ownership"]["escrow_paid_usd"] == f"{held / 1e9:.9f}"
    ledger = live.services.ledger
    assert ledger.account("owner").balance_nanousd == before + held and ledger.escrow_held(first["cache_id"]) == 0
    after = ask(live, reader, first["id"])
    assert after["royalty_to"] == "owner"
    assert live.http.get(f"/v1/documents/{first['id']}").json()["ownership"]["royalties_to"] == "publisher"
    assert ledger.health().is_sound


def test_claims_are_the_callers_own_and_bad_sources_are_400(live):
    pub = live.account("claimer", "publisher")
    other = live.account("other-claimer", "publisher")
    agent = live.account("claim-agent", "agent")
    made = live.http.post("/v1/claims", headers=auth(pub), json={"source": "https://claims.example/a"}).json()
    same = live.http.post("/v1/claims", headers=auth(pub), json={"source": "https://CLAIMS.example/b"})
    assert same.status_code == 200 and same.json()["token"] == made["token"]
    assert live.http.post(f"/v1/claims/{made['id']}/verify", headers=auth(other)).status_code == 404
    assert live.http.post("/v1/claims/claim_x/verify", headers=auth(pub)).status_code == 404
    assert live.http.post("/v1/claims", headers=auth(agent), json={"source": "https://a.example/"}).status_code == 403
    for bad in ("ftp://x.example/", "not a url", "https://u:p@x.example/"):
        refused = live.http.post("/v1/claims", headers=auth(pub), json={"source": bad})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "source", bad
    assert [c["id"] for c in live.http.get("/v1/claims", headers=auth(pub)).json()["data"]] == [made["id"]]
    # an origin on the provider's own network is never fetched without the loopback setting's say-so
    internal = live.http.post("/v1/claims", headers=auth(pub), json={"source": "https://10.0.0.1/x"}).json()
    refused = live.http.post(f"/v1/claims/{internal['id']}/verify", headers=auth(pub))
    assert refused.status_code == 422 and "not a public address" in refused.json()["error"]["message"]


def test_statements_are_for_publishers_and_closed_periods(live):
    pub = live.account("stmt-pub", "publisher")
    agent = live.account("stmt-agent", "agent")
    assert live.http.get("/v1/statements", headers=auth(agent)).status_code == 403
    future = live.http.get("/v1/statements", params={"to": int(time.time()) + 3600}, headers=auth(pub))
    assert future.status_code == 400 and "closed period" in future.json()["error"]["message"]
    assert live.http.get("/v1/statements", params={"from": "yesterday"}, headers=auth(pub)).status_code == 400
    assert live.http.get("/v1/statements", params={"publisher": "audited"}, headers=auth(pub)).status_code == 400
    empty = live.http.get("/v1/statements", params={"receipts": "false"}, headers=auth(pub)).json()
    assert "receipts" not in empty and empty["merkle"]["size"] == 0 and empty["publisher"] == "stmt-pub"
