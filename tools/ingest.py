"""``python -m tools.ingest SRC DST [options]``: convert a dataset into an hpstore store.

SRC is a file or directory (``.npy``, ``.npz``, IDX / the MNIST directory layout, Parquet, CSV,
JSONL, Arrow/Feather, an ImageFolder tree; see ``tools.sources``), or is left out when the fields
come from ``--field NAME=PATH`` files (a SRC given with ``--field`` is the directory that relative
field paths are under). DST is a local path or an fsspec URL (``s3://bucket/prefix``,
``memory://...``).

Flow: open and check every source (headers, counts, schemas) -> open the destination -> stream
batches into ``hpstore.format.writer.StoreWriter`` (parallel encoding, bounded writers) -> commit the
manifest last. Any error before the commit abandons the new generation: DST keeps exactly what it
had (nothing, or the previous store, which stays readable until the new manifest replaces it).

Exit status: 0 done; 2 bad input (source, options, an existing store without ``--overwrite``);
1 an I/O failure; 130 interrupted. Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any, TextIO

from tqdm import tqdm

from hpstore.errors import HpstoreError, InputError, StorageError
from hpstore.format import zarr_shard as zf
from hpstore.format.commit import LOCK_KEY
from hpstore.format.manifest import Manifest
from hpstore.format.writer import Layout, StoreWriter
from hpstore.memory import bound_heap
from hpstore.options import OneLineParser, parse_pair, parse_size, parse_storage_option
from hpstore.storage.open import is_local, open_storage
from tools import prepare as prep
from tools.sources import FORMATS, Split, open_splits
from tools.sources.base import batch_nbytes, check_field_name
from tools.sources.location import has_glob, is_url, open_location_splits
from tools.sources.prefetch import prefetched

DEFAULT_LAYOUT = Layout()
CODECS = ("zstd", "lz4", "none")
ENGINES = ("local", "dask")


@dataclass(frozen=True, kw_only=True)
class IngestConfig:
    """Everything one ingest run needs; built by ``parse_args``, validated here."""

    src: str | None
    dst: str
    format: str | None = None
    split: str | None = None
    fields: tuple[tuple[str, str], ...] = ()
    overwrite: bool = False
    append: bool = False
    break_lock: bool = False
    chunk_bytes: int = DEFAULT_LAYOUT.chunk_bytes
    shard_bytes: int = DEFAULT_LAYOUT.shard_bytes
    codec: str = str(DEFAULT_LAYOUT.codec["name"])
    level: int | None = None
    workers: int = DEFAULT_LAYOUT.workers
    storage_options: tuple[tuple[str, Any], ...] = ()
    source_options: tuple[tuple[str, Any], ...] = ()
    progress: bool = True
    engine: str = "local"
    scheduler: str | None = None
    prepare: prep.PrepareOptions = field(default_factory=prep.PrepareOptions)

    def __post_init__(self) -> None:
        if self.format is not None and self.format not in FORMATS:
            raise InputError(f"unknown format {self.format!r} (choose from {', '.join(FORMATS)})")
        if self.split is not None:
            check_field_name(self.split, "--split", what="split")
        for name, _ in self.fields:
            check_field_name(name, "--field", what="field")
        if self.src is None and not self.fields:
            raise InputError("no source: give SRC DST, or DST with --field NAME=PATH")
        if self.engine not in ENGINES:
            raise InputError(f"unknown engine {self.engine!r} (choose from {', '.join(ENGINES)})")
        if self.scheduler is not None and self.engine != "dask":
            raise InputError("--scheduler needs --engine dask")
        if self.overwrite and self.append:
            raise InputError("--overwrite and --append exclude each other")
        self.layout()  # validates sizes, codec and level now, before any source is opened

    def layout(self) -> Layout:
        if self.codec == DEFAULT_LAYOUT.codec["name"] and self.level is None:
            codec = dict(DEFAULT_LAYOUT.codec)
        elif self.level is not None and self.codec != "none":
            codec = zf.validate_codec({"name": self.codec, "level": self.level})
        else:
            codec = zf.validate_codec({"name": self.codec})
        return Layout(
            chunk_bytes=self.chunk_bytes,
            shard_bytes=self.shard_bytes,
            codec=codec,
            workers=self.workers,
            writers=DEFAULT_LAYOUT.writers,
        )

    def source_record(self, splits: Sequence[Split]) -> dict[str, Any]:
        """What the manifest's ``source`` records: where the data came from and how it was cut.
        Storage options are left out: they may hold credentials."""
        layout = self.layout()
        return {
            "tool": "tools.ingest",
            "path": None if self.src is None else self.src if is_url(self.src) else os.path.abspath(self.src),
            "format": {s.name: s.format for s in splits},
            "fields": {name: os.path.abspath(os.path.join(self.src or "", p)) for name, p in self.fields},
            "options": {
                "split": self.split,
                "chunk_bytes": layout.chunk_bytes,
                "shard_bytes": layout.shard_bytes,
                "codec": layout.codec,
                "workers": layout.workers,
                "overwrite": self.overwrite,
                **self.prepare.record(),
                "append": self.append,
            },
        }


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m tools.ingest",
        usage="python -m tools.ingest [options] SRC DST\n"
        "       python -m tools.ingest [options] DST --field NAME=PATH [--field NAME=PATH ...]",
        description="Convert a dataset (npy/npz, IDX/MNIST, Parquet, CSV, JSONL, Arrow, ImageFolder) "
        "into an hpstore store. With --tokenizer byte|FILE.json: tokenize text into a token store "
        "(see tools.ingest_tokens). Exit status: 0 done, 2 bad input or options, 1 an I/O failure.",
    )
    p.add_argument(
        "paths",
        nargs="+",
        metavar="SRC DST",
        help="source file or directory, then the destination (a path or an fsspec URL such as "
        "s3://bucket/prefix); with --field, SRC may be left out, or names the directory the field "
        "paths are relative to",
    )
    p.add_argument(
        "--format", choices=FORMATS, help="source format (default: detected from the name or bytes)"
    )
    p.add_argument("--split", help="split name for a single source (default: train)")
    p.add_argument(
        "--field",
        action="append",
        type=parse_pair,
        default=[],
        metavar="NAME=PATH",
        help="a field from its own file (repeatable; the files must have equal row counts)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing store at DST")
    p.add_argument(
        "--append",
        action="store_true",
        help="add the rows to the store at DST: to the splits of the same name (same fields and "
        "types; their chunk layout is kept) or as new splits, in a new generation that reuses the "
        "existing objects",
    )
    p.add_argument(
        "--break-lock",
        action="store_true",
        help=f"remove the writer lock ({LOCK_KEY}) that a killed ingest left in DST; only when no other "
        "ingest into DST is running",
    )
    p.add_argument(
        "--chunk-bytes",
        type=parse_size,
        default=DEFAULT_LAYOUT.chunk_bytes,
        metavar="SIZE",
        help=f"target bytes per chunk, the unit of reads (default: {_size(DEFAULT_LAYOUT.chunk_bytes)})",
    )
    p.add_argument(
        "--shard-bytes",
        type=parse_size,
        default=DEFAULT_LAYOUT.shard_bytes,
        metavar="SIZE",
        help=f"target bytes per shard object (default: {_size(DEFAULT_LAYOUT.shard_bytes)})",
    )
    p.add_argument(
        "--codec",
        choices=CODECS,
        default=DEFAULT_LAYOUT.codec["name"],
        help=f"chunk compression (default: {DEFAULT_LAYOUT.codec['name']})",
    )
    p.add_argument(
        "--level",
        type=int,
        help=f"codec level: zstd -7..22, lz4 0..9 (default: {DEFAULT_LAYOUT.codec.get('level')} for zstd)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=DEFAULT_LAYOUT.workers,
        help=f"parallel encoders (default: {DEFAULT_LAYOUT.workers}); with --engine dask, worker processes of the local cluster",
    )
    p.add_argument("--engine", choices=ENGINES, default="local", help="local: this process; dask: Dask tasks")
    p.add_argument(
        "--scheduler", metavar="ADDRESS", help="Dask scheduler to run on (default: a local cluster)"
    )
    p.add_argument(
        "--source-option",
        action="append",
        type=parse_storage_option,
        default=[],
        metavar="K=V",
        help="fsspec option for SRC",
    )
    p.add_argument(
        "--storage-option",
        action="append",
        type=parse_storage_option,
        default=[],
        metavar="K=V",
        help="fsspec option for DST, e.g. endpoint_url=http://host:9000 (repeatable)",
    )
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bar (none when stderr is not a terminal)"
    )
    prep.add_arguments(p)
    return p


def _size(n: int) -> str:
    return f"{n >> 20}MiB" if n % (1 << 20) == 0 else f"{n >> 10}KiB"


def parse_args(argv: Sequence[str] | None) -> IngestConfig:
    p = build_parser()
    a = p.parse_args(argv)
    if len(a.paths) > 2 or (len(a.paths) == 1 and not a.field):
        p.error("expected SRC DST (or DST alone with --field NAME=PATH)")
    src, dst = (None, a.paths[0]) if len(a.paths) == 1 else (a.paths[0], a.paths[1])
    return IngestConfig(
        src=src,
        dst=dst,
        format=a.format,
        split=a.split,
        fields=tuple(a.field),
        overwrite=a.overwrite,
        append=a.append,
        break_lock=a.break_lock,
        chunk_bytes=a.chunk_bytes,
        shard_bytes=a.shard_bytes,
        codec=a.codec,
        level=a.level,
        workers=a.workers,
        storage_options=tuple(a.storage_option),
        source_options=tuple(a.source_option),
        progress=not a.no_progress,
        engine=a.engine,
        scheduler=a.scheduler,
        prepare=prep.from_args(a),
    )


class _Progress:
    """One tqdm bar for the whole job: rows (of the total, when the sources know it) with the
    source bytes read so far and their MB/s alongside; off when stderr is not a terminal. Updates
    come from the ingest loop, or under Dask from each partition's running totals (Dask's event
    thread) and its result, hence the lock."""

    def __init__(self, total: int | None, enabled: bool, stream: TextIO) -> None:
        self.bar = tqdm(
            total=total,
            unit=" rows",
            file=stream,
            disable=not (enabled and stream.isatty()),
            dynamic_ncols=True,
        )
        self.t0 = time.perf_counter()
        self.samples = 0
        self.nbytes = 0
        self.lock = threading.Lock()

    def update(self, samples: int, nbytes: int) -> None:
        with self.lock:
            self.samples += samples
            self.nbytes += nbytes
            rate = self.nbytes / 1e6 / max(1e-9, time.perf_counter() - self.t0)
            self.bar.set_postfix_str(f"{self.nbytes / 1e6:.1f} MB, {rate:.0f} MB/s", refresh=False)
            self.bar.update(samples)

    def close(self) -> None:
        with self.lock:
            self.bar.close()


@dataclass(frozen=True, kw_only=True)
class IngestResult:
    manifest: Manifest
    samples: int
    bytes_in: int
    bytes_out: int
    seconds: float

    def summary(self, dst: str) -> str:
        splits = self.manifest.splits
        fields = sorted({f for s in splits.values() for f in s.fields})
        ratio = self.bytes_in / self.bytes_out if self.bytes_out else 0.0
        return (
            f"ingest: {self.samples} samples, {len(splits)} split(s) ({', '.join(splits)}), "
            f"{len(fields)} field(s) ({', '.join(fields)}), {self.bytes_in / 1e6:.1f} MB in, "
            f"{self.bytes_out / 1e6:.1f} MB out ({ratio:.2f}x), {self.seconds:.2f} s, "
            f"{self.bytes_in / 1e6 / max(self.seconds, 1e-9):.0f} MB/s -> {dst}"
        )


def _check_destination(dst: str) -> None:
    """A local DST that exists must be a directory. What it may hold (nothing, leftovers of our
    killed ingests, or a store of ours) is checked by the writer, locally and remotely alike
    (``hpstore.format.commit.check_destination``)."""
    if not is_local(dst):
        return
    path = dst.removeprefix("file://")
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"{dst}: exists and is not a directory")


def ingest(cfg: IngestConfig, *, stream: TextIO = sys.stderr) -> IngestResult:
    """Run one ingest. Raises ``HpstoreError`` / ``OSError``; DST is unchanged unless it returns."""
    t0 = time.perf_counter()
    splits = _open_splits(cfg)
    if cfg.engine == "local":
        splits = prep.prepare(splits, cfg.prepare)
    elif cfg.prepare.active:
        raise InputError("--holdout, --skip-bad and the --image-* options need --engine local")
    _check_destination(cfg.dst)
    storage = open_storage(cfg.dst, dict(cfg.storage_options))
    known = [s.source.num_rows for s in splits]
    total = None if None in known else sum(n for n in known if n is not None)
    progress = _Progress(total, cfg.progress, stream)
    try:
        with StoreWriter(
            storage,
            layout=cfg.layout(),
            overwrite=cfg.overwrite,
            append=cfg.append,
            source=cfg.source_record(splits),
            break_lock=cfg.break_lock,
            tool="tools.ingest",
        ) as writer:
            if cfg.engine == "dask":
                _run_dask(cfg, splits, writer, progress)
            for split in splits if cfg.engine == "local" else ():
                progress.bar.set_description(split.name)
                sw = writer.split(split.name, attrs=split.source.attrs, num_rows=split.source.num_rows)
                rows = 0
                with closing(prefetched(split.source.batches())) as batches:
                    for batch in batches:
                        sw.append(batch)
                        n = len(next(iter(batch.values())))
                        rows += n
                        progress.update(n, batch_nbytes(batch))
                if rows == 0:
                    raise InputError(
                        f"{split.source.path}: no rows (a header or schema alone?); split {split.name!r} "
                        "would be empty"
                    )
                writer.add_split(sw)
            manifest = writer.commit()
    finally:
        progress.close()
    for line in prep.report(splits):
        print(line, file=stream)
    return IngestResult(
        manifest=manifest,
        samples=progress.samples,
        bytes_in=progress.nbytes,
        bytes_out=sum(o.size for o in manifest.objects.values()),
        seconds=time.perf_counter() - t0,
    )


def _open_splits(cfg: IngestConfig) -> list[Split]:
    if cfg.src is not None and not cfg.fields and (is_url(cfg.src) or has_glob(cfg.src)):
        return open_location_splits(
            cfg.src, fmt=cfg.format, split=cfg.split, options=dict(cfg.source_options)
        )
    return open_splits(cfg.src, fmt=cfg.format, split=cfg.split, fields=cfg.fields)


def _run_dask(cfg: IngestConfig, splits: Sequence[Split], writer: StoreWriter, progress: _Progress) -> None:
    from tools.engines import dask as engine

    dst = cfg.dst if not is_local(cfg.dst) else os.path.abspath(cfg.dst.removeprefix("file://"))
    engine.run(
        splits,
        writer,
        storage_url=dst,
        storage_options=dict(cfg.storage_options),
        opts=engine.DaskOptions(scheduler=cfg.scheduler, workers=cfg.workers),
        progress=progress.update,
    )


def _remove_empty_dirs(path: str) -> None:
    """Remove ``path`` and empty directories below it, never a file (what a failed run created)."""
    for dirpath, _dirs, _files in os.walk(path, topdown=False):
        try:
            os.rmdir(dirpath)
        except OSError:
            pass


def _message(exc: BaseException) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, HpstoreError) and exc.filename:
        return f"{exc.filename}: {exc.strerror or exc}"
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if any(a == "--tokenizer" or a.startswith("--tokenizer=") for a in args):
        from tools.ingest_tokens import main as ingest_tokens  # text -> a token store

        return ingest_tokens(args)
    bound_heap()
    return run_command(argv, parse_args, ingest)


def run_command(
    argv: Sequence[str] | None,
    parse: Callable[[Any], Any],
    run: Callable[[Any], Any],
) -> int:
    """The frame every ingest command shares: parse, run, print the summary; one line and exit 2
    for bad input or options, 1 for an I/O failure, 130 when interrupted. A local DST that this
    run created and left empty is removed again."""
    try:
        cfg = parse(argv)
    except HpstoreError as exc:
        print(f"ingest: error: {_message(exc)}", file=sys.stderr)
        return 2
    local_dst = cfg.dst.removeprefix("file://") if is_local(cfg.dst) else None
    created = local_dst is not None and not os.path.exists(local_dst)
    try:
        result = run(cfg)
    except KeyboardInterrupt:
        print("ingest: interrupted; nothing was committed", file=sys.stderr)
        code = 130
    except (HpstoreError, OSError) as exc:
        print(f"ingest: error: {_message(exc)}", file=sys.stderr)
        code = 1 if isinstance(exc, StorageError) or not isinstance(exc, HpstoreError) else 2
    else:
        print(result.summary(cfg.dst))
        return 0
    if created and local_dst is not None:
        _remove_empty_dirs(local_dst)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
