"""The manifest: the one JSON document that defines what a store holds and that it is complete.

Layout of a store (``docs/FORMAT.md`` is the full description)::

    manifest.json                       written last, atomically; nothing else is trusted
    data-<generation>/zarr.json         a Zarr v3 group
    data-<generation>/<split>/<field>/  a Zarr v3 array (fixed-shape field), or
    data-<generation>/<split>/<field>/part-00000.arrow ...   Arrow IPC files (variable-length field)

A new ingest (or an overwrite) writes a fresh generation next to the old one and then replaces
``manifest.json``; only after that are older generations deleted. A reader that trusts only the
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
from hpstore.storage.base import Storage, check_key

FORMAT_NAME = "hpstore"
FORMAT_VERSION = 1

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

    @property
    def is_array(self) -> bool:
        return self.kind == "array"

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

    def to_json(self) -> str:
        return json.dumps(_manifest_to_dict(self), indent=1, sort_keys=False)

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
        "version": m.version,
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
    else:
        d.update(
            arrow_type=f.arrow_type,
            arrow_schema=f.arrow_schema,
            codec=f.codec,
            parts=[{"key": p.key, "batches": [list(b) for b in p.batches]} for p in f.parts],
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
    if version != FORMAT_VERSION:
        raise ManifestError(
            f"{where}: unsupported format version {version!r} (this hpstore reads version {FORMAT_VERSION})"
        )
    generation = check_key(str(doc["generation"]))
    objects = {}
    for key, o in doc["objects"].items():
        _safe(key, where)
        objects[key] = ObjectEntry(size=int(o["size"]), crc32c=str(o["crc32c"]))
    splits = {}
    for sname, s in doc["splits"].items():
        fields_ = {}
        for fname, f in s["fields"].items():
            _safe(f["path"], where)
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
                )
            elif f["kind"] == "variable":
                parts = tuple(
                    ArrowPart(
                        key=_safe(p["key"], where),
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
        splits[sname] = split
    return Manifest(
        version=version,
        generation=generation,
        splits=splits,
        objects=objects,
        source=dict(doc.get("source", {})),
        created=str(doc.get("created", "")),
    )


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _safe(key: str, where: str) -> str:
    try:
        return check_key(key)
    except ValueError as exc:
        raise ManifestError(f"{where}: {exc}") from None


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
    """Compare the manifest's objects with what the store holds under its generation.

    Raises ``ManifestError`` naming the first missing, extra, or wrongly sized objects.
    """
    prefix = manifest.generation + "/"
    present = {k: v for k, v in listing.items() if k.startswith(prefix)}
    missing = sorted(set(manifest.objects) - set(present))
    extra = sorted(set(present) - set(manifest.objects))
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
