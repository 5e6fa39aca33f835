#!/usr/bin/env python
"""Pretrain BERT / GPT with Monarch layers and the in-run Monarch -> dense switch.

    python launcher/pretrain.py --config configs/demo.yaml [key=value ...]        # one process
    deepspeed launcher/pretrain.py --config configs/X.yaml                       # or torchrun
    python launcher/pretrain.py --config configs/X.yaml --dry-run                 # plan only

Re-running the same command resumes from the newest checkpoint that verifies in output_dir.
Exit codes: 0 done (or stopped cleanly by SIGTERM / SIGUSR1 / Ctrl-C after saving); 1 a failure
(e.g. a checkpoint that could not be written: disk full); 2 a problem found before any work
(config, data, tokenizer, resume point, another trainer on output_dir), also by --dry-run;
3 the run went non-finite (stopped without saving); 130 a second Ctrl-C, or one before training
(no save).
"""

import argparse
import errno
import os
import sys
import warnings

# Runnable from a checkout without `pip install -e .`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="run config (YAML)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and plan, then exit")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. output_dir=/tmp/x phases.0.steps=5")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from monarch_megatron.training.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    if args.dry_run:
        from monarch_megatron.training.dryrun import dry_run_report
        from monarch_megatron.training.run import preflight

        print(dry_run_report(cfg))
        try:
            preflight(cfg, dry_run=True)  # the data, tokenizer and resume point, as a real start checks them
        except ConfigError as err:
            print(err, file=sys.stderr)
            return 2
        return 0
    from monarch_megatron.training.checkpoint import CheckpointError
    from monarch_megatron.training.guard import NonFiniteError
    from monarch_megatron.training.run import train

    try:
        train(cfg)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    except NonFiniteError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: exited without saving (re-running resumes from the last checkpoint)", file=sys.stderr)
        return 130
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        print(f"error: no space left on device: {err.filename or err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
