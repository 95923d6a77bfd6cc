"""Streaming: the epoch plan, caches, prefetch, batch assembly and the Loader.

Imports storage, format and the top-level dataset; never checkpoint. See README.md.
"""
