"""Checkpoint plans and formats as pure functions: the state tree, chunking, retention, manifest."""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hpstore.checkpoint.manifest import CheckpointManifest
from hpstore.checkpoint.plan import (
    ALIGN,
    DIRECT_ALIGN,
    array_key,
    array_specs,
    chunk_shape,
    chunk_specs,
    is_contiguous_chunking,
    parse_step,
    retention_plan,
    staging_offsets,
    step_prefix,
)
from hpstore.checkpoint.tree import flatten, unflatten
from hpstore.errors import CheckpointError
from hpstore.format.manifest import ObjectEntry
from hpstore.storage.direct_io import DIRECT_MIN

# -- the state tree ---------------------------------------------------------------------------


def roundtrip(state: Any) -> Any:
    flat = flatten(state)
    tree = json.loads(json.dumps(flat.tree, allow_nan=False))  # must survive strict JSON
    return unflatten(tree, flat.leaves)


def test_tree_keeps_types_that_plain_json_loses() -> None:
    state = {
        "t": (1, 2, [3, (4,)]),
        3: "int key",
        (1, "a"): "tuple key",
        None: None,
        True: False,
        "floats": [0.1, -0.0, float("inf"), float("-inf"), 1e308, 5e-324],
        "big": 2**100,
        "c": 1 + 2j,
        "np": [np.float32(1.5), np.int64(-3), np.bool_(True), np.uint8(7)],
        "dtype": torch.bfloat16,
        "s": "ünïcode\x00",
    }
    out = roundtrip(state)
    assert out == state
    assert type(out["t"]) is tuple and type(out["t"][2]) is list and type(out["t"][2][1]) is tuple
    assert [type(x) for x in out["np"]] == [np.float32, np.int64, np.bool_, np.uint8]
    assert str(out["floats"][1]) == "-0.0"
    assert math.isnan(roundtrip({"x": float("nan")})["x"])


def test_tree_keeps_ordered_dict_and_state_dict_metadata() -> None:
    sd = torch.nn.BatchNorm1d(3).state_dict()
    out = roundtrip(sd)
    assert type(out) is OrderedDict and list(out) == list(sd)
    assert out._metadata == sd._metadata  # type: ignore[attr-defined]


def test_tree_refers_to_arrays_by_index_and_records_paths() -> None:
    state = {"model": {"w": torch.ones(2)}, "opt": {"state": {0: {"m": np.zeros(3)}}}}
    flat = flatten(state)
    assert [type(x) for x in flat.leaves] == [torch.Tensor, np.ndarray]
    assert flat.paths == [("model", "w"), ("opt", "state", 0, "m")]
    out = unflatten(flat.tree, flat.leaves)
    assert out["model"]["w"] is flat.leaves[0]


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"x": object()}, r"state\[x\]: cannot save a builtins.object"),
        ({"x": {1, 2}}, r"state\[x\]: cannot save a builtins.set"),
        ({frozenset(): 1}, "dict key"),
        ({"x": np.datetime64("2020-01-01")}, "numpy scalar"),
    ],
)
def test_tree_refuses_what_it_cannot_store(bad: Any, match: str) -> None:
    with pytest.raises(CheckpointError, match=match):
        flatten(bad)


def test_tree_refuses_cycles() -> None:
    a: list[Any] = []
    a.append(a)
    with pytest.raises(CheckpointError, match="cycle"):
        flatten({"a": a})


@pytest.mark.parametrize(
    "tree, match",
    [
        ({"pickle": "gASV"}, "unknown tag"),
        ({"int": "3"}, "'int' holds"),
        ({"int": True}, "'int' holds"),
        ({"float": "1e3"}, "'float' holds"),
        ({"tensor": 5}, "out of range"),
        ({"ndarray": 0}, "is not a ndarray"),
        ({"dict": [[{"list": []}, {"none": None}]]}, "unhashable"),
        ({"npscalar": ["object", {"int": 1}]}, "not numeric"),
        ({"torch.dtype": "Tensor"}, "unknown torch dtype"),
        ({"a": 1, "b": 2}, "one-key"),
        ([1], "one-key"),
    ],
)
def test_untrusted_tree_is_validated(tree: Any, match: str) -> None:
    with pytest.raises(CheckpointError, match=match):
        unflatten(tree, [torch.zeros(1)])


# -- chunking ---------------------------------------------------------------------------------

shapes = st.lists(st.integers(0, 12), min_size=0, max_size=4).map(tuple)


@settings(max_examples=300, deadline=None)
@given(shape=shapes, itemsize=st.sampled_from([1, 2, 4, 8, 16]), target=st.integers(16, 2048))
def test_chunks_tile_the_array_bytes_exactly(shape: tuple[int, ...], itemsize: int, target: int) -> None:
    chunks = chunk_shape(shape, itemsize, target)
    assert is_contiguous_chunking(shape, chunks)
    specs = chunk_specs(shape, chunks, itemsize)
    nbytes = math.prod(shape) * itemsize
    covered = 0
    for c in specs:
        assert c.offset == covered, "chunks are consecutive byte ranges in C order"
        assert 0 < c.nbytes <= c.stored == math.prod(chunks) * itemsize
        covered += c.nbytes
    assert covered == nbytes
    assert len({c.key for c in specs}) == len(specs)
    # rows are rounded up to split the axis evenly (a chunk is under the target plus one row), then
    # to a multiple that keeps chunks DIRECT_ALIGN-aligned when that costs under another target
    assert nbytes == 0 or math.prod(chunks) * itemsize <= 3 * target


@settings(max_examples=200, deadline=None)
@given(
    shape=st.tuples(
        st.lists(st.integers(1, 4), max_size=1), st.lists(st.integers(1, 3000), min_size=1, max_size=2)
    ).map(lambda t: (*t[0], *t[1])),
    itemsize=st.sampled_from([1, 2, 4, 8]),
    target=st.integers(DIRECT_ALIGN, 1 << 20),
)
def test_big_chunks_start_aligned_for_direct_io(shape: tuple[int, ...], itemsize: int, target: int) -> None:
    specs = chunk_specs(shape, chunk_shape(shape, itemsize, target), itemsize)
    axis = next(a for a in range(len(shape)) if math.prod(shape[a + 1 :]) * itemsize <= target)
    row = math.prod(shape[axis + 1 :]) * itemsize
    # Aligned when it costs less than a target's worth of extra rows, and (for chunks split below
    # a leading axis) when each leading block is itself a multiple of DIRECT_ALIGN.
    if DIRECT_ALIGN // math.gcd(row, DIRECT_ALIGN) * row <= target and (
        axis == 0 or shape[axis] * row % DIRECT_ALIGN == 0
    ):
        assert all(c.offset % DIRECT_ALIGN == 0 for c in specs)


@settings(max_examples=200, deadline=None)
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple), target=st.integers(1, 64))
def test_chunk_keys_match_zarr_grid(shape: tuple[int, ...], target: int) -> None:
    chunks = chunk_shape(shape, 1, max(target, 1))
    grid = [math.ceil(s / c) for s, c in zip(shape, chunks, strict=True)]
    keys = [c.key for c in chunk_specs(shape, chunks, 1)]
    expected = ["c/" + "/".join(map(str, idx)) for idx in np.ndindex(*grid)]
    assert keys == expected


def test_chunk_shapes_for_common_cases() -> None:
    assert chunk_shape((), 4, 1 << 20) == ()
    assert chunk_specs((), (), 4)[0].key == "c"
    assert chunk_shape((0, 5), 4, 1 << 20) == (1, 5)
    assert chunk_specs((0, 5), (1, 5), 4) == []
    assert chunk_shape((1000, 1000), 4, 1 << 20) == (256, 1000)  # 256 rows: 4096-aligned chunks
    assert chunk_shape((3, 1000, 1000), 4, 1 << 20) == (1, 256, 1000)
    assert chunk_shape((10,), 4, 1 << 20) == (10,)


def test_staging_offsets_are_aligned() -> None:
    offsets, total = staging_offsets([3, 0, 64, 65, 1])
    assert offsets == [0, 64, 64, 128, 256]
    assert total == 320 and all(o % ALIGN == 0 for o in offsets)
    big = DIRECT_MIN  # arrays that may be written with O_DIRECT start DIRECT_ALIGN-aligned
    offsets, total = staging_offsets([3, big, 5, big + 1])
    assert offsets == [0, DIRECT_ALIGN, DIRECT_ALIGN + big, 2 * DIRECT_ALIGN + big]
    assert total == 2 * DIRECT_ALIGN + 2 * big + ALIGN


def test_array_names_are_unique_readable_and_safe() -> None:
    assert array_key(3, ("model", "fc.weight")) == "00003-model.fc.weight"
    assert array_key(4, ("opt", "state", 0, "exp_avg")) == "00004-opt.state.0.exp_avg"
    assert array_key(5, ("a/b", "..", "__x")) == "00005-a_b....__x"  # one safe path segment
    assert array_key(6, ()) == "00006"
    assert "/" not in array_key(7, ("../../etc/passwd",))


def test_array_specs_refuse_unstorable_leaves() -> None:
    with pytest.raises(CheckpointError, match=r"state\[s\]: cannot save a torch.sparse_coo"):
        array_specs([torch.eye(2).to_sparse()], [("s",)], 1 << 20)
    with pytest.raises(CheckpointError, match="meta device"):
        array_specs([torch.empty(2, device="meta")], [("m",)], 1 << 20)
    with pytest.raises(CheckpointError, match="numpy array of dtype object"):
        array_specs([np.array([None])], [("o",)], 1 << 20)
    (bf,) = array_specs([torch.zeros(2, dtype=torch.bfloat16)], [("b",)], 1 << 20)
    assert (bf.dtype, bf.zarr_dtype) == ("bfloat16", "uint16")


# -- steps and retention ------------------------------------------------------------------------


def test_step_prefix_round_trip() -> None:
    assert step_prefix(123) == "step-000000123"
    assert parse_step(step_prefix(123)) == 123
    assert parse_step(step_prefix(12345678901)) == 12345678901
    assert parse_step("step-12") is None and parse_step("step-000000001.tmp") is None


@settings(max_examples=300, deadline=None)
@given(committed=st.sets(st.integers(0, 50)), current=st.integers(0, 50), keep=st.integers(1, 5))
def test_retention_invariants(committed: set[int], current: int, keep: int) -> None:
    doomed = set(retention_plan(committed, current, keep))
    everything = committed | {current}
    left = everything - doomed
    assert current in left and max(everything) in left
    assert doomed <= committed
    assert len(left) >= min(keep, len(everything))
    newest = sorted(everything, reverse=True)[:keep]
    assert set(newest) <= left
    assert len(left) <= keep + 1  # at most one extra: the step just written, when it is old


def test_retention_examples() -> None:
    assert retention_plan([1, 2, 3, 4], 5, 2) == [1, 2, 3]
    assert retention_plan([10, 3], 3, 1) == []  # never the one just written, never the newest
    assert retention_plan([], 0, 1) == []
    with pytest.raises(ValueError):
        retention_plan([1], 2, 0)


# -- the manifest ----------------------------------------------------------------------------


def manifest_doc() -> dict[str, Any]:
    (a,) = array_specs([torch.zeros(4, 3)], [("w",)], 1 << 20)
    gen = "data-0123456789ab"
    objects = {
        "zarr.json": ObjectEntry(size=10, crc32c="00000000"),
        f"{gen}/tree.json": ObjectEntry(size=10, crc32c="00000000"),
        f"{gen}/{a.key}/zarr.json": ObjectEntry(size=10, crc32c="00000000"),
        f"{gen}/{a.key}/c/0/0": ObjectEntry(size=48, crc32c="0000abcd"),
    }
    m = CheckpointManifest(step=7, generation=gen, arrays=(a,), objects=objects)
    return dict(json.loads(m.to_json()))


def test_manifest_round_trip() -> None:
    doc = manifest_doc()
    m = CheckpointManifest.from_json(json.dumps(doc).encode(), where="m")
    assert m.step == 7 and m.arrays[0].name == "w" and m.arrays[0].shape == (4, 3)
    assert json.loads(m.to_json()) == doc


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda d: d.update(format="other"), "not an hpstore checkpoint"),
        (lambda d: d.update(version=99), "unsupported checkpoint format version"),
        (lambda d: d.update(generation="../x"), "bad generation"),
        (lambda d: d["arrays"][0].update(key="../../x"), "unsafe object key|has a '/'"),
        (lambda d: d["arrays"][0].update(dtype="object"), "unsupported tensor dtype"),
        (lambda d: d["arrays"][0].update(shape=[4, -3]), "non-negative"),
        (lambda d: d["arrays"][0].update(chunk_shape=[2, 2]), "does not fit"),
        (lambda d: d["objects"].pop(next(k for k in d["objects"] if k.endswith("c/0/0"))), "is not listed"),
        (
            lambda d: next(v for k, v in d["objects"].items() if k.endswith("c/0/0")).update(size=47),
            "its chunk holds 48",
        ),
        (lambda d: d["objects"]["zarr.json"].update(crc32c="xyz"), "bad entry"),
        (lambda d: d["objects"].update({"../evil": {"size": 1, "crc32c": "00000000"}}), "unsafe object key"),
        (lambda d: d.pop("arrays"), "malformed manifest"),
    ],
)
def test_manifest_rejects_untrusted_input(edit: Any, match: str) -> None:
    doc = manifest_doc()
    edit(doc)
    with pytest.raises(CheckpointError, match=match):
        CheckpointManifest.from_json(json.dumps(doc).encode(), where="m")


def test_manifest_rejects_truncation() -> None:
    text = json.dumps(manifest_doc()).encode()
    with pytest.raises(CheckpointError, match="m: not valid JSON"):
        CheckpointManifest.from_json(text[: len(text) // 2], where="m")
