"""The two phases as users run them: Monarch phase and dense phase of one run, through the real trainer.

    python benchmarks/phase_throughput.py                                  # every case, the fast step
    python benchmarks/phase_throughput.py --cases bert-large-64 --paths fast,plain
    python benchmarks/phase_throughput.py --cases paper,bert-large-64,gpt2-medium-8   # the paper's configurations next to ours
    python benchmarks/phase_throughput.py --compare-losses bert-large-64 --cases ''  # fast vs plain losses only, dropout off

Each case runs ``launcher/pretrain.py`` on a recipe config (configs/*.yaml) with overrides that
keep both phases at the same sequence length, micro batch and accumulation (>= 4 micro-steps per
optimizer step), so the Monarch phase and the dense phase it switches to are measured side by side
in one process, on one GPU, with every speed-up the dense phase can take (the same fast step,
CUDA graphs, fused attention, masked-only BERT head). The data is the embedded demo corpus
(its tokenizer has 4096 pieces; the model's vocabulary is set to the recipe's, so the output layer
costs what it would). Per phase it reports the median over the steady steps (the first ``--skip``
of each phase and the profiled ones left out) of: tokens/s, model TFLOP/s per GPU and MFU (against
989 TFLOP/s, the H100/H200 datasheet's dense bf16/fp16, and against 790, the bf16 matrix product
measured on these machines), the device-busy share of the step (torch.profiler over 2 steps at the
end of each phase, training/profiling.py: the union of kernel, copy and memset time, over the median
step time and over the profiled steps' own wall time, which the profiler lengthens) and the peak
memory; then Monarch / dense tokens/s.

``--paths plain`` runs DeepSpeed's own forward/backward per micro-step (``training.fast_step=false``),
the path before the fast step. ``--compare-losses CASE`` trains CASE twice, fast and plain, with
dropout off (so both compute the same function on the same data), and reports the largest relative
difference of the per-step losses in each phase.

Everything goes to ``$OUT`` (or ``--out``): ``phase_throughput.json`` and each run's train.log.
``--time-budget`` stops starting new runs when the next one would not finish in time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASHEET_TFLOPS = 989.0   # H100/H200 SXM dense bf16/fp16 (the usual MFU denominator)
MEASURED_TFLOPS = 790.0    # an 8192^3 bf16 matrix product on these machines (../shared/device/README.md)

# The paper's recipe (configs/bert_large_blockdiag.yaml) warms up over a fixed 2000 / 200 steps;
# here both phases take the benchmark's warm-up fraction, as the other BERT cases do.
_FRACTION_WARMUP = ["lr_schedule.warmup_steps=null", "phases.1.lr_schedule=null"]
# name: (config, micro batch, accumulation, precision, extra overrides)
CASES = {
    # This project's layers: Monarch in the MLP and the attention projections.
    "bert-large-64": ("bert_large_monarch.yaml", 64, 4, "bf16", ["optimizer.name=adamw", "optimizer.lr=1e-4"]),
    "bert-large-256": ("bert_large_monarch.yaml", 256, 4, "bf16", ["optimizer.name=adamw", "optimizer.lr=1e-4"]),
    "bert-large-64-fp16-lamb": ("bert_large_monarch.yaml", 64, 4, "fp16", []),
    "gpt2-small-16": ("gpt2_small_monarch_attn.yaml", 16, 4, "bf16", []),
    "gpt2-small-32": ("gpt2_small_monarch_attn.yaml", 32, 4, "bf16", []),
    "gpt2-medium-8": ("gpt2_medium_monarch_attn.yaml", 8, 4, "bf16", []),
    "gpt2-medium-16": ("gpt2_medium_monarch_attn.yaml", 16, 4, "bf16", []),
    "bert-large-64-mlp": ("bert_large_monarch.yaml", 64, 4, "bf16",
                          ["optimizer.name=adamw", "optimizer.lr=1e-4", "phases.0.monarch.layers=[fc1,fc2]"]),
    # The paper's configurations (the authors' released ones, README "Recipes"): BERT-large with a
    # block-diagonal MLP (nblocks 4), attention dense; GPT-2 with a Monarch MLP, attention dense.
    "bert-large-blockdiag-64": ("bert_large_blockdiag.yaml", 64, 4, "bf16",
                                ["optimizer.name=adamw", "optimizer.lr=1e-4", *_FRACTION_WARMUP]),
    "bert-large-blockdiag-256": ("bert_large_blockdiag.yaml", 256, 4, "bf16",
                                 ["optimizer.name=adamw", "optimizer.lr=1e-4", *_FRACTION_WARMUP]),
    "bert-large-blockdiag-64-fp16-lamb": ("bert_large_blockdiag.yaml", 64, 4, "fp16", _FRACTION_WARMUP),
    "gpt2-small-16-mlp": ("gpt2_small_monarch.yaml", 16, 4, "bf16", []),
    "gpt2-medium-8-mlp": ("gpt2_medium_monarch.yaml", 8, 4, "bf16", []),
}
DEFAULT_CASES = "bert-large-64,bert-large-256,gpt2-small-16,gpt2-medium-8,bert-large-64-fp16-lamb"
PAPER_CASES = "bert-large-blockdiag-64,bert-large-blockdiag-256,gpt2-medium-8-mlp,gpt2-small-16-mlp"
# --cases also takes these names for their lists.
CASE_GROUPS = {"default": DEFAULT_CASES, "paper": PAPER_CASES}


DATA_CACHE = os.path.join(tempfile.gettempdir(), "phase_throughput_data")  # demo corpus, built once


def overrides(case: str, steps: int, path: str, out: str, dropout_off: bool, extra: list[str]) -> list[str]:
    config, micro, acc, precision, more = CASES[case]
    is_gpt = config.startswith("gpt")
    seq = 1024 if is_gpt else 128
    glob = micro * acc
    # Profile the last 2 steps before the end of each phase (windows in global 1-based steps).
    prof = [steps - 2, 2 * steps - 2]
    ov = [
        f"output_dir={out}", "data.source=demo", "data.prefix=null", "data.tokenizer_model=null",
        f"data.cache_dir={DATA_CACHE}",
        "data.vocab_size=4096", "data.split=[95,5]", "data.num_workers=2",
        f"model.vocab_size={50257 if is_gpt else 32768}",
        f"precision.dtype={precision}",
        f"training.total_steps={2 * steps}", f"training.seq_length={seq}",
        f"training.micro_batch_size={micro}", f"training.global_batch_size={glob}",
        "training.log_interval=10", f"training.eval_interval={100 * steps}", "training.eval_iters=1",
        f"training.save_interval={100 * steps}", "training.save_at_switch=false",
        f"training.profile.start_step=[{prof[0]},{prof[1]}]", "training.profile.num_steps=2",
        f"training.fast_step={'true' if path == 'fast' else 'false'}",
        "lr_schedule.warmup_fraction=0.1", "lr_schedule.scope=phase",
        f"phases.0.steps={steps}", f"phases.1.steps={steps}", "phases.0.share=null", "phases.1.share=null",
        f"phases.1.seq_length={seq}", f"phases.1.micro_batch_size={micro}", f"phases.1.global_batch_size={glob}",
        "phases.1.rewarmup_steps=0",
    ]
    if dropout_off:
        ov += ["model.hidden_dropout=0.0", "model.attention_dropout=0.0"]
    return ov + more + extra


def run(case: str, steps: int, path: str, args, dropout_off: bool = False) -> dict:
    config = CASES[case][0]
    out = tempfile.mkdtemp(prefix=f"{case}_{path}_")
    cmd = [sys.executable, os.path.join(ROOT, "launcher", "pretrain.py"), "--config",
           os.path.join(ROOT, "configs", config), *overrides(case, steps, path, out, dropout_off, args.overrides)]
    print("+", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    log = proc.stdout + proc.stderr
    name = f"{case}_{path}{'_nodropout' if dropout_off else ''}"
    if args.out:
        with open(os.path.join(args.out, f"{name}.log"), "w") as f:
            f.write(log)
    result = {"case": case, "path": path, "returncode": proc.returncode, "wall_seconds": wall}
    if proc.returncode != 0:
        print(log[-6000:], flush=True)
        shutil.rmtree(out, ignore_errors=True)
        return result
    result.update(summarise(out, steps, args.skip, case))
    shutil.rmtree(out, ignore_errors=True)
    return result


def summarise(out: str, steps: int, skip: int, case: str) -> dict:
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    train = [r for r in rows if r["kind"] == "train"]
    profiles = {}
    prof_dir = os.path.join(out, "profile")
    for fname in sorted(os.listdir(prof_dir)) if os.path.isdir(prof_dir) else []:
        if fname.startswith("rank0_") and fname.endswith(".summary.json"):
            s = json.load(open(os.path.join(prof_dir, fname)))
            profiles[0 if s["first_step"] <= steps else 1] = s
    phases = {}
    for index in (0, 1):
        rs = [r for r in train if int(r["phase"]) == index]
        steady = [r for r in rs[skip:] if not (steps * index + steps - 2 <= r["step"] <= steps * index + steps - 1)]
        steady = steady or rs
        med = {k: statistics.median(r[k] for r in steady) for k in ("iteration-time", "tokens-per-sec", "throughput")}
        mem = [r["max-memory-gb"] for r in steady if r.get("max-memory-gb") is not None]
        prof = profiles.get(index)
        phases[index] = {
            "steps": len(rs), "measured_steps": len(steady), **med,
            "mfu_datasheet": med["throughput"] / DATASHEET_TFLOPS, "mfu_measured": med["throughput"] / MEASURED_TFLOPS,
            "max-memory-gb": max(mem) if mem else None, "lm_losses": [r.get("lm loss") for r in rs],
            "device_busy_fraction": prof and prof["device_busy_fraction"],
            # Device work of a profiled step over the median unprofiled step: the profiler slows the
            # host (its wall time runs ~5-10% long), not the kernels, so this is the busy share of
            # the step as it runs; the share of the profiled wall above is its lower bound.
            "device_busy_of_step": prof and prof["device_busy_ms_per_step"] / (1e3 * med["iteration-time"]),
            "profile_wall_ms": prof and prof["wall_ms_per_step"], "aten_ops_per_step": prof and prof["aten_ops_per_step"],
            "device_kernel_ms": prof and prof.get("device_kernel_ms_per_step"),
            "top_kernels": prof and prof["top"], "ranges": prof and prof.get("ranges"),
            "top_host": prof and prof.get("top_host"),
        }
    ratio = phases[0]["tokens-per-sec"] / phases[1]["tokens-per-sec"] if phases[1]["tokens-per-sec"] else None
    return {"phases": phases, "monarch_over_dense": ratio, "switch": [r for r in rows if r["kind"] == "switch"]}


def compare_losses(case: str, steps: int, args) -> dict:
    fast = run(case, steps, "fast", args, dropout_off=True)
    plain = run(case, steps, "plain", args, dropout_off=True)
    out = {"case": case, "fast": fast, "plain": plain}
    if fast["returncode"] or plain["returncode"]:
        return out
    for index in (0, 1):
        a, b = fast["phases"][index]["lm_losses"], plain["phases"][index]["lm_losses"]
        rel = [abs(x - y) / abs(y) for x, y in zip(a, b)]
        out[f"phase{index}_max_rel_diff"] = max(rel)
        out[f"phase{index}_steps"] = len(rel)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=DEFAULT_CASES,
                        help=f"comma-separated, from: {', '.join(CASES)}; or a group: default, paper ({PAPER_CASES})")
    parser.add_argument("--paths", default="fast", help="fast, plain or fast,plain")
    parser.add_argument("--steps", type=int, default=40, help="steps per phase")
    parser.add_argument("--skip", type=int, default=8, help="warm-up steps of each phase left out of the medians")
    parser.add_argument("--compare-losses", default=None, metavar="CASE", help="fast vs plain losses, dropout off")
    parser.add_argument("--compare-steps", type=int, default=20)
    parser.add_argument("--time-budget", type=float, default=None, help="seconds; no new run starts past it")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="where logs and JSON go (default $OUT)")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = parser.parse_args()
    # Every argument is checked before the first run: a typo must not cost a GPU session's minutes.
    cases = [c for name in (args.cases.split(",") if args.cases else [])
             for c in CASE_GROUPS.get(name, name).split(",")]
    unknown = [c for c in cases + ([args.compare_losses] if args.compare_losses else []) if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join([*CASE_GROUPS, *CASES])} "
                     "(--cases '' runs none)")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    results, longest = {"runs": [], "compare": None}, 0.0
    try:
        import torch

        results["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception:  # still worth running without the name
        results["device"] = "unknown"
    results["date"] = time.strftime("%Y-%m-%d")
    results["command"] = " ".join(sys.argv)

    def budget_left() -> bool:
        if args.time_budget is None:
            return True
        return time.perf_counter() - start + 1.2 * longest < args.time_budget

    def save() -> None:
        if args.out:
            with open(os.path.join(args.out, "phase_throughput.json"), "w") as f:
                json.dump(results, f, indent=1)

    if args.compare_losses:
        results["compare"] = compare_losses(args.compare_losses, args.compare_steps, args)
        save()
    for case in cases:
        for path in args.paths.split(","):
            if not budget_left():
                print(f"skipping {case} {path}: time budget", flush=True)
                continue
            r = run(case, args.steps, path, args)
            longest = max(longest, r["wall_seconds"])
            results["runs"].append(r)
            save()
            print(table_row(r), flush=True)

    print(f"\n{results['device']}, {results['date']}: Monarch phase vs dense phase, one run each, medians of steady steps")
    print("| case | path | phase | tokens/s | model TFLOP/s | MFU (989) | MFU (790) | device busy (step / profiled wall) "
          "| peak GiB | Monarch/dense |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results["runs"]:
        print(table_row(r))
    c = results["compare"]
    if c:
        for index in (0, 1):
            if f"phase{index}_max_rel_diff" in c:
                print(f"compare-losses {c['case']} phase {index}: max relative difference of lm loss, fast vs plain, "
                      f"over {c[f'phase{index}_steps']} steps: {c[f'phase{index}_max_rel_diff']:.2e}")
            else:
                print(f"compare-losses {c['case']}: a run failed (returncodes {c['fast']['returncode']}, {c['plain']['returncode']})")
    return 0


def table_row(r: dict) -> str:
    if r["returncode"] != 0:
        return f"| {r['case']} | {r['path']} | failed (exit {r['returncode']}) | | | | | | | |"
    out = []
    for index, name in ((0, "monarch"), (1, "dense")):
        p = r["phases"][index]
        busy = (f"{100 * p['device_busy_of_step']:.0f}% / {100 * p['device_busy_fraction']:.0f}%"
                if p.get("device_busy_of_step") is not None else "n/a")
        mem = f"{p['max-memory-gb']:.1f}" if p["max-memory-gb"] is not None else "n/a"
        ratio = f"**{r['monarch_over_dense']:.2f}x**" if index == 0 and r["monarch_over_dense"] else ""
        out.append(f"| {r['case']} | {r['path']} | {name} | {p['tokens-per-sec']:,.0f} | {p['throughput']:.1f} | "
                   f"{100 * p['mfu_datasheet']:.1f}% | {100 * p['mfu_measured']:.1f}% | {busy} | {mem} | {ratio} |")
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
