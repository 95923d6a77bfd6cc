"""``--model gpt`` end to end on real text: a token store with a held-out split, two ranks (torchrun,
gloo, DDP), loss and validation loss reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tools.ingest import main as ingest_main

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT / "tests" / "data" / "text"


def text_store(tmp_path: Path) -> Path:
    """A byte-level token store of the shipped text (paragraphs as documents), 10 % held out."""
    docs = [p.strip() for f in sorted(TEXT.glob("*.txt")) for p in f.read_text().split("\n\n") if p.strip()]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    store = tmp_path / "store"
    assert (
        ingest_main([str(src), str(store), "--tokenizer", "byte", "--holdout", "0.1", "--no-progress"]) == 0
    )
    return store


def test_gpt_trains_on_two_ranks_with_validation(tmp_path: Path) -> None:
    store = text_store(tmp_path)
    metrics = tmp_path / "m.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "trainer",
    ]
    args = ["--data", str(store), "--model", "gpt", "--seq-len", "64", "--batch-size", "8", "--gpt-layers", "1",
            "--gpt-width", "32", "--gpt-heads", "2", "--max-steps", "6", "--log-every", "3", "--workers", "1",
            "--metrics", str(metrics)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "gpt (" in proc.stdout and "2 rank(s)" in proc.stdout
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    summary = records[-1]
    assert summary["kind"] == "summary" and summary["steps"] == 6
    # Samples are target tokens: 2 ranks × 8 windows × 64 targets per step.
    assert summary["samples"] == 6 * 2 * 8 * 64
    assert 0 < summary["eval_loss"] < 5.6  # below uniform over 257 ids (ln 257 = 5.55) after 6 steps
    assert summary["data_wait_frac"] is not None


def test_gpt_attention_never_crosses_documents_of_a_packed_window(tmp_path: Path) -> None:
    """A window packing two real documents gives, token for token, the logits of each document
    run alone: block-diagonal attention and positions restarting at the second document."""
    import numpy as np
    import torch

    import hpstore
    from trainer.lm import GPT
    from trainer.task import Task

    docs = [p.strip() for f in sorted(TEXT.glob("*.txt")) for p in f.read_text().split("\n\n") if p.strip()]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    store = tmp_path / "store"
    assert ingest_main([str(src), str(store), "--tokenizer", "byte", "--no-progress"]) == 0
    seq = 128
    view = hpstore.open(str(store)).split("train").windows("tokens", seq, respect_documents=True)
    lengths = view.lengths(np.arange(len(view)))
    assert lengths is not None
    batch = next(iter(hpstore.Loader(view, len(view), shuffle=False)))
    ids = batch["doc_ids"].numpy()
    k = next(k for k in range(len(view)) if ids[k, : lengths[k]].max() == 1)  # exactly two documents
    tokens = batch["tokens"][k : k + 1, :-1].int()
    seg = batch["doc_ids"][k : k + 1, :-1]
    cut = int((ids[k] == 0).sum())
    n = int(lengths[k]) - 1
    torch.manual_seed(0)
    task = Task(
        input_field="tokens", target_field="tokens", input_shape=(seq,), input_dtype="uint16",
        num_classes=257, class_names=None, scale=1.0, mean=0.0, std=1.0,
    )  # fmt: skip
    model = GPT(task, layers=2, heads=2, width=32).eval()
    with torch.no_grad():
        packed = model(tokens, seg)[:n]
        first = model(tokens[:, :cut])
        second = model(tokens[:, cut:n])
        crossing = model(tokens)[:n]  # plain causal attention over the whole window
    torch.testing.assert_close(packed[:cut], first, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[cut:], second, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(crossing[cut:], second, atol=1e-3)  # without segments it would cross


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _fsdp_rank(rank: int, args: list[str], a: str, b: str, ports: list[int], out: str) -> None:
    """One of 2 gloo ranks (``torch.multiprocessing``): the run to step 4 into ``a``, then, in the
    same process (one start-up instead of two torchrun launches), a resume from ``a``'s step 2 in
    ``b``. Each run is a whole ``python -m trainer`` main() with its own process group."""
    import shutil
    import time

    import torch

    from hpstore.checkpoint.plan import step_prefix
    from trainer.__main__ import main

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[0]), CUDA_VISIBLE_DEVICES="")
    if main([*args, "--ckpt", a, "--metrics", f"{out}/m.jsonl"]) != 0:
        raise SystemExit(f"rank {rank}: the first run failed")
    ready = Path(out) / "copied"
    if rank == 0:  # the checkpoints as a run killed right after committing step 2 leaves them
        shutil.copytree(a, b)
        shutil.rmtree(Path(b) / step_prefix(4))
        ready.touch()
    while not ready.exists():
        time.sleep(0.05)
    os.environ["MASTER_PORT"] = str(ports[1])
    if main([*args, "--ckpt", b, "--resume", "--metrics", f"{out}/m2.jsonl"]) != 0:
        raise SystemExit(f"rank {rank}: the resumed run failed")


def test_gpt_under_fsdp_on_packed_windows_resumes_bit_exact(tmp_path: Path) -> None:
    """``--model gpt --parallel fsdp --respect-documents`` on 2 gloo ranks: the tied embedding /
    output layer is sharded once (in the root group), 4 steps with a sharded checkpoint every 2;
    a resume from step 2 ends bit for bit where the uninterrupted run ends."""
    import torch
    import torch.multiprocessing as mp

    from hpstore.checkpoint import Checkpointer

    store = text_store(tmp_path)
    args = ["--data", str(store), "--model", "gpt", "--seq-len", "64", "--batch-size", "4", "--gpt-layers", "1",
            "--gpt-width", "32", "--gpt-heads", "2", "--max-steps", "4", "--log-every", "1", "--workers", "1",
            "--parallel", "fsdp", "--respect-documents", "--ckpt-every", "2", "--seed", "5"]  # fmt: skip
    a, b = tmp_path / "a", tmp_path / "b"
    ports = [_free_port(), _free_port()]
    mp.spawn(_fsdp_rank, args=(args, str(a), str(b), ports, str(tmp_path)), nprocs=2, join=True)
    summary = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()][-1]
    assert summary["steps"] == 4 and 0 < summary["eval_loss"] < 5.6
    resumed = [json.loads(line) for line in (tmp_path / "m2.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed if r["kind"] == "train"] == [3, 4]  # it continued from step 2
    one, two = (Checkpointer(str(d)).load(step=4) for d in (a, b))
    assert one["progress"] == two["progress"]
    model = one["model"]
    assert torch.equal(model["tok.weight"], model["head.weight"])  # still tied after sharding
    for part in ("model", "optimizer"):
        for key, value in one[part].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, two[part][key]), key
