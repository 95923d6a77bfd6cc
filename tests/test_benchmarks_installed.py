"""The benchmarks run from the installed packages alone, outside the repository (no ``tests/``):
the remote benchmark starts its moto server and its latency proxy from ``benchmarks.support``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("hpstore", "benchmarks", "tools", "trainer")
"""What ``pip install hpstore`` puts on the path (pyproject's ``packages.find``)."""

PROBE = """
import botocore.session
from benchmarks.remote import proxy
from benchmarks.support.s3server import KEY_ID, REGION, SECRET, S3Server
with S3Server() as server, proxy(server.endpoint, 0.0) as url:
    s3 = botocore.session.get_session().create_client(
        "s3", endpoint_url=url, region_name=REGION, aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET
    )
    s3.create_bucket(Bucket="probe")
    print("buckets", [b["Name"] for b in s3.list_buckets()["Buckets"]])
"""


def test_remote_benchmark_helpers_work_from_an_installed_copy(tmp_path: Path) -> None:
    site = tmp_path / "site"
    for name in PACKAGES:
        shutil.copytree(ROOT / name, site / name, ignore=shutil.ignore_patterns("__pycache__"))
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=work, env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "buckets ['probe']" in proc.stdout
    suite = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--help"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert suite.returncode == 0 and "--quick" in suite.stdout, suite.stderr[-2000:]
