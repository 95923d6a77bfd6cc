"""FsspecStorage: the Storage of any fsspec URL (``s3://``, ``memory://``, ``gs://`` ...).

Kept apart from ``hpstore.storage`` (the contract and the local backend): everything here is about
one remote client, its options, its exceptions and S3's multipart uploads.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from hpstore.errors import HpstoreError, InputError, ObjectNotFoundError
from hpstore.storage.base import Capabilities, Range, Storage, StorageStats, check_key, raise_first
from hpstore.storage.failures import (
    Redactor,
    RetryPolicy,
    TransientStorageError,
    classify,
    is_transient,
    safe_url,
)
from hpstore.threads import run_parallel


class FsspecStorage(Storage):
    """Any fsspec file system (``s3://``, ``memory://``, ``gs://`` ...).

    ``read_ranges`` uses ``cat_ranges``, which async file systems (s3fs) run concurrently, so many
    byte-range requests are in flight at once and per-request latency is hidden.

    Every backend exception is translated at this boundary (``hpstore.storage.failures.classify``) into
    ``ObjectNotFoundError``, a permanent ``StorageError`` or a ``TransientStorageError``, with secrets
    scrubbed from the message. Retrying is *not* done here: ``RetryingStorage`` does it, once, with
    jittered backoff, and counts it. For S3 the client's own retry loops (botocore's and s3fs's) are
    therefore switched off unless the caller configures them: stacked retry loops multiply
    (5 x 5 x 6 attempts) and hide what happened from the counters. (s3fs still pauses 0.1 s after
    a failed request before raising it; only ``RetryingStorage`` repeats it, and counts it.)
    Multipart parts are the exception: each part is retried on its own (``part_retry``) so that
    one flaky part does not restart a large upload.
    """

    capabilities = Capabilities(concurrent_ranges=True)

    part_bytes = 16 << 20
    """S3 multipart part size: objects of at least twice this go up as parallel parts."""
    part_workers = 8
    """Parts of one object uploaded at once."""
    part_retry = RetryPolicy()
    """Tries per part of a multipart upload (transient failures only)."""
    max_in_flight = 64
    """S3 connection pool size: the most requests one storage keeps in flight."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        import fsspec

        opts = dict(storage_options or {})
        self._redact = Redactor(opts)
        self.url = safe_url(url.rstrip("/"))
        self.is_s3 = url.split("://", 1)[0] in ("s3", "s3a")
        if self.is_s3:
            opts = s3_options(opts, self.max_in_flight)
        try:
            fs, root = fsspec.core.url_to_fs(url, **opts)
        except (ImportError, ValueError, TypeError) as exc:
            raise InputError(f"{self.url}: cannot open this URL: {self._redact(str(exc))}") from None
        if self.is_s3:
            fs.retries = 1  # s3fs's own retry loop: one attempt per request (our options, our instance)
        self.fs = fs
        self.root = root.rstrip("/")
        self.stats = StorageStats()

    def _path(self, key: str) -> str:
        return f"{self.root}/{check_key(key)}"

    def _fail(self, exc: BaseException, key: str = "") -> OSError:
        self.stats.add(errors=1)
        return classify(exc, f"{self.url}/{key}" if key else self.url, self._redact)

    def read(self, key: str) -> bytes:
        t0 = time.perf_counter()
        # On S3 one plain GET: s3fs would first HEAD the object to split a large one into
        # concurrent range GETs, a second round trip for the small objects read whole (manifests,
        # checkpoint chunks, which are read many at a time anyway).
        kw = {"max_concurrency": 1} if self.is_s3 else {}
        try:
            data = self.fs.cat_file(self._path(key), **kw)
        except Exception as exc:
            raise self._fail(exc, key) from None
        self.stats.add(bytes_read=len(data), read_requests=1, read_seconds=time.perf_counter() - t0)
        return bytes(data)

    def read_range(self, key: str, start: int, end: int) -> bytes:
        return self.read_ranges([(key, start, end)])[0]

    def read_ranges(self, ranges: Sequence[Range]) -> list[bytes]:
        return raise_first(self.read_ranges_each(ranges))

    def read_ranges_each(self, ranges: Sequence[Range]) -> list[bytes | BaseException]:
        if not ranges:
            return []
        t0 = time.perf_counter()
        paths = [self._path(k) for k, _, _ in ranges]
        wanted = [i for i, (_, s, e) in enumerate(ranges) if e > s]  # S3 rejects empty ranges
        try:
            got = self.fs.cat_ranges(
                [paths[i] for i in wanted],
                [ranges[i][1] for i in wanted],
                [ranges[i][2] for i in wanted],
                on_error="return",
            )
        except Exception as exc:
            err = self._fail(exc)
            return [err] * len(ranges)
        results: list[bytes | BaseException] = [b""] * len(ranges)
        nbytes = ok = 0
        for i, data in zip(wanted, got, strict=True):
            key, start, end = ranges[i]
            if isinstance(data, BaseException):
                results[i] = self._fail(data, key)
            elif len(data) != end - start:
                # A body cut short (or an object smaller than the manifest says): never returned.
                self.stats.add(errors=1)
                results[i] = TransientStorageError(
                    f"{self.url}/{key}: short read ({len(data)} of {end - start} bytes at {start})"
                )
            else:
                results[i] = bytes(data)
                nbytes += len(data)
                ok += 1
        self.stats.add(bytes_read=nbytes, read_requests=ok, read_seconds=time.perf_counter() - t0)
        return results

    def write(self, key: str, data: bytes | memoryview, *, durable: bool = True) -> None:
        # A single PUT, or a multipart upload completed by one final request, is atomic on object
        # stores: readers see the old object or the new one.
        t0 = time.perf_counter()
        path = self._path(key)
        payload = bytes(data)
        try:
            if self.is_s3 and len(payload) >= 2 * self.part_bytes:
                self._write_parts(key, path, payload)
            elif self.is_s3:
                self.fs.pipe_file(path, payload)
            else:
                if not getattr(self.fs, "async_impl", False):
                    self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
                self.fs.pipe_file(path, payload)
        except HpstoreError:
            raise
        except Exception as exc:
            raise self._fail(exc, key) from None
        self.stats.add(bytes_written=len(payload), write_requests=1, write_seconds=time.perf_counter() - t0)

    def create(self, key: str, data: bytes) -> bool:
        """A conditional write (``mode="create"``): S3 sends ``If-None-Match: *`` and the server
        refuses the PUT if the key exists; ``memory://`` checks under its lock. Back ends without
        it fall back to the contract's check-then-write."""
        t0 = time.perf_counter()
        path = self._path(key)
        try:
            if not self.is_s3 and not getattr(self.fs, "async_impl", False):
                self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            self.fs.pipe_file(path, bytes(data), mode="create")
        except FileExistsError:
            return False
        except NotImplementedError:  # a file system that cannot write conditionally
            return super().create(key, data)
        except Exception as exc:
            raise self._fail(exc, key) from None
        self.stats.add(bytes_written=len(data), write_requests=1, write_seconds=time.perf_counter() - t0)
        return True

    def _write_parts(self, key: str, path: str, payload: bytes) -> None:
        """An S3 multipart upload: parts go up in parallel, and each part is retried on its own
        (``part_retry``), so a flaky request costs one part, not the whole object. Creating and
        completing the upload are not retried here: ``RetryingStorage`` repeats the whole write."""
        bucket, obj, _ = self.fs.split_path(path)
        upload = self.fs.call_s3("create_multipart_upload", Bucket=bucket, Key=obj)["UploadId"]
        view, size = memoryview(payload), self.part_bytes

        def put(i: int) -> dict[str, Any]:
            body = bytes(view[i * size : (i + 1) * size])
            args = {"Bucket": bucket, "Key": obj, "UploadId": upload, "PartNumber": i + 1, "Body": body}
            etag = self._retry_part(key, lambda: self.fs.call_s3("upload_part", **args)["ETag"])
            return {"PartNumber": i + 1, "ETag": etag}

        try:
            parts = run_parallel(
                put, range(-(-len(payload) // size)), self.part_workers, name="hpstore-upload"
            )
            self.fs.call_s3(
                "complete_multipart_upload",
                Bucket=bucket,
                Key=obj,
                UploadId=upload,
                MultipartUpload={"Parts": parts},
            )
        except BaseException:
            try:  # best effort: an unfinished upload is invisible to readers either way
                self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=obj, UploadId=upload)
            except Exception:
                pass
            raise
        finally:
            self.fs.invalidate_cache(path)

    def _retry_part(self, key: str, call: Callable[[], str]) -> str:
        policy = self.part_retry
        for attempt in range(policy.attempts):
            try:
                return call()
            except Exception as exc:
                err = self._fail(exc, key)
                if not is_transient(err) or attempt + 1 == policy.attempts:
                    raise err from None
                wait = policy.delay(attempt)
                self.stats.add(retries=1, retry_wait_seconds=wait)
                time.sleep(wait)
        raise AssertionError("unreachable")

    def size(self, key: str) -> int:
        try:
            info = self.fs.info(self._path(key))
        except Exception as exc:
            raise self._fail(exc, key) from None
        if info.get("type") == "directory":
            raise ObjectNotFoundError(f"{self.url}/{key}: no such object")
        return int(info["size"])

    def list(self, prefix: str = "") -> dict[str, int]:
        base = self._path(prefix) if prefix else self.root
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            found = {}
        except Exception as exc:
            raise self._fail(exc, prefix) from None
        if not found and self.is_s3:
            self._check_bucket()  # s3fs lists a missing bucket as empty; say so instead
        root = self.root.lstrip("/")
        out: dict[str, int] = {}
        for path, info in found.items():
            rel = path.lstrip("/")[len(root) + 1 :] if root else path.lstrip("/")
            if info.get("type") == "directory" or not rel or rel.endswith("/"):
                continue
            out[rel] = int(info["size"])
        return out

    def _check_bucket(self) -> None:
        bucket = self.root.lstrip("/").split("/", 1)[0]
        try:
            self.fs.call_s3("list_objects_v2", Bucket=bucket, MaxKeys=1)
        except Exception as exc:
            raise self._fail(exc) from None

    def delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix)
        try:
            self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass
        except Exception as exc:
            raise self._fail(exc, prefix) from None
        finally:
            self.fs.invalidate_cache()


def s3_options(options: Mapping[str, Any], max_in_flight: int) -> dict[str, Any]:
    """s3fs options with hpstore's defaults: client retries off (``RetryingStorage`` retries),
    a connection pool as deep as the requests kept in flight, and no listing cache (another
    process may have written since)."""
    out = dict(options)
    config = dict(out.get("config_kwargs") or {})
    config.setdefault("retries", {"total_max_attempts": 1})
    config.setdefault("max_pool_connections", max_in_flight)
    out["config_kwargs"] = config
    out.setdefault("use_listings_cache", False)
    # fsspec reuses one client per distinct set of options (creating one costs ~0.3 s); an endpoint
    # taken from the environment is made an option so that a changed variable gets its own client.
    if "endpoint_url" not in out and os.environ.get("AWS_ENDPOINT_URL"):
        out["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
    return out
