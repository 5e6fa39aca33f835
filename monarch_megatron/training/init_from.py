"""``training.init_from``: start a NEW run from the model weights of a checkpoint.

The checkpoint is one the trainer wrote (``<output_dir>/checkpoints/<tag>``) or an output of
``launcher/convert_checkpoint.py`` (e.g. a pretrained dense model projected to Monarch for sparse
fine-tuning, or a Monarch checkpoint converted to dense). The new run starts at step 0 with fresh
optimizer moments; only the module weights are taken. A checkpoint in the run's own
``output_dir`` always wins: then the run resumes and ``init_from`` is ignored (the Trainer logs it).

:func:`check_init_from` validates the checkpoint against the run's first phase from
``run_state.json`` alone (cheap, before process groups; every problem is one
:class:`ConfigError` naming ``training.init_from``, exit code 2, the checkpoint is only read).
:func:`load_init_weights` reads this TP rank's ``"module"`` state dict, which the Trainer hands to
:func:`.switch.build_phase_engine` like converted weights at the switch: that loads it into the
model (cast to the model's dtype) and, in fp16/bf16, writes it as the ZeRO-1 fp32 master weights
(:func:`.switch.set_master_params`), so the masters equal the loaded weights exactly.
"""

from __future__ import annotations

import os
from typing import Any

from ..checkpointing.errors import CheckpointFormatError
from ..checkpointing.run_state import RunState
from ..checkpointing.shards import MODEL_FILE, read_model_shard
from ..checkpointing.store import RUN_STATE, check_model_files, load_run_state
from ..models.config import ffn_width
from .config import RunConfig
from .schema_io import ConfigError

KEY = "training.init_from"
# model entries that fix parameter shapes / module structure (dropouts and init std do not).
STRUCTURE_KEYS = ("kind", "num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "vocab_size",
                  "max_position_embeddings", "sentence_order", "make_vocab_size_divisible_by")


def _model_structure(model: dict[str, Any]) -> dict[str, Any]:
    out = {k: model.get(k) for k in STRUCTURE_KEYS}
    if out["hidden_size"] is not None:
        out["ffn_hidden_size"] = ffn_width(out["hidden_size"], out["ffn_hidden_size"])
    return out


def model_differences(checkpoint_model: Any, cfg: RunConfig) -> list[str]:
    """``"model.<key> is <checkpoint's> in the checkpoint, <run's> in this run"`` for every entry of
    :data:`STRUCTURE_KEYS` in which a checkpoint's ``run_state["model"]`` differs from ``cfg``."""
    run = _model_structure({**vars(cfg.model), "vocab_size": cfg.vocab_size})
    ckpt = _model_structure(checkpoint_model if isinstance(checkpoint_model, dict) else {})
    return [f"model.{k} is {ckpt[k]!r} in the checkpoint, {run[k]!r} in this run" for k in STRUCTURE_KEYS
            if ckpt[k] != run[k]]


def _convert_hint(path: str, to: str, nblocks: int | None = None, tp: int | None = None) -> str:
    extra = (f" --nblocks {nblocks}" if nblocks else "") + (f" --tensor-parallel {tp}" if tp else "")
    return f"python launcher/convert_checkpoint.py --input {path} --output <new dir> --to {to}{extra}"


def check_init_from(cfg: RunConfig) -> RunState | None:
    """Validate ``training.init_from`` against ``cfg``'s first phase; returns its run_state (None if unset).

    Raises:
        ConfigError: (key ``training.init_from``) missing / incomplete checkpoint, other model
            sizes (each named), other structure (phase_kind, layer kind, Monarch layers or nblocks), other TP
            size, model files that do not match the sizes and SHA-256 recorded at the save.
    """
    path = cfg.training.init_from
    if not path:
        return None
    if not os.path.isdir(path):
        raise ConfigError(KEY, f"{path} is not a directory (expected a checkpoint directory: <output_dir>/checkpoints/"
                          "<tag> or a launcher/convert_checkpoint.py output)")
    state_path = os.path.join(path, RUN_STATE)
    if not os.path.isfile(state_path):
        raise ConfigError(KEY, f"{path} is not a complete checkpoint: {RUN_STATE} is missing")
    try:
        state = load_run_state(path)
    except CheckpointFormatError as err:
        raise ConfigError(KEY, str(err)) from None
    if not state.complete:
        raise ConfigError(KEY, f"{path} is not a complete checkpoint ({RUN_STATE} lacks \"complete\": true; "
                          "an interrupted save or copy?)")
    for entry in ("model", "phase_kind", "tensor_model_parallel_size"):
        if getattr(state, entry) is None:
            raise ConfigError(KEY, f"{state_path} has no '{entry}' entry (not a monarch-megatron checkpoint?)")
    differences = model_differences(state.model, cfg)
    if differences:
        raise ConfigError(KEY, f"{path} holds a different model: {'; '.join(differences)}")
    first = cfg.phases[0]
    want = "dense" if first.monarch is None else "monarch"
    to = "dense" if first.monarch is None else first.monarch.kind  # the convert_checkpoint.py target
    have = state.phase_kind
    if have != want:
        hint = _convert_hint(path, to, first.monarch.nblocks if first.monarch else None)
        raise ConfigError(KEY, f"{path} is a {have} checkpoint (phase_kind) but the run's first phase phases[0] "
                          f"({first.name!r}) is {want}; convert it first: {hint}")
    if first.monarch is not None:
        mon = state.monarch or {}
        hint = _convert_hint(path, to, first.monarch.nblocks)
        if mon.get("kind", "monarch") != first.monarch.kind:
            raise ConfigError(KEY, f"{path} has {mon.get('kind', 'monarch')} layers but phases[0].monarch.kind is "
                              f"{first.monarch.kind}; convert it: {hint} --layers {','.join(first.monarch.layers)}")
        if sorted(mon.get("layers") or []) != sorted(first.monarch.layers):
            raise ConfigError(KEY, f"{path} has Monarch layers {mon.get('layers')} but phases[0].monarch.layers is "
                              f"{list(first.monarch.layers)}; convert it: {hint} --layers {','.join(first.monarch.layers)}")
        if mon.get("nblocks") != first.monarch.nblocks:
            raise ConfigError(KEY, f"{path} has Monarch nblocks={mon.get('nblocks')} but phases[0].monarch.nblocks is "
                              f"{first.monarch.nblocks}; convert it: {hint}")
    tp, run_tp = state.tensor_model_parallel_size, cfg.parallel.tensor_model_parallel_size
    if tp != run_tp:
        raise ConfigError(KEY, f"{path} has tensor_model_parallel_size={tp} but this run has "
                          f"parallel.tensor_model_parallel_size={run_tp}; reshard it: {_convert_hint(path, to, tp=run_tp)}")
    missing = [MODEL_FILE.format(r) for r in range(tp) if not os.path.isfile(os.path.join(path, MODEL_FILE.format(r)))]
    if missing:
        raise ConfigError(KEY, f"{path} is not a complete checkpoint: {', '.join(missing)} missing")
    problem = check_model_files(path, state)  # sizes and SHA-256 recorded at the save
    if problem:
        raise ConfigError(KEY, f"{path} does not verify: {problem}")
    return state


def load_init_weights(path: str, tp_rank: int) -> dict[str, Any]:
    """This TP rank's module state dict of the checkpoint ``path`` (CPU tensors; no optimizer state)."""
    try:
        return read_model_shard(path, tp_rank)
    except CheckpointFormatError as err:
        raise ConfigError(KEY, str(err)) from None


__all__ = ["check_init_from", "load_init_weights", "model_differences"]
