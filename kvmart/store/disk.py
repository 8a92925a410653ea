"""The local disk store, the embedded default: one directory, an artifact file and an entry file per cache id.

    ROOT/objects/ab/<cache_id>.kvm   the artifact
    ROOT/entries/<cache_id>.json     its metadata entry
    ROOT/tmp/                        writes in progress; renamed into place when complete
    ROOT/quarantine/                 entry files that could not be read, moved aside (and logged) when found

Every write goes to tmp/ then os.replace: a crash leaves at worst a stale temp file, cleaned up at the next open
(a temp file is named after its writer's process id: one whose writer is gone is removed at once, as after a
kill -9 and restart; one without a live writer's id, after an hour). Every cache id is checked
(kvmart/format/keys.py `parse_cache_id`) before a file name is built from it. An entry file that cannot be read
(not JSON, fields missing or of the wrong type, another artifact's id, a name that is no cache id) is moved to
quarantine/ and logged: it never fails a listing, and the artifact reads as absent (it is recomputed)."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import BinaryIO

from kvmart.errors import StoreError
from kvmart.format.keys import is_cache_id, parse_cache_id
from kvmart.store.base import Entry, Store, Writer

log = logging.getLogger("kvmart.store")

STALE_TEMP_SECONDS = 3600.0


class DiskStore(Store):
    def __init__(self, root: Path) -> None:
        self.root = root
        try:
            for sub in ("objects", "entries", "tmp", "quarantine"):
                (root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create the store at {root}: {e}") from e
        self._clean_stale_temps()

    def __repr__(self) -> str:
        return f"DiskStore({str(self.root)!r})"

    def object_path(self, cache_id: str) -> Path:
        """Where the artifact of `cache_id` lives (whether or not it exists); InvalidIdError for a non-id."""
        cache_id = parse_cache_id(cache_id)
        return self.root / "objects" / cache_id[:2] / f"{cache_id}.kvm"

    def _entry_path(self, cache_id: str) -> Path:
        return self.root / "entries" / f"{parse_cache_id(cache_id)}.json"

    def put(self, entry: Entry, write: Writer) -> Entry:
        target = self.object_path(entry.cache_id)
        target.parent.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{os.getpid()}.{entry.cache_id[:16]}.", suffix=".kvm.tmp",
                                   dir=self.root / "tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                written = write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        stored = Entry(**{**entry.as_dict(), "artifact_bytes": written})
        self._write_entry(stored)
        return stored

    def _write_entry(self, entry: Entry) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f"{os.getpid()}.", suffix=".json.tmp", dir=self.root / "tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(entry.as_dict(), f, sort_keys=True)
        os.replace(tmp, self._entry_path(entry.cache_id))

    def _open(self, cache_id: str) -> tuple[BinaryIO, int] | None:
        try:
            f = open(self.object_path(cache_id), "rb")  # noqa: SIM115  (returned open: the caller closes it)
        except FileNotFoundError:
            return None
        return f, os.fstat(f.fileno()).st_size

    def entry(self, cache_id: str) -> Entry | None:
        """The entry, or None if there is none or it is unreadable (then it is quarantined, and logged)."""
        path = self._entry_path(cache_id)
        try:
            return Entry.parse(json.loads(path.read_bytes()), cache_id)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, StoreError) as e:  # ValueError: not JSON, or not UTF-8
            self._quarantine(path, e)
            return None

    def entries(self) -> list[Entry]:
        found = []
        for path in (self.root / "entries").glob("*.json"):
            if not is_cache_id(path.stem):
                self._quarantine(path, "its name is not a cache id")
                continue
            entry = self.entry(path.stem)
            if entry is not None:
                found.append(entry)
        return sorted(found, key=lambda e: e.created_at, reverse=True)

    def _quarantine(self, path: Path, why: object) -> None:
        """Move an unreadable entry file aside so that it fails nothing again; its artifact reads as absent."""
        target = self.root / "quarantine" / f"{path.name}.{time.time_ns()}"
        try:
            os.replace(path, target)
        except FileNotFoundError:  # another reader moved it first
            return
        except OSError as e:
            log.error("entry file %s is unreadable (%s) and cannot be moved aside: %s", path, why, e)
            return
        log.warning("entry file %s is unreadable (%s): moved to %s; its artifact will be recomputed", path, why,
                    target)

    def delete(self, cache_id: str) -> bool:
        removed = False
        for path in (self._entry_path(cache_id), self.object_path(cache_id)):
            if path.exists():
                path.unlink()
                removed = True
        return removed

    def _clean_stale_temps(self) -> None:
        """Remove temp files left by writers that died: at once if the process named in the file is gone, else
        when older than an hour (younger ones of a live writer, e.g. `kvmart precompute` beside a server, may
        still be written)."""
        now = time.time()
        for tmp in (self.root / "tmp").iterdir():
            try:
                if not _writer_alive(tmp.name) or now - tmp.stat().st_mtime > STALE_TEMP_SECONDS:
                    tmp.unlink()
            except FileNotFoundError:
                pass


def _writer_alive(name: str) -> bool:
    """Whether the process whose id starts a temp file's name may still be writing it (True if unknown)."""
    pid = name.split(".", 1)[0]
    if not pid.isdigit():
        return True
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True
    return True
