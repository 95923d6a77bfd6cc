"""The local-disk backend: files under one root directory, atomic writes by temp file and rename."""

from __future__ import annotations

import mmap
import os
import re
import threading
import time
import uuid

from hpstore.errors import ObjectNotFoundError, StorageError
from hpstore.storage import direct_io
from hpstore.storage.base import Capabilities, ObjectSink, Storage, StorageStats, check_key

_TEMP = re.compile(r"\.tmp-[0-9a-f]{12}$")


def _temp_path(path: str) -> str:
    """Where a write of ``path`` lands before its rename or link: never listed as an object."""
    return f"{path}.tmp-{uuid.uuid4().hex[:12]}"


class _FileSink(ObjectSink):
    """Pieces appended to a temp file as they come; ``commit`` fsyncs (``durable``) and renames it
    to the key, ``abort`` unlinks it. A killed writer leaves only the temp file, never the key."""

    def __init__(self, storage: LocalStorage, key: str, *, durable: bool = True) -> None:
        super().__init__(storage, key, durable=durable)
        self.local = storage
        self.path = storage._path(key)
        self.tmp = _temp_path(self.path)
        self.seconds = 0.0
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self.fd: int | None = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as exc:
            raise StorageError(f"{storage.url}/{key}: cannot write: {exc.strerror or exc}") from exc

    def write(self, data: bytes | memoryview) -> None:
        t0 = time.perf_counter()
        view = memoryview(data).cast("B")
        try:
            assert self.fd is not None, "write after commit or abort"
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError as exc:
            self.abort()
            raise StorageError(f"{self.local.url}/{self.key}: cannot write: {exc.strerror or exc}") from exc
        self.size += len(data)
        self.seconds += time.perf_counter() - t0

    def commit(self) -> None:
        t0 = time.perf_counter()
        try:
            assert self.fd is not None, "commit after commit or abort"
            if self.durable:
                os.fsync(self.fd)
            os.close(self.fd)
            self.fd = None
            os.replace(self.tmp, self.path)
        except OSError as exc:
            self.abort()
            raise StorageError(f"{self.local.url}/{self.key}: cannot write: {exc.strerror or exc}") from exc
        self.local._count_write(self.size, 0, t0 - self.seconds)

    def abort(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        try:
            os.unlink(self.tmp)
        except OSError:
            pass


class LocalStorage(Storage):
    """A directory on a local file system. Reads use ``pread``; writes go through a temp file."""

    capabilities = Capabilities(move_prefix=True, overwrite_in_place=True)

    direct = True
    """Write large aligned payloads with ``O_DIRECT`` (``hpstore.storage.direct_io``); turned off for
    this storage the first time the file system refuses it."""

    map_reads = True
    """Serve ``view_range`` from read-only memory mappings of the files: a page-cached range is
    then used where it lies, instead of copied into a fresh buffer whose every 4 KiB page faults on
    first touch (measured on 3×64×64 raw chunks kept by the loader's cache: 0.5 GB/s for ``pread``
    into fresh memory, 4 GB/s into reused memory). Objects are replaced by rename, never rewritten
    in place under a reader (``overwrite`` is for objects nobody reads yet), so a mapping stays
    valid; each view checks that the path still names the mapped file and maps it again if not."""

    MAX_MAPS = 1024
    """Mappings kept open (the oldest is forgotten first; views of it keep it alive)."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.url = self.root
        self.stats = StorageStats()
        self._maps: dict[str, tuple[tuple[int, int, int, int], memoryview]] = {}
        self._maps_lock = threading.Lock()

    def __getstate__(self) -> dict[str, object]:
        # Worker processes get the storage pickled: mappings and their lock stay in this process.
        state = dict(self.__dict__)
        state["_maps"], state["_maps_lock"] = {}, None
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._maps_lock = threading.Lock()

    def _path(self, key: str) -> str:
        return os.path.join(self.root, *check_key(key).split("/"))

    def read(self, key: str) -> bytes:
        t0 = time.perf_counter()
        try:
            with open(self._path(key), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise ObjectNotFoundError(f"{self.url}/{key}: no such object") from None
        except OSError as exc:
            raise StorageError(f"{self.url}/{key}: {exc.strerror or exc}") from exc
        self.stats.add(bytes_read=len(data), read_requests=1, read_seconds=time.perf_counter() - t0)
        return data

    def read_into(self, key: str, out: memoryview) -> int:
        t0 = time.perf_counter()
        try:
            with open(self._path(key), "rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                if size > len(out):
                    raise StorageError(f"{self.url}/{key}: object has {size} bytes, buffer only {len(out)}")
                done = 0
                while done < size:  # one read per call is capped (2 GiB on Linux)
                    n = f.readinto(out[done:size])
                    if not n:
                        raise StorageError(f"{self.url}/{key}: short read ({done} of {size} bytes)")
                    done += n
        except FileNotFoundError:
            raise ObjectNotFoundError(f"{self.url}/{key}: no such object") from None
        except StorageError:
            raise
        except OSError as exc:
            raise StorageError(f"{self.url}/{key}: {exc.strerror or exc}") from exc
        self.stats.add(bytes_read=size, read_requests=1, read_seconds=time.perf_counter() - t0)
        return size

    def read_range(self, key: str, start: int, end: int) -> bytes:
        t0 = time.perf_counter()
        try:
            fd = os.open(self._path(key), os.O_RDONLY)
        except FileNotFoundError:
            raise ObjectNotFoundError(f"{self.url}/{key}: no such object") from None
        try:
            data = os.pread(fd, end - start, start)
        except OSError as exc:
            raise StorageError(f"{self.url}/{key}: {exc.strerror or exc}") from exc
        finally:
            os.close(fd)
        if len(data) != end - start:
            raise StorageError(
                f"{self.url}/{key}: short read ({len(data)} of {end - start} bytes at {start})"
            )
        self.stats.add(bytes_read=len(data), read_requests=1, read_seconds=time.perf_counter() - t0)
        return data

    def view_range(self, key: str, start: int, end: int) -> memoryview | None:
        if not self.map_reads:
            return None
        t0 = time.perf_counter()
        path = self._path(key)
        try:
            st = os.stat(path)
            ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            mapped = self._maps.get(path)
            if mapped is None or mapped[0] != ident:
                mapped = self._map(path)
        except FileNotFoundError:
            raise ObjectNotFoundError(f"{self.url}/{key}: no such object") from None
        except OSError as exc:
            raise StorageError(f"{self.url}/{key}: {exc.strerror or exc}") from exc
        size = len(mapped[1])
        if not 0 <= start <= end <= size:
            raise StorageError(
                f"{self.url}/{key}: short read ({max(0, size - start)} of {end - start} bytes at {start})"
            )
        self.stats.add(bytes_read=end - start, read_requests=1, read_seconds=time.perf_counter() - t0)
        return mapped[1][start:end]

    def _map(self, path: str) -> tuple[tuple[int, int, int, int], memoryview]:
        """Map the file ``path`` names now, identified by what ``fstat`` says of the open file."""
        fd = os.open(path, os.O_RDONLY)
        try:
            st = os.fstat(fd)
            view = memoryview(mmap.mmap(fd, 0, access=mmap.ACCESS_READ)) if st.st_size else memoryview(b"")
        finally:
            os.close(fd)
        mapped = ((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns), view)
        with self._maps_lock:
            self._maps[path] = mapped
            while len(self._maps) > self.MAX_MAPS:
                del self._maps[next(iter(self._maps))]
        return mapped

    def write(self, key: str, data: bytes | memoryview, *, durable: bool = True) -> None:
        t0 = time.perf_counter()
        path = self._path(key)
        tmp = _temp_path(path)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            direct = self._put(tmp, data, new=True)
            if durable:
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            os.replace(tmp, path)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise StorageError(f"{self.url}/{key}: cannot write: {exc.strerror or exc}") from exc
        self._count_write(len(data), direct, t0)

    def open_sink(self, key: str, *, durable: bool = True) -> ObjectSink:
        return _FileSink(self, key, durable=durable)

    def create(self, key: str, data: bytes) -> bool:
        """Exclusive create: the bytes go to a temp file, which is then hard-linked to the key;
        ``link`` fails if the key exists, so exactly one of two racing creators wins, and a reader
        never sees the object partly written."""
        t0 = time.perf_counter()
        path = self._path(key)
        tmp = _temp_path(path)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(tmp, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
        except OSError as exc:
            raise StorageError(f"{self.url}/{key}: cannot create: {exc.strerror or exc}") from exc
        finally:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        self._count_write(len(data), 0, t0)
        return True

    def overwrite(self, key: str, data: bytes | memoryview) -> None:
        t0 = time.perf_counter()
        path = self._path(key)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            direct = self._put(path, data, new=False)
        except OSError as exc:
            raise StorageError(f"{self.url}/{key}: cannot write: {exc.strerror or exc}") from exc
        self._count_write(len(data), direct, t0)

    def _put(self, path: str, data: bytes | memoryview, *, new: bool) -> int:
        """Write the file (``direct_io.write``); returns the bytes that went ``O_DIRECT``."""
        try:
            return direct_io.write(path, data, new=new, direct=self.direct)
        except direct_io.DirectRefused:
            self.direct = False
            return direct_io.write(path, data, new=new, direct=False)

    def _count_write(self, nbytes: int, direct: int, t0: float) -> None:
        self.stats.add(
            bytes_written=nbytes,
            bytes_written_direct=direct,
            write_requests=1,
            write_seconds=time.perf_counter() - t0,
        )

    def move_prefix(self, src: str, dst: str) -> bool:
        s, d = self._path(src), self._path(dst)
        if not os.path.isdir(s) or os.path.lexists(d):
            return False
        try:
            os.makedirs(os.path.dirname(d), exist_ok=True)
            os.rename(s, d)
        except OSError as exc:
            raise StorageError(f"{self.url}: cannot move {src} to {dst}: {exc.strerror or exc}") from exc
        return True

    def sync(self) -> None:
        """One ``syncfs`` of the file system holding the store: far cheaper than an fsync per
        object when a checkpoint writes hundreds of small files."""
        try:
            _syncfs(self.root)
        except OSError as exc:
            raise StorageError(f"{self.url}: cannot sync: {exc.strerror or exc}") from exc

    def size(self, key: str) -> int:
        try:
            return os.stat(self._path(key)).st_size
        except FileNotFoundError:
            raise ObjectNotFoundError(f"{self.url}/{key}: no such object") from None

    def is_scratch(self, key: str) -> bool:
        return _TEMP.search(key) is not None

    def list(self, prefix: str = "") -> dict[str, int]:
        base = self._path(prefix) if prefix else self.root
        if os.path.isfile(base):
            return {prefix: os.stat(base).st_size}
        out: dict[str, int] = {}
        for dirpath, _dirs, files in os.walk(base):
            rel = os.path.relpath(dirpath, self.root)
            for name in files:
                key = name if rel == "." else f"{rel.replace(os.sep, '/')}/{name}"
                try:
                    out[key] = os.stat(os.path.join(dirpath, name)).st_size
                except FileNotFoundError:  # deleted while listing
                    continue
        return out

    def delete_prefix(self, prefix: str) -> None:
        import shutil

        path = self._path(prefix)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.exists(path):
            os.unlink(path)


def _syncfs(path: str) -> None:
    """Flush the file system holding ``path`` (Linux ``syncfs``; ``os.sync`` elsewhere)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "syncfs"):
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)
