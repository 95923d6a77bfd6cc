"""A real S3-compatible server (moto) on a free 127.0.0.1 port, in a child process.

The server runs in its own process so its request handling does not share the client's GIL, as a
real object store would not. The child prints its port and serves until its stdin closes, so it
stops with the parent even when the parent is killed (no orphaned servers on shared machines).

Credentials are fake but distinctive (``SECRET``), so tests can assert that they never leak into
manifests, logs or error messages.

Use ``S3Server`` as a context manager; tests use the ``s3_server`` pytest fixture of
``tests.support.s3server`` (session-scoped: one server for every test that asks). Lives with the
benchmarks so that they run from an installed package, outside the repository (moto[server] is the
one extra they need). Run ``python -m benchmarks.support.s3server`` to get a server for manual
experiments.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Mapping
from typing import Any

KEY_ID = "hpstore-test-key-id"
SECRET = "hpstore-test-secret-Zq81xWv0"  # distinctive: grep for it to prove it never leaks
REGION = "us-east-1"

_CHILD = """
import sys
from moto.server import ThreadedMotoServer
srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
srv.start()
print(srv.get_host_and_port()[1], flush=True)
sys.stdin.read()  # serve until the parent closes our stdin (or dies)
srv.stop()
"""


class S3Server:
    """A moto S3 server in a child process; ``endpoint`` is its ``http://127.0.0.1:PORT``."""

    def __init__(self, *, start_timeout: float = 60.0) -> None:
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> S3Server:
        env = {**os.environ, **credentials_env(), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        reader.join(self.start_timeout)
        if not line or not line[0].strip().isdigit():
            self.stop()
            raise RuntimeError(f"moto server did not start within {self.start_timeout:.0f} s")
        self.port = int(line[0])
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            if self.proc.stdin:
                self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except (subprocess.TimeoutExpired, OSError):
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def client(self, endpoint: str | None = None) -> Any:
        """A plain boto3-style client for setup and inspection (not the code under test)."""
        import botocore.session

        return botocore.session.get_session().create_client(
            "s3",
            endpoint_url=endpoint or self.endpoint,
            region_name=REGION,
            aws_access_key_id=KEY_ID,
            aws_secret_access_key=SECRET,
        )

    def create_bucket(self, name: str | None = None) -> str:
        name = name or f"bucket-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def storage_options(self, endpoint: str | None = None) -> dict[str, Any]:
        """Options for ``hpstore.open`` / ``open_storage``: endpoint and credentials explicit."""
        return {"endpoint_url": endpoint or self.endpoint, "key": KEY_ID, "secret": SECRET}


def credentials_env() -> dict[str, str]:
    """The ``AWS_*`` variables a client needs besides the endpoint."""
    return {
        "AWS_ACCESS_KEY_ID": KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": REGION,
    }


def client_env(endpoint: str) -> dict[str, str]:
    """Environment for a subprocess (CLI, trainer) that should reach ``endpoint``."""
    return {**credentials_env(), "AWS_ENDPOINT_URL": endpoint}


def bucket_objects(server: S3Server, bucket: str, prefix: str = "") -> Mapping[str, bytes]:
    """Every object under ``prefix``, read with a plain client (for leak and content checks)."""
    c = server.client()
    out: dict[str, bytes] = {}
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = c.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return out


if __name__ == "__main__":
    with S3Server() as srv:
        print(f"moto S3 on {srv.endpoint}; credentials: {credentials_env()}; Ctrl-D stops it", flush=True)
        sys.stdin.read()
