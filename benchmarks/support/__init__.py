"""What the benchmarks need besides hpstore: a moto S3 server and a latency/fault proxy on loopback.

Kept inside the ``benchmarks`` package (not in ``tests/``) so that ``python -m benchmarks`` runs from
an installed package, anywhere; the tests import the same code through ``tests.support``.
"""
