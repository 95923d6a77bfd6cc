"""Ingest beyond one process: ``tools.ingest --engine dask`` against the single-process engine.

1. **Scaling** on two sources, side by side in one run: a CPU-bound one (zstd-compressed Parquet
   with float columns, stored as zstd-1 chunks) and a bandwidth-bound one (a ``.npy`` digit array
   stored raw, codec none). Single process (the default engine, 2 encode threads) vs Dask with 1
   and 2 worker processes. The LocalCluster is started before the timed runs and reused through
   ``--scheduler`` (its start-up, several seconds, is reported apart in ``extra``). Baseline of each
   figure: the single-process ingest of the same source, run alternately in the same loop.
2. **Commit** (the serial part): building the manifest from N synthetic part results
   (``assemble_split``) and writing it, for N up to 10,000. Target < 1 s at 10,000. Baseline, run
   alternately: the same commit with the manifest encoded as indented JSON (``indent=1``, what the
   format wrote before it went compact), which is what made the commit of 10,000 parts take 4.4 s.
3. **Peak RSS per worker** (``VmHWM`` of each worker process after a job), in ``extra``; and flat in
   the source size: a fresh LocalCluster of 2 workers per size, the npy source at 32 and 256 MB,
   the largest worker peak at 256 MB against the one at 32 MB (target: the same, within noise).
4. **CPU seconds** next to every scaling figure (``extra``): the single process's, and the Dask
   run's workers + client + scheduler, with cores kept busy (CPU s / wall s) and the load average:
   what bounds the ratio on a machine with as many cores as workers.
5. **Peers** (``peer_figures``): Hugging Face ``datasets`` ``save_to_disk`` and LitData ``optimize``
   on the 32 MB npy source, from their own virtualenv (``benchmarks.peers``), beside hpstore's
   single-process and Dask ingest of the same source.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.common import BenchConfig, Figure, Progress
from benchmarks.ingest_child import run_child
from hpstore.format.manifest import MANIFEST_KEY, Manifest, _manifest_to_dict, commit_manifest
from hpstore.format.parts import FieldPlan, PartResult, SplitPlan, assemble_split
from hpstore.storage.local import LocalStorage
from tools.ingest import IngestConfig, ingest


def parquet_source(root: Path, mb: int) -> Path:
    """Float columns with some redundancy (compressible, so encode and decode cost CPU)."""
    marker = root / f"complete-{mb}"
    if marker.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = mb * 1_000_000 // (8 * 16 + 8)
    for i, start in enumerate(range(0, rows, rows // 8)):
        n = min(rows // 8, rows - start)
        feats = np.round(rng.normal(size=(n, 16)), 2)
        table = pa.table(
            {
                "features": pa.FixedSizeListArray.from_arrays(pa.array(feats.ravel()), 16),
                "label": rng.integers(0, 1000, n),
            }
        )
        pq.write_table(table, root / f"part-{i:03d}.parquet", compression="zstd", row_group_size=65536)
    marker.touch()
    return root


def _ingest_seconds(src: Path, dst: Path, **options: Any) -> tuple[float, int]:
    shutil.rmtree(dst, ignore_errors=True)
    result = ingest(IngestConfig(src=str(src), dst=str(dst), progress=False, **options))
    shutil.rmtree(dst, ignore_errors=True)
    return result.seconds, result.bytes_in


def _worker_peak_mb(client: Any) -> list[float]:
    def hwm() -> float:
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) / 1024

    return sorted(client.run(hwm).values())


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _workers_cpu_s(client: Any) -> float:
    """User + system CPU seconds of all worker processes so far (each process's own threads)."""
    return float(sum(client.run(_cpu_s).values()))


def _dask_run(client: Any, **options: Any) -> dict[str, float]:
    """One ``--engine dask`` ingest from a child client against the running cluster, with the CPU
    seconds of the workers and of this process (the LocalCluster's scheduler lives here) over it."""
    shutil.rmtree(options["dst"], ignore_errors=True)
    w0, s0 = _workers_cpu_s(client), _cpu_s()
    out = run_child(**options)
    out["workers_cpu_s"] = _workers_cpu_s(client) - w0
    out["scheduler_cpu_s"] = _cpu_s() - s0
    return out


def scaling_figures(
    cfg: BenchConfig, progress: Progress, npy: Path, workers_list: tuple[int, ...] = (1, 2)
) -> list[Figure]:
    """Each run is a child process (``benchmarks.ingest_child``) timed from inside; besides MB/s, the
    CPU seconds each run used: the single process's (its encode threads included), and under Dask
    the workers' plus the child client's plus the scheduler's. CPU seconds / wall seconds is the
    number of cores a run kept busy: when the single process already keeps most of the machine's
    cores busy, 2 workers on the same cores cannot be much faster whatever the engine does."""
    import distributed

    pq_src = parquet_source(cfg.data_dir / "ingest" / "parquet-dask", 24 if cfg.quick else 128)
    # Partitions are runs of whole shards: with the default 64 MiB shards these sources would be one
    # or two partitions, which no number of workers can share. Both engines get the same layout.
    shard = (4 if cfg.quick else 16) << 20
    sources: dict[str, tuple[Path, dict[str, Any]]] = {
        "CPU-bound: zstd Parquet -> zstd-1": (pq_src, {"codec": "zstd", "level": 1, "shard_bytes": shard}),
        "bandwidth-bound: npy -> raw": (npy, {"codec": "none", "shard_bytes": shard}),
    }
    dst = cfg.data_dir / "ingest" / "store-dask"
    figures = []
    for workers in workers_list:
        t0 = time.perf_counter()
        with (
            distributed.LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
            ) as cluster,
            distributed.Client(cluster) as client,
        ):
            startup = time.perf_counter() - t0
            for name, (src, layout) in sources.items():
                progress(f"ingest: dask x{workers}, {name}")
                base = {"src": str(src), "dst": str(dst), **layout}
                dask_opts = {**base, "engine": "dask", "scheduler": cluster.scheduler_address}
                _dask_run(client, **dask_opts)  # warm-up: imports on the workers
                single: list[dict[str, float]] = []
                dask: list[dict[str, float]] = []
                for i in range(cfg.repeats):  # alternating order, so drift hits both alike
                    for which in "ds" if i % 2 else "sd":
                        if which == "d":
                            dask.append(_dask_run(client, **dask_opts))
                        else:
                            shutil.rmtree(dst, ignore_errors=True)
                            single.append(run_child(**base))
                nbytes = single[0]["bytes_in"]
                figures.append(
                    Figure(
                        bench="ingest",
                        name=f"{name}, dask {workers} worker{'s' if workers > 1 else ''} ({nbytes / 1e6:.0f} MB)",
                        unit="MB/s",
                        values=[r["bytes_in"] / 1e6 / r["seconds"] for r in dask],
                        baseline="single process (2 encode threads)",
                        baseline_values=[r["bytes_in"] / 1e6 / r["seconds"] for r in single],
                        target="≥ 1.7x with 2 workers (CPU-bound)"
                        if workers == 2 and "CPU" in name
                        else None,
                        extra={
                            "cluster_startup_s": startup,
                            "worker_peak_rss_mb": _worker_peak_mb(client),
                            "layout": layout,
                            "single_wall_s": [r["seconds"] for r in single],
                            "single_cpu_s": [r["cpu_s"] for r in single],
                            "single_cores_busy": [r["cpu_s"] / r["seconds"] for r in single],
                            "dask_wall_s": [r["seconds"] for r in dask],
                            "dask_workers_cpu_s": [r["workers_cpu_s"] for r in dask],
                            "dask_client_cpu_s": [r["cpu_s"] for r in dask],
                            "dask_scheduler_cpu_s": [r["scheduler_cpu_s"] for r in dask],
                            "dask_cores_busy": [
                                (r["workers_cpu_s"] + r["cpu_s"] + r["scheduler_cpu_s"]) / r["seconds"]
                                for r in dask
                            ],
                            "cores": os.cpu_count(),
                            "load_avg_1m": os.getloadavg()[0],
                        },
                    )
                )
    shutil.rmtree(dst, ignore_errors=True)
    return figures


def commit_seconds(root: Path, partitions: int, *, indented: bool = False) -> tuple[float, float]:
    """Seconds to assemble and commit a split of ``partitions`` synthetic parts (2 fields: one
    array shard and one Arrow part of 8 batches each), metadata objects and manifest included.
    ``indented``: the manifest encoded with ``json.dumps(indent=1)`` instead (the baseline).
    Returns (wall seconds, CPU seconds of this process): on a shared machine the CPU time is the
    figure that does not depend on what else runs."""
    shutil.rmtree(root, ignore_errors=True)
    storage = LocalStorage(str(root))
    gen = "data-20260101T000000-00000000"
    plan = SplitPlan(
        generation=gen,
        split="train",
        num_samples=partitions * 800,
        chunk_rows=100,
        chunks_per_shard=8,
        fields=(
            FieldPlan(
                name="x", kind="array", dtype="float32", shape=(16,), codec={"name": "zstd", "level": 1}
            ),
            FieldPlan(name="s", kind="variable", arrow_type=pa.string()),
        ),
        codec={"name": "zstd", "level": 1},
        attrs={},
    )
    results = [
        PartResult(
            split="train",
            first_shard=p,
            rows=800,
            source_bytes=1 << 20,
            objects=(
                (f"{gen}/train/x/c/{p}/0", 60000, "0badf00d"),
                (f"{gen}/train/s/part-{p:05d}.arrow", 9000, "0badf00d"),
            ),
            arrow_parts=(
                (
                    "s",
                    p,
                    f"{gen}/train/s/part-{p:05d}.arrow",
                    tuple((o * 1000, 900, "0badf00d") for o in range(8)),
                ),
            ),
            variable_nbytes=(("s", 9000),),
        )
        for p in range(partitions)
    ]
    t0, c0 = time.perf_counter(), time.process_time()
    spec, objects = assemble_split(storage, plan, reversed(results))  # arrival order: any
    manifest = Manifest(generation=gen, splits={"train": spec}, objects=objects)
    if indented:
        storage.write(MANIFEST_KEY, json.dumps(_manifest_to_dict(manifest), indent=1).encode())
    else:
        commit_manifest(storage, manifest)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    shutil.rmtree(root, ignore_errors=True)
    return seconds, cpu


def commit_figures(cfg: BenchConfig, progress: Progress) -> list[Figure]:
    root = cfg.data_dir / "ingest" / "commit"
    figures = []
    for n in (100, 1000, 10000):
        progress(f"ingest: commit of {n} partitions")
        compact: list[tuple[float, float]] = []
        indented: list[tuple[float, float]] = []
        for _ in range(cfg.repeats):  # alternating, so load on the machine hits both alike
            compact.append(commit_seconds(root, n))
            indented.append(commit_seconds(root, n, indented=True))
        figures.append(
            Figure(
                bench="ingest",
                name=f"commit of {n} partitions (synthetic results, local disk)",
                unit="s",
                values=[w for w, _ in compact],
                baseline="the same commit with an indented JSON manifest (indent=1, before)",
                baseline_values=[w for w, _ in indented],
                higher_is_better=False,
                target="< 1 s" if n == 10000 else None,
                extra={"cpu_s": [c for _, c in compact], "baseline_cpu_s": [c for _, c in indented]},
            )
        )
    return figures


def memory_figure(cfg: BenchConfig, progress: Progress) -> Figure:
    """Largest worker ``VmHWM`` after ingesting the npy source at 8x the size vs at 1x (32 MB: under
    one 64 MiB shard, so its shard is the source; 256 MB: four full shards), each on a
    fresh LocalCluster of 2 workers (a high-water mark only ever grows: one cluster per size)."""
    import distributed

    from benchmarks.ingest import npy_source

    base, factor = 32, 8
    dst = cfg.data_dir / "ingest" / "store-dask-mem"
    peaks: dict[int, float] = {}
    for mb in (base, factor * base):
        npy = npy_source(cfg, mb)
        progress(f"ingest: dask x2 worker peak memory, {mb} MB npy")
        with (
            distributed.LocalCluster(
                n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
            ) as cluster,
            distributed.Client(cluster) as client,
        ):
            _ingest_seconds(npy, dst, engine="dask", scheduler=cluster.scheduler_address, codec="zstd")
            peaks[mb] = max(_worker_peak_mb(client))
    return Figure(
        bench="ingest",
        name=f"dask worker peak RSS, {factor * base} MB npy source (2 workers)",
        unit="MB",
        values=[peaks[factor * base]],
        baseline=f"the same at {base} MB (a fresh cluster)",
        baseline_values=[peaks[base]],
        higher_is_better=False,
        target="flat in the source size (ratio ~1)",
        extra={"peak_mb_by_source_mb": peaks},
    )


def _children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def peer_figures(cfg: BenchConfig, progress: Progress) -> list[Figure]:
    """The 32 MB npy digits source converted by Hugging Face ``datasets`` (``save_to_disk``) and by
    LitData (``optimize``, 2 worker processes), each in ``.bench-venv`` (``benchmarks.peers``), next
    to hpstore's single-process ingest and ``--engine dask`` with 2 workers (codec none: all four
    write the rows uncompressed), one run each, in one loop. A peer's CPU seconds are those of its
    process tree (``RUSAGE_CHILDREN``, imports included); its wall time is measured inside it."""
    import distributed

    from benchmarks import peers
    from benchmarks.ingest import npy_source

    progress("ingest: peers' virtualenv (.bench-venv)")
    status = peers.ensure()
    src = npy_source(cfg, 32)
    dst = cfg.data_dir / "ingest" / "store-peers"
    runs: dict[str, dict[str, float]] = {}
    shutil.rmtree(dst, ignore_errors=True)
    runs["hpstore single process"] = run_child(src=str(src), dst=str(dst), codec="none")
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        opts = {"src": str(src), "dst": str(dst), "codec": "none", "engine": "dask"}
        _dask_run(client, **opts, scheduler=cluster.scheduler_address)  # warm-up
        runs["hpstore --engine dask, 2 workers"] = _dask_run(
            client, **opts, scheduler=cluster.scheduler_address
        )
    shutil.rmtree(dst, ignore_errors=True)
    for peer, workers in (("datasets", 1), ("litdata", 2)):
        if not status[peer].startswith("installed"):
            progress(f"ingest: {peer} skipped: {status[peer]}")
            continue
        progress(f"ingest: {peer} on {src.name}")
        c0 = _children_cpu_s()
        out = subprocess.run(
            [
                str(peers.python()),
                str(Path(peers.__file__).parent / "convert.py"),
                peer,
                str(src),
                str(dst),
                str(workers),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode != 0:
            status[peer] += f"; failed: {out.stderr.strip().splitlines()[-1:]}"
            continue
        doc = json.loads(out.stdout.strip().splitlines()[-1])
        runs[f"{peer} ({workers} process{'es' if workers > 1 else ''})"] = {
            "seconds": doc["seconds"],
            "cpu_s": _children_cpu_s() - c0,
            "bytes_in": runs["hpstore single process"]["bytes_in"],
            "bytes_out": doc["bytes_out"],
        }
        shutil.rmtree(dst, ignore_errors=True)
    base = runs["hpstore single process"]
    mbps = {k: r["bytes_in"] / 1e6 / r["seconds"] for k, r in runs.items()}
    extra = {
        "peers": status,
        "mb_per_s": mbps,
        "wall_s": {k: r["seconds"] for k, r in runs.items()},
        "cpu_s": {
            k: r["cpu_s"] + r.get("workers_cpu_s", 0) + r.get("scheduler_cpu_s", 0) for k, r in runs.items()
        },
        "load_avg_1m": os.getloadavg()[0],
    }
    return [
        Figure(
            bench="ingest",
            name=f"{name} converting the 32 MB npy source",
            unit="MB/s",
            values=[mbps[name]],
            baseline="hpstore single-process ingest of the same source (codec none)",
            baseline_values=[base["bytes_in"] / 1e6 / base["seconds"]],
            extra=extra,
        )
        for name in runs
        if name != "hpstore single process"
    ]


def run(cfg: BenchConfig, progress: Progress, npy: Path | None = None) -> list[Figure]:
    """Also runs alone: ``python -m benchmarks --only ingest_dask [--quick]``."""
    if npy is None:
        from benchmarks.ingest import npy_source

        npy = npy_source(cfg, 48 if cfg.quick else 256)
    try:
        import distributed  # noqa: F401
    except ImportError:
        progress("ingest: dask not installed (pip install 'hpstore[dask]'); dask figures skipped")
        return commit_figures(cfg, progress)
    return [
        *commit_figures(cfg, progress),
        memory_figure(cfg, progress),
        *scaling_figures(cfg, progress, npy),
        *peer_figures(cfg, progress),
    ]
