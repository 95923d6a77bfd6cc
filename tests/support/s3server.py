"""The moto S3 server of ``benchmarks.support.s3server``, plus the session-scoped ``s3_server``
fixture (one server for every test that asks; each test takes its own bucket)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from benchmarks.support.s3server import (
    KEY_ID,
    REGION,
    SECRET,
    S3Server,
    bucket_objects,
    client_env,
    credentials_env,
)

__all__ = [
    "KEY_ID",
    "REGION",
    "SECRET",
    "S3Server",
    "bucket_objects",
    "client_env",
    "credentials_env",
    "s3_server",
]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    with S3Server() as server:
        yield server
