"""The one reader and writer of a checkpoint's tensor files: model shards and ZeRO-1 optimizer shards.

Both are DeepSpeed's files (the trainer writes them with ``engine.save_checkpoint``; their names
are DeepSpeed's):

* ``mp_rank_XX_model_states.pt``, one per TP rank ``XX``: ``"module"`` (that rank's state dict:
  TP-sharded tensors in megatron-core's layout, :mod:`.tp`), DeepSpeed's bookkeeping
  (``global_steps``, ``param_shapes``, ...) and our ``run_state`` as its client state;
* ``zero_pp_rank_D_mp_rank_XX_optim_states.pt`` (``bf16_zero_pp_...`` in bf16), one per (DP
  rank ``D``, TP rank ``XX``):
  ``"optimizer_state_dict"``, DeepSpeed's ZeRO-1 state of that rank's partition: per parameter
  group one flat fp32 master partition (``single_partition_of_fp32_groups``), the inner
  optimizer's state of it (``base_optimizer_state``: moments shaped as the partition, ``step``),
  the loss scaler, and ``param_slice_mappings``: which slice of the partition holds which
  parameter (name -> start, numel). A parameter's flat elements are its fragments on DP ranks 0, 1,
  ... in that order.

Converted checkpoints hold model shards only (module weights, no optimizer state).
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from typing import Any

import torch

from .errors import CheckpointFormatError
from .run_state import RunState

MODEL_FILE = "mp_rank_{:02d}_model_states.pt"
OPTIM_FILE = "zero_pp_rank_{}_mp_rank_{:02d}_optim_states.pt"
# DeepSpeed prefixes the optimizer files of a bf16 run with "bf16_".
_OPTIM_NAME = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
# DeepSpeed bookkeeping that describes the optimizer or the data-parallel layout of the run that
# wrote a model file; a converted checkpoint has no optimizer state.
_OPTIMIZER_KEYS = ("optimizer", "lr_scheduler", "data_sampler", "random_ltd")


def _load(path: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated zip, bad pickle, ...: all mean "not a readable checkpoint"
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointFormatError(f"{path} is corrupt or truncated: torch.load failed ({type(err).__name__}: {first})") from None


def read_model_file(path: str) -> dict[str, Any]:
    """A whole DeepSpeed model file: ``"module"`` (state dict, CPU tensors) and the bookkeeping.

    Raises:
        CheckpointFormatError: unreadable, or not a model-states file.
    """
    if not os.path.isfile(path):
        raise CheckpointFormatError(f"{path} is missing")
    data = _load(path)
    if not isinstance(data, dict) or not isinstance(data.get("module"), dict):
        raise CheckpointFormatError(f"{path} is not a DeepSpeed model-states file (no 'module' state dict)")
    return data


def read_model_shard(ckpt_dir: str, tp_rank: int) -> dict[str, Any]:
    """TP rank ``tp_rank``'s module state dict of the checkpoint ``ckpt_dir`` (CPU tensors)."""
    return read_model_file(os.path.join(ckpt_dir, MODEL_FILE.format(tp_rank)))["module"]


def read_model_shards(ckpt_dir: str, tp: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(modules, meta)`` of every TP rank (rank order) of a checkpoint written at TP size ``tp``:
    the module state dicts and the rest of each model file.

    Raises:
        CheckpointFormatError: a model file missing, beyond ``tp``, unreadable, or holding other
            parameters than rank 0's.
    """
    present = sorted(n for n in os.listdir(ckpt_dir) if n.startswith("mp_rank_") and n.endswith("_model_states.pt"))
    expected = [MODEL_FILE.format(r) for r in range(tp)]
    missing = [n for n in expected if n not in present]
    if missing:
        raise CheckpointFormatError(f"{ckpt_dir} lacks {', '.join(missing)} (run_state.json says "
                                    f"tensor_model_parallel_size={tp})")
    if present != expected:
        extra = sorted(set(present) - set(expected))
        raise CheckpointFormatError(f"{ckpt_dir} has model files {', '.join(extra)} beyond tensor_model_parallel_size={tp}")
    modules, meta = [], []
    for name in expected:
        data = read_model_file(os.path.join(ckpt_dir, name))
        modules.append(data.pop("module"))
        meta.append(data)
    keys = list(modules[0])
    for r, sd in enumerate(modules[1:], start=1):
        if list(sd) != keys:
            diff = sorted(set(sd) ^ set(keys))
            raise CheckpointFormatError(f"{MODEL_FILE.format(r)} and {MODEL_FILE.format(0)} in {ckpt_dir} hold "
                                        f"different parameters (e.g. {diff[:3]})")
    return modules, meta


def _own_storage(value: Any) -> Any:
    """``value``, copied when it is a view into a larger storage: torch.save writes a view's whole
    storage (a TP shard or a slice of a flat buffer would carry all of it)."""
    if torch.is_tensor(value) and value.untyped_storage().nbytes() != value.numel() * value.element_size():
        return value.clone()
    return value


def write_model_shards(ckpt_dir: str, modules: list[dict[str, Any]], source_meta: dict[str, Any],
                       run_state: RunState) -> None:
    """Write module-only model files (one per TP rank of ``modules``) into the existing directory
    ``ckpt_dir`` (a staging directory: the caller writes ``run_state.json`` and renames it).

    ``source_meta``: DeepSpeed's bookkeeping of the input (rank 0's); optimizer entries are dropped
    and the TP size updated, so DeepSpeed loads the result with ``load_module_only=True``.
    """
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
        meta["run_state"] = run_state.to_json()
        torch.save({"module": {k: _own_storage(v) for k, v in module.items()}, **meta},
                   os.path.join(ckpt_dir, MODEL_FILE.format(rank)))


def optimizer_files(ckpt_dir: str) -> dict[tuple[int, int], str]:
    """``{(DP rank, TP rank): file name}`` of the ZeRO optimizer files in ``ckpt_dir``."""
    found = {}
    for name in os.listdir(ckpt_dir):
        m = _OPTIM_NAME.match(name)
        if m:
            found[int(m.group(1)), int(m.group(2))] = name
    return found


def read_optimizer_shard(ckpt_dir: str, dp_rank: int, tp_rank: int) -> dict[str, Any]:
    """DeepSpeed's ZeRO-1 ``optimizer_state_dict`` of (``dp_rank``, ``tp_rank``) (module docstring).

    Raises:
        CheckpointFormatError: missing, unreadable, or without the per-parameter slice record
            (``param_slice_mappings``, which DeepSpeed has written since 0.10) that resharding needs.
    """
    name = optimizer_files(ckpt_dir).get((dp_rank, tp_rank))
    if name is None:
        raise CheckpointFormatError(f"{os.path.join(ckpt_dir, OPTIM_FILE.format(dp_rank, tp_rank))} is missing")
    path = os.path.join(ckpt_dir, name)
    data = _load(path)
    state = data.get("optimizer_state_dict") if isinstance(data, dict) else None
    if not isinstance(state, dict) or not isinstance(state.get("base_optimizer_state"), dict):
        raise CheckpointFormatError(f"{path} is not a DeepSpeed ZeRO stage 1/2 optimizer file written without "
                                    "elastic_checkpoint (no base_optimizer_state)")
    for key in ("single_partition_of_fp32_groups", "param_slice_mappings"):
        if key not in state:
            raise CheckpointFormatError(f"{path} has no {key!r} (a DeepSpeed older than 0.10 wrote it?)")
    return state


__all__ = ["MODEL_FILE", "OPTIM_FILE", "optimizer_files", "read_model_file", "read_model_shard", "read_model_shards",
           "read_optimizer_shard", "write_model_shards"]
