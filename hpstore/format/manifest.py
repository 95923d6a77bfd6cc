"""The manifest: the one JSON document that defines what a store holds and that it is complete.

Layout of a store (``docs/FORMAT.md`` is the full description)::

    manifest.json                       written last, atomically; nothing else is trusted
    data-<generation>/zarr.json         a Zarr v3 group
    data-<generation>/<split>/<field>/  a Zarr v3 array (fixed-shape field), or
    data-<generation>/<split>/<field>/part-00000.arrow ...   Arrow IPC files (variable-length field)

A new ingest (or an overwrite) writes a fresh generation next to the old one and then replaces
``manifest.json``; only after that are older generations deleted. An append (format version 2)
writes only the new rows (plus the rows of the old partial last shard) into a new generation and
commits a manifest whose objects span generations: an array field then lists its **segments**
(runs of shards, each under its own generation's path) and an Arrow field's parts name their own
keys, as they always did. Generations the committed manifest references are kept. A reader that trusts only the
manifest therefore never sees a half-written store. The rules of that commit (generation naming,
what may be deleted, the writer lock) live in ``hpstore.format.commit``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from hpstore.errors import ManifestError
from hpstore.format import commit
from hpstore.format.commit import MANIFEST_KEY
from hpstore.storage.base import Storage

FORMAT_NAME = "hpstore"
FORMAT_VERSION = 2
"""The newest version this hpstore reads and writes. A manifest is written as version 1 whenever
its objects all lie under its own generation (every store that was never appended to), so that
older readers keep reading it; version 2 only when it references older generations (after an
append), which a version-1 reader would misread (it derives every shard key from one path)."""
READ_VERSIONS = (1, 2)

Codec = dict[str, Any]
"""``{"name": "zstd", "level": 1}``, ``{"name": "lz4", "level": 5}`` (blosc-lz4) or ``{"name": "none"}``."""

CODEC_NAMES = ("zstd", "lz4", "none")


@dataclass(frozen=True, kw_only=True)
class ObjectEntry:
    size: int
    crc32c: str


@dataclass(frozen=True, kw_only=True)
class ArrowPart:
    """One Arrow IPC file covering ``len(batches)`` consecutive chunks of a split.

    ``batches[i] = (offset, length, crc32c)`` locates the IPC message of record batch i (one per
    chunk) inside the file, so a reader fetches exactly one chunk's bytes by range.
    """

    key: str
    batches: tuple[tuple[int, int, str], ...]


@dataclass(frozen=True, kw_only=True)
class Segment:
    """Shards ``[first_shard, stop_shard)`` of an array field, stored in the Zarr array at ``path``
    (shard ``s`` is ``shard_key(path, s, ndim)``: global shard numbers, so each segment's
    array is the whole field's shape with only its own shards present)."""

    path: str
    first_shard: int
    stop_shard: int


@dataclass(frozen=True, kw_only=True)
class FieldSpec:
    """One field of a split. ``kind="array"``: fixed per-sample ``shape`` and ``dtype`` (a Zarr
    array at ``path``). ``kind="variable"``: Arrow ``arrow_type`` stored in ``parts``."""

    name: str
    kind: Literal["array", "variable"]
    path: str
    dtype: str | None = None
    shape: tuple[int, ...] | None = None
    codec: Codec = field(default_factory=lambda: {"name": "none"})
    arrow_type: str | None = None
    arrow_schema: str | None = None  # base64 of the Arrow IPC schema message (exact nested types)
    parts: tuple[ArrowPart, ...] = ()
    attrs: dict[str, Any] = field(default_factory=dict)
    nbytes: int | None = None
    """Uncompressed bytes of the field's values (array: samples x itemsize x shape; variable: the
    Arrow buffers of its record batches). Optional: only what ``inspect`` reports as a ratio."""
    segments: tuple[Segment, ...] = ()
    """Array fields written by more than one generation (appends), in shard order; empty: one
    segment, every shard under ``path`` (all of format version 1)."""

    @property
    def is_array(self) -> bool:
        return self.kind == "array"

    def shard_path(self, shard: int) -> str:
        """The Zarr array path that holds shard ``shard`` of this (array) field."""
        for seg in reversed(self.segments):
            if shard >= seg.first_shard:
                return seg.path
        return self.path

    def segments_of(self, num_shards: int) -> tuple[Segment, ...]:
        """The segments, with the implicit single one of a field that never had an append."""
        return self.segments or (Segment(path=self.path, first_shard=0, stop_shard=num_shards),)

    def describe(self) -> str:
        if self.is_array:
            return f"{self.dtype}{list(self.shape or ())}"
        return f"variable<{self.arrow_type}>"


@dataclass(frozen=True, kw_only=True)
class SplitSpec:
    """A split: ``num_samples`` rows, cut into chunks of ``chunk_rows`` rows (every field uses the
    same sample ranges), grouped ``chunks_per_shard`` to an object."""

    name: str
    num_samples: int
    chunk_rows: int
    chunks_per_shard: int
    fields: dict[str, FieldSpec]

    @property
    def shard_rows(self) -> int:
        return self.chunk_rows * self.chunks_per_shard

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.num_samples / self.chunk_rows) if self.num_samples else 0

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_chunks / self.chunks_per_shard)

    def chunk_range(self, chunk: int) -> tuple[int, int]:
        start = chunk * self.chunk_rows
        return start, min(start + self.chunk_rows, self.num_samples)


@dataclass(frozen=True, kw_only=True)
class Manifest:
    generation: str
    splits: dict[str, SplitSpec]
    objects: dict[str, ObjectEntry]
    source: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    version: int = FORMAT_VERSION

    @property
    def total_bytes(self) -> int:
        return sum(o.size for o in self.objects.values())

    @property
    def generations(self) -> set[str]:
        """Every generation this manifest references: its own and those of older objects it reuses
        (after an append). Garbage collection keeps all of them."""
        return {self.generation} | commit.referenced_generations(self.objects)

    @property
    def required_version(self) -> int:
        """1 unless objects of other generations are referenced (see ``FORMAT_VERSION``)."""
        return 1 if self.generations == {self.generation} else 2

    def to_json(self) -> str:
        # Compact: 10,000 partitions make a manifest of ~10^5 objects, and indenting it took
        # ~80 % of the commit (json's C encoder only runs without ``indent``).
        return json.dumps(_manifest_to_dict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes, *, where: str = MANIFEST_KEY) -> Manifest:
        try:
            doc = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ManifestError(f"{where}: not valid JSON ({exc})") from None
        try:
            return _manifest_from_dict(doc, where)
        except ManifestError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"{where}: malformed manifest ({type(exc).__name__}: {exc})") from None


def _manifest_to_dict(m: Manifest) -> dict[str, Any]:
    return {
        "format": FORMAT_NAME,
        "version": m.required_version,
        "created": m.created,
        "generation": m.generation,
        "source": m.source,
        "splits": {
            s.name: {
                "num_samples": s.num_samples,
                "chunk_rows": s.chunk_rows,
                "chunks_per_shard": s.chunks_per_shard,
                "fields": {f.name: _field_to_dict(f) for f in s.fields.values()},
            }
            for s in m.splits.values()
        },
        "objects": {k: {"size": o.size, "crc32c": o.crc32c} for k, o in sorted(m.objects.items())},
    }


def _field_to_dict(f: FieldSpec) -> dict[str, Any]:
    d: dict[str, Any] = {"kind": f.kind, "path": f.path}
    if f.is_array:
        d.update(dtype=f.dtype, shape=list(f.shape or ()), codec=f.codec)
        if f.segments:
            d["segments"] = [{"path": g.path, "shards": [g.first_shard, g.stop_shard]} for g in f.segments]
    else:
        d.update(
            arrow_type=f.arrow_type,
            arrow_schema=f.arrow_schema,
            codec=f.codec,
            parts=[{"key": p.key, "batches": p.batches} for p in f.parts],  # tuples encode as arrays
        )
    if f.attrs:
        d["attrs"] = f.attrs
    if f.nbytes is not None:
        d["nbytes"] = f.nbytes
    return d


def _manifest_from_dict(doc: Any, where: str) -> Manifest:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise ManifestError(f"{where}: not an {FORMAT_NAME} manifest")
    version = doc.get("version")
    if version not in READ_VERSIONS:
        raise ManifestError(
            f"{where}: unsupported format version {version!r} (this hpstore reads versions "
            f"{', '.join(map(str, READ_VERSIONS))})"
        )
    generation = commit.safe_key(str(doc["generation"]), where)
    objects = {}
    for key, o in doc["objects"].items():
        commit.safe_key(key, where)
        objects[key] = ObjectEntry(size=int(o["size"]), crc32c=str(o["crc32c"]))
    splits = {}
    for sname, s in doc["splits"].items():
        fields_ = {}
        for fname, f in s["fields"].items():
            commit.safe_key(f["path"], where)
            if f["kind"] == "array":
                fields_[fname] = FieldSpec(
                    name=fname,
                    kind="array",
                    path=f["path"],
                    dtype=str(f["dtype"]),
                    shape=tuple(int(x) for x in f["shape"]),
                    codec=dict(f["codec"]),
                    attrs=dict(f.get("attrs", {})),
                    nbytes=_optional_int(f.get("nbytes")),
                    segments=tuple(
                        Segment(
                            path=commit.safe_key(g["path"], where),
                            first_shard=int(g["shards"][0]),
                            stop_shard=int(g["shards"][1]),
                        )
                        for g in (f.get("segments", ()) if version >= 2 else ())
                    ),
                )
            elif f["kind"] == "variable":
                parts = tuple(
                    ArrowPart(
                        key=commit.safe_key(p["key"], where),
                        batches=tuple((int(o), int(n), str(c)) for o, n, c in p["batches"]),
                    )
                    for p in f["parts"]
                )
                fields_[fname] = FieldSpec(
                    name=fname,
                    kind="variable",
                    path=f["path"],
                    arrow_type=str(f["arrow_type"]),
                    arrow_schema=f.get("arrow_schema"),
                    codec=dict(f.get("codec", {"name": "none"})),
                    parts=parts,
                    attrs=dict(f.get("attrs", {})),
                    nbytes=_optional_int(f.get("nbytes")),
                )
            else:
                raise ManifestError(f"{where}: field {sname}/{fname} has unknown kind {f['kind']!r}")
        split = SplitSpec(
            name=sname,
            num_samples=int(s["num_samples"]),
            chunk_rows=int(s["chunk_rows"]),
            chunks_per_shard=int(s["chunks_per_shard"]),
            fields=fields_,
        )
        if split.chunk_rows < 1 or split.chunks_per_shard < 1 or split.num_samples < 0:
            raise ManifestError(f"{where}: split {sname} has an invalid chunk layout")
        for f in split.fields.values():
            if f.segments and not _tiles(f.segments, split.num_shards):
                raise ManifestError(f"{where}: field {sname}/{f.name}: segments do not cover its shards")
        splits[sname] = split
    return Manifest(
        version=version,
        generation=generation,
        splits=splits,
        objects=objects,
        source=dict(doc.get("source", {})),
        created=str(doc.get("created", "")),
    )


def _tiles(segments: tuple[Segment, ...], num_shards: int) -> bool:
    """True if the segments cover shards ``0 .. num_shards`` in order, without gaps or overlaps."""
    at = 0
    for g in segments:
        if g.first_shard != at or g.stop_shard <= g.first_shard:
            return False
        at = g.stop_shard
    return at == num_shards


def shard_key(array_path: str, shard: int, ndim: int) -> str:
    """Key of shard ``shard`` of an array with ``ndim`` dims (only the first axis is split)."""
    return f"{array_path}/c/{shard}" + "/0" * (ndim - 1)


def referenced_keys(manifest: Manifest) -> list[str]:
    """Every object key the splits of ``manifest`` point at: group metadata under its generation,
    each array segment's ``zarr.json`` and shards, each Arrow part."""
    keys = [f"{manifest.generation}/zarr.json"]
    for split in manifest.splits.values():
        keys.append(f"{manifest.generation}/{split.name}/zarr.json")
        for f in split.fields.values():
            if f.is_array:
                ndim = 1 + len(f.shape or ())
                for g in f.segments_of(split.num_shards):
                    keys.append(f"{g.path}/zarr.json")
                    keys.extend(shard_key(g.path, s, ndim) for s in range(g.first_shard, g.stop_shard))
            else:
                keys.extend(p.key for p in f.parts)
    return keys


def list_objects(storage: Storage, manifest: Manifest) -> dict[str, int]:
    """``storage.list`` of every generation ``manifest`` references, as one listing."""
    listing: dict[str, int] = {}
    for g in sorted(manifest.generations):
        listing.update(storage.list(g))
    return listing


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def parse_manifest(text: bytes, where: str) -> Manifest:
    """``Manifest.from_json`` as the ``parse`` function of ``hpstore.format.commit``."""
    return Manifest.from_json(text, where=where)


def read_manifest(storage: Storage) -> Manifest:
    """The committed manifest of the store at ``storage``; ``StoreNotFoundError`` if there is none."""
    return commit.read_manifest(storage, parse_manifest)


def commit_manifest(storage: Storage, manifest: Manifest) -> None:
    """Make ``manifest`` the store's committed state: a single atomic object write."""
    commit.commit_manifest(storage, manifest.to_json().encode())


def check_listing(manifest: Manifest, listing: dict[str, int], where: str) -> None:
    """Compare the manifest's objects with what the store holds (``list_objects``).

    Raises ``ManifestError`` naming the first missing, extra, or wrongly sized objects. Extra means
    under the manifest's own generation: an older generation an append reuses also holds objects
    the new manifest no longer names (the partial shard it rewrote), which running readers of the
    older manifest may still read.
    """
    prefix = manifest.generation + "/"
    present = listing
    missing = sorted(set(manifest.objects) - set(present))
    extra = sorted(k for k in present if k.startswith(prefix) and k not in manifest.objects)
    wrong = sorted(k for k, o in manifest.objects.items() if k in present and present[k] != o.size)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing object(s), e.g. {missing[0]}")
    if extra:
        problems.append(f"{len(extra)} object(s) not in the manifest, e.g. {extra[0]}")
    if wrong:
        k = wrong[0]
        problems.append(
            f"size mismatch for {k} ({present[k]} bytes, manifest says {manifest.objects[k].size})"
        )
    if problems:
        raise ManifestError(f"{where}: " + "; ".join(problems))
