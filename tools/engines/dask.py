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
import threading
import time
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
"""``progress(rows, source_bytes)``: increments, called on the client while partitions run (from
Dask's event thread too: the callee must be thread-safe) and as each one completes."""

REPORT_SECONDS = 0.25
"""A task reports its rows and bytes so far at most this often (one small scheduler event each)."""


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
    topic: str | None = None,
) -> PartResult:
    """One task: rows of ``part`` from the source, encoded into its shards under the generation.

    ``head``: when appending, the committed rows of the split's partial last shard, which the
    first partition writes again ahead of the source's rows (``hpstore.format.append``).
    ``topic``: the Dask event topic its progress goes to while it runs (``[split, index, rows,
    bytes]``, totals of this partition so far), so the client's bar moves within a partition."""
    storage = open_storage(storage_url, storage_options)
    on_batch = _reporter(topic, part) if topic is not None else None
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
            on_batch=on_batch,
        )
    finally:
        batches.close()


def _reporter(topic: str, part: Partition) -> Callable[[int, int], None] | None:
    """``on_batch`` for ``write_part`` inside a Dask worker: a throttled event to ``topic``."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):  # not running inside a worker
        return None
    last = -REPORT_SECONDS

    def report(rows: int, nbytes: int) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= REPORT_SECONDS:
            last = now
            worker.log_event(topic, [part.split, part.index, rows, nbytes])

    return report


class _Tally:
    """The job's rows and bytes from partitions' running totals, as increments for ``progress``.

    A partition counts the largest totals seen for it: a task Dask retries after its worker died
    starts again from zero and is not counted twice, and an event arriving after the partition's
    result changes nothing; the result's totals (the most a partition reaches) close it exactly.
    Rows rewritten ahead of an append (``head``) are not source rows and are taken out."""

    def __init__(self, progress: Progress, heads: Mapping[str, Batch | None]) -> None:
        self.progress = progress
        self.head = {split: (_rows(b), _nbytes(b)) for split, b in heads.items()}
        self.seen: dict[tuple[str, int], tuple[int, int]] = {}
        self.lock = threading.Lock()

    def running(self, split: str, index: int, rows: int, nbytes: int) -> None:
        if index == 0:
            rows, nbytes = max(0, rows - self.head[split][0]), max(0, nbytes - self.head[split][1])
        with self.lock:
            old_rows, old_bytes = self.seen.get((split, index), (0, 0))
            new = (max(rows, old_rows), max(nbytes, old_bytes))
            self.seen[(split, index)] = new
            if new != (old_rows, old_bytes):
                self.progress(new[0] - old_rows, new[1] - old_bytes)

    def event(self, event: tuple[float, Any]) -> None:
        """``Client.subscribe_topic`` handler: ``(time, [split, index, rows, bytes])``."""
        split, index, rows, nbytes = event[1]
        self.running(str(split), int(index), int(rows), int(nbytes))


def _head(writer: StoreWriter, split: str) -> Batch | None:
    """The committed rows an append to ``split`` writes again (at most one shard), or ``None``."""
    base = writer.base_split(split)
    if base is None or writer.base is None:
        return None
    return tail_rows(writer.storage, writer.base, base)


def _rows(batch: Batch | None) -> int:
    return 0 if batch is None else len(next(iter(batch.values())))


def _nbytes(batch: Batch | None) -> int:
    return 0 if batch is None else sum(int(c.nbytes) for c in batch.values())


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
    work = [
        (s, plan, p)
        for s, plan in zip(splits, plans, strict=True)
        for p in plan_partitions(plan, shards_per_partition=opts.shards_per_partition)
    ]
    results: dict[str, list[PartResult]] = {plan.split: [] for plan in plans}
    distributed = _import_distributed()
    tally = _Tally(progress, heads)
    topic = f"hpstore-progress-{writer.generation}"
    index = {(p.split, p.first_shard): p.index for _, _, p in work}
    with _client(opts) as client:
        client.subscribe_topic(topic, tally.event)
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
                topic,
                key=f"hpstore-{writer.generation}-{p.split}-{p.index:06d}",
                pure=False,
            )
            for s, plan, p in work
        ]
        try:
            for fut in distributed.as_completed(futures):
                r: PartResult = fut.result()
                results[r.split].append(r)
                tally.running(r.split, index[(r.split, r.first_shard)], r.rows, r.source_bytes)
        finally:
            client.unsubscribe_topic(topic)
            client.cancel(futures)
    # Workers are gone (LocalCluster) or idle: nothing writes into the generation any more.
    keep: set[str] = set()
    for plan in plans:
        spec, objects = assemble_split(writer.storage, plan, results[plan.split])
        writer.add_written_split(spec, objects)
        keep.update(objects)
    remove_strays(writer.storage, writer.generation, keep)
