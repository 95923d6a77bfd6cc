"""The epoch plan, checked as pure functions over many layouts, seeds, epochs and world sizes."""

from __future__ import annotations

import dataclasses
import math
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hpstore.errors import InputError
from hpstore.loading import plan as plan_module
from hpstore.loading.plan import EpochPlan, PlanSpec, assign, chunk_order

specs = st.builds(
    PlanSpec,
    num_samples=st.integers(1, 3000),
    chunk_rows=st.integers(1, 300),
    batch_size=st.integers(1, 64),
    world_size=st.integers(1, 8),
    seed=st.integers(0, 2**32),
    shuffle=st.booleans(),
    drop_last=st.booleans(),
    window_chunks=st.integers(1, 6),
)


def rank_batches(spec: PlanSpec, epoch: int, rank: int) -> list[np.ndarray]:
    plan = EpochPlan(spec, epoch, rank)
    out: list[np.ndarray] = []
    for j in range(plan.num_windows):
        w = plan.window(j)
        idx = w.indices()
        out.extend(idx[slice(*w.batch_bounds(k))] for k in range(w.num_batches))
    return out


@settings(max_examples=150, deadline=None)
@given(spec=specs, epoch=st.integers(0, 50))
def test_every_sample_once_across_ranks_with_equal_steps(spec: PlanSpec, epoch: int) -> None:
    per_rank = [rank_batches(spec, epoch, r) for r in range(spec.world_size)]
    # Equal step counts and equal batch sizes at every step on every rank (DDP would hang otherwise).
    sizes = [[len(b) for b in batches] for batches in per_rank]
    assert all(len(s) == spec.steps_per_epoch for s in sizes)
    assert all(s == sizes[0] for s in sizes)
    everything = np.concatenate([np.concatenate(b) if b else np.zeros(0, np.int64) for b in per_rank])
    counts = np.bincount(everything, minlength=spec.num_samples)
    assert len(counts) == spec.num_samples
    if spec.drop_last:
        # Full batches only; fewer than world_size * batch_size samples left out, none repeated.
        assert all(n == spec.batch_size for s in sizes for n in s)
        assert counts.max(initial=0) <= 1
        assert spec.num_samples - counts.sum() < spec.world_size * spec.batch_size
    else:
        # Everything at least once; only the last batch may be short; the wrap-around pads fewer
        # than world_size samples (for tiny datasets, cycling: at most ceil(W / N) copies).
        assert counts.min() >= 1
        assert all(n == spec.batch_size for s in sizes for n in s[:-1])
        assert counts.sum() - spec.num_samples < spec.world_size
        assert counts.max() <= 1 + -(-spec.world_size // spec.num_samples)


@settings(max_examples=100, deadline=None)
@given(spec=specs, epoch=st.integers(0, 50), workers=st.integers(0, 4), data=st.data())
def test_workers_partition_a_rank_exactly(
    spec: PlanSpec, epoch: int, workers: int, data: st.DataObject
) -> None:
    rank = data.draw(st.integers(0, spec.world_size - 1))
    plan = EpochPlan(spec, epoch, rank)
    first = data.draw(st.integers(0, plan.num_windows)) if plan.num_windows else 0
    owned = [
        [j for j in range(first, plan.num_windows) if assign(j, first, workers) == w]
        for w in range(max(1, workers))
    ]
    flat = sorted(j for ws in owned for j in ws)
    assert flat == list(range(first, plan.num_windows))
    # Round-robin: window order is recovered by taking one window from each worker in turn.
    assert all(len(owned[0]) - len(ws) in (0, 1) for ws in owned)


@settings(max_examples=100, deadline=None)
@given(spec=specs, epoch=st.integers(0, 50))
def test_one_epoch_on_one_rank_is_a_permutation(spec: PlanSpec, epoch: int) -> None:
    one = PlanSpec(**{**spec.__dict__, "world_size": 1, "drop_last": False})
    idx = EpochPlan(one, epoch, 0).indices()
    assert np.array_equal(np.sort(idx), np.arange(spec.num_samples))


@settings(max_examples=60, deadline=None)
@given(spec=specs, epoch=st.integers(0, 50), data=st.data())
def test_deterministic_and_resumable_at_any_step(spec: PlanSpec, epoch: int, data: st.DataObject) -> None:
    rank = data.draw(st.integers(0, spec.world_size - 1))
    full = EpochPlan(spec, epoch, rank).indices()
    assert np.array_equal(full, EpochPlan(spec, epoch, rank).indices())
    step = data.draw(st.integers(0, spec.steps_per_epoch))
    rest = EpochPlan(spec, epoch, rank).indices(step)
    assert np.array_equal(rest, full[min(step * spec.batch_size, len(full)) :])


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(2000, 20000),
    chunk_rows=st.integers(10, 200),
    seed=st.integers(0, 1000),
    epoch=st.integers(0, 20),
)
def test_epochs_and_seeds_differ(n: int, chunk_rows: int, seed: int, epoch: int) -> None:
    spec = PlanSpec(num_samples=n, chunk_rows=chunk_rows, batch_size=32, seed=seed)
    a = EpochPlan(spec, epoch, 0).indices()
    assert not np.array_equal(a, EpochPlan(spec, epoch + 1, 0).indices())
    other = PlanSpec(num_samples=n, chunk_rows=chunk_rows, batch_size=32, seed=seed + 1)
    assert not np.array_equal(a, EpochPlan(other, epoch, 0).indices())


@settings(max_examples=60, deadline=None)
@given(spec=specs, epoch=st.integers(0, 50), data=st.data())
def test_a_rank_reads_only_its_share_of_chunks(spec: PlanSpec, epoch: int, data: st.DataObject) -> None:
    rank = data.draw(st.integers(0, spec.world_size - 1))
    plan = EpochPlan(spec, epoch, rank)
    chunks: set[int] = set()
    for j in range(plan.num_windows):
        w = plan.window(j)
        assert set(w.chunks) == set((w.indices() // spec.chunk_rows).tolist())
        chunks.update(w.chunks)
    # A contiguous span of the chunk-ordered sequence: its own chunks plus at most two partial ones
    # (plus the wrap-around's, when the dataset is smaller than the world).
    limit = -(-spec.samples_per_rank // spec.chunk_rows) + 2
    if spec.num_samples >= spec.world_size:
        assert len(chunks) <= limit


def test_window_mixes_only_within_its_chunks_and_without_shuffle_keeps_order() -> None:
    spec = PlanSpec(num_samples=1000, chunk_rows=10, batch_size=8, window_chunks=4)
    plan = EpochPlan(spec, 0, 0)
    w = plan.window(0)
    assert w.rows == spec.window_rows == 40
    assert len(set(w.chunks)) <= 5
    plain = PlanSpec(num_samples=1000, chunk_rows=10, batch_size=8, shuffle=False)
    assert np.array_equal(EpochPlan(plain, 3, 0).indices(), np.arange(1000))
    assert np.array_equal(chunk_order(plain, 7), np.arange(100))


def test_bad_specs_are_rejected_with_clear_errors() -> None:
    with pytest.raises(InputError, match="batch_size"):
        PlanSpec(num_samples=10, chunk_rows=2, batch_size=0)
    with pytest.raises(InputError, match="rank 3 out of range"):
        EpochPlan(PlanSpec(num_samples=10, chunk_rows=2, batch_size=2, world_size=2), 0, 3)
    plan = EpochPlan(PlanSpec(num_samples=10, chunk_rows=2, batch_size=2), 0, 0)
    with pytest.raises(InputError, match="step 6 out of range"):
        plan.start_of(6)


# -- ramp (small first windows) and elastic resume ------------------------------------------------

ramp_specs = st.builds(
    PlanSpec,
    num_samples=st.integers(1, 3000),
    chunk_rows=st.integers(1, 300),
    batch_size=st.integers(1, 64),
    world_size=st.integers(1, 8),
    seed=st.integers(0, 2**32),
    shuffle=st.booleans(),
    drop_last=st.booleans(),
    window_chunks=st.integers(1, 12),
    first_window_chunks=st.integers(1, 4),
)


def batches_of(plan: EpochPlan, step: int = 0) -> list[np.ndarray]:
    """The plan's batches from ``step`` on, read window by window as the loader does."""
    j0, k0 = plan.start_of(step)
    out: list[np.ndarray] = []
    for j in range(j0, plan.num_windows):
        w = plan.window(j)
        idx = w.indices()
        out.extend(idx[slice(*w.batch_bounds(k))] for k in range(k0 if j == j0 else 0, w.num_batches))
    return out


def counts(batches: list[np.ndarray], n: int) -> np.ndarray:
    flat = np.concatenate(batches) if batches else np.zeros(0, np.int64)
    return np.bincount(flat, minlength=n)


@settings(max_examples=150, deadline=None)
@given(spec=ramp_specs, epoch=st.integers(0, 50), data=st.data())
def test_with_a_ramp_every_sample_once_equal_steps_and_resumable(
    spec: PlanSpec, epoch: int, data: st.DataObject
) -> None:
    # The cap on the first window's rows, lowered so that it binds at these sizes too.
    cap = data.draw(st.sampled_from([plan_module.FIRST_WINDOW_ROWS, 1, 7, 100]))
    with mock.patch.object(plan_module, "FIRST_WINDOW_ROWS", cap):
        check_ramp(spec, epoch, data)


def check_ramp(spec: PlanSpec, epoch: int, data: st.DataObject) -> None:
    per_rank = [batches_of(EpochPlan(spec, epoch, r)) for r in range(spec.world_size)]
    sizes = [[len(b) for b in bs] for bs in per_rank]
    assert all(s == sizes[0] for s in sizes) and len(sizes[0]) == spec.steps_per_epoch
    c = counts([b for bs in per_rank for b in bs], spec.num_samples)
    if spec.drop_last:
        assert c.max(initial=0) <= 1 and spec.num_samples - c.sum() < spec.world_size * spec.batch_size
    else:
        assert c.min() >= 1 and c.sum() - spec.num_samples < spec.world_size
    # Window sizes double from the first one up to full size; batches never straddle windows.
    plan = EpochPlan(spec, epoch, 0)
    rows = [plan.window(j).rows for j in range(plan.num_windows)]
    assert all(r <= spec.window_rows for r in rows)
    assert all(r % spec.batch_size == 0 for r in rows[:-1])
    step = data.draw(st.integers(0, plan.steps))
    full = np.concatenate(per_rank[0]) if per_rank[0] else np.zeros(0, np.int64)
    rest = EpochPlan(spec, epoch, 0).indices(step)
    assert np.array_equal(rest, full[min(step * spec.batch_size, len(full)) :])


def check_elastic(spec: PlanSpec, epoch: int, history: list[tuple[int, int]]) -> None:
    """Run the epoch on the world sizes of ``history`` in turn, each for its number of steps, then to
    the end on ``spec.world_size`` ranks; check the whole against one uninterrupted epoch."""
    first_world = history[0][0] if history else spec.world_size
    ordinary = PlanSpec(**{**spec.__dict__, "world_size": first_world})
    want = counts(
        [b for r in range(first_world) for b in batches_of(EpochPlan(ordinary, epoch, r))], spec.num_samples
    )
    got: list[np.ndarray] = []
    for level, (w, s) in enumerate(history):
        at = PlanSpec(**{**spec.__dict__, "world_size": w})
        for r in range(w):
            got.extend(batches_of(EpochPlan(at, epoch, r, history[:level]))[:s])
    last = [batches_of(EpochPlan(spec, epoch, r, history)) for r in range(spec.world_size)]
    sizes = [[len(b) for b in bs] for bs in last]
    # Every rank of the resumed run takes the same number of steps, with equal batch sizes.
    assert all(s == sizes[0] for s in sizes)
    assert len(sizes[0]) == EpochPlan(spec, epoch, 0, history).steps
    got.extend(b for bs in last for b in bs)
    have = counts(got, spec.num_samples)
    extra_bound = sum(w for w, _ in history) + spec.world_size
    if spec.drop_last:
        # Nothing twice; what is missing is at most each run's dropped tail; every batch is full.
        assert all(n == spec.batch_size for s in sizes for n in s)
        assert (have <= want).all()
        assert want.sum() - have.sum() < extra_bound * spec.batch_size
    else:
        # Everything the uninterrupted epoch delivers; extra copies only from each run's wrap-around.
        assert (have >= want).all()
        assert have.sum() - want.sum() < extra_bound
        assert all(n == spec.batch_size for s in sizes for n in s[:-1])


@settings(max_examples=200, deadline=None)
@given(spec=ramp_specs, old_world=st.integers(1, 8), epoch=st.integers(0, 20), data=st.data())
def test_elastic_resume_delivers_the_rest_once_with_equal_steps(
    spec: PlanSpec, old_world: int, epoch: int, data: st.DataObject
) -> None:
    """Saved on ``old_world`` ranks at a random step, continued on ``spec.world_size`` (1..8 each)."""
    old = PlanSpec(**{**spec.__dict__, "world_size": old_world})
    step = data.draw(st.integers(0, old.steps_per_epoch))
    check_elastic(spec, epoch, [(old_world, step)])


@settings(max_examples=80, deadline=None)
@given(spec=specs, worlds=st.lists(st.integers(1, 8), min_size=2, max_size=3), data=st.data())
def test_elastic_resume_of_an_elastic_resume(spec: PlanSpec, worlds: list[int], data: st.DataObject) -> None:
    history: list[tuple[int, int]] = []
    for w in worlds:
        at = PlanSpec(**{**spec.__dict__, "world_size": w})
        steps = EpochPlan(at, 3, 0, history).steps
        history.append((w, data.draw(st.integers(0, steps))))
    check_elastic(spec, 3, history)


def test_elastic_resume_on_the_same_world_size_starts_where_the_old_ranks_stopped() -> None:
    """The remainder keeps each old rank's undelivered rows in natural order, rank by rank."""
    spec = PlanSpec(num_samples=1000, chunk_rows=50, batch_size=10, world_size=2, seed=3)
    resumed = EpochPlan(spec, 0, 0, [(2, 7)])
    assert resumed.total == 1000 - 2 * 70
    assert resumed.steps == 43
    plain = EpochPlan(spec, 0, 0)
    left = np.sort(plain.indices(7))
    assert np.array_equal(np.sort(np.concatenate([b for b in batches_of(resumed)])), left)


def test_plans_cost_what_their_chunks_cost_not_their_samples() -> None:
    """10^9 one-byte samples in 1 MiB chunks on 8 ranks: the plan holds pieces over chunks only
    (about 120 chunks per rank), and a window's rows exist only while it is built."""
    spec = PlanSpec(num_samples=10**9, chunk_rows=1 << 20, batch_size=256, world_size=8, window_chunks=1)
    plan = EpochPlan(spec, 5, 3)
    assert len(plan.pieces) <= spec.num_chunks // 8 + 2
    j, _ = plan.start_of(plan.steps - 1)
    assert j == plan.num_windows - 1
    last = plan.window_pieces(j)
    assert int((last[:, 2] - last[:, 1]).sum()) == plan.span - plan.window_bounds(j)[0]
    resumed = EpochPlan(dataclasses.replace(spec, world_size=3), 5, 2, [(8, 1000)])
    assert len(resumed.pieces) < 8 * (spec.window_rows + 2) and resumed.total == 10**9 - 8 * 256_000


@settings(max_examples=100, deadline=None)
@given(spec=ramp_specs, epoch=st.integers(0, 9), data=st.data())
def test_chunks_by_window_lists_what_each_window_reads(
    spec: PlanSpec, epoch: int, data: st.DataObject
) -> None:
    world = data.draw(st.integers(1, 8))
    step = data.draw(st.integers(0, PlanSpec(**{**spec.__dict__, "world_size": world}).steps_per_epoch))
    plan = EpochPlan(spec, epoch, data.draw(st.integers(0, spec.world_size - 1)), [(world, step)])
    first = data.draw(st.integers(0, plan.num_windows))
    want = [plan.window_chunks(j) for j in range(first, plan.num_windows)]
    assert plan.chunks_by_window(first) == want


def test_the_first_window_is_small_even_when_one_chunk_holds_millions_of_rows() -> None:
    # One-byte samples: a 1 MiB chunk holds 2^20 rows. The ramp starts at FIRST_WINDOW_ROWS rows and
    # doubles up to the full window; with ordinary chunks (fewer rows) it starts at one chunk.
    from hpstore.loading.plan import FIRST_WINDOW_ROWS

    tiny = PlanSpec(
        num_samples=10**9, chunk_rows=1 << 20, batch_size=256, window_chunks=16, first_window_chunks=1
    )
    assert tiny.ramp[0] * 256 == FIRST_WINDOW_ROWS
    assert [b * 2 for b in tiny.ramp[:-1]] == list(tiny.ramp[1:]) and tiny.ramp[-1] < tiny.batches_per_window
    plan = EpochPlan(tiny, 3, 0)
    assert plan.window_bounds(0) == (0, FIRST_WINDOW_ROWS)
    assert len(plan.window(0).order) == FIRST_WINDOW_ROWS  # the permutation a first batch waits for
    digits = PlanSpec(
        num_samples=60_000, chunk_rows=1337, batch_size=256, window_chunks=16, first_window_chunks=1
    )
    assert digits.ramp[0] == math.ceil(1337 / 256)
