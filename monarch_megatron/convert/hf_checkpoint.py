"""Hugging Face export and import of whole checkpoints (``launcher/export_hf.py``, ``launcher/import_hf.py``).

Export: a checkpoint of ours (trainer or converted; any TP size; Monarch layers are first converted
to their exact dense matrices) becomes a directory ``from_pretrained`` loads: ``config.json``,
``model.safetensors`` (the checkpoint's dtype; tied copies omitted as ``save_pretrained`` does) and
the tokenizer (:mod:`.hf_tokenizer`). The tokenizer is ``--tokenizer`` or, when not given, the one
the checkpoint's run trained with (``<output_dir>/config.yaml`` next to ``checkpoints/``; for a
converted checkpoint, that of its source; for an imported one, the Hugging Face source directory's).

Import: a local ``GPT2LMHeadModel`` / ``MegatronBertForPreTraining`` directory becomes a dense
module-only checkpoint (``run_state.json`` marked ``converted_from``, so ``training.init_from``
accepts it and no run resumes from it) at any TP size, which ``convert_checkpoint.py --to monarch``
projects.

Both write atomically (a hidden staging directory renamed into place) and check everything that
can be checked (paths, architecture, model features, tokenizer) before reading any weights; every
problem is one :class:`~.checkpoint.ConversionError` (CLI exit code 2).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch

from ..checkpointing.errors import CheckpointFormatError
from ..checkpointing.run_state import RunState
from ..checkpointing.store import RUN_STATE, fsync_dir, read_run_state, replace_dir
from ..checkpointing.tp import merge_tp, split_tp
from ..training.config import monarch_layer_widths
from ..training.init_from import STRUCTURE_KEYS
from .checkpoint import ConversionError, check_output_path, read_checkpoint, write_checkpoint
from .hf import (
    BY_ARCHITECTURE,
    FAMILIES,
    from_hf_state,
    hf_config,
    model_config,
    model_from_hf_config,
    require_transformers,
    to_hf_state,
)
from .hf_tokenizer import HF_TOKENIZER_FILES, SP_FILE, inspect_tokenizer, write_tokenizer
from .pipeline import convert_state

IMPORT_TOOL = "launcher/import_hf.py"
WEIGHTS = "model.safetensors"
PRECISION_OF = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_MAX_PROVENANCE_DEPTH = 16  # converted_from chains (convert of a convert of ...)


def _checkpoint_state(path: str) -> RunState:
    if not os.path.isdir(path):
        raise ConversionError(f"checkpoint {path} is not a directory (expected .../checkpoints/<tag> or a converted "
                              "checkpoint)")
    state = read_run_state(path)
    if state is None:
        raise ConversionError(f"{path} is not a complete checkpoint ({RUN_STATE} missing, unreadable or without "
                              "\"complete\": true)")
    for key in ("model", "phase_kind", "tensor_model_parallel_size"):
        if getattr(state, key) is None:
            raise ConversionError(f"{os.path.join(path, RUN_STATE)} has no '{key}' entry")
    return state


def _run_tokenizer(ckpt: str) -> str | None:
    """The tokenizer model the run that wrote the trainer checkpoint ``ckpt`` trained with."""
    from ..training.batches import prepare_data
    from ..training.config import load_config
    from ..training.schema_io import ConfigError

    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(ckpt)))
    config = os.path.join(run_dir, "config.yaml")
    if os.path.basename(os.path.dirname(os.path.abspath(ckpt))) != "checkpoints" or not os.path.isfile(config):
        return None
    try:
        cfg = load_config(config)
    except ConfigError:
        return None
    cfg.output_dir = run_dir  # the demo source keeps its data under <output_dir>/data by default
    if cfg.data.source == "demo" and not os.path.isdir(cfg.data.cache_dir or os.path.join(run_dir, "data")):
        return None  # gone: prepare_data would rebuild it (minutes); the caller asks for --tokenizer
    return prepare_data(cfg).tokenizer_model  # the demo data exists: returns its paths at once


def find_tokenizer(ckpt: str, state: RunState) -> str | None:
    """The tokenizer of checkpoint ``ckpt`` (see module docstring), or None if it cannot be told."""
    for _ in range(_MAX_PROVENANCE_DEPTH):
        source = state.converted_from
        if not source:
            return _run_tokenizer(ckpt)
        if source.get("tool") == IMPORT_TOOL:
            path = source.get("path", "")
            return path if any(os.path.isfile(os.path.join(path, n)) for n in HF_TOKENIZER_FILES) else None
        ckpt = source.get("path", "")
        state = read_run_state(ckpt) if os.path.isdir(ckpt) else None
        if state is None:
            return None
    return None


def _stage(output: str, verb: str) -> tuple[str, str]:
    parent, name = os.path.split(os.path.abspath(output))
    stage = os.path.join(parent, f".{name}.{verb}-{os.getpid()}")
    shutil.rmtree(stage, ignore_errors=True)
    os.makedirs(stage)
    return stage, os.path.join(parent, f".{name}.replaced-{os.getpid()}")


def export_checkpoint(checkpoint: str, output: str, tokenizer: str | None = None, force: bool = False,
                      log: Callable[[str], None] = print) -> dict[str, Any]:
    """Export ``checkpoint`` as a Hugging Face directory ``output`` (module docstring).

    Returns:
        ``{"architecture", "model" (ModelConfig fields), "tokenizer" (its source), "files", "seconds"}``.

    Raises:
        ConversionError: bad input / output / tokenizer, or a feature the target class cannot express.
    """
    t0 = time.perf_counter()
    require_transformers()
    from safetensors.torch import save_file

    state = _checkpoint_state(checkpoint)
    out = check_output_path(output, checkpoint, force)
    model = model_config(state.model)
    family = FAMILIES[model.kind]
    tok_path = tokenizer or find_tokenizer(checkpoint, state)
    if tok_path is None:
        raise ConversionError(f"cannot tell which tokenizer {checkpoint} was trained with (no run config.yaml next to "
                              "its checkpoints/ directory, nor a source that names one); pass --tokenizer "
                              "FILE.model or a Hugging Face tokenizer directory")
    tok = inspect_tokenizer(tok_path)
    if tok.vocab_size > model.vocab_size:
        raise ConversionError(f"tokenizer {tok_path} has {tok.vocab_size} tokens but the model only "
                              f"{model.vocab_size} (model.vocab_size): not the model's tokenizer")
    config = hf_config(model, tok.special_ids)
    monarch = state.monarch
    log(f"read {checkpoint}: {model.kind} {model.num_layers}x{model.hidden_size}, {state.phase_kind}"
        f"{' ' + str(monarch) if monarch else ''}, TP={state.tensor_model_parallel_size}, step {state.step}")

    src = read_checkpoint(checkpoint)
    merged = merge_tp(src.modules)
    src.modules.clear()
    if monarch is not None:  # exact: every Monarch linear becomes its dense matrix
        with torch.no_grad():
            merged, _ = convert_state(merged, monarch_layer_widths(model), monarch, None, 1, log=lambda line: None)
    tensors = to_hf_state(merged, model)
    del merged
    dtypes = {t.dtype for t in tensors.values()}
    config.dtype = str(next(iter(dtypes))).removeprefix("torch.") if len(dtypes) == 1 else None

    stage, aside = _stage(out, "exporting")
    try:
        config.save_pretrained(stage)
        save_file(tensors, os.path.join(stage, WEIGHTS), metadata={"format": "pt"})
        os.chmod(os.path.join(stage, WEIGHTS), 0o644)  # safetensors creates it 0600, unlike the other files
        tok_files = write_tokenizer(tok, stage, model.kind, model.max_position_embeddings)
        if os.path.lexists(out) and not force:  # appeared while we were exporting
            raise ConversionError(f"output {output} exists; pass --force to replace it")
        replace_dir(stage, out, aside)
        fsync_dir(os.path.dirname(out))
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    report = {"architecture": family.architecture, "model": asdict(model), "tokenizer": tok_path,
              "files": ["config.json", WEIGHTS, *tok_files], "seconds": time.perf_counter() - t0}
    log(f"wrote {output}: {family.architecture} ({len(tensors)} tensors, vocabulary {model.vocab_size} "
        f"of the padded {model.padded_vocab_size}), tokenizer from {tok_path}, in {report['seconds']:.1f}s")
    return report


# -- import ----------------------------------------------------------------------------------------
def _load_weights(model_dir: str) -> dict[str, torch.Tensor]:
    """Every tensor of the model directory (single or sharded safetensors, or pytorch_model.bin)."""
    try:
        return _read_weight_files(model_dir)
    except Exception as err:  # truncated file, bad header, bad pickle, missing shard: all "unreadable"
        first = (str(err).strip().splitlines() or [""])[0]
        raise ConversionError(f"the weights in {model_dir} are unreadable ({type(err).__name__}: {first})") from None


def _read_weight_files(model_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single, index = os.path.join(model_dir, WEIGHTS), os.path.join(model_dir, WEIGHTS + ".index.json")
    if os.path.isfile(single):
        return load_file(single)
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        out: dict[str, torch.Tensor] = {}
        for name in files:
            out.update(load_file(os.path.join(model_dir, name)))
        return out
    return torch.load(os.path.join(model_dir, "pytorch_model.bin"), map_location="cpu", weights_only=True)


def _has_weights(model_dir: str) -> bool:
    return any(os.path.isfile(os.path.join(model_dir, n))
               for n in (WEIGHTS, WEIGHTS + ".index.json", "pytorch_model.bin"))


def _read_hf_config(model_dir: str):
    """``(family, transformers config)`` of the model directory, after the cheap checks."""
    transformers = require_transformers()
    if not os.path.isdir(model_dir):
        raise ConversionError(f"model {model_dir} is not a directory (a local save_pretrained directory; nothing is "
                              "downloaded)")
    path = os.path.join(model_dir, "config.json")
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, ValueError) as err:
        raise ConversionError(f"{path} is missing or not JSON ({err})") from None
    names = raw.get("architectures") or []
    family = next((BY_ARCHITECTURE[a] for a in names if a in BY_ARCHITECTURE), None)
    if family is None or raw.get("model_type") != family.model_type:
        raise ConversionError(f"{model_dir} holds {', '.join(names) or 'no architectures'} (model_type "
                              f"{raw.get('model_type')!r}); import_hf reads "
                              f"{' and '.join(f'{f.architecture} ({f.model_type})' for f in FAMILIES.values())}")
    if not _has_weights(model_dir):
        raise ConversionError(f"{model_dir} has no {WEIGHTS}, sharded {WEIGHTS}.index.json or pytorch_model.bin")
    try:
        config = getattr(transformers, family.config_class).from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        raise ConversionError(f"{path} is not a valid {family.config_class} ({err})") from None
    return family, config


def _imported_run_state(model_dir: str, output: str, model, family, tp: int, dtype: torch.dtype,
                        approximations: list[str]) -> dict[str, Any]:
    """``run_state.json`` of an imported checkpoint: a dense step-0 checkpoint marked ``converted_from``."""
    return {
        "step": 0, "total_steps": 0, "phase_index": 0, "phase": "imported", "phase_kind": "dense",
        "phase_step": 0, "phase_steps": 0, "phase_end": True, "consumed_samples": 0, "phase_consumed_samples": 0,
        "config_hash": None, "run_name": os.path.basename(os.path.abspath(model_dir)), "model": asdict(model),
        "monarch": None, "precision": PRECISION_OF.get(dtype, "fp32"), "tensor_model_parallel_size": tp,
        "data_parallel_size": 1, "world_size": tp, "tag": os.path.basename(os.path.abspath(output)),
        "complete": True, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "optimizer_state": None,
        "converted_from": {"path": os.path.abspath(model_dir), "tool": IMPORT_TOOL, "format": "huggingface",
                           "architecture": family.architecture, "approximations": approximations},
    }


def init_overrides(model) -> list[str]:
    """The run-config overrides whose model matches ``model`` (what ``training.init_from`` checks)."""
    keys = (*STRUCTURE_KEYS, "activation")  # the checked structure, and the GELU the weights were trained with
    return [f"model.{k}={str(getattr(model, k)).lower() if isinstance(getattr(model, k), bool) else getattr(model, k)}"
            for k in keys]


def import_model(model_dir: str, output: str, tensor_parallel: int = 1, make_vocab_size_divisible_by: int = 128,
                 accept_approximation: bool = False, force: bool = False,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Import the Hugging Face directory ``model_dir`` as the checkpoint ``output`` (module docstring).

    Returns:
        ``{"run_state", "approximations", "overrides" (for a run config), "seconds"}``.

    Raises:
        ConversionError: bad input / output, another architecture, or a feature our models cannot express.
    """
    t0 = time.perf_counter()
    tp = tensor_parallel
    for flag, value in (("--tensor-parallel", tp), ("--make-vocab-size-divisible-by", make_vocab_size_divisible_by)):
        if value < 1:
            raise ConversionError(f"{flag} must be >= 1, got {value}")
    family, config = _read_hf_config(model_dir)
    model, near = model_from_hf_config(config, family, make_vocab_size_divisible_by, accept_approximation)
    for what, n in (("num_attention_heads", model.num_attention_heads), ("the MLP width", model.ffn_hidden_size),
                    (f"the padded vocabulary (make_vocab_size_divisible_by={model.make_vocab_size_divisible_by})",
                     model.padded_vocab_size)):
        if n % tp:
            raise ConversionError(f"--tensor-parallel {tp} does not divide {what} {n}")
    out = check_output_path(output, model_dir, force)
    log(f"read {model_dir}: {family.architecture} {model.num_layers}x{model.hidden_size}, {model.num_attention_heads} "
        f"heads, vocabulary {model.vocab_size} (padded to {model.padded_vocab_size})")
    for line in near:
        log(f"  approximation accepted: {line}")

    tensors = _load_weights(model_dir)
    state = from_hf_state(tensors, model, family)
    del tensors
    dtype = state["embedding.word_embeddings.weight"].dtype
    run_state = RunState.from_json(_imported_run_state(model_dir, out, model, family, tp, dtype, near))
    # DeepSpeed's bookkeeping of a module-only checkpoint (load_checkpoint(load_module_only=True) reads these).
    meta = {"buffer_names": [], "global_steps": 0, "global_samples": 0, "skipped_steps": 0, "dp_world_size": 1}
    write_checkpoint(out, split_tp(state, tp), meta, run_state, force)
    overrides = init_overrides(model)
    report = {"run_state": run_state.to_json(), "approximations": near, "overrides": overrides,
              "seconds": time.perf_counter() - t0}
    log(f"wrote {output} (dense, TP={tp}, {PRECISION_OF.get(dtype, dtype)}, no optimizer state) "
        f"in {report['seconds']:.1f}s")
    log(f"  a run starts from it with training.init_from={output} and a model section matching it: "
        + " ".join(overrides))
    if os.path.isfile(os.path.join(model_dir, SP_FILE)):
        log(f"  its tokenizer for launcher/preprocess.py and data.tokenizer_model: {os.path.join(model_dir, SP_FILE)}")
    return report


def run_cli(prog: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Run ``fn(*args, **kwargs, log=print)`` for a launcher: 0 when done; a ConversionError is one
    line ``<prog>: error: ...`` on stderr and exit code 2."""
    try:
        fn(*args, **kwargs, log=lambda line: print(line, flush=True))
    except CheckpointFormatError as err:  # ConversionError and the format's own (a file unreadable, ...)
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    return 0
