"""A child process for checkpoint crash and disk-full tests.

``python -m tests.support.ckpt_child loop DIR``: saves steps after the latest one, forever; every
value in step ``s`` is a function of ``s`` (see ``expected``), so the parent can check that the
checkpoint it loads after a SIGKILL is the one that step wrote. Prints ``saved <step>`` as each
save() returns.

``python -m tests.support.ckpt_child full DIR LIMIT``: runs with a file-size limit of LIMIT bytes
(RLIMIT_FSIZE: writes past it fail with EFBIG, as on a full disk) and reports, as JSON on stdout,
what each step of the disk-full scenario observed.
"""

from __future__ import annotations

import json
import resource
import signal
import sys
from typing import Any

import torch

from hpstore.checkpoint.checkpointer import Checkpointer, CheckpointLayout

LAYOUT = CheckpointLayout(chunk_bytes=64 << 10, workers=4)


def state_for(step: int) -> dict[str, Any]:
    """About 3 MiB in 10 arrays, every value derived from ``step``."""
    return {
        "model": {f"layer{i}.weight": torch.full((256, 256), float(step + i)) for i in range(8)},
        "big": torch.full((512, 512), step, dtype=torch.int32),
        "bf16": torch.full((64,), float(step % 200), dtype=torch.bfloat16),
        "progress": {"step": step, "history": list(range(step % 50))},
    }


def expected(state: dict[str, Any], step: int) -> bool:
    want = state_for(step)
    return (
        all(torch.equal(state["model"][k], v) for k, v in want["model"].items())
        and torch.equal(state["big"], want["big"])
        and torch.equal(state["bf16"], want["bf16"])
        and state["progress"] == want["progress"]
    )


def loop(root: str) -> None:
    ck = Checkpointer(root, keep=2, layout=LAYOUT)
    step = (ck.latest() or 0) + 1
    while True:
        ck.save(step, state_for(step))
        print(f"saved {step}", flush=True)
        step += 1


def full(root: str, limit: int) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of dying
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    out: dict[str, Any] = {}
    ck = Checkpointer(root, keep=3, layout=LAYOUT)
    ck.save(1, {"w": torch.ones(100)})
    ck.wait()
    big = {"w": torch.ones(limit // 2)}  # 2x the limit in one chunk
    big_layout = Checkpointer(root, keep=3, layout=CheckpointLayout(chunk_bytes=4 * limit, workers=2))
    big_layout.save(2, big)
    out["wait"] = _error(big_layout.wait)
    big_layout.save(3, big)
    out["next_save"] = _error(lambda: big_layout.save(4, {"w": torch.ones(1)}))
    big_layout.save(4, {"w": torch.ones(1)})  # the error was raised once; saving works again
    out["after"] = _error(big_layout.wait)
    out["steps"] = ck.steps()
    out["step1"] = ck.load(1)["w"].tolist() == [1.0] * 100
    print(json.dumps(out), flush=True)


def _error(fn: Any) -> str | None:
    try:
        fn()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


if __name__ == "__main__":
    if sys.argv[1] == "loop":
        loop(sys.argv[2])
    else:
        full(sys.argv[2], int(sys.argv[3]))
