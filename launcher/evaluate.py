#!/usr/bin/env python
"""Deterministic validation loss of a checkpoint; the last line printed is ``val_loss=<float>``.

    python launcher/evaluate.py --config configs/demo.yaml --checkpoint runs/demo/checkpoints/step0000160-monarch
    python launcher/evaluate.py --config F --checkpoint DIR --phase monarch [key=value ...]

The model (Monarch or dense) is taken from the checkpoint's run_state.json; the validation data
from the checkpoint's phase of the config, or from --phase. Exit code 2 on config errors.
"""

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory (…/checkpoints/<tag>)")
    p.add_argument("--phase", default=None, help="phase (name or index) whose validation data to use")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    from monarch_megatron.training.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
        from monarch_megatron.training.evaluate import evaluate

        result = evaluate(cfg, args.checkpoint, args.phase)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        for k, v in result.items():
            print(f"{k}: {v:.6f}")
        print(f"val_loss={result['loss']:.8f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
