"""An explicit rank or world size must agree with an initialised torch.distributed process group
(a real gloo group, of one process): otherwise every rank would silently read a share of the wrong
size."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist

import hpstore
from hpstore.storage.local import LocalStorage
from tests.support.stores import write_store


@pytest.fixture
def group(tmp_path: Path) -> Iterator[None]:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_explicit_world_that_disagrees_with_the_process_group_is_refused(tmp_path: Path, group: None) -> None:
    write_store(LocalStorage(str(tmp_path / "s")), {"train": {"x": np.arange(100)}})
    ds = hpstore.open(str(tmp_path / "s")).split("train")
    with pytest.raises(hpstore.InputError, match=r"world_size=2 disagrees .* \(world_size 1\)"):
        hpstore.Loader(ds, 10, world_size=2)
    with pytest.raises(hpstore.InputError, match="disagrees with the initialised"):
        hpstore.Loader(ds, 10, rank=1, world_size=2)
    # Agreeing values, or none, take the group's: every sample once.
    for kwargs in ({}, {"world_size": 1}, {"rank": 0, "world_size": 1}):
        loader = hpstore.Loader(ds, 10, num_workers=0, **kwargs)  # type: ignore[arg-type]
        assert sorted(np.concatenate([b["x"].numpy() for b in loader]).tolist()) == list(range(100))
