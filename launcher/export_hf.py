#!/usr/bin/env python
"""Export a checkpoint as a Hugging Face transformers model directory.

    python launcher/export_hf.py --checkpoint runs/demo/checkpoints/step0000150-dense --output runs/demo/hf
    python launcher/export_hf.py --checkpoint CKPT --output DIR [--tokenizer FILE.model|HF_DIR] [--force]

GPT models become GPT2LMHeadModel, BERT models MegatronBertForPreTraining (transformers' class for
Megatron's pre-LayerNorm BERT); load them with from_pretrained and AutoTokenizer.from_pretrained.
Input: any checkpoint of this project (a trainer checkpoint or a convert_checkpoint.py / import_hf.py
output), dense or Monarch (Monarch layers are converted to their exact dense matrices), any TP size.
Output: config.json, model.safetensors (the checkpoint's dtype; the vocabulary cut to the
tokenizer's model.vocab_size, megatron's padding rows dropped), tokenizer.json +
tokenizer_config.json (+ sentencepiece.model). The tokenizer defaults to the one the checkpoint's run
trained with (its output_dir's config.yaml); pass --tokenizer when the run directory is elsewhere.

A model feature the target class cannot express (e.g. BERT without the sentence-order head) is
refused before any weights are read. The output is written atomically; an existing output is
replaced only with --force; the input is never modified.
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
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (…/checkpoints/<tag> or a converted one)")
    p.add_argument("--output", required=True, help="Hugging Face model directory to create")
    p.add_argument("--tokenizer", default=None,
                   help="sentencepiece .model file or Hugging Face tokenizer directory (default: the run's)")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from monarch_megatron.convert.hf_checkpoint import export_checkpoint, run_cli

    return run_cli("export_hf", export_checkpoint, args.checkpoint, args.output, tokenizer=args.tokenizer,
                   force=args.force)


if __name__ == "__main__":
    sys.exit(main())
