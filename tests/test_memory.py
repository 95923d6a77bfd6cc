"""Allocator profiles: a process picks one (the loader's or ingest's) and keeps it."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _run(code: str, **env: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={"PATH": "", **env}
    )
    return out.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_a_process_keeps_the_profile_it_chose_first() -> None:
    code = (
        "from hpstore.memory import bound_heap, keep_freed_memory as keep; "
        "print(bound_heap(), bound_heap(), keep())"
    )
    assert _run(code) == "True True False"
    code = "from hpstore.memory import bound_heap, keep_freed_memory as keep; print(keep(), bound_heap())"
    assert _run(code) == "True False"


def test_the_environment_turns_tuning_off() -> None:
    code = "from hpstore.memory import bound_heap; print(bound_heap())"
    assert _run(code, HPSTORE_MALLOC_TUNING="0") == "False"
    assert _run(code, MALLOC_ARENA_MAX="4") == "False"
