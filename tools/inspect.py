"""``python -m tools.inspect STORE [--verify] [--storage-option K=V] [--json]``

Prints a store's manifest as a readable summary: splits (samples, chunking, shards) and fields
(kind, type, codec, bytes on disk, uncompressed bytes, ratio). ``--verify`` re-reads every object
and checks sizes and CRC32C checksums (``hpstore.format.verify``), printing one line per problem.

Exit status: 0 when the store reads (and, with ``--verify``, verifies) cleanly; 1 when
verification finds problems; 2 for bad input (not a store, unreadable manifest, bad flags).
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

from hpstore.errors import HpstoreError, InputError
from hpstore.format.manifest import FORMAT_NAME, Codec, FieldSpec, Manifest, SplitSpec, read_manifest
from hpstore.format.verify import VerifyReport, verify
from hpstore.options import OneLineParser, UsageError, parse_storage_options
from hpstore.storage.base import Storage
from hpstore.storage.open import is_local, open_storage

PROG = "inspect"
EXIT_PROBLEMS = 1
EXIT_BAD_INPUT = 2


def codec_label(codec: Codec) -> str:
    name = str(codec.get("name", "none"))
    return f"{name}-{codec['level']}" if "level" in codec else name


def _ratio(nbytes: int | None, on_disk: int) -> float | None:
    return nbytes / on_disk if nbytes is not None and on_disk > 0 else None


def _bytes_under(manifest: Manifest, prefix: str) -> int:
    return sum(o.size for k, o in manifest.objects.items() if k.startswith(prefix + "/"))


def _field_summary(manifest: Manifest, f: FieldSpec) -> dict[str, Any]:
    on_disk = _bytes_under(manifest, f.path)
    return {
        "kind": f.kind,
        "dtype": f.dtype if f.is_array else None,
        "shape": list(f.shape or ()) if f.is_array else None,
        "arrow_type": None if f.is_array else f.arrow_type,
        "type": f.describe(),
        "codec": codec_label(f.codec),
        "bytes": on_disk,
        "nbytes": f.nbytes,
        "ratio": _ratio(f.nbytes, on_disk),
        "objects": sum(1 for k in manifest.objects if k.startswith(f.path + "/")),
        "attrs": f.attrs,
    }


def _split_summary(manifest: Manifest, s: SplitSpec) -> dict[str, Any]:
    fields = {name: _field_summary(manifest, f) for name, f in s.fields.items()}
    known = [f["nbytes"] for f in fields.values()]
    nbytes = sum(known) if None not in known else None
    on_disk = _bytes_under(manifest, f"{manifest.generation}/{s.name}")
    return {
        "samples": s.num_samples,
        "chunk_rows": s.chunk_rows,
        "chunks": s.num_chunks,
        "chunks_per_shard": s.chunks_per_shard,
        "shards": math.ceil(s.num_chunks / s.chunks_per_shard),
        "bytes": on_disk,
        "nbytes": nbytes,
        "ratio": _ratio(nbytes, on_disk),
        "fields": fields,
    }


def summarize(url: str, manifest: Manifest) -> dict[str, Any]:
    """Everything ``inspect`` prints, as JSON-ready data."""
    splits = {name: _split_summary(manifest, s) for name, s in manifest.splits.items()}
    known = [s["nbytes"] for s in splits.values()]
    nbytes = sum(known) if None not in known else None
    return {
        "store": url,
        "format": FORMAT_NAME,
        "version": manifest.version,
        "generation": manifest.generation,
        "created": manifest.created,
        "source": manifest.source,
        "objects": len(manifest.objects),
        "bytes": manifest.total_bytes,
        "nbytes": nbytes,
        "ratio": _ratio(nbytes, manifest.total_bytes),
        "splits": splits,
    }


def human_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    raise AssertionError("unreachable")


def _ratio_text(r: float | None) -> str:
    return "?" if r is None else f"{r:.2f}x"


def render(summary: dict[str, Any]) -> str:
    """The summary as aligned text, one block per split."""
    src = summary["source"]
    lines = [
        f"store      {summary['store']}",
        f"format     {summary['format']} v{summary['version']}, generation {summary['generation']}",
        f"created    {summary['created'] or '?'}",
        f"source     {json.dumps(src, sort_keys=True) if src else '-'}",
    ]
    header = ("field", "kind", "type", "codec", "on disk", "uncompressed", "ratio")
    for name, s in summary["splits"].items():
        lines += [
            "",
            f"split {name}: {s['samples']:,} samples, {s['chunk_rows']:,} rows/chunk, {s['chunks']:,} chunks, "
            f"{s['chunks_per_shard']:,} chunks/shard, {s['shards']:,} shards",
        ]
        rows = [header] + [
            (
                fname,
                f["kind"],
                f["type"],
                f["codec"],
                human_bytes(f["bytes"]),
                human_bytes(f["nbytes"]),
                _ratio_text(f["ratio"]),
            )
            for fname, f in s["fields"].items()
        ]
        rows.append(
            (
                "(split)",
                "",
                "",
                "",
                human_bytes(s["bytes"]),
                human_bytes(s["nbytes"]),
                _ratio_text(s["ratio"]),
            )
        )
        lines += _table(rows)
    lines += [
        "",
        f"total      {summary['objects']:,} objects, {human_bytes(summary['bytes'])} on disk, "
        f"{human_bytes(summary['nbytes'])} uncompressed, ratio {_ratio_text(summary['ratio'])}",
    ]
    return "\n".join(lines)


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    right = {4, 5, 6}  # numbers align right
    return [
        "  "
        + "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]


def _run_verify(storage: Storage, manifest: Manifest) -> VerifyReport:
    from tqdm import tqdm

    with tqdm(
        total=manifest.total_bytes,
        unit="B",
        unit_scale=True,
        desc="verify",
        file=sys.stderr,
        disable=not sys.stderr.isatty(),
    ) as bar:
        return verify(storage, manifest, progress=bar.update)


def _report_dict(r: VerifyReport) -> dict[str, Any]:
    return {
        "ok": r.ok,
        "problems": [{"key": p.key, "kind": p.kind, "detail": p.detail} for p in r.problems],
        "objects": r.objects,
        "objects_read": r.objects_read,
        "bytes_read": r.bytes_read,
        "seconds": r.seconds,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = OneLineParser(prog=PROG, description="Summarise (and with --verify, check) an hpstore store.")
    p.add_argument("store", help="store path or fsspec URL (s3://bucket/prefix, memory://name)")
    p.add_argument("--verify", action="store_true", help="re-read every object and check sizes and checksums")
    p.add_argument(
        "--storage-option", action="append", default=[], metavar="K=V", help="fsspec option (repeatable)"
    )
    p.add_argument("--json", action="store_true", help="print the summary (and verify report) as JSON")
    try:
        a = p.parse_args(argv)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        if is_local(a.store) and os.path.isfile(a.store.removeprefix("file://")):
            raise InputError(f"{a.store}: not a store (a file; a store is a directory with a manifest.json)")
        storage = open_storage(a.store, parse_storage_options(a.storage_option))
        manifest = read_manifest(storage)
        summary = summarize(storage.url, manifest)
        report = _run_verify(storage, manifest) if a.verify else None
    except (HpstoreError, OSError, ValueError) as exc:
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    if a.json:
        doc = dict(summary, verify=_report_dict(report) if report else None)
        print(json.dumps(doc, indent=1))
    else:
        print(render(summary))
        if report is not None:
            for problem in report.problems:
                print(problem)
            print(report.summary())
    if report is not None and not report.ok:
        print(f"{PROG}: {len(report.problems)} corrupt, missing or unexpected object(s)", file=sys.stderr)
        return EXIT_PROBLEMS
    return 0


def _one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())


if __name__ == "__main__":
    raise SystemExit(main())
