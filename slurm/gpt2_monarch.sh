#!/usr/bin/env bash
# GPT-2 pretraining with Monarch layers for 90% of the steps, then dense (reverse sparsification).
# Default: configs/gpt2_small_monarch.yaml (the paper's recipe: Monarch MLP, attention dense).
#
#   sbatch slurm/gpt2_monarch.sh                                 # from the repository root
#   sbatch --nodes=4 slurm/gpt2_monarch.sh output_dir=/shared/runs/gpt2s
#   CONFIG=configs/gpt2_medium_monarch.yaml sbatch --nodes=2 slurm/gpt2_monarch.sh   # GPT-2 medium
#   CONFIG=configs/gpt2_small_monarch_attn.yaml sbatch slurm/gpt2_monarch.sh   # ours: Monarch attention too
#
# Arguments: key=value config overrides (or --config FILE, --dry-run); environment knobs are listed
# in slurm/common.sh (CONFIG, OVERRIDES, NPROC, CONTAINER_IMAGE, CONTAINER_MOUNTS, ...).
# sbatch command-line options override the #SBATCH lines below (e.g. --nodes, --time, --partition).
#
#SBATCH --job-name=gpt2-monarch
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=64
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
# --signal: USR1 to this batch shell 5 min before the time limit: time for the checkpoint, then requeue.
# --open-mode=append: a requeued run appends to the same log instead of truncating it.
# --output is relative to the submit directory (the repository root, on shared storage).
set -euo pipefail
# sbatch runs a spooled copy of this file: find slurm/common.sh in the submit directory (the
# repository root), else in PROJECT_DIR.
MONARCH_SLURM_HOME=${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
[ -f "$MONARCH_SLURM_HOME/slurm/common.sh" ] || MONARCH_SLURM_HOME=${PROJECT_DIR:-$MONARCH_SLURM_HOME}
source "$MONARCH_SLURM_HOME/slurm/common.sh"
set +e   # the body decides the exit status itself (signals interrupt `wait`)
monarch_slurm_main configs/gpt2_small_monarch.yaml "$@"
