"""Shared pytest configuration. Fixtures that belong to one area live in that area's test modules
or in ``tests/support/``."""

from __future__ import annotations

import os

# Tests run on shared 2-core machines: keep numeric libraries from oversubscribing.
os.environ.setdefault("OMP_NUM_THREADS", "1")
