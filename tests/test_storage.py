"""The Storage contract, run against every backend that needs no server."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator

import pytest

from hpstore.errors import InputError, ObjectNotFoundError, StorageError
from hpstore.storage.base import PrefixStorage, Storage, check_key
from hpstore.storage.fsspec import FsspecStorage
from hpstore.storage.local import LocalStorage
from hpstore.storage.open import open_storage
from hpstore.storage.wrappers import ForwardingStorage, LatencyStorage, RetryingStorage, RetryPolicy


def _backend(name: str, tmp_path: os.PathLike[str]) -> Storage:
    if name == "local":
        return LocalStorage(str(tmp_path))
    return FsspecStorage(f"memory://hpstore-test-{uuid.uuid4().hex}")


# Every backend that needs no server, and every wrapper around each of them: a wrapper must pass the
# same contract as what it wraps (test_s3_storage.py runs it against a real S3 server).
WRAPS: dict[str, Callable[[Storage], Storage]] = {
    "bare": lambda s: s,
    "prefix": lambda s: s.child("nested/root"),
    "retrying": lambda s: RetryingStorage(s, RetryPolicy(attempts=2, base_delay=0.0)),
    "latency": lambda s: LatencyStorage(s, 0.0),
    "forwarding": ForwardingStorage,
    "retrying+prefix": lambda s: RetryingStorage(s).child("p"),
}


@pytest.fixture(params=[(b, w) for b in ("local", "memory") for w in WRAPS], ids=lambda p: f"{p[1]}({p[0]})")
def storage(request: pytest.FixtureRequest, tmp_path: os.PathLike[str]) -> Iterator[Storage]:
    backend, wrap = request.param
    yield WRAPS[wrap](_backend(backend, tmp_path))


# Methods of the contract that are derived from the others, so a wrapper may inherit them.
DERIVED = {"exists", "child"}
CONTRACT = sorted(
    n for n, v in vars(Storage).items() if callable(v) and not n.startswith("_") and n not in DERIVED
)


@pytest.mark.parametrize("wrapper", [ForwardingStorage, RetryingStorage, LatencyStorage, PrefixStorage])
def test_every_wrapper_forwards_the_whole_contract(wrapper: type[Storage]) -> None:
    # A method added to Storage later and not forwarded would silently run the base class's
    # default (a serial read loop, a write instead of a rename) behind the wrapper.
    missing = [m for m in CONTRACT if getattr(wrapper, m) is getattr(Storage, m)]
    assert not missing, f"{wrapper.__name__} does not forward {missing}"
    assert "move_prefix" in CONTRACT and "overwrite" in CONTRACT and "read_into" in CONTRACT


def test_wrappers_declare_the_capabilities_of_what_they_wrap(storage: Storage) -> None:
    inner: Storage = storage
    while isinstance(inner, ForwardingStorage | PrefixStorage):
        inner = inner.inner
    assert storage.capabilities == inner.capabilities
    assert storage.capabilities.move_prefix == isinstance(inner, LocalStorage)
    assert storage.capabilities.concurrent_ranges == isinstance(inner, FsspecStorage)


def test_read_into_fills_the_buffer(storage: Storage) -> None:
    storage.write("r/obj", b"abcdef")
    buf = bytearray(10)
    assert storage.read_into("r/obj", memoryview(buf)) == 6
    assert bytes(buf[:6]) == b"abcdef"
    with pytest.raises(ObjectNotFoundError):
        storage.read_into("r/none", memoryview(buf))


def test_write_read_range_size_list_delete(storage: Storage) -> None:
    storage.write("a/b/obj", b"0123456789")
    storage.write("a/other", b"xy")
    assert storage.read("a/b/obj") == b"0123456789"
    assert storage.read_range("a/b/obj", 2, 5) == b"234"
    assert storage.read_ranges([("a/b/obj", 0, 1), ("a/other", 1, 2), ("a/b/obj", 9, 10)]) == [
        b"0",
        b"y",
        b"9",
    ]
    assert storage.size("a/b/obj") == 10
    assert storage.list("a") == {"a/b/obj": 10, "a/other": 2}
    assert storage.exists("a/other") and not storage.exists("a/none")
    storage.write("a/other", b"replaced")
    assert storage.read("a/other") == b"replaced"
    storage.delete_prefix("a/b")
    assert storage.list("a") == {"a/other": 8}
    assert storage.stats.bytes_read >= 10 + 3 + 3
    assert storage.stats.write_requests == 3


def test_missing_objects_and_short_reads_raise(storage: Storage) -> None:
    with pytest.raises(ObjectNotFoundError):
        storage.read("nope")
    with pytest.raises(ObjectNotFoundError):
        storage.size("nope")
    storage.write("small", b"abc")
    with pytest.raises(StorageError, match="short read"):
        storage.read_range("small", 0, 10)
    assert storage.list("no/such/prefix") == {}


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "../up", "a//b", "a/./b", "a\\b"])
def test_unsafe_keys_are_rejected(key: str) -> None:
    with pytest.raises(InputError):
        check_key(key)


def test_local_write_leaves_no_temp_files(tmp_path: os.PathLike[str]) -> None:
    s = LocalStorage(str(tmp_path))
    for i in range(5):
        s.write("k", str(i).encode())
    assert sorted(os.listdir(tmp_path)) == ["k"]


def test_open_storage_picks_backend(tmp_path: os.PathLike[str]) -> None:
    assert isinstance(open_storage(str(tmp_path)), LocalStorage)
    assert isinstance(open_storage(f"file://{tmp_path}"), LocalStorage)
    assert isinstance(open_storage("memory://x"), RetryingStorage)
    with pytest.raises(InputError):
        open_storage("")
    with pytest.raises(InputError):
        open_storage("nosuchproto://bucket/x")


class Flaky(LocalStorage):
    """A real local storage whose first ``fail`` reads raise a transient error."""

    def __init__(self, root: str, fail: int) -> None:
        super().__init__(root)
        self.fail = fail

    def read(self, key: str) -> bytes:
        if self.fail > 0:
            self.fail -= 1
            raise ConnectionResetError("connection reset by peer")
        return super().read(key)


def test_retrying_storage_retries_transient_and_gives_up(tmp_path: os.PathLike[str]) -> None:
    inner = Flaky(str(tmp_path), fail=2)
    inner.write("k", b"v")
    s = RetryingStorage(inner, RetryPolicy(attempts=3, base_delay=0.001))
    assert s.read("k") == b"v"
    assert s.stats.retries == 2
    inner.fail = 5
    with pytest.raises(StorageError, match="failed after 3 attempts"):
        s.read("k")
    assert s.stats.failures == 1
    with pytest.raises(ObjectNotFoundError):  # permanent: no retries
        s.read("missing")


def test_latency_storage_delegates(tmp_path: os.PathLike[str]) -> None:
    s = LatencyStorage(LocalStorage(str(tmp_path)), 0.0)
    s.write("k", b"v")
    assert s.read_ranges([("k", 0, 1)]) == [b"v"]


def test_deferred_writes_are_atomic_and_synced_together(storage: Storage) -> None:
    for i in range(20):
        storage.write(f"batch/{i}", bytes([i]) * 100, durable=False)
    storage.sync()
    assert storage.list("batch") == {f"batch/{i}": 100 for i in range(20)}
    assert storage.read("batch/7") == bytes([7]) * 100


def test_overwrite_rewrites_whole_objects_and_move_prefix_moves_or_says_no(storage: Storage) -> None:
    storage.write("g/a/x", b"0123456789")
    storage.overwrite("g/a/x", b"abc")  # shorter: the old tail is gone
    storage.overwrite("g/b/y", b"new object")
    storage.overwrite("g/b/y", b"longer than before")
    storage.sync()
    assert storage.list("g") == {"g/a/x": 3, "g/b/y": 18}
    assert storage.read("g/a/x") == b"abc" and storage.read("g/b/y") == b"longer than before"
    moved = storage.move_prefix("g", "h/g2")
    if moved:  # local directories: one rename
        assert storage.list("g") == {} and storage.list("h") == {"h/g2/a/x": 3, "h/g2/b/y": 18}
        assert not storage.move_prefix("g", "h/g3")  # nothing there to move
        storage.write("h/g3/z", b"1")
        assert not storage.move_prefix("h/g2", "h/g3")  # never onto something that exists
    else:  # object stores: a move would be a copy; nothing moved
        assert storage.list("g") == {"g/a/x": 3, "g/b/y": 18} and storage.list("h") == {}
    assert moved == storage.capabilities.move_prefix


def test_local_overwrite_keeps_the_file_and_leaves_no_temp_files(tmp_path: os.PathLike[str]) -> None:
    st = LocalStorage(str(tmp_path))
    st.write("o", b"x" * 100)
    inode = os.stat(os.path.join(tmp_path, "o")).st_ino
    st.overwrite("o", b"y" * 10)
    assert os.stat(os.path.join(tmp_path, "o")).st_ino == inode  # rewritten in place
    assert os.listdir(tmp_path) == ["o"] and st.read("o") == b"y" * 10


def test_a_killed_local_write_leaves_scratch_that_is_named_as_such(storage: Storage) -> None:
    # What a write killed between its temp file and its rename leaves is listed (garbage collection
    # removes it with its generation) and known as scratch, never as someone else's object.
    storage.write("g/obj", b"x")
    assert not storage.is_scratch("g/obj") and not storage.is_scratch("manifest.json")
    if storage.capabilities.move_prefix:  # the local backend, under any wrapper
        assert storage.is_scratch("manifest.json.tmp-0123456789ab")
        assert storage.is_scratch("g/obj.tmp-abcdef012345")


def test_view_range_is_a_view_of_the_object_or_none_behind_a_wrapper(storage: Storage) -> None:
    storage.write("a/k", bytes(range(200)))
    view = storage.view_range("a/k", 10, 30)
    mapping = isinstance(storage, LocalStorage | PrefixStorage) and isinstance(
        getattr(storage, "inner", storage), LocalStorage
    )
    if not mapping:  # remote backends and every wrapper: callers read instead
        assert view is None
        return
    assert view is not None and view.readonly and bytes(view) == bytes(range(10, 30))
    assert storage.view_range("a/k", 200, 200) == b""
    with pytest.raises(StorageError, match="short read"):
        storage.view_range("a/k", 190, 201)
    with pytest.raises(ObjectNotFoundError):
        storage.view_range("a/missing", 0, 1)
    # A replaced object (written to a temp file and renamed over) is mapped again: the new bytes,
    # while a view taken before keeps showing the old file, which the mapping keeps alive.
    storage.write("a/k", bytes(reversed(range(100))))
    assert bytes(view) == bytes(range(10, 30))
    again = storage.view_range("a/k", 0, 4)
    assert again is not None and bytes(again) == bytes([99, 98, 97, 96])
    with pytest.raises(StorageError, match="short read"):
        storage.view_range("a/k", 150, 160)


def test_a_pickled_local_storage_maps_afresh(tmp_path: os.PathLike[str]) -> None:
    import pickle

    s = LocalStorage(str(tmp_path))
    s.write("k", b"abcdef")
    assert bytes(s.view_range("k", 1, 3) or b"") == b"bc"
    copy = pickle.loads(pickle.dumps(s))  # worker processes get the storage this way
    assert bytes(copy.view_range("k", 2, 5) or b"") == b"cde"
