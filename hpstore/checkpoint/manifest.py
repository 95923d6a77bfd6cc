"""The documents of one checkpoint: its manifest (what is committed) and its Zarr metadata.

``manifest.json`` is written last, in one atomic write; a checkpoint without it does not exist.
It lists every array (state path, dtype, shape, chunking) and every object under the checkpoint's
prefix with its size and CRC32C, so a loader can verify each byte it reads and name the array a
bad byte belongs to. Everything read from it is validated here before anything is allocated.

Each array's ``zarr.json`` is the plain Zarr v3 metadata of an unsharded array with the ``bytes``
codec (little endian), so ``zarr.open_array`` reads every saved tensor. Zarr v3 has no core type
for bfloat16 or the float8 types: those arrays hold the raw bits as the unsigned integer of the same
width and name the torch dtype in ``attributes["hpstore"]["dtype"]``;
``torch.from_numpy(z[...]).view(torch.bfloat16)`` restores them outside hpstore.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from hpstore.checkpoint.plan import (
    ZARR_CORE_DTYPES,
    ArraySpec,
    is_contiguous_chunking,
)
from hpstore.checkpoint.tree import TORCH_DTYPES
from hpstore.errors import CheckpointError
from hpstore.format.commit import CHECKPOINT_GENERATIONS, safe_key
from hpstore.format.manifest import ObjectEntry

FORMAT_NAME = "hpstore-checkpoint"
FORMAT_VERSION = 1
SHARDED_VERSION = 2
"""Written by distributed (and ``PerRank``) saves: adds ``ranks``, array ``group`` and
``shard_rows``. Readers of version 1 refuse it instead of misreading it."""
TREE_KEY = "tree.json"
GROUP_KEY = "zarr.json"

_HEX8 = re.compile(r"^[0-9a-f]{8}$")
_RANK_GROUP = re.compile(r"^rank-\d{5,}$")


def rank_group(rank: int) -> str:
    """The sub-group of one rank's ``PerRank`` values: ``rank-00003``."""
    return f"rank-{rank:05d}"


@dataclass(frozen=True, kw_only=True)
class CheckpointManifest:
    """``objects`` keys are relative to the checkpoint's prefix; the arrays and ``tree.json`` live
    under ``generation/``, a fresh name per save, so saving a step again never overwrites the
    objects its committed manifest points to."""

    step: int
    generation: str
    arrays: tuple[ArraySpec, ...]
    objects: dict[str, ObjectEntry]
    ranks: int = 0
    """Ranks that wrote a ``PerRank`` tree (version 2); 0 for a version-1 checkpoint."""

    def array_object(self, a: ArraySpec, name: str) -> str:
        return f"{self.generation}/{a.prefix}/{name}"

    @property
    def tree_key(self) -> str:
        return f"{self.generation}/{TREE_KEY}"

    def rank_tree_key(self, rank: int) -> str:
        return f"{self.generation}/{rank_group(rank)}/{TREE_KEY}"

    def owner(self, key: str) -> str:
        """What an object key belongs to, for error messages: ``array 'model/fc.weight'``."""
        for a in self.arrays:
            if key.startswith(f"{self.generation}/{a.prefix}/"):
                return f"array {a.name!r}" + (f" of {a.group}" if a.group else "")
        if key == self.tree_key:
            return "the state tree"
        if key.endswith(f"/{TREE_KEY}"):
            return "a rank's state tree"
        return "the checkpoint's group metadata"

    @property
    def nbytes(self) -> int:
        return sum(o.size for o in self.objects.values())

    def to_json(self) -> str:
        doc: dict[str, Any] = {
            "format": FORMAT_NAME,
            "version": SHARDED_VERSION if self.ranks else FORMAT_VERSION,
            "step": self.step,
            "generation": self.generation,
            "arrays": [array_doc(a) for a in self.arrays],
            "objects": {k: {"size": o.size, "crc32c": o.crc32c} for k, o in self.objects.items()},
        }
        if self.ranks:
            doc["ranks"] = self.ranks
        return json.dumps(doc, indent=0)

    @classmethod
    def from_json(cls, text: bytes, *, where: str) -> CheckpointManifest:
        try:
            doc = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{where}: not valid JSON ({exc})") from None
        try:
            return _from_doc(doc, where)
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(f"{where}: malformed manifest ({type(exc).__name__}: {exc})") from None


def array_doc(a: ArraySpec) -> dict[str, Any]:
    """One array's manifest entry (also what a rank reports of its ``PerRank`` arrays)."""
    d: dict[str, Any] = {
        "name": a.name,
        "key": a.key,
        "kind": a.kind,
        "dtype": a.dtype,
        "shape": list(a.shape),
        "chunk_shape": list(a.chunk_shape),
    }
    if a.group:
        d["group"] = a.group
    if a.shard_rows is not None:
        d["shard_rows"] = a.shard_rows
    return d


def array_from_doc(index: int, d: Any, where: str) -> ArraySpec:
    try:
        return _array(index, d, where)
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{where}: malformed array entry ({type(exc).__name__}: {exc})") from None


def _from_doc(doc: Any, where: str) -> CheckpointManifest:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{where}: not an hpstore checkpoint manifest")
    version = doc.get("version")
    if version not in (FORMAT_VERSION, SHARDED_VERSION):
        raise CheckpointError(f"{where}: unsupported checkpoint format version {version!r}")
    ranks = _int(doc["ranks"], "ranks", where) if version == SHARDED_VERSION else 0
    if version == SHARDED_VERSION and ranks < 1:
        raise CheckpointError(f"{where}: a version-2 checkpoint needs ranks >= 1")
    step = _int(doc["step"], "step", where)
    gen = doc["generation"]
    if not isinstance(gen, str) or not CHECKPOINT_GENERATIONS.readable(gen):
        raise CheckpointError(f"{where}: bad generation {gen!r}")
    objects = {
        safe_key(k, where, CheckpointError): _entry(v, k, where) for k, v in dict(doc["objects"]).items()
    }
    arrays = tuple(_array(i, a, where) for i, a in enumerate(doc["arrays"]))
    if len({a.prefix for a in arrays}) != len(arrays):
        raise CheckpointError(f"{where}: two arrays share one key")
    trees = [f"{gen}/{rank_group(r)}/{TREE_KEY}" for r in range(ranks)]
    for key in (f"{gen}/{TREE_KEY}", GROUP_KEY, *trees):
        if key not in objects:
            raise CheckpointError(f"{where}: {key} is not listed")
    for a in arrays:
        if a.group and (not _RANK_GROUP.match(a.group) or int(a.group[5:]) >= ranks):
            raise CheckpointError(f"{where}: array {a.name!r}: bad group {a.group!r}")
        listed = {f"{gen}/{a.prefix}/zarr.json": None} | {
            f"{gen}/{a.prefix}/{c.key}": c.stored for c in a.chunks
        }
        for key, stored in listed.items():
            if key not in objects:
                raise CheckpointError(f"{where}: array {a.name!r}: {key} is not listed")
            if stored is not None and objects[key].size != stored:
                raise CheckpointError(
                    f"{where}: array {a.name!r}: {key} listed as {objects[key].size} bytes, "
                    f"its chunk holds {stored}"
                )
    return CheckpointManifest(step=step, generation=gen, arrays=arrays, objects=objects, ranks=ranks)


def _array(index: int, d: dict[str, Any], where: str) -> ArraySpec:
    name, key, kind, dtype = (str(d[f]) for f in ("name", "key", "kind", "dtype"))
    if "/" in key:
        raise CheckpointError(f"{where}: array key {key!r} has a '/'")
    safe_key(key, where, CheckpointError)
    if kind == "tensor" and dtype in TORCH_DTYPES:
        itemsize = TORCH_DTYPES[dtype].itemsize
    elif kind == "ndarray" and dtype in ZARR_CORE_DTYPES:
        import numpy as np

        itemsize = np.dtype(dtype).itemsize
    else:
        raise CheckpointError(f"{where}: array {name!r}: unsupported {kind} dtype {dtype!r}")
    shape = tuple(_int(x, "shape", where) for x in d["shape"])
    chunks = tuple(_int(x, "chunk_shape", where) for x in d["chunk_shape"])
    if not is_contiguous_chunking(shape, chunks):
        raise CheckpointError(f"{where}: array {name!r}: chunk shape {chunks} does not fit shape {shape}")
    group = d.get("group", "")
    if not isinstance(group, str):
        raise CheckpointError(f"{where}: array {name!r}: bad group {group!r}")
    shard_rows = d.get("shard_rows")
    if shard_rows is not None:
        shard_rows = _int(shard_rows, "shard_rows", where)
    return ArraySpec(
        index=index, name=name, key=key, kind=kind, dtype=dtype, itemsize=itemsize, shape=shape,
        chunk_shape=chunks, group=group, shard_rows=shard_rows,
    )  # fmt: skip


def _entry(v: Any, key: str, where: str) -> ObjectEntry:
    size, crc = v["size"], v["crc32c"]
    if type(size) is not int or size < 0 or not isinstance(crc, str) or not _HEX8.match(crc):
        raise CheckpointError(f"{where}: bad entry for {key}: {v!r}")
    return ObjectEntry(size=size, crc32c=crc)


def _int(x: Any, what: str, where: str) -> int:
    if type(x) is not int or x < 0:
        raise CheckpointError(f"{where}: {what} must hold non-negative integers, found {x!r}")
    return x


def array_json(a: ArraySpec) -> bytes:
    """The ``zarr.json`` of one saved array: unsharded, ``bytes`` codec, no compression."""
    zdt = a.zarr_dtype
    fill: Any = (
        False
        if zdt == "bool"
        else [0.0, 0.0]
        if zdt.startswith("complex")
        else 0.0
        if zdt.startswith("float")
        else 0
    )
    codec: dict[str, Any] = {"name": "bytes"}
    if a.itemsize > 1:
        codec["configuration"] = {"endian": "little"}
    doc = {
        "zarr_format": 3,
        "node_type": "array",
        "shape": list(a.shape),
        "data_type": zdt,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(a.chunk_shape)}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": fill,
        "codecs": [codec],
        "attributes": {"hpstore": {"name": a.name, "kind": a.kind, "dtype": a.dtype}},
    }
    return json.dumps(doc).encode()


def group_json(step: int) -> bytes:
    """Group metadata of the checkpoint's prefix and of its generation (identical on purpose:
    rewriting the prefix's copy on a second save of the same step changes no byte)."""
    attrs = {"hpstore": {"format": FORMAT_NAME, "version": FORMAT_VERSION, "step": step}}
    return json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attrs}).encode()


def parse_manifest(text: bytes, where: str) -> CheckpointManifest:
    """``CheckpointManifest.from_json`` as the ``parse`` function of ``hpstore.format.commit``."""
    return CheckpointManifest.from_json(text, where=where)
