"""An ingest killed with SIGKILL at random moments (a real ``python -m tools.ingest`` subprocess):
afterwards the destination holds no manifest, or a complete store (the previous one, or the new
one if the kill came after its commit) that opens, verifies and reads back exactly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import hpstore
from hpstore.errors import StoreNotFoundError
from hpstore.format.commit import LOCK_KEY
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


def start(src: Path, dst: Path, *extra: str) -> subprocess.Popen[bytes]:
    """An ingest; ``--break-lock`` clears the lock a killed run leaves (the runs here are sequential)."""
    return subprocess.Popen(
        [sys.executable, "-m", "tools.ingest", str(src), str(dst), "--overwrite", *LAYOUT, *extra],
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
    proc = start(src, dst, "--break-lock")
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
    proc = start(src, dst, "--break-lock")
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
            assert start(old_src, dst, "--break-lock").wait() == 0  # back to the old store for the next kill
    assert any(was_alive), "every run finished before its kill: nothing was tested"


def test_killed_ingest_leaves_a_lock_that_names_itself_and_is_broken_on_request(
    tmp_path: Path, sources: dict[str, tuple[Path, dict[str, np.ndarray]]]
) -> None:
    old_src, old = sources["old"]
    new_src, new = sources["new"]
    dst = tmp_path / "store"
    assert start(old_src, dst).wait() == 0
    before = generations(dst)
    proc = start(new_src, dst)
    writing_started(proc, dst, before)
    (killed,) = generations(dst) - before
    while proc.poll() is None and not any(files for _, _, files in os.walk(dst / killed)):
        time.sleep(0.002)  # an object landed: the leftover is an object, not just an empty folder
    proc.kill()
    proc.wait()
    assert (dst / LOCK_KEY).exists()
    check_complete(dst, old)  # readers ignore the lock
    again = start(old_src, dst)
    _, err = again.communicate()
    lines = err.decode().splitlines()
    assert again.returncode == 2 and len(lines) == 1, lines
    assert LOCK_KEY in lines[0] and f"pid {proc.pid}" in lines[0] and "--break-lock" in lines[0]
    check_complete(dst, old)
    assert start(new_src, dst, "--break-lock").wait() == 0
    check_complete(dst, new)
    assert len(generations(dst)) == 1 and not (dst / LOCK_KEY).exists()


def test_two_ingests_at_once_the_second_fails_fast(
    tmp_path: Path, sources: dict[str, tuple[Path, dict[str, np.ndarray]]]
) -> None:
    """Both used to exit 0 and collect each other's generations, leaving no readable store."""
    old_src, _old = sources["old"]
    new_src, new = sources["new"]
    dst = tmp_path / "store"
    assert start(old_src, dst).wait() == 0
    first = start(new_src, dst)
    writing_started(first, dst, generations(dst))
    # Hold the first one still mid-write (SIGSTOP), so the second meets it there however long the
    # second takes to start on a busy machine; then let it finish.
    os.kill(first.pid, signal.SIGSTOP)
    try:
        assert first.poll() is None and (dst / LOCK_KEY).exists(), "the first ingest ended before it was held"
        second = start(old_src, dst)
        _, err = second.communicate()
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode == 2 and err.decode().count("\n") == 1 and LOCK_KEY in err.decode(), err
    assert first.wait() == 0, first.stderr.read() if first.stderr else ""
    if first.stderr:
        first.stderr.close()
    check_complete(dst, new)
    assert len(generations(dst)) == 1 and not (dst / LOCK_KEY).exists()
