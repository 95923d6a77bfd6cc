"""``python -m trainer ...`` and ``torchrun --nproc-per-node N -m trainer ...``.

Exit status, the same convention as ``tools.ingest`` and ``tools.inspect``: 0 done; 2 a usage or
input error (a bad flag or value, a missing store, field or split, an incompatible checkpoint);
1 an I/O failure (an unreachable store, a disk error); 130 interrupted. Every error is one line
on stderr, never a traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from hpstore.errors import HpstoreError, StorageError
from trainer.config import parse_args


def main(argv: Sequence[str] | None = None) -> int:
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    prefix = f"python -m trainer: error{f' (rank {rank})' if world > 1 else ''}"
    try:
        cfg = parse_args(argv)
        from trainer.train import summary_line, train  # after parsing: --help and usage errors stay fast

        summary = train(cfg)
    except (HpstoreError, OSError) as exc:
        print(f"{prefix}: {' '.join(str(exc).split())}", file=sys.stderr, flush=True)
        return 1 if isinstance(exc, StorageError) or not isinstance(exc, HpstoreError) else 2
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr, flush=True)
        return 130
    if rank == 0:
        print(summary_line(summary), flush=True)  # the run's last line
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
