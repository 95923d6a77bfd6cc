"""The benchmark suite's own logic: statistics and ratios, the JSON document, plots, page-cache
dropping, the limit primitives, module selection and failure isolation, and one real
``python -m benchmarks --quick`` run. No speed is asserted here: speed lives in the benchmarks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from benchmarks import cache, limits, machine, plots, report, suite, sweep
from benchmarks.common import BenchConfig, Figure
from benchmarks.report import ModuleResult

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fig(name: str, values: list[float], unit: str = "MB/s", **kw: object) -> Figure:
    return Figure(bench="t", name=name, unit=unit, values=values, **kw)  # type: ignore[arg-type]


# -- statistics and ratios ------------------------------------------------------------------------


def test_median_spread_and_baseline_ratio() -> None:
    f = fig("x", [3.0, 1.0, 2.0], baseline="naive", baseline_values=[4.0, 1.0, 0.5])
    assert f.median == 2.0
    assert f.ratio == 2.0  # 2.0 ÷ median(4, 1, 0.5)
    d = f.to_dict()
    assert (d["median"], d["min"], d["max"], d["ratio"]) == (2.0, 1.0, 3.0, 2.0)
    assert fig("y", [1.0]).ratio is None
    assert fig("z", [1.0], baseline="b", baseline_values=[0.0]).ratio is None


def test_limit_ratio_needs_the_limit_measured_and_the_same_unit() -> None:
    disk = fig("disk", [900.0, 1000.0, 1100.0], extra={"limit_key": "disk_seq_read"})
    later = fig("disk again", [1.0], extra={"limit_key": "disk_seq_read"})
    idx = report.limit_index([disk, later])
    assert idx == {"disk_seq_read": disk}  # the first measurement of a key is the limit
    loader = fig("loader", [700.0, 800.0], extra={"limit": "disk_seq_read"})
    key, ratio = report.limit_ratio(loader, idx) or ("", None)
    assert key == "disk_seq_read" and ratio == pytest.approx(0.75)
    samples = fig("loader samples", [5.0], unit="samples/s", extra={"limit": "disk_seq_read"})
    assert report.limit_ratio(samples, idx) == ("disk_seq_read", None)
    assert report.limit_ratio(fig("n", [1.0], extra={"limit": "mem_copy"}), idx) == ("mem_copy", None)
    assert report.limit_ratio(fig("plain", [1.0]), idx) is None


def test_check_figure_rejects_what_would_break_the_report() -> None:
    assert report.check_figure(fig("ok", [1.0])).name == "ok"
    with pytest.raises(ValueError, match="no finite values"):
        report.check_figure(fig("empty", []))
    with pytest.raises(ValueError, match="no finite values"):
        report.check_figure(fig("nan", [float("nan")]))
    with pytest.raises(TypeError, match="expected Figure"):
        report.check_figure({"name": "dict"})


def results_fixture() -> list[ModuleResult]:
    lim = fig("disk seq read", [1000.0, 900.0, 1100.0], extra={"limit_key": "disk_seq_read"})
    lo = fig(
        "loader cold",
        [600.0, 800.0, 700.0],
        baseline="naive",
        baseline_values=[100.0, 140.0, 120.0],
        target="≥ 70% of disk",
        extra={"limit": "disk_seq_read", "note": "page cache dropped with fadvise"},
    )
    return [
        ModuleResult(name="limits", module="benchmarks.limits", status=report.OK, seconds=1.0, figures=[lim]),
        ModuleResult(
            name="loader",
            module="benchmarks.loader",
            status=report.OK,
            seconds=40.0,
            figures=[lo],
            budget_s=30.0,
        ),
        ModuleResult(
            name="boom", module="x.boom", status=report.FAILED, seconds=0.5, error="ValueError: deliberate"
        ),
    ]


def test_table_shows_spread_ratios_notes_and_failures() -> None:
    text = report.table(results_fixture(), "a machine")
    assert "machine: a machine" in text
    row = next(line for line in text.splitlines() if "loader cold" in line and "MB/s" in line)
    assert "700" in row and "[600–800]" in row
    assert "5.83× naive" in row  # 700 ÷ 120
    assert "70% of disk_seq_read" in row  # 700 ÷ 1000
    assert "target ≥ 70% of disk" in row
    assert "note (loader cold): page cache dropped with fadvise" in text
    assert "over its 30 s budget" in text
    assert "over the --quick budget of 30 s per module: loader (40 s)" in text
    assert "boom: FAILED after 0.5 s: ValueError: deliberate" in text
    assert "2 of 3 benchmarks ran" in text and "FAILED: boom" in text


def test_json_document_keeps_raw_values_ratios_and_round_trips() -> None:
    doc = report.document(
        results_fixture(),
        machine={"cpu": {"model": "x"}},
        config={"quick": True},
        started="2026-01-01T00:00:00+00:00",
        seconds=41.5,
        plots=["limits.png"],
        exit_status=1,
    )
    doc = json.loads(json.dumps(doc, default=report.to_jsonable))
    assert doc["schema"] == report.SCHEMA and doc["exit_status"] == 1
    assert [m["status"] for m in doc["modules"]] == ["ok", "ok", "failed"]
    assert doc["modules"][2]["error"] == "ValueError: deliberate"
    lo = next(f for f in doc["figures"] if f["name"] == "loader cold")
    assert lo["values"] == [600.0, 800.0, 700.0] and lo["baseline_values"] == [100.0, 140.0, 120.0]
    assert lo["median"] == 700.0 and lo["spread"] == [600.0, 800.0] and lo["module"] == "loader"
    assert lo["limit"] == "disk_seq_read" and lo["limit_value"] == 1000.0
    assert lo["limit_ratio"] == pytest.approx(0.7)
    back = report.figure_from_dict(lo)
    assert back == results_fixture()[1].figures[0]


def test_to_jsonable_handles_what_modules_put_in_extra(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    report.write_json(out, {"a": np.float32(1.5), "b": np.arange(3), "c": tmp_path, "d": (1, 2)})
    assert json.loads(out.read_text()) == {"a": 1.5, "b": [0, 1, 2], "c": str(tmp_path), "d": [1, 2]}
    assert not list(tmp_path.glob("*.tmp"))


# -- plots ----------------------------------------------------------------------------------------


def plot_figures() -> list[Figure]:
    figs = []
    for cb in (1 << 16, 1 << 18, 1 << 20):
        for unit in ("MB/s", "samples/s"):
            figs.append(
                fig(
                    f"chunk {cb} {unit}",
                    [cb / 1e4, cb / 9e3],
                    unit=unit,
                    extra={"plot": "chunk_size", "x": cb, "series": "cold"},
                )
            )
    figs += [fig(f"depth {d}", [100.0 * d], extra={"plot": "prefetch", "x": d}) for d in (1, 4, 16)]
    figs += [fig(f"hit {c}", [c * 100 + 1], unit="%", extra={"plot": "cache", "x": c}) for c in (0.25, 0.5)]
    figs += [
        fig(f"wait {e}", [0.1 / e], unit="fraction", extra={"plot": "data_wait", "x": e}) for e in (1, 2, 3)
    ]
    figs.append(fig("disk", [1000.0, 1200.0], extra={"limit_key": "disk_seq_read"}))
    # Not plotted: an unknown plot name, a missing x, a non-numeric x.
    figs.append(fig("odd", [1.0], extra={"plot": "nonsense", "x": 1}))
    figs.append(fig("no x", [1.0], extra={"plot": "prefetch"}))
    figs.append(fig("str x", [1.0], extra={"plot": "prefetch", "x": "big"}))
    return figs


def test_plots_group_by_plot_unit_and_series() -> None:
    groups = plots.grouped(plot_figures())
    assert sorted(groups) == ["cache", "chunk_size", "data_wait", "prefetch"]
    assert len(groups["prefetch"]) == 3  # the three malformed figures are skipped
    by_unit = plots.series(groups["chunk_size"])
    assert sorted(by_unit) == ["MB/s", "samples/s"]
    assert [f.extra["x"] for f in by_unit["MB/s"]["cold"]] == [1 << 16, 1 << 18, 1 << 20]


def test_plots_are_written_as_png(tmp_path: Path) -> None:
    written = plots.write_plots(plot_figures(), tmp_path)
    expected = {spec.file for spec in plots.PLOTS.values()} | {plots.LIMITS_FILE}
    assert set(written) == expected
    for name in written:
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
    assert plots.write_plots([fig("no plot data", [1.0])], tmp_path) == []


# -- selection ------------------------------------------------------------------------------------


def test_select_puts_limits_first_and_validates_names() -> None:
    assert suite.select(["loader"], sweep=False, limits=True) == ("benchmarks.limits", "benchmarks.loader")
    assert suite.select(["loader"], sweep=False, limits=False) == ("benchmarks.loader",)
    assert suite.select(["loader", "limits"], sweep=False, limits=True) == (
        "benchmarks.loader",
        "benchmarks.limits",
    )
    assert suite.select(None, sweep=True, limits=False) == ("benchmarks.sweep",)
    everything = suite.select(None, sweep=False, limits=True)
    assert everything[: len(suite.ORDER)] == tuple(f"benchmarks.{n}" for n in suite.ORDER)
    assert "benchmarks.sweep" not in everything  # opt-in only
    assert not {f"benchmarks.{n}" for n in suite.INFRASTRUCTURE} & set(everything)
    assert suite.select(["pkg.mod"], sweep=False, limits=False) == ("pkg.mod",)
    with pytest.raises(ValueError, match="unknown benchmark 'lodaer'"):
        suite.select(["lodaer"], sweep=False, limits=True)


def test_unknown_name_is_a_one_line_usage_error() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--only", "lodaer"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("python -m benchmarks: unknown benchmark 'lodaer'")
    assert "Traceback" not in r.stderr


# -- failure isolation (real child processes) -------------------------------------------------------

FAKE_MODULES = {
    "__init__.py": "",
    "good.py": """
        from benchmarks.common import Figure

        def run(cfg, progress):
            progress("measuring")
            out = []
            for cb in (1 << 18, 1 << 20):
                out.append(Figure(bench="good", name=f"read chunk {cb}", unit="MB/s", values=[500.0, 600.0, 550.0][: cfg.repeats],
                                  extra={"plot": "chunk_size", "x": cb, "series": "fake", "limit": "disk_seq_read"}))
            for d in (1, 4):
                out.append(Figure(bench="good", name=f"depth {d}", unit="MB/s", values=[10.0 * d], extra={"plot": "prefetch", "x": d}))
            for c in (0.25, 0.5):
                out.append(Figure(bench="good", name=f"hit {c}", unit="%", values=[100 * c], extra={"plot": "cache", "x": c}))
            for e in (1, 2):
                out.append(Figure(bench="good", name=f"wait {e}", unit="fraction", values=[0.05 / e],
                                  baseline="in-memory", baseline_values=[0.01], extra={"plot": "data_wait", "x": e}))
            return out
    """,
    "boom.py": """
        def run(cfg, progress):
            progress("about to fail")
            raise ValueError("deliberate failure\\nsecond line")
    """,
    "crash.py": """
        import os

        def run(cfg, progress):
            progress("dying hard")
            os._exit(3)
    """,
    "hang.py": """
        import time

        def run(cfg, progress):
            progress("hanging")
            time.sleep(600)
    """,
    "norun.py": "X = 1\n",
}


@pytest.fixture
def fakes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    pkg = tmp_path / "fakebench"
    pkg.mkdir()
    for name, src in FAKE_MODULES.items():
        (pkg / name).write_text(textwrap.dedent(src))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), str(REPO)]))
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def suite_config(tmp_path: Path, modules: tuple[str, ...], timeout: float = 60.0) -> suite.SuiteConfig:
    bench = BenchConfig(quick=True, data_dir=tmp_path / "data", out_dir=tmp_path / "out", repeats=1)
    return suite.SuiteConfig(bench=bench, modules=modules, timeout_s=timeout)


def test_each_way_a_module_can_fail_is_reported_in_one_line(fakes: Path) -> None:
    console = report.Console(open(os.devnull, "w"))  # noqa: SIM115
    cfg = suite_config(fakes, ())
    errors = {
        name: suite.run_module(f"fakebench.{name}", cfg, console)
        for name in ("boom", "crash", "norun", "missing")
    }
    assert all(r.status == report.FAILED and "\n" not in (r.error or "") for r in errors.values())
    assert errors["boom"].error == "ValueError: deliberate failure second line"
    assert "raise ValueError" in (errors["boom"].traceback or "")
    assert errors["crash"].error == "exited with status 3 without a result: dying hard"
    assert errors["norun"].error == "TypeError: fakebench.norun has no run(cfg, progress) function"
    assert errors["missing"].error == "module fakebench.missing not found"
    hang = suite.run_module("fakebench.hang", suite_config(fakes, (), timeout=3), console)
    assert hang.status == report.FAILED and hang.error == "timed out after 3 s"


def test_quick_suite_end_to_end_writes_table_json_and_plots(fakes: Path) -> None:
    """The real command on a tiny data dir: limits measured, the failing modules isolated."""
    out, data = fakes / "out", fakes / "data"
    cmd = [sys.executable, "-m", "benchmarks", "--quick", "--data-dir", str(data), "--out", str(out)]
    cmd += ["--only", "limits", "fakebench.good", "fakebench.boom", "fakebench.crash"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr  # modules failed, so the suite says so at the end
    assert (
        "limits: starting" in r.stderr and "fakebench.good: measuring" in r.stderr
    )  # progress while running
    table = (out / "table.txt").read_text()
    assert table.strip() in r.stdout
    assert "disk seq read, O_DIRECT 1 MiB ×16" in table or "buffered (O_DIRECT refused)" in table
    assert "fakebench.boom: FAILED" in table and "ValueError: deliberate failure" in table
    assert "fakebench.crash: FAILED" in table and "FAILED: fakebench.boom, fakebench.crash" in table
    assert "of disk_seq_read" in table  # ratio to the limit measured in this run
    doc = json.loads((out / "results.json").read_text())
    assert doc["schema"] == report.SCHEMA and doc["exit_status"] == 1
    assert {m["name"]: m["status"] for m in doc["modules"]} == {
        "limits": "ok",
        "fakebench.good": "ok",
        "fakebench.boom": "failed",
        "fakebench.crash": "failed",
    }
    assert doc["machine"]["cpu"]["usable_cores"] >= 1 and doc["machine"]["disk"]["filesystem"]
    keys = {f["extra"].get("limit_key") for f in doc["figures"] if f["module"] == "limits"}
    assert keys == set(limits.KEYS)
    chunk = next(f for f in doc["figures"] if f["name"] == "read chunk 262144")
    disk = next(f for f in doc["figures"] if f["extra"].get("limit_key") == "disk_seq_read")
    assert chunk["limit_ratio"] == pytest.approx(500.0 / disk["median"])
    assert set(doc["plots"]) == {s.file for s in plots.PLOTS.values()} | {plots.LIMITS_FILE}
    for name in doc["plots"]:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert not (data / "limits-probe.bin").exists()  # limits clean up after themselves


# -- page cache, limits, machine --------------------------------------------------------------------


def written_file(path: Path, nbytes: int) -> Path:
    path.write_bytes(os.urandom(nbytes))
    path.read_bytes()  # now it is in the page cache
    return path


def test_fadvise_drop_evicts_a_file_or_says_why_not(tmp_path: Path) -> None:
    f = written_file(tmp_path / "a.bin", 4 << 20)
    before = cache.resident_fraction([f])
    drop = cache.drop_page_cache([tmp_path], system_wide=False)
    assert drop.method == "fadvise" and drop.files == 1 and "posix_fadvise" in drop.note
    if cache.filesystem_type(tmp_path) in cache.RAM_FILESYSTEMS:
        assert not drop.cold and "lives in RAM" in drop.note
    else:
        assert before is not None and before > 0.5
        assert drop.resident_fraction is not None and drop.resident_fraction < 0.05 and drop.cold


def test_system_wide_drop_says_which_method_ran(tmp_path: Path) -> None:
    f = written_file(tmp_path / "b.bin", 1 << 20)
    drop = cache.drop_page_cache([f])
    permitted = os.access(cache.DROP_CACHES, os.W_OK)
    assert drop.method == ("drop_caches" if permitted else "fadvise")
    assert ("drop_caches" in drop.note) == permitted


def test_read_files_reads_every_byte_including_unaligned_tails(tmp_path: Path) -> None:
    a = written_file(tmp_path / "a.bin", (3 << 20) + 123)  # a tail O_DIRECT must read short
    (tmp_path / "sub").mkdir()
    b = written_file(tmp_path / "sub" / "b.bin", 5000)
    t = limits.read_files([tmp_path], block=1 << 20, threads=3)
    assert t.nbytes == a.stat().st_size + b.stat().st_size
    if not t.direct:
        assert "O_DIRECT refused" in t.note
    buffered = limits.read_files([a], direct=False)
    assert buffered.nbytes == a.stat().st_size and not buffered.direct
    assert "buffered reads after" in buffered.note
    with pytest.raises(ValueError, match="no files"):
        limits.read_files([tmp_path / "nothing"])


def test_write_random_read_and_copy_primitives(tmp_path: Path) -> None:
    p = tmp_path / "probe.bin"
    w = limits.write_file(p, 4 << 20, block=1 << 20)
    assert w.nbytes == 4 << 20 and p.stat().st_size == 4 << 20 and w.mb_s > 0
    r = limits.random_read(p, block=64 << 10, threads=2, seconds=0.05)
    assert r.nbytes > 0 and r.nbytes % (64 << 10) == 0
    assert limits.memory_copy(1 << 20).nbytes == 1 << 20


def test_machine_description_has_what_a_comparison_needs(tmp_path: Path) -> None:
    d = machine.describe(tmp_path / "data")
    assert d["cpu"]["logical_cores"] >= 1 and d["memory_bytes"] > 0
    assert d["disk"]["path"] == str((tmp_path / "data").resolve()) and d["disk"]["filesystem"]
    assert d["libraries"]["numpy"] == np.__version__
    if (REPO / ".git").exists():
        assert len(d["git"]["commit"] or "") == 40 and isinstance(d["git"]["dirty"], bool)
    else:  # a copy of the tree without its history
        assert d["git"] == {"commit": None, "dirty": None}
    assert "cores" in machine.summary(d)
    json.dumps(d)


# -- sweep ----------------------------------------------------------------------------------------


def test_decide_keeps_the_current_default_within_noise() -> None:
    assert sweep.decide({"1 MiB": [100.0], "4 MiB": [103.0]}, "1 MiB") == ("1 MiB", "keep")
    chosen, verdict = sweep.decide({"1 MiB": [100.0, 90.0, 110.0], "4 MiB": [130.0]}, "1 MiB")
    assert chosen == "4 MiB" and verdict.startswith("change 1 MiB -> 4 MiB (1.30×)")
    chosen, verdict = sweep.decide({"1 MiB": [100.0, 60.0, 140.0], "4 MiB": [130.0, 120.0, 150.0]}, "1 MiB")
    assert chosen == "1 MiB" and verdict.startswith("keep (4 MiB")  # spreads overlap: noise, not a win
    assert sweep.decide({"1": [1.0], "2": [2.0]}, None) == ("2", "no default in the code yet")
    assert sweep.decide({"1": [1.0], "2": [2.0]}, "8") == ("2", "current 8 not in the sweep grid")


def test_tiny_sweep_measures_every_knob_and_names_a_default_for_each(tmp_path: Path) -> None:
    grid = sweep.Grid(
        samples=3000,
        chunk_bytes=(16 << 10, 64 << 10),
        shard_bytes=(64 << 10, 64 << 20),
        codecs=(sweep.NONE, sweep.ZSTD1),
        workers=(1, 2),
        threads=(1, 2),
        depths=(1, 4),
        start_threads=2,
        start_depth=2,
    )
    cfg = BenchConfig(quick=True, data_dir=tmp_path, out_dir=tmp_path, repeats=1)
    sw = sweep.Sweep(cfg, lambda msg: None, grid)
    seen: list[tuple[str, int]] = []

    def measure(label: str, i: int) -> float:
        seen.append((label, i))
        return float(i)

    got = sw.interleaved(["a", "b", "c"], measure, repeats=3)
    assert [k for k, _ in seen] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # rotated rounds
    assert got == {"a": [0.0, 1.0, 2.0], "b": [0.0, 1.0, 2.0], "c": [0.0, 1.0, 2.0]}
    figs = sw.run()
    params = [f.extra["param"] for f in figs]
    assert params.count("chunk_bytes") == 3  # the grid's two plus the 1 MiB in the code now
    depths = sw.with_current("prefetch_depth", grid.depths)
    assert params.count("prefetch_depth") == len(depths) >= 2
    if "prefetch_depth" in sw.current:  # the loader exists: its default is measured too
        assert sw.current["prefetch_depth"] in depths
    defaults = report.defaults_rows(figs)
    assert [d["param"] for d in defaults] == [
        "chunk_bytes",
        "shard_bytes",
        "codec",
        "workers",
        "threads",
        "prefetch_depth",
    ]
    codec = next(d for d in defaults if d["param"] == "codec")
    assert codec["current"] == "zstd-1" and codec["where"] == "hpstore.format.writer.Layout.codec"
    zstd = next(f for f in figs if f.name.endswith("codec zstd-1"))
    assert zstd.ratio == 1.0 and zstd.extra["ratio_stored"] < 1.0  # compresses, and is its own baseline
    assert plots.grouped(figs).keys() == {"chunk_size", "prefetch"}
    assert not (tmp_path / "sweep").exists()
