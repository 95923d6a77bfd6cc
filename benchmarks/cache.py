"""Page-cache dropping for cold-cache benchmarks, and a check of what is still cached.

``drop_page_cache(paths)`` tries, in order:

1. ``sync`` then ``echo 3 > /proc/sys/vm/drop_caches`` (needs root; drops every clean page, dentry
   and inode on the machine, so it is the honest "cold" state);
2. ``fsync`` + ``posix_fadvise(POSIX_FADV_DONTNEED)`` on every file under ``paths`` (any user; drops
   only those files' clean pages, which is what a benchmark of those files needs);
3. nothing (no fadvise on this platform).

It returns a ``CacheDrop`` saying which happened and what fraction of the files' bytes is still
resident afterwards (measured with ``mincore``), so a report never calls a warm run cold. On tmpfs
both methods are no-ops by nature: the files *are* page cache; the note says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

DROP_CACHES = Path("/proc/sys/vm/drop_caches")
RAM_FILESYSTEMS = frozenset({"tmpfs", "ramfs", "devtmpfs"})


@dataclass(frozen=True, kw_only=True)
class CacheDrop:
    """What a page-cache drop did. ``method``: ``drop_caches`` | ``fadvise`` | ``none``."""

    method: str
    files: int
    resident_fraction: float | None
    note: str

    @property
    def cold(self) -> bool:
        """True when the files are (almost) out of the page cache."""
        if self.resident_fraction is None:
            return self.method == "drop_caches"
        return self.resident_fraction < 0.05

    def as_dict(self) -> dict[str, object]:
        return {
            "method": self.method,
            "files": self.files,
            "resident_fraction": self.resident_fraction,
            "cold": self.cold,
            "note": self.note,
        }


def iter_files(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Every regular file at or below ``paths`` (directories are walked)."""
    for p in map(Path, paths):
        if p.is_dir():
            for root, _dirs, names in os.walk(p):
                for n in sorted(names):
                    yield Path(root, n)
        elif p.is_file():
            yield p


def drop_page_cache(paths: Iterable[str | Path], *, system_wide: bool = True) -> CacheDrop:
    """Evict ``paths`` from the page cache as well as this process is permitted to."""
    files = list(iter_files(paths))
    fs = filesystem_type(files[0]) if files else None
    if system_wide and _drop_system_wide():
        method, note = "drop_caches", "dropped every clean page (echo 3 > /proc/sys/vm/drop_caches)"
    elif _fadvise_all(files):
        method = "fadvise"
        why = "not permitted to write /proc/sys/vm/drop_caches" if system_wide else "per-file drop asked"
        note = f"{why}: posix_fadvise(DONTNEED) on {len(files)} files (their clean pages only)"
    else:
        method, note = "none", "could not drop the page cache: no drop_caches permission and no fadvise"
    if fs in RAM_FILESYSTEMS:
        note += f"; the files are on {fs}, which lives in RAM, so nothing can make them cold"
    resident = resident_fraction(files)
    if resident is not None and resident >= 0.05:
        note += f"; {resident:.0%} of the bytes are still cached"
    return CacheDrop(method=method, files=len(files), resident_fraction=resident, note=note)


def _drop_system_wide() -> bool:
    os.sync()  # dirty pages cannot be dropped; write them first
    try:
        DROP_CACHES.write_text("3\n")
    except OSError:  # PermissionError, read-only /proc in containers, no /proc at all
        return False
    return True


def _fadvise_all(files: list[Path]) -> bool:
    if not hasattr(os, "posix_fadvise"):
        return False
    for f in files:
        try:
            fd = os.open(f, os.O_RDONLY)
        except OSError:
            continue  # vanished or unreadable: nothing of ours to drop
        try:
            try:
                os.fsync(fd)
            except OSError:
                pass  # some filesystems refuse fsync on read-only descriptors; fadvise still helps
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def resident_fraction(files: Iterable[str | Path]) -> float | None:
    """Fraction of the files' bytes in the page cache (``mincore``), or None where unsupported."""
    libc = _libc()
    if libc is None:
        return None
    total = resident = 0
    for f in files:
        try:
            counts = _resident_pages(libc, Path(f))
        except OSError:
            continue
        resident += counts[0]
        total += counts[1]
    return resident / total if total else None


def _resident_pages(libc: ctypes.CDLL, path: Path) -> tuple[int, int]:
    size = path.stat().st_size
    if size == 0:
        return 0, 0
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        # Map without touching: mapping faults nothing in, so mincore sees the cache as it was.
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
        try:
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore of {path} failed")
            return sum(b & 1 for b in bytes(vec)), pages
        finally:
            libc.munmap(ctypes.c_void_p(addr), size)
    finally:
        os.close(fd)


_LIBC: list[ctypes.CDLL | None] = []


def _libc() -> ctypes.CDLL | None:
    """libc with mmap/mincore/munmap typed, or None (not Linux-like)."""
    if not _LIBC:
        lib: ctypes.CDLL | None = None
        name = ctypes.util.find_library("c")
        try:
            if name:
                lib = ctypes.CDLL(name, use_errno=True)
                lib.mmap.argtypes = [
                    ctypes.c_void_p,
                    ctypes.c_size_t,
                    ctypes.c_int,
                    ctypes.c_int,
                    ctypes.c_int,
                    ctypes.c_long,
                ]
                lib.mmap.restype = ctypes.c_void_p
                lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
                lib.mincore.restype = ctypes.c_int
                lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
                lib.munmap.restype = ctypes.c_int
        except (OSError, AttributeError):
            lib = None
        _LIBC.append(lib)
    return _LIBC[0]


def filesystem_type(path: str | Path) -> str | None:
    """The filesystem type (``ext4``, ``tmpfs``, …) holding ``path``, from /proc/self/mounts."""
    mount = mount_of(path)
    return mount[1] if mount else None


def mount_of(path: str | Path) -> tuple[str, str, str, str] | None:
    """(device, fs type, mount point, options) of the mount holding ``path``: longest prefix wins."""
    target = os.path.realpath(path)
    best: tuple[str, str, str, str] | None = None
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split()
        if len(parts) < 4:
            continue
        dev, point, fstype, opts = parts[0], _unescape(parts[1]), parts[2], parts[3]
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best[2])):
            best = (dev, fstype, point, opts)
    return best


def _unescape(field: str) -> str:
    # /proc/mounts escapes space, tab, newline and backslash as octal
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
