"""Reading and writing the trainer's checkpoint layout for offline conversion.

A checkpoint directory (``<output_dir>/checkpoints/<tag>/``, see
:mod:`monarch_megatron.checkpointing`) holds, per tensor-parallel rank ``XX``, DeepSpeed's
``mp_rank_XX_model_states.pt`` (``"module"``: that rank's state dict, plus DeepSpeed's bookkeeping
and our ``run_state`` client state), ZeRO-1 optimizer shards ``zero_pp_rank_*_optim_states.pt`` and
``run_state.json``. Conversion reads only the model files and ``run_state.json``; it never opens
the input for writing.

A converted checkpoint has the same layout without optimizer shards: DeepSpeed loads it with
``load_module_only=True`` (``CheckpointManager.load(engine, tag, load_optimizer=False)``), and
``launcher/evaluate.py`` reads ``"module"`` directly. Training from it starts fresh optimizer
moments (a Monarch factor's moments have no dense counterpart, and vice versa).

The output is written atomically: everything goes to a hidden staging directory next to the
output (its name starts with ``.``, so the trainer's checkpoint scan ignores it), which is renamed
into place only when complete.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from typing import Any

from ..checkpointing.errors import CheckpointFormatError
from ..checkpointing.run_state import RunState
from ..checkpointing.shards import read_model_shards, write_model_shards
from ..checkpointing.store import RUN_STATE, fsync_dir, load_run_state, replace_dir, write_run_state


class ConversionError(CheckpointFormatError):
    """A problem with the input, the output path or the requested conversion (CLI exit code 2)."""


@dataclass
class SourceCheckpoint:
    """A checkpoint read from disk.

    Attributes:
        path: the checkpoint directory.
        run_state: its ``run_state.json``.
        modules: per TP rank, the ``"module"`` state dict (tensors on CPU).
        meta: per TP rank, the rest of the DeepSpeed model file (bookkeeping, client state).
    """

    path: str
    run_state: RunState
    modules: list[dict[str, Any]]
    meta: list[dict[str, Any]]

    @property
    def tp_size(self) -> int:
        """TP size of the run that wrote it (read_checkpoint checks one model file per rank)."""
        return self.run_state.tensor_model_parallel_size


def read_checkpoint(path: str) -> SourceCheckpoint:
    """Read ``run_state.json`` and every TP rank's model file of the checkpoint at ``path``.

    Raises:
        ConversionError: the directory, ``run_state.json`` or a model file is missing, unreadable,
            incomplete or inconsistent with the others.
    """
    if not os.path.isdir(path):
        raise ConversionError(f"input {path} is not a directory (expected a checkpoint directory .../checkpoints/<tag>)")
    state_path = os.path.join(path, RUN_STATE)
    if not os.path.isfile(state_path):
        raise ConversionError(f"input {path} is not a checkpoint: {RUN_STATE} is missing")
    try:
        run_state = load_run_state(path)
    except CheckpointFormatError as err:
        raise ConversionError(str(err)) from None
    if not run_state.complete:
        raise ConversionError(f"{state_path} does not mark a complete checkpoint ('complete': true is missing)")
    for key in ("model", "tensor_model_parallel_size", "phase_kind"):
        if getattr(run_state, key) is None:
            raise ConversionError(f"{state_path} has no '{key}' entry")
    try:
        modules, meta = read_model_shards(path, run_state.tensor_model_parallel_size)
    except CheckpointFormatError as err:
        raise ConversionError(str(err)) from None
    return SourceCheckpoint(path=path, run_state=run_state, modules=modules, meta=meta)


def check_output_path(output: str, inputs: str, force: bool) -> str:
    """Absolute output path, after refusing to overwrite (without ``force``) or to touch the input."""
    out, src = os.path.realpath(output), os.path.realpath(inputs)
    if out == src or out.startswith(src + os.sep) or src.startswith(out + os.sep):
        raise ConversionError(f"output {output} overlaps the input {inputs}; the input is never modified")
    if os.path.lexists(out) and not force:
        raise ConversionError(f"output {output} exists; pass --force to replace it")
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        raise ConversionError(f"the parent directory of the output, {parent}, does not exist")
    return out


def write_checkpoint(
    output: str,
    modules: list[dict[str, Any]],
    source_meta: dict[str, Any],
    run_state: RunState,
    force: bool,
) -> None:
    """Write a module-only checkpoint atomically (staging directory, then rename).

    Args:
        output: the checkpoint directory to create (its parent must exist).
        modules: per target TP rank, the state dict (contiguous tensors; they are saved as they are).
        source_meta: rank 0's DeepSpeed bookkeeping of the input; optimizer entries are dropped and
            the TP size updated.
        run_state: the new ``run_state.json`` (also stored as the DeepSpeed client state).
        force: replace an existing ``output``.
    """
    parent, name = os.path.split(os.path.abspath(output))
    stage = os.path.join(parent, f".{name}.converting-{os.getpid()}")
    shutil.rmtree(stage, ignore_errors=True)
    os.makedirs(stage)
    try:
        write_model_shards(stage, modules, source_meta, run_state)
        write_run_state(stage, run_state)
        if os.path.lexists(output) and not force:  # appeared while we were converting
            raise ConversionError(f"output {output} exists; pass --force to replace it")
        replace_dir(stage, output, os.path.join(parent, f".{name}.replaced-{os.getpid()}"))
        fsync_dir(parent)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def converted_run_state(
    source: SourceCheckpoint,
    output: str,
    monarch: dict[str, Any] | None,
    tp: int,
    provenance: dict[str, Any],
) -> RunState:
    """The output's ``run_state.json``: the input's, with the new structure, TP size and provenance.

    ``step``, ``phase`` and ``phase_index`` are kept, so ``launcher/evaluate.py`` validates a
    conversion on the same data as its source.
    """
    src = source.run_state
    return src.replace(
        phase_kind="dense" if monarch is None else "monarch",
        monarch=monarch,
        tensor_model_parallel_size=tp,
        tag=os.path.basename(os.path.abspath(output)),
        complete=True,
        saved_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
        optimizer_state=None,
        files=None,
        converted_from={
            "path": os.path.abspath(source.path),
            "tag": src.tag,
            "phase_kind": src.phase_kind,
            "monarch": src.monarch,
            "tensor_model_parallel_size": source.tp_size,
            **provenance,
        },
    )
