"""The epoch plan, checked as pure functions over many layouts, seeds, epochs and world sizes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hpstore.errors import InputError
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
