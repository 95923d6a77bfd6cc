"""Whole training runs on one process and on two (torchrun, gloo): learning, metrics, exact resume.

For each world size, three real trainer runs:

* A runs uninterrupted, writing metrics, checkpoints and every step's sample indices
  (``--log-indices``). It must learn and report the documented metrics.
* B is the same run slowed down (``--step-delay``) so the test can SIGKILL it (its whole process
  group) while it trains, right after it has committed a mid-epoch checkpoint.
* C is B resumed with ``--resume``. It must see exactly the samples A saw after that checkpoint and
  end with parameters, optimizer state, RNG and loader states equal to A's, bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from hpstore.checkpoint.checkpointer import Checkpointer
from tests.support.trainer_store import write_image_store
from tests.test_trainer import ROOT, records, run_trainer, trainer_env
from trainer.__main__ import main as trainer_main
from trainer.metrics import EPOCH_KEYS, SUMMARY_KEYS, TRAIN_KEYS

EPOCHS, BATCH, TRAIN, TEST = 2, 16, 384, 127  # 127: two ranks evaluate one sample twice
MODELS = {1: "cnn", 2: "mlp"}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_image_store(tmp_path_factory.mktemp("runs") / "store", train=TRAIN, test=TEST)


def launcher(procs: int) -> list[str]:
    if procs == 1:
        return [sys.executable, "-m", "trainer"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", "-m", "trainer"]  # fmt: skip


def args(store: str, d: Path, run: str, procs: int) -> list[str]:
    return ["--data", store, "--model", MODELS[procs], "--epochs", str(EPOCHS), "--batch-size", str(BATCH),
            "--lr", "0.003", "--seed", "7", "--ckpt", str(d / "ck"), "--ckpt-every", "5", "--log-every", "5",
            "--log-indices", str(d / f"{run}.jsonl")]  # fmt: skip


@dataclass(frozen=True)
class RunA:
    procs: int
    dir: Path
    stdout: str
    steps_per_epoch: int

    @property
    def total(self) -> int:
        return EPOCHS * self.steps_per_epoch


@pytest.fixture(scope="module", params=[1, 2], ids=["1proc", "2proc"])
def run_a(request: pytest.FixtureRequest, store: str, tmp_path_factory: pytest.TempPathFactory) -> RunA:
    procs = int(request.param)
    d = tmp_path_factory.mktemp(f"A{procs}")
    r = run_trainer([*args(store, d, "A", procs), "--metrics", str(d / "m.jsonl")], procs=procs)
    assert r.returncode == 0, r.stderr
    return RunA(procs=procs, dir=d, stdout=r.stdout, steps_per_epoch=-(-TRAIN // (BATCH * procs)))


# -- A: learning and metrics -------------------------------------------------------------------------


def test_run_learns_and_reports_the_documented_metrics(run_a: RunA) -> None:
    last = run_a.stdout.strip().splitlines()[-1]
    assert last.startswith(f"done: {EPOCHS}.00 epochs, {run_a.total} steps,"), last
    assert "samples/s, data wait" in last and "eval accuracy" in last
    recs = records(run_a.dir / "m.jsonl")
    kinds = [r["kind"] for r in recs]
    assert (
        kinds.count("epoch") == EPOCHS and kinds.count("train") == run_a.total // 5 and kinds[-1] == "summary"
    )
    for r in recs:
        keys = {"train": TRAIN_KEYS, "epoch": EPOCH_KEYS, "summary": SUMMARY_KEYS}[r["kind"]]
        assert set(keys) <= set(r), f"{r['kind']} record lacks {set(keys) - set(r)}"
        if r["kind"] == "summary":
            continue
        assert r["samples_per_s"] > 0 and r["step_time_s"] > 0 and r["loss"] > 0 and r["lr"] > 0
        assert 0 <= r["data_wait_frac_mean"] <= r["data_wait_frac"] <= 1
        assert r["read_mb_per_s"] >= 0 and (r["cache_hit_rate"] is None or 0 <= r["cache_hit_rate"] <= 1)
        assert r["ckpt_stall_s"] >= 0
    epochs = [r for r in recs if r["kind"] == "epoch"]
    # Every rank's samples are summed: 384 per epoch whatever the world size.
    assert [r["samples"] for r in epochs] == [TRAIN] * EPOCHS
    assert all(r["eval_samples"] == TEST for r in epochs)
    # The first epoch reads its chunks; a chunk that two consecutive windows share (the first
    # windows are small while prefetch fills) is read once and hit once.
    assert epochs[0]["read_mb_per_s"] > 0 and epochs[0]["cache_hit_rate"] < 0.5
    if run_a.procs == 1:
        assert epochs[1]["cache_hit_rate"] == 1.0  # the whole store fits in the cache
    first_loss = next(r["loss"] for r in recs if r["kind"] == "train")
    assert epochs[-1]["loss"] < 0.5 * first_loss
    summary = recs[-1]
    assert (
        summary["eval_acc"] > 0.8 and summary["steps"] == run_a.total and summary["samples"] == EPOCHS * TRAIN
    )
    assert f"{100 * summary['eval_acc']:.2f}%" in last


def test_resume_needs_the_same_world_size(
    run_a: RunA, store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 2-rank checkpoint resumed by one process is refused: the sample order would differ."""
    if run_a.procs == 1:
        pytest.skip("needs a checkpoint written by more than one rank")
    code = trainer_main([*args(store, run_a.dir, "X", 2), "--resume"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err  # an input error, like every command's
    assert "world_size=2, this run has world_size=1" in err


# -- B and C: kill, resume, compare ----------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (torchrun starts its ranks in sessions of their own, so
    killing the launcher's process group would leave them running)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        children = [c for c, p in parents.items() if p in frontier]
        found += children
        frontier = children
    return found


def kill_after_a_checkpoint(cmd: list[str], ck: Path) -> None:
    """Start ``cmd``; SIGKILL it and every process under it as soon as a checkpoint is committed."""
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=trainer_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    victims: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if ck.exists() and Checkpointer(str(ck)).steps():
                victims = descendants(proc.pid)
                for pid in [*victims, proc.pid]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.02)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read().decode() if proc.stderr else ""
    assert proc.returncode == -signal.SIGKILL, f"B ended by itself ({proc.returncode}): {err}"
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() and "Z" not in _state(pid) for pid in victims):
        assert time.monotonic() < deadline, "a killed rank is still running"
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def step_log(path: Path) -> dict[int, dict[str, Any]]:
    return {rec["step"]: rec for rec in map(json.loads, path.read_text().splitlines())}


def assert_same_tree(a: Any, b: Any, where: str) -> None:
    if isinstance(a, torch.Tensor | np.ndarray):
        assert type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape, where
        assert np.array_equal(np.asarray(a), np.asarray(b)), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            assert_same_tree(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_tree(x, y, f"{where}/{i}")
    else:
        assert a == b, where


def test_killed_and_resumed_run_is_exact(run_a: RunA, store: str, tmp_path: Path) -> None:
    procs, total, per_epoch = run_a.procs, run_a.total, run_a.steps_per_epoch
    kill_after_a_checkpoint(
        [*launcher(procs), *args(store, tmp_path, "B", procs), "--step-delay", "0.1"], tmp_path / "ck"
    )
    committed = Checkpointer(str(tmp_path / "ck")).steps()
    resumed_from = max(committed)
    assert 0 < resumed_from < total and resumed_from % per_epoch != 0, committed

    c = run_trainer([*args(store, tmp_path, "C", procs), "--resume"], procs=procs)
    assert c.returncode == 0, c.stderr
    assert f"continuing from {tmp_path / 'ck'} step {resumed_from}" in c.stdout

    for rank in range(procs):
        suffix = "" if rank == 0 else f".rank{rank}"
        seen_a = step_log(Path(f"{run_a.dir / 'A.jsonl'}{suffix}"))
        seen_b = step_log(Path(f"{tmp_path / 'B.jsonl'}{suffix}"))
        seen_c = step_log(Path(f"{tmp_path / 'C.jsonl'}{suffix}"))
        assert sorted(seen_a) == list(range(1, total + 1))
        assert sorted(seen_c) == list(range(resumed_from + 1, total + 1))
        for step, rec in seen_c.items():
            assert rec == seen_a[step], f"rank {rank} step {step}: the resumed run saw other samples"
        for step in range(1, resumed_from + 1):
            assert seen_b[step] == seen_a[step], f"rank {rank} step {step}: B and A differ before the kill"

    state_a = Checkpointer(str(run_a.dir / "ck")).load()
    state_c = Checkpointer(str(tmp_path / "ck")).load()
    assert (
        state_a["progress"] == state_c["progress"] == {"step": total, "epoch": EPOCHS - 1, "batch": per_epoch}
    )
    for part in ("model", "optimizer", "scheduler", "ranks"):
        assert_same_tree(state_a[part], state_c[part], part)
    # A finished run leaves only its newest checkpoints: the retired one kept for reuse is gone,
    # and so is the one the killed run B left behind.
    for ck in (run_a.dir / "ck", tmp_path / "ck"):
        names = sorted(p.name for p in ck.iterdir())
        assert names == [f"step-{s:09d}" for s in Checkpointer(str(ck)).steps()] and len(names) == 3, names
