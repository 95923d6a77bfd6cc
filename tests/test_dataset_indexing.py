"""Dataset indexing: ints, slices and index arrays agree with the source; a batch reads each chunk once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import hpstore
from hpstore.format.writer import Layout
from hpstore.storage.local import LocalStorage
from tests.support.stores import sample_columns, write_store

N = 400


def as_plain(value: Any) -> Any:
    return value.tolist() if isinstance(value, np.ndarray) else value


def expected(cols: dict[str, Any], idx: np.ndarray) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, col in cols.items():
        out[name] = col[idx] if isinstance(col, np.ndarray) else [col[int(i)].as_py() for i in idx]
    return out


def assert_rows(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert set(got) == set(want)
    for name, w in want.items():
        if isinstance(w, np.ndarray):
            assert got[name].dtype == w.dtype and np.array_equal(got[name], w), name
        else:
            assert [as_plain(v) for v in got[name]] == w, name


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> tuple[hpstore.Dataset, dict[str, Any]]:
    root = tmp_path_factory.mktemp("indexing")
    cols = sample_columns(N, seed=7)
    write_store(LocalStorage(str(root)), {"train": cols})
    ds = hpstore.open(str(root)).split("train")
    assert ds.spec.num_chunks > 2 * ds.spec.chunks_per_shard  # many chunks, several shards
    return ds, cols


@pytest.mark.parametrize("i", [0, 1, 57, N - 1, -1, -N, -123])
def test_int_index(split: tuple[hpstore.Dataset, dict[str, Any]], i: int) -> None:
    ds, cols = split
    row = ds[i]
    want = expected(cols, np.array([i % N]))
    assert np.array_equal(row["image"], want["image"][0]) and row["image"].shape == (6, 5)
    assert row["label"] == want["label"][0]
    assert row["blob"] == want["blob"][0] and isinstance(row["blob"], bytes)
    assert row["text"] == want["text"][0] and isinstance(row["text"], str)
    assert as_plain(row["ragged"]) == want["ragged"][0]
    assert row["meta"] == want["meta"][0]


@pytest.mark.parametrize("i", [N, -N - 1, 10**9])
def test_int_index_out_of_range(split: tuple[hpstore.Dataset, dict[str, Any]], i: int) -> None:
    ds, _ = split
    with pytest.raises(IndexError, match=f"of {N} samples"):
        ds[i]


@pytest.mark.parametrize(
    "key",
    [
        slice(5, 40),
        slice(None, None, 7),
        slice(390, None),
        slice(-10, None),
        slice(300, 20, -9),
        slice(10, 10),
    ],
    ids=str,
)
def test_slice(split: tuple[hpstore.Dataset, dict[str, Any]], key: slice) -> None:
    ds, cols = split
    assert_rows(ds[key], expected(cols, np.arange(N)[key]))


def test_index_arrays_shuffled_and_repeated(split: tuple[hpstore.Dataset, dict[str, Any]]) -> None:
    ds, cols = split
    rng = np.random.default_rng(11)
    shuffled = rng.permutation(N)
    assert_rows(ds[shuffled], expected(cols, shuffled))
    repeated = np.concatenate([shuffled[:50], shuffled[:50], [3, 3, 3], -np.arange(1, 6)])
    assert_rows(ds[repeated], expected(cols, repeated % N))
    as_list = [int(x) for x in shuffled[:20]]
    assert_rows(ds[as_list], expected(cols, np.array(as_list)))
    with pytest.raises(IndexError):
        ds[np.array([0, N])]


def test_read_selects_fields(split: tuple[hpstore.Dataset, dict[str, Any]]) -> None:
    ds, cols = split
    got = ds.read([4, 2], ["label", "text"])
    assert_rows(got, expected({"label": cols["label"], "text": cols["text"]}, np.array([4, 2])))
    with pytest.raises(hpstore.InputError, match="no field 'nope'"):
        ds.read([0], ["nope"])


def test_batched_read_fetches_each_chunk_once(tmp_path: Path) -> None:
    """One request and exactly the chunk's bytes per needed chunk, however often and in whatever
    order its samples are asked for. One chunk per shard, so no two chunks coalesce."""
    rng = np.random.default_rng(2)
    cols = {"image": rng.integers(0, 255, (N, 6, 5), dtype=np.uint8), "text": sample_columns(N)["text"]}
    write_store(
        LocalStorage(str(tmp_path)), {"train": cols}, layout=Layout(chunk_bytes=1024, shard_bytes=1024)
    )
    ds = hpstore.open(str(tmp_path)).split("train")
    assert ds.spec.chunks_per_shard == 1
    stats = ds.store.storage.stats

    idx = rng.permutation(N)[:60]
    idx = np.concatenate([idx, idx[::-1], idx[:7]])  # each sample three times or so, shuffled
    chunks = sorted(set((idx // ds.spec.chunk_rows).tolist()))
    assert 1 < len(chunks) < ds.spec.num_chunks
    ds.read(idx)  # loads the shard indices, which are kept
    for fields in (["image"], ["text"], ["image", "text"]):
        before = stats.as_dict()
        got = ds.read(idx, fields)
        after = stats.as_dict()
        chunk_bytes = sum(e - s for f in fields for _, s, e in ds.reader.ranges(f, chunks))
        assert after["read_requests"] - before["read_requests"] == len(chunks) * len(fields)
        assert after["bytes_read"] - before["bytes_read"] == chunk_bytes
        assert_rows(got, expected({f: cols[f] for f in fields}, idx))


def test_neighbouring_chunks_coalesce_into_one_request(tmp_path: Path) -> None:
    cols = {"image": np.arange(N * 30, dtype=np.uint8).reshape(N, 6, 5)}
    write_store(
        LocalStorage(str(tmp_path)), {"train": cols}, layout=Layout(chunk_bytes=1024, shard_bytes=8192)
    )
    ds = hpstore.open(str(tmp_path)).split("train")
    rows = ds.spec.shard_rows
    ds.read([0])  # shard index
    before = ds.store.storage.stats.read_requests
    got = ds.read(np.arange(rows))  # every chunk of shard 0
    assert ds.store.storage.stats.read_requests - before == 1
    assert np.array_equal(got["image"], cols["image"][:rows])


# -- NumPy semantics, or a clear refusal --------------------------------------------------------------


def test_boolean_masks_select_rows(split: tuple[hpstore.Dataset, dict[str, Any]]) -> None:
    ds, cols = split
    mask = np.random.default_rng(3).random(N) < 0.2
    assert_rows(ds[mask], expected(cols, np.flatnonzero(mask)))
    assert_rows(ds[mask.tolist()], expected(cols, np.flatnonzero(mask)))
    assert_rows(ds.read(mask, ["label"]), expected({"label": cols["label"]}, np.flatnonzero(mask)))
    assert len(ds[np.zeros(N, bool)]["label"]) == 0
    for wrong in (mask[:-1], np.ones(N + 1, bool)):
        with pytest.raises(hpstore.InputError, match="boolean mask of length") as err:
            ds[wrong]
        assert isinstance(err.value, IndexError)


def test_empty_and_zero_d_indices(split: tuple[hpstore.Dataset, dict[str, Any]]) -> None:
    ds, cols = split
    assert len(ds[[]]["label"]) == 0 and ds[[]]["image"].shape == (0, 6, 5)
    assert ds[np.array(7)]["label"] == cols["label"][7]
    assert ds[np.uint16(9)]["label"] == cols["label"][9]
    assert_rows(ds[np.array([3, 1], dtype=np.uint8)], expected(cols, np.array([3, 1])))
    assert_rows(ds[...], expected(cols, np.arange(N)))


@pytest.mark.parametrize(
    "key",
    [2.7, np.float64(2.0), "a", b"a", None, True, np.bool_(False), (1, 2), np.array([1.0, 2.0]), ["a"]],
    ids=repr,
)
def test_keys_that_are_not_row_indices_are_refused(
    split: tuple[hpstore.Dataset, dict[str, Any]], key: Any
) -> None:
    ds, _ = split
    with pytest.raises(hpstore.InputError, match="split 'train'") as err:
        ds[key]
    assert isinstance(err.value, IndexError) and isinstance(err.value, TypeError)


@pytest.mark.parametrize("key", [np.arange(6).reshape(2, 3), [[1, 2], [3, 4]], [[1], [2, 3]]], ids=str)
def test_multi_dimensional_indices_are_refused(
    split: tuple[hpstore.Dataset, dict[str, Any]], key: Any
) -> None:
    ds, _ = split
    with pytest.raises(hpstore.InputError, match="1-d") as err:
        ds[key]
    assert isinstance(err.value, IndexError)
    with pytest.raises(IndexError):
        ds.read(key)


def test_float_indices_are_refused_by_read_too(split: tuple[hpstore.Dataset, dict[str, Any]]) -> None:
    ds, _ = split
    with pytest.raises(TypeError, match="integers or booleans"):
        ds.read(np.array([2.7]))


def test_a_slice_costs_what_it_reads(tmp_path: Path) -> None:
    """ds[a:b] must not build an index over the whole split (8 GB for 10^9 rows): reading 10 rows
    of a 2-million-row split allocates far less than one int64 per row (16 MB)."""
    import tracemalloc

    n = 2_000_000
    labels = (np.arange(n) % 251).astype(np.uint8)
    write_store(
        LocalStorage(str(tmp_path)),
        {"train": {"label": labels}},
        layout=Layout(chunk_bytes=16 << 10, shard_bytes=1 << 20),
        batch_rows=1 << 18,
    )
    ds = hpstore.open(str(tmp_path)).split("train")
    ds[n - 1]  # shard indices loaded
    tracemalloc.start()
    try:
        got = ds[n - 20 : n - 10]["label"]
        strided = ds[5 : n : n // 4]["label"]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(got, labels[n - 20 : n - 10])
    np.testing.assert_array_equal(strided, labels[5 : n : n // 4])
    assert peak < 2 << 20, peak
