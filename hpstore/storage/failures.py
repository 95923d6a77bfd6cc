"""Failures of remote storage requests: what they mean, and how they are reported.

Every exception a remote backend (s3fs / aiobotocore / aiohttp, or any fsspec file system) raises is
translated, at the backend boundary, into one of three hpstore errors:

- ``ObjectNotFoundError``: the object does not exist (permanent);
- ``StorageError``: a failure no retry can cure: no such bucket, access denied, bad credentials,
  a malformed request (permanent; ``RetryingStorage`` raises it at once);
- ``TransientStorageError``: a failure a retry may cure: HTTP 5xx, throttling (``SlowDown``),
  connection refused or reset, timeouts, a body cut short (retried with backoff).

Classification looks at the S3 error code and HTTP status carried by botocore's ``ClientError``
(s3fs keeps it as ``__cause__``) and at exception class *names*, not classes, so this module does not
import the optional client libraries. Messages are scrubbed of secrets (``Redactor``) before they
are raised: credentials must never reach a log, an error message or a manifest.

``is_transient`` says which errors to retry and ``RetryPolicy`` how (full-jitter exponential
backoff, bounded attempts); ``hpstore.storage.wrappers.RetryingStorage`` applies them to every request, and
S3 multipart uploads to each part.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from hpstore.errors import HpstoreError, ObjectNotFoundError, StorageError


class TransientStorageError(StorageError):
    """A storage failure that a retry may cure (5xx, throttling, reset, timeout, short body)."""


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """``attempts`` tries in all per request; between them a full-jitter exponential delay.

    The defaults give up after about 3 s of backoff at most (1.5 s expected), long enough to ride
    out a throttling burst or a dropped connection, short enough that a dead endpoint surfaces as a
    clear error quickly.
    """

    attempts: int = 6
    base_delay: float = 0.05
    max_delay: float = 2.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("RetryPolicy.attempts must be at least 1")
        if self.base_delay < 0 or self.max_delay < 0:
            raise ValueError("RetryPolicy delays must not be negative")

    def delay(self, attempt: int) -> float:
        """Full-jitter backoff: uniform in [0, min(max, base * 2**attempt)]."""
        return random.uniform(0, min(self.max_delay, self.base_delay * 2**attempt))


def is_transient(exc: BaseException) -> bool:
    """Whether a retry may cure ``exc``.

    Remote backends classify their own failures (``TransientStorageError`` or a permanent
    ``StorageError``); any other hpstore error, a missing object, a permission problem or a
    programming error is permanent. A bare ``OSError`` from a backend that does not classify
    (a reset connection, a timeout) is transient.
    """
    if isinstance(exc, TransientStorageError):
        return True
    if isinstance(exc, HpstoreError | FileNotFoundError | PermissionError):
        return False
    return isinstance(exc, OSError)


# S3 error codes that no retry cures, with the hint a user needs.
PERMANENT_CODES = {
    "NoSuchBucket": "no such bucket",
    "AccessDenied": "access denied (check the credentials' permissions on this bucket)",
    "AllAccessDisabled": "access denied (all access to this object has been disabled)",
    "AccountProblem": "access denied (account problem)",
    "InvalidAccessKeyId": "access denied: the access key id is not known to the server",
    "SignatureDoesNotMatch": "access denied: the secret key does not match the access key id",
    "ExpiredToken": "access denied: the session token has expired",
    "InvalidToken": "access denied: the session token is invalid",
    "InvalidBucketName": "invalid bucket name",
    "RequestTimeTooSkewed": "request rejected: the local clock is too far off",
}
TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
    "OperationAborted",
    "XAmzContentSHA256Mismatch",  # a body damaged in transit
}
MISSING_CODES = {"NoSuchKey", "NoSuchVersion", "404", "NotFound"}

# Client-side exception class names (botocore, aiohttp, fsspec, builtins) meaning "try again".
TRANSIENT_NAMES = {
    "HTTPClientError",
    "EndpointConnectionError",
    "ConnectionClosedError",
    "ReadTimeoutError",
    "ConnectTimeoutError",
    "IncompleteReadError",
    "ResponseStreamingError",
    "ResponseParserError",
    "ChecksumError",
    "ClientPayloadError",
    "ClientConnectionError",
    "ServerDisconnectedError",
    "ClientOSError",
    "ServerTimeoutError",
    "FSTimeoutError",
    "ConnectionError",
    "TimeoutError",
    "IncompleteRead",
}
# Client-side configuration problems: retrying cannot help.
CONFIG_NAMES = {
    "NoCredentialsError": "no credentials found (set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
    "a profile, or the storage options key / secret)",
    "PartialCredentialsError": "incomplete credentials",
    "NoRegionError": "no region configured (set AWS_DEFAULT_REGION)",
    "ParamValidationError": "invalid request parameters",
    "InvalidRetryConfigurationError": "invalid retry configuration",
}


def _chain(exc: BaseException) -> Iterable[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def _names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def s3_error(exc: BaseException) -> tuple[str, int] | None:
    """``(code, http_status)`` of the first botocore ``ClientError`` in the chain, if any."""
    for e in _chain(exc):
        response = getattr(e, "response", None)
        if isinstance(response, Mapping) and "Error" in response:
            code = str(response["Error"].get("Code", ""))
            status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            return code, status
    return None


def classify(exc: BaseException, where: str, redactor: Redactor) -> OSError:
    """The hpstore error for ``exc`` raised by a request on ``where`` (an URL, already safe):
    ``ObjectNotFoundError``, ``TransientStorageError`` or (permanent) ``StorageError``."""
    if isinstance(exc, StorageError | ObjectNotFoundError):
        return exc
    detail = redactor(_describe(exc))
    found = s3_error(exc)
    if found is not None:
        code, status = found
        if code in PERMANENT_CODES:
            return StorageError(f"{where}: {PERMANENT_CODES[code]} ({code})")
        if code in MISSING_CODES:
            return ObjectNotFoundError(f"{where}: no such object")
        if code in TRANSIENT_CODES or status >= 500 or status == 429:
            what = f"{status} {code}" if code and code != str(status) else str(status)
            return TransientStorageError(f"{where}: server error {what}: {detail}")
        if status == 403:
            return StorageError(f"{where}: access denied ({code or status})")
        return StorageError(f"{where}: request rejected ({code or status}): {detail}")
    names = set().union(*(_names(e) for e in _chain(exc)))
    for name, hint in CONFIG_NAMES.items():
        if name in names:
            return StorageError(f"{where}: {hint}")
    if names & TRANSIENT_NAMES:
        return TransientStorageError(f"{where}: {detail}")
    if isinstance(exc, FileNotFoundError):
        return ObjectNotFoundError(f"{where}: no such object")
    if isinstance(exc, PermissionError):
        return StorageError(f"{where}: access denied: {detail}")
    if isinstance(exc, OSError):
        return TransientStorageError(f"{where}: {detail}")
    return StorageError(f"{where}: {detail}")


def _describe(exc: BaseException) -> str:
    text = ERRNO_PREFIX.sub("", str(exc).strip()) or type(exc).__name__
    return text.splitlines()[0][:300]


ERRNO_PREFIX = re.compile(r"^\[Errno -?\d+\]\s*")


SECRET_OPTION = re.compile(
    r"secret|token|password|passwd|credential|session|signature|access_key|^key$", re.I
)
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.I)


class Redactor:
    """Removes secrets (credential option values, ``AWS_SECRET_ACCESS_KEY``, URL user info) from
    text before it is shown. The access key id (``key``) is hidden too: it names an account."""

    def __init__(self, storage_options: Mapping[str, Any] | None = None) -> None:
        secrets = {os.environ[n] for n in SECRET_ENV if os.environ.get(n)}
        secrets |= set(_secret_values(storage_options or {}))
        # Longest first so a secret containing another is removed whole.
        self.secrets = sorted((s for s in secrets if len(s) >= 4), key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for s in self.secrets:
            text = text.replace(s, "***")
        return USERINFO.sub(r"\g<scheme>***@", text)


def _secret_values(options: Mapping[str, Any]) -> Iterable[str]:
    for name, value in options.items():
        if isinstance(value, Mapping):
            yield from _secret_values(value)
        elif isinstance(value, str) and SECRET_OPTION.search(str(name)):
            yield value


def safe_url(url: str) -> str:
    """``url`` without user info (``scheme://user:pass@host`` -> ``scheme://***@host``)."""
    return USERINFO.sub(r"\g<scheme>***@", url)
