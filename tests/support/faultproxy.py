"""The fault-injecting proxy of ``benchmarks.support.faultproxy``, under its test-side name."""

from benchmarks.support.faultproxy import CONTROL, FaultProxy, Faults

__all__ = ["CONTROL", "FaultProxy", "Faults"]
