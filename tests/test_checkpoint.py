"""Checkpointer end to end on real files (and memory://): round trips, formats, safety, retention."""

from __future__ import annotations

import json
import os
import pickle
import random
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr

import hpstore
from hpstore.checkpoint import staging
from hpstore.checkpoint.checkpointer import Checkpointer, CheckpointLayout
from hpstore.checkpoint.plan import step_prefix
from hpstore.checkpoint.reader import SPARE_PREFIX, read_manifest
from hpstore.checksum import crc32c_hex
from hpstore.errors import CheckpointError, InputError, ObjectNotFoundError, StorageError
from hpstore.storage.open import open_storage
from tests.support.ckpt import assert_same, training_state

SMALL = CheckpointLayout(chunk_bytes=4096, workers=4)  # many chunks, padded edges, parallel writes


def manifest_of(root: Path, step: int) -> dict[str, Any]:
    return dict(json.loads((root / step_prefix(step) / "manifest.json").read_text()))


def test_round_trip_of_a_real_training_state(tmp_path: Path) -> None:
    state = training_state()
    with Checkpointer(str(tmp_path), layout=SMALL) as ck:
        ck.save(2, state)
        ck.wait()
        loaded = ck.load()
    assert_same(state, loaded)

    # The loaded state drives a fresh model, optimizer, scheduler and RNGs to the same next step.
    torch.manual_seed(99)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(144, 16)
    )
    opt = torch.optim.Adam(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    model.load_state_dict(loaded["model"])
    opt.load_state_dict(loaded["optimizer"])
    sched.load_state_dict(loaded["scheduler"])
    assert opt.param_groups[0]["lr"] == state["optimizer"]["param_groups"][0]["lr"]
    assert sched.last_epoch == 2
    torch.set_rng_state(loaded["rng"]["torch"])
    np.random.set_state(loaded["rng"]["numpy"])
    random.setstate(loaded["rng"]["python"])
    draws = (torch.rand(3), np.random.rand(3), random.random())
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    assert torch.equal(draws[0], torch.rand(3)) and (draws[1] == np.random.rand(3)).all()
    assert draws[2] == random.random()


def all_dtypes() -> list[torch.dtype]:
    names = "bool uint8 int8 int16 int32 int64 uint16 uint32 uint64 float16 bfloat16 float32 float64"
    names += " complex64 complex128 float8_e4m3fn float8_e5m2"
    return [getattr(torch, n) for n in names.split() if hasattr(torch, n)]


def tensor_of(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    raw = torch.randint(0, 256, (max(1, int(np.prod(shape))) * dtype.itemsize,), dtype=torch.uint8,
                        generator=torch.Generator().manual_seed(seed))  # fmt: skip
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype)[: int(np.prod(shape))].reshape(shape)


def test_every_dtype_and_shape_round_trips_bit_for_bit(tmp_path: Path) -> None:
    shapes = [(), (0,), (0, 3), (7,), (3, 4, 5), (2, 3000)]  # (2, 3000): chunks split rows, padded
    state: dict[str, Any] = {}
    for i, dtype in enumerate(all_dtypes()):
        state[str(dtype)] = [tensor_of(dtype, s, seed=i * 10 + j) for j, s in enumerate(shapes)]
    state["noncontiguous"] = torch.arange(24.0).reshape(4, 6).t()[1:, ::2]
    state["bf16_nan_payloads"] = (
        torch.tensor([0x7FC1, 0xFF81, 0x7F80, 0x0001], dtype=torch.int32)
        .to(torch.uint16)
        .view(torch.bfloat16)
    )
    state["numpy"] = {
        "f4": np.arange(5, dtype=np.float32),
        "big_endian": np.arange(6, dtype=">i4").reshape(2, 3),
        "bool0d": np.array(True),
        "c16": np.array([1 + 2j]),
        "empty": np.zeros((0, 2), np.uint16),
    }
    ck = Checkpointer(str(tmp_path), layout=SMALL)
    ck.save(0, state)
    ck.wait()
    loaded = ck.load(0)
    expected = dict(state)
    expected["noncontiguous"] = state["noncontiguous"].contiguous()
    expected["numpy"] = dict(state["numpy"], big_endian=state["numpy"]["big_endian"].astype("<i4"))
    assert_same(expected, loaded)
    assert loaded["numpy"]["big_endian"].tolist() == [[0, 1, 2], [3, 4, 5]]


def test_plain_zarr_reads_every_saved_tensor(tmp_path: Path) -> None:
    state = {
        "bf16": torch.randn(3, 2000).to(torch.bfloat16),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.zeros(0, 4),
        "ints": torch.arange(5000, dtype=torch.int64).reshape(50, 100),
        "flags": torch.tensor([True, False, True]),
    }
    ck = Checkpointer(str(tmp_path), layout=SMALL)
    ck.save(5, state)
    ck.wait()
    man = manifest_of(tmp_path, 5)
    assert len(man["arrays"]) == len(state)
    for a in man["arrays"]:
        z = zarr.open_array(str(tmp_path / step_prefix(5) / man["generation"] / a["key"]), mode="r")
        original = state[a["name"]]
        assert z.shape == tuple(original.shape)
        assert z.attrs["hpstore"]["dtype"] == str(original.dtype).removeprefix("torch.")
        data = torch.from_numpy(np.array(z[...]))
        if original.dtype == torch.bfloat16:
            assert z.dtype == np.uint16  # raw bits: Zarr v3 has no bfloat16
            data = data.view(torch.bfloat16)
        assert torch.equal(data, original), a["name"]
    group = zarr.open_group(str(tmp_path / step_prefix(5) / man["generation"]), mode="r")
    assert group.attrs["hpstore"]["step"] == 5


def test_saved_values_are_those_of_the_save_call(tmp_path: Path) -> None:
    weights = torch.randn(256, 1024)  # 1 MiB: still being written when the mutations start
    history = [1, 2, 3]
    expected = (weights.clone(), list(history))
    ck = Checkpointer(str(tmp_path), layout=SMALL)
    ck.save(1, {"w": weights, "history": history, "nested": {"w": weights[0]}})
    for _ in range(20):  # training goes on, in place, while the writer runs
        weights.add_(1.0)
        weights[0].zero_()
    history.append(4)
    ck.wait()
    loaded = ck.load(1)
    assert torch.equal(loaded["w"], expected[0])
    assert torch.equal(loaded["nested"]["w"], expected[0][0])
    assert loaded["history"] == expected[1]


class Payload:
    """Unpickling this runs ``os.mkdir(marker)``: the proof that something unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (os.mkdir, (str(self.marker),))


def test_planted_pickle_payloads_are_never_unpickled(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    marker = tmp_path / "pwned"
    payload = pickle.dumps(Payload(marker))
    ck = Checkpointer(str(root))
    state = {"rng": torch.get_rng_state(), "w": torch.randn(10, 10), "note": "x"}
    for step in (1, 2, 3):
        ck.save(step, state)
    ck.wait()

    def paths(step: int) -> tuple[Path, dict[str, Any], dict[str, str]]:
        man = manifest_of(root, step)
        gen_dir = root / step_prefix(step) / man["generation"]
        return gen_dir, man, {a["name"]: a["key"] for a in man["arrays"]}

    def forge(step: int, man: dict[str, Any], key: str, data: bytes) -> None:
        """An attacker who rewrites the manifest too, so sizes and checksums match."""
        (root / step_prefix(step) / key).write_bytes(data)
        man["objects"][key] = {"size": len(data), "crc32c": crc32c_hex(data)}
        (root / step_prefix(step) / "manifest.json").write_text(json.dumps(man))

    # 1. A tensor's chunk replaced by a pickle; pickle files planted where torch.load would look.
    gen_dir, man, keys = paths(1)
    (gen_dir / keys["w"] / "c" / "0" / "0").write_bytes(payload)
    for name in ("data.pkl", f"{keys['w']}/data.pkl", "archive/data.pkl"):
        (gen_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (gen_dir / name).write_bytes(payload)
    with pytest.raises(CheckpointError, match="array 'w'"):
        ck.load(1)

    # 2. The tree replaced by a pickle, checksums forged: refused as JSON, never unpickled.
    gen_dir, man, keys = paths(2)
    forge(2, man, f"{man['generation']}/tree.json", payload)
    with pytest.raises(CheckpointError, match=r"tree\.json: not valid JSON"):
        ck.load(2)

    # 3. A uint8 tensor's bytes replaced by a pickle, checksums forged: it loads, as bytes.
    gen_dir, man, keys = paths(3)
    chunk = f"{man['generation']}/{keys['rng']}/c/0"
    forged = payload.ljust(man["objects"][chunk]["size"], b"\x00")
    forge(3, man, chunk, forged)
    assert bytes(ck.load(3)["rng"].numpy()) == forged

    assert not marker.exists()
    pickle.loads(payload)  # the payload is live: unpickling it does create the marker
    assert marker.exists()


def test_checkpoint_code_has_no_pickle_path() -> None:
    sources = Path(hpstore.__file__).parent.glob("checkpoint*.py")
    for path in sources:
        text = path.read_text()
        for needle in ("import pickle", "torch.load", "allow_pickle=True", "np.load("):
            assert needle not in text, f"{path.name} mentions {needle}"


def test_retention_keeps_newest_and_resave_replaces(tmp_path: Path) -> None:
    ck = Checkpointer(str(tmp_path), keep=2)
    for step in range(1, 6):
        ck.save(step, {"v": torch.tensor(step)})
    ck.wait()
    assert ck.steps() == [4, 5] and ck.latest() == 5
    names = sorted(p.name for p in tmp_path.iterdir())  # plus the retired files the next save reuses
    assert names[1:] == [step_prefix(4), step_prefix(5)] and names[0].startswith(SPARE_PREFIX)

    ck.save(5, {"v": torch.tensor(50)})  # the same step again: replaced, old generation removed
    ck.wait()
    assert ck.load(5)["v"].item() == 50
    assert len([p for p in (tmp_path / step_prefix(5)).iterdir() if p.is_dir()]) == 1

    ck.save(3, {"v": torch.tensor(3)})  # an older step: kept (just written) beside the newest 2
    ck.wait()
    assert ck.steps() == [3, 4, 5]
    ck.save(6, {"v": torch.tensor(6)})
    ck.wait()
    assert ck.steps() == [5, 6]
    ck.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [step_prefix(5), step_prefix(6)]


def test_keep_below_one_is_an_error(tmp_path: Path) -> None:
    for keep in (0, -1):
        with pytest.raises(InputError, match="keep must be an integer of at least 1"):
            Checkpointer(str(tmp_path), keep=keep)


def test_incomplete_checkpoints_are_ignored_then_removed(tmp_path: Path) -> None:
    ck = Checkpointer(str(tmp_path))
    ck.save(1, {"v": torch.tensor(1)})
    ck.wait()
    leftover = tmp_path / step_prefix(2) / "data-0123456789ab" / "00000-v"
    leftover.mkdir(parents=True)
    (leftover / "zarr.json").write_text("{}")
    assert ck.steps() == [1] and ck.latest() == 1
    assert ck.load()["v"].item() == 1
    ck.save(3, {"v": torch.tensor(3)})
    ck.wait()
    assert not (tmp_path / step_prefix(2)).exists()
    assert ck.steps() == [1, 3]


def test_clean_up_deletes_only_what_saves_wrote(tmp_path: Path) -> None:
    """Pruning a re-saved step, retention and the removal of incomplete steps delete our
    generations (``data-<12 hex>``), group metadata and spares (``spare-<12 hex>``), never a
    folder someone else put beside them."""
    foreign = [
        tmp_path / step_prefix(5) / "notes" / "README.txt",  # in a step saved twice
        tmp_path / step_prefix(5) / "data-raw" / "x.bin",  # looks like a generation, is not ours
        tmp_path / step_prefix(1) / "notes" / "README.txt",  # in a step retention retires
        tmp_path / step_prefix(2) / "mine.txt",  # in a step with no manifest (incomplete)
        tmp_path / "spare-notes" / "a.txt",  # looks like a spare, is not ours
    ]
    for path in foreign:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("not hpstore's")
    with Checkpointer(str(tmp_path), keep=1) as ck:
        ck.save(1, {"v": torch.tensor(1)})
        ck.save(5, {"v": torch.tensor(5)})
        ck.save(5, {"v": torch.tensor(50)})  # prunes the first save's generation of step 5
        ck.wait()
        assert ck.steps() == [5] and ck.load()["v"].item() == 50
        gens = sorted(p.name for p in (tmp_path / step_prefix(5)).iterdir() if p.is_dir())
        assert gens == sorted(["data-raw", "notes", manifest_of(tmp_path, 5)["generation"]])
        assert not (tmp_path / step_prefix(1) / "zarr.json").exists()  # step 1: ours went
        assert sorted(p.name for p in (tmp_path / step_prefix(1)).iterdir()) == ["notes"]
    for path in foreign:
        assert path.read_text() == "not hpstore's", path


def test_a_manifest_naming_an_older_generation_length_still_loads(tmp_path: Path) -> None:
    """Manifests may name ``data-`` plus 8 to 32 hex digits (what readers always accepted); only
    the writer's own 12-digit names are collected, so such a generation is never deleted."""
    with Checkpointer(str(tmp_path)) as ck:
        ck.save(3, {"v": torch.arange(5.0)})
        ck.wait()
    m = manifest_of(tmp_path, 3)
    old, new = m["generation"], "data-0123456789abcdef"
    (tmp_path / step_prefix(3) / old).rename(tmp_path / step_prefix(3) / new)
    m["generation"] = new
    m["objects"] = {k.replace(old, new, 1): v for k, v in m["objects"].items()}
    (tmp_path / step_prefix(3) / "manifest.json").write_text(json.dumps(m))
    with Checkpointer(str(tmp_path)) as ck:
        assert ck.load(3)["v"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
        ck.save(4, {"v": torch.arange(2.0)})
        ck.wait()
        assert ck.load(3)["v"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    m["generation"] = "data-0123"  # outside the readable range
    (tmp_path / step_prefix(3) / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="bad generation 'data-0123'"):
        read_manifest(open_storage(str(tmp_path)), 3)


def test_stats_count_the_wait_for_the_previous_save_separately(tmp_path: Path) -> None:
    ck = Checkpointer(str(tmp_path), layout=SMALL)
    state = {"w": torch.randn(512, 512)}
    ck.save(1, state)
    ck.save(2, state)  # waits for step 1 first
    ck.wait()
    first, second = ck.stats
    assert (first.step, second.step) == (1, 2)
    for s in (first, second):
        assert s.bytes == 512 * 512 * 4 and s.arrays == 1 and not s.failed
        assert s.persist_s is not None and s.persist_s > 0 and s.throughput is not None
        assert s.retention_s is not None
        assert s.stall_s == pytest.approx(s.wait_s + s.snapshot_s)
        assert s.objects == 3 + 1 + 256  # group x2, tree, array zarr.json, 1 MiB in 4 KiB chunks
    assert second.wait_s > 0
    assert set(second.as_dict()) >= {"stall_s", "wait_s", "persist_s", "bytes", "throughput"}


def test_memory_url_round_trip_and_retention() -> None:
    url = f"memory://ckpt-{uuid.uuid4().hex}"
    state = training_state(seed=1)
    ck = Checkpointer(url, keep=2, layout=SMALL)
    for step in (1, 2, 3):
        ck.save(step, state)
    ck.wait()
    assert ck.steps() == [2, 3]
    assert_same(state, ck.load())
    assert Checkpointer(url).latest() == 3


def test_clear_errors_for_missing_and_unsaveable(tmp_path: Path) -> None:
    ck = Checkpointer(str(tmp_path))
    with pytest.raises(CheckpointError, match="no committed checkpoint"):
        ck.load()
    with pytest.raises(CheckpointError, match="no committed checkpoint for step 7"):
        ck.load(7)
    with pytest.raises(CheckpointError, match=r"state\[opt/fn\]: cannot save a builtins.builtin_function"):
        ck.save(1, {"opt": {"fn": len}})
    with pytest.raises(InputError, match="step must be a non-negative integer"):
        ck.save(-1, {})
    ck.save(1, {"ok": True})  # still usable
    ck.wait()
    assert ck.load() == {"ok": True}


def test_load_to_a_device(tmp_path: Path) -> None:
    ck = Checkpointer(str(tmp_path))
    ck.save(1, {"w": torch.ones(3), "empty": torch.zeros(0, 2), "np": np.ones(2)})
    ck.wait()
    assert ck.load(map_location="cpu")["w"].device.type == "cpu"
    moved = ck.load(map_location=torch.device("meta"))
    assert moved["w"].device.type == "meta" and moved["empty"].device.type == "meta"
    assert isinstance(moved["np"], np.ndarray)  # numpy arrays stay numpy arrays


@pytest.mark.parametrize("where", ["local", "memory"])
def test_storage_read_into_fills_a_caller_buffer(tmp_path: Path, where: str) -> None:
    st = open_storage(str(tmp_path) if where == "local" else f"memory://read-into-{uuid.uuid4().hex}")
    st.write("a/b", b"hello")
    buf = bytearray(8)
    assert st.read_into("a/b", memoryview(buf)) == 5 and bytes(buf[:5]) == b"hello"
    assert st.child("a").read_into("b", memoryview(buf)[3:]) == 5 and bytes(buf) == b"helhello"
    with pytest.raises(StorageError, match="5 bytes, buffer only 2"):
        st.read_into("a/b", memoryview(bytearray(2)))
    with pytest.raises(ObjectNotFoundError):
        st.read_into("a/missing", memoryview(buf))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_state_is_snapshotted_through_pinned_memory(tmp_path: Path) -> None:
    weights = torch.randn(4096, 1024, device="cuda")  # 16 MiB
    expected = weights.cpu()
    ck = Checkpointer(str(tmp_path))
    ck.save(1, {"w": weights, "bf": weights[:4].bfloat16()})
    for _ in range(10):  # queued on the same stream, after the copies
        weights.mul_(2.0)
    ck.wait()
    assert ck._staging.stats.device_bytes_copied > 0 and ck._staging._buf is not None
    assert ck._staging._buf.is_pinned()
    loaded = ck.load(map_location="cuda")
    assert loaded["w"].is_cuda
    assert torch.equal(loaded["w"].cpu(), expected)
    assert torch.equal(loaded["bf"].cpu(), expected[:4].bfloat16())


def _files(root: Path) -> dict[str, int]:
    """Every file under ``root`` (relative path -> inode)."""
    return {str(p.relative_to(root)): p.stat().st_ino for p in root.rglob("*") if p.is_file()}


def test_retired_files_are_rewritten_in_place_by_the_next_save(tmp_path: Path) -> None:
    state = {"w": torch.randn(300, 1000), "b": torch.randn(1000), "n": torch.tensor(1)}
    ck = Checkpointer(str(tmp_path), keep=1, layout=CheckpointLayout(chunk_bytes=256 << 10))
    ck.save(1, state)
    ck.wait()
    gen1 = read_manifest(ck.storage, 1).generation
    before = _files(tmp_path / step_prefix(1) / gen1)
    ck.save(2, state)  # retires step 1: its files become the spare
    ck.wait()
    state["w"].add_(1)  # same structure, new values
    ck.save(3, state)  # rewrites the spare in place: same files (inodes), new bytes
    ck.wait()
    gen3 = read_manifest(ck.storage, 3).generation
    after = _files(tmp_path / step_prefix(3) / gen3)
    assert after == before
    assert all(torch.equal(ck.load(3)[k], v) for k, v in state.items())

    # Another structure: arrays that went away and chunks past a shrunk array are removed, so the
    # generation holds exactly the objects of its manifest and plain zarr sees just these arrays.
    smaller = {"w": torch.randn(100, 1000), "extra": torch.ones(5)}
    ck.save(4, smaller)  # retires 3, reuses the spare of step 2
    ck.wait()
    ck.save(5, smaller)  # reuses step 3's files
    ck.wait()
    m = read_manifest(ck.storage, 5)
    on_disk = {f"{m.generation}/{k}" for k in _files(tmp_path / step_prefix(5) / m.generation)}
    assert on_disk | {"zarr.json"} == set(m.objects)
    group = zarr.open_group(str(tmp_path / step_prefix(5) / m.generation), mode="r")
    assert sorted(name for name, _ in group.arrays()) == sorted(a.key for a in m.arrays)
    assert all(torch.equal(ck.load(5)[k], v) for k, v in smaller.items())
    ck.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [step_prefix(5)]


def test_recycling_can_be_switched_off(tmp_path: Path) -> None:
    ck = Checkpointer(str(tmp_path), keep=1, layout=CheckpointLayout(recycle=False))
    for step in range(1, 4):
        ck.save(step, {"v": torch.ones(10) * step})
        ck.wait()
        assert sorted(p.name for p in tmp_path.iterdir()) == [step_prefix(step)]
    ck.close()


def test_spares_left_by_a_dead_process_are_removed(tmp_path: Path) -> None:
    stale = tmp_path / f"{SPARE_PREFIX}0123456789ab" / "00000-v" / "c"
    stale.mkdir(parents=True)
    (stale / "0").write_bytes(b"old")
    with Checkpointer(str(tmp_path), keep=1) as ck:
        ck.save(1, {"v": torch.ones(3)})
        ck.wait()
        assert sorted(p.name for p in tmp_path.iterdir()) == [step_prefix(1)]


@pytest.mark.parametrize("which", ["array", "group"])
def test_corrupt_zarr_metadata_is_detected_on_load(tmp_path: Path, which: str) -> None:
    """The zarr.json objects are what plain Zarr readers trust: a load verifies their checksums
    too, names the array, and load() falls back to the previous checkpoint."""
    state = {"w": torch.arange(12.0).reshape(3, 4), "n": 1}
    with Checkpointer(str(tmp_path), layout=SMALL) as ck:
        ck.save(1, state)
        ck.save(2, state)
        ck.wait()
    m = manifest_of(tmp_path, 2)
    key = f"{m['generation']}/{m['arrays'][0]['key']}/zarr.json" if which == "array" else "zarr.json"
    path = tmp_path / step_prefix(2) / key
    doc = json.loads(path.read_text())
    doc["shape"] = [4, 3] if which == "array" else doc["node_type"]
    text = json.dumps(doc)
    if which == "group":
        text = path.read_text().replace('"step": 2', '"step": 9')
    path.write_text(text)
    ck2 = Checkpointer(str(tmp_path))
    with pytest.raises(CheckpointError, match=r"checksum mismatch|bytes, manifest says") as err:
        ck2.load(step=2)
    if which == "array":
        assert "array 'w'" in str(err.value)
    with pytest.warns(hpstore.checkpoint.CheckpointFallbackWarning, match="step 2"):
        assert ck2.load()["n"] == 1


def sliced_copies(monkeypatch: pytest.MonkeyPatch, *, cpus: int) -> None:
    """Small slices and no inline threshold, so a small state takes the sliced, threaded path."""
    monkeypatch.setattr(staging, "COPY_SLICE", 1000)
    monkeypatch.setattr(staging, "COPY_INLINE", 0)
    monkeypatch.setattr(staging.os, "cpu_count", lambda: cpus)


def test_snapshot_copies_big_tensors_in_slices_on_several_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sliced_copies(monkeypatch, cpus=3)
    g = torch.Generator().manual_seed(7)
    state: dict[str, Any] = {
        "big": torch.randn(10_001, generator=g),  # cut at every 1000 bytes and at the thread cuts
        "bf16": torch.randn(3, 777, generator=g).to(torch.bfloat16),
        "grad": torch.randn(500, generator=g, requires_grad=True),
        "strided": torch.randn(64, 64, generator=g).t(),  # one converting copy
        "conj": torch.randn(40, dtype=torch.complex64, generator=g).conj(),
        "be": np.arange(3000, dtype=">i4"),  # byte-swapped into the slot
        "np": np.arange(2500, dtype=np.float64),
        "step": 3,
    }
    ck = Checkpointer(str(tmp_path), layout=SMALL)
    ck.save(0, state)
    expected = {
        k: (v.detach().clone().resolve_conj() if isinstance(v, torch.Tensor) else v) for k, v in state.items()
    }
    expected["strided"] = expected["strided"].contiguous()
    expected["be"] = state["be"].astype("<i4")
    expected["np"] = state["np"].copy()
    with torch.no_grad():  # write-behind: changes after save() returns are not in the checkpoint
        state["big"].add_(1)
        state["grad"].mul_(2)
    state["np"] += 1
    ck.wait()
    tasks = ck._staging.stats.copy_tasks
    assert tasks > 40 + len(state)  # the big tensor went in slices
    assert_same(expected, ck.load(0))


def test_split_cuts_the_byte_stream_into_equal_runs() -> None:
    sizes = [10, 0, 3000, 7, 1]
    srcs = [np.arange(n, dtype=np.uint8) for n in sizes]
    dsts = [np.zeros(n, np.uint8) for n in sizes]
    for workers in (1, 2, 3, 7):
        for d in dsts:
            d[:] = 0
        parts = staging._split(list(zip(dsts, srcs, strict=True)), workers)
        assert len(parts) == workers
        staging._run(parts)
        for d, s in zip(dsts, srcs, strict=True):
            assert np.array_equal(d, s)


def test_repeated_saves_reuse_their_copy_tasks_and_still_see_every_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gc
    import weakref

    sliced_copies(monkeypatch, cpus=2)
    g = torch.Generator().manual_seed(3)
    state: dict[str, Any] = {
        "w": torch.randn(64, 64, generator=g),
        "b": torch.randn(700, generator=g),
        "step": 0,
    }
    ck = Checkpointer(str(tmp_path), layout=SMALL, keep=10)

    def save(step: int) -> None:
        state["step"] = step
        ck.save(step, state)
        ck.wait()
        assert_same(
            {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}, ck.load(step)
        )

    save(0)
    tasks = ck._staging.stats.copy_tasks
    reused = ck._plan[2].reuse["parts"] if ck._plan else None
    with torch.no_grad():
        state["w"].add_(1)  # in place: same tensors, same addresses
    save(1)
    assert ck._plan is not None and ck._plan[2].reuse["parts"] is reused  # the same tasks ran again
    assert ck._staging.stats.copy_tasks == 2 * tasks
    state["w"].t_()  # same object, same address, another layout: rebuilt
    save(2)
    old = weakref.ref(state["b"])
    state["b"] = torch.randn(700, generator=g)  # a new tensor of the same shape: rebuilt
    save(3)
    gc.collect()
    assert old() is None  # the reused tasks never held the replaced tensor
    assert ck._plan is not None and ck._plan[2].reuse.get("parts") is not reused
