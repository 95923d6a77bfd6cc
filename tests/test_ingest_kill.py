"""An ingest killed with SIGKILL at random moments (a real ``python -m tools.ingest`` subprocess):
afterwards the destination holds no manifest, or a complete store (the previous one, or the new
one if the kill came after its commit) that opens, verifies and reads back exactly."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import hpstore
from hpstore.errors import StoreNotFoundError
from hpstore.format.manifest import MANIFEST_KEY
from hpstore.format.verify import verify
from hpstore.storage.open import open_storage
from tests.support.ingest_data import read_all

REPO = Path(__file__).resolve().parent.parent
LAYOUT = ["--chunk-bytes", "64KiB", "--shard-bytes", "512KiB", "--no-progress"]
"""Small shards: the run writes a few hundred objects, so a kill lands between many of them."""
KILLS = 3


def generations(dst: Path) -> set[str]:
    return {n for n in os.listdir(dst) if n.startswith("data-")} if dst.exists() else set()


def start(src: Path, dst: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tools.ingest", str(src), str(dst), "--overwrite", *LAYOUT],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def writing_started(proc: subprocess.Popen[bytes], dst: Path, before: set[str]) -> float:
    """Wait until ``proc`` has written into a new generation (or exited); returns that moment."""
    deadline = time.monotonic() + 120
    while proc.poll() is None and not (generations(dst) - before) and time.monotonic() < deadline:
        time.sleep(0.002)
    return time.monotonic()


def kill_midway(src: Path, dst: Path, delay: float) -> bool:
    """Start an ingest, wait until it writes, kill it ``delay`` s later; True if it was still
    running when killed."""
    proc = start(src, dst)
    writing_started(proc, dst, generations(dst))
    time.sleep(delay)
    alive = proc.poll() is None
    proc.kill()
    proc.wait()
    return alive


def check_complete(dst: Path, expected: dict[str, np.ndarray]) -> None:
    report = verify(open_storage(str(dst)), hpstore.open(str(dst)).manifest)
    assert report.ok, report.problems
    data = read_all(str(dst))["train"]
    assert sorted(data) == sorted(expected)
    for name, values in expected.items():
        np.testing.assert_array_equal(data[name], values)


@pytest.fixture(scope="module")
def write_seconds(
    tmp_path_factory: pytest.TempPathFactory, sources: dict[str, tuple[Path, dict[str, np.ndarray]]]
) -> float:
    """How long an uninterrupted run writes on this machine now: kills land at fractions of it."""
    dst = tmp_path_factory.mktemp("kill-calibrate") / "store"
    proc = start(sources["new"][0], dst)
    t0 = writing_started(proc, dst, set())
    assert proc.wait() == 0
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, np.ndarray]]]:
    root = tmp_path_factory.mktemp("kill-src")
    rng = np.random.default_rng(7)
    old = rng.integers(0, 255, (3000, 16), dtype=np.uint8)
    # ~40 MB, compressible like images: long enough to take a second or two to ingest.
    big = (rng.random((40_000, 32, 32)) < 0.3).astype(np.uint8) * rng.integers(
        0, 256, (40_000, 32, 32), np.uint8
    )
    np.save(root / "old.npy", old)
    np.save(root / "new.npy", big)
    return {"old": (root / "old.npy", {"old": old}), "new": (root / "new.npy", {"new": big})}


def test_killed_first_ingest_leaves_no_store(
    tmp_path: Path, sources: dict[str, tuple[Path, dict[str, np.ndarray]]], write_seconds: float
) -> None:
    src, expected = sources["new"]
    dst = tmp_path / "store"
    rng = np.random.default_rng(1)
    was_alive = []
    for fraction in rng.uniform(0.0, 0.9, KILLS):
        was_alive.append(kill_midway(src, dst, float(fraction) * write_seconds))
        if (dst / MANIFEST_KEY).exists():  # the kill came after the commit: the store is whole
            check_complete(dst, expected)
        else:
            with pytest.raises(StoreNotFoundError):
                hpstore.open(str(dst))
    assert any(was_alive), "every run finished before its kill: nothing was tested"
    # A later run succeeds over the leftovers and removes them.
    proc = start(src, dst)
    assert proc.wait() == 0, proc.stderr.read() if proc.stderr else ""
    check_complete(dst, expected)
    assert len(generations(dst)) == 1


def test_killed_overwrite_keeps_the_previous_store(
    tmp_path: Path, sources: dict[str, tuple[Path, dict[str, np.ndarray]]], write_seconds: float
) -> None:
    old_src, old = sources["old"]
    new_src, new = sources["new"]
    dst = tmp_path / "store"
    assert start(old_src, dst).wait() == 0
    rng = np.random.default_rng(2)
    was_alive = []
    for fraction in rng.uniform(0.0, 0.9, KILLS):
        was_alive.append(kill_midway(new_src, dst, float(fraction) * write_seconds))
        # Always a complete store: the old one until the new manifest lands, then the new one.
        committed = hpstore.open(str(dst)).manifest.source["path"]
        check_complete(dst, old if committed == str(old_src) else new)
        if committed != str(old_src):
            assert start(old_src, dst).wait() == 0  # back to the old store for the next kill
    assert any(was_alive), "every run finished before its kill: nothing was tested"
