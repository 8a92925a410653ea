"""Crash safety: `kvmart serve` killed with SIGKILL while it publishes (during the prefill, and the instant an
artifact's temp file appears, i.e. mid-write) leaves no half-written artifact visible, its temp files are removed
at the restart, every stored artifact still verifies, and the books balance. (A kill mid-answer and mid-ledger
transaction: tests/test_server_ledger.py and tests/test_ledger_stress.py.)"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from node_support import Node
from server_support import DEADLINE_SECONDS

from kvmart.format.artifact import read_artifact
from kvmart.ledger import open_ledger
from kvmart.reuse import core
from kvmart.reuse.samples import sample_text
from kvmart.store.disk import DiskStore

BSD = sample_text("bsd-3-clause")


def long_text(model, round_no: int) -> str:
    """A document of about 3,500 tokens (an artifact of about 1.8 MB): a long prefill and a long write."""
    text = f"Round {round_no}.\n\n"
    while len(model.tokenize(text + BSD)) < 3500:
        text += BSD
    return text


def publish_in_background(url: str, key: str, text: str) -> threading.Thread:
    def send() -> None:
        with contextlib.suppress(httpx.TransportError):  # the server died under it
            httpx.post(url + "/v1/documents", json={"text": text}, headers={"Authorization": f"Bearer {key}"},
                       timeout=DEADLINE_SECONDS)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def kill_when_a_temp_file_appears(node: Node, tmp_dir: Path) -> bool:
    """SIGKILL the node the moment an artifact temp file exists (mid-write); False if the publish ended first."""
    end = time.monotonic() + DEADLINE_SECONDS
    while time.monotonic() < end and node.process.poll() is None:
        if any(name.endswith(".kvm.tmp") for name in os.listdir(tmp_dir)):
            node.kill()
            return True
    node.kill()
    return False


def test_a_node_killed_while_publishing_shows_no_partial_artifact_and_cleans_up(model_f32, kvmart_data_dir):
    ledger = open_ledger("", kvmart_data_dir, environ={})
    _, key = ledger.create_account("writer", "publisher")
    ledger.deposit("writer", Decimal(10))
    tmp_dir = kvmart_data_dir / "store" / "tmp"
    caught_mid_write = 0
    for round_no in range(3):
        node = Node()
        sender = publish_in_background(node.url, key, long_text(model_f32, round_no))
        if round_no == 0:
            time.sleep(0.05)  # in the prefill (a 3,500-token prefill takes far longer than this)
            node.kill()
        else:
            caught_mid_write += kill_when_a_temp_file_appears(node, tmp_dir)
        sender.join(DEADLINE_SECONDS)
        store = DiskStore(kvmart_data_dir / "store")  # what a restarted node opens first
        assert list(tmp_dir.iterdir()) == [], "temp files of the killed writer survived the restart"
        for entry in store.entries():  # everything visible is whole and verifies: documents, and chunks (a publish
            if entry.is_document:      # killed after some of its chunks leaves them until the restart's repair)
                loaded = core.load(model_f32, store, entry.cache_id)
                assert loaded.kv.num_tokens == entry.num_tokens
            else:
                with store.open(entry.cache_id) as (f, size):
                    manifest, kv = read_artifact(f, size, model_f32.fingerprint, expected_cache_id=entry.cache_id)
                assert kv.num_tokens == entry.num_tokens == len(manifest.token_ids)
        objects = {p.stem for p in (kvmart_data_dir / "store" / "objects").rglob("*.kvm")}
        assert {e.cache_id for e in store.entries()} <= objects
    assert ledger.health().is_sound
    fees = -ledger.usage(ledger.account("writer")).balance_nanousd + 10 * 10**9
    assert fees >= 0
    restarted = Node()  # and the node comes back, serving what was completed and publishing anew
    try:
        listed = httpx.get(restarted.url + "/v1/documents", headers={"Authorization": f"Bearer {key}"}).json()
        documents = [e for e in DiskStore(kvmart_data_dir / "store").entries() if e.is_document]
        assert len(listed["data"]) == len(documents)
        again = httpx.post(restarted.url + "/v1/documents", json={"text": long_text(model_f32, 0)},
                           headers={"Authorization": f"Bearer {key}"}, timeout=DEADLINE_SECONDS)
        assert again.status_code in (200, 201), again.text
    finally:
        restarted.kill()
    assert ledger.health().is_sound
    ledger.close()
    print(f"kills mid-write: {caught_mid_write} of 2")


def test_temp_files_of_dead_writers_are_removed_at_open_and_live_ones_kept(tmp_path: Path):
    DiskStore(tmp_path / "s")
    tmp = tmp_path / "s" / "tmp"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = tmp / f"{dead.pid}.abcdef0123456789.x.kvm.tmp"
    live = tmp / f"{os.getppid()}.abcdef0123456789.y.kvm.tmp"  # a live process (our parent) may be writing it
    orphan.write_bytes(b"half an artifact")
    live.write_bytes(b"being written")
    DiskStore(tmp_path / "s")
    assert not orphan.exists() and live.exists()


def stored_kinds(entries: Path) -> set[str]:
    """The kinds of what the disk store holds (its entry files are written whole: kvmart/store/disk.py)."""
    return {json.loads(p.read_text()).get("kind", "document") for p in entries.glob("*.json")}


@pytest.mark.parametrize("stored", ["chunk", "document"], ids=["after a chunk", "after its index"])
def test_a_publish_killed_between_storing_and_its_licence_leaves_nothing_public_and_unpaid(postgres, tiny_folder,
                                                                                            kvmart_data_dir, stored):
    """The node stores the document (a chunk of it, or all of it: its chunks, then its index), then blocks recording
    its licence (the test holds a lock on the licences table), and is killed there. Restarted, it finds the
    interrupted publication in the ledger and deletes what was stored: nothing public, nothing charged;
    publishing again works and is charged once."""
    from server_support import wait_until
    from sqlalchemy import create_engine, text

    url = postgres.new_database()
    ledger = open_ledger(url, kvmart_data_dir, environ={})
    _, key = ledger.create_account("writer", "publisher")
    ledger.deposit("writer", Decimal(10))
    entries = kvmart_data_dir / "store" / "entries"
    node = Node(KVMART_LEDGER=url)
    blocker = create_engine(url.replace("postgresql://", "postgresql+psycopg://")).connect()
    try:
        blocker.execute(text("LOCK TABLE licences IN EXCLUSIVE MODE"))  # writes to it wait; reads go on
        sender = publish_in_background(node.url, key, BSD)
        wait_until(lambda: stored in stored_kinds(entries), f"a {stored} to be stored")
        node.kill()  # between storing the document and recording its licence
        sender.join(DEADLINE_SECONDS)
    finally:
        blocker.rollback()
        blocker.close()
    restarted = Node(port=node.port, KVMART_LEDGER=url)  # the same node comes back
    headers = {"Authorization": f"Bearer {key}"}
    assert httpx.get(restarted.url + "/v1/documents", headers=headers).json()["data"] == []
    assert DiskStore(kvmart_data_dir / "store").entries() == []
    assert ledger.usage(ledger.account("writer")).balance_nanousd == 10 * 10**9  # and nothing was charged
    again = httpx.post(restarted.url + "/v1/documents", json={"text": BSD}, headers=headers, timeout=DEADLINE_SECONDS)
    assert again.status_code == 201, again.text
    assert ledger.licence(again.json()["cache_id"]) is not None
    assert ledger.usage(ledger.account("writer")).balance_nanousd < 10 * 10**9
    restarted.kill()
    assert ledger.health().is_sound
    ledger.close()
