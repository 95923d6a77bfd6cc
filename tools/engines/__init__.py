"""Engines that write a store's partitions in parallel beyond one process (``tools.ingest --engine``).

An engine takes the splits, a ``StoreWriter`` (which names the new generation and owns the commit)
and a progress sink; it writes every partition under that generation and hands the writer each
split's manifest entry. It never commits: ``tools.ingest`` does, through the writer, once.
"""
