"""Real servers for the tier tests: Redis and kvmart nodes come from kvmart/cluster/local.py; moto's standalone
S3-compatible server (`python -m moto.server`: no real S3 server installs from the registries here, so the S3
tier is tested against moto, labelled as such) is started here. Not a test module."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from service_support import import_or_missing, missing_service

from kvmart.cluster.local import DEADLINE_SECONDS, KvmartNode, MissingBinaryError, free_port, wait_for
from kvmart.cluster.local import RedisServer as _RedisServer

__all__ = ["BUCKET", "KvmartNode", "MotoS3Server", "RedisServer", "fake_aws_credentials", "moto_s3", "redis_server",
           "wait_for"]

BUCKET = "kvmart-test"  # the bucket `moto_s3` creates


def RedisServer(directory: Path) -> _RedisServer:  # noqa: N802 (a factory standing in for the class)
    """A RedisServer, or `missing_service` saying why there is none (a skip; a failure under CI)."""
    try:
        return _RedisServer(directory)
    except MissingBinaryError as e:
        missing_service(str(e))


class MotoS3Server:
    """moto's standalone server (S3-compatible, in memory) as a subprocess on 127.0.0.1:<port>."""

    def __init__(self) -> None:
        import_or_missing("moto.server", "moto[server] is not installed (the test extras)")
        self.port, self.process = free_port(), None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "MotoS3Server":
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:  # ready when it answers (a hang guard, never a timing)
            wait_for(lambda: httpx.get(self.endpoint, timeout=1).status_code < 500, "moto.server to start")
        except BaseException:
            self.stop()  # never left running by a start that failed
            raise
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(DEADLINE_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


# Fixtures shared by the shared-tier test modules (import them by name into a test module to use them there).
@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def moto_s3():
    server = MotoS3Server().start()
    import boto3

    boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def fake_aws_credentials(monkeypatch):
    """moto accepts any credentials; boto3 needs some to sign requests."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
