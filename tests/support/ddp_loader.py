"""One rank of a real multi-process run: read a store with ``hpstore.Loader`` under torch.distributed.

Run with ``python -m torch.distributed.run --standalone --nproc-per-node N tests/support/ddp_loader.py
STORE OUT_DIR BATCH EPOCHS``. The loader takes rank and world size from the process group; every step
does an ``all_reduce`` (as DDP does), so unequal step counts would hang and be caught by the caller's
timeout. Each rank writes the sample indices it saw, per epoch and step, to ``OUT_DIR/rank<r>.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import hpstore


def main(store: str, out_dir: str, batch_size: int, epochs: int) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    loader = hpstore.Loader(hpstore.open(store).split("train"), batch_size, with_index=True, num_workers=1)
    seen: list[list[list[int]]] = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        steps: list[list[int]] = []
        for batch in loader:
            steps.append(batch["index"].tolist())
            total = torch.tensor([len(steps[-1])])
            dist.all_reduce(total)  # the collective every DDP step makes
        seen.append(steps)
    result = {"rank": rank, "world_size": loader.world_size, "len": len(loader), "epochs": seen}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
