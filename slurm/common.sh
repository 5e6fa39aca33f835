# shellcheck shell=bash
# Shared body of slurm/*.sh: sourced by the batch scripts, never run on its own.
#
# monarch_slurm_main DEFAULT_CONFIG [ARG ...]
#   ARG: key=value   a dotted config override (passed to launcher/pretrain.py after --config)
#        --config F  or a bare path ending in .yaml/.yml: the config (else $CONFIG, else DEFAULT_CONFIG)
#        --dry-run   passed through: print the resolved config and the layout, train nothing
#
# Environment (all optional):
#   CONFIG, OVERRIDES        config file; whitespace-separated key=value overrides (command-line ones win)
#   NPROC / GPUS_PER_NODE    processes per node (default: the GPUs Slurm allocated, else 8)
#   MASTER_PORT              rendezvous port on the first node (default: derived from the job id)
#   PROJECT_DIR              the repository (default: the submit directory); the training runs there.
#                            With CONTAINER_IMAGE it may be a path inside the image (/opt/monarch-megatron)
#   PYTHON                   interpreter that runs torchrun and the trainer (default: python)
#   CONTAINER_IMAGE          run each node's task in this image through pyxis (srun --container-image)
#   CONTAINER_MOUNTS         pyxis mounts (default: PROJECT_DIR at the same path, if it exists on the
#                            host); list your shared storage too, e.g. "$PWD:$PWD,/shared:/shared"
#   MAX_REQUEUES             stop requeueing after this many restarts (default 100)
#   SRUN_ARGS                extra srun arguments, word-split (e.g. "--mpi=none")
#
# Preemption: the job is submitted with --signal=B:USR1@N, so only this batch shell receives USR1,
# N seconds before the time limit (or from `scancel --signal=USR1 --batch JOBID`). It forwards
# SIGUSR1 to the training step; each trainer rank saves a checkpoint and exits 0; then the shell
# runs `scontrol requeue`. The requeued job runs this script again with the same arguments and
# environment, and the trainer resumes from the newest checkpoint under the same output_dir.
# `scancel --signal=TERM JOBID` (steps only) stops the same way without a requeue. A plain
# `scancel` or a hard time limit is not graceful: Slurm also signals srun, which SIGKILLs the step.

monarch_log() { echo "[monarch-slurm $(date '+%F %T')] $*"; }

# Word-splitting a string into an array without glob expansion of '*' or '?' in values.
_monarch_split() { local IFS=$' \t\n'; set -f; read -r -a _MONARCH_WORDS <<<"$1"; set +f; }

monarch_slurm_main() {
    local default_config=$1; shift
    local config=${CONFIG:-$default_config}
    local -a overrides=() passthrough=()
    if [ -n "${OVERRIDES:-}" ]; then
        _monarch_split "$OVERRIDES"
        overrides+=(${_MONARCH_WORDS[@]+"${_MONARCH_WORDS[@]}"})
    fi
    while [ $# -gt 0 ]; do
        case "$1" in
            --config) [ $# -ge 2 ] || { monarch_log "--config needs a file"; return 2; }; config=$2; shift ;;
            --config=*) config=${1#--config=} ;;
            --dry-run) passthrough+=("$1") ;;
            *=*) overrides+=("$1") ;;
            *.yaml|*.yml) config=$1 ;;
            *) monarch_log "unexpected argument '$1': expected key=value overrides, --config FILE or --dry-run"; return 2 ;;
        esac
        shift
    done

    # sbatch runs a copy of the script from its spool directory, so locate the repository through
    # the submit directory (or PROJECT_DIR), not through $0.
    local project=${PROJECT_DIR:-${SLURM_SUBMIT_DIR:-$(pwd)}}
    if [ -z "${CONTAINER_IMAGE:-}" ] && [ ! -f "$project/launcher/pretrain.py" ]; then
        monarch_log "no launcher/pretrain.py under '$project': submit from the repository root or set PROJECT_DIR"
        return 2
    fi
    # Config paths are resolved from the repository, where the trainer runs.
    case "$config" in /*) ;; *) [ -f "$project/$config" ] || [ -n "${CONTAINER_IMAGE:-}" ] \
        || { monarch_log "config '$config' not found under $project"; return 2; } ;; esac

    local nnodes=${SLURM_NNODES:-1}
    local nproc=${NPROC:-${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}}
    local master_addr master_port
    if [ -n "${SLURM_JOB_NODELIST:-}" ]; then
        master_addr=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
    else
        master_addr=127.0.0.1
    fi
    # A port per job, so that two jobs sharing a node do not collide; kept below the ephemeral range.
    master_port=${MASTER_PORT:-$(( 10000 + ${SLURM_JOB_ID:-$$} % 20000 ))}
    local python=${PYTHON:-python}

    # The checkout's own package wins over an installed copy (e.g. the image's, when the repository
    # is mounted into a container).
    export PYTHONPATH="$project${PYTHONPATH:+:$PYTHONPATH}"
    # The trainer ranks, not torchrun, handle SIGTERM (save, then exit): see node_script below.
    # torchrun >= 2.8 reads --signals-to-handle (PET_SIGNALS_TO_HANDLE), 2.7 the TORCHELASTIC_ name.
    export PET_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT TORCHELASTIC_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT
    # A failed rank aborts the NCCL communicator (and the job) instead of hanging the others.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    # megatron-core's tensor-parallel overlap needs kernels issued in order on one queue.
    export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}

    # One task per node runs this. SLURM_NODEID differs per task, so it is read there, not here.
    # torchrun and everything it starts inherit "ignore SIGTERM/SIGUSR1"; the trainer replaces that
    # with its save-and-exit handler. A signalled step therefore leaves torchrun waiting for its
    # ranks to finish the checkpoint, instead of torchrun killing them after its fixed 30 s grace.
    local node_script
    # shellcheck disable=SC2016
    node_script='trap "" TERM USR1
export PET_NODE_RANK=${SLURM_NODEID:-0}   # torchrun --node_rank, read from the environment
echo "[monarch-slurm] node $(hostname) node_rank=$PET_NODE_RANK"
exec "$@"'
    local -a torchrun=("$python" -m torch.distributed.run
        --nnodes="$nnodes" --nproc_per_node="$nproc"
        --master_addr="$master_addr" --master_port="$master_port")
    # ${a[@]+"${a[@]}"}: an empty array under `set -u` is an error in bash < 4.4 (RHEL 7)
    local -a trainer=(launcher/pretrain.py --config "$config" ${overrides[@]+"${overrides[@]}"} ${passthrough[@]+"${passthrough[@]}"})

    monarch_log "job ${SLURM_JOB_ID:-none} (restart ${SLURM_RESTART_COUNT:-0}) nodes=$nnodes nproc_per_node=$nproc master=$master_addr:$master_port"
    monarch_log "project $project"
    monarch_log "config $config overrides: ${overrides[*]:-(none)} ${passthrough[*]:-}"

    local -a launch
    if [ -n "${SLURM_JOB_ID:-}" ]; then
        launch=(srun --nodes="$nnodes" --ntasks-per-node=1 --kill-on-bad-exit=1)
        # Since Slurm 22.05 srun does not inherit the job's --cpus-per-task: pass it on.
        [ -n "${SLURM_CPUS_PER_TASK:-}" ] && launch+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
        if [ -n "${CONTAINER_IMAGE:-}" ]; then
            # Default: mount the checkout at its own path. A PROJECT_DIR that exists only inside the
            # image (e.g. /opt/monarch-megatron, from the Dockerfile) is used as it is.
            local mounts=${CONTAINER_MOUNTS:-}
            if [ -z "$mounts" ] && [ -d "$project" ]; then mounts="$project:$project"; fi
            launch+=(--container-image="$CONTAINER_IMAGE" --container-workdir="$project")
            if [ -n "$mounts" ]; then launch+=(--container-mounts="$mounts"); fi
        else
            launch+=(--chdir="$project")
        fi
        if [ -n "${SRUN_ARGS:-}" ]; then _monarch_split "$SRUN_ARGS"; launch+=(${_MONARCH_WORDS[@]+"${_MONARCH_WORDS[@]}"}); fi
    else
        monarch_log "not inside a Slurm job: running torchrun on this machine"
        cd "$project" || return 2
        launch=()
    fi

    _MONARCH_PREEMPTED=0
    _MONARCH_STEP_PID=
    trap '_monarch_on_signal USR1' USR1
    trap '_monarch_on_signal TERM' TERM
    ${launch[@]+"${launch[@]}"} bash -c "$node_script" monarch-node "${torchrun[@]}" "${trainer[@]}" &
    _MONARCH_STEP_PID=$!

    # `wait` returns early whenever a trapped signal arrives: keep waiting while the step runs.
    local rc=0
    while :; do
        wait "$_MONARCH_STEP_PID"; rc=$?
        kill -0 "$_MONARCH_STEP_PID" 2>/dev/null || break
    done
    monarch_log "training step exited with status $rc"

    if [ "$_MONARCH_PREEMPTED" = 1 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
        local restarts=${SLURM_RESTART_COUNT:-0}
        if [ "$restarts" -ge "${MAX_REQUEUES:-100}" ]; then
            monarch_log "preempted, but restart $restarts reached MAX_REQUEUES=${MAX_REQUEUES:-100}: not requeueing"
            return 1
        fi
        monarch_log "requeueing job $SLURM_JOB_ID (it resumes from the last checkpoint)"
        scontrol requeue "$SLURM_JOB_ID" && return 0
        monarch_log "scontrol requeue failed: submit the same command again to resume from the checkpoint"
        return 1
    fi
    return "$rc"
}

# Forward a signal to the training processes: to the job's steps, through slurmctld. Never to srun
# itself: srun answers SIGTERM by SIGKILLing its tasks ("forcing job termination"), which would
# kill a rank in the middle of its checkpoint. In the step, torchrun ignores the signal and the
# trainer ranks save a checkpoint and exit 0.
_monarch_on_signal() {
    local sig=$1
    monarch_log "received SIG$sig: asking the trainer to checkpoint and stop"
    [ "$sig" = USR1 ] && _MONARCH_PREEMPTED=1
    if [ -n "$_MONARCH_STEP_PID" ] && kill -0 "$_MONARCH_STEP_PID" 2>/dev/null; then
        if [ -n "${SLURM_JOB_ID:-}" ]; then
            # without --batch/--full, scancel signals the job's steps and not this shell
            scancel --signal="$sig" "$SLURM_JOB_ID" || monarch_log "scancel --signal=$sig failed"
        else
            # no srun in between (the node script exec'd torchrun): signal its children, the ranks
            pkill -"$sig" -P "$_MONARCH_STEP_PID" 2>/dev/null || true
        fi
    fi
}
