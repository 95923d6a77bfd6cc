"""Sharded checkpoints (FSDP2, 2 gloo ranks): hpstore vs ``torch.distributed.checkpoint`` (DCP).

Side by side in one run, on the same state and the same directory: an FSDP2-wrapped stack of
``Linear`` layers (widths chosen so that dim 0 splits unevenly over 3 ranks) after one AdamW
step, so model + Adam moments total about 200 MB (``--quick``: ~50 MB and only the 2 → 1 reshard; ``HPSTORE_BENCH_SHARDED_GB=1``
adds ~1 GB). Every figure is the slowest rank's (a checkpoint is done when its last rank is).

- **stall**: seconds ``Checkpointer.save`` holds the training thread (warm: staging buffer made by
  an earlier save) vs ``dcp.async_save`` (its blocking part) and vs ``dcp.save`` (all of it).
  Targets: ≤ async_save's, ≤ 0.1× ``dcp.save``.
- **persist**: state bytes / seconds from ``save`` until the manifest is committed (the slowest
  rank's; retention's deletion of older checkpoints afterwards is not counted) vs ``dcp.save``
  (``FileSystemWriter`` defaults: one file per rank, fsync). Target: ≥ 1.2× ``dcp.save``.
- **reshard load 2 → 1 and 2 → 3**: state bytes / seconds of ``load(target=…)`` onto a fresh FSDP
  model of 1 and 3 ranks (page cache dropped or evicted first, as the note says) vs ``dcp.load`` of
  the same checkpoint into the same target. Both results are compared value for value.
  Target: ≥ 1.0× ``dcp.load``.
- **state memory per rank**: bytes of parameters + gradients + Adam moments one rank holds under
  FSDP at W=2, vs DDP (every rank holds all of them: the global sizes). Target: ≤ 0.6×.

Each job is a real ``torchrun`` (gloo, CPU) launched from here; ``python -m benchmarks.sharded
--worker MODE DIR MB`` is the worker.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.cache import drop_page_cache
from benchmarks.common import BenchConfig, Figure, Progress, main

BENCH = "sharded"
MB = 1e6
REPO = Path(__file__).resolve().parent.parent


def _layers(total_mb: float) -> list[tuple[int, int]]:
    """(in, out) of Linear layers whose weights + two Adam moments are about ``total_mb``; 1021
    output rows: uneven on 2 and 3 ranks."""
    per_layer = 3 * 1021 * 1024 * 4 / MB
    return [(1024, 1021) if i % 2 == 0 else (1021, 1024) for i in range(max(2, round(total_mb / per_layer)))]


# -- the worker (runs under torchrun) -----------------------------------------------------------


def _worker(mode: str, root: Path, total_mb: float, repeats: int) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.fsdp import fully_shard

    from hpstore.checkpoint import Checkpointer

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(i, o, bias=False) for i, o in _layers(total_mb)))
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 1024)).square().mean().backward()
    opt.step()
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}

    def local_bytes(t: Any) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    tensors = [p for p in model.parameters()] + [v for s in opt.state.values() for v in s.values()]
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    fsdp_bytes = sum(local_bytes(t) for t in tensors + grads)
    ddp_bytes = sum(t.numel() * t.element_size() for t in tensors + grads)  # global sizes
    nbytes = sum(t.numel() * t.element_size() for t in tensors)  # the checkpoint's bytes

    def slowest(x: float) -> float:
        t = torch.tensor([x], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    out: dict[str, Any] = {"bytes": nbytes, "world": world}
    if mode == "save":
        ck = Checkpointer(str(root / "hp"), keep=2)
        ck.save(0, state)  # warm: plan and staging buffer made
        ck.wait()
        # async_save's background thread runs DCP's planning collectives: on their own group, as DCP
        # advises, so they never meet this thread's collectives (hpstore's commit has its own too).
        dcp_group = dist.new_group(backend="gloo")
        res: dict[str, list[float]] = {
            k: [] for k in ("stall", "persist", "dcp_save", "async_stall", "async_total")
        }
        for r in range(repeats):
            os.sync()
            dist.barrier()
            t0 = time.perf_counter()
            ck.save(r + 1, state)
            stall = time.perf_counter() - t0
            ck.wait()
            committed = ck.stats[-1].stall_s + (ck.stats[-1].persist_s or 0.0)  # not retention's deletes
            res["stall"].append(slowest(stall))
            res["persist"].append(slowest(committed))
            for kind in ("sync", "async"):
                path = root / f"dcp-{kind}"
                if rank == 0:
                    shutil.rmtree(path, ignore_errors=True)
                os.sync()
                dist.barrier()
                t0 = time.perf_counter()
                if kind == "sync":
                    dcp.save(state, checkpoint_id=str(path))
                    res["dcp_save"].append(slowest(time.perf_counter() - t0))
                else:
                    fut = dcp.async_save(state, checkpoint_id=str(path), process_group=dcp_group)
                    res["async_stall"].append(slowest(time.perf_counter() - t0))
                    fut.result()  # type: ignore[union-attr]
                    res["async_total"].append(slowest(time.perf_counter() - t0))
        ck.close()
        out.update(res, fsdp_state_bytes=slowest(fsdp_bytes), ddp_state_bytes=ddp_bytes)
    else:
        ck = Checkpointer(str(root / "hp"))
        res = {"hp_load": [], "dcp_load": []}
        for _ in range(repeats):
            for kind in ("hp", "dcp"):
                if rank == 0:
                    out["drop"] = drop_page_cache([root]).note
                dist.barrier()
                t0 = time.perf_counter()
                if kind == "hp":
                    loaded = ck.load(target=state)
                else:
                    msd2, osd2 = get_state_dict(model, opt)
                    theirs: dict[str, Any] = {"model": msd2, "optim": osd2}
                    dcp.load(theirs, checkpoint_id=str(root / "dcp-sync"))
                res[f"{kind}_load"].append(slowest(time.perf_counter() - t0))
        mine: dict[str, Any] = loaded["model"]
        for name in msd:  # the same values from both loaders
            assert torch.equal(mine[name].to_local(), theirs["model"][name].to_local()), name
        out.update(res)
    if rank == 0:
        (root / f"{mode}-{world}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


# -- the benchmark --------------------------------------------------------------------------------


def _torchrun(procs: int, mode: str, root: Path, total_mb: float, repeats: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
           "-m", "benchmarks.sharded", "--worker", mode, str(root), str(total_mb), str(repeats)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"{mode} on {procs} ranks failed: {r.stderr[-2000:]}")
    return dict(json.loads((root / f"{mode}-{procs}.json").read_text()))


def run_case(cfg: BenchConfig, total_mb: float, label: str, progress: Progress) -> list[Figure]:
    root = (cfg.data_dir / BENCH / label.replace(" ", "")).resolve()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    try:
        progress(f"{label}: 2 ranks: hpstore save, dcp.save, dcp.async_save ({cfg.repeats} repeats)")
        s = _torchrun(2, "save", root, total_mb, cfg.repeats)
        loads = {}
        for procs in (1,) if cfg.quick else (1, 3):  # --quick: one reshard (each job starts torch)
            progress(f"{label}: reshard 2 -> {procs}: hpstore load vs dcp.load")
            loads[procs] = _torchrun(procs, "load", root, total_mb, cfg.repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    nbytes = s["bytes"]
    mbs = [nbytes / MB / t for t in s["persist"]]
    extra = {"bytes": nbytes, "ranks": 2, "backend": "gloo (CPU)"}
    size = f"{label} FSDP+Adam, 2 ranks"
    figures = [
        Figure(
            bench=BENCH, name=f"save stall vs dcp.async_save, {size}", unit="s", values=s["stall"],
            higher_is_better=False, baseline="dcp.async_save (blocking part)", baseline_values=s["async_stall"],
            target="≤ 1× async_save", extra={**extra, "async_total_s": statistics.median(s["async_total"])},
        ),
        Figure(
            bench=BENCH, name=f"save stall vs dcp.save, {size}", unit="s", values=s["stall"],
            higher_is_better=False, baseline="dcp.save", baseline_values=s["dcp_save"],
            target="≤ 0.1× dcp.save", extra=extra,
        ),
        Figure(
            bench=BENCH, name=f"persist, {size}", unit="MB/s", values=mbs, baseline="dcp.save",
            baseline_values=[nbytes / MB / t for t in s["dcp_save"]], target="≥ 1.2× dcp.save", extra=extra,
        ),
        Figure(
            bench=BENCH, name=f"state memory per rank, FSDP vs DDP, {size}", unit="B",
            values=[s["fsdp_state_bytes"]], higher_is_better=False, baseline="DDP (every rank holds all)",
            baseline_values=[s["ddp_state_bytes"]], target="≤ 0.6× DDP", extra=extra,
        ),
    ]  # fmt: skip
    for procs, ld in loads.items():
        figures.append(
            Figure(
                bench=BENCH,
                name=f"reshard load 2 -> {procs}, {label}",
                unit="MB/s",
                values=[nbytes / MB / t for t in ld["hp_load"]],
                baseline="dcp.load, same target",
                baseline_values=[nbytes / MB / t for t in ld["dcp_load"]],
                target="≥ 1.0× dcp.load",
                extra={**extra, "note": ld.get("drop", "")},
            )
        )
    return figures


def run(cfg: BenchConfig, progress: Progress) -> list[Figure]:
    cases = [(50.0, "50 MB")] if cfg.quick else [(200.0, "200 MB")]
    if not cfg.quick and os.environ.get("HPSTORE_BENCH_SHARDED_GB") == "1":
        cases.append((1000.0, "1 GB"))
    figures: list[Figure] = []
    for total_mb, label in cases:
        figures += run_case(cfg, total_mb, label, progress)
    return figures


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], Path(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]))
        raise SystemExit(0)
    raise SystemExit(main(run))
