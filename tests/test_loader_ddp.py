"""A real two-process gloo run: each rank's loader takes its place from torch.distributed, and across
both ranks every sample appears exactly once per epoch, with equal step counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from hpstore.format.writer import Layout, StoreWriter
from hpstore.storage.local import LocalStorage

ROOT = Path(__file__).resolve().parents[1]
N = 1001  # odd: the last batch is short and one sample wraps around


def test_two_gloo_ranks_split_every_epoch_exactly(tmp_path: Path) -> None:
    store = tmp_path / "store"
    with StoreWriter(LocalStorage(str(store)), layout=Layout(chunk_bytes=2048, shard_bytes=8192)) as w:
        sw = w.split("train")
        sw.append({"x": np.arange(N, dtype=np.int64), "y": np.zeros((N, 3), np.float32)})
        w.add_split(sw)
        w.commit()
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += [str(ROOT / "tests/support/ddp_loader.py"), str(store), str(out), "32", "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    for epoch in range(2):
        steps = [r["epochs"][epoch] for r in ranks]
        assert len(steps[0]) == len(steps[1]) == ranks[0]["len"] == 16  # ceil(ceil(1001 / 2) / 32)
        assert [len(s) for s in steps[0]] == [len(s) for s in steps[1]]
        everything = [i for r in steps for s in r for i in s]
        counts = np.bincount(everything, minlength=N)
        assert counts.min() == 1 and len(everything) == N + 1  # one wrap-around duplicate
        assert not set(i for s in steps[0] for i in s) & set(i for s in steps[1] for i in s) - {
            i for i in range(N) if counts[i] > 1
        }
    assert ranks[0]["epochs"][0] != ranks[0]["epochs"][1]
