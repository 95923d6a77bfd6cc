"""The Dask engine: partitions of every split written by ``dask.distributed`` tasks, committed once.

Flow::

    client: plan_split (layout from the first batch / chunk) -> plan_partitions (runs of shards)
    tasks:  read_rows(source, start, stop) -> write_part -> PartResult (plain data)
    client: results in source order -> assemble_split -> StoreWriter.add_written_split -> commit

The cluster is a ``LocalCluster`` of ``workers`` processes, or the scheduler at ``scheduler``. What
makes a worker dying harmless: a task writes only its own shards, under deterministic keys, each in
one atomic write, so the task Dask reschedules rewrites the same objects with the same bytes; a
temporary file a killed worker left behind (local destinations) is the only thing that is not
overwritten, and it lies inside this run's own fresh generation, where ``remove_strays`` deletes
everything the results do not name before the commit. Nothing is committed unless every partition
returned.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from hpstore.errors import InputError
from hpstore.format.append import tail_rows
from hpstore.format.parts import PartResult, SplitPlan, assemble_split, write_part
from hpstore.format.writer import StoreWriter
from hpstore.storage.base import Storage
from hpstore.storage.local import LocalStorage
from hpstore.storage.open import open_storage
from tools.partitions import Partition, plan_partitions, plan_split, read_rows
from tools.sources.base import Batch, Source, Split
from tools.sources.prefetch import prefetched

Progress = Callable[[int, int], None]
"""``progress(rows, source_bytes)``: called on the client as each partition completes."""


@dataclass(frozen=True, kw_only=True)
class DaskOptions:
    """Where the tasks run and how the work is cut."""

    scheduler: str | None = None
    """Address of a running scheduler (``tcp://host:8786``); ``None``: a LocalCluster."""
    workers: int = 2
    """Worker processes of the LocalCluster (ignored with ``scheduler``)."""
    threads: int = 1
    """Encode threads inside one task (zstd / lz4 release the GIL)."""
    shards_per_partition: int = 1

    def __post_init__(self) -> None:
        if self.workers < 1 or self.threads < 1 or self.shards_per_partition < 1:
            raise InputError("--workers, threads and shards per partition must be at least 1")


def _import_distributed() -> Any:
    try:
        import distributed
    except ImportError:
        raise InputError("--engine dask needs dask.distributed: pip install 'hpstore[dask]'") from None
    return distributed


@contextmanager
def _client(opts: DaskOptions) -> Iterator[Any]:
    distributed = _import_distributed()
    if opts.scheduler is not None:
        try:
            client = distributed.Client(opts.scheduler, timeout="30s")
        except (OSError, TimeoutError) as exc:
            raise InputError(f"--scheduler {opts.scheduler}: cannot connect ({exc})") from None
        with client:
            yield client
        return
    with (
        distributed.LocalCluster(
            n_workers=opts.workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.CRITICAL,
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        yield client


def write_partition(
    source: Source,
    plan: SplitPlan,
    part: Partition,
    storage_url: str,
    storage_options: Mapping[str, Any],
    threads: int,
    head: Batch | None = None,
) -> PartResult:
    """One task: rows of ``part`` from the source, encoded into its shards under the generation.

    ``head``: when appending, the committed rows of the split's partial last shard, which the
    first partition writes again ahead of the source's rows (``hpstore.format.append``)."""
    storage = open_storage(storage_url, storage_options)
    lo = max(part.start, plan.source_start) - plan.source_start
    rows = read_rows(source, lo, part.stop - plan.source_start)
    batches = prefetched(itertools.chain([head] if head is not None else [], rows))
    try:
        return write_part(
            storage,
            plan,
            first_shard=part.first_shard,
            num_shards=part.num_shards,
            batches=batches,
            encode_threads=threads,
        )
    finally:
        batches.close()


def _head(writer: StoreWriter, split: str) -> Batch | None:
    """The committed rows an append to ``split`` writes again (at most one shard), or ``None``."""
    base = writer.base_split(split)
    if base is None or writer.base is None:
        return None
    return tail_rows(writer.storage, writer.base, base)


def _rows(batch: Batch | None) -> int:
    return 0 if batch is None else len(next(iter(batch.values())))


def remove_strays(storage: Storage, generation: str, keep: set[str]) -> int:
    """Delete what lies under this run's own generation but no result names (temporary files of
    killed workers). Safe: the generation was named by this run and nothing else writes into it."""
    strays = sorted(k for k in storage.list(generation) if k not in keep)
    for key in strays:
        if isinstance(storage, LocalStorage):
            try:
                os.unlink(os.path.join(storage.root, key))
            except FileNotFoundError:
                pass
        else:
            storage.delete_prefix(key)
    return len(strays)


def run(
    splits: Sequence[Split],
    writer: StoreWriter,
    *,
    storage_url: str,
    storage_options: Mapping[str, Any],
    opts: DaskOptions,
    progress: Progress,
) -> None:
    """Write every split's partitions on Dask and give the writer each split's entry (no commit)."""
    plans = [
        plan_split(
            s.source,
            split=s.name,
            generation=writer.generation,
            layout=writer.layout,
            base=writer.base_split(s.name),
        )
        for s in splits
    ]
    heads = {plan.split: _head(writer, plan.split) for plan in plans}
    first = {plan.split: plan.first_shard for plan in plans}
    work = [
        (s, plan, p)
        for s, plan in zip(splits, plans, strict=True)
        for p in plan_partitions(plan, shards_per_partition=opts.shards_per_partition)
    ]
    results: dict[str, list[PartResult]] = {plan.split: [] for plan in plans}
    distributed = _import_distributed()
    with _client(opts) as client:
        # Sources travel inside each task, not scattered: scattered data lives on one worker and
        # dies with it, and a task whose input is gone is cancelled instead of rescheduled.
        futures = [
            client.submit(
                write_partition,
                s.source,
                plan,
                p,
                storage_url,
                dict(storage_options),
                opts.threads,
                heads[p.split] if p.index == 0 else None,
                key=f"hpstore-{writer.generation}-{p.split}-{p.index:06d}",
                pure=False,
            )
            for s, plan, p in work
        ]
        try:
            for fut in distributed.as_completed(futures):
                r: PartResult = fut.result()
                results[r.split].append(r)
                rewritten = _rows(heads[r.split]) if r.first_shard == first[r.split] else 0
                progress(r.rows - rewritten, r.source_bytes)
        finally:
            client.cancel(futures)
    # Workers are gone (LocalCluster) or idle: nothing writes into the generation any more.
    keep: set[str] = set()
    for plan in plans:
        spec, objects = assemble_split(writer.storage, plan, results[plan.split])
        writer.add_written_split(spec, objects)
        keep.update(objects)
    remove_strays(writer.storage, writer.generation, keep)
