#!/usr/bin/env python
"""Convert a training checkpoint: Monarch or block-diagonal -> dense (exact), dense -> Monarch or
block-diagonal (the kind's optimal projection), and tensor-parallel resharding, in one step.

    python launcher/convert_checkpoint.py --input runs/demo/checkpoints/step0000120-monarch \\
        --output runs/demo/converted/step0000120-dense --to dense [--tensor-parallel 1]
    python launcher/convert_checkpoint.py --input CKPT --output OUT --to monarch --nblocks 4 \\
        [--layers fc1,fc2,qkv,proj] [--tensor-parallel 2] [--force]
    python launcher/convert_checkpoint.py --input CKPT --output OUT --to blockdiag --nblocks 4 --layers fc1,fc2

Input: a checkpoint directory written by the trainer (<output_dir>/checkpoints/<tag>/: DeepSpeed's
mp_rank_XX_model_states.pt per TP rank and run_state.json). Output: the same layout, module weights
only (no optimizer state: training from it starts fresh optimizer moments), run_state.json with the
new phase_kind / monarch / tensor_model_parallel_size and a "converted_from" record. It loads with
launcher/evaluate.py (launch with as many processes as --tensor-parallel and pass
parallel.tensor_model_parallel_size=N), with DeepSpeed's load_checkpoint(load_module_only=True), and
a dense output into a plain megatron-core model built from its local layer spec. A new training run
starts from it with training.init_from=OUTPUT (fresh optimizer, step 0); a run's resume scan never
picks a converted checkpoint, even one inside its checkpoints/ directory.

--to monarch / blockdiag prints every projected layer's relative approximation error
||W - M||_F / ||W||_F and the overall one (block-diagonal: the norm of the dropped off-diagonal
blocks). The output is written atomically (a hidden staging directory renamed into place); an
existing output is replaced only with --force. The input is never modified.
Exit codes: 0 done, 2 bad input / output / request (one message on stderr).
"""

import argparse
import os
import sys
import warnings

# Runnable from a checkout without `pip install -e .`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="checkpoint directory (…/checkpoints/<tag>)")
    p.add_argument("--output", required=True, help="checkpoint directory to create")
    p.add_argument("--to", required=True, choices=("dense", "monarch", "blockdiag"))
    p.add_argument("--nblocks", type=int, default=None,
                   help="blocks for --to monarch / blockdiag (default: the input's, if it is structured)")
    p.add_argument("--layers", default=None,
                   help="comma-separated subset of fc1,fc2,qkv,proj made structured by --to monarch / blockdiag "
                        "(default: the input's structured layers, or all four)")
    p.add_argument("--tensor-parallel", type=int, default=None, help="TP size of the output (default: the input's)")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from monarch_megatron.checkpointing import CheckpointFormatError
    from monarch_megatron.convert.pipeline import convert_checkpoint

    layers = tuple(s.strip() for s in args.layers.split(",") if s.strip()) if args.layers else None
    if args.to == "dense" and (args.nblocks is not None or layers):
        print("convert_checkpoint: error: --nblocks / --layers apply to --to monarch / blockdiag only", file=sys.stderr)
        return 2
    try:
        convert_checkpoint(args.input, args.output, args.to, nblocks=args.nblocks, layers=layers,
                           tensor_parallel=args.tensor_parallel, force=args.force,
                           log=lambda line: print(line, flush=True))
    except CheckpointFormatError as err:  # the conversion's errors and the format's own
        print(f"convert_checkpoint: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
