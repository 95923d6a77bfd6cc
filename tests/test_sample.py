"""``python -m tools.sample``: an MNIST-style IDX directory, deterministic by seed, that ingests
with no options and holds learnable but not trivial classes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tools.sample import main
from tools.sources import open_splits

NAMES = [
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
]


def load(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for split in open_splits(str(root)):
        batches = list(split.source.batches())
        out[split.name] = (
            np.concatenate([b["image"] for b in batches]),
            np.concatenate([b["label"] for b in batches]),
        )
    return out


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sample") / "a"
    assert main([str(root), "--size-mb", "3", "--seed", "3"]) == 0
    return root


def test_deterministic_by_seed_and_sized_as_asked(
    generated: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, seed in (("b", 3), ("c", 4)):
        assert main([str(tmp_path / name), "--size-mb", "3", "--seed", str(seed)]) == 0
    assert "MB of data" in capsys.readouterr().out
    assert sorted(p.name for p in generated.iterdir()) == NAMES
    for n in NAMES:
        assert (generated / n).read_bytes() == (tmp_path / "b" / n).read_bytes()
        assert (generated / n).read_bytes() != (tmp_path / "c" / n).read_bytes()
    data = load(generated)
    n_train, n_test = len(data["train"][1]), len(data["test"][1])
    assert abs((n_train + n_test) * (28 * 28 + 1) - 3e6) < 28 * 28 + 1
    assert n_test == pytest.approx((n_train + n_test) / 7, abs=1)
    assert data["train"][0].shape[1:] == (28, 28) and data["train"][0].dtype == np.uint8
    assert np.bincount(data["train"][1], minlength=10).min() > n_train / 10 * 0.8


def test_classes_are_learnable_but_not_trivial(generated: Path) -> None:
    data = load(generated)
    x, y = (a.reshape(len(a), -1).astype(np.float32) / 255 if a.ndim == 3 else a for a in data["train"])
    xt, yt = (a.reshape(len(a), -1).astype(np.float32) / 255 if a.ndim == 3 else a for a in data["test"])
    # Nearest class mean: well above chance, far from perfect (shifts and rotations blur the means).
    means = np.stack([x[y == k].mean(0) for k in range(10)])
    centroid = (((xt[:, None, :] - means[None]) ** 2).sum(-1).argmin(1) == yt).mean()
    assert 0.15 < centroid < 0.9
    # Nearest neighbour: the classes have real structure a better model can find.
    d = (xt**2).sum(1)[:, None] - 2 * xt @ x.T + (x**2).sum(1)[None, :]
    assert (y[d.argmin(1)] == yt).mean() > 0.6


def test_bad_size_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "x"), "--size-mb", "0"])
    assert exc.value.code == 2
    assert not (tmp_path / "x").exists()
