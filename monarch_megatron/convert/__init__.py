"""Checkpoint and in-memory model conversion: Monarch -> dense (exact)."""

from .to_dense import dense_state_dict_from_monarch, local_dense_weight

__all__ = ["dense_state_dict_from_monarch", "local_dense_weight"]
