"""Offline checkpoint conversion (``launcher/convert_checkpoint.py``): read, merge TP shards,
convert layers, reshard to the target TP size, write atomically.

``to="dense"``: every structured (Monarch or block-diagonal) linear becomes its exact dense matrix
(the stock megatron-core local-spec model). ``to="monarch"`` / ``to="blockdiag"``: the linears
named by ``layers`` become that kind with ``nblocks`` blocks (the kind's optimal projection of the
dense weights; factors of the same kind and nblocks are kept as they are, exactly; another kind or
nblocks goes through the exact dense matrix), the rest dense.
Everything else (embeddings, norms, heads, biases) is copied. No optimizer state is written.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from typing import Any

import torch

from ..checkpointing.run_state import RunState
from ..checkpointing.tp import check_replicated_agree, linear_prefixes, merge_tp, split_tp
from ..models.config import MONARCH_LAYERS as ALL_LAYERS
from ..models.config import MonarchConfig
from ..parallel.kinds import FACTOR_KINDS, KINDS
from ..training.config import ModelSection, monarch_layer_widths
from .checkpoint import ConversionError, check_output_path, converted_run_state, read_checkpoint, write_checkpoint
from .to_monarch import check_factor_shapes, check_tp_shardable, layer_to_dense, project_layer

TARGETS = ("dense", *KINDS)


def _model_widths(run_state: RunState) -> tuple[ModelSection, dict[str, tuple[int, int, str]]]:
    try:
        model = ModelSection(**run_state.model)
    except TypeError as err:
        raise ConversionError(f"run_state.json 'model' entry is not a model section: {err}") from None
    return model, monarch_layer_widths(model)


def _target(to: str, nblocks: int | None, layers: tuple[str, ...] | None, src: dict | None) -> dict | None:
    """The output's ``monarch`` entry (None = dense) from the CLI choices and the source's."""
    if to == "dense":
        return None
    if to not in KINDS:
        raise ConversionError(f"--to must be one of {', '.join(TARGETS)}, got {to!r}")
    nblocks = nblocks or (src or {}).get("nblocks")
    if not nblocks:
        raise ConversionError(f"--to {to} of a dense checkpoint needs --nblocks")
    layers = tuple(layers) if layers else tuple((src or {}).get("layers") or ALL_LAYERS)
    unknown = [n for n in layers if n not in ALL_LAYERS]
    if unknown or not layers or len(set(layers)) != len(layers):
        raise ConversionError(f"--layers must be distinct names from {','.join(ALL_LAYERS)}, got {','.join(layers)}")
    return MonarchConfig(layers=tuple(n for n in ALL_LAYERS if n in layers), nblocks=int(nblocks), kind=to).to_state()


def convert_state(state: dict[str, Any], widths: dict[str, tuple[int, int, str]], src: dict | None,
                  tgt: dict | None, tp: int, log: Callable[[str], None]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Convert the global ``state`` from structure ``src`` to ``tgt`` (``monarch`` entries of
    ``run_state.json``, :meth:`MonarchConfig.to_state`, or None for dense).

    Returns:
        ``(new global state, report)``; the report has per-layer projection errors and totals.
    """
    out: dict[str, Any] = {}
    layers: dict[str, Any] = {}
    err_sq = norm_sq = 0.0
    done: set[str] = set()
    prefixes = linear_prefixes(state)
    try:
        source = None if src is None else MonarchConfig.from_state(src)
        target = None if tgt is None else MonarchConfig.from_state(tgt)
    except (KeyError, TypeError, ValueError) as err:
        raise ConversionError(f"run_state.json 'monarch' entry {src} is not a layer structure: {err}") from None
    for key, value in state.items():
        prefix = next((p for p in prefixes if key.startswith(p + ".")), None)
        if prefix is None or (key[len(prefix) + 1:] != "weight" and key[len(prefix) + 1:] not in FACTOR_KINDS):
            out[key] = value
            continue
        if prefix in done:
            continue
        done.add(prefix)
        name, style = prefixes[prefix]
        n_in, n_out, _ = widths[name]
        have = next((k for k in KINDS.values() if f"{prefix}.{k.factor_names[0]}" in state), None)
        want = None if target is None or name not in target.layers else KINDS[target.kind]
        if have is not None:
            factors = tuple(state[f"{prefix}.{n}"] for n in have.factor_names)
            if source is None or source.kind != have.name:
                raise ConversionError(f"{prefix} has {have.title} factors but run_state.json says the model is "
                                      f"{'dense' if source is None else source.kind}")
            check_factor_shapes(prefix, have, factors, n_in, n_out, source.nblocks)
            dtype = factors[0].dtype
        else:
            weight = state[f"{prefix}.weight"]
            if tuple(weight.shape) != (n_out, n_in):
                raise ConversionError(f"{prefix}.weight has shape {tuple(weight.shape)}, expected {(n_out, n_in)}")
            dtype = weight.dtype
        if want is not None:
            check_tp_shardable(prefix, want, style, n_in, n_out, target.nblocks, tp)
        if have is not None and want is have and source.nblocks == target.nblocks:
            out.update({f"{prefix}.{n}": f for n, f in zip(have.factor_names, factors)})  # unchanged, exact
            continue
        dense = layer_to_dense(have, factors, n_in, n_out, style) if have is not None else weight
        if want is None:
            out[f"{prefix}.weight"] = dense.to(dtype).contiguous()
            continue
        proj = project_layer(prefix, want, dense, target.nblocks, style, dtype)
        out.update({f"{prefix}.{n}": f for n, f in zip(want.factor_names, proj.factors)})
        err_sq += proj.err_sq
        norm_sq += proj.norm_sq
        layers[prefix] = proj.rel_error
        log(f"  {prefix:<44s} {n_out:>6d}x{n_in:<6d} nblocks={target.nblocks:<3d} relative error {proj.rel_error:.6e}")
    report: dict[str, Any] = {"projected_layers": layers}
    if layers:
        report["overall_relative_error"] = math.sqrt(err_sq / norm_sq) if norm_sq > 0 else 0.0
        log(f"  overall relative error (Frobenius, {len(layers)} projected layers): {report['overall_relative_error']:.6e}")
    return out, report


def convert_checkpoint(
    input_dir: str,
    output_dir: str,
    to: str,
    nblocks: int | None = None,
    layers: tuple[str, ...] | None = None,
    tensor_parallel: int | None = None,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Convert the checkpoint ``input_dir`` into ``output_dir`` (see module docstring).

    Returns:
        The report: ``projected_layers`` (``{module: relative error}``), ``overall_relative_error``
        (when any layer was projected), ``run_state`` (the output's), ``seconds``.

    Raises:
        ConversionError: bad input, output path or request; nothing is written then.
    """
    t0 = time.perf_counter()
    check_output_path(output_dir, input_dir, force)
    if tensor_parallel is not None and tensor_parallel < 1:
        raise ConversionError(f"--tensor-parallel must be >= 1, got {tensor_parallel}")
    src = read_checkpoint(input_dir)
    src_monarch = src.run_state.monarch
    tgt = _target(to, nblocks, layers, src_monarch)
    tp = tensor_parallel or src.tp_size
    if tgt == src_monarch:
        same = "dense" if tgt is None else f"{to} {tgt}"
        log(f"  note: the input already is {same}: the output is an exact copy of its weights"
            + (f", resharded from TP={src.tp_size} to TP={tp}" if tp != src.tp_size else ""))
    model, widths = _model_widths(src.run_state)
    if model.num_attention_heads % tp:
        raise ConversionError(f"--tensor-parallel {tp} does not divide num_attention_heads={model.num_attention_heads}")
    log(f"read {input_dir}: {src.run_state.phase_kind}{' ' + str(src_monarch) if src_monarch else ''} TP={src.tp_size}, "
        f"step {src.run_state.step}, precision {src.run_state.precision}")
    disagree = check_replicated_agree(src.modules)
    if disagree:
        log(f"  warning: replicated tensors differ across TP ranks (rank 0's copy is used): {', '.join(disagree[:5])}")
    merged = merge_tp(src.modules)
    src.modules.clear()  # free the per-rank copies before converting (large models)
    log(f"converting to {'dense' if tgt is None else KINDS[to].title + ' ' + str(tgt)}, TP={tp}")
    with torch.no_grad():
        state, report = convert_state(merged, widths, src_monarch, tgt, tp, log)
    del merged
    shards = split_tp(state, tp)
    provenance = {"to": to, "tool": "launcher/convert_checkpoint.py", **report}
    run_state = converted_run_state(src, output_dir, tgt, tp, provenance)
    write_checkpoint(output_dir, shards, src.meta[0], run_state, force)
    if os.path.basename(os.path.dirname(os.path.abspath(output_dir))) == "checkpoints":
        log("  note: the output is inside a run's checkpoints/ directory; that run's resume scan skips it (it is "
            "marked converted_from and has no optimizer state); start a new run from it with "
            f"training.init_from={output_dir}")
    report.update(run_state=run_state.to_json(), seconds=time.perf_counter() - t0)
    log(f"wrote {output_dir} ({run_state.phase_kind}, TP={tp}, {len(shards)} model file(s), no optimizer state: "
        f"training from it starts fresh optimizer moments) in {report['seconds']:.1f}s")
    return report
