"""The streaming loader on small real stores: contents, exact-once, resume, projection, cache,
background failures, and clean shutdown."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch

import hpstore
from hpstore import Loader
from hpstore.errors import CorruptObjectError, HpstoreError, InputError, ObjectNotFoundError
from hpstore.format.writer import Layout, StoreWriter
from hpstore.storage.local import LocalStorage
from tests.support.resume import check_resume

N = 1500
TINY = Layout(chunk_bytes=2048, shard_bytes=16384, workers=1, writers=1)


def columns(n: int = N) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    return {
        "image": rng.integers(0, 255, (n, 4, 5), dtype=np.uint8),
        "label": np.arange(n, dtype=np.int64),  # equal to the index, so mix-ups show
        "vec": rng.standard_normal((n, 3)).astype(np.float32),
        "blob": pa.array([bytes([i % 251]) * (i % 9) for i in range(n)], pa.binary()),
        "text": pa.array([f"s{i}" * (i % 3) for i in range(n)], pa.string()),
        "ragged": pa.array([list(range(i % 6)) if i % 13 else None for i in range(n)], pa.list_(pa.int32())),
        "meta": pa.array([{"id": i} for i in range(n)], pa.struct([("id", pa.int64())])),
    }


def write(path: Path, cols: dict[str, Any], layout: Layout = TINY) -> hpstore.Dataset:
    with StoreWriter(LocalStorage(str(path)), layout=layout) as w:
        sw = w.split("train")
        n = len(next(iter(cols.values())))
        for a in range(0, n, 2000):
            sw.append({k: v[a : a + 2000] for k, v in cols.items()})
        w.add_split(sw)
        w.commit()
    return hpstore.open(str(path)).split("train")


@pytest.fixture(scope="module")
def data() -> dict[str, Any]:
    return columns()


@pytest.fixture(scope="module")
def ds(tmp_path_factory: pytest.TempPathFactory, data: dict[str, Any]) -> hpstore.Dataset:
    return write(tmp_path_factory.mktemp("store"), data)


def indices(loader: Loader) -> np.ndarray:
    return np.concatenate([b["index"].numpy() for b in loader])


def test_batches_hold_the_right_rows_of_every_field_kind(ds: hpstore.Dataset, data: dict[str, Any]) -> None:
    loader = Loader(ds, 64, with_index=True, num_workers=2, cache_bytes=0)
    seen = []
    for b in loader:
        idx = b["index"].numpy()
        seen.append(idx)
        assert isinstance(b["image"], torch.Tensor) and b["image"].dtype == torch.uint8
        assert np.array_equal(b["image"].numpy(), data["image"][idx])
        assert np.array_equal(b["label"].numpy(), idx)
        assert np.array_equal(b["vec"].numpy(), data["vec"][idx])
        assert b["blob"] == [data["blob"][int(i)].as_py() for i in idx]
        assert b["text"] == [data["text"][int(i)].as_py() for i in idx]
        assert b["meta"] == [{"id": int(i)} for i in idx]
        # Lists of numbers: zero-padded tensor plus lengths; a null list is empty.
        lengths = np.array([0 if i % 13 == 0 else i % 6 for i in idx])
        assert np.array_equal(b["ragged_lengths"].numpy(), lengths)
        assert b["ragged"].shape == (len(idx), lengths.max())
        for row, (i, n) in enumerate(zip(idx, lengths, strict=True)):
            assert b["ragged"][row, :n].tolist() == list(range(n)) and not b["ragged"][row, n:].any()
            del i
    every = np.concatenate(seen)
    assert np.array_equal(np.sort(every), np.arange(N))
    assert len(seen) == len(loader) == -(-N // 64)
    assert all(len(s) == 64 for s in seen[:-1])


def test_one_epoch_is_a_shuffled_permutation_and_epochs_differ(ds: hpstore.Dataset) -> None:
    loader = Loader(ds, 100, fields=["label"], with_index=True)
    first, second = indices(loader), indices(loader)  # iterating again starts the next epoch
    assert loader.epoch == 2
    for order in (first, second):
        assert np.array_equal(np.sort(order), np.arange(N))
    assert not np.array_equal(first, second)
    assert not np.array_equal(first, np.arange(N))
    loader.set_epoch(0)
    assert np.array_equal(indices(loader), first)  # a pure function of (seed, epoch)
    plain = Loader(ds, 100, fields=["label"], with_index=True, shuffle=False)
    assert np.array_equal(indices(plain), np.arange(N))


@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_split_an_epoch_exactly_and_read_only_their_share(
    ds: hpstore.Dataset, tmp_path: Path, data: dict[str, Any], drop_last: bool
) -> None:
    world = 3
    per_rank = []
    for rank in range(world):
        fresh = hpstore.open(ds.store.url).split("train")
        loader = Loader(
            fresh, 64, rank=rank, world_size=world, drop_last=drop_last, with_index=True, fields=["image"]
        )
        batches = [b["index"].numpy() for b in loader]
        assert len(batches) == len(loader)
        per_rank.append(batches)
        # Locality: a rank reads about a third of the chunks, never all of them.
        stored = sum(o.size for k, o in fresh.store.manifest.objects.items() if "/image/c/" in k)
        assert loader.stats["bytes_read"] < 0.5 * stored
    assert len({len(b) for b in per_rank}) == 1
    assert all([len(x) for x in per_rank[0]] == [len(x) for x in b] for b in per_rank)
    counts = np.bincount(np.concatenate([np.concatenate(b) for b in per_rank]), minlength=N)
    if drop_last:
        assert counts.max() == 1 and N - counts.sum() < world * 64
    else:
        assert counts.min() == 1 and counts.sum() - N < world


def test_resume_at_any_point_yields_exactly_the_rest_with_any_workers(ds: hpstore.Dataset) -> None:
    def make(workers: int) -> Loader:
        loader = Loader(
            ds, 50, fields=["label", "blob"], with_index=True, num_workers=workers, shuffle_window=3
        )
        loader.set_epoch(5)
        return loader

    def key(b: dict[str, Any]) -> tuple[int, ...]:
        assert np.array_equal(b["label"].numpy(), b["index"].numpy())
        return tuple(b["index"].tolist())

    steps = len(make(0))
    points = [0, 1, 2, 7, steps // 2, steps - 1, steps]
    full = check_resume(lambda: make(2), points, key=key, make_resumed=lambda: make(0))
    assert len(full) == steps
    check_resume(lambda: make(0), [3, 11], key=key, make_resumed=lambda: make(4))


def test_state_is_checked_on_load(ds: hpstore.Dataset) -> None:
    state = Loader(ds, 50).state_dict()
    with pytest.raises(InputError, match="batch_size=50 but this loader has batch_size=40"):
        Loader(ds, 40).load_state_dict(state)
    with pytest.raises(
        InputError, match="first_window_chunks=1 but this loader has first_window_chunks=None"
    ):
        Loader(ds, 50, first_window=None).load_state_dict(state)
    with pytest.raises(InputError, match="window_chunks=16 but this loader has window_chunks=4"):
        Loader(ds, 50, shuffle_window=4).load_state_dict(state)
    with pytest.raises(InputError, match="lacks step"):
        Loader(ds, 50).load_state_dict({k: v for k, v in state.items() if k != "step"})
    with pytest.raises(InputError, match="out of range"):
        Loader(ds, 50).load_state_dict({**state, "step": 10_000})


@pytest.mark.parametrize(("old", "new", "step"), [(2, 3, 5), (3, 1, 2), (1, 4, 9), (4, 2, 0)])
def test_elastic_resume_delivers_the_rest_once_on_another_world_size(
    ds: hpstore.Dataset, old: int, new: int, step: int
) -> None:
    """Saved on ``old`` ranks after ``step`` batches, continued on ``new``: the rest of the epoch once
    across the new ranks with equal steps; the next epoch is an ordinary epoch of ``new`` ranks."""

    def loaders(world: int) -> list[Loader]:
        return [
            Loader(ds, 32, fields=["label"], with_index=True, rank=r, world_size=world, num_workers=w % 3)
            for r, w in zip(range(world), range(world), strict=True)
        ]

    first = loaders(old)
    seen = []
    for loader in first:
        loader.set_epoch(2)
        it = iter(loader)
        seen += [next(it)["index"] for _ in range(step)]
        loader.close()
    state = first[0].state_dict()
    assert all(loader.state_dict() == state for loader in first)
    resumed = loaders(new)
    rest: list[list[torch.Tensor]] = []
    for loader in resumed:
        loader.load_state_dict(json.loads(json.dumps(state)))  # plain JSON, as checkpoints keep it
        loader.set_epoch(2)
        steps = loader.steps_in_epoch
        rest.append([b["index"] for b in loader])
        assert len(rest[-1]) == steps
        assert loader.state_dict()["epoch"] == 3 and loader.state_dict()["history"] == []
    assert len({len(r) for r in rest}) == 1
    got = np.bincount(torch.cat(seen + [b for r in rest for b in r]).numpy(), minlength=N)
    assert got.min() >= 1 and got.sum() - N < old + new
    # The next epoch is an ordinary epoch of the new world size.
    nxt = [[b["index"] for b in loader] for loader in resumed]
    assert all(len(r) == len(resumed[0]) for r in nxt)
    got = np.bincount(torch.cat([b for r in nxt for b in r]).numpy(), minlength=N)
    assert got.min() >= 1 and got.sum() - N < new


def test_set_epoch_keeps_a_resumed_position_and_done_epochs_roll_over(ds: hpstore.Dataset) -> None:
    loader = Loader(ds, 100, fields=["label"], with_index=True)
    loader.set_epoch(3)
    it = iter(loader)
    head = [next(it)["index"] for _ in range(4)]
    state = loader.state_dict()
    assert (state["epoch"], state["step"]) == (3, 4)
    resumed = Loader(ds, 100, fields=["label"], with_index=True)
    resumed.load_state_dict(state)
    resumed.set_epoch(3)  # the usual "set_epoch at the top of the loop" keeps the position
    rest = [b["index"] for b in resumed]
    assert len(head) + len(rest) == len(loader)
    assert resumed.state_dict()["epoch"] == 4 and resumed.state_dict()["step"] == 0
    assert torch.equal(torch.sort(torch.cat(head + rest)).values, torch.arange(N))


def test_only_requested_fields_are_read(tmp_path: Path, data: dict[str, Any]) -> None:
    ds = write(tmp_path / "s", data)

    def epoch_bytes(fields: list[str] | None) -> tuple[float, Loader, list[dict[str, Any]]]:
        fresh = hpstore.open(ds.store.url).split("train")
        before = fresh.store.stats["bytes_read"]  # the manifest
        loader = Loader(fresh, 64, fields=fields)
        batches = list(loader)
        return fresh.store.stats["bytes_read"] - before, loader, batches

    few, loader, batches = epoch_bytes(["label"])
    everything, _, _ = epoch_bytes(None)
    assert set(batches[0]) == {"label"}
    label_bytes = sum(o.size for k, o in ds.store.manifest.objects.items() if "/label/c/" in k)
    assert loader.stats["bytes_read"] <= label_bytes  # the chunks asked for: labels only, each once
    # What the storage saw (shard indices included): label objects only, a fraction of everything.
    assert few <= label_bytes
    assert few * 5 < everything
    with pytest.raises(InputError, match="no field 'nope'"):
        Loader(ds, 64, fields=["nope"])


def test_cache_holding_half_the_data_hits_half_from_the_second_epoch(tmp_path: Path) -> None:
    cols = {"x": np.arange(20_000 * 8, dtype=np.int64).reshape(20_000, 8)}
    ds = write(tmp_path / "s", cols, Layout(chunk_bytes=8192, shard_bytes=65536, workers=1, writers=1))
    decoded = ds.spec.num_samples * 64
    loader = Loader(ds, 128, cache_bytes=decoded // 2, num_workers=2, shuffle_window=4)
    list(loader)
    whole = loader.stats["bytes_read"]  # the first epoch reads everything once
    for _ in range(3):
        before = loader.stats
        list(loader)
        after = loader.stats
        hits = after["chunk_hits"] - before["chunk_hits"]
        misses = after["chunk_misses"] - before["chunk_misses"]
        assert hits / (hits + misses) >= 0.45
        assert after["bytes_read"] - before["bytes_read"] < 0.6 * whole
    assert loader.stats["cache_peak_bytes"] <= decoded // 2
    assert loader.stats["evictions"] > 0


def _threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("hpstore-prefetch")}


@pytest.mark.parametrize("workers", [0, 2])  # 0: the error comes from a read-ahead
def test_a_corrupt_chunk_mid_epoch_raises_naming_the_object(
    tmp_path: Path, data: dict[str, Any], workers: int
) -> None:
    ds = write(tmp_path / "s", data)
    loader = Loader(ds, 32, fields=["image"], num_workers=workers, cache_bytes=0, prefetch_bytes=1 << 14)
    it = iter(loader)
    next(it)
    shards = sorted((tmp_path / "s").rglob("image/c/*/0/0"))
    for shard in shards:  # flip a byte in the first chunk of every shard: later windows must fail
        # In place (no truncate and rewrite): prefetch threads may be reading these files right now.
        with open(shard, "r+b") as f:
            f.seek(3)
            b = f.read(1)[0]
            f.seek(3)
            f.write(bytes([b ^ 0xFF]))
    with pytest.raises(CorruptObjectError, match=r"image/c/\d+/0/0: checksum mismatch"):
        for _ in it:
            pass
    assert not _threads()


# With 0 workers window 1 is read ahead before the damage, and a mapped Arrow chunk read before an
# in-place truncate ends the process with SIGBUS when touched (hpstore never truncates its files:
# new ones are renamed in), so truncation is tested where nothing is read ahead.
@pytest.mark.parametrize(("damage", "workers"), [("delete", 0), ("delete", 2), ("truncate", 2)])
def test_a_vanished_or_truncated_object_raises_instead_of_short_batches(
    tmp_path: Path, data: dict[str, Any], damage: str, workers: int
) -> None:
    ds = write(tmp_path / "s", data)
    loader = Loader(
        ds, 32, fields=["label", "blob", "image"], num_workers=workers, cache_bytes=0, prefetch_bytes=1 << 12
    )
    it = iter(loader)
    delivered = len(next(it)["label"])
    for part in [*(tmp_path / "s").rglob("blob/*.arrow"), *(tmp_path / "s").rglob("image/c/*/0/0")]:
        if damage == "delete":
            os.unlink(part)
        else:
            os.truncate(part, part.stat().st_size // 2)
    error = ObjectNotFoundError if damage == "delete" else HpstoreError
    with pytest.raises(error):
        for b in it:
            assert len(b["label"]) == len(b["blob"]) == len(b["image"]) == 32
            delivered += 32
    assert delivered < N
    assert not _threads()


def test_abandoned_iterations_leave_no_threads_and_no_growth(ds: hpstore.Dataset) -> None:
    loader = Loader(ds, 32, fields=["image", "label"], num_workers=3, prefetch_bytes=1 << 12)
    for _ in range(5):
        it = iter(loader)
        next(it)
        del it  # the last reference: the iterator is collected and stops its threads
        assert not _threads()
    list(loader)
    allocated = loader.buffers.allocated
    for _ in range(3):
        list(loader)
    assert loader.buffers.allocated == allocated  # window buffers are recycled, not reallocated
    it = iter(loader)
    next(it)
    iter(loader)  # a new iteration stops the old one's threads
    assert len(_threads()) <= 3


def test_a_dropped_loader_is_freed_at_once_without_the_garbage_collector(ds: hpstore.Dataset) -> None:
    import gc
    import weakref

    gc.collect()
    gc.disable()  # only reference counting: a reference cycle would keep the loader and its cache
    try:
        for workers in (0, 2):
            loader = Loader(ds, 32, num_workers=workers)
            list(loader)
            assert loader.stats["cache_resident_bytes"] > 0
            alive = weakref.ref(loader)
            cache = weakref.ref(loader.cache)
            del loader
            assert alive() is None and cache() is None
    finally:
        gc.enable()


def test_a_program_exiting_mid_epoch_stops_the_prefetch_threads_first(ds: hpstore.Dataset) -> None:
    """Python 3.11 stops daemon threads caught in C code at exit with pthread_exit, which can abort
    the process (SIGABRT) half-way through a torch or numpy call: the loader's threads must be gone
    before that. The probe registers its exit check before hpstore, so it runs after hpstore's."""
    import subprocess
    import sys

    code = f"""
import atexit, threading
@atexit.register
def probe():
    print(sorted(t.name for t in threading.enumerate() if t.name.startswith("hpstore-")), flush=True)
import hpstore
ds = hpstore.open({ds.store.url!r}).split("train")
it = iter(hpstore.Loader(ds, 32, num_workers=3, prefetch_bytes=1 << 12))
next(it)  # the first window is built on this thread; the threads start at the next batch
next(it)
print(sum(t.name.startswith("hpstore-prefetch") for t in threading.enumerate()), flush=True)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    running, at_exit = out.stdout.splitlines()
    assert running == "3" and at_exit == "[]"


def test_bad_arguments_fail_clearly(ds: hpstore.Dataset) -> None:
    with pytest.raises(InputError, match="batch_size"):
        Loader(ds, 0)
    with pytest.raises(InputError, match="rank 2 is out of range"):
        Loader(ds, 8, rank=2, world_size=2)
    with pytest.raises(InputError, match="num_workers"):
        Loader(ds, 8, num_workers=-1)
    with pytest.raises(InputError, match="epoch"):
        Loader(ds, 8).set_epoch(-1)


def test_malloc_tuning_is_applied_once_and_can_be_switched_off() -> None:
    import subprocess
    import sys

    from hpstore.memory import keep_freed_memory

    assert keep_freed_memory() == keep_freed_memory()
    code = "from hpstore.memory import keep_freed_memory; print(keep_freed_memory())"
    env = {**os.environ, "HPSTORE_MALLOC_TUNING": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pinned_batches_survive_async_copies_after_being_dropped(
    ds: hpstore.Dataset, data: dict[str, Any]
) -> None:
    loader = Loader(
        ds, 32, fields=["image"], with_index=True, num_workers=2, cache_bytes=0, prefetch_bytes=1 << 12
    )
    assert loader.pin_memory
    copies = []
    for _ in range(3):
        for b in loader:
            assert b["image"].is_pinned()
            copies.append(
                (b["index"].to("cuda", non_blocking=True), b["image"].to("cuda", non_blocking=True))
            )
            del b  # the host buffer may be recycled now; the copy must still see the right rows
    torch.cuda.synchronize()
    for idx, image in copies:
        assert np.array_equal(image.cpu().numpy(), data["image"][idx.cpu().numpy()])


def test_the_first_window_is_built_inline_and_batches_match_the_threads_order(ds: hpstore.Dataset) -> None:
    def epochs(workers: int, resume_at: int | None = None) -> list[tuple[int, ...]]:
        loader = Loader(ds, 40, fields=["image", "label"], with_index=True, num_workers=workers)
        if resume_at is not None:
            head = Loader(ds, 40, fields=["image", "label"], num_workers=0)
            it = iter(head)
            for _ in range(resume_at):
                next(it)
            loader.load_state_dict(head.state_dict())
        out = []
        for _ in range(2):
            it = iter(loader)
            first = next(it)
            # The run's first window comes from this thread: none of its prefetch workers has
            # started yet (from the second epoch on, the loader's idle threads are kept for them).
            run = loader._run() if loader._run is not None else None
            assert run is not None and run.prefetcher.alive_threads == 0
            assert len(_threads()) == (0 if not out else workers)
            for b in [first, *it]:
                assert np.array_equal(b["label"].numpy(), b["index"].numpy())
                out.append(tuple(b["index"].tolist()))
        return out

    assert epochs(2) == epochs(0)
    assert epochs(2, resume_at=5) == epochs(0, resume_at=5)
    assert not _threads()


def test_mapped_and_read_chunks_give_the_same_batches(
    ds: hpstore.Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    def batches(expect_mapped: bool) -> list[dict[str, Any]]:
        fresh = hpstore.open(ds.store.url).split("train")
        out = list(Loader(fresh, 64, fields=["image", "vec", "blob", "ragged"], num_workers=2))
        assert fresh.reader.mapped is expect_mapped
        return out

    mapped = batches(True)
    monkeypatch.setattr(LocalStorage, "map_reads", False)
    read = batches(False)
    assert len(mapped) == len(read)
    for a, b in zip(mapped, read, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]


def test_without_window_threads_the_next_window_is_read_ahead_while_the_consumer_works(
    ds: hpstore.Dataset,
) -> None:
    def run(workers: int) -> tuple[list[tuple[int, ...]], Loader]:
        loader = Loader(
            ds, 40, fields=["image", "label"], with_index=True, num_workers=workers, shuffle_window=2
        )
        it = iter(loader)
        out = [tuple(next(it)["index"].tolist())]
        if workers == 0:
            plan = loader._plan(0)
            assert plan.num_windows >= 3
            first = set(plan.window_chunks(0))
            second = len(set(plan.window_chunks(1)) - first) * 2  # window 1's new (field, chunk) keys
            deadline = time.monotonic() + 10
            # The consumer holds window 0 and asks for nothing: window 1 is read and decoded anyway.
            while loader.stats["chunk_ahead"] < second and time.monotonic() < deadline:
                time.sleep(0.001)
            assert loader.stats["chunk_ahead"] == second
            assert loader.stats["chunk_misses"] == len(first) * 2 + second
        out += [tuple(b["index"].tolist()) for b in it]
        return out, loader

    ahead, loader = run(0)
    assert ahead == run(2)[0]
    windows = loader._plan(0).num_windows
    s = loader.stats
    first = len(loader._plan(0).window_chunks(0)) * 2
    assert s["chunk_misses"] - s["chunk_ahead"] == first  # every window's chunks but the first's
    assert s["windows"] == windows
    loader.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("hpstore-ahead")]
