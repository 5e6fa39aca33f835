#!/usr/bin/env python
"""Import a local Hugging Face model directory as a checkpoint of this project.

    python launcher/import_hf.py --model runs/demo/hf --output runs/demo/imported
    python launcher/import_hf.py --model DIR --output CKPT [--tensor-parallel N] [--accept-approximation] [--force]

Input: a local save_pretrained directory (config.json and model.safetensors, sharded safetensors or
pytorch_model.bin) of GPT2LMHeadModel or MegatronBertForPreTraining; nothing is downloaded.
Output: a dense module-only checkpoint (mp_rank_XX_model_states.pt per TP rank and run_state.json,
marked "converted_from"; the vocabulary zero-padded to a multiple of --make-vocab-size-divisible-by)
that a new run starts from with training.init_from=CKPT (the command prints the model overrides the
run config needs) and that convert_checkpoint.py --to monarch projects for sparse fine-tuning.

Features our models cannot express (other activations, untied heads, cross attention, unscaled
attention, ...) are refused before any weights are read. Near ones are refused too unless
--accept-approximation: the tanh-approximated GELU of GPT-2 checkpoints ("gelu_new"; our models use
the exact erf GELU) and another LayerNorm epsilon; they are then printed and recorded in
run_state.json. The output is written atomically; an existing output is replaced only with --force.
Exit codes: 0 done, 2 bad input / output / request (one message on stderr).
Needs the hf extra: pip install -e ".[hf]" -c constraints.txt
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
    p.add_argument("--model", required=True, help="local Hugging Face model directory")
    p.add_argument("--output", required=True, help="checkpoint directory to create")
    p.add_argument("--tensor-parallel", type=int, default=1, help="TP size of the output (default 1)")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="pad the vocabulary to a multiple of this (model.make_vocab_size_divisible_by; default 128)")
    p.add_argument("--accept-approximation", action="store_true",
                   help="import a tanh-GELU model or another LayerNorm epsilon as our (erf GELU, 1e-5) model")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from monarch_megatron.convert.hf_checkpoint import import_model, run_cli

    return run_cli("import_hf", import_model, args.model, args.output, tensor_parallel=args.tensor_parallel,
                   make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                   accept_approximation=args.accept_approximation, force=args.force)


if __name__ == "__main__":
    sys.exit(main())
