"""The state tree: a nested training state split into JSON and a list of array leaves.

``flatten(state)`` walks a nested structure (a model's and an optimizer's ``state_dict()``,
scheduler and RNG states, a loader's state, user extras) and returns

* ``tree``: a JSON-able document in which every value carries an explicit type tag, and every
  tensor or numpy array is replaced by a reference ``{"tensor": i}`` / ``{"ndarray": i}``;
* ``leaves``: the arrays, in reference order, with their paths (for names and error messages).

``unflatten(tree, arrays)`` is the inverse. Both are pure functions: no I/O, no torch device work.

Why tags and not plain JSON: plain JSON loses tuples vs lists, int dict keys (optimizer state is
keyed by parameter index), non-finite floats, and ``None`` vs missing. Why not pickle: loading an
untrusted checkpoint must not be able to run code, so decoding only ever builds the closed set of
types below, from a tag table.

Tags::

    {"none": null}  {"bool": true}  {"int": 3}  {"float": 0.5 | "nan" | "inf" | "-inf"}
    {"complex": [re, im]}  {"str": "x"}  {"list": [node, ...]}  {"tuple": [node, ...]}
    {"dict": [[key_node, value_node], ...]}
    {"odict": {"items": [[key_node, value_node], ...], "meta": node | null}}   (OrderedDict;
        ``meta`` keeps ``state_dict()._metadata``, the per-module versions torch consults on load)
    {"npscalar": ["float32", node]}  {"torch.dtype": "bfloat16"}
    {"tensor": i}  {"ndarray": i}
    {"per_rank": k}   (the k-th ``PerRank`` value: each rank's own, kept apart; loads as a list
        indexed by the rank that saved it)
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from hpstore.errors import CheckpointError

Key = Any
"""A dict key: str, int, float, bool, None, or a tuple of those."""

Path = tuple[Key, ...]

Leaf = torch.Tensor | np.ndarray

TORCH_DTYPES: dict[str, torch.dtype] = {
    str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, torch.dtype)
}
"""Every dtype this torch build knows, by its short name (``"bfloat16"``)."""


class PerRank:
    """Marks a part of a state that differs by rank (RNG states, a loader's position): in a
    distributed save every rank writes its own, instead of rank 0 writing one for all.

    ``state = {"model": ..., "rank": PerRank({"rng": ...})}``; ``load()`` gives ``state["rank"]``
    as the list of every saving rank's value, indexed by rank."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"PerRank({self.value!r})"


@dataclass(frozen=True, kw_only=True)
class FlatState:
    tree: Any
    leaves: list[Leaf]
    paths: list[Path]
    per_rank: list[Any] = field(default_factory=list)
    """The values of the ``PerRank`` markers, in tag order (``{"per_rank": k}``)."""
    per_rank_paths: list[Path] = field(default_factory=list)


def path_str(path: Path) -> str:
    """``("optimizer", "state", 0, "exp_avg")`` -> ``"optimizer/state/0/exp_avg"``."""
    return "/".join(str(p) for p in path) or "<root>"


def flatten(state: Any) -> FlatState:
    """Split ``state`` into a tagged JSON tree and its array leaves (see the module docstring)."""
    leaves: list[Leaf] = []
    paths: list[Path] = []
    enc = _Encoder(leaves, paths)
    tree = enc.node(state, ())
    return FlatState(
        tree=tree, leaves=leaves, paths=paths, per_rank=enc.per_rank, per_rank_paths=enc.per_rank_paths
    )


class _Encoder:
    def __init__(self, leaves: list[Leaf], paths: list[Path]) -> None:
        self.leaves = leaves
        self.paths = paths
        self.open: set[int] = set()  # containers on the current path, to refuse cycles
        self.per_rank: list[Any] = []
        self.per_rank_paths: list[Path] = []

    def node(self, x: Any, path: Path) -> Any:
        if isinstance(x, PerRank):
            self.per_rank.append(x.value)
            self.per_rank_paths.append(path)
            return {"per_rank": len(self.per_rank) - 1}
        if isinstance(x, torch.Tensor | np.ndarray):
            self.leaves.append(x)
            self.paths.append(path)
            return {"tensor" if isinstance(x, torch.Tensor) else "ndarray": len(self.leaves) - 1}
        if isinstance(x, np.generic):  # before scalars: np.float64 is also a float
            value = _scalar(x.item())
            if value is None or x.dtype.kind not in "biufc":
                raise CheckpointError(f"state[{path_str(path)}]: cannot save numpy scalar of {x.dtype}")
            return {"npscalar": [x.dtype.name, value]}
        scalar = _scalar(x)
        if scalar is not None:
            return scalar
        if isinstance(x, torch.dtype):
            return {"torch.dtype": str(x).removeprefix("torch.")}
        if isinstance(x, list | tuple | dict):
            if id(x) in self.open:
                raise CheckpointError(f"state[{path_str(path)}]: the state contains a reference cycle")
            self.open.add(id(x))
            try:
                return self._container(x, path)
            finally:
                self.open.discard(id(x))
        raise CheckpointError(
            f"state[{path_str(path)}]: cannot save a {type(x).__module__}.{type(x).__qualname__} "
            "(tensors, numpy arrays, numbers, strings, bools, None, lists, tuples and dicts can be saved)"
        )

    def _container(self, x: list[Any] | tuple[Any, ...] | dict[Any, Any], path: Path) -> Any:
        if isinstance(x, list):
            return {"list": [self.node(v, (*path, i)) for i, v in enumerate(x)]}
        if isinstance(x, tuple):
            return {"tuple": [self.node(v, (*path, i)) for i, v in enumerate(x)]}
        items = [[self.key(k, path), self.node(v, (*path, k))] for k, v in x.items()]
        if isinstance(x, OrderedDict):
            meta = getattr(x, "_metadata", None)
            return {"odict": {"items": items, "meta": None if meta is None else self.node(meta, path)}}
        return {"dict": items}

    def key(self, k: Key, path: Path) -> Any:
        scalar = _scalar(k)
        if scalar is not None:
            return scalar
        if isinstance(k, tuple):
            return {"tuple": [self.key(v, path) for v in k]}
        raise CheckpointError(f"state[{path_str(path)}]: cannot save a dict key of type {type(k).__name__}")


def _scalar(x: Any) -> dict[str, Any] | None:
    """The tagged node of a JSON scalar, or None when ``x`` is not one."""
    if x is None:
        return {"none": None}
    if isinstance(x, bool):
        return {"bool": x}
    if isinstance(x, int):
        return {"int": int(x)}
    if isinstance(x, float):
        return {"float": float(x) if math.isfinite(x) else repr(float(x))}
    if isinstance(x, complex):
        return {"complex": [_scalar(x.real), _scalar(x.imag)]}
    if isinstance(x, str):
        return {"str": str(x)}
    return None


def unflatten(
    tree: Any,
    arrays: Sequence[Leaf],
    *,
    where: str = "tree.json",
    per_rank: Sequence[Sequence[Any]] | None = None,
) -> Any:
    """Rebuild the state from a tree and its arrays. Malformed input raises ``CheckpointError``.
    ``per_rank[r]``: rank r's decoded ``PerRank`` values (a tree without them refuses the tag)."""
    return _Decoder(arrays, where, per_rank).node(tree)


class _Decoder:
    def __init__(self, arrays: Sequence[Leaf], where: str, per_rank: Sequence[Sequence[Any]] | None) -> None:
        self.arrays = arrays
        self.where = where
        self.per_rank = per_rank

    def rank_values(self, v: Any) -> list[Any]:
        if self.per_rank is None:
            raise self.bad("'per_rank' value in a checkpoint saved without per-rank values")
        if type(v) is not int or not all(0 <= v < len(r) for r in self.per_rank):
            raise self.bad(f"per-rank reference {_preview(v)} out of range")
        return [r[v] for r in self.per_rank]

    def bad(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.where}: {what}")

    def node(self, n: Any) -> Any:
        if not isinstance(n, dict) or len(n) != 1:
            raise self.bad(f"expected a one-key tagged object, found {_preview(n)}")
        ((tag, v),) = n.items()
        decode = _DECODERS.get(tag)
        if decode is None:
            raise self.bad(f"unknown tag {tag!r}")
        return decode(self, v)

    def items(self, v: Any) -> list[tuple[Any, Any]]:
        if not isinstance(v, list) or not all(isinstance(p, list) and len(p) == 2 for p in v):
            raise self.bad(f"dict items must be [key, value] pairs, found {_preview(v)}")
        out = []
        for k, val in v:
            key = self.node(k)
            try:
                hash(key)
            except TypeError:
                raise self.bad(f"unhashable dict key {_preview(k)}") from None
            out.append((key, self.node(val)))
        return out

    def leaf(self, v: Any, kind: type) -> Any:
        if type(v) is not int or not 0 <= v < len(self.arrays):
            raise self.bad(f"array reference {_preview(v)} out of range (0..{len(self.arrays) - 1})")
        if not isinstance(self.arrays[v], kind):
            raise self.bad(f"array reference {v} is not a {kind.__name__}")
        return self.arrays[v]

    def typed(self, v: Any, kind: type | tuple[type, ...], tag: str) -> Any:
        if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
            raise self.bad(f"{tag!r} holds {_preview(v)}")
        return v

    def float_(self, v: Any) -> float:
        if isinstance(v, str) and v in ("nan", "inf", "-inf"):
            return float(v)
        if isinstance(v, int | float) and not isinstance(v, bool):
            return float(v)
        raise self.bad(f"'float' holds {_preview(v)}")

    def complex_(self, v: Any) -> complex:
        if not (isinstance(v, list) and len(v) == 2):
            raise self.bad(f"'complex' holds {_preview(v)}")
        parts = [self.node(p) for p in v]
        if not all(isinstance(p, float) for p in parts):
            raise self.bad(f"'complex' holds {_preview(v)}")
        return complex(parts[0], parts[1])

    def npscalar(self, v: Any) -> Any:
        if not (isinstance(v, list) and len(v) == 2 and isinstance(v[0], str)):
            raise self.bad(f"'npscalar' holds {_preview(v)}")
        try:
            dtype = np.dtype(v[0])
        except TypeError:
            raise self.bad(f"unknown numpy dtype {v[0]!r}") from None
        if dtype.kind not in "biufc":
            raise self.bad(f"numpy scalar dtype {v[0]!r} is not numeric")
        return dtype.type(self.node(v[1]))

    def odict(self, v: Any) -> OrderedDict[Any, Any]:
        if not (isinstance(v, dict) and set(v) == {"items", "meta"}):
            raise self.bad(f"'odict' holds {_preview(v)}")
        out: OrderedDict[Any, Any] = OrderedDict(self.items(v["items"]))
        if v["meta"] is not None:
            out._metadata = self.node(v["meta"])  # type: ignore[attr-defined]
        return out

    def torch_dtype(self, v: Any) -> torch.dtype:
        if not isinstance(v, str) or v not in TORCH_DTYPES:
            raise self.bad(f"unknown torch dtype {_preview(v)}")
        return TORCH_DTYPES[v]


_DECODERS: dict[str, Any] = {
    "none": lambda d, v: d.typed(v, type(None), "none"),
    "bool": lambda d, v: d.typed(v, bool, "bool"),
    "int": lambda d, v: d.typed(v, int, "int"),
    "float": lambda d, v: d.float_(v),
    "complex": lambda d, v: d.complex_(v),
    "str": lambda d, v: d.typed(v, str, "str"),
    "list": lambda d, v: [d.node(x) for x in d.typed(v, list, "list")],
    "tuple": lambda d, v: tuple(d.node(x) for x in d.typed(v, list, "tuple")),
    "dict": lambda d, v: dict(d.items(v)),
    "odict": lambda d, v: d.odict(v),
    "npscalar": lambda d, v: d.npscalar(v),
    "torch.dtype": lambda d, v: d.torch_dtype(v),
    "tensor": lambda d, v: d.leaf(v, torch.Tensor),
    "ndarray": lambda d, v: d.leaf(v, np.ndarray),
    "per_rank": lambda d, v: d.rank_values(v),
}


def _preview(x: Any) -> str:
    text = repr(x)
    return text if len(text) <= 60 else text[:57] + "..."
