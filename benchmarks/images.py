"""Encoded images through the loader: decode + random resized crop + flip, against the decode limit
and the usual PyTorch pipeline, side by side in one run.

Data: real photographs from Debian's ``mate-backgrounds`` package (its ``nature`` wallpapers,
1600-5640 px), cut into crops of 300-500 px saved as JPEG q90 (ImageNet-like sizes), ~1% of them as
PNG, greyscale JPEG and CMYK JPEG, in an image folder (one class per source photo), then ingested
with ``tools.ingest`` (default options). The package is found installed (``/usr/share/backgrounds``),
else fetched once with ``apt-get download mate-backgrounds`` + ``dpkg -x`` into the data directory;
without it the module stops with a message saying how to get it.

Figures (``W`` = the machine's cores, used by both sides):

1. **Decode limit**: libjpeg-turbo (simplejpeg) decodes of the same files on one thread, full size
   and DCT-scaled to the smallest 1/1-1/8 scale that keeps each sample's crop box at least the
   output size (the same boxes the loader draws); ``x W`` gives the limit on W cores. Also CPU ms per
   image. The JPEG-only limit leaves out the 1% of PNGs, whose full-size decode costs ~10x a JPEG's
   at 64 px; "every file" adds them (decoded as hpstore decodes them), so the loader's CPU per
   sample can be read against both.
2. **hpstore**: ``Loader(ds, 256, num_workers=W, transforms={"image": RandomResizedCrop(S)})``,
   one epoch, samples/s and CPU ms/sample (all threads of the process), warm (store files in the
   page cache) and cold (dropped with ``posix_fadvise`` first), for S = 224 and 64.
3. **Baseline**: a map-style dataset that opens each file with PIL, converts to RGB, applies a
   random resized crop (torchvision's algorithm, implemented with PIL's ``resize(box=)``), a flip and
   a to-tensor (uint8 CHW), in ``torch.utils.data.DataLoader(batch_size=256, num_workers=W,
   shuffle=True)``; CPU includes its worker processes. **Strong baseline**: the same with PIL's
   ``draft`` (JPEG DCT scaling) chosen from the crop box before decoding.
4. **Steady-state CPU per sample** (warm): CPU of one loader over 1 and over 3 epochs; the slope
   ``(cpu3 - cpu1) / (2 n)`` is what one more epoch costs per sample (per-epoch costs spread over
   its n samples), the intercept ``cpu1 - n * slope`` what starting a loader costs (threads, store,
   plan, first window) plus what the first epoch alone pays: chunks read, checked and decoded from
   storage, which later epochs find in the loader's chunk cache when the store fits in it (a larger
   store pays them every epoch). Read against the one-thread limit and against the **concurrent limit**: the
   same decodes on W threads at once, CPU per image (the cores slow each other down: shared caches,
   memory bandwidth, clock).
5. **Raw 32x32**: a CIFAR-sized store of decoded pixels (as ``--image-decode`` stores them): 32x32
   tiles cut from the crops (each shrunk to 224x224, 7x7 tiles), 20 000 tiles (``--quick``) or
   50 000 (CIFAR-10's training set size), whole epochs. hpstore ``RandomResizedCrop(32)`` vs the
   CIFAR-style PyTorch pattern (an in-memory uint8 array, per sample PIL ``fromarray`` + random
   resized crop + flip + to-tensor, same DataLoader, same cores): first epoch (loader and worker
   start included on both sides) and a later epoch (hpstore's second; the DataLoader with
   ``persistent_workers=True``, second epoch: its strongest form). Also CPU per sample: hpstore's
   later epoch (every thread) against the baseline's per-sample work on one thread with no
   DataLoader (``ds[i]`` + collate): a ratio that other jobs on the machine do not sway, where the
   samples/s ratio moves when they starve one side's processes.

Targets (issue 15): hpstore >= 3x the baseline's samples/s; CPU per sample within 1.25x of the
DCT-scaled decode limit; raw 32x32 >= 10x the baseline.

``python -m benchmarks.images [--quick]`` or ``python -m benchmarks --only images``.
"""

from __future__ import annotations

import glob
import math
import os
import random
import resource
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import simplejpeg
import torch
from PIL import Image

import hpstore
from benchmarks.cache import drop_page_cache
from benchmarks.common import BenchConfig, Figure, Progress, main
from hpstore.format.manifest import MANIFEST_KEY
from hpstore.format.writer import StoreWriter
from hpstore.images import RandomResizedCrop, boxes
from hpstore.images.decode import decode
from hpstore.storage.local import LocalStorage
from tools.ingest import main as ingest_main

PACKAGE = "mate-backgrounds"
INSTALLED = "/usr/share/backgrounds/mate/nature"
BATCH = 256
SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)


# -- data -----------------------------------------------------------------------------------------


def photos(data_dir: Path, progress: Progress) -> list[str]:
    """Paths of the package's nature photographs, fetching the package into ``data_dir`` if needed."""
    found = sorted(glob.glob(os.path.join(INSTALLED, "*.jpg")))
    if found:
        return found
    root = data_dir / PACKAGE
    pattern = str(root / "usr/share/backgrounds/mate/nature/*.jpg")
    if not glob.glob(pattern):
        progress(f"fetching {PACKAGE} with apt-get download (real photographs, ~47 MB)")
        root.mkdir(parents=True, exist_ok=True)
        try:
            subprocess.run(["apt-get", "download", PACKAGE], cwd=root, check=True, capture_output=True)
            debs = sorted(root.glob(f"{PACKAGE}_*.deb"))
            subprocess.run(["dpkg", "-x", str(debs[-1]), str(root)], check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError, IndexError) as exc:
            raise RuntimeError(
                f"the images benchmark needs the photographs of Debian's {PACKAGE} package: run "
                f"'apt-get update && cd {root} && apt-get download {PACKAGE} && dpkg -x {PACKAGE}_*.deb .' "
                f"(or apt-get install {PACKAGE}); fetching it failed: {exc}"
            ) from exc
    found = sorted(glob.glob(pattern))
    if not found:
        raise RuntimeError(f"{PACKAGE} holds no photographs under {pattern}")
    return found


def crop_folder(data_dir: Path, n: int, progress: Progress) -> Path:
    """An image folder of ``n`` crops of 300-500 px (JPEG q90; 1% each PNG, greyscale, CMYK)."""
    out = data_dir / f"images-crops-{n}"
    done = out / ".complete"
    if done.exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    sources = photos(data_dir, progress)
    progress(f"cutting {n} crops from {len(sources)} photographs")
    rng = np.random.default_rng(0)
    per = math.ceil(n / len(sources))
    k = 0
    for src in sources:
        name = Path(src).stem
        (out / name).mkdir(parents=True, exist_ok=True)
        with Image.open(src) as im:
            photo = im.convert("RGB")
        for _ in range(per):
            if k >= n:
                break
            w, h = (int(v) for v in rng.integers(300, 501, 2))
            x, y = int(rng.integers(0, photo.width - w)), int(rng.integers(0, photo.height - h))
            crop = photo.crop((x, y, x + w, y + h))
            kind = k % 100
            if kind == 97:
                crop.save(out / name / f"{k:06d}.png")
            elif kind == 98:
                crop.convert("L").save(out / name / f"{k:06d}.jpg", quality=90)
            elif kind == 99:
                crop.convert("CMYK").save(out / name / f"{k:06d}.jpg", quality=90)
            else:
                crop.save(out / name / f"{k:06d}.jpg", quality=90)
            k += 1
    done.touch()
    return out


def tile_store(folder: Path, dst: Path, n: int, side: int = 32) -> Path:
    """A store of ``n`` decoded ``side`` x ``side`` RGB tiles cut from the crops (each crop shrunk to
    ``7 * side`` square, area averaging, then cut 7 x 7), written as ``--image-decode`` writes
    decoded pixels: a fixed-shape uint8 ``image`` field and an int64 ``label``."""
    if (dst / MANIFEST_KEY).exists():
        return dst
    tiles: list[np.ndarray] = []
    count = 0
    for path, _ in folder_files(folder):
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
        img = cv2.resize(rgb, (7 * side, 7 * side), interpolation=cv2.INTER_AREA)
        tiles.append(img.reshape(7, side, 7, side, 3).transpose(0, 2, 1, 3, 4).reshape(49, side, side, 3))
        count += 49
        if count >= n:
            break
    if count < n:
        raise RuntimeError(f"{folder} gives {count} tiles, fewer than the {n} asked for")
    pixels = np.concatenate(tiles)[:n]
    labels = (np.arange(n) // 49 % 10).astype(np.int64)  # one label per source crop, 10 classes
    with StoreWriter(LocalStorage(str(dst)), overwrite=True) as w:
        sw = w.split("train")
        for a in range(0, n, 8192):
            sw.append({"image": pixels[a : a + 8192], "label": labels[a : a + 8192]})
        w.add_split(sw)
        w.commit()
    return dst


def ingest(src: Path, dst: Path, *extra: str) -> Path:
    if not (dst / MANIFEST_KEY).exists():
        code = ingest_main([str(src), str(dst), "--no-progress", "--overwrite", *extra])
        if code != 0:
            raise RuntimeError(f"ingest of {src} failed with exit status {code}")
    return dst


# -- measurement helpers -------------------------------------------------------------------------------


def cpu_seconds() -> float:
    """CPU seconds of this process (all threads) and of its finished children."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def measure(epoch: Callable[[], Iterable[Any]], count: Callable[[Any], int]) -> tuple[float, float]:
    """``(samples/s, CPU ms per sample)`` of one pass over ``epoch()``."""
    c0, t0 = cpu_seconds(), time.perf_counter()
    n = 0
    for batch in epoch():
        n += count(batch)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    return n / wall, 1e3 * cpu / max(n, 1)


# -- the decode limit ------------------------------------------------------------------------------------


def decode_limit(blobs: list[bytes], size: int | None) -> float:
    """Images/s of libjpeg-turbo on one thread: full size (``size=None``) or DCT-scaled for the
    random resized crop to ``size`` (the same draws as the loader's)."""
    full = [(b, 0, 0) for b in blobs if b[:2] == b"\xff\xd8"]
    plans = full if size is None else decode_plans(blobs, size)
    t0 = time.thread_time()
    for b, mh, mw in plans:
        simplejpeg.decode_jpeg(b, fastdct=True, fastupsample=True, min_height=mh, min_width=mw)
    return len(plans) / (time.thread_time() - t0)


def decode_plans(blobs: list[bytes], size: int) -> list[tuple[bytes, int, int]]:
    """``(jpeg, min_height, min_width)`` per JPEG: the DCT-scaled decode of its crop box for ``size``."""
    jpegs = [b for b in blobs if b[:2] == b"\xff\xd8"]
    u = boxes.draws(0, 0, np.arange(len(jpegs)), boxes.RANDOM_DRAWS)
    plans = []
    for i, b in enumerate(jpegs):
        h, w, _, _ = simplejpeg.decode_jpeg_header(b)
        d = boxes.dct_factor(boxes.random_resized_box(h, w, u[i], SCALE, RATIO, True), (size, size))
        plans.append((b, math.ceil(h / d), math.ceil(w / d)) if d > 1 else (b, 0, 0))
    return plans


def concurrent_decode_ms(blobs: list[bytes], size: int, threads: int) -> float:
    """CPU ms per image of the DCT-scaled decodes for ``size`` run on ``threads`` threads at once
    (each thread its share of the files; thread CPU summed): what a decode costs when every core
    decodes, as in the loader."""
    plans = decode_plans(blobs, size)
    parts = [plans[k::threads] for k in range(threads)]
    barrier = threading.Barrier(threads)

    def work(part: list[tuple[bytes, int, int]]) -> float:
        barrier.wait()
        t0 = time.thread_time()
        for b, mh, mw in part:
            simplejpeg.decode_jpeg(b, fastdct=True, fastupsample=True, min_height=mh, min_width=mw)
        return time.thread_time() - t0

    with ThreadPoolExecutor(threads) as pool:
        return 1e3 * sum(pool.map(work, parts)) / len(plans)


def other_decode_seconds(blobs: list[bytes]) -> float:
    """Seconds (one thread) to decode the files that are not JPEG, full size, as hpstore does."""
    others = [np.frombuffer(b, np.uint8) for b in blobs if b[:2] != b"\xff\xd8"]
    t0 = time.thread_time()
    for data in others:
        decode(data, gray=False)
    return time.thread_time() - t0


# -- the baseline: PIL in a DataLoader -------------------------------------------------------------------


def rrc_params(h: int, w: int, rng: random.Random) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, on Python's random (as in a DataLoader worker)."""
    area = h * w
    for _ in range(10):
        target = area * rng.uniform(*SCALE)
        aspect = math.exp(rng.uniform(math.log(RATIO[0]), math.log(RATIO[1])))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            return rng.randint(0, h - ch), rng.randint(0, w - cw), ch, cw
    side = min(h, w)
    return (h - side) // 2, (w - side) // 2, side, side


def to_tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous()  # torchvision's ToTensor copies too


class PILFolder(torch.utils.data.Dataset[tuple[torch.Tensor, int]]):
    """The usual map-style dataset: open, convert, random resized crop, flip, to tensor."""

    def __init__(self, files: list[tuple[str, int]], size: int, draft: bool) -> None:
        self.files, self.size, self.draft = files, size, draft
        self.rng = random.Random(0)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.files[i]
        s = self.size
        with Image.open(path) as im:
            top, left, ch, cw = rrc_params(im.height, im.width, self.rng)
            box: tuple[float, float, float, float] = (left, top, left + cw, top + ch)
            if self.draft and im.format == "JPEG":  # let libjpeg shrink while it decodes
                w0, h0 = im.size
                im.draft("RGB", (max(1, w0 * s // cw), max(1, h0 * s // ch)))
                fx, fy = im.size[0] / w0, im.size[1] / h0
                box = (left * fx, top * fy, (left + cw) * fx, (top + ch) * fy)
            out = im.convert("RGB").resize((s, s), Image.Resampling.BILINEAR, box=box)
        if self.rng.random() < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_tensor(out), label


class PILArray(torch.utils.data.Dataset[tuple[torch.Tensor, int]]):
    """CIFAR-style: decoded uint8 images in memory; per sample PIL crop + flip + to tensor."""

    def __init__(self, images: np.ndarray, size: int) -> None:
        self.images, self.size = images, size
        self.rng = random.Random(0)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        im = Image.fromarray(self.images[i])
        top, left, ch, cw = rrc_params(im.height, im.width, self.rng)
        out = im.resize(
            (self.size, self.size), Image.Resampling.BILINEAR, box=(left, top, left + cw, top + ch)
        )
        if self.rng.random() < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_tensor(out), 0


def baseline_cpu_us(ds: torch.utils.data.Dataset[Any], n: int) -> float:
    """Thread CPU us per sample of ``ds[i]`` and batching (``default_collate``) on one thread: the
    per-sample work a DataLoader spreads over its workers, without its start-up or transfers."""
    collate = torch.utils.data.default_collate
    t0 = time.thread_time()
    for a in range(0, n, BATCH):
        collate([ds[i] for i in range(a, min(n, a + BATCH))])
    return 1e6 * (time.thread_time() - t0) / n


def _once(it: Iterable[Any]) -> Callable[[], Iterable[Any]]:
    """One epoch of the same iterable each call (a loader, or a DataLoader with persistent workers)."""
    return lambda: it


def dataloader(ds: torch.utils.data.Dataset[Any], workers: int) -> Callable[[], Iterable[Any]]:
    return lambda: torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=workers)


def folder_files(root: Path) -> list[tuple[str, int]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    return [(str(f), k) for k, c in enumerate(classes) for f in sorted((root / c).iterdir()) if f.is_file()]


# -- the run ---------------------------------------------------------------------------------------------


def run(cfg: BenchConfig, progress: Progress) -> list[Figure]:
    torch.set_num_threads(1)
    cores = os.cpu_count() or 1
    n = 600 if cfg.quick else 2500
    folder = crop_folder(cfg.data_dir, n, progress)
    store = ingest(folder, cfg.data_dir / f"images-store-{n}")
    n_tiles = 20000 if cfg.quick else 50000
    raw_store = tile_store(folder, cfg.data_dir / f"images-tiles32-{n_tiles}", n_tiles)
    files = folder_files(folder)
    blobs = [Path(p).read_bytes() for p, _ in files]
    ds = hpstore.open(str(store)).split("train")
    figs: list[Figure] = []
    note = f"{len(files)} crops of 300-500 px from {PACKAGE}; {cores} cores, shared with other work"

    progress("decode limit (one thread)")
    full = [decode_limit(blobs, None) for _ in range(cfg.repeats)]
    figs.append(Figure(bench="images", name="decode limit, full size, 1 thread", unit="img/s", values=full,
                       extra={"cpu_ms_per_image": 1e3 / float(np.median(full)), "note": note}))  # fmt: skip
    limits: dict[int, float] = {}
    limits_all: dict[int, float] = {}
    n_jpeg = sum(b[:2] == b"\xff\xd8" for b in blobs)
    for size in (224, 64):
        scaled = [decode_limit(blobs, size) for _ in range(cfg.repeats)]
        limits[size] = float(np.median(scaled))
        figs.append(Figure(bench="images", name=f"decode limit, DCT-scaled for {size} px, 1 thread",
                           unit="img/s", values=scaled, baseline="full-size decode", baseline_values=full,
                           extra={"cpu_ms_per_image": 1e3 / limits[size], f"limit_x{cores}_cores": limits[size] * cores}))  # fmt: skip
        # The same JPEG passes plus the other files' decode: never faster than JPEGs alone.
        every = [len(blobs) / (n_jpeg / rate + other_decode_seconds(blobs)) for rate in scaled]
        limits_all[size] = float(np.median(every))
        figs.append(Figure(bench="images", name=f"decode limit, every file (PNG too), {size} px, 1 thread",
                           unit="img/s", values=every, baseline="JPEGs only", baseline_values=scaled,
                           extra={"cpu_ms_per_image": 1e3 / limits_all[size]}))  # fmt: skip

    for size in (224, 64):
        for cold in (False, True):
            label = "cold" if cold else "warm"
            ours: list[float] = []
            ours_cpu: list[float] = []
            base: list[float] = []
            base_cpu: list[float] = []
            strong: list[float] = []
            for r in range(cfg.repeats):  # interleaved, so drift in the machine's load hits both alike
                progress(f"{size} px, {label}, repeat {r + 1}: hpstore")
                if cold:
                    drop_page_cache([store], system_wide=False)
                loader = hpstore.Loader(ds, BATCH, num_workers=cores, pin_memory=False, seed=r,
                                        transforms={"image": RandomResizedCrop(size, threads=cores)})  # fmt: skip
                rate, cpu = measure(_once(loader), lambda b: len(b["label"]))
                loader.close()
                ours.append(rate)
                ours_cpu.append(cpu)
                progress(f"{size} px, {label}, repeat {r + 1}: PIL DataLoader")
                if cold:
                    drop_page_cache([folder], system_wide=False)
                rate, cpu = measure(dataloader(PILFolder(files, size, False), cores), lambda b: len(b[1]))
                base.append(rate)
                base_cpu.append(cpu)
                if cold:
                    drop_page_cache([folder], system_wide=False)
                rate, _ = measure(dataloader(PILFolder(files, size, True), cores), lambda b: len(b[1]))
                strong.append(rate)
            name = f"RandomResizedCrop({size}) + flip, {label}"
            figs.append(Figure(bench="images", name=f"hpstore {name}", unit="samples/s", values=ours,
                               baseline="PIL DataLoader", baseline_values=base, target=">= 3x PIL DataLoader",
                               extra={"cpu_ms_per_sample": float(np.median(ours_cpu)),
                                      "baseline_cpu_ms_per_sample": float(np.median(base_cpu)),
                                      "cpu_vs_decode_limit": float(np.median(ours_cpu)) * limits[size] / 1e3,
                                      "cpu_vs_decode_limit_every_file": float(np.median(ours_cpu)) * limits_all[size] / 1e3,
                                      "workers": cores}))  # fmt: skip
            figs.append(Figure(bench="images", name=f"hpstore {name} vs PIL+draft", unit="samples/s",
                               values=ours, baseline="PIL+draft DataLoader", baseline_values=strong))  # fmt: skip
            figs.append(Figure(bench="images", name=f"hpstore CPU per sample, {size} px {label}", unit="ms",
                               values=ours_cpu, baseline="DCT-scaled decode limit",
                               baseline_values=[1e3 / limits[size]], higher_is_better=False,
                               target="<= 1.25x decode limit"))  # fmt: skip
            figs.append(Figure(bench="images", name=f"hpstore CPU per sample, {size} px {label}, vs every file",
                               unit="ms", values=ours_cpu, baseline="decode limit, every file",
                               baseline_values=[1e3 / limits_all[size]], higher_is_better=False))  # fmt: skip

    progress("steady-state CPU per sample (1 and 3 epochs through one loader)")
    for size in (224, 64):
        concurrent = concurrent_decode_ms(blobs, size, cores)
        cpu1: list[float] = []
        cpu3: list[float] = []
        for r in range(cfg.repeats):
            for k, into in ((1, cpu1), (3, cpu3)):
                loader = hpstore.Loader(ds, BATCH, num_workers=cores, pin_memory=False, seed=r,
                                        transforms={"image": RandomResizedCrop(size, threads=cores)})  # fmt: skip
                c0 = cpu_seconds()
                for _ in range(k):
                    for _batch in loader:
                        pass
                into.append(cpu_seconds() - c0)
                loader.close()
        slopes = [1e3 * (c3 - c1) / (2 * len(ds)) for c1, c3 in zip(cpu1, cpu3, strict=True)]
        starts = [1e3 * c1 - len(ds) * s for c1, s in zip(cpu1, slopes, strict=True)]
        figs.append(Figure(bench="images", name=f"hpstore steady-state CPU per sample, {size} px warm", unit="ms",
                           values=slopes, baseline="DCT-scaled decode limit, 1 thread",
                           baseline_values=[1e3 / limits[size]], higher_is_better=False, target="<= 1.25x decode limit",
                           extra={"what": "(CPU of 3 epochs - CPU of 1 epoch) / (2 n), one loader, warm page cache",
                                  "n": len(ds), "first_epoch_cpu_ms_per_sample": float(np.median(cpu1)) * 1e3 / len(ds),
                                  "loader_start_ms": float(np.median(starts)),
                                  "vs_every_file_limit": float(np.median(slopes)) * limits_all[size] / 1e3,
                                  f"concurrent_decode_ms_{cores}_threads": concurrent}))  # fmt: skip
        figs.append(Figure(bench="images", name=f"hpstore steady-state CPU per sample, {size} px, vs concurrent decode",
                           unit="ms", values=slopes, baseline=f"DCT-scaled decodes on {cores} threads at once",
                           baseline_values=[concurrent], higher_is_better=False))  # fmt: skip

    progress(f"raw 32x32: {n_tiles} tiles")
    raw_ds = hpstore.open(str(raw_store)).split("train")
    pixels = raw_ds.read(np.arange(len(raw_ds)), ["image"])["image"]
    first, later, later_cpu, base_first, base_later, base_cpu = [], [], [], [], [], []
    for r in range(cfg.repeats):
        loader = hpstore.Loader(raw_ds, BATCH, num_workers=cores, pin_memory=False, seed=r,
                                transforms={"image": RandomResizedCrop(32, threads=cores)})  # fmt: skip
        first.append(measure(_once(loader), lambda b: len(b["label"]))[0])
        rate, cpu = measure(_once(loader), lambda b: len(b["label"]))
        later.append(rate)
        later_cpu.append(1e3 * cpu)
        loader.close()
        base_cpu.append(baseline_cpu_us(PILArray(pixels, 32), min(len(pixels), 10 * BATCH)))
        base_first.append(measure(dataloader(PILArray(pixels, 32), cores), lambda b: len(b[1]))[0])
        persistent = torch.utils.data.DataLoader(PILArray(pixels, 32), batch_size=BATCH, shuffle=True,
                                                 num_workers=cores, persistent_workers=True)  # fmt: skip
        measure(_once(persistent), lambda b: len(b[1]))  # its first epoch starts the workers
        base_later.append(measure(_once(persistent), lambda b: len(b[1]))[0])
        del persistent
    shape = {"shape": list(pixels.shape[1:]), "samples": len(raw_ds), "workers": cores}
    figs.append(Figure(bench="images", name="hpstore raw 32x32 RandomResizedCrop(32) + flip, later epoch",
                       unit="samples/s", values=later, baseline="PIL-per-sample DataLoader, persistent workers, later epoch",
                       baseline_values=base_later, target=">= 10x baseline", extra=shape))  # fmt: skip
    figs.append(Figure(bench="images", name="hpstore raw 32x32 RandomResizedCrop(32) + flip, first epoch",
                       unit="samples/s", values=first, baseline="PIL-per-sample DataLoader, first epoch (workers start)",
                       baseline_values=base_first, extra=shape))  # fmt: skip
    # CPU per sample: not swayed by how other jobs on the machine starve one side's processes.
    figs.append(Figure(bench="images", name="hpstore raw 32x32 CPU per sample, later epoch (every thread)",
                       unit="us", values=later_cpu, baseline="PIL per sample + collate, one thread, no DataLoader",
                       baseline_values=base_cpu, higher_is_better=False, extra=shape))  # fmt: skip
    return figs


if __name__ == "__main__":
    raise SystemExit(main(run))
