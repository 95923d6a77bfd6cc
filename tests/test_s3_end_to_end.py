"""S3 end to end, through a fault-injecting proxy (5% of requests: 503s, resets, truncated bodies).

One store, one bucket, one proxy for the module; the stages run in order, each a real entry point:
``tools.ingest`` (a subprocess, endpoint and credentials from ``AWS_*`` variables) writes the store
to ``s3://``; ``tools.inspect --verify`` checks it; ``hpstore.open`` + ``Loader`` stream one epoch
(exactly once, correct rows); the trainer trains part of an epoch and checkpoints to ``s3://``, is
resumed from there and finishes the epoch with every sample seen exactly once. Afterwards no object
in the bucket and no output contains a credential.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import hpstore
from hpstore.checkpoint.checkpointer import Checkpointer
from tests.support.faultproxy import FaultProxy, Faults
from tests.support.s3server import KEY_ID, SECRET, S3Server, bucket_objects, client_env
from tests.support.s3server import s3_server as s3_server  # the fixture
from tests.support.trainer_store import images

ROOT = Path(__file__).resolve().parent.parent
N, BATCH, STOP_AT = 600, 50, 5  # 12 steps per epoch; the first run stops after 5


@pytest.fixture(scope="module")
def proxy(s3_server: S3Server) -> Iterator[FaultProxy]:
    with FaultProxy(s3_server.endpoint, Faults.mixed(0.05), seed=11) as p:
        yield p


@pytest.fixture(scope="module")
def bucket(s3_server: S3Server) -> str:
    return s3_server.create_bucket()


@pytest.fixture(scope="module")
def arrays(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    x, y = images(N, seed=5)
    path = tmp_path_factory.mktemp("src") / "data.npz"
    np.savez(path, image=x, label=y)
    return path, x, y


def env_for(proxy: FaultProxy) -> dict[str, str]:
    return {**os.environ, **client_env(proxy.endpoint), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    for text in (proc.stdout, proc.stderr):
        assert SECRET not in text and KEY_ID not in text
    return proc


def test_ingest_verify_load_train_checkpoint_resume(
    s3_server: S3Server,
    proxy: FaultProxy,
    bucket: str,
    arrays: tuple[Path, np.ndarray, np.ndarray],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    src, x, y = arrays
    url, ckpt = f"s3://{bucket}/mnist", f"s3://{bucket}/runs/one"

    ingest = run(
        ["tools.ingest", str(src), url, "--chunk-bytes", "8K", "--shard-bytes", "32K", "--no-progress"],
        env_for(proxy),
    )
    assert ingest.returncode == 0, ingest.stderr

    for name, value in client_env(proxy.endpoint).items():
        monkeypatch.setenv(name, value)
    from tools import inspect

    assert inspect.main([url, "--verify"]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and SECRET not in out

    store = hpstore.open(url)
    assert SECRET not in json.dumps(store.manifest.source) and KEY_ID not in json.dumps(store.manifest.source)
    ds = store.split("train")
    loader = hpstore.Loader(ds, BATCH, num_workers=2, cache_bytes=0, with_index=True, seed=3)
    seen = []
    for batch in loader:
        idx = batch["index"].numpy()
        assert np.array_equal(batch["image"].numpy(), x[idx]) and np.array_equal(
            batch["label"].numpy(), y[idx]
        )
        seen.append(idx)
    assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(N))
    assert store.storage.stats.failures == 0

    logs = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    common = ["trainer", "--data", url, "--model", "linear", "--epochs", "1", "--batch-size", str(BATCH),
              "--input", "image", "--target", "label", "--eval-split", "none", "--ckpt", ckpt, "--log-every", "100"]  # fmt: skip
    first = run([*common, "--max-steps", str(STOP_AT), "--log-indices", str(logs[0])], env_for(proxy))
    assert first.returncode == 0, first.stderr
    assert Checkpointer(ckpt).steps() == [STOP_AT]
    # The resumed run gets endpoint and credentials as storage options instead of variables.
    options = [f"endpoint_url={proxy.endpoint}", f"key={KEY_ID}", f"secret={SECRET}"]
    bare = {k: v for k, v in env_for(proxy).items() if not k.startswith("AWS_")}
    second = run([*common, "--resume", "--log-indices", str(logs[1]), *_flags(options)], bare)
    assert second.returncode == 0, second.stderr
    assert f"continuing from {ckpt} step {STOP_AT}" in second.stdout
    steps = [json.loads(line) for log in logs for line in log.read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, N // BATCH + 1))
    indices = np.concatenate([np.asarray(s["index"]).reshape(-1) for s in steps])
    assert np.array_equal(np.sort(indices), np.arange(N))  # exactly once across the resume
    assert Checkpointer(ckpt).steps()[-1] == N // BATCH

    assert proxy.injected > 0, proxy.counts  # the faults were real, and survived
    leaked = [
        k
        for k, v in bucket_objects(s3_server, bucket).items()
        if SECRET.encode() in v or KEY_ID.encode() in v
    ]
    assert leaked == []


def _flags(options: list[str]) -> list[str]:
    return [arg for option in options for arg in ("--storage-option", option)]


def test_permanent_errors_are_one_clear_line_without_secrets(
    proxy: FaultProxy, bucket: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from tools import inspect

    options = _flags([f"endpoint_url={proxy.endpoint}", f"key={KEY_ID}", f"secret={SECRET}"])
    assert inspect.main(["s3://no-such-bucket-anywhere/store", *options]) == 2
    err = capsys.readouterr().err.strip()
    assert "no such bucket" in err and len(err.splitlines()) == 1
    assert SECRET not in err and KEY_ID not in err
    assert inspect.main([f"s3://{bucket}/nothing-here", *options]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and SECRET not in err
