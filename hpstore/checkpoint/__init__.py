"""Checkpoints: training state as Zarr stores, write-behind, verified loads.

Imports storage, format and the shared top-level modules; never loading. See README.md.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hpstore.checkpoint.checkpointer import Checkpointer, CheckpointFallbackWarning, CheckpointLayout
    from hpstore.checkpoint.tree import PerRank

__all__ = ["CheckpointFallbackWarning", "CheckpointLayout", "Checkpointer", "PerRank"]


def __getattr__(name: str) -> Any:
    # The checkpointer needs torch; the plan and manifest modules of this package do not.
    if name == "PerRank":
        from hpstore.checkpoint import tree

        return tree.PerRank
    if name in __all__:
        from hpstore.checkpoint import checkpointer

        return getattr(checkpointer, name)
    raise AttributeError(f"module 'hpstore.checkpoint' has no attribute {name!r}")
