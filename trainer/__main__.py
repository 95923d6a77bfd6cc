"""``python -m trainer ...`` and ``torchrun --nproc-per-node N -m trainer ...``.

User mistakes (a bad flag, a missing field or split, an unreachable store, an incompatible
checkpoint) end with one line on stderr and exit status 1; argparse's own usage errors exit 2.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from hpstore.errors import HpstoreError
from hpstore.options import UsageError
from trainer.config import parse_args


def main(argv: Sequence[str] | None = None) -> int:
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    prefix = f"python -m trainer: error{f' (rank {rank})' if world > 1 else ''}"
    try:
        cfg = parse_args(argv)
        from trainer.train import summary_line, train  # after parsing: --help and usage errors stay fast

        summary = train(cfg)
    except UsageError as exc:
        print(f"{prefix}: {exc}", file=sys.stderr, flush=True)
        return 2
    except (HpstoreError, OSError) as exc:
        print(f"{prefix}: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr, flush=True)
        return 130
    if rank == 0:
        print(summary_line(summary), flush=True)  # the run's last line
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
