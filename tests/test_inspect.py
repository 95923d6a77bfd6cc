"""``python -m tools.inspect``: the summary, ``--verify``, ``--json``, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pytest

from hpstore.format.manifest import MANIFEST_KEY, Manifest
from hpstore.format.writer import Layout
from hpstore.storage.local import LocalStorage
from hpstore.storage.open import open_storage
from tests.support.stores import flip_bit, write_store
from tools.inspect import human_bytes, main, parse_storage_options

REPO = Path(__file__).resolve().parents[1]
N = 500


def columns() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    return {
        "image": (rng.integers(0, 4, (N, 8, 8)) * 60).astype(np.uint8),  # compressible
        "label": (np.arange(N) % 10).astype(np.int64),
        "caption": pa.array([f"caption {i}" for i in range(N)]),
    }


@pytest.fixture
def store(tmp_path: Path) -> tuple[Path, Manifest]:
    layout = Layout(chunk_bytes=4096, shard_bytes=16384, codec={"name": "zstd", "level": 3})
    m = write_store(
        LocalStorage(str(tmp_path)),
        {"train": columns(), "test": {k: v[:77] for k, v in columns().items()}},
        layout=layout,
        source={"path": "/src/digits", "format": "npz"},
    )
    return tmp_path, m


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(args)
    out, err = capsys.readouterr()
    return rc, out, err


def test_summary(store: tuple[Path, Manifest], capsys: pytest.CaptureFixture[str]) -> None:
    root, m = store
    rc, out, err = run_cli([str(root)], capsys)
    assert rc == 0 and err == ""
    train = m.splits["train"]
    assert f"generation {m.generation}" in out
    assert "hpstore v1" in out and '"format": "npz"' in out
    assert (
        f"split train: 500 samples, {train.chunk_rows} rows/chunk, {train.num_chunks} chunks, "
        f"{train.chunks_per_shard} chunks/shard" in out
    )
    assert "split test: 77 samples" in out
    image_line = next(line for line in out.splitlines() if line.strip().startswith("image"))
    assert image_line.split()[:4] == ["image", "array", "uint8[8,", "8]"]
    assert "zstd-3" in image_line and image_line.endswith("x")
    caption_line = next(line for line in out.splitlines() if line.strip().startswith("caption"))
    assert "variable<string>" in caption_line
    assert f"total      {len(m.objects)} objects, {human_bytes(m.total_bytes)} on disk" in out


def test_json_numbers(store: tuple[Path, Manifest], capsys: pytest.CaptureFixture[str]) -> None:
    root, m = store
    rc, out, _ = run_cli([str(root), "--json"], capsys)
    assert rc == 0
    doc = json.loads(out)
    assert doc["version"] == 1 and doc["generation"] == m.generation and doc["verify"] is None
    assert doc["objects"] == len(m.objects) and doc["bytes"] == m.total_bytes
    assert doc["source"] == {"path": "/src/digits", "format": "npz"}
    train = doc["splits"]["train"]
    spec = m.splits["train"]
    assert (train["samples"], train["chunks"], train["chunk_rows"]) == (500, spec.num_chunks, spec.chunk_rows)
    assert train["shards"] == -(-spec.num_chunks // spec.chunks_per_shard)
    image = train["fields"]["image"]
    assert image["nbytes"] == N * 64 and image["dtype"] == "uint8" and image["shape"] == [8, 8]
    shards = [k for k in m.objects if k.startswith(spec.fields["image"].path + "/")]
    assert image["bytes"] == sum(m.objects[k].size for k in shards)
    assert image["objects"] == train["shards"] + 1  # shards + zarr.json
    assert image["ratio"] == pytest.approx(image["nbytes"] / image["bytes"]) and image["ratio"] > 2
    caption = train["fields"]["caption"]
    assert (
        caption["kind"] == "variable"
        and caption["arrow_type"] == "string"
        and caption["objects"] == train["shards"]
    )
    assert caption["nbytes"] > 0
    split_sum = sum(f["bytes"] for s in doc["splits"].values() for f in s["fields"].values())
    assert split_sum < doc["bytes"]  # the groups' zarr.json are the difference
    assert doc["nbytes"] == sum(s["nbytes"] for s in doc["splits"].values())


def test_verify_clean(store: tuple[Path, Manifest], capsys: pytest.CaptureFixture[str]) -> None:
    root, m = store
    rc, out, err = run_cli([str(root), "--verify"], capsys)
    assert rc == 0 and err == ""  # no progress bar when stderr is not a terminal
    assert f"OK; {len(m.objects)} of {len(m.objects)} objects read" in out.splitlines()[-1]


def test_verify_names_every_corrupt_or_missing_object(
    store: tuple[Path, Manifest], capsys: pytest.CaptureFixture[str]
) -> None:
    root, m = store
    shard = next(k for k in sorted(m.objects) if "/train/image/c/" in k)
    part = m.splits["test"].fields["caption"].parts[0].key
    label = next(k for k in sorted(m.objects) if "/train/label/c/" in k)
    flip_bit(str(root / shard), 100)
    flip_bit(str(root / part), 150)
    (root / label).unlink()
    rc, out, err = run_cli([str(root), "--verify"], capsys)
    assert rc == 1
    problems = [line.split(": ", 2) for line in out.splitlines() if line.startswith(("corrupt:", "missing:"))]
    assert sorted((kind, key) for kind, key, _ in problems) == sorted(
        [("corrupt", shard), ("corrupt", part), ("missing", label)]
    )
    assert err.strip().count("\n") == 0 and "3 corrupt, missing or unexpected" in err

    rc, out, _ = run_cli([str(root), "--verify", "--json"], capsys)
    report = json.loads(out)["verify"]
    assert rc == 1 and not report["ok"]
    assert sorted((p["kind"], p["key"]) for p in report["problems"]) == sorted(
        [("corrupt", shard), ("corrupt", part), ("missing", label)]
    )


def test_memory_url(capsys: pytest.CaptureFixture[str]) -> None:
    name = f"hpstore-inspect-{uuid.uuid4().hex}"
    url = f"memory://{name}/digits"
    try:
        m = write_store(open_storage(url), {"train": {"x": np.zeros((10, 3), np.float32)}})
        rc, out, _ = run_cli([url, "--verify"], capsys)
        assert rc == 0 and f"store      {url}" in out and f"generation {m.generation}" in out
    finally:
        fsspec.filesystem("memory").rm(name, recursive=True)


def bad_inputs(tmp_path: Path, store: Path) -> dict[str, tuple[list[str], str]]:
    (tmp_path / "a-file.npy").write_bytes(b"\x93NUMPY")
    (tmp_path / "empty").mkdir()
    return {
        "missing": ([str(tmp_path / "nope")], "no committed store here"),
        "empty-dir": ([str(tmp_path / "empty")], "no committed store here"),
        "a-file": ([str(tmp_path / "a-file.npy")], "not a store"),
        "bad-option": ([str(store), "--storage-option", "novalue"], "expected KEY=VALUE"),
        "bad-flag": ([str(store), "--frobnicate"], "unrecognized arguments"),
    }


@pytest.mark.parametrize("case", ["missing", "empty-dir", "a-file", "bad-option", "bad-flag"])
def test_bad_input_is_one_line(
    store: tuple[Path, Manifest],
    tmp_path_factory: pytest.TempPathFactory,
    case: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    args, message = bad_inputs(tmp_path_factory.mktemp("bad"), store[0])[case]
    rc = main(args)
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert err.startswith("inspect: error: ") and err.count("\n") == 1 and message in err


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        ('{"format": "hpstore", "version": 99, "generation": "data-x"}', "unsupported format version 99"),
        ('{"format": "hpstore", "vers', "not valid JSON"),
        ('{"format": "hpstore", "version": 1}', "malformed manifest"),
        ("[1, 2]", "not an hpstore manifest"),
    ],
)
def test_bad_manifest_is_one_line(
    tmp_path: Path, manifest: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / MANIFEST_KEY).write_text(manifest)
    rc, out, err = run_cli([str(tmp_path), "--verify"], capsys)
    assert rc == 2 and out == ""
    assert err.startswith("inspect: error: ") and err.count("\n") == 1 and message in err


def test_module_entry_point_in_a_subprocess(store: tuple[Path, Manifest]) -> None:
    """The real command: exit codes and stderr as a shell sees them, no traceback."""
    root, _ = store
    env = dict(os.environ, PYTHONPATH=str(REPO))
    ok = subprocess.run(
        [sys.executable, "-m", "tools.inspect", str(root), "--verify"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0 and ok.stderr == "" and "OK" in ok.stdout
    (root / MANIFEST_KEY).write_text('{"format": "hpstore", "version": 3}')
    bad = subprocess.run(
        [sys.executable, "-m", "tools.inspect", str(root)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.splitlines() == [
        f"inspect: error: {root}/manifest.json: unsupported format version 3 (this hpstore reads versions 1, 2)"
    ]


def test_storage_options_parse_json_values() -> None:
    assert parse_storage_options(
        ["anon=true", "n=3", "endpoint_url=http://127.0.0.1:9000", 'k={"a": 1}']
    ) == {
        "anon": True,
        "n": 3,
        "endpoint_url": "http://127.0.0.1:9000",
        "k": {"a": 1},
    }
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_storage_options(["=x"])


def test_progress_bar_only_on_a_terminal() -> None:
    """--verify draws a progress bar on a terminal's stderr (a real pseudo-terminal here)."""
    import fcntl
    import pty
    import struct
    import termios

    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    golden = REPO / "tests" / "data" / "format-v1" / "zstd"
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "tools.inspect", str(golden), "--verify"],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=secondary,
            timeout=120,
        )
    finally:
        os.close(secondary)
    drawn = b""
    while True:
        try:
            data = os.read(primary, 4096)
        except OSError:  # the terminal is closed once everything was read
            break
        if not data:
            break
        drawn += data
    os.close(primary)
    assert proc.returncode == 0
    assert b"verify: 100%" in drawn and b"B/s" in drawn
