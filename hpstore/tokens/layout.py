"""What a token store holds besides its token field: the names that link it to its documents.

Kept apart from the window view so the token ingest can write a store without importing torch."""

DOCUMENTS_ATTR = "documents"
"""Token field attribute naming the split that holds its document offsets."""
OFFSETS_FIELD = "offsets"
"""Field of that split: the first token of each document, then the number of tokens (int64)."""
