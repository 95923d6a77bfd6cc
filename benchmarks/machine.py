"""A description of the machine a benchmark ran on: CPU, cores, RAM, the data directory's disk and
filesystem, library versions and the git commit. Every field is best effort: a value that cannot be
found is ``None``, never an exception, because a report without a disk model is still a report."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.cache import mount_of

LIBRARIES = (
    "hpstore",
    "numpy",
    "zarr",
    "numcodecs",
    "pyarrow",
    "torch",
    "fsspec",
    "s3fs",
    "google-crc32c",
    "matplotlib",
)


def describe(data_dir: Path) -> dict[str, Any]:
    """Everything a reader needs to compare two benchmark reports."""
    return {
        "time": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "cpu": cpu(),
        "memory_bytes": memory_bytes(),
        "gpu": gpu(),
        "disk": disk(data_dir),
        "libraries": libraries(),
        "git": git(Path(__file__).resolve().parent.parent),
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ},
    }


def cpu() -> dict[str, Any]:
    info = _cpuinfo()
    usable: int | None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    return {
        "model": info.get("model name") or platform.processor() or None,
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "physical_cores": _physical_cores(),
        "mhz": _float(info.get("cpu MHz")),
        "flags_avx2": "avx2" in info.get("flags", "").split(),
    }


def _cpuinfo() -> dict[str, str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in out:
            out[key.strip()] = value.strip()
    return out


def _physical_cores() -> int | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    cores = set()
    phys = core = None
    for line in [*text.splitlines(), ""]:
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            phys = value.strip()
        elif key == "core id":
            core = value.strip()
        elif not line.strip():
            if core is not None:
                cores.add((phys, core))
            phys = core = None
    return len(cores) or None


def memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def gpu() -> str | None:
    """GPU names from ``nvidia-smi`` (importing torch here would cost seconds), else torch if loaded."""
    try:
        r = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if r.returncode == 0 and r.stdout.strip():
            return ", ".join(line.strip() for line in r.stdout.splitlines() if line.strip())
    except (OSError, subprocess.TimeoutExpired):
        pass
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        return str(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else None
    except Exception:  # a broken driver must not break a report
        return None


def disk(data_dir: Path) -> dict[str, Any]:
    """The filesystem and block device under ``data_dir`` (created if missing)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    mount = mount_of(data_dir)
    out: dict[str, Any] = {"path": str(data_dir.resolve())}
    if mount:
        dev, fstype, point, opts = mount
        out.update(device=dev, filesystem=fstype, mount_point=point, mount_options=opts)
        out.update(_block_device(dev))
    try:
        st = os.statvfs(data_dir)
        out["free_bytes"] = st.f_bavail * st.f_frsize
        out["size_bytes"] = st.f_blocks * st.f_frsize
    except OSError:
        pass
    return out


def _block_device(dev: str) -> dict[str, Any]:
    """Model, rotational flag and scheduler from /sys/block, for /dev/<name> devices."""
    if not dev.startswith("/dev/"):
        return {}
    name = Path(os.path.realpath(dev)).name
    base = Path("/sys/class/block", name)
    if (base / "partition").exists():
        base = base.resolve().parent  # the whole disk holds the queue settings
    queue = base / "queue"
    return {
        "block_device": base.name,
        "model": _read(base / "device" / "model"),
        "rotational": _read(queue / "rotational") == "1" if (queue / "rotational").exists() else None,
        "scheduler": _read(queue / "scheduler"),
        "logical_block_bytes": _int(_read(queue / "logical_block_size")),
        "read_ahead_kb": _int(_read(queue / "read_ahead_kb")),
    }


def libraries() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git(repo: Path) -> dict[str, Any]:
    def run(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    commit = run("rev-parse", "HEAD")
    status = run("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def summary(desc: dict[str, Any]) -> str:
    """One line for the top of the terminal table."""
    c, d = desc.get("cpu") or {}, desc.get("disk") or {}
    mem = desc.get("memory_bytes")
    mem_s = f"{mem / 2**30:.0f} GiB RAM" if mem else "RAM unknown"
    disk_s = " ".join(str(x) for x in (d.get("filesystem"), d.get("model") or d.get("block_device")) if x)
    commit = ((desc.get("git") or {}).get("commit") or "no git")[:10]
    gpu_s = f", {desc['gpu']}" if desc.get("gpu") else ""
    return (
        f"{c.get('model') or 'unknown CPU'}, {c.get('usable_cores')} cores, {mem_s}{gpu_s}, "
        f"data on {disk_s or 'unknown disk'}, commit {commit}"
    )


def _read(p: Path) -> str | None:
    try:
        return p.read_text().strip()
    except OSError:
        return None


def _int(s: str | None) -> int | None:
    try:
        return int(s) if s is not None else None
    except ValueError:
        return None


def _float(s: str | None) -> float | None:
    try:
        return float(s) if s is not None else None
    except ValueError:
        return None
