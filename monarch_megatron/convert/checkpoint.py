"""Reading and writing the trainer's checkpoint layout for offline conversion.

A checkpoint directory (``<output_dir>/checkpoints/<tag>/``, see
:mod:`monarch_megatron.training.checkpoint`) holds, per tensor-parallel rank ``XX``, DeepSpeed's
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

import json
import os
import shutil
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from ..training.checkpoint import RUN_STATE, fsync_dir, replace_dir, write_run_state

MODEL_FILE = "mp_rank_{:02d}_model_states.pt"
# DeepSpeed bookkeeping that describes the optimizer or the data-parallel layout of the run that
# wrote the file; a converted checkpoint has no optimizer state.
_OPTIMIZER_KEYS = ("optimizer", "lr_scheduler", "data_sampler", "random_ltd")


class ConversionError(Exception):
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
    run_state: dict[str, Any]
    modules: list[dict[str, Any]]
    meta: list[dict[str, Any]]

    @property
    def tp_size(self) -> int:
        """TP size of the run that wrote it (read_checkpoint checks one model file per rank)."""
        return int(self.run_state["tensor_model_parallel_size"])


def _load_model_file(path: str) -> dict[str, Any]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated zip, bad pickle, ...: all mean "not a readable checkpoint"
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ConversionError(f"{path} is corrupt or truncated: torch.load failed ({type(err).__name__}: {first})") from None
    if not isinstance(data, dict) or not isinstance(data.get("module"), dict):
        raise ConversionError(f"{path} is not a DeepSpeed model-states file (no 'module' state dict)")
    return data


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
        with open(state_path) as f:
            run_state = json.load(f)
    except (OSError, ValueError) as err:
        raise ConversionError(f"{state_path} is not valid JSON ({err})") from None
    if not isinstance(run_state, dict) or not run_state.get("complete"):
        raise ConversionError(f"{state_path} does not mark a complete checkpoint ('complete': true is missing)")
    for key in ("model", "tensor_model_parallel_size", "phase_kind"):
        if key not in run_state:
            raise ConversionError(f"{state_path} has no '{key}' entry")
    if run_state["phase_kind"] == "monarch" and not run_state.get("monarch"):
        raise ConversionError(f"{state_path} says phase_kind 'monarch' but has no 'monarch' settings")
    tp = int(run_state["tensor_model_parallel_size"])
    present = sorted(n for n in os.listdir(path) if n.startswith("mp_rank_") and n.endswith("_model_states.pt"))
    expected = [MODEL_FILE.format(r) for r in range(tp)]
    missing = [n for n in expected if n not in present]
    if missing:
        raise ConversionError(f"input {path} lacks {', '.join(missing)} ({RUN_STATE} says tensor_model_parallel_size={tp})")
    if present != expected:
        extra = sorted(set(present) - set(expected))
        raise ConversionError(f"input {path} has model files {', '.join(extra)} beyond tensor_model_parallel_size={tp}")
    modules, meta = [], []
    for name in expected:
        data = _load_model_file(os.path.join(path, name))
        modules.append(data.pop("module"))
        meta.append(data)
    keys = list(modules[0])
    for r, sd in enumerate(modules[1:], start=1):
        if list(sd) != keys:
            diff = sorted(set(sd) ^ set(keys))
            raise ConversionError(f"{MODEL_FILE.format(r)} and {MODEL_FILE.format(0)} in {path} hold different "
                                  f"parameters (e.g. {diff[:3]})")
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


def _own_storage(value: Any) -> Any:
    """``value``, copied when it is a view into a larger storage: torch.save writes a view's whole
    storage (a TP shard or a slice of a flat buffer would carry all of it)."""
    if torch.is_tensor(value) and value.untyped_storage().nbytes() != value.numel() * value.element_size():
        return value.clone()
    return value


def write_checkpoint(
    output: str,
    modules: list[dict[str, Any]],
    source_meta: dict[str, Any],
    run_state: dict[str, Any],
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
        tp = len(modules)
        for rank, module in enumerate(modules):
            meta = {k: v for k, v in source_meta.items() if k not in _OPTIMIZER_KEYS}
            meta.update({k: None for k in _OPTIMIZER_KEYS})
            meta["mp_world_size"] = tp
            if isinstance(meta.get("checkpoint_parallel_dimensions"), dict):
                meta["checkpoint_parallel_dimensions"] = {**meta["checkpoint_parallel_dimensions"], "tp_degree": tp}
            # DeepSpeed's per-group parameter shapes (read by zero_to_fp32): one group, this rank's.
            meta["param_shapes"] = [OrderedDict((k, v.shape) for k, v in module.items()
                                                if torch.is_tensor(v) and not k.endswith("_extra_state"))]
            meta["run_state"] = run_state
            torch.save({"module": {k: _own_storage(v) for k, v in module.items()}, **meta},
                       os.path.join(stage, MODEL_FILE.format(rank)))
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
) -> dict[str, Any]:
    """The output's ``run_state.json``: the input's, with the new structure, TP size and provenance.

    ``step``, ``phase`` and ``phase_index`` are kept, so ``launcher/evaluate.py`` validates a
    conversion on the same data as its source.
    """
    state = dict(source.run_state)
    state.update({
        "phase_kind": "dense" if monarch is None else "monarch",
        "monarch": monarch,
        "tensor_model_parallel_size": tp,
        "tag": os.path.basename(os.path.abspath(output)),
        "complete": True,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "optimizer_state": None,
        "converted_from": {
            "path": os.path.abspath(source.path),
            "tag": source.run_state.get("tag"),
            "phase_kind": source.run_state.get("phase_kind"),
            "monarch": source.run_state.get("monarch"),
            "tensor_model_parallel_size": source.tp_size,
            **provenance,
        },
    })
    return state
