"""``--model resnet`` from a store of encoded images: random resized crops for training, centre
crops for evaluation, data wait reported; in a real trainer process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hpstore
from tests.support.images import image_folder
from tools.ingest import main as ingest
from trainer.images import transforms
from trainer.models import ResNet, build_model
from trainer.task import build_task

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("imgtrain")
    src = image_folder(
        str(root / "src"), classes=3, per_class=16, sizes=(40, 80), kinds=("jpeg", "jpeg", "png")
    )
    assert ingest([src, str(root / "st"), "--holdout", "0.25", "--no-progress"]) == 0
    return str(root / "st")


def test_task_and_transforms_for_encoded_images(store: str) -> None:
    s = hpstore.open(store)
    train, test = s.split("train"), s.split("test")
    task = build_task(train, [test], "image", "label", image_size=24)
    assert task.input_shape == (3, 24, 24) and task.input_dtype == "uint8" and task.num_classes == 3
    assert 0.1 < task.mean < 0.9 and task.std > 0.05
    t_train = transforms(train, "image", 24, train=True)
    t_eval = transforms(test, "image", 24, train=False)
    assert t_train is not None and type(t_train["image"]).__name__ == "RandomResizedCrop"
    assert t_eval is not None and type(t_eval["image"]).__name__ == "CenterCrop"
    model = build_model("resnet", task)
    assert isinstance(model, ResNet)
    assert model(torch.zeros(2, 3, 24, 24, dtype=torch.uint8)).shape == (2, 3)


def test_resnet_trains_from_jpeg_store_in_a_process(store: str, tmp_path: Path) -> None:
    metrics = tmp_path / "m.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "trainer", "--data", store, "--model", "resnet", "--image-size", "16"]
    cmd += ["--epochs", "2", "--batch-size", "12", "--log-every", "1", "--metrics", str(metrics)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "uint8[3, 16, 16]" in r.stdout and "data wait" in r.stdout
    recs = [json.loads(line) for line in metrics.read_text().splitlines()]
    epochs = [x for x in recs if x["kind"] == "epoch"]
    assert len(epochs) == 2 and all(e["eval_samples"] == 12 and 0 <= e["eval_acc"] <= 1 for e in epochs)
    train = [x for x in recs if x["kind"] == "train"]
    assert len(train) == 6 and all(0 <= x["data_wait_frac"] <= 1 for x in train)
