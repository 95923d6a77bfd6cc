"""One ``tools.ingest`` run in a child process, timed and CPU-accounted from inside it.

``python -m benchmarks.ingest_child '{"src": ..., "dst": ..., ...}'`` runs ``ingest(IngestConfig(**json))``
and prints one JSON line: ``seconds`` (the ingest's own wall time, imports excluded), ``bytes_in``,
and ``cpu_s``, the process's user + system CPU seconds over the same span (``getrusage(RUSAGE_SELF)``,
all its threads: encode threads included). ``cpu_s / seconds`` is how many cores the run kept busy.
Under ``--engine dask`` the ``distributed`` import (about 1 s, once per job) happens before the clock
starts, like the ``tools.ingest`` import. A child, not the benchmark's own process, so nothing else the benchmark runs (a LocalCluster's
scheduler) is counted with it.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_child(**options: Any) -> dict[str, float]:
    """Run one ingest in a fresh interpreter; its JSON line as a dict."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.ingest_child", json.dumps(options)],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    if out.returncode != 0:
        raise RuntimeError(f"ingest child failed ({out.returncode}): {out.stderr[-2000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    from tools.ingest import IngestConfig, ingest

    options = json.loads(sys.argv[1])
    if options.get("engine") == "dask":
        import distributed  # noqa: F401 - its import (about 1 s) is a start-up cost, timed apart from the job

    t0, c0 = time.perf_counter(), _cpu()
    result = ingest(IngestConfig(progress=False, **options))
    seconds, cpu = time.perf_counter() - t0, _cpu() - c0
    print(json.dumps({"seconds": seconds, "cpu_s": cpu, "bytes_in": result.bytes_in}))


if __name__ == "__main__":
    main()
