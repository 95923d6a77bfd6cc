"""The CUDA path: pinned batches, non-blocking copies, pinned checkpoint staging, NCCL training.

Skipped where no GPU is present (CI has none); run on a GPU machine with ``pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import hpstore
from tests.support.trainer_store import write_image_store

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ROOT = Path(__file__).resolve().parent.parent


def test_loader_batches_are_pinned_and_copy_non_blocking(tmp_path: Path) -> None:
    ds = hpstore.open(write_image_store(tmp_path / "s", train=1000, test=0)).split("train")
    loader = hpstore.Loader(ds, 64, seed=3, with_index=True)
    assert loader.pin_memory
    stream = torch.cuda.Stream()
    seen = 0
    for batch in loader:
        assert batch["image"].is_pinned() and batch["label"].is_pinned()
        with torch.cuda.stream(stream):
            image = batch["image"].to("cuda", non_blocking=True)
        stream.synchronize()
        index = batch["index"].numpy()
        expect = ds.read(index, ["image"])["image"]
        assert np.array_equal(image.cpu().numpy(), expect)
        seen += len(index)
    assert seen == len(ds)


def test_checkpoint_of_cuda_state_snapshots_at_save(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10)).cuda()
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(8, 256, device="cuda")).sum().backward()
    opt.step()
    extra = {
        "bf16": torch.randn(33, 7, device="cuda").to(torch.bfloat16),
        "empty": torch.zeros(0, device="cuda"),
    }
    state = {"model": model.state_dict(), "optim": opt.state_dict(), "extra": extra}
    expected = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    ck = hpstore.Checkpointer(str(tmp_path / "ck"), keep=2)
    ck.save(1, state)
    with torch.no_grad():  # training goes on while the writer persists
        for p in model.parameters():
            p.add_(1.0)
    ck.wait()
    loaded = ck.load(map_location="cuda")
    for k, v in expected.items():
        got = loaded["model"][k]
        assert got.device.type == "cuda"
        assert torch.equal(got.cpu(), v)
    assert torch.equal(loaded["extra"]["bf16"].cpu(), extra["bf16"].cpu())
    assert loaded["extra"]["bf16"].dtype == torch.bfloat16
    assert loaded["extra"]["empty"].shape == (0,)


def _run(args: list[str], tmp_path: Path) -> str:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_trainer_on_cuda_with_nccl_and_bf16(tmp_path: Path) -> None:
    store = write_image_store(tmp_path / "s", train=2048, test=256)
    out = _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "1",
            "-m",
            "trainer",
            "--data",
            store,
            "--model",
            "cnn",
            "--epochs",
            "2",
            "--batch-size",
            "64",
            "--device",
            "cuda",
            "--amp",
            "bf16",
            "--ckpt",
            str(tmp_path / "ck"),
            "--ckpt-every",
            "10",
            "--metrics",
            str(tmp_path / "m.jsonl"),
        ],
        tmp_path,
    )
    assert "on cuda" in out and "done:" in out  # under torchrun on CUDA the process group is NCCL
    assert (tmp_path / "m.jsonl").read_text().strip()
    resumed = _run(
        [
            sys.executable,
            "-m",
            "trainer",
            "--data",
            store,
            "--model",
            "cnn",
            "--epochs",
            "3",
            "--batch-size",
            "64",
            "--device",
            "cuda",
            "--ckpt",
            str(tmp_path / "ck"),
            "--resume",
        ],
        tmp_path,
    )
    assert "resume: continuing from" in resumed and "done:" in resumed
