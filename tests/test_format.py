"""Store format v1: the data opens without hpstore, and readers reject stores they cannot trust."""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import uuid
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hpstore
from hpstore.errors import ManifestError, StoreNotFoundError
from hpstore.format.dtypes import ZARR_CORE_DTYPES
from hpstore.format.manifest import MANIFEST_KEY, Manifest
from hpstore.format.writer import Layout
from hpstore.storage.local import LocalStorage
from hpstore.storage.open import open_storage
from tests.support.stores import sample_columns, write_store

CODECS = [
    {"name": "zstd", "level": 1},
    {"name": "zstd", "level": 3},
    {"name": "lz4", "level": 5},
    {"name": "none"},
]
SHAPES = [(), (3,), (4, 5), (2, 3, 2)]
DOCS = Path(__file__).resolve().parents[1] / "docs" / "FORMAT.md"


def random_column(rng: np.random.Generator, dtype: str, n: int, shape: tuple[int, ...]) -> np.ndarray:
    """Arbitrary bit patterns (NaNs, infinities, subnormals included); bools are 0 or 1."""
    dt = np.dtype(dtype)
    if dt == np.bool_:
        return rng.integers(0, 2, (n, *shape)).astype(bool)
    raw = rng.integers(0, 256, n * math.prod(shape) * dt.itemsize, dtype=np.uint8)
    return raw.view(dt).reshape(n, *shape)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.ascontiguousarray(a).tobytes() == b.tobytes()


# -- plain zarr ----------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dtype=st.sampled_from(sorted(ZARR_CORE_DTYPES)),
    shape=st.sampled_from(SHAPES),
    n=st.integers(1, 300),
    codec=st.sampled_from(CODECS),
    seed=st.integers(0, 2**32 - 1),
)
def test_every_array_opens_with_plain_zarr(
    dtype: str, shape: tuple[int, ...], n: int, codec: dict[str, Any], seed: int
) -> None:
    data = random_column(np.random.default_rng(seed), dtype, n, shape)
    with tempfile.TemporaryDirectory() as d:
        # min_ratio=1: keep the asked codec even for random data, so every codec is exercised.
        layout = Layout(chunk_bytes=1024, shard_bytes=3072, codec=codec, workers=1, writers=1, min_ratio=1.0)
        m = write_store(LocalStorage(d), {"train": {"x": data}}, layout=layout)
        plain = np.asarray(
            zarr.open_array(os.path.join(d, m.splits["train"].fields["x"].path), mode="r")[...]
        )
        ours = hpstore.open(d).split("train").read(np.arange(n))["x"]
    assert same_bits(plain, data)
    assert same_bits(ours, data)


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: "-".join(map(str, c.values())))
def test_zarr_metadata_sharding_and_partial_edges(tmp_path: Path, codec: dict[str, Any]) -> None:
    rng = np.random.default_rng(1)
    data = rng.integers(0, 50, (1100, 7, 3)).astype(np.uint16)  # compressible, not trivial
    m = write_store(
        LocalStorage(str(tmp_path)),
        {"train": {"x": data}},
        layout=Layout(chunk_bytes=2048, shard_bytes=3 * 2048, codec=codec),
    )
    spec = m.splits["train"]
    # Both the last chunk and the last shard are partial: the edge cases plain zarr must agree on.
    assert spec.num_samples % spec.chunk_rows != 0
    assert spec.num_chunks % spec.chunks_per_shard != 0
    z = zarr.open_array(str(tmp_path / spec.fields["x"].path), mode="r")
    assert z.shape == data.shape and z.dtype == np.uint16
    assert z.chunks == (spec.chunk_rows, 7, 3)
    assert z.shards == (spec.shard_rows, 7, 3)
    meta = json.loads((tmp_path / spec.fields["x"].path / "zarr.json").read_text())
    (sharding,) = meta["codecs"]
    assert sharding["name"] == "sharding_indexed"
    chain = [c["name"] for c in sharding["configuration"]["codecs"]]
    expected = {
        "zstd": ["bytes", "zstd", "crc32c"],
        "lz4": ["bytes", "blosc", "crc32c"],
        "none": ["bytes", "crc32c"],
    }
    assert chain == expected[codec["name"]]
    assert [c["name"] for c in sharding["configuration"]["index_codecs"]] == ["bytes", "crc32c"]
    assert sharding["configuration"]["index_location"] == "end"

    idx = rng.permutation(len(data))[:123]
    ours = hpstore.open(str(tmp_path)).split("train")
    assert np.array_equal(z.get_orthogonal_selection((idx,)), data[idx])
    assert np.array_equal(ours[idx]["x"], data[idx])
    assert np.array_equal(ours[-5:]["x"], z[-5:])


@pytest.mark.filterwarnings("ignore:Object at .* is not recognized:UserWarning")
def test_store_root_and_splits_are_zarr_groups(tmp_path: Path) -> None:
    m = write_store(LocalStorage(str(tmp_path)), {"train": sample_columns(100), "test": sample_columns(30)})
    root = zarr.open_group(str(tmp_path / m.generation), mode="r")
    assert sorted(root.group_keys()) == ["test", "train"]
    # Variable-length fields are Arrow parts, not zarr nodes: the group lists only the arrays (zarr
    # warns about the Arrow directories it does not recognise).
    train, test = root["train"], root["test"]
    assert isinstance(train, zarr.Group) and isinstance(test, zarr.Group)
    assert sorted(train.array_keys()) == ["image", "label"]
    label = test["label"]
    assert isinstance(label, zarr.Array)
    assert np.array_equal(np.asarray(label[...]), sample_columns(30)["label"])


# -- plain pyarrow -------------------------------------------------------------------------------


def test_every_arrow_part_opens_with_plain_pyarrow(tmp_path: Path) -> None:
    n = 500
    cols = sample_columns(n, seed=3)
    m = write_store(LocalStorage(str(tmp_path)), {"train": cols})
    ds = hpstore.open(str(tmp_path)).split("train")
    spec = m.splits["train"]
    variable = [f for f in spec.fields.values() if not f.is_array]
    assert sorted(f.name for f in variable) == ["blob", "meta", "ragged", "text"]
    for f in variable:
        assert len(f.parts) == math.ceil(spec.num_chunks / spec.chunks_per_shard) > 1
        plain: list[Any] = []
        for p, part in enumerate(f.parts):
            reader = pa.ipc.open_file(str(tmp_path / part.key))
            assert reader.num_record_batches == len(part.batches)
            assert reader.schema.names == [f.name] and str(reader.schema.field(0).type) == f.arrow_type
            for b in range(reader.num_record_batches):
                chunk = p * spec.chunks_per_shard + b
                batch = reader.get_batch(b)
                start, stop = spec.chunk_range(chunk)
                assert batch.num_rows == stop - start  # one record batch per chunk, same sample range
                (ours,) = ds.reader.read(f.name, [chunk])
                assert ours.equals(batch.column(0))
            plain.extend(reader.read_all().column(0).to_pylist())
        assert plain == cols[f.name].to_pylist()
        read = ds.read(np.arange(n), [f.name])[f.name]
        as_lists = [x.tolist() if isinstance(x, np.ndarray) else x for x in read]
        assert as_lists == plain


def test_arrow_batch_ranges_are_standalone_ipc_messages(tmp_path: Path) -> None:
    """The manifest's byte range of a batch is one IPC message readable with the field's schema."""
    cols = sample_columns(200, seed=4)
    m = write_store(LocalStorage(str(tmp_path)), {"train": cols})
    f = m.splits["train"].fields["text"]
    data = (tmp_path / f.parts[1].key).read_bytes()
    schema = pa.ipc.open_file(str(tmp_path / f.parts[1].key)).schema
    off, length, _ = f.parts[1].batches[0]
    batch = pa.ipc.read_record_batch(pa.ipc.read_message(pa.py_buffer(data[off : off + length])), schema)
    first = m.splits["train"].chunks_per_shard * m.splits["train"].chunk_rows
    assert batch.column(0).to_pylist() == cols["text"][first : first + batch.num_rows].to_pylist()


# -- readers reject --------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> tuple[Path, Manifest]:
    m = write_store(LocalStorage(str(tmp_path)), {"train": sample_columns(200)})
    return tmp_path, m


def edit_manifest(root: Path, fn: Any) -> None:
    doc = json.loads((root / MANIFEST_KEY).read_text())
    fn(doc)
    (root / MANIFEST_KEY).write_text(json.dumps(doc))


def first_shard(m: Manifest) -> str:
    return next(k for k in sorted(m.objects) if "/image/c/" in k)


def test_rejects_unknown_version(store: tuple[Path, Manifest]) -> None:
    root, _ = store
    edit_manifest(root, lambda d: d.update(version=3))
    with pytest.raises(
        ManifestError, match=r"unsupported format version 3 \(this hpstore reads versions 1, 2\)"
    ):
        hpstore.open(str(root))


def test_rejects_other_formats_and_malformed_json(store: tuple[Path, Manifest]) -> None:
    root, _ = store
    text = (root / MANIFEST_KEY).read_text()
    (root / MANIFEST_KEY).write_text(text[: len(text) // 2])
    with pytest.raises(ManifestError, match=r"manifest\.json: not valid JSON"):
        hpstore.open(str(root))
    (root / MANIFEST_KEY).write_text(json.dumps({"format": "something-else", "version": 1}))
    with pytest.raises(ManifestError, match="not an hpstore manifest"):
        hpstore.open(str(root))
    doc = json.loads(text)
    del doc["splits"]
    (root / MANIFEST_KEY).write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match=r"malformed manifest \(KeyError: 'splits'\)"):
        hpstore.open(str(root))


def test_rejects_a_missing_object(store: tuple[Path, Manifest]) -> None:
    root, m = store
    key = first_shard(m)
    (root / key).unlink()
    with pytest.raises(ManifestError, match=rf"1 missing object\(s\), e\.g\. {re.escape(key)}"):
        hpstore.open(str(root))


def test_rejects_an_extra_object(store: tuple[Path, Manifest]) -> None:
    root, m = store
    extra = f"{m.generation}/train/image/c/999/0/0"
    (root / extra).parent.mkdir(parents=True)
    (root / extra).write_bytes(b"stray")
    with pytest.raises(ManifestError, match=rf"not in the manifest, e\.g\. {re.escape(extra)}"):
        hpstore.open(str(root))


def test_rejects_a_size_mismatch(store: tuple[Path, Manifest]) -> None:
    root, m = store
    key = first_shard(m)
    with open(root / key, "ab") as f:
        f.write(b"\0")
    size = m.objects[key].size
    with pytest.raises(
        ManifestError, match=rf"size mismatch for {re.escape(key)} \({size + 1} bytes, manifest says {size}\)"
    ):
        hpstore.open(str(root))


def _escape_object(doc: dict[str, Any], key: str) -> None:
    doc["objects"][key] = {"size": 1, "crc32c": "00000000"}


ESCAPES = {
    "object-dotdot": lambda d: _escape_object(d, "../outside"),
    "object-absolute": lambda d: _escape_object(d, "/etc/passwd"),
    "object-inner-dotdot": lambda d: _escape_object(d, f"{d['generation']}/../../x"),
    "field-path": lambda d: d["splits"]["train"]["fields"]["image"].update(path="../elsewhere/image"),
    "arrow-part": lambda d: d["splits"]["train"]["fields"]["text"]["parts"][0].update(key="/tmp/part.arrow"),
    "generation": lambda d: d.update(generation=".."),
}


@pytest.mark.parametrize("name", sorted(ESCAPES))
def test_rejects_keys_escaping_the_root(store: tuple[Path, Manifest], name: str) -> None:
    root, _ = store
    edit_manifest(root, ESCAPES[name])
    with pytest.raises(ManifestError, match="unsafe object key"):
        hpstore.open(str(root))


def test_missing_store_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(StoreNotFoundError, match="no committed store here"):
        hpstore.open(str(tmp_path / "nothing"))


# -- fsspec URLs -------------------------------------------------------------------------------------


def test_memory_url_write_and_open() -> None:
    url = f"memory://hpstore-test-{uuid.uuid4().hex}/store"
    cols = sample_columns(150, seed=5)
    write_store(open_storage(url), {"train": cols})
    ds = hpstore.open(url).split("train")
    idx = np.random.default_rng(0).permutation(150)
    got = ds[idx]
    assert np.array_equal(got["image"], cols["image"][idx])
    assert got["text"] == [cols["text"][int(i)].as_py() for i in idx]
    fsspec.filesystem("memory").rm(url.removeprefix("memory://").split("/")[0], recursive=True)


# -- the reading snippets in docs/FORMAT.md ------------------------------------------------------


def test_format_doc_snippets_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ```python block of docs/FORMAT.md runs against a store named ``my-store``."""
    rng = np.random.default_rng(0)
    n = 300
    cols = {
        "image": rng.integers(0, 255, (n, 28, 28), dtype=np.uint8),
        "label": rng.integers(0, 10, n).astype(np.int64),
        "caption": pa.array([f"a digit, number {i}" for i in range(n)]),
    }
    write_store(
        LocalStorage(str(tmp_path / "my-store")),
        {"train": cols},
        layout=Layout(chunk_bytes=32 << 10, shard_bytes=128 << 10),
    )
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.S)
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        scope: dict[str, Any] = {}
        exec(compile(block, str(DOCS), "exec"), scope)


def test_incompressible_fields_are_stored_raw(tmp_path: Path) -> None:
    """A field whose first chunk compresses less than ``min_ratio`` is written with codec none;
    the others keep the asked codec; both read back exactly, also through plain zarr."""
    rng = np.random.default_rng(7)
    cols = {
        "noise": rng.integers(0, 256, (500, 32, 32), dtype=np.uint8),
        "flat": np.repeat(np.arange(500, dtype=np.int64)[:, None] % 3, 64, axis=1),
    }
    zstd = {"name": "zstd", "level": 1}
    m = write_store(LocalStorage(str(tmp_path / "auto")), {"train": cols}, layout=Layout(codec=zstd))
    fields = m.splits["train"].fields
    assert fields["noise"].codec == {"name": "none"} and fields["flat"].codec == zstd
    for name, col in cols.items():
        assert same_bits(
            np.asarray(zarr.open_array(str(tmp_path / "auto" / fields[name].path), mode="r")[...]), col
        )
        assert same_bits(hpstore.open(str(tmp_path / "auto")).split("train")[:][name], col)
    forced = write_store(
        LocalStorage(str(tmp_path / "forced")), {"train": cols}, layout=Layout(codec=zstd, min_ratio=1.0)
    )
    assert forced.splits["train"].fields["noise"].codec == zstd
