"""The trainer's pieces, its errors and its committed loss baseline, on a real (tiny) store.

Whole runs on one and two processes, their metrics and kill-and-resume exactness are in
``test_trainer_runs.py``. Data: a few hundred 10x10 images, so everything stays fast on a busy
2-core machine.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import hpstore
from hpstore.errors import InputError
from tests.support.trainer_store import CLASSES, write_image_store
from trainer.__main__ import main as trainer_main
from trainer.config import TrainConfig, parse_args, parse_size
from trainer.models import build_model, image_layout
from trainer.task import Task, build_task

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / "tests" / "baselines" / "trainer_loss.json"
BASELINE_ARGS = ["--model", "mlp", "--epochs", "2", "--batch-size", "32", "--seed", "0", "--lr", "0.003", "--log-every", "1"]  # fmt: skip


def trainer_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    return env


def run_trainer(args: list[str], *, procs: int = 1, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    if procs == 1:
        cmd = [sys.executable, "-m", "trainer", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", "-m", "trainer", *args]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, env=trainer_env(), capture_output=True, text=True, timeout=timeout)


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_image_store(tmp_path_factory.mktemp("trainer") / "store")


# -- pieces ----------------------------------------------------------------------------------------


def test_config_parses_and_validates() -> None:
    cfg = parse_args(
        ["--data", "s3://b/x", "--cache-bytes", "1.5G", "--prefetch-bytes", "64M", "--storage-option", "anon=true",
         "--storage-option", "endpoint_url=http://127.0.0.1:9000", "--eval-split", "none", "--amp", "bf16"]
    )  # fmt: skip
    assert cfg.cache_bytes == int(1.5 * 2**30) and cfg.prefetch_bytes == 64 << 20
    assert cfg.storage_options == {"anon": True, "endpoint_url": "http://127.0.0.1:9000"}
    assert cfg.eval_split is None and cfg.amp == "bf16" and cfg.model == "cnn"
    assert parse_size("4096") == 4096 and parse_size("2KiB") == 2048
    with pytest.raises(InputError, match="not a size"):
        parse_size("lots")
    with pytest.raises(InputError, match="--resume needs --ckpt"):
        TrainConfig(data="x", resume=True)
    with pytest.raises(InputError, match="--batch-size must be at least 1"):
        TrainConfig(data="x", batch_size=0)


def test_task_reads_shape_classes_and_rejects_bad_fields(store: str, tmp_path: Path) -> None:
    s = hpstore.open(store)
    task = build_task(s.split("train"), [s.split("test")], "image", "label")
    assert task.input_shape == (10, 10) and task.input_dtype == "uint8" and task.num_classes == CLASSES
    assert 0 < task.mean < 1 and task.std > 0
    with pytest.raises(InputError, match="label field 'image'"):
        build_task(s.split("train"), [], "image", "image")
    floats = hpstore.open(write_image_store(tmp_path / "f", train=64, test=0, label_dtype="float32"))
    with pytest.raises(InputError, match="expected one integer per sample"):
        build_task(floats.split("train"), [], "image", "label")


@pytest.mark.parametrize(
    ("shape", "layout"), [((28, 28), "hw"), ((3, 32, 32), "chw"), ((32, 32, 3), "hwc"), ((1, 8, 8), "chw")]
)
def test_models_take_the_stored_layout(shape: tuple[int, ...], layout: str) -> None:
    assert image_layout(shape)[0] == layout
    task = Task(
        input_field="image", target_field="label", input_shape=shape, input_dtype="uint8", num_classes=7,
        class_names=None, scale=1 / 255, mean=0.5, std=0.25,
    )  # fmt: skip
    x = torch.randint(0, 255, (5, *shape), dtype=torch.uint8)
    for name in ("mlp", "cnn"):
        assert build_model(name, task)(x).shape == (5, 7)
    with pytest.raises(InputError, match="try --model mlp"):
        build_model("cnn", Task(**{**task.__dict__, "input_shape": (100,)}))


def test_progress_bar_on_a_terminal_only(store: str) -> None:
    """On a real pseudo-terminal rank 0 draws a tqdm bar; piped output (every other test) gets lines."""
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    args = ["--data", store, "--model", "mlp", "--epochs", "1", "--batch-size", "64", "--eval-split", "none"]
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "trainer", *args], cwd=ROOT, env=trainer_env(), stdout=secondary,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
    finally:
        os.close(secondary)
    drawn = b""
    while True:
        try:
            data = os.read(primary, 4096)
        except OSError:  # the terminal closes once everything was read
            break
        if not data:
            break
        drawn += data
    os.close(primary)
    assert proc.wait(timeout=120) == 0
    assert b"6/6 [" in drawn and b"step/s" in drawn and b"samples/s, data wait" in drawn
    piped = run_trainer(args)
    assert piped.returncode == 0 and "step/s" not in piped.stdout and "|" in piped.stdout


# -- errors ----------------------------------------------------------------------------------------


def cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``python -m trainer ARGS`` in this process (no interpreter start-up): exit status and stderr."""
    code = trainer_main(args)
    return code, capsys.readouterr().err.strip()


def one_line_error(result: tuple[int, str], *needles: str, code: int = 2) -> None:
    """One line on stderr; exit 2 for input errors (every command's convention), 1 for I/O."""
    got, err = result
    assert got == code, err
    assert "\n" not in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


def test_clear_errors_for_bad_input(store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    one_line_error(cli(["--data", store, "--input", "pixels"], capsys), "no field 'pixels'", "train")
    one_line_error(cli(["--data", store, "--train-split", "validation"], capsys), "no split 'validation'")
    one_line_error(cli(["--data", store, "--eval-split", "dev"], capsys), "no split 'dev'")
    one_line_error(cli(["--data", str(tmp_path / "nothing")], capsys), "no committed store")
    floats = write_image_store(tmp_path / "f", train=64, test=0, label_dtype="float32")
    one_line_error(cli(["--data", floats], capsys), "label field 'label'", "integer")
    one_line_error(
        cli(["--data", "s3://bucket/store", "--storage-option", "endpoint_url=http://127.0.0.1:9",
             "--storage-option", "key=x", "--storage-option", "secret=y"], capsys),
        "s3://bucket/store", "Could not connect", code=1,
    )  # fmt: skip


def test_usage_errors_exit_2_in_a_real_process(store: str) -> None:
    r = run_trainer(["--data", store, "--batch-size", "0"])
    assert (
        r.returncode == 2
        and r.stderr.strip() == "python -m trainer: error: --batch-size must be at least 1, got 0"
    )
    r = run_trainer(["--data", store, "--model", "vit"])
    assert r.returncode == 2 and "invalid choice: 'vit'" in r.stderr


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--keep", "0"], "--keep must be at least 1"),
        (["--lr", "nan"], "--lr must be a finite number"),
        (["--lr", "inf"], "--lr must be a finite number"),
        (["--weight-decay", "nan"], "--weight-decay must be a finite number"),
        (["--step-delay", "nan"], "--step-delay must be a finite number"),
        (["--step-delay", "inf"], "--step-delay must be a finite number"),
        (["--lr", "-1"], "--lr must be positive"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
def test_bad_values_exit_2_with_one_line(
    store: str, capsys: pytest.CaptureFixture[str], flags: list[str], needle: str
) -> None:
    one_line_error(cli(["--data", store, *flags], capsys), needle)


def test_a_path_that_is_not_a_store_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("not a store")
    one_line_error(cli(["--data", str(tmp_path)], capsys), "no committed store")


def test_resume_refuses_a_checkpoint_of_another_model(
    store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ck = tmp_path / "ck"
    base = ["--data", store, "--epochs", "1", "--batch-size", "64", "--eval-split", "none", "--ckpt", str(ck)]
    assert cli([*base, "--model", "mlp", "--max-steps", "2"], capsys)[0] == 0
    one_line_error(
        cli([*base, "--model", "cnn", "--resume"], capsys),
        "is for a mlp on uint8[10, 10]",
        "this run builds a cnn",
    )
    # Without --resume, existing checkpoints are never overwritten.
    one_line_error(cli([*base, "--model", "mlp"], capsys), "already holds checkpoints", "--resume")


# -- the committed loss baseline ----------------------------------------------------------------


def test_fixed_seed_loss_matches_the_committed_baseline(store: str, tmp_path: Path) -> None:
    """A refactor must reproduce the per-step losses of this short CPU run (relative 1e-6)."""
    metrics = tmp_path / "m.jsonl"
    r = run_trainer(["--data", store, *BASELINE_ARGS, "--metrics", str(metrics)])
    assert r.returncode == 0, r.stderr
    recs = records(metrics)
    got = {
        "args": BASELINE_ARGS,
        "train_loss": [r["loss"] for r in recs if r["kind"] == "train"],
        "eval_loss": [r["eval_loss"] for r in recs if r["kind"] == "epoch"],
    }
    if os.environ.get("UPDATE_BASELINES"):
        BASELINE.parent.mkdir(exist_ok=True)
        BASELINE.write_text(json.dumps(got, indent=1) + "\n")
    want = json.loads(BASELINE.read_text())
    assert want["args"] == BASELINE_ARGS
    assert len(got["train_loss"]) == len(want["train_loss"]) == 24
    np.testing.assert_allclose(got["train_loss"], want["train_loss"], rtol=1e-6)
    np.testing.assert_allclose(got["eval_loss"], want["eval_loss"], rtol=1e-6)


def test_worker_processes_reproduce_the_committed_baseline(store: str, tmp_path: Path) -> None:
    """``--worker-kind processes``: the training loader's windows come from worker processes (pinned
    off the training thread's CPU) and the run is the same, loss for loss."""
    metrics = tmp_path / "m.jsonl"
    r = run_trainer(
        ["--data", store, *BASELINE_ARGS, "--metrics", str(metrics), "--worker-kind", "processes"]
    )
    assert r.returncode == 0, r.stderr
    want = json.loads(BASELINE.read_text())
    train_loss = [rec["loss"] for rec in records(metrics) if rec["kind"] == "train"]
    np.testing.assert_allclose(train_loss, want["train_loss"], rtol=1e-6)


def test_disk_cache_flag_keeps_training_chunks_on_disk(store: str, tmp_path: Path) -> None:
    """``--cache-dir`` gives the training loader a verified disk tier; the run still learns the same."""
    cache = tmp_path / "cache"
    metrics = tmp_path / "m.jsonl"
    r = run_trainer(["--data", store, *BASELINE_ARGS, "--metrics", str(metrics), "--cache-dir", str(cache)])
    assert r.returncode == 0, r.stderr
    kept = [p for p in cache.iterdir() if p.suffix == ".chunk"]
    assert kept and sum(p.stat().st_size for p in kept) > 0
    want = json.loads(BASELINE.read_text())
    train_loss = [rec["loss"] for rec in records(metrics) if rec["kind"] == "train"]
    np.testing.assert_allclose(train_loss, want["train_loss"], rtol=1e-6)
