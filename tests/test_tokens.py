"""Token streams on real text: ingest (byte and BPE tokenizers, JSONL/Parquet/.txt), window views,
exactly-once epochs across ranks and workers, resume, document packing, bad input, S3 loopback."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import hpstore
from hpstore.tokens import ByteTokenizer, HFTokenizer, TokenWindows
from tests.support.s3server import S3Server, client_env
from tests.support.s3server import s3_server as s3_server  # the fixture
from tools.ingest import main as ingest_main

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT / "tests" / "data" / "text"
FILES = sorted(TEXT.glob("*.txt"))


def paragraphs() -> list[str]:
    """Real documents: the paragraphs of the licence texts."""
    out = []
    for f in FILES:
        out += [p.strip() for p in f.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    return out


def byte_stream(docs: list[bytes]) -> np.ndarray:
    parts = [np.concatenate([np.frombuffer(d, np.uint8).astype(np.uint16), [256]]) for d in docs]
    return np.concatenate(parts).astype(np.uint16)


def ingest(*args: str) -> int:
    return ingest_main([*map(str, args), "--no-progress"])


def train_bpe(path: Path, vocab: int = 600) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"])
    tok.train([str(f) for f in FILES], trainer)
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def byte_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("tok") / "store"
    # Small chunks so windows cross chunk boundaries and the plan has many chunks.
    assert ingest(TEXT, dst, "--tokenizer", "byte", "--chunk-bytes", "4K", "--shard-bytes", "64K") == 0
    return dst


def test_byte_ingest_round_trip_of_a_directory(byte_store: Path) -> None:
    store = hpstore.open(str(byte_store))
    assert store.splits == ["train", "train.docs"]
    ds = store.split("train")
    expected = byte_stream([f.read_bytes() for f in FILES])
    tokens = ds.read(np.arange(len(ds)))["tokens"]
    assert tokens.dtype == np.uint16 and np.array_equal(tokens, expected)
    attrs = ds.fields["tokens"].attrs
    assert attrs["vocab_size"] == 257 and attrs["eot"] == 256 and attrs["tokenizer"]["kind"] == "byte"
    docs = store.split("train.docs")
    offsets = docs.read(np.arange(len(docs)))["offsets"]
    lengths = [len(f.read_bytes()) + 1 for f in FILES]
    assert offsets.tolist() == [0, *np.cumsum(lengths).tolist()]
    assert ds.spec.num_chunks > 10  # really chunked
    assert ByteTokenizer().decode(tokens[offsets[1] : offsets[2]]) == FILES[1].read_text(encoding="utf-8")


def test_jsonl_parquet_and_glob_give_the_same_bpe_tokens(tmp_path: Path) -> None:
    docs = paragraphs()
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(docs)))
    pq.write_table(pa.table({"body": docs[:100]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"body": docs[100:]}), tmp_path / "b.parquet")
    tok = train_bpe(tmp_path / "tokenizer.json")
    a, b = tmp_path / "from-jsonl", tmp_path / "from-parquet"
    assert ingest(jsonl, a, "--tokenizer", tok, "--text-field", "body", "--holdout", "0.1") == 0
    assert (
        ingest(tmp_path / "*.parquet", b, "--tokenizer", tok, "--text-field", "body", "--holdout", "0.1") == 0
    )
    sa, sb = hpstore.open(str(a)), hpstore.open(str(b))
    hf = HFTokenizer(str(tok))
    for split in ("train", "val"):
        x, y = sa.split(split), sb.split(split)
        tx = x.read(np.arange(len(x)))["tokens"]
        assert np.array_equal(tx, y.read(np.arange(len(y)))["tokens"])
        assert x.fields["tokens"].attrs["tokenizer"]["sha256"] == hf.sha256
    val = sa.split("val.docs")
    assert len(val) - 1 == len(docs) // 10  # every 10th document is held out
    # The held-out documents decode back to their text (byte-level BPE is lossless).
    vt = sa.split("val").read(np.arange(len(sa.split("val"))))["tokens"]
    off = val.read(np.arange(len(val)))["offsets"]
    assert hf.decode(vt[off[0] : off[1]]) == docs[9]
    assert vt[off[1] - 1] == hf.eot


@pytest.mark.parametrize("workers", [1, 3])
def test_jsonl_parsed_in_parallel_blocks_keeps_order_holdout_and_error_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], workers: int
) -> None:
    """JSON blocks are parsed and tokenized on several threads: the stream, the held-out split and
    the document named by an error are what one reader in order gives."""
    from tools.ingest_tokens import TokenIngestConfig, ingest_tokens
    from tools.sources import text

    monkeypatch.setattr(text, "BLOCK_BYTES", 4096)  # dozens of blocks from a small real corpus
    docs = paragraphs()
    src = tmp_path / "corpus.jsonl.gz"
    with gzip.open(src, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    cfg = TokenIngestConfig(
        src=str(src), dst=str(tmp_path / "s"), tokenizer="byte", holdout=0.1, workers=workers, progress=False
    )
    result = ingest_tokens(cfg)
    held = [d for i, d in enumerate(docs) if i % 10 == 9]
    kept = [d for i, d in enumerate(docs) if i % 10 != 9]
    store = hpstore.open(str(tmp_path / "s"))
    for split, want in (("train", kept), ("val", held)):
        ds = store.split(split)
        got = ds.read(np.arange(len(ds)))["tokens"]
        assert np.array_equal(got, byte_stream([d.encode() for d in want]))
    assert result.documents == {"train": len(kept), "val": len(held)}
    assert result.text_bytes == sum(len(d.encode()) for d in docs)
    # An empty document deep in the file (a later block) is named by its number in the file.
    bad = tmp_path / "bad.jsonl"
    k = len(docs) - 3
    bad.write_text("".join(json.dumps({"text": "" if i == k else d}) + "\n" for i, d in enumerate(docs)))
    assert ingest(bad, tmp_path / "b", "--tokenizer", "byte", "--workers", workers) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"document {k} is empty" in err[0], err
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("world_size,workers", [(1, 0), (2, 2), (3, 1)])
def test_windows_are_dealt_exactly_once_per_epoch(byte_store: Path, world_size: int, workers: int) -> None:
    ds = hpstore.open(str(byte_store)).split("train")
    tokens = ds.read(np.arange(len(ds)))["tokens"]
    seq = 100
    view = ds.windows("tokens", seq)
    assert len(view) == (len(ds) - seq) // seq
    for epoch in (0, 1, 2):
        seen = []
        steps = set()
        for rank in range(world_size):
            loader = hpstore.Loader(
                view, 16, seed=3, rank=rank, world_size=world_size, num_workers=workers, with_index=True,
                shuffle_window=2,
            )  # fmt: skip
            loader.set_epoch(epoch)
            n = 0
            for batch in loader:
                idx = batch["index"].numpy()
                rows = batch["tokens"].numpy()
                assert rows.shape == (len(idx), seq + 1) and rows.dtype == np.uint16
                starts = view.starts(idx, seed=3, epoch=epoch)
                want = tokens[starts[:, None] + np.arange(seq + 1)]
                assert np.array_equal(rows, want)
                seen.append(idx)
                n += 1
            steps.add(n)
        assert len(steps) == 1  # equal steps on every rank
        allseen = np.concatenate(seen)
        counts = np.bincount(allseen, minlength=len(view))
        assert counts.min() == 1 and (counts > 1).sum() < world_size  # wrap-around pads only
        phase = view.phase(3, epoch)
        assert (phase == 0) == (epoch == 0)
    assert view.dropped_tokens < 2 * seq


@pytest.mark.parametrize("seq", [1, 100, 2047, 2048, 5000])
def test_window_rows_are_the_stream_whatever_the_chunking(byte_store: Path, seq: int) -> None:
    """Rows are copied straight from the chunks (strided runs, rows across 2-4 chunks piece by
    piece): in any order, with repeats, in epochs whose grid is shifted, each row is the stream."""
    ds = hpstore.open(str(byte_store)).split("train")
    assert ds.spec.chunk_rows == 2048  # 4 KiB chunks of uint16: seq 5000 spans up to 4 chunks
    tokens = ds.read(np.arange(len(ds)))["tokens"]
    view = ds.windows("tokens", seq)
    rng = np.random.default_rng(seq)
    idx = np.concatenate([rng.permutation(len(view))[:300], [0, len(view) - 1, 0]])
    for epoch in (0, 1, 5):
        rows = view.read(idx, seed=7, epoch=epoch)["tokens"]
        starts = view.starts(idx, seed=7, epoch=epoch)
        assert np.array_equal(rows, tokens[starts[:, None] + np.arange(seq + 1)])
    loader = hpstore.Loader(view, 7, seed=7, with_index=True, shuffle_window=3)
    loader.set_epoch(1)
    for batch in loader:
        starts = view.starts(batch["index"].numpy(), seed=7, epoch=1)
        assert np.array_equal(batch["tokens"].numpy(), tokens[starts[:, None] + np.arange(seq + 1)])


@pytest.mark.parametrize("seq", [1, 100, 2047, 5000])
@pytest.mark.parametrize("shuffle", [True, False])
def test_batches_without_index_are_the_indexed_batches(byte_store: Path, seq: int, shuffle: bool) -> None:
    """Without ``with_index`` grid windows are walked in natural order and each row sent to its
    output position (no sort): the batches are exactly those of the indexed path, checked against
    the stream, epoch after epoch on the threads a loader keeps between epochs."""
    ds = hpstore.open(str(byte_store)).split("train")
    tokens = ds.read(np.arange(len(ds)))["tokens"]
    view = ds.windows("tokens", seq)
    indexed = hpstore.Loader(view, 7, seed=7, shuffle=shuffle, shuffle_window=3, with_index=True)
    for workers in (0, 2):
        plain = hpstore.Loader(view, 7, seed=7, shuffle=shuffle, shuffle_window=3, num_workers=workers)
        for epoch in (0, 1, 2):
            plain.set_epoch(epoch)
            indexed.set_epoch(epoch)
            got = [b for b in plain]
            want = [b for b in indexed]
            assert len(got) == len(want) == len(plain)
            for g, w in zip(got, want, strict=True):
                assert set(g) == {"tokens"}
                assert np.array_equal(g["tokens"].numpy(), w["tokens"].numpy())
                starts = view.starts(w["index"].numpy(), seed=7, epoch=epoch)
                assert np.array_equal(g["tokens"].numpy(), tokens[starts[:, None] + np.arange(seq + 1)])
        plain.close()


@pytest.mark.parametrize("chunk_bytes", ["4K", "64K"])
def test_ingest_hands_whole_chunks_across_pieces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk_bytes: str
) -> None:
    """Tokens reach the writer one chunk at a time, as views of a piece or joined across pieces
    (pieces of ~4 KB here: smaller than 64K chunks, larger than 4K ones): the stream, both splits
    and the chunking are those of any other append."""
    from hpstore.format.writer import Layout, split_geometry
    from hpstore.options import parse_size
    from tools.sources import text

    monkeypatch.setattr(text, "BLOCK_BYTES", 4096)
    docs = paragraphs() * 3
    src = tmp_path / "corpus.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    args = ["--tokenizer", "byte", "--chunk-bytes", chunk_bytes, "--holdout", "0.1", "--workers", "2"]
    assert ingest(src, tmp_path / "s", *args) == 0
    store = hpstore.open(str(tmp_path / "s"))
    layout = Layout(chunk_bytes=parse_size(chunk_bytes))
    for split, want in (
        ("train", [d for i, d in enumerate(docs) if i % 10 != 9]),
        ("val", [d for i, d in enumerate(docs) if i % 10 == 9]),
    ):
        ds = store.split(split)
        assert np.array_equal(ds.read(np.arange(len(ds)))["tokens"], byte_stream([d.encode() for d in want]))
        assert ds.spec.chunk_rows == split_geometry({"tokens": np.zeros(1, np.uint16)}, layout)[0]
        assert ds.spec.num_chunks == -(-len(ds) // ds.spec.chunk_rows)


def test_resume_yields_exactly_the_rest(byte_store: Path) -> None:
    view = hpstore.open(str(byte_store)).split("train").windows("tokens", 64)
    full = hpstore.Loader(view, 8, seed=1, world_size=2, rank=1, with_index=True, shuffle_window=2)
    full.set_epoch(1)
    want = [b["index"].tolist() for b in full]
    part = hpstore.Loader(
        view, 8, seed=1, world_size=2, rank=1, with_index=True, num_workers=2, shuffle_window=2
    )
    part.set_epoch(1)
    it = iter(part)
    head = [next(it)["index"].tolist() for _ in range(7)]
    state = json.loads(json.dumps(part.state_dict()))
    again = hpstore.Loader(view, 8, seed=1, world_size=2, rank=1, with_index=True, shuffle_window=2)
    again.load_state_dict(state)
    rest = [b["index"].tolist() for b in again]
    assert head + rest == want


def test_document_windows_pack_whole_documents_with_a_loss_mask(byte_store: Path) -> None:
    store = hpstore.open(str(byte_store))
    ds = store.split("train")
    tokens = ds.read(np.arange(len(ds)))["tokens"]
    docs = store.split("train.docs")
    offsets = docs.read(np.arange(len(docs)))["offsets"]
    seq = 256
    view: TokenWindows = ds.windows("tokens", seq, respect_documents=True)
    loader = hpstore.Loader(view, 32, seed=0, with_index=True, num_workers=1)
    covered = np.zeros(len(ds), dtype=np.int64)
    for batch in loader:
        idx = batch["index"].numpy()
        starts, lengths = view.starts(idx), view.lengths(idx)
        assert lengths is not None
        mask = batch["loss_mask"].numpy()
        rows = batch["tokens"].numpy()
        for k in range(len(idx)):
            s, n = int(starts[k]), int(lengths[k])
            inside = np.searchsorted(offsets, s, side="right") - 1
            # A window starts at a document start or continues a document longer than a window,
            # and ends at a document end or where such a document is cut.
            assert s in offsets or offsets[inside + 1] - offsets[inside] > seq + 1
            assert np.array_equal(rows[k, :n], tokens[s : s + n])
            assert (rows[k, n:] == 256).all()
            assert mask[k].sum() == n - 1 and mask[k, : n - 1].all()
            covered[s : s + n] += 1
    assert (covered == 1).all()  # every token in exactly one window
    assert view.padding_tokens == len(view) * (seq + 1) - len(ds)


def run_ingest(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tools.ingest", *args, "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )  # fmt: skip


def big_vocab_tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(70_000)} | {"[UNK]": 70_000}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return path


def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path: Path, byte_store: Path) -> None:
    (tmp_path / "bad-utf8.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    (tmp_path / "empty.jsonl").write_text('{"text": "a"}\n{"text": ""}\n')
    (tmp_path / "other.jsonl").write_text('{"body": "a"}\n')
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "other.parquet")
    big = big_vocab_tokenizer(tmp_path / "big.json")
    cases = [
        (["bad-utf8.jsonl", "--tokenizer", "byte"], "document 1 is not valid UTF-8"),
        (["empty.jsonl", "--tokenizer", "byte"], "document 1 is empty"),
        (["other.jsonl", "--tokenizer", "byte"], "no text column 'text'"),
        (["other.parquet", "--tokenizer", "byte"], "no text column 'text'"),
        (
            ["other.jsonl", "--tokenizer", str(big), "--text-field", "body", "--token-dtype", "uint16"],
            "more than uint16",
        ),
        (["other.jsonl", "--tokenizer", "nope.json", "--text-field", "body"], "no such tokenizer file"),
        (["missing/*.txt", "--tokenizer", "byte"], "matches no file"),
    ]
    for args, message in cases:
        dst = tmp_path / "dst"
        proc = run_ingest(
            [str(tmp_path / args[0]) if not args[0].startswith("missing") else args[0], str(dst), *args[1:]]
        )
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, proc.stderr)
        assert not dst.exists()
    # An existing store is left exactly as it was by a failed overwrite.
    before = {p: p.stat().st_mtime_ns for p in byte_store.rglob("*")}
    proc = run_ingest([str(tmp_path / "empty.jsonl"), str(byte_store), "--tokenizer", "byte", "--overwrite"])
    assert proc.returncode == 2
    assert {p: p.stat().st_mtime_ns for p in byte_store.rglob("*")} == before
    # --skip-empty drops (and counts) the empty document instead.
    proc = run_ingest(
        [str(tmp_path / "empty.jsonl"), str(tmp_path / "ok"), "--tokenizer", "byte", "--skip-empty"]
    )
    assert proc.returncode == 0 and "1 empty skipped" in proc.stdout
    # uint32 holds the big vocabulary.
    proc = run_ingest(
        [
            str(tmp_path / "other.jsonl"),
            str(tmp_path / "big"),
            "--tokenizer",
            str(big),
            "--text-field",
            "body",
        ]
    )
    assert proc.returncode == 0, proc.stderr
    assert hpstore.open(str(tmp_path / "big")).split("train").fields["tokens"].dtype == "uint32"


def test_windows_stream_from_s3_by_byte_ranges(s3_server: S3Server, byte_store: Path) -> None:
    bucket = s3_server.create_bucket()
    url = f"s3://{bucket}/tokens"
    proc = run_ingest(
        [str(TEXT), url, "--tokenizer", "byte", "--chunk-bytes", "4K", "--shard-bytes", "64K"],
        env=client_env(s3_server.endpoint),
    )
    assert proc.returncode == 0, proc.stderr
    remote = (
        hpstore.open(url, storage_options=s3_server.storage_options()).split("train").windows("tokens", 128)
    )
    local = hpstore.open(str(byte_store)).split("train").windows("tokens", 128)
    got = {}
    loader = hpstore.Loader(remote, 16, seed=2, num_workers=2, with_index=True, cache_bytes=0)
    loader.set_epoch(1)
    for batch in loader:
        for i, row in zip(batch["index"].tolist(), batch["tokens"].numpy(), strict=True):
            got[i] = row
    assert sorted(got) == list(range(len(local)))
    want = local.read(np.arange(len(local)), seed=2, epoch=1)["tokens"]
    assert np.array_equal(np.stack([got[i] for i in range(len(local))]), want)
    stats = loader.stats
    shard_bytes = sum(o.size for k, o in remote.store.manifest.objects.items() if "/train/tokens/c" in k)
    # Byte-range reads of single chunks: no shard is fetched whole for one window.
    assert stats["read_requests"] > len(remote.store.manifest.objects)
    assert stats["bytes_read"] < 3 * shard_bytes


def test_packed_windows_carry_document_ids_that_match_the_offsets(tmp_path: Path) -> None:
    src = tmp_path / "paragraphs.jsonl"  # real documents of 1-2000 bytes: windows pack several
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in paragraphs()))
    assert ingest(src, tmp_path / "store", "--tokenizer", "byte", "--chunk-bytes", "4K") == 0
    store = hpstore.open(str(tmp_path / "store"))
    ds = store.split("train")
    docs = store.split("train.docs")
    offsets = docs.read(np.arange(len(docs)))["offsets"]
    seq = 256
    view: TokenWindows = ds.windows("tokens", seq, respect_documents=True)
    loader = hpstore.Loader(view, 32, seed=3, with_index=True, num_workers=1)
    several = 0
    for batch in loader:
        idx = batch["index"].numpy()
        ids = batch["doc_ids"].numpy()
        assert ids.dtype == np.int32 and ids.shape == (len(idx), seq + 1)
        starts, lengths = view.starts(idx), view.lengths(idx)
        assert lengths is not None
        for k in range(len(idx)):
            s, n = int(starts[k]), int(lengths[k])
            # The document of each real token, counted from the window's first one.
            want = np.searchsorted(offsets, np.arange(s, s + n), side="right") - 1
            assert np.array_equal(ids[k, :n], want - want[0])
            assert (ids[k, n:] == want[-1] - want[0] + 1).all()  # padding: one segment more
            several += int(want[-1] > want[0])
        # The same rows by index (``view[idx]``) as from the loader.
        assert np.array_equal(view[idx]["doc_ids"], ids)
    assert several > 10  # many windows pack two or more documents
