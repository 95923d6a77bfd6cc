"""The benchmark suite: which modules run, in which order, each isolated in its own process.

``python -m benchmarks`` runs ``limits`` first (every other figure is divided by what it measures),
then the area modules in ``ORDER``, then any other contract module found in the package. Each module
runs in a child process (``python -m benchmarks.suite --child MODULE``) so that a module that raises,
crashes, hangs past its timeout or leaks threads cannot take the suite down: it is reported as failed
with a one-line error and the suite goes on; the exit status is 1 if any module failed.

A module's progress lines stream through to the terminal as they come; its figures come back as JSON
in a result file.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import importlib.util
import json
import os
import pkgutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks import machine, plots, report
from benchmarks.common import BenchConfig, Figure
from benchmarks.report import FAILED, OK, Console, ModuleResult

PACKAGE = "benchmarks"
ORDER = ("limits", "codecs", "ingest", "loader", "remote", "checkpoint", "sharded", "trainer")
"""The default run, in order. A module listed here but not written yet is reported as failed."""
OPT_IN = ("sweep", "images", "fresh")
"""Modules that run only when asked for (``--sweep`` or ``--only``). ``images`` fetches a Debian
package of photographs on first use and takes minutes: ``--only images``. ``fresh`` repeats
first-epoch figures of ``loader`` on their own, for a quiet machine: ``--only fresh``."""
INFRASTRUCTURE = frozenset({"common", "suite", "report", "plots", "machine", "cache", "consumer", "__main__"})
QUICK_BUDGET_S = 30.0
"""What one module's ``--quick`` run may take (the suite's --quick must stay under 3 minutes)."""
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True, kw_only=True)
class SuiteConfig:
    bench: BenchConfig
    modules: tuple[str, ...]
    """Dotted module paths, in run order."""
    timeout_s: float
    plots: bool = True

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ValueError("timeout must be positive")


# -- selection --------------------------------------------------------------------------------------


def discovered() -> list[str]:
    """Contract modules present in the package that ``ORDER`` does not list (new areas join here)."""
    here = Path(__file__).resolve().parent
    names = [m.name for m in pkgutil.iter_modules([str(here)])]
    return sorted(n for n in names if n not in INFRASTRUCTURE and n not in ORDER and n not in OPT_IN)


def known() -> list[str]:
    return [*ORDER, *discovered(), *OPT_IN]


def select(only: Sequence[str] | None, *, sweep: bool, limits: bool) -> tuple[str, ...]:
    """Dotted module paths to run. Plain names are modules of this package; a dotted name is any
    importable module that follows the contract. Unknown plain names raise ``ValueError``."""
    names = list(dict.fromkeys(only)) if only else ([] if sweep else [*ORDER, *discovered()])
    if sweep and "sweep" not in names:
        names.append("sweep")
    choices = known()
    for n in names:
        if "." not in n and n not in choices:
            raise ValueError(f"unknown benchmark {n!r} (choose from: {', '.join(choices)})")
    if limits and "limits" not in names:
        names.insert(0, "limits")  # ratios to the machine's limits need them measured in this run
    return tuple(n if "." in n else f"{PACKAGE}.{n}" for n in names)


def short(module: str) -> str:
    return module.removeprefix(f"{PACKAGE}.")


# -- running one module -----------------------------------------------------------------------------


def run_module(module: str, cfg: SuiteConfig, console: Console) -> ModuleResult:
    """Run one module in a child process; never raises for anything the module does."""
    name = short(module)
    budget = QUICK_BUDGET_S if cfg.bench.quick else None
    t0 = time.perf_counter()

    def failed(error: str, tb: str | None = None) -> ModuleResult:
        took = time.perf_counter() - t0
        return ModuleResult(
            name=name, module=module, status=FAILED, seconds=took, error=error, traceback=tb, budget_s=budget
        )

    if not _importable(module):
        return failed(f"module {module} not found")
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        result_file = Path(tmp) / "result.json"
        outcome = _spawn(module, cfg, result_file, lambda line: console.line(name, line))
        result = _read_result(result_file)
    if result is None:
        return failed(outcome)
    if "error" in result:
        return failed(str(result["error"]), result.get("traceback"))
    figures = [report.figure_from_dict(d) for d in result["figures"]]
    return ModuleResult(
        name=name,
        module=module,
        status=OK,
        seconds=time.perf_counter() - t0,
        figures=figures,
        budget_s=budget,
    )


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a missing parent package
        return False


def _spawn(module: str, cfg: SuiteConfig, result_file: Path, on_line: Any) -> str:
    """Run the child; stream its output to ``on_line``; return why it ended, in one line."""
    b = cfg.bench
    cmd = [sys.executable, "-m", f"{PACKAGE}.suite", "--child", module, "--result", str(result_file)]
    cmd += ["--data-dir", str(b.data_dir), "--out", str(b.out_dir), "--repeats", str(b.repeats)]
    cmd += ["--quick"] if b.quick else []
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    # A new session, so a timeout can kill the module's own children (servers, torchrun) as well.
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    tail: deque[str] = deque(maxlen=5)

    def pump() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip().removeprefix("  .. ")
            if line:
                tail.append(line)
                on_line(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=cfg.timeout_s)
    except subprocess.TimeoutExpired:
        _kill(proc)
        return f"timed out after {cfg.timeout_s:.0f} s"
    except BaseException:  # Ctrl-C: take the module down with us, then let the caller decide
        _kill(proc)
        raise
    finally:
        reader.join(timeout=5)
    last = tail[-1] if tail else "no output"
    if code < 0:
        return f"killed by signal {signal.Signals(-code).name}: {last}"
    return f"exited with status {code} without a result: {last}"


def _kill(proc: subprocess.Popen[str]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _read_result(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and ("figures" in doc or "error" in doc) else None


# -- the child side ---------------------------------------------------------------------------------


def child_main(argv: Sequence[str]) -> int:
    """Import one module, call its ``run``, write figures (or the error) to ``--result``."""
    p = argparse.ArgumentParser(prog="benchmarks.suite --child")
    p.add_argument("--child", required=True)
    p.add_argument("--result", type=Path, required=True)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--repeats", type=int, required=True)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    try:
        cfg = BenchConfig(quick=a.quick, data_dir=a.data_dir, out_dir=a.out, repeats=a.repeats)
        mod = importlib.import_module(a.child)
        run = getattr(mod, "run", None)
        if not callable(run):
            raise TypeError(f"{a.child} has no run(cfg, progress) function")
        out = run(cfg, lambda msg: print(msg, file=sys.stderr, flush=True))
        if not isinstance(out, list):
            raise TypeError(f"run() returned {type(out).__name__}, expected a list of Figure")
        figures: list[Figure] = [report.check_figure(f) for f in out]
        doc: dict[str, Any] = {"figures": [asdict(f) for f in figures]}
        code = 0
    except Exception as exc:  # the module's failure is data for the report, not a crash of the suite
        doc, code = {"error": one_line(exc), "traceback": traceback.format_exc()}, 1
    report.write_json(a.result, doc)
    return code


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or "(no message)"
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(exc).__name__}: {text}"


# -- the whole suite --------------------------------------------------------------------------------


def run_suite(cfg: SuiteConfig, console: Console | None = None) -> int:
    """Run every selected module, print the table, write JSON and plots; return the exit status."""
    console = console or Console()
    started = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    cfg.bench.out_dir.mkdir(parents=True, exist_ok=True)
    cfg.bench.data_dir.mkdir(parents=True, exist_ok=True)
    desc = machine.describe(cfg.bench.data_dir)
    print(f"machine: {machine.summary(desc)}", file=sys.stderr, flush=True)
    results: list[ModuleResult] = []
    interrupted = False
    for module in cfg.modules:
        console.line(short(module), "starting")
        try:
            r = run_module(module, cfg, console)
        except KeyboardInterrupt:
            r = ModuleResult(
                name=short(module), module=module, status=FAILED, seconds=0.0, error="interrupted"
            )
            interrupted = True
        results.append(r)
        print(_module_lines(r, results), file=sys.stderr, flush=True)
        if interrupted:
            break
    status = 130 if interrupted else (1 if any(r.status != OK for r in results) else 0)
    written = _plots(cfg, results, console)
    text = report.table(results, machine.summary(desc))
    (cfg.bench.out_dir / "table.txt").write_text(text + "\n")
    doc = report.document(
        results,
        machine=desc,
        config={**_config_dict(cfg)},
        started=started,
        seconds=time.perf_counter() - t0,
        plots=written,
        exit_status=status,
    )
    report.write_json(cfg.bench.out_dir / "results.json", doc)
    print("\n" + text, flush=True)
    print(f"wrote {cfg.bench.out_dir / 'results.json'}, table.txt and {len(written)} plots", flush=True)
    return status


def _module_lines(r: ModuleResult, so_far: Sequence[ModuleResult]) -> str:
    limits = report.limit_index([f for x in so_far for f in x.figures])
    width = min(60, max([44, *(len(f.name) for f in r.figures)]))
    return "\n".join(report.module_block(r, limits, width))


def _plots(cfg: SuiteConfig, results: Sequence[ModuleResult], console: Console) -> list[str]:
    if not cfg.plots:
        return []
    try:
        return plots.write_plots([f for r in results for f in r.figures], cfg.bench.out_dir)
    except ImportError as exc:
        console.line("report", f"no plots: {exc} (install matplotlib)")
        return []


def _config_dict(cfg: SuiteConfig) -> dict[str, Any]:
    b = cfg.bench
    return {
        "quick": b.quick,
        "repeats": b.repeats,
        "data_dir": str(b.data_dir),
        "out_dir": str(b.out_dir),
        "modules": [short(m) for m in cfg.modules],
        "timeout_s": cfg.timeout_s,
    }


# -- command line -----------------------------------------------------------------------------------


def parse(argv: Sequence[str] | None) -> SuiteConfig:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="hpstore I/O benchmarks: machine limits, then each area, as ratios measured in one run.",
    )
    p.add_argument("--quick", action="store_true", help="small sizes, one repeat (under 3 minutes)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these (dotted names: any module)")
    p.add_argument(
        "--sweep", action="store_true", help="run the sweep that chooses the layout/loader defaults"
    )
    p.add_argument("--data-dir", type=Path, default=Path("bench-data"), help="where data is written and read")
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="where the table, JSON and plots go")
    p.add_argument("--repeats", type=int, default=None, help="repeats per figure (default 3, --quick 1)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per module (default 180, full 1800)")
    p.add_argument("--no-limits", action="store_true", help="do not measure the machine's limits first")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    a = p.parse_args(argv)
    if a.list:
        print("\n".join(f"{n}{'' if n in ORDER else ' (opt-in)' if n in OPT_IN else ''}" for n in known()))
        raise SystemExit(0)
    repeats = a.repeats if a.repeats is not None else (1 if a.quick else 3)
    timeout = a.timeout if a.timeout is not None else (180.0 if a.quick else 1800.0)
    try:
        modules = select(a.only, sweep=a.sweep, limits=not a.no_limits)
        bench = BenchConfig(quick=a.quick, data_dir=a.data_dir, out_dir=a.out, repeats=repeats)
        return SuiteConfig(bench=bench, modules=modules, timeout_s=timeout, plots=not a.no_plots)
    except ValueError as exc:
        p.exit(2, f"python -m benchmarks: {exc}\n")


def main(argv: Sequence[str] | None = None) -> int:
    return run_suite(parse(argv))


if __name__ == "__main__":
    raise SystemExit(child_main(sys.argv[1:]))
