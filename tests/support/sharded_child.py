"""Child of the sharded-checkpoint tests, run under torchrun (gloo, CPU).

``save DIR``: an FSDP2 model with uneven and empty shards plus AdamW state, one real step; saves
it sharded as step 1 with a ``PerRank`` value, and writes the full tensors (``full_tensor()``) to
``DIR/full.npz`` (rank 0) for the parent to compare with.

``load DIR``: the same model on this world size as the target; loads step 1 onto it, checks every
local shard against ``DIR/full.npz`` rows and the per-rank values, applies it with
``set_state_dict`` and runs a step.

With ``HPSTORE_TEST_CKPT_URL`` set (``s3://bucket/ck``, endpoint and keys from ``AWS_*``), ``save``
and ``load`` use that checkpoint instead of ``DIR/ck``.

``loop DIR``: saves a ~24 MB sharded state again and again (the parent SIGKILLs a rank).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

from hpstore.checkpoint import Checkpointer, CheckpointLayout, PerRank

LAYOUT = CheckpointLayout(chunk_bytes=4096, workers=2)


def build(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    # 37 rows: uneven on 2 and 3 ranks; 1 row: ranks > 0 hold none; 300x40 floats: several chunks.
    model = torch.nn.Sequential(
        torch.nn.Linear(40, 300),
        torch.nn.ReLU(),
        torch.nn.Linear(300, 37),
        torch.nn.ReLU(),
        torch.nn.Linear(37, 1),
    )
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt


def step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> float:
    g = torch.Generator().manual_seed(1)
    loss = model(torch.randn(8, 40, generator=g)).square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    return float(loss)


def flat(sd: dict[str, object], prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in sd.items():
        name = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flat(v, name))
        else:
            out[name] = v
    return out


def main(mode: str, root: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, opt = build()
    # HPSTORE_TEST_CKPT_URL: the checkpoint on an object store (endpoint and keys from AWS_*).
    ck = Checkpointer(os.environ.get("HPSTORE_TEST_CKPT_URL", str(root / "ck")), layout=LAYOUT)
    if mode == "save":
        step(model, opt)
        msd, osd = get_state_dict(model, opt)
        state = {
            "model": msd,
            "optim": osd,
            "step": 1,
            "rank": PerRank({"rank": rank, "t": torch.full((3,), rank)}),
        }
        ck.save(1, state)
        ck.wait()
        full = {
            k: v.full_tensor().numpy()
            for k, v in flat({"model": msd, "optim": osd}).items()
            if hasattr(v, "full_tensor")
        }
        if rank == 0:
            np.savez(root / "full.npz", **{k.replace("/", "|"): v for k, v in full.items()})
    elif mode == "load":
        msd, osd = get_state_dict(model, opt)
        state = ck.load(target={"model": msd, "optim": osd})
        full = np.load(root / "full.npz")
        for k, v in flat({"model": state["model"], "optim": state["optim"]}).items():
            if not hasattr(v, "to_local"):
                continue
            want = full[k.replace("/", "|")]
            n = want.shape[0]
            s = -(-n // world)
            rows = want[min(n, rank * s) : min(n, (rank + 1) * s)]
            assert np.array_equal(v.to_local().numpy(), rows), k
            assert v.placements == flat({"model": msd, "optim": osd})[k].placements, k  # type: ignore[attr-defined]
        assert [r["rank"] for r in state["rank"]] == [0, 1], state["rank"]
        assert all(torch.equal(r["t"], torch.full((3,), i)) for i, r in enumerate(state["rank"]))
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        step(model, opt)
    elif mode == "loop":
        big = torch.nn.Linear(1024, 3000)  # 12 MB of weights, + Adam moments
        fully_shard(big)
        bopt = torch.optim.AdamW(big.parameters(), lr=1e-3)
        big(torch.randn(2, 1024)).sum().backward()
        bopt.step()
        ck = Checkpointer(str(root / "ck"), keep=2)
        for i in range(1, 10_000):
            msd, osd = get_state_dict(big, bopt)
            ck.save(i, {"model": msd, "optim": osd, "i": i, "rank": PerRank(rank)})
            ck.wait()
            if rank == 0:  # atomically: the parent polls it
                (root / "committed.tmp").write_text(str(i))
                os.replace(root / "committed.tmp", root / "committed")
    ck.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
