"""Time to quality on a real corpus: dense, Monarch, and reverse sparsification, same everything else (issue 14).

    python benchmarks/build_doc_corpus.py                                   # once: data/doccorpus
    python benchmarks/time_to_quality.py                                    # the three GPT-2 small arms, one GPU
    python benchmarks/time_to_quality.py --arms reverse --out $OUT           # one arm per invocation
    python benchmarks/time_to_quality.py --merge results/a results/b --out benchmarks/results
    python benchmarks/time_to_quality.py --case bert-base --arms dense,reverse
    python benchmarks/time_to_quality.py --dry-run                          # each arm's plan, no training
    python benchmarks/time_to_quality.py --steps 6 --seq 64 --micro-batch 2 --global-batch 2 --evals 3 \\
        model.num_layers=2 model.hidden_size=64 model.num_attention_heads=2 model.ffn_hidden_size=256  # CPU smoke test

Each arm runs ``launcher/pretrain.py`` on the case's recipe config (:data:`CASES`) with the corpus of
``benchmarks/build_doc_corpus.py`` (its manifest's ``overrides``: data.prefix, tokenizer and the
by-document ``data.split``, so validation is on held-out documents) and these overrides, identical
for every arm of a case:

* the token budget: ``--epochs`` passes over the training tokens (or ``--steps``), at ``--seq``,
  ``--micro-batch`` and ``--global-batch``; one seed; AdamW at the recipe's learning rate, warm-up
  ``--warmup-fraction`` of the run, then linear decay to zero over the whole run (``scope: run``);
* the same two-phase plan, split at ``--monarch-share`` (0.8) of the steps. The arms differ only in
  the layers of each phase: **dense** is dense, dense (``optimizer_state: keep``); **monarch** is
  Monarch, Monarch (``keep``); **reverse** is Monarch, then the exact switch to dense (fresh Adam
  moments, a re-warm-up of ``--rewarmup-steps``, default as long as the run's own warm-up). The
  trainer draws each phase's samples from (seed + phase index, the phase's sample count), so equal
  plans mean the **same data order** in every arm; a ``keep`` transition continues the model and the
  optimizer state unchanged, so the dense and Monarch arms are the uninterrupted runs they stand for;
* validation every ``total / --evals`` steps on the held-out documents: ``eval_iters`` micro-batches
  that cover the validation split once (at most), so the validation loss is the mean over nearly
  every held-out token whichever phase's shuffle drew the samples.

Time axis. **Training seconds** = the sum of the step times in ``metrics.jsonl`` (``iteration-time``:
CUDA-event time of each step, CUDA-graph capture and kernel autotuning of a phase's first steps
included) + the Monarch -> dense switch (its ``switch`` record: conversion, new engine). Left out:
start-up (process, data, model build), validation and checkpoint saves, which do not depend on
the arm's layers. The first steps after a ``keep`` transition re-capture graphs that an
uninterrupted run would not: their excess over the phase's median step time is removed and
reported (``keep_transition_excess_seconds``). Process wall time is reported too.

Per arm ``time_to_quality_<case>_<arm>.json`` (and the arm's ``metrics.jsonl``, ``train.log`` and
``config.yaml`` under ``<case>_<arm>/``) go to ``--out`` (default ``$OUT``); with two or more arms
of a case (in this call, or given to ``--merge``), ``time_to_quality.json``, ``time_to_quality.md``
(the table of issue 14: final validation loss and perplexity per arm, training seconds, the seconds
and tokens at which each arm first reaches the dense arm's final validation loss, and the ratio to
dense) and, when matplotlib is installed, ``time_to_quality.png`` (validation loss against tokens and
against training seconds, the switch marked).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # runnable from a checkout without `pip install -e .`
from monarch_megatron.training import loss_curves  # noqa: E402

ARMS = ("dense", "monarch", "reverse")
ARM_LABELS = {"dense": "dense throughout", "monarch": "Monarch throughout",
              "reverse": "reverse sparsification (Monarch, then dense)"}
# The targets: reverse within 1% of dense's final validation loss, Monarch within 5%,
# reverse reaching dense's final loss in <= 1/1.4 of dense's training time.
TARGET_REVERSE_LOSS, TARGET_MONARCH_LOSS, TARGET_REVERSE_TIME = 0.01, 0.05, 1 / 1.4

# Per case: the recipe config, sequence length, micro and global batch, the validation metric, the
# Monarch layers of the Monarch phases, and overrides on top of the config.
CASES: dict[str, dict[str, Any]] = {
    # The paper's GPT-2 small (12 x 768, seq 1024, Monarch MLP with 4 blocks, attention dense), AdamW
    # at the recipe's 6e-4; micro 16 x 4 is the shape measured in benchmarks/RESULTS.md "Issue 11"
    # (~400k tokens/s on one H200 in both phases, then with Monarch attention projections too).
    "gpt2-small": {"config": "gpt2_small_monarch.yaml", "seq": 1024, "micro": 16, "global": 64,
                   "metric": "lm loss", "layers": ["fc1", "fc2"], "overrides": []},
    # BERT-base sizes (12 x 768) on the BERT recipe's data handling (masked LM + sentence order),
    # seq 128, AdamW (the recipe's LAMB at 65536 sequences per step does not fit this token budget).
    "bert-base": {"config": "bert_large_monarch.yaml", "seq": 128, "micro": 64, "global": 256,
                  "metric": "lm loss", "layers": ["fc1", "fc2"],
                  "overrides": ["model.num_layers=12", "model.hidden_size=768", "model.num_attention_heads=12",
                                "model.ffn_hidden_size=3072", "optimizer.name=adamw", "optimizer.lr=5e-4",
                                "optimizer.weight_decay=0.01", "optimizer.eps=1e-6"]},
}


# -- planning -------------------------------------------------------------------------------------
def load_manifest(data_dir: str) -> dict:
    path = os.path.join(data_dir, "manifest.json")
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} not found: build the corpus first (python benchmarks/build_doc_corpus.py "
                         f"--out {data_dir})")
    with open(path) as f:
        manifest = json.load(f)
    prefix = manifest["prefix"]
    if not os.path.isabs(prefix) or not os.path.exists(prefix + ".model"):
        # The manifest names where it was built; the corpus may have moved with its folder.
        prefix = os.path.join(os.path.abspath(data_dir), os.path.basename(prefix))
    manifest["prefix"] = prefix
    return manifest


def data_overrides(manifest: dict) -> list[str]:
    prefix, split = manifest["prefix"], manifest["split"]
    return ["data.source=indexed", f"data.prefix={prefix}", f"data.tokenizer_model={prefix}.model",
            f"data.vocab_size={manifest['vocab_size']}", f"data.split=[{split[0]},{split[1]}]"]


def plan(args: argparse.Namespace, manifest: dict, case: dict) -> dict:
    """Steps, phase lengths, evaluation schedule: the same for every arm."""
    seq, micro, glob_ = args.seq or case["seq"], args.micro_batch or case["micro"], args.global_batch or case["global"]
    train_tokens = manifest["tokens"]["train"]
    steps = args.steps or max(2, round(args.epochs * train_tokens / (glob_ * seq)))
    first = min(steps - 1, max(1, round(args.monarch_share * steps)))
    # Held-out samples in one pass (megatron's GPT count: (tokens incl. [EOD] - 1) // seq); BERT's
    # samples are shorter than seq on average, so the same count stays within one pass too.
    valid_samples = (manifest["gpt_tokens_with_eod"]["valid"] - 1) // seq
    eval_iters = args.eval_iters or max(1, min(valid_samples // micro, 64))
    eval_interval = max(1, steps // args.evals)
    warmup = max(1, round(args.warmup_fraction * steps))
    return {"steps": steps, "phase_steps": [first, steps - first], "seq": seq, "micro_batch": micro,
            "global_batch": glob_, "tokens_per_step": glob_ * seq, "tokens": steps * glob_ * seq,
            "epochs": steps * glob_ * seq / train_tokens, "eval_interval": eval_interval, "eval_iters": eval_iters,
            "eval_tokens": eval_iters * micro * seq, "warmup_steps": warmup,
            "rewarmup_steps": warmup if args.rewarmup_steps is None else args.rewarmup_steps}


def phases_override(arm: str, p: dict, layers: Sequence[str], nblocks: int) -> str:
    monarch = f"{{layers: [{', '.join(layers)}], nblocks: {nblocks}}}"
    first, second = p["phase_steps"]
    if arm == "dense":
        phases = [f"{{name: dense, steps: {first}, monarch: null}}",
                  f"{{name: dense_cont, steps: {second}, monarch: null, optimizer_state: keep}}"]
    elif arm == "monarch":
        phases = [f"{{name: monarch, steps: {first}, monarch: {monarch}}}",
                  f"{{name: monarch_cont, steps: {second}, monarch: {monarch}, optimizer_state: keep}}"]
    elif arm == "reverse":
        phases = [f"{{name: monarch, steps: {first}, monarch: {monarch}}}",
                  f"{{name: dense, steps: {second}, monarch: null, optimizer_state: fresh, "
                  f"rewarmup_steps: {p['rewarmup_steps']}}}"]
    else:
        raise ValueError(f"unknown arm {arm!r}")
    return f"phases=[{', '.join(phases)}]"


def arm_overrides(arm: str, args: argparse.Namespace, manifest: dict, case: dict, p: dict, output_dir: str) -> list[str]:
    return [
        f"output_dir={output_dir}", f"run_name=ttq_{args.case}_{arm}", f"seed={args.seed}",
        *data_overrides(manifest), "data.num_workers=2", "model.vocab_size=null",
        f"precision.dtype={args.precision}",
        *case["overrides"],
        *([f"optimizer.lr={args.lr}"] if args.lr is not None else []),
        f"lr_schedule.warmup_steps={p['warmup_steps']}", "lr_schedule.warmup_fraction=0.0",
        "lr_schedule.decay_style=linear", "lr_schedule.min_lr=0.0", "lr_schedule.scope=run",
        f"training.total_steps={p['steps']}", f"training.seq_length={p['seq']}",
        f"training.micro_batch_size={p['micro_batch']}", f"training.global_batch_size={p['global_batch']}",
        "training.log_interval=10", f"training.eval_interval={p['eval_interval']}",
        f"training.eval_iters={p['eval_iters']}", f"training.save_interval={10 * p['steps']}",
        "training.save_at_switch=false", "training.keep_last=1",
        phases_override(arm, p, case["layers"], args.nblocks),
        *args.overrides,
    ]


# -- reading a run --------------------------------------------------------------------------------
def curve(rows: Sequence[dict], metric: str, tokens_per_step: int, keep_phases: Sequence[int] = ()) -> dict:
    """Validation points with tokens and training seconds at each; see the module docstring.

    ``keep_phases``: indices of phases entered by a ``keep`` transition, whose first steps' excess
    over the phase median is removed from the time axis.
    """
    train = sorted((r for r in rows if r.get("kind") == "train"), key=lambda r: r["step"])
    by_phase: dict[int, list[dict]] = {}
    for r in train:
        by_phase.setdefault(int(r.get("phase", 0)), []).append(r)
    excess = {}
    for index in keep_phases:
        rs = by_phase.get(index, [])
        if len(rs) > 3:
            median = statistics.median(r["iteration-time"] for r in rs)
            for r in rs[:3]:
                excess[r["step"]] = max(0.0, r["iteration-time"] - median)
    curves = loss_curves.run_curves(rows, metric, excess)
    phases = {}
    for index, rs in sorted(by_phase.items()):
        phases[index] = {"steps": len(rs), "first_step": rs[0]["step"], "last_step": rs[-1]["step"],
                         "median_step_seconds": statistics.median(r["iteration-time"] for r in rs),
                         "median_tokens_per_sec": statistics.median(r["tokens-per-sec"] for r in rs)}
    return {"points": [{**pt, "tokens": pt["step"] * tokens_per_step} for pt in curves["valid"]],
            "train": curves["train"], "phases": phases,
            "switch": [{**sw, "tokens": sw["step"] * tokens_per_step} for sw in curves["switch"]],
            "train_seconds": curves["train_seconds"], "keep_transition_excess_seconds": sum(excess.values())}


def arm_curve(result: dict, rows: Sequence[dict]) -> dict:
    """:func:`curve` for one arm's result (its metric, step size, and which phases were ``keep``)."""
    keep_phases = [1] if result["arm"] in ("dense", "monarch") else []
    return curve(rows, result["metric"], result["plan"]["tokens_per_step"], keep_phases)


def device_name() -> str:
    """The GPU's name, without creating a CUDA context in this process ("cpu" without CUDA)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return "cpu"
        proc = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", "0"],
                              capture_output=True, text=True)
        return proc.stdout.strip() or "cuda"
    except Exception:  # the name is a nicety
        return "cuda"


def git_commit() -> str | None:
    """Short commit of the checkout, ``+dirty`` with uncommitted changes; None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True)
    except OSError:
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def run_arm(arm: str, args: argparse.Namespace, manifest: dict, p: dict) -> dict:
    case = CASES[args.case]
    runs_dir = args.runs_dir or tempfile.gettempdir()
    os.makedirs(runs_dir, exist_ok=True)
    output_dir = tempfile.mkdtemp(prefix=f"ttq_{args.case}_{arm}_", dir=runs_dir)
    cmd = [sys.executable, os.path.join(ROOT, "launcher", "pretrain.py"), "--config",
           os.path.join(ROOT, "configs", case["config"]), *arm_overrides(arm, args, manifest, case, p, output_dir)]
    print("+", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - t0
    keep = os.path.join(args.out, f"{args.case}_{arm}")
    os.makedirs(keep, exist_ok=True)
    with open(os.path.join(keep, "console.log"), "w") as f:
        f.write(proc.stdout)
    for name in ("metrics.jsonl", "train.log", "config.yaml"):
        if os.path.isfile(os.path.join(output_dir, name)):
            shutil.copy(os.path.join(output_dir, name), os.path.join(keep, name))
    result = {"case": args.case, "arm": arm, "label": ARM_LABELS[arm], "returncode": proc.returncode,
              "wall_seconds": wall, "plan": p, "metric": case["metric"], "command": cmd,
              "device": args.device, "precision": args.precision, "date": time.strftime("%Y-%m-%d"),
              "git": git_commit(), "seed": args.seed,
              "corpus": {"packages": [f"{q['package']} {q['version']}" for q in manifest["packages"]],
                         "corpus_jsonl_sha256": manifest["corpus_jsonl"]["sha256"], "tokens": manifest["tokens"],
                         "documents": manifest["documents"], "split": manifest["split"]}}
    metrics = os.path.join(output_dir, "metrics.jsonl")
    if proc.returncode != 0 or not os.path.isfile(metrics):
        print(proc.stdout[-6000:], flush=True)
    if os.path.isfile(metrics):
        result["metrics_file"] = os.path.join(f"{args.case}_{arm}", "metrics.jsonl")  # relative to the JSON
        result.update(arm_curve(result, loss_curves.read_records(metrics)))
    if not args.keep_runs:
        shutil.rmtree(output_dir, ignore_errors=True)
    else:
        result["output_dir"] = output_dir
    path = os.path.join(args.out, f"time_to_quality_{args.case}_{arm}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{args.case} {arm}: exit {proc.returncode}, {wall:.0f} s wall"
          + (f", final validation {case['metric']} {result['points'][-1]['loss']:.4f}, "
             f"{result['train_seconds']:.1f} training seconds" if result.get("points") else ""), flush=True)
    return result


# -- summary --------------------------------------------------------------------------------------
def first_reaching(points: Sequence[dict], target: float) -> dict | None:
    """The first validation point at or below ``target``, and where linear interpolation between it
    and the point before crosses ``target`` (tokens and seconds)."""
    prev = None
    for pt in points:
        if pt["loss"] <= target:
            out = {"step": pt["step"], "tokens": pt["tokens"], "seconds": pt["seconds"]}
            if prev is not None and prev["loss"] > pt["loss"]:
                f = (prev["loss"] - target) / (prev["loss"] - pt["loss"])
                out["tokens_interpolated"] = prev["tokens"] + f * (pt["tokens"] - prev["tokens"])
                out["seconds_interpolated"] = prev["seconds"] + f * (pt["seconds"] - prev["seconds"])
            else:
                out["tokens_interpolated"], out["seconds_interpolated"] = pt["tokens"], pt["seconds"]
            return out
        prev = pt
    return None


def consistency(arms: Sequence[dict]) -> list[str]:
    """Reasons the arms are not comparable (different data, budget, plan shape or seed)."""
    problems = []
    for key, get in (("corpus", lambda r: r["corpus"]["corpus_jsonl_sha256"]),
                     ("plan", lambda r: {k: v for k, v in r["plan"].items() if k != "rewarmup_steps"}),
                     ("seed", lambda r: r.get("seed")), ("precision", lambda r: r.get("precision")),
                     ("device", lambda r: r.get("device"))):
        values = {json.dumps(get(r), sort_keys=True) for r in arms}
        if len(values) > 1:
            problems.append(f"arms differ in {key}: " + "; ".join(f"{r['arm']}={json.dumps(get(r))}" for r in arms))
    return problems


def summarise(results: Sequence[dict]) -> dict:
    """Per case: final loss, perplexity, time and tokens to the dense arm's final loss, targets."""
    cases: dict[str, dict] = {}
    for r in results:
        cases.setdefault(r["case"], {})[r["arm"]] = r
    out = {}
    for name, arms in sorted(cases.items()):
        ok = {a: r for a, r in arms.items() if r.get("returncode") == 0 and r.get("points")}
        dense = ok.get("dense")
        target = dense["points"][-1]["loss"] if dense else None
        rows = {}
        for arm in [a for a in ARMS if a in arms] + sorted(set(arms) - set(ARMS)):
            r = arms[arm]
            if arm not in ok:
                rows[arm] = {"failed": True, "returncode": r.get("returncode")}
                continue
            final = r["points"][-1]["loss"]
            row = {"final_loss": final, "perplexity": math.exp(final), "train_seconds": r["train_seconds"],
                   "wall_seconds": r["wall_seconds"], "tokens": r["points"][-1]["tokens"],
                   "validation_points": len(r["points"]), "min_loss": min(pt["loss"] for pt in r["points"]),
                   "switch": r.get("switch") or None,
                   "keep_transition_excess_seconds": r.get("keep_transition_excess_seconds", 0.0),
                   "median_tokens_per_sec": {str(k): v["median_tokens_per_sec"] for k, v in r["phases"].items()}}
            if target is not None:
                row["vs_dense"] = (final - target) / target
                reach = first_reaching(r["points"], target)
                row["reaches_dense_final"] = reach
                dense_reach = first_reaching(dense["points"], target)
                if reach is not None and dense_reach is not None:
                    row["time_ratio_vs_dense"] = reach["seconds_interpolated"] / dense_reach["seconds_interpolated"]
                    row["token_ratio_vs_dense"] = reach["tokens_interpolated"] / dense_reach["tokens_interpolated"]
            rows[arm] = row
        targets = {}
        if target is not None:
            if "reverse" in rows and not rows["reverse"].get("failed"):
                rv = rows["reverse"]
                targets["reverse_final_loss_within_1pct"] = abs(rv["vs_dense"]) <= TARGET_REVERSE_LOSS or rv["vs_dense"] < 0
                targets["reverse_time_ratio_le_1/1.4"] = (rv.get("time_ratio_vs_dense") is not None
                                                          and rv["time_ratio_vs_dense"] <= TARGET_REVERSE_TIME)
            if "monarch" in rows and not rows["monarch"].get("failed"):
                mv = rows["monarch"]["vs_dense"]
                targets["monarch_final_loss_within_5pct"] = abs(mv) <= TARGET_MONARCH_LOSS or mv < 0
        any_arm = next(iter(arms.values()))
        out[name] = {"dense_final_loss": target, "arms": rows, "targets": targets,
                     "consistency_problems": consistency(list(ok.values())), "plan": any_arm.get("plan"),
                     "corpus": any_arm.get("corpus"), "device": any_arm.get("device"),
                     "precision": any_arm.get("precision"), "date": any_arm.get("date"), "git": any_arm.get("git"),
                     "metric": any_arm.get("metric")}
    return out


def _fmt_tokens(n: float) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def markdown(summary: dict) -> str:
    lines = []
    for name, s in summary.items():
        p = s["plan"] or {}
        c = s["corpus"] or {}
        lines.append(f"**{name}** on {s['device']}, {s['precision']}, {s['date']} (commit {s['git']}): "
                     f"{p.get('steps')} steps of {p.get('global_batch')} x {p.get('seq')} tokens "
                     f"({_fmt_tokens(p.get('tokens', 0))} tokens, {p.get('epochs', 0):.2f} epochs of "
                     f"{_fmt_tokens(c.get('tokens', {}).get('train', 0))} training tokens), phases "
                     f"{p.get('phase_steps')}, validation {s['metric']} every {p.get('eval_interval')} steps on "
                     f"{_fmt_tokens(p.get('eval_tokens', 0))} held-out tokens "
                     f"({c.get('documents', {}).get('valid')} documents). Corpus: {', '.join(c.get('packages', []))}.")
        lines.append("")
        lines.append("| arm | final val loss | perplexity | vs dense | training s | reaches dense's final loss at | "
                     "tokens then | time / dense's |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for arm, row in s["arms"].items():
            label = ARM_LABELS.get(arm, arm)
            if row.get("failed"):
                lines.append(f"| {label} | failed (exit {row['returncode']}) | | | | | | |")
                continue
            reach = row.get("reaches_dense_final")
            vs = f"{100 * row['vs_dense']:+.2f}%" if "vs_dense" in row else "n/a"
            at = f"{reach['seconds_interpolated']:.1f} s (step {reach['step']})" if reach else "never"
            tok = _fmt_tokens(reach["tokens_interpolated"]) if reach else ""
            ratio = f"**{row['time_ratio_vs_dense']:.2f}x**" if row.get("time_ratio_vs_dense") is not None else ""
            lines.append(f"| {label} | {row['final_loss']:.4f} | {row['perplexity']:.2f} | {vs} | "
                         f"{row['train_seconds']:.1f} | {at} | {tok} | {ratio} |")
        lines.append("")
        names = {"reverse_final_loss_within_1pct": "reverse final loss within 1% of dense",
                 "monarch_final_loss_within_5pct": "Monarch final loss within 5% of dense",
                 "reverse_time_ratio_le_1/1.4": "reverse reaches dense's final loss in <= 1/1.4 of dense's time"}
        for key, met in s["targets"].items():
            lines.append(f"- {names.get(key, key)}: {'**yes**' if met else 'no'}")
        for problem in s["consistency_problems"]:
            lines.append(f"- WARNING: {problem}")
        lines.append("")
    return "\n".join(lines)


def plot(results: Sequence[dict], summary: dict, path: str) -> bool:
    """Validation loss vs tokens and vs training seconds, one figure per case; False without matplotlib."""
    try:
        plt = loss_curves.pyplot()
    except loss_curves.PlottingUnavailable:
        return False
    cases = sorted({r["case"] for r in results})
    fig, axes = plt.subplots(len(cases), 2, figsize=(12, 4.5 * len(cases)), squeeze=False)
    colours = {"dense": "tab:blue", "monarch": "tab:orange", "reverse": "tab:green"}
    for row, name in zip(axes, cases):
        target = summary[name]["dense_final_loss"]
        for r in results:
            if r["case"] != name or not r.get("points"):
                continue
            colour = colours.get(r["arm"])
            for ax, key, scale in ((row[0], "tokens", 1e-6), (row[1], "seconds", 1.0)):
                line = loss_curves.draw_curve(ax, r["points"], key, scale, marker=".", color=colour,
                                              label=ARM_LABELS.get(r["arm"], r["arm"]))
                loss_curves.mark_switches(ax, r.get("switch") or [], key, line.get_color(), scale)
        for ax, xlabel in ((row[0], "tokens (millions)"), (row[1], "training seconds")):
            if target is not None:
                ax.axhline(target, color="grey", linestyle="--", linewidth=0.8, label="dense final loss")
            loss_curves.finish_axes(ax, xlabel, f"validation {summary[name]['metric']}",
                                    f"{name}: validation loss vs {xlabel.split(' (')[0]}")
    loss_curves.save_figure(fig, path)
    return True


def load_results(paths: Sequence[str]) -> list[dict]:
    """Arm results from files and folders (``time_to_quality_*_*.json`` in them; curves recomputed
    from the arm's ``metrics.jsonl`` when it lies beside the file); the newest file wins when a
    (case, arm) appears twice."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            files += glob.glob(os.path.join(path, "time_to_quality_*_*.json"))
        else:
            files.append(path)
    found: dict[tuple[str, str], tuple[float, dict]] = {}
    for f in files:
        with open(f) as fh:
            r = json.load(fh)
        metrics = os.path.join(os.path.dirname(f), r.get("metrics_file") or "-")
        if "arm" in r and os.path.isfile(metrics):  # recompute from the raw rows beside it
            r.update(arm_curve(r, loss_curves.read_records(metrics)))
        if "arm" not in r:  # a merged file: take its arms
            for a in r.get("results", []):
                key = (a["case"], a["arm"])
                if key not in found:
                    found[key] = (os.path.getmtime(f) - 1e-3, a)
            continue
        key = (r["case"], r["arm"])
        mtime = os.path.getmtime(f)
        if key not in found or mtime >= found[key][0]:
            found[key] = (mtime, r)
    order = {a: i for i, a in enumerate(ARMS)}
    return [r for _, r in sorted(found.values(), key=lambda x: (x[1]["case"], order.get(x[1]["arm"], 99)))]


def write_summary(results: Sequence[dict], out: str) -> dict:
    summary = summarise(results)
    with open(os.path.join(out, "time_to_quality.json"), "w") as f:
        json.dump({"summary": summary, "results": list(results)}, f, indent=1)
    text = markdown(summary)
    with open(os.path.join(out, "time_to_quality.md"), "w") as f:
        f.write(text)
    print(text, flush=True)
    png = os.path.join(out, "time_to_quality.png")
    print(f"plot: {png}" if plot(results, summary, png) else "plot: matplotlib not installed, no PNG", flush=True)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", default="gpt2-small", choices=sorted(CASES))
    ap.add_argument("--arms", default=",".join(ARMS), help="comma-separated, from: " + ", ".join(ARMS))
    ap.add_argument("--data", default="data/doccorpus", help="benchmarks/build_doc_corpus.py --out (default %(default)s)")
    ap.add_argument("--epochs", type=float, default=2.0, help="passes over the training tokens (default %(default)s)")
    ap.add_argument("--steps", type=int, default=None, help="total steps (instead of --epochs)")
    ap.add_argument("--seq", type=int, default=None, help="sequence length (default: the case's)")
    ap.add_argument("--micro-batch", type=int, default=None)
    ap.add_argument("--global-batch", type=int, default=None)
    ap.add_argument("--monarch-share", type=float, default=0.8, help="share of steps in the first phase")
    ap.add_argument("--nblocks", type=int, default=4)
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the case's)")
    ap.add_argument("--warmup-fraction", type=float, default=0.05)
    ap.add_argument("--rewarmup-steps", type=int, default=None, help="after the switch (default: the warm-up's length)")
    ap.add_argument("--evals", type=int, default=25, help="validation points per run (at least)")
    ap.add_argument("--eval-iters", type=int, default=None, help="validation micro-batches (default: one pass)")
    ap.add_argument("--seed", type=int, default=1111)
    ap.add_argument("--precision", default=None, choices=["fp32", "fp16", "bf16"], help="default: bf16 on GPU, fp32 on CPU")
    ap.add_argument("--time-budget", type=float, default=None, help="seconds; no arm starts past it")
    ap.add_argument("--runs-dir", default=None, help="where runs train (default: the temp folder); removed after")
    ap.add_argument("--keep-runs", action="store_true", help="keep each run's output_dir (checkpoints)")
    ap.add_argument("--dry-run", action="store_true", help="print each arm's plan (launcher --dry-run), train nothing")
    ap.add_argument("--merge", nargs="+", metavar="PATH", help="merge arm results (files or folders) and summarise")
    ap.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results",
                    help="where results go (default $OUT, else %(default)s)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides for every arm (after the benchmark's)")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    if args.merge:
        results = load_results(args.merge)
        if not results:
            ap.error(f"no time_to_quality_*_*.json under {args.merge}")
        write_summary(results, args.out)
        return 0

    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        ap.error(f"unknown arm(s) {unknown}; choose from {', '.join(ARMS)}")
    args.device = device_name()
    args.precision = args.precision or ("fp32" if args.device == "cpu" else "bf16")
    manifest = load_manifest(args.data)
    p = plan(args, manifest, CASES[args.case])
    print(f"{args.case}: {p['steps']} steps ({p['phase_steps'][0]} + {p['phase_steps'][1]}) of {p['global_batch']} x "
          f"{p['seq']} tokens = {_fmt_tokens(p['tokens'])} tokens ({p['epochs']:.2f} epochs); validation every "
          f"{p['eval_interval']} steps on {p['eval_iters']} x {p['micro_batch']} held-out sequences; {args.device}, "
          f"{args.precision}", flush=True)
    if args.dry_run:  # each arm's plan and config checks, no training
        rc = 0
        for arm in arms:
            case = CASES[args.case]
            cmd = [sys.executable, os.path.join(ROOT, "launcher", "pretrain.py"), "--config",
                   os.path.join(ROOT, "configs", case["config"]), "--dry-run",
                   *arm_overrides(arm, args, manifest, case, p, os.path.join(tempfile.gettempdir(), f"ttq_dry_{arm}"))]
            print(f"== {arm}: " + " ".join(cmd), flush=True)
            rc = max(rc, subprocess.run(cmd, cwd=ROOT).returncode)
        return rc
    start, longest, results = time.perf_counter(), 0.0, []
    for arm in arms:
        if args.time_budget is not None and time.perf_counter() - start + 1.2 * longest > args.time_budget:
            print(f"skipping {arm}: time budget", flush=True)
            continue
        r = run_arm(arm, args, manifest, p)
        longest = max(longest, r["wall_seconds"])
        results.append(r)
    # Summarise with whatever else of this case is already in --out (arms run by earlier calls).
    merged = load_results([args.out])
    if len({r["arm"] for r in merged if r["case"] == args.case}) >= 2:
        write_summary(merged, args.out)
    return 0 if all(r["returncode"] == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
