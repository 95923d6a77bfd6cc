"""The S3 backend against a real moto server on loopback, with and without injected faults."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from hpstore.errors import ObjectNotFoundError, StorageError
from hpstore.storage.base import Storage
from hpstore.storage.failures import Redactor, TransientStorageError, safe_url
from hpstore.storage.fsspec import FsspecStorage
from hpstore.storage.open import open_storage
from hpstore.storage.wrappers import RetryingStorage, RetryPolicy
from tests.support.faultproxy import FaultProxy, Faults
from tests.support.s3server import SECRET, S3Server, client_env
from tests.support.s3server import s3_server as s3_server  # the fixture
from tests.test_storage import test_missing_objects_and_short_reads_raise as contract_missing
from tests.test_storage import test_write_read_range_size_list_delete as contract_rw

FAST = RetryPolicy(attempts=6, base_delay=0.002, max_delay=0.02)


@pytest.fixture
def bucket(s3_server: S3Server) -> str:
    return s3_server.create_bucket()


@pytest.fixture
def proxy(s3_server: S3Server) -> Iterator[FaultProxy]:
    with FaultProxy(s3_server.endpoint, seed=7) as p:
        yield p


def s3(
    server: S3Server, url: str, endpoint: str | None = None, policy: RetryPolicy = FAST
) -> RetryingStorage:
    return RetryingStorage(FsspecStorage(url, server.storage_options(endpoint)), policy)


@pytest.mark.parametrize("nested", [False, True])
def test_storage_contract_on_s3(s3_server: S3Server, bucket: str, nested: bool) -> None:
    storage: Storage = open_storage(f"s3://{bucket}/root", s3_server.storage_options())
    if nested:
        storage = storage.child("nested/deeper")
    contract_rw(storage)
    contract_missing(storage)


def test_endpoint_and_credentials_from_environment(
    s3_server: S3Server, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in client_env(s3_server.endpoint).items():
        monkeypatch.setenv(name, value)
    storage = open_storage(f"s3://{bucket}/env")
    storage.write("k", b"from-env")
    assert storage.read("k") == b"from-env"


def test_many_ranges_in_flight_survive_faults(s3_server: S3Server, bucket: str, proxy: FaultProxy) -> None:
    storage = s3(s3_server, f"s3://{bucket}/faults", proxy.endpoint)
    blobs = {f"obj{i}": np.random.default_rng(i).bytes(256 << 10) for i in range(4)}
    for key, blob in blobs.items():
        storage.write(key, blob)
    ranges = [(k, j * 4096, (j + 1) * 4096 + j) for k in blobs for j in range(60)]
    proxy.faults = Faults.mixed(0.1)
    errors_before = storage.stats.errors
    out = storage.read_ranges(ranges)
    assert out == [blobs[k][s:e] for k, s, e in ranges]
    injected = proxy.injected
    assert injected > 0, proxy.counts
    # Every injected fault was seen as a failed request and repeated; nothing was given up.
    assert storage.stats.errors - errors_before == injected
    assert storage.stats.retries == injected
    assert storage.stats.failures == 0


def test_writes_and_lists_survive_faults(s3_server: S3Server, bucket: str, proxy: FaultProxy) -> None:
    storage = s3(s3_server, f"s3://{bucket}/w", proxy.endpoint)
    proxy.faults = Faults.mixed(0.3)
    for i in range(10):
        storage.write(f"d/{i}", str(i).encode() * 100)
    assert storage.list("d") == {f"d/{i}": 100 * len(str(i)) for i in range(10)}
    assert [storage.read(f"d/{i}") for i in range(10)] == [str(i).encode() * 100 for i in range(10)]
    assert proxy.injected > 0 and storage.stats.retries > 0


def test_retry_bound_gives_a_clear_error(s3_server: S3Server, bucket: str, proxy: FaultProxy) -> None:
    storage = s3(s3_server, f"s3://{bucket}/bound", proxy.endpoint)
    storage.write("k", b"x" * 1000)
    proxy.faults = Faults(error_rate=1.0)
    before = proxy.counts["requests"]
    with pytest.raises(
        StorageError,
        match=r"/bound/k: server error 503 SlowDown.*read of bytes \[0:10\] failed after 6 attempts",
    ):
        storage.read_range("k", 0, 10)
    assert proxy.counts["requests"] - before == 6
    assert storage.stats.failures == 1 and storage.stats.retries == 5


def test_short_body_is_never_returned(s3_server: S3Server, bucket: str, proxy: FaultProxy) -> None:
    storage = s3(s3_server, f"s3://{bucket}/short", proxy.endpoint, RetryPolicy(attempts=2, base_delay=0))
    storage.write("k", bytes(range(256)) * 64)
    proxy.faults = Faults(truncate_rate=1.0)
    with pytest.raises(StorageError, match="failed after 2 attempts"):
        storage.read_ranges([("k", 0, 8192)])
    proxy.faults = Faults(reset_rate=1.0)
    with pytest.raises(StorageError, match="failed after 2 attempts"):
        storage.read("k")
    assert proxy.counts["truncations"] == 2 and proxy.counts["resets"] >= 2


def test_missing_bucket_fails_at_once(s3_server: S3Server, proxy: FaultProxy) -> None:
    storage = s3(s3_server, "s3://no-such-bucket-here/x", proxy.endpoint)
    for op in (lambda: storage.read("k"), lambda: storage.list(), lambda: storage.write("k", b"1")):
        before = proxy.counts.get("requests", 0)
        with pytest.raises(StorageError, match="no such bucket") as info:
            op()
        assert not isinstance(info.value, TransientStorageError | ObjectNotFoundError)
        assert proxy.counts["requests"] - before <= 2  # one request (two for a read: HEAD + GET)
    assert storage.stats.retries == 0


def test_access_denied_fails_at_once_without_leaking_secrets(
    s3_server: S3Server, bucket: str, proxy: FaultProxy
) -> None:
    storage = s3(s3_server, f"s3://{bucket}/private", proxy.endpoint)
    storage.write("k", b"secret data")
    proxy.faults = Faults(deny=(f"/{bucket}/private",))
    messages = []
    for op in (
        lambda: storage.read("k"),
        lambda: storage.read_ranges([("k", 0, 3)]),
        lambda: storage.size("k"),
    ):
        with pytest.raises(StorageError, match="access denied") as info:
            op()
        messages.append(str(info.value))
    assert storage.stats.retries == 0
    assert not any(SECRET in m for m in messages)


def test_large_objects_upload_in_parallel_parts(s3_server: S3Server, bucket: str, proxy: FaultProxy) -> None:
    backend = FsspecStorage(f"s3://{bucket}/mp", s3_server.storage_options(proxy.endpoint))
    backend.part_bytes = 5 << 20  # S3's smallest part
    blob = np.random.default_rng(0).bytes(12 << 20)
    backend.write("big", blob)
    # create + 3 parts + complete: a multipart upload, made visible by its last request.
    assert proxy.counts["requests"] == 5
    assert backend.read("big") == blob and backend.size("big") == len(blob)


def test_secrets_are_redacted_from_messages() -> None:
    r = Redactor(
        {"key": "AKIAEXAMPLE", "secret": "s3cr3t-value", "client_kwargs": {"aws_session_token": "tok-123"}}
    )
    text = r("failed with AKIAEXAMPLE / s3cr3t-value / tok-123 at http://user:pw@host/x")
    assert "AKIAEXAMPLE" not in text and "s3cr3t-value" not in text and "tok-123" not in text
    assert "user:pw" not in text
    assert safe_url("https://u:p@host/bucket") == "https://***@host/bucket"


def test_unreachable_endpoint_is_transient_then_clear(bucket: str) -> None:
    storage = RetryingStorage(
        FsspecStorage(
            f"s3://{bucket}/x",
            {"endpoint_url": "http://127.0.0.1:9", "key": "k" * 8, "secret": SECRET},
        ),
        RetryPolicy(attempts=2, base_delay=0),
    )
    with pytest.raises(StorageError, match=r"(?i)could not connect.*failed after 2 attempts") as info:
        storage.read_range("k", 0, 1)
    assert SECRET not in str(info.value)


def test_redactor_uses_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    token = f"tok-{uuid.uuid4().hex}"
    monkeypatch.setenv("AWS_SESSION_TOKEN", token)
    assert token not in Redactor()(f"x {token} y")


def test_multipart_parts_are_retried_alone(s3_server: S3Server, bucket: str, proxy: FaultProxy) -> None:
    backend = FsspecStorage(f"s3://{bucket}/mp-retry", s3_server.storage_options(proxy.endpoint))
    backend.part_bytes = 5 << 20
    backend.part_retry = FAST
    blob = np.random.default_rng(1).bytes(15 << 20)
    proxy.faults = Faults(match="partNumber=", fail_first=3)  # the first three part uploads get 503
    RetryingStorage(backend, FAST).write("big", blob)
    # create + 3 parts + complete, plus one repeat per refused part: nothing else was redone.
    assert proxy.counts["requests"] == 5 + 3 and proxy.counts["errors_503"] == 3
    assert backend.stats.retries == 3 and backend.stats.write_requests == 1
    proxy.faults = Faults()
    assert backend.read("big") == blob
