"""Peer libraries for the ingest benchmark, in their own virtualenv (``.bench-venv``, gitignored).

Hugging Face ``datasets`` and LitData are not hpstore dependencies, and LitData's requirements pull
``torchvision`` (whose newest release wants a newer, CUDA torch). So they go into a separate
environment built here, and only if they fit the project's pins: ``torch`` (the CPU build), numpy
and pyarrow are installed first at exactly the versions of the running environment, then each peer
is resolved with ``pip install --dry-run --report`` under those pins as constraints. A peer that
would bring another torch/numpy/pyarrow, any CUDA package or torchvision is installed without its
dependencies plus the rest of the resolved set (the forbidden ones left out) and must then import;
otherwise it is skipped with the reason. ``peer_status`` says, per peer, what was installed or why not.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
VENV = REPO / ".bench-venv"
PEERS = {"datasets": "datasets", "litdata": "litdata"}
"""Peer name -> the module it must import as."""
PINNED = ("torch", "numpy", "pyarrow")
_NEVER = re.compile(r"^(torchvision|triton|nvidia-.*|cuda-.*)$")


def python() -> Path:
    return VENV / "bin" / "python"


def _pip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(python()), "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        check=False,
    )


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if not line.startswith("WARNING: Location")]
    return lines[-1] if lines else "(no output)"


def _pins() -> dict[str, str]:
    """The running environment's versions of the pinned packages (local labels such as +cpu cut)."""
    return {name: metadata.version(name).split("+")[0] for name in PINNED}


def _importable(module: str) -> str | None:
    out = subprocess.run(
        [str(python()), "-c", f"import importlib.metadata as m, {module}; print(m.version({module!r}))"],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip() if out.returncode == 0 else None


def ensure() -> dict[str, str]:
    """Build or reuse ``.bench-venv``; per peer ``"installed <version>"`` or why it is absent."""
    pins = _pins()
    if not python().exists():
        made = subprocess.run([sys.executable, "-m", "venv", str(VENV)], capture_output=True, text=True)
        if made.returncode != 0:
            return dict.fromkeys(PEERS, f"no virtualenv at {VENV}: {_last_line(made.stderr)}")
    constraints = VENV / "pins.txt"
    constraints.write_text("".join(f"{n}=={v}\n" for n, v in pins.items()))
    # torch first, by exact pin, as the Makefile installs it (pip's configured index gives the CPU
    # build here); numpy and pyarrow at the project environment's versions.
    base = _pip("install", "-q", *(f"{n}=={v}" for n, v in pins.items()))
    if base.returncode != 0:
        return dict.fromkeys(PEERS, f"pinned {', '.join(PINNED)} do not install: {_last_line(base.stderr)}")
    status = {}
    for peer, module in PEERS.items():
        version = _importable(module)
        if version is None:
            version = _install(peer, module, constraints)
            if version.startswith("not installed"):
                status[peer] = version
                continue
        status[peer] = f"installed {version}"
    return status


def _install(peer: str, module: str, constraints: Path) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        dry = _pip("install", "--dry-run", "--quiet", "--report", str(report), "-c", str(constraints), peer)
        if dry.returncode != 0:
            return f"not installed: does not resolve under the project's pins ({_last_line(dry.stderr)})"
        plan = [
            (i["metadata"]["name"], i["metadata"]["version"])
            for i in json.loads(report.read_text())["install"]
        ]
    pinned = [f"{n} {v}" for n, v in plan if n.lower() in PINNED]
    if pinned:  # a constraint violated cannot happen, but never install another build of a pin
        return f"not installed: would install {', '.join(pinned)}"
    never = [f"{n} {v}" for n, v in plan if _NEVER.match(n.lower())]
    keep = [f"{n}=={v}" for n, v in plan if not _NEVER.match(n.lower())]
    args = ["install", "-q", "-c", str(constraints)]
    done = _pip(*args, "--no-deps", *keep) if never else _pip(*args, *keep)
    if done.returncode != 0:
        return f"not installed: {_last_line(done.stderr)}"
    version = _importable(module)
    if version is None:
        return f"not installed: does not import without {', '.join(never)}"
    return version + (f" (without its requirement {', '.join(never)})" if never else "")
