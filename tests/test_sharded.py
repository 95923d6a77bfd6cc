"""Sharded (FSDP2 / DTensor) checkpoints and ``--parallel fsdp`` training, with real torchrun runs.

Every multi-process case is a real ``torchrun`` job over gloo on the CPU:

* ``sharded_child save`` on 2 ranks writes an FSDP model with uneven and empty shards plus AdamW
  state and a ``PerRank`` value; this process then loads it whole and reads it with plain zarr and
  compares both with the ``full_tensor()``s the job wrote; ``sharded_child load`` on 3 ranks
  reshards it and checks every local row. The same save to the loopback S3 server loads whole.
* The trainer with ``--parallel fsdp`` against ``--parallel ddp`` (same seed, same data): the
  per-step training losses agree within ``LOSS_RTOL``. A 2-process fsdp run resumed from a
  mid-run checkpoint on 2 processes ends bit for bit where the uninterrupted run ends; resumed on 1
  and on 3 processes (another global batch, see trainer/checkpointing.py) it ends with an eval
  loss within ``RESHARD_LOSS_RTOL`` of the uninterrupted run's and the same accuracy ±2 points.
* SIGKILL of one rank at random moments of a loop of sharded saves: every listed checkpoint loads
  and verifies, nothing partial is listed.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr

from hpstore.checkpoint import Checkpointer
from hpstore.checkpoint.plan import step_prefix
from hpstore.checkpoint.sharded import shard_range, sharded_chunk_shape
from hpstore.errors import CheckpointError
from tests.support.ckpt import assert_same
from tests.support.s3server import S3Server, bucket_objects, client_env
from tests.support.s3server import s3_server as s3_server  # the fixture
from tests.support.trainer_store import write_image_store
from tests.test_trainer import ROOT, records, run_trainer, trainer_env

CHILD = str(ROOT / "tests" / "support" / "sharded_child.py")
LOSS_RTOL = 2e-3
"""FSDP reduce-scatters gradients where DDP all-reduces them: the same sums in another order, so
losses drift apart by rounding only (measured: < 1e-4 relative over these 24 steps)."""
RESHARD_LOSS_RTOL = 0.6
"""A resume on another world size continues with another global batch (W' × 16), hence another
number and size of the remaining steps: the end is as good, not the same."""


def torchrun(
    procs: int, *args: str, timeout: float = 240, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", *args]
    run_env = {**trainer_env(), **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=timeout)


# -- pure plan ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,world", [(7, 2), (7, 3), (1, 4), (300, 2), (37, 3), (0, 2), (5, 8)])
def test_chunks_never_straddle_two_ranks(n: int, world: int) -> None:
    shape = (n, 40)
    chunks = sharded_chunk_shape(shape, 4, 4096, max(1, -(-n // world)))
    rows = chunks[0]
    ranges = [shard_range(n, world, r) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    for start in range(0, n, rows):
        owners = {r for r, (lo, hi) in enumerate(ranges) if lo <= start < hi}
        end = min(n, start + rows) - 1
        assert owners == {r for r, (lo, hi) in enumerate(ranges) if lo <= end < hi}, (start, end)


def test_per_rank_values_in_a_world_of_one_on_an_object_store() -> None:
    """Without torch.distributed a PerRank state is a one-rank distributed save (version 2)."""
    from hpstore.checkpoint import PerRank
    from hpstore.checkpoint.reader import read_manifest

    ck = Checkpointer("memory://sharded-one", keep=1)
    state = {"w": torch.arange(6.0).reshape(2, 3), "rank": PerRank({"rng": torch.get_rng_state(), "pos": 4})}
    for step in (1, 2):
        ck.save(step, state)
    ck.wait()
    loaded = ck.load()
    assert ck.steps() == [2] and read_manifest(ck.storage, 2).ranks == 1
    assert torch.equal(loaded["w"], state["w"]) and loaded["rank"][0]["pos"] == 4
    assert torch.equal(loaded["rank"][0]["rng"], state["rank"].value["rng"])
    with pytest.raises(CheckpointError, match="cannot hold another PerRank"):
        ck.save(3, {"x": PerRank(PerRank(1))})
    ck.close()


# -- the checkpointer on 2 and 3 ranks ------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("sharded")
    r = torchrun(2, CHILD, "save", str(d))
    assert r.returncode == 0, r.stderr[-3000:]
    return d


def _flat(state: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in state.items():
        name = f"{prefix}|{k}" if prefix else str(k)
        out.update(_flat(v, name) if isinstance(v, dict) else {name: v})
    return out


def test_sharded_save_loads_whole_and_reads_with_plain_zarr(saved: Path) -> None:
    full = np.load(saved / "full.npz")
    ck = Checkpointer(str(saved / "ck"))
    state = ck.load()
    flat = _flat({"model": state["model"], "optim": state["optim"]})
    assert set(full.files) <= set(flat)
    assert [r["rank"] for r in state["rank"]] == [0, 1]
    manifest = json.loads((saved / "ck" / step_prefix(1) / "manifest.json").read_text())
    gen = saved / "ck" / step_prefix(1) / manifest["generation"]
    by_name = {a["name"]: a for a in manifest["arrays"] if "group" not in a}
    for name in full.files:
        assert np.array_equal(flat[name].numpy(), full[name]), name
        z = zarr.open_array(str(gen / by_name[name.replace("|", "/")]["key"]), mode="r")
        assert np.array_equal(z[...], full[name]), name
    sharded = [a for a in by_name.values() if a.get("shard_rows")]
    assert {a["name"] for a in sharded} >= {
        "model/0.weight",
        "model/4.weight",
        "optim/state/2.weight/exp_avg",
    }
    assert all(a["shard_rows"] % a["chunk_shape"][0] == 0 for a in sharded)


def test_reshard_onto_three_ranks_reads_its_rows(saved: Path) -> None:
    r = torchrun(3, CHILD, "load", str(saved))
    assert r.returncode == 0, r.stderr[-3000:]


def test_wrong_shape_or_dtype_target_names_the_tensor(saved: Path) -> None:
    ck = Checkpointer(str(saved / "ck"))
    with pytest.raises(
        CheckpointError, match=r"tensor 'model/2.weight' is saved as tensor float32\[37, 300\]"
    ):
        ck.load(target={"model": {"2.weight": torch.zeros(36, 300)}})
    with pytest.raises(CheckpointError, match=r"'model/2.bias'.*target wants tensor float64"):
        ck.load(target={"model": {"2.bias": torch.zeros(37, dtype=torch.float64)}})
    with pytest.raises(CheckpointError, match=r"target tensor 'model/9.weight' is not in the checkpoint"):
        ck.load(target={"model": {"9.weight": torch.zeros(1)}})


def test_a_missing_shard_object_is_named(saved: Path, tmp_path: Path) -> None:
    shutil.copytree(saved / "ck", tmp_path / "ck")
    manifest = json.loads((tmp_path / "ck" / step_prefix(1) / "manifest.json").read_text())
    (a,) = [a for a in manifest["arrays"] if a["name"] == "optim/state/0.weight/exp_avg"]
    chunk = tmp_path / "ck" / step_prefix(1) / manifest["generation"] / a["key"] / "c" / "11" / "0"
    chunk.unlink()  # rows 275..299: written by rank 1
    with pytest.raises(CheckpointError, match=r"array 'optim/state/0.weight/exp_avg'.*c/11/0 is missing"):
        Checkpointer(str(tmp_path / "ck")).load(step=1)


def test_sigkill_of_one_rank_during_sharded_saves_leaves_only_complete_checkpoints(tmp_path: Path) -> None:
    rng = random.Random(13)
    root = tmp_path / "ck"
    for trial in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", CHILD, "loop", str(tmp_path)],
            cwd=ROOT, env=trainer_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            start_new_session=True,
        )  # fmt: skip
        marker = tmp_path / "committed"
        deadline = time.monotonic() + 180
        start = int(marker.read_text()) if marker.exists() else 0
        while (not marker.exists() or int(marker.read_text()) < start + 1) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.6))  # somewhere inside a later save
        victims = _ranks(proc.pid)
        assert victims, "no rank processes found"
        os.kill(rng.choice(victims), signal.SIGKILL)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        ck = Checkpointer(str(root))
        steps = ck.steps()
        assert steps, f"trial {trial}: nothing committed"
        for step in steps:
            state = ck.load(step=step)  # every byte verified
            assert state["i"] == step and state["rank"] == [0, 1]
        ck.close()
        (tmp_path / "committed").write_text(str(max(steps)))


def _ranks(launcher: int) -> list[int]:
    """The torchrun workers (children of the launcher's process)."""
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(launcher)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


# -- the trainer ----------------------------------------------------------------------------------

ARGS = ["--model", "mlp", "--epochs", "2", "--batch-size", "16", "--lr", "0.003", "--seed", "7", "--log-every", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_image_store(tmp_path_factory.mktemp("fsdp") / "store", train=384, test=127)


@pytest.fixture(scope="module")
def fsdp_run(store: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("fsdpA")
    r = run_trainer(
        ["--data", store, *ARGS, "--parallel", "fsdp", "--ckpt", str(d / "ck"), "--ckpt-every", "5",
         "--metrics", str(d / "m.jsonl"), "--log-indices", str(d / "idx.jsonl")], procs=2, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return d


def _losses(path: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(path) if r["kind"] == "train"}


def _indices(path: Path, procs: int) -> list[dict[str, Any]]:
    """Every rank's ``--log-indices`` records (rank r > 0 writes ``path.rank<r>``)."""
    files = [path] + [path.with_name(f"{path.name}.rank{r}") for r in range(1, procs)]
    return [json.loads(line) for f in files for line in f.read_text().splitlines()]


def _summary(path: Path) -> dict[str, Any]:
    return next(r for r in records(path) if r["kind"] == "summary")


def test_fsdp_and_ddp_reach_the_same_loss_curve(store: str, fsdp_run: Path, tmp_path: Path) -> None:
    r = run_trainer(["--data", store, *ARGS, "--metrics", str(tmp_path / "m.jsonl")], procs=2, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ddp, fsdp = _losses(tmp_path / "m.jsonl"), _losses(fsdp_run / "m.jsonl")
    assert sorted(ddp) == sorted(fsdp) == list(range(1, 25))
    np.testing.assert_allclose([fsdp[s] for s in ddp], list(ddp.values()), rtol=LOSS_RTOL)
    # Each rank holds half of the parameters, gradients and Adam moments (+ a few scalars).
    ratio = _summary(fsdp_run / "m.jsonl")["state_bytes"] / _summary(tmp_path / "m.jsonl")["state_bytes"]
    assert 0.45 < ratio < 0.55, ratio


def _resumable_copy(run: Path, dest: Path, step: int) -> Path:
    """A copy of ``run``'s checkpoints as a run killed right after committing ``step`` leaves them."""
    shutil.copytree(run / "ck", dest / "ck")
    for p in (dest / "ck").iterdir():
        if p.name.startswith("step-") and int(p.name[5:]) > step:
            shutil.rmtree(p)
    return dest / "ck"


def _final_state(ck: Path) -> Any:
    c = Checkpointer(str(ck))
    return c.load(step=c.latest())


def test_same_world_size_resume_is_bit_exact(store: str, fsdp_run: Path, tmp_path: Path) -> None:
    ck = _resumable_copy(fsdp_run, tmp_path, 15)
    r = run_trainer(["--data", store, *ARGS, "--parallel", "fsdp", "--ckpt", str(ck), "--ckpt-every", "5", "--resume"], procs=2, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "continuing from" in r.stdout and "step 15" in r.stdout
    a, b = _final_state(fsdp_run / "ck"), _final_state(ck)
    assert a["progress"] == b["progress"] == {"step": 24, "epoch": 1, "batch": 12}
    for part in ("model", "optimizer"):
        fa, fb = _flat(a[part]), _flat(b[part])
        assert fa.keys() == fb.keys()
        for k, v in fa.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, fb[k]), k
            else:
                assert v == fb[k], k
    assert_same(a["ranks"], b["ranks"])  # RNG states and loader positions of both ranks


@pytest.mark.parametrize("procs", [1, 3])
def test_resume_on_another_world_size(store: str, fsdp_run: Path, tmp_path: Path, procs: int) -> None:
    ck = _resumable_copy(fsdp_run, tmp_path, 15)
    m = tmp_path / "m.jsonl"
    idx = tmp_path / "idx.jsonl"
    r = run_trainer(["--data", store, *ARGS, "--parallel", "fsdp", "--ckpt", str(ck), "--ckpt-every", "5", "--resume", "--metrics", str(m), "--log-indices", str(idx)], procs=procs, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "continuing from" in r.stdout
    steps_per_epoch = -(-384 // (16 * procs))
    # Saved at epoch 2, batch 3 of 12 (2 ranks): continues at batch 3·2/W' of the W' plan.
    first = min(_losses(m))
    assert first == steps_per_epoch + (3 * 2) // procs + 1
    # The interrupted epoch: what the 2 ranks consumed before step 15 plus what the W' ranks
    # consumed after the resume is every training sample exactly once (elastic loader resume).
    before = [
        i
        for rec in _indices(fsdp_run / "idx.jsonl", 2)
        if rec["epoch"] == 1 and rec["step"] <= 15
        for i in rec["index"]
    ]
    after = [i for rec in _indices(idx, procs) if rec["epoch"] == 1 for i in rec["index"]]
    assert len(before) == 3 * 2 * 16
    assert sorted(before + after) == list(range(384))
    mine, uninterrupted = _summary(m), _summary(fsdp_run / "m.jsonl")
    assert mine["eval_loss"] == pytest.approx(uninterrupted["eval_loss"], rel=RESHARD_LOSS_RTOL)
    assert abs(mine["eval_acc"] - uninterrupted["eval_acc"]) <= 0.02
    final = _final_state(ck)
    assert len(final["ranks"]) == procs and final["progress"]["step"] == 2 * steps_per_epoch


def test_sharded_save_on_an_s3_server_loads_whole(tmp_path: Path, s3_server: S3Server) -> None:
    # Two ranks write their shards of one checkpoint to the loopback S3 server; this process loads
    # it whole from there (every shard's chunks, verified) and compares it with the full tensors.
    # Resharding onto other world sizes reads the same objects by the same plan; it runs locally
    # in test_reshard_onto_three_ranks_reads_its_rows.
    bucket = s3_server.create_bucket()
    env = client_env(s3_server.endpoint)
    r = torchrun(2, CHILD, "save", str(tmp_path), env={**env, "HPSTORE_TEST_CKPT_URL": f"s3://{bucket}/ck"})
    assert r.returncode == 0, r.stderr[-3000:]
    keys = bucket_objects(s3_server, bucket)
    assert any(k.startswith("ck/step-") and k.endswith("manifest.json") for k in keys), keys
    assert not (tmp_path / "ck").exists()  # nothing went to the local directory
    full = np.load(tmp_path / "full.npz")
    state = Checkpointer(f"s3://{bucket}/ck", storage_options=s3_server.storage_options()).load()
    flat = _flat({"model": state["model"], "optim": state["optim"]})
    assert full.files and set(full.files) <= set(flat)
    for name in full.files:
        assert np.array_equal(flat[name].numpy(), full[name]), name
    assert [r["rank"] for r in state["rank"]] == [0, 1]
