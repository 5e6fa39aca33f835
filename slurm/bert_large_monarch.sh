#!/usr/bin/env bash
# BERT-large pretraining with structured layers, then the exact switch to dense (reverse sparsification).
# Default: configs/bert_large_monarch.yaml (this project's recipe: Monarch MLP and attention).
#
#   sbatch slurm/bert_large_monarch.sh                                 # from the repository root
#   sbatch --nodes=4 slurm/bert_large_monarch.sh output_dir=/shared/runs/bert1 training.micro_batch_size=32
#   CONFIG=configs/bert_large_blockdiag.yaml sbatch slurm/bert_large_monarch.sh   # the paper's recipe (block-diagonal MLP)
#   CONFIG=configs/bert_large_dense.yaml sbatch slurm/bert_large_monarch.sh   # the dense baseline
#
# Arguments: key=value config overrides (or --config FILE, --dry-run); environment knobs are listed
# in slurm/common.sh (CONFIG, OVERRIDES, NPROC, CONTAINER_IMAGE, CONTAINER_MOUNTS, ...).
# sbatch command-line options override the #SBATCH lines below (e.g. --nodes, --time, --partition).
#
#SBATCH --job-name=bert-large-monarch
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
monarch_slurm_main configs/bert_large_monarch.yaml "$@"
