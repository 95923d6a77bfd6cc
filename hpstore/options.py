"""Command-line values every hpstore command shares: byte sizes and fsspec storage options.

The parse functions raise ``OptionError``, which is both an ``InputError`` (for callers) and
argparse's ``ArgumentTypeError`` (so a ``type=`` function's message reaches the user verbatim).
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from typing import Any, NoReturn

from hpstore.errors import InputError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class OptionError(InputError, argparse.ArgumentTypeError):
    """A command-line value that does not parse."""


def parse_size(text: str) -> int:
    """``"4096"``, ``"64M"``, ``"1MiB"``, ``"1.5G"`` -> bytes (K/M/G/T are powers of 1024)."""
    m = _SIZE.match(text)
    if not m:
        raise OptionError(f"not a size: {text!r} (examples: 4096, 64M, 1MiB, 1.5G)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_pair(text: str) -> tuple[str, str]:
    """``NAME=VALUE`` -> ``(NAME, VALUE)``."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise OptionError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def parse_storage_option(text: str) -> tuple[str, Any]:
    """``K=V``; V is read as JSON when it parses (numbers, true/false, objects), else kept as text."""
    key, value = parse_pair(text)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def parse_storage_options(pairs: Sequence[str]) -> dict[str, Any]:
    """``["anon=true", "endpoint_url=http://h:9000"]`` -> fsspec keyword arguments."""
    return dict(parse_storage_option(p) for p in pairs)


class UsageError(InputError):
    """A malformed command line: commands exit with status 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one line (raised as ``UsageError``, for the
    command to print like every other bad-input error) instead of a usage block."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see --help)")
