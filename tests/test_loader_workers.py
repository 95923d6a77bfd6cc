"""Worker processes (``workers="processes"``): the same batches and resume behaviour as threads, errors
and dead workers reported in the consumer, shared memory cleaned up."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import hpstore
from hpstore import Loader
from hpstore.errors import CorruptObjectError, InputError
from hpstore.loading.loader import _Builder, _FirstHere
from hpstore.loading.ring import PREFIX, shm_dir
from hpstore.loading.workers import WorkerError
from tests.support.resume import check_resume
from tests.test_loader import columns, write

N = 1500


@pytest.fixture(scope="module")
def data() -> dict[str, Any]:
    return columns(N)


@pytest.fixture(scope="module")
def ds(tmp_path_factory: pytest.TempPathFactory, data: dict[str, Any]) -> hpstore.Dataset:
    return write(tmp_path_factory.mktemp("store"), data)


def segments() -> set[str]:
    """This process's shared-memory files."""
    return {n for n in os.listdir(shm_dir()) if n.startswith(f"{PREFIX}{os.getpid()}-")}


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor):
            if not (isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)):
                return False
        elif x != y:
            return False
    return True


def test_processes_yield_the_same_batches_as_threads_over_epochs(ds: hpstore.Dataset) -> None:
    kw: dict[str, Any] = {"with_index": True, "shuffle_window": 3, "num_workers": 2}
    threads = Loader(ds, 64, **kw)
    procs = Loader(ds, 64, workers="processes", **kw)
    procs.start()
    for _ in range(2):  # the second epoch reuses the workers and the ring's slots
        a, b = list(threads), list(procs)
        assert len(a) == len(b) == len(threads)
        assert all(same(x, y) for x, y in zip(a, b, strict=True))
        assert procs.state_dict() == threads.state_dict()
    stats = procs.stats
    assert stats["windows"] > 0 and stats["bytes_read"] > 0 and stats["chunk_misses"] > 0
    procs.close()


def test_kept_batches_keep_their_slots(ds: hpstore.Dataset) -> None:
    """A consumer holding every batch of an epoch: the ring must make slots, never overwrite."""
    procs = Loader(ds, 32, fields=["image", "label"], num_workers=2, workers="processes", shuffle_window=1)
    kept = list(procs)
    fresh = list(Loader(ds, 32, fields=["image", "label"], shuffle_window=1))
    assert all(same(x, y) for x, y in zip(kept, fresh, strict=True))
    assert procs._pool is not None and len(procs._pool.ring.slots) > procs._pool.max_slots
    procs.close()
    # The files are gone, the mappings stay valid while the batches are alive.
    assert not segments()
    assert all(same(x, y) for x, y in zip(kept, fresh, strict=True))


def test_resume_is_the_same_in_both_modes(ds: hpstore.Dataset) -> None:
    def make(workers: str) -> Any:
        def build() -> Loader:
            loader = Loader(
                ds,
                50,
                fields=["label", "blob"],
                with_index=True,
                num_workers=2,
                workers=workers,
                shuffle_window=3,
            )
            loader.set_epoch(3)
            return loader

        return build

    def key(b: dict[str, Any]) -> tuple[int, ...]:
        assert np.array_equal(b["label"].numpy(), b["index"].numpy())
        return tuple(b["index"].tolist())

    steps = len(make("threads")())
    full = check_resume(make("processes"), [0, 5, steps - 1, steps], key=key, make_resumed=make("threads"))
    assert check_resume(make("threads"), [7], key=key, make_resumed=make("processes")) == full


def test_a_worker_error_re_raises_in_the_consumer_with_its_type_and_message(
    tmp_path: Path, data: dict[str, Any]
) -> None:
    ds = write(tmp_path / "s", data)
    loader = Loader(ds, 32, fields=["image"], num_workers=2, workers="processes", cache_bytes=0)
    loader.start()
    # Corrupt the first chunk of every shard (before the first read) except a chunk of the run's
    # first window, which the consumer builds itself: the error must come from a worker.
    first = set(loader._plan(0).window_chunks(0))
    shards = sorted((tmp_path / "s").rglob("image/c/*/0/0"))
    corrupt = [p for p in shards if int(p.parent.parent.name) * ds.spec.chunks_per_shard not in first]
    assert corrupt
    for shard in corrupt:
        with open(shard, "r+b") as f:
            f.seek(3)
            b = f.read(1)[0]
            f.seek(3)
            f.write(bytes([b ^ 0xFF]))
    with pytest.raises(CorruptObjectError, match=r"image/c/\d+/0/0: checksum mismatch") as info:
        for _ in loader:
            pass
    assert any("loader worker process" in note for note in getattr(info.value, "__notes__", []))
    loader.close()
    assert not segments()


def test_a_killed_worker_is_reported_and_replaced(ds: hpstore.Dataset) -> None:
    loader = Loader(ds, 16, fields=["label"], num_workers=2, workers="processes", shuffle_window=1)
    loader.start()
    it = iter(loader)
    next(it)
    assert loader._pool is not None
    victim = loader._pool.procs[1]
    assert victim.pid is not None
    os.kill(victim.pid, signal.SIGKILL)
    with pytest.raises(WorkerError, match=r"worker process 1 .* exited with code -9"):
        for _ in it:
            pass
    # The next iteration starts fresh workers and continues after the last batch delivered.
    step = loader.state_dict()["step"]
    rest = [b["label"] for b in loader]
    assert len(rest) == len(loader) - step
    loader.close()
    assert not victim.is_alive() and not segments()


def test_close_stops_the_workers_and_unlinks_all_shared_memory(ds: hpstore.Dataset) -> None:
    before = segments()
    loader = Loader(ds, 64, num_workers=2, workers="processes")
    loader.start()  # ready workers get their jobs right after the first window (built here)
    it = iter(loader)
    next(it)  # mid-epoch: slots lent and jobs in flight
    assert segments() - before
    assert loader._pool is not None
    procs = list(loader._pool.procs)
    loader.close()
    assert segments() == before
    assert not any(p.is_alive() for p in procs)
    # A closed loader starts again when iterated, after the last batch delivered.
    assert len(list(loader)) == len(loader) - 1
    loader.close()
    assert segments() == before


def test_a_dropped_loader_unlinks_its_shared_memory(ds: hpstore.Dataset) -> None:
    before = segments()
    loader = Loader(ds, 64, num_workers=1, workers="processes")
    loader.start()
    next(iter(loader))
    assert segments() - before
    del loader
    assert segments() == before


def test_bad_worker_options_fail_clearly(ds: hpstore.Dataset) -> None:
    with pytest.raises(InputError, match="workers must be one of threads, processes, auto"):
        Loader(ds, 8, workers="fibers")
    with pytest.raises(InputError, match="needs num_workers >= 1"):
        Loader(ds, 8, workers="processes")


def test_auto_picks_processes_only_where_they_run(ds: hpstore.Dataset) -> None:
    # Processes build plain windows; a transform (or a token-window view) needs the threads.
    from hpstore.images import Decode

    assert Loader(ds, 8, workers="auto").worker_kind == "threads"  # no workers: the consumer's thread
    loader = Loader(ds, 8, num_workers=1, workers="auto")
    assert loader.worker_kind == "processes"
    loader.close()
    decoded = Loader(ds, 8, num_workers=1, workers="auto", fields=["blob"], transforms={"blob": Decode()})
    assert decoded.worker_kind == "threads"
    decoded.close()
    with pytest.raises(InputError, match="does not run per-field transforms"):
        Loader(ds, 8, num_workers=1, workers="processes", fields=["blob"], transforms={"blob": Decode()})


def test_worker_cpu_plan_keeps_one_cpu_of_each_share_for_its_consumer() -> None:
    from hpstore.loading.affinity import plan_worker_cpus

    assert plan_worker_cpus([0, 1]) == (1,)
    assert plan_worker_cpus([3, 1, 2, 0]) == (1, 2, 3)
    assert plan_worker_cpus([0]) is None  # nothing to keep apart
    # Two local ranks on 8 CPUs: each takes 4, keeps the first for its consumer.
    assert plan_worker_cpus(range(8), 0, 2) == (1, 2, 3)
    assert plan_worker_cpus(range(8), 1, 2) == (5, 6, 7)
    assert plan_worker_cpus(range(4), 3, 4) is None  # one CPU per rank
    with pytest.raises(InputError, match="local rank 2 is out of range"):
        plan_worker_cpus(range(4), 2, 2)


def _affinity(pid: int) -> set[int]:
    return os.sched_getaffinity(pid)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_workers_run_on_the_cpus_they_are_given_and_the_consumer_keeps_its_own(
    ds: hpstore.Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    mine = os.sched_getaffinity(0)
    last = max(mine)
    loader = Loader(ds, 64, num_workers=2, workers="processes", worker_cpus=[last])
    loader.start()
    assert loader._pool is not None
    assert all(_affinity(p.pid or 0) == {last} for p in loader._pool.procs)
    reference = Loader(ds, 64, num_workers=2)  # threads: the same batches wherever workers run
    assert all(same(a, b) for a, b in zip(loader, reference, strict=True))
    loader.close()
    assert os.sched_getaffinity(0) == mine  # the consumer's own affinity is untouched
    # "auto" under torchrun's variables: rank 0 of 1 keeps its first CPU for the consumer.
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    auto = Loader(ds, 64, num_workers=1, workers="processes")
    auto.start()
    assert auto._pool is not None
    assert _affinity(auto._pool.procs[0].pid or 0) == mine - {min(mine)}
    auto.close()
    unpinned = Loader(ds, 64, num_workers=1, workers="processes", worker_cpus=None)
    unpinned.start()
    assert unpinned._pool is not None
    assert _affinity(unpinned._pool.procs[0].pid or 0) == mine
    unpinned.close()


def test_bad_worker_cpus_fail_clearly(ds: hpstore.Dataset) -> None:
    with pytest.raises(InputError, match="worker_cpus must be 'auto', None or CPU numbers"):
        Loader(ds, 8, num_workers=1, workers="processes", worker_cpus="all")
    with pytest.raises(InputError, match="are not available to this process"):
        Loader(ds, 8, num_workers=1, workers="processes", worker_cpus=[4096])


def test_each_runs_first_window_is_built_by_the_consumer_and_the_rest_by_the_workers(
    ds: hpstore.Dataset,
) -> None:
    # Like threads, process mode builds a run's first window on the consumer's thread (its first
    # batch waits for no other process); the workers build every other window, same batches.
    loader = Loader(ds, 64, num_workers=2, workers="processes")
    reference = Loader(ds, 64, num_workers=0)
    for _epoch in range(2):
        assert all(same(a, b) for a, b in zip(loader, reference, strict=True))
    assert loader._io.windows == 2  # this process's own builds: one per run
    assert loader._pool is not None
    workers_built = sum(t.get("windows", 0) for t in loader._pool.totals)
    assert workers_built == 2 * (loader._plan(0).num_windows - 1)
    # A run resumed mid-window starts from that window, built here as well.
    state = loader.state_dict()
    state["step"] = 3
    loader.load_state_dict(state)
    reference.load_state_dict(state)
    assert all(same(a, b) for a, b in zip(loader, reference, strict=True))
    assert loader._io.windows == 3
    loader.close()
    reference.close()


def test_started_workers_have_touched_their_first_slots_and_build_while_the_first_window_is_built_here(
    ds: hpstore.Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    procs = Loader(ds, 64, num_workers=2, workers="processes", shuffle_window=3)
    assert procs._pool is not None
    slots = list(procs._pool.ring.slots)
    assert len(slots) == 4  # two per worker, made with the pool
    procs.start()
    for slot in slots:  # tmpfs counts the pages a slot holds: all of them, before any window
        assert os.stat(slot.path).st_blocks * 512 >= slot.size
    it = iter(procs)
    run = procs._run() if procs._run is not None else None
    assert run is not None and isinstance(run.prefetcher, _FirstHere)
    jobs_before_build: list[int] = []
    build = _Builder.build

    def spy(self: _Builder, j: int) -> Any:
        rest = run.prefetcher.rest  # type: ignore[union-attr]
        jobs_before_build.append(len(rest.pending) if rest is not None else 0)
        return build(self, j)

    monkeypatch.setattr(_Builder, "build", spy)
    first = next(it)
    # Started workers got the next windows' jobs before this process built the first window.
    assert len(jobs_before_build) == 1 and jobs_before_build[0] > 0
    reference = Loader(ds, 64, num_workers=0, shuffle_window=3)
    assert all(same(x, y) for x, y in zip([first, *it], reference, strict=True))
    procs.close()
    assert not segments()
