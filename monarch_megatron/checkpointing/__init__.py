"""The checkpoint format, between ``models/`` and ``training/``: tags and the scan for resume points
(:mod:`.store`), atomic staging and integrity records, the typed ``run_state.json``
(:mod:`.run_state`), the one reader / writer of model and optimizer shards (:mod:`.shards`),
tensor-parallel merge / split (:mod:`.tp`), and a checkpoint's training state resharded to another
TP x DP layout (:mod:`.reshard`). DeepSpeed's save / load calls live in ``training/``.
"""

from .errors import CheckpointFormatError
from .run_state import VERSION, RunState, RunStateError

__all__ = ["VERSION", "CheckpointFormatError", "RunState", "RunStateError"]
