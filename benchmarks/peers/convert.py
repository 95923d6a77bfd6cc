"""One conversion by a peer library, run inside the benchmark's own virtualenv (``.bench-venv``).

``python benchmarks/peers/convert.py {datasets,litdata} SRC_DIR DST_DIR WORKERS`` reads the npy
digits source (``image.npy`` (n, 28, 28) uint8, ``label.npy`` (n,) int64) and writes it the way a
user of that library would, then prints one JSON line: seconds (source opened to output on disk,
imports excluded), rows, bytes_out. Imports only the peer, numpy and pyarrow (never hpstore), so it
runs in an environment where hpstore's pins would conflict with the peer's.

- Hugging Face ``datasets``: an Arrow table built from the arrays (images as fixed-size lists of
  784 uint8, no per-row Python: the strongest way in), ``Dataset.save_to_disk`` with ``num_proc``.
- LitData: ``litdata.optimize`` over row ranges of the mmapped arrays with ``num_workers``, each
  sample a ``{"image": ndarray, "label": int}`` (its documented per-sample ``fn``), 64 MB chunks.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from typing import Any


def _size(root: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)


def _hf(src: str, dst: str, workers: int) -> int:
    import datasets
    import numpy as np
    import pyarrow as pa

    images = np.load(os.path.join(src, "image.npy"), mmap_mode="r")
    labels = np.load(os.path.join(src, "label.npy"), mmap_mode="r")
    n, side = images.shape[0], images.shape[1] * images.shape[2]
    table = pa.table(
        {
            "image": pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(images).reshape(-1)), side),
            "label": pa.array(np.asarray(labels)),
        }
    )
    ds = datasets.Dataset(datasets.table.InMemoryTable(table))
    ds.save_to_disk(dst, num_proc=workers if workers > 1 else None)
    return n


def _rows(span: tuple[int, int]) -> Any:
    import numpy as np

    src = os.environ["PEER_SRC"]  # LitData's workers are fresh processes: the path travels here
    images = np.load(os.path.join(src, "image.npy"), mmap_mode="r")
    labels = np.load(os.path.join(src, "label.npy"), mmap_mode="r")
    for i in range(*span):
        yield {"image": np.asarray(images[i]), "label": int(labels[i])}


def _litdata(src: str, dst: str, workers: int) -> int:
    import litdata
    import numpy as np

    os.environ["PEER_SRC"] = src
    n = int(np.load(os.path.join(src, "label.npy"), mmap_mode="r").shape[0])
    step = 8192
    spans = [(a, min(n, a + step)) for a in range(0, n, step)]
    litdata.optimize(fn=_rows, inputs=spans, output_dir=dst, chunk_bytes="64MB", num_workers=workers)
    return n


def main() -> None:
    peer, src, dst, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    shutil.rmtree(dst, ignore_errors=True)
    t0 = time.perf_counter()
    rows = _hf(src, dst, workers) if peer == "datasets" else _litdata(src, dst, workers)
    seconds = time.perf_counter() - t0
    print(json.dumps({"peer": peer, "seconds": seconds, "rows": rows, "bytes_out": _size(dst)}))


if __name__ == "__main__":
    main()
