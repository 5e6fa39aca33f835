"""A checkpoint's training state in a layout-free form, and its shard for another TP x DP layout.

What a resume needs beyond the step (which fixes the data position and the learning rate) is the
fp32 master weights, the optimizer moments, the optimizer's counters (its ``step``), the loss
scaler and DeepSpeed's engine counters. A checkpoint holds them cut along the layout that wrote
it: TP-sharded tensors in megatron-core's layout (structured factors in their kind's, :mod:`.tp`)
and, within a TP rank, ZeRO-1's flat partitions over the DP ranks (:mod:`.shards`).
:func:`read_training_state` undoes both cuts: per TP rank, a parameter's fragments on DP ranks
0, 1, ... are concatenated (DeepSpeed records where each fragment is: ``param_slice_mappings``),
then the TP shards are merged exactly as model weights are. Every moment is shaped like its
parameter and every TP merge / split is a concatenation or a fixed permutation of entries, so the
one :func:`~.tp.merge_tp` serves weights and moments alike. :func:`shard_for` cuts the global
state for a TP rank of the new layout; the trainer hands it to the new engine, whose own ZeRO-1
partitioning does the DP cut (``monarch_megatron.training.checkpoint``).

Why this and not the stack's tools: DeepSpeed's universal checkpoint merges TP slices by name
patterns (concatenate along a dimension, or take one replica); a Monarch factor's column-parallel
shard is a strided set of rows of every first-stage block, which no pattern describes, and the
conversion is an offline pass that doubles the checkpoint on disk. megatron-core's
``dist_checkpointing`` needs ``sharded_state_dict`` on our layers, which is unfinished (every DP
rank gets the same replica id without ``dp_cp_group``; ``blkdiag1`` is saved as a 4-D view and
fails to load back) and would replace DeepSpeed's ZeRO-1 checkpoint format that the rest of the
project and its users read. Resharding the ZeRO-1 partitions here reuses the exact TP merge/split
that offline conversion already tests, reads the files DeepSpeed wrote as they are, and writes
into the new partitions through DeepSpeed's public ``safe_set_full_*`` API.

Memory: every rank reads the whole checkpoint once (host memory, about 16 bytes per parameter for
weights and two moments, plus one copy of the module); that is a resume-time cost only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import CheckpointFormatError
from .run_state import RunState
from .shards import OPTIM_FILE, optimizer_files, read_model_shards, read_optimizer_shard
from .tp import merge_tp, split_tp


@dataclass
class TrainingState:
    """A checkpoint's training state, global (merged over TP and DP) or one TP rank's shard of it.

    Attributes:
        module: the module state dict; every parameter holds its fp32 master weight (float32, the
            parameter's shape: ``(out, in)``, a factor's ``(nblocks, ., .)``, ...).
        moments: per optimizer state key (``exp_avg``, ``exp_avg_sq``, ...), ``{parameter name:
            float32 tensor shaped as the parameter}``; empty when the optimizer has not stepped
            (a checkpoint saved right after a switch).
        counters: the optimizer's non-tensor state per partition (``step``), equal on every one.
        loss_scaler: DeepSpeed's loss scaler object (fp16: the dynamic scale, the iterations since
            the last overflow, the hysteresis left), as DeepSpeed saved it.
        engine_counters: DeepSpeed's ``global_steps``, ``global_samples``, ``skipped_steps``.
    """

    module: dict[str, Any]
    moments: dict[str, dict[str, torch.Tensor]]
    counters: dict[str, Any] = field(default_factory=dict)
    loss_scaler: Any = None
    engine_counters: dict[str, int] = field(default_factory=dict)


def saved_data_parallel_size(ckpt_dir: str, state: RunState) -> int:
    """DP size of the job that wrote ``ckpt_dir`` (run_state.json, or the optimizer files' count
    in checkpoints older than that entry)."""
    if state.data_parallel_size is not None:
        return state.data_parallel_size
    return sum(1 for _, tp_rank in optimizer_files(ckpt_dir) if tp_rank == 0)


def _unpartition(shards: list[dict[str, Any]], shapes: dict[str, torch.Size], where: str):
    """``(fp32 masters, moments, counters)`` of one TP rank from its ZeRO-1 shards (DP rank order)."""
    masters: dict[str, list[torch.Tensor]] = {}
    moments: dict[str, dict[str, list[torch.Tensor]]] = {}
    counters: dict[str, Any] = {}
    for sd in shards:
        base = sd["base_optimizer_state"]
        for i, (flat, slices) in enumerate(zip(sd["single_partition_of_fp32_groups"], sd["param_slice_mappings"])):
            key = base["param_groups"][i]["params"][0] if base.get("param_groups") else i
            group_state = base.get("state", {}).get(key, {})
            tensors = {k: v for k, v in group_state.items() if torch.is_tensor(v) and v.dim() == 1 and v.numel() >= flat.numel()}
            for k, v in group_state.items():
                if k not in tensors:
                    counters.setdefault(k, v)
            for name, addr in slices.items():
                masters.setdefault(name, []).append(flat.narrow(0, addr.start, addr.numel))
                for k, v in tensors.items():
                    moments.setdefault(k, {}).setdefault(name, []).append(v.narrow(0, addr.start, addr.numel))
    out_masters, out_moments = {}, {k: {} for k in moments}
    for name, parts in masters.items():
        if name not in shapes:
            raise CheckpointFormatError(f"{where}: the optimizer holds {name!r}, which the model file does not")
        flat = torch.cat(parts)
        if flat.numel() != shapes[name].numel():
            raise CheckpointFormatError(f"{where}: the optimizer shards hold {flat.numel()} elements of {name!r}, "
                                        f"its shape {tuple(shapes[name])} has {shapes[name].numel()} (a shard missing?)")
        out_masters[name] = flat.view(shapes[name]).clone()
        for k in moments:
            out_moments[k][name] = torch.cat(moments[k][name]).view(shapes[name]).clone()
    return out_masters, out_moments, counters


def read_training_state(ckpt_dir: str, state: RunState) -> TrainingState:
    """The global training state of the trainer checkpoint ``ckpt_dir`` (module docstring).

    Raises:
        CheckpointFormatError: a model or optimizer file is missing, unreadable or inconsistent.
    """
    if state.tensor_model_parallel_size is None:
        raise CheckpointFormatError(f"{ckpt_dir}/run_state.json has no 'tensor_model_parallel_size'")
    tp, dp = state.tensor_model_parallel_size, saved_data_parallel_size(ckpt_dir, state)
    modules, meta = read_model_shards(ckpt_dir, tp)
    merged_masters, merged_moments, counters, scaler = [], [], {}, None
    for t in range(tp):
        shards = [read_optimizer_shard(ckpt_dir, d, t) for d in range(dp)]
        shapes = {k: v.shape for k, v in modules[t].items() if torch.is_tensor(v)}
        masters, moments, group_counters = _unpartition(shards, shapes, os.path.join(ckpt_dir, OPTIM_FILE.format("*", t)))
        merged_masters.append({**modules[t], **masters})
        merged_moments.append(moments)
        counters = counters or group_counters
        scaler = scaler if scaler is not None else shards[0].get("loss_scaler")
    keys = set(merged_moments[0])
    if any(set(m) != keys for m in merged_moments):
        raise CheckpointFormatError(f"{ckpt_dir}: the TP ranks' optimizer shards hold different state entries")
    moments = {k: merge_tp([m[k] for m in merged_moments]) for k in sorted(keys)}
    engine_counters = {k: meta[0][k] for k in ("global_steps", "global_samples", "skipped_steps") if k in meta[0]}
    return TrainingState(merge_tp(merged_masters), moments, counters, scaler, engine_counters)


def shard_for(global_state: TrainingState, tp: int, tp_rank: int) -> TrainingState:
    """TP rank ``tp_rank``'s part of ``global_state`` at TP size ``tp`` (new contiguous tensors).

    Raises:
        CheckpointFormatError: a sharded dimension or a structured layout does not divide by ``tp``.
    """
    moments = {k: split_tp(v, tp)[tp_rank] for k, v in global_state.moments.items()}
    return TrainingState(split_tp(global_state.module, tp)[tp_rank], moments, dict(global_state.counters),
                         global_state.loss_scaler, dict(global_state.engine_counters))


__all__ = ["TrainingState", "read_training_state", "saved_data_parallel_size", "shard_for"]
