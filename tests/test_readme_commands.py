"""Every shell command in README.md's "Ingest and inspect" and "Training" sections runs as written.

The commands are read from the README itself (so an edited example is tested as edited) and run
with bash, one after another, in a scratch directory that holds small inputs under the names the
README uses (an MNIST directory, a Parquet file, an image folder, two ``.npy`` files). ``python``
and ``torchrun`` are this interpreter's. The one S3 command runs against the loopback moto server:
its example endpoint is swapped for the server's and its bucket is created first.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.support.ingest_data import write_mnist_dir
from tests.support.s3server import S3Server, client_env
from tests.support.s3server import s3_server as s3_server  # the fixture

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("Ingest and inspect", "Training")
README_ENDPOINT = "http://127.0.0.1:9000"


def section_commands(readme: str, title: str) -> list[str]:
    """The lines of the ``sh`` code blocks of one ``###`` section."""
    match = re.search(rf"^### {re.escape(title)}\n(.*?)(?=^##)", readme, re.M | re.S)
    assert match, f"README has no section {title!r}"
    blocks = re.findall(r"^```sh\n(.*?)^```", match.group(1), re.M | re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def readme_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    return [c for title in SECTIONS for c in section_commands(readme, title)]


def test_the_readme_sections_hold_the_commands_this_test_expects() -> None:
    commands = readme_commands()
    assert len(commands) >= 7, commands
    assert all(c.startswith(("python -m ", "torchrun ")) for c in commands), commands


def make_inputs(cwd: Path) -> None:
    write_mnist_dir(cwd / "path" / "to" / "mnist", 256, 64, gz=True)
    pq.write_table(
        pa.table({"x": np.arange(300, dtype=np.float32), "y": np.arange(300) % 3}), cwd / "train.parquet"
    )
    for cls in ("cat", "dog"):
        (cwd / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            pixels = np.full((8 + i, 10, 3), 40 * i, dtype=np.uint8)  # real PNGs: ingest decodes each
            Image.fromarray(pixels).save(cwd / "imgs" / cls / f"{i}.png")
    rng = np.random.default_rng(0)
    np.save(cwd / "x.npy", rng.integers(0, 255, (120, 8, 8), dtype=np.uint8))
    np.save(cwd / "y.npy", rng.integers(0, 10, 120))


def test_every_readme_command_runs_as_written(tmp_path: Path, s3_server: S3Server) -> None:
    make_inputs(tmp_path)
    bindir = tmp_path / ".bin"
    bindir.mkdir()
    # A wrapper, not a symlink: a virtualenv's interpreter finds its site-packages from its own path.
    (bindir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bindir / "python").chmod(0o755)
    env = {
        **os.environ,
        **client_env(s3_server.endpoint),
        "PATH": os.pathsep.join([str(bindir), str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
    }
    for command in readme_commands():
        if "s3://" in command:
            bucket = re.search(r"s3://([^/\s]+)", command)
            assert bucket and README_ENDPOINT in command, command
            s3_server.create_bucket(bucket.group(1))
            command = command.replace(README_ENDPOINT, s3_server.endpoint)
        proc = subprocess.run(
            ["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert (
        (tmp_path / "ckpt").is_dir() and (tmp_path / "ckpt-ddp").is_dir() and (tmp_path / "m.jsonl").exists()
    )


@pytest.mark.parametrize("title", SECTIONS)
def test_sections_are_found(title: str) -> None:
    assert section_commands((ROOT / "README.md").read_text(), title)
