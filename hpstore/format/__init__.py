"""Store format v1: the manifest, Zarr shards, chunk reads, the writer and verification.

Imports storage and the shared top-level modules only. See README.md.
"""
