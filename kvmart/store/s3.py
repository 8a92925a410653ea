"""The S3-compatible shared tier (AWS S3, MinIO, Ceph, R2...), through boto3 with a configurable endpoint.

    PREFIX/objects/<cache_id>.<nonce>.kvm   the artifact (one object: S3 PUTs are atomic)
    PREFIX/entries/<cache_id>.json          its index: the entry, the object key, size and xxh3-128, written last

The index is written last with `If-None-Match: *`: readers see no index or a complete artifact; when two nodes
publish the same cache id at once, the first index wins and the loser deletes its object (stored once). A read
checks size and checksum; a missing or corrupt object makes the artifact absent (recomputed, never used).
Connection failures are StoreUnavailableError. When a cluster signing key is set, every index is signed for its
id, and an index or artifact without this cluster's signature for the id asked for raises ArtifactError
(kvmart/format/signing.py). Every id is checked before a key is built from it (`parse_cache_id`); an index that
is malformed (unparseable, fields of the wrong type, another id's entry, an object outside this prefix) is logged
and dropped: the artifact reads as absent and is recomputed, never a 500."""

from __future__ import annotations

import io
import json
import logging
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

import xxhash

from kvmart.errors import ArtifactError, ConfigError, StoreError, StoreUnavailableError
from kvmart.format.artifact import check_fetched
from kvmart.format.keys import parse_cache_id
from kvmart.format.signing import cluster_key, sign_index
from kvmart.store.base import Entry, Store, Writer, parse_index, parse_listed_id

log = logging.getLogger("kvmart.store")
INDEX_FIELDS: dict[str, type] = {"object": str, "size": int, "xxh3": str}


@dataclass(frozen=True)
class S3Config:
    """`s3://bucket/prefix?endpoint=http://127.0.0.1:9000&region=us-east-1`; credentials come from the usual
    AWS sources (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, profiles, instance roles)."""

    bucket: str
    prefix: str = "kvmart"
    endpoint: str | None = None
    region: str = "us-east-1"
    timeout_seconds: float = 5.0

    def __post_init__(self) -> None:
        if not self.bucket:
            raise StoreError("s3 store: the URL names no bucket (s3://BUCKET/prefix)")


class S3Store(Store):
    def __init__(self, config: S3Config) -> None:
        import boto3
        import botocore.config
        import botocore.exceptions as bex

        self.config = config
        self._unreachable = (bex.EndpointConnectionError, bex.ConnectTimeoutError, bex.ReadTimeoutError,
                             bex.ConnectionClosedError)
        self._client_error = bex.ClientError
        self._no_credentials = (bex.NoCredentialsError, bex.PartialCredentialsError)
        self._client = boto3.client(
            "s3", endpoint_url=config.endpoint, region_name=config.region,
            config=botocore.config.Config(connect_timeout=config.timeout_seconds, read_timeout=config.timeout_seconds,
                                          retries={"max_attempts": 2}))

    def __repr__(self) -> str:
        return f"S3Store(s3://{self.config.bucket}/{self.config.prefix}, endpoint={self.config.endpoint!r})"

    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self.config.prefix, *parts) if p)

    @contextmanager
    def _reach(self) -> Iterator[None]:
        try:
            yield
        except self._unreachable as e:
            raise StoreUnavailableError(f"s3 endpoint {self.config.endpoint or 'AWS'} is unreachable: {e}") from e
        except self._no_credentials as e:
            raise ConfigError(f"s3 store s3://{self.config.bucket}: {e} (set AWS_ACCESS_KEY_ID and "
                              "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)") from e

    def _is(self, error: Exception, *codes: str) -> bool:
        return isinstance(error, self._client_error) and error.response.get("Error", {}).get("Code") in codes

    def ping(self) -> None:
        with self._reach():
            self._client.head_bucket(Bucket=self.config.bucket)

    def put(self, entry: Entry, write: Writer) -> Entry:
        parse_cache_id(entry.cache_id)
        buffer = io.BytesIO()
        size = write(buffer)
        data = buffer.getvalue()
        object_key = self._key("objects", f"{entry.cache_id}.{secrets.token_hex(8)}.kvm")
        stored = Entry(**{**entry.as_dict(), "artifact_bytes": size})
        index = {"entry": stored.as_dict(), "object": object_key, "size": size, "xxh3": xxhash.xxh3_128_hexdigest(data)}
        key = cluster_key()
        if key is not None:
            index["signature"] = sign_index(key, entry.cache_id, index)
        with self._reach():
            self._client.put_object(Bucket=self.config.bucket, Key=object_key, Body=data)
            try:
                self._client.put_object(Bucket=self.config.bucket, Key=self._index_key(entry.cache_id),
                                        Body=json.dumps(index).encode(), IfNoneMatch="*")
                return stored
            except self._client_error as e:
                if not self._is(e, "PreconditionFailed", "ConditionalRequestConflict"):
                    raise StoreError(f"s3 put of {entry.cache_id[:16]} failed: {e}") from e
            self._client.delete_object(Bucket=self.config.bucket, Key=object_key)  # published first by another
        existing = self.entry(entry.cache_id)
        return existing if existing is not None else stored

    def _index_key(self, cache_id: str) -> str:
        return self._key("entries", f"{parse_cache_id(cache_id)}.json")

    def _index(self, cache_id: str) -> dict | None:
        """The index of `cache_id`, None if it is absent or malformed (then dropped); ArtifactError if it is not
        signed with the cluster's key for this id (left alone: a node with a wrong key must not delete good ones)."""
        with self._reach():
            try:
                raw = self._client.get_object(Bucket=self.config.bucket, Key=self._index_key(cache_id))["Body"].read()
            except self._client_error as e:
                if self._is(e, "NoSuchKey", "404"):
                    return None
                raise StoreError(f"s3 read of {cache_id[:16]} failed: {e}") from e
        try:
            index = parse_index(raw, "s3", cache_id, INDEX_FIELDS)
            if not index["object"].startswith(self._key("objects", cache_id) + ".") or index["size"] < 0:
                raise StoreError(f"s3 index of {cache_id[:16]} names an object that is not its own")
        except StoreError as e:
            log.warning("%s; treated as absent and dropped (it will be recomputed)", e)
            with self._reach():
                self._client.delete_object(Bucket=self.config.bucket, Key=self._index_key(cache_id))
            return None
        return index

    def _open(self, cache_id: str) -> tuple[BinaryIO, int] | None:
        index = self._index(cache_id)
        return None if index is None else self._read(cache_id, index)

    def _open_entry(self, cache_id: str) -> tuple[Entry, BinaryIO, int] | None:
        """The artifact and its entry from one read of the index."""
        index = self._index(cache_id)
        opened = self._read(cache_id, index) if index is not None else None
        return None if index is None or opened is None else (Entry(**index["entry"]), *opened)

    def _read(self, cache_id: str, index: dict) -> tuple[BinaryIO, int] | None:
        """The object under `index`, checked; None (and the index dropped) if it is missing or corrupt."""
        with self._reach():
            try:
                data = self._client.get_object(Bucket=self.config.bucket, Key=index["object"])["Body"].read()
            except self._client_error as e:
                if not self._is(e, "NoSuchKey", "404"):
                    raise StoreError(f"s3 read of {cache_id[:16]} failed: {e}") from e
                data = None
        if data is None or len(data) != index["size"] or xxhash.xxh3_128_hexdigest(data) != index["xxh3"]:
            log.warning("s3 artifact %s is %s; treated as absent (it will be recomputed)", cache_id[:16],
                        "missing" if data is None else "corrupt")
            with self._reach():
                self._client.delete_object(Bucket=self.config.bucket, Key=self._index_key(cache_id))
            return None
        check_fetched(data, len(data), cache_id)  # ArtifactError if a cluster key is set and it is not signed with it
        return io.BytesIO(data), len(data)

    def entry(self, cache_id: str) -> Entry | None:
        """The entry, or None if absent, malformed or (with a cluster key) not signed for this id (logged)."""
        try:
            index = self._index(cache_id)
        except ArtifactError as e:
            log.warning("%s", e)
            return None
        return None if index is None else Entry(**index["entry"])

    def entries(self) -> list[Entry]:
        found = []
        with self._reach():
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.config.bucket, Prefix=self._key("entries") + "/")
            keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
        for key in keys:
            cache_id = key.rsplit("/", 1)[-1].removesuffix(".json")
            if parse_listed_id(cache_id, "s3") is None:
                log.warning("s3 entries/ holds %r, which is not a cache id's index; skipped", key[-120:])
                continue
            try:
                entry = self.entry(cache_id)
            except StoreError as e:
                if isinstance(e, StoreUnavailableError):
                    raise
                log.warning("%s; skipped", e)
                continue
            if entry is not None:
                found.append(entry)
        return sorted(found, key=lambda e: e.created_at, reverse=True)

    def delete(self, cache_id: str) -> bool:
        try:
            index = self._index(cache_id)
        except ArtifactError:  # not signed by this cluster: asked to delete it, the index goes
            with self._reach():
                self._client.delete_object(Bucket=self.config.bucket, Key=self._index_key(cache_id))
            return True
        if index is None:
            return False
        with self._reach():
            self._client.delete_object(Bucket=self.config.bucket, Key=self._index_key(cache_id))
            self._client.delete_object(Bucket=self.config.bucket, Key=index["object"])
        return True
