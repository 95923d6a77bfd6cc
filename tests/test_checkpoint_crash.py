"""Checkpoints under failure: SIGKILL mid-save, corrupted or missing objects, a full disk."""

from __future__ import annotations

import json
import os
import random
import select
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from hpstore.checkpoint.checkpointer import Checkpointer, CheckpointFallbackWarning, CheckpointLayout
from hpstore.checkpoint.plan import step_prefix
from hpstore.errors import CheckpointError
from tests.support.ckpt_child import expected

REPO = Path(__file__).resolve().parent.parent


def child(*args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "tests.support.ckpt_child", *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        proc.kill()
        raise AssertionError(f"child printed nothing in {timeout} s; stderr: {proc.communicate()[1][-2000:]}")
    line = proc.stdout.readline()
    if not line:
        raise AssertionError(f"child exited ({proc.wait()}); stderr: {proc.communicate()[1][-2000:]}")
    return line


def test_sigkill_at_random_moments_leaves_the_latest_checkpoint_loadable(tmp_path: Path) -> None:
    seed = random.randrange(1 << 30)  # timing varies run to run anyway; each run probes new moments
    rng = random.Random(seed)
    root = str(tmp_path / "ckpt")
    last_seen = 0
    for _trial in range(4):
        proc = child("loop", root)
        stamps = []
        for _ in range(rng.randint(2, 3)):  # let it get into its stride: saves back to back
            line = read_line(proc, timeout=120)
            assert line.startswith("saved "), line
            stamps.append(time.perf_counter())
        # One save's period (this disk's speed): a kill in it lands in the snapshot, the chunk
        # writes, the commit or the retention that follows.
        time.sleep(rng.uniform(0.0, 1.2 * (stamps[-1] - stamps[-2])))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ck = Checkpointer(root)
        step = ck.latest()
        assert step is not None and step >= last_seen, f"seed {seed}"
        with warnings.catch_warnings():
            warnings.simplefilter("error", CheckpointFallbackWarning)  # no fallback: it verifies
            state = ck.load()
        assert state["progress"]["step"] == step, f"seed {seed}"
        assert expected(state, step), f"seed {seed}: checkpoint {step} holds values of another step"
        assert len(ck.steps()) <= 3  # keep=2, plus at most the one whose retention was cut short
        last_seen = step


@pytest.fixture
def two_checkpoints(tmp_path: Path) -> tuple[Checkpointer, Path]:
    ck = Checkpointer(str(tmp_path), layout=CheckpointLayout(chunk_bytes=4096))
    ck.save(1, {"w": torch.full((64, 64), 1.0), "b": torch.zeros(3), "n": 1})
    ck.save(2, {"w": torch.full((64, 64), 2.0), "b": torch.zeros(3), "n": 2})
    ck.wait()
    return ck, tmp_path / step_prefix(2)


def array_dir(step_dir: Path, name: str) -> Path:
    man = json.loads((step_dir / "manifest.json").read_text())
    key = next(a["key"] for a in man["arrays"] if a["name"] == name)
    return step_dir / man["generation"] / key


def load_falls_back_to_step_1(ck: Checkpointer, reason: str) -> None:
    with pytest.warns(
        CheckpointFallbackWarning, match=f"loaded checkpoint step 1; skipped newer ones: step 2: .*{reason}"
    ):
        state = ck.load()
    assert state["n"] == 1 and torch.equal(state["w"], torch.full((64, 64), 1.0))


def test_flipped_byte_in_a_chunk_names_the_array(two_checkpoints: tuple[Checkpointer, Path]) -> None:
    ck, step_dir = two_checkpoints
    chunk = array_dir(step_dir, "w") / "c" / "3" / "0"
    data = bytearray(chunk.read_bytes())
    data[100] ^= 0x01
    chunk.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"array 'w': checksum mismatch in data-\w+/00000-w/c/3/0"):
        ck.load(2)
    load_falls_back_to_step_1(ck, "array 'w': checksum mismatch")


def test_deleted_array_names_the_array(two_checkpoints: tuple[Checkpointer, Path]) -> None:
    ck, step_dir = two_checkpoints
    import shutil

    shutil.rmtree(array_dir(step_dir, "b"))
    with pytest.raises(CheckpointError, match=r"array 'b': data-\w+/00001-b/.* is missing"):
        ck.load(2)
    load_falls_back_to_step_1(ck, "array 'b'")


def test_truncated_chunk_is_a_size_mismatch(two_checkpoints: tuple[Checkpointer, Path]) -> None:
    ck, step_dir = two_checkpoints
    chunk = array_dir(step_dir, "w") / "c" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-1])
    with pytest.raises(CheckpointError, match=r"array 'w': .*c/0/0 has 4095 bytes, manifest says 4096"):
        ck.load(2)


def test_truncated_manifest_falls_back(two_checkpoints: tuple[Checkpointer, Path]) -> None:
    ck, step_dir = two_checkpoints
    manifest = step_dir / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:50])
    assert ck.latest() == 2  # committed (it has a manifest) ...
    with pytest.raises(CheckpointError, match=r"manifest\.json: not valid JSON"):
        ck.load(2)
    load_falls_back_to_step_1(ck, "manifest.json: not valid JSON")  # ... but does not verify


def test_nothing_verifies_is_an_error(two_checkpoints: tuple[Checkpointer, Path]) -> None:
    ck, step_dir = two_checkpoints
    for step in (1, 2):
        (step_dir.parent / step_prefix(step) / "manifest.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"no checkpoint verifies: step 2: .*; step 1: "):
        ck.load()


def test_full_disk_surfaces_from_wait_and_next_save(tmp_path: Path) -> None:
    limit = 256 << 10
    proc = child("full", str(tmp_path), str(limit))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    report = json.loads(out.strip().splitlines()[-1])
    assert (
        report["wait"] is not None and "StorageError" in report["wait"] and "File too large" in report["wait"]
    )
    assert report["next_save"] is not None and "File too large" in report["next_save"]
    assert report["after"] is None
    assert report["steps"] == [1, 4] and report["step1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [step_prefix(1), step_prefix(4)]
