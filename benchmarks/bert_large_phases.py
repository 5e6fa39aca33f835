"""BERT-large with a Monarch -> dense switch, through the real service: throughput of each phase and the switch.

    python benchmarks/bert_large_phases.py [--steps 150] [--precision fp16] [--micro-batch 64] [--nproc 1] [key=value ...]

Runs ``launcher/pretrain.py --config configs/bert_large_monarch.yaml`` (24 layers, hidden 1024, 16
heads; Monarch fc1/fc2/qkv/proj with nblocks 4, then dense) with overrides that keep both phases at
sequence 128 and the same batch, so the two phases are measured side by side in one run: the
Monarch phase and the converted dense phase (megatron-core's stock local spec). The data is the
embedded demo corpus (built locally; only its vocabulary, 4096, differs from the recipe's 32768,
and the model's vocabulary is padded to the recipe's 32768 so the output layer costs what it
would). Reads ``metrics.jsonl`` of the run and prints, per phase, the median step time, tokens/s,
model TFLOP/s per GPU and peak memory (steps after the first ``--skip`` of each phase), and the
switch's wall time; writes ``$OUT/bert_large_phases.json`` when ``$OUT`` is set.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_training(args: argparse.Namespace, output_dir: str) -> float:
    overrides = [
        f"output_dir={output_dir}",
        "data.source=demo", "data.prefix=null", "data.tokenizer_model=null", "data.vocab_size=4096",
        "data.split=[95,5]", "data.num_workers=2",
        "model.vocab_size=32768",
        f"precision.dtype={args.precision}",
        f"training.total_steps={2 * args.steps}", "training.seq_length=128",
        f"training.micro_batch_size={args.micro_batch}",
        f"training.global_batch_size={args.micro_batch * args.nproc}",
        "training.log_interval=10", f"training.eval_interval={10 * args.steps}", "training.eval_iters=2",
        f"training.save_interval={10 * args.steps}",
        "lr_schedule.warmup_fraction=0.1", "lr_schedule.scope=phase",
        f"phases.0.steps={args.steps}", f"phases.1.steps={args.steps}",
        "phases.1.seq_length=128", f"phases.1.micro_batch_size={args.micro_batch}",
        f"phases.1.global_batch_size={args.micro_batch * args.nproc}",
    ]
    script = os.path.join(ROOT, "launcher", "pretrain.py")
    config = os.path.join(ROOT, "configs", "bert_large_monarch.yaml")
    if args.nproc > 1:
        cmd = ["torchrun", "--standalone", f"--nproc_per_node={args.nproc}", script]
    else:
        cmd = [sys.executable, script]
    cmd += ["--config", config, *overrides, *args.overrides]
    print("+", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.perf_counter() - start


def summarise(output_dir: str, skip: int) -> dict:
    rows = [json.loads(line) for line in open(os.path.join(output_dir, "metrics.jsonl"))]
    train = [r for r in rows if r["kind"] == "train"]
    phases: dict[int, list[dict]] = {}
    for r in train:
        phases.setdefault(int(r["phase"]), []).append(r)
    out = {"phases": {}, "switch": [r for r in rows if r["kind"] == "switch"]}
    for index, steps in sorted(phases.items()):
        steady = steps[skip:] or steps
        med = {key: statistics.median(r[key] for r in steady)
               for key in ("iteration-time", "tokens-per-sec", "throughput")}
        mem = [r["max-memory-gb"] for r in steady if r.get("max-memory-gb") is not None]
        out["phases"][index] = {"steps": len(steps), "measured_steps": len(steady), **med,
                                "max-memory-gb": max(mem) if mem else None,
                                "last lm loss": steps[-1].get("lm loss")}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150, help="steps per phase")
    parser.add_argument("--precision", default="fp16", choices=["fp16", "bf16", "fp32"])
    parser.add_argument("--micro-batch", type=int, default=64)
    parser.add_argument("--nproc", type=int, default=1, help="GPUs (data parallel)")
    parser.add_argument("--skip", type=int, default=20, help="warm-up steps of each phase left out")
    parser.add_argument("--output-dir", default=None, help="run directory (default: a temporary one)")
    parser.add_argument("overrides", nargs="*", help="extra key=value config overrides (e.g. a tiny model for a CPU smoke test)")
    args = parser.parse_args()
    output_dir = args.output_dir or tempfile.mkdtemp(prefix="bert_large_phases_")
    wall = run_training(args, output_dir)
    summary = summarise(output_dir, args.skip)
    summary.update(wall_seconds=wall, args=vars(args))
    try:
        import torch

        summary["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception:  # the summary is still worth printing without the device name
        summary["device"] = "unknown"

    names = {0: "monarch (seq 128)", 1: "dense (seq 128)"}
    print(f"\nBERT-large, {args.precision}, micro batch {args.micro_batch} x {args.nproc} GPU(s), "
          f"seq 128, {summary['device']}")
    print("| phase | steps (measured) | step time ms | tokens/s | model TFLOP/s per GPU | peak memory GB | last lm loss |")
    print("|---|---|---|---|---|---|---|")
    for index, p in summary["phases"].items():
        mem = f"{p['max-memory-gb']:.1f}" if p["max-memory-gb"] is not None else "n/a"
        print(f"| {names.get(index, index)} | {p['steps']} ({p['measured_steps']}) | "
              f"{1e3 * p['iteration-time']:.1f} | {p['tokens-per-sec']:,.0f} | {p['throughput']:.1f} | "
              f"{mem} | {p['last lm loss']:.3f} |")
    for s in summary["switch"]:
        print("switch:", ", ".join(f"{k} {v:.6g}" if isinstance(v, float) else f"{k} {v}" for k, v in s.items()))
    if len(summary["phases"]) == 2:
        speedup = summary["phases"][0]["tokens-per-sec"] / summary["phases"][1]["tokens-per-sec"]
        print(f"Monarch phase / dense phase tokens/s: {speedup:.2f}x")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bert_large_phases.json"), "w") as f:
            json.dump(summary, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
