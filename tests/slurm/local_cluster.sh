#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine, for tests/test_slurm_local.py and CI.
#
#   tests/slurm/local_cluster.sh start    # install (if missing), configure, start, wait until idle
#   tests/slurm/local_cluster.sh status   # print the daemons and sinfo; exit 0 only if the node is usable
#   tests/slurm/local_cluster.sh stop     # stop the daemons this script started, nothing else
#
# Root only. Debian/Ubuntu: installs slurmctld, slurmd, slurm-client and munge with apt-get when any
# of them is missing. One node, "localhost" at 127.0.0.1, with the CPUs and memory slurmd detects;
# no cgroups, no accounting. Both verbs are idempotent: a running daemon is kept (slurmd is told to
# re-read a changed slurm.conf), and `stop` only ends processes whose PIDs it recorded at `start`.
#
# Environment:
#   MONARCH_SLURM_STATE   where the PIDs of the daemons we started are kept (/tmp/monarch-local-slurm)
#   MONARCH_SLURM_TIMEOUT seconds to wait for the node to become idle (60)
#
# Exit status: 0 ready; 1 a daemon or the node failed; 2 usage; 3 Slurm is missing and cannot be
# installed here (no apt-get, or apt-get failed: no network or package index).
set -euo pipefail

STATE=${MONARCH_SLURM_STATE:-/tmp/monarch-local-slurm}
TIMEOUT=${MONARCH_SLURM_TIMEOUT:-60}
NODE=localhost
CONF=/etc/slurm/slurm.conf
MARKER="# written by monarch-megatron tests/slurm/local_cluster.sh"
T0=$(date +%s)

say() { echo "[local_cluster +$(( $(date +%s) - T0 ))s] $*"; }
die() { echo "[local_cluster] ERROR: $*" >&2; exit 1; }

# running PIDFILE COMM: the PID in PIDFILE is a live process called COMM (guards against reused PIDs)
running() {
    local pid
    [ -s "$1" ] || return 1
    pid=$(cat "$1")
    [ -n "$pid" ] && [ "$(ps -o comm= -p "$pid" 2>/dev/null)" = "$2" ]
}

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

install_packages() {
    local missing=0 b
    for b in /usr/sbin/munged /usr/sbin/slurmctld /usr/sbin/slurmd /usr/bin/sbatch /usr/bin/srun /usr/bin/scontrol; do
        [ -x "$b" ] || missing=1
    done
    if [ "$missing" = 0 ]; then say "slurm and munge already installed"; return; fi
    # exit status 3 = "cannot install" (no apt-get, no package index reachable), so that callers
    # can tell a machine without Slurm from a cluster that fails to start
    command -v apt-get >/dev/null || { echo "[local_cluster] slurm/munge missing and apt-get not available" >&2; exit 3; }
    say "installing slurmctld slurmd slurm-client munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=180 update -qq \
        || { echo "[local_cluster] apt-get update failed" >&2; exit 3; }
    apt-get -o DPkg::Lock::Timeout=180 install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge >/dev/null \
        || { echo "[local_cluster] apt-get install slurmctld slurmd slurm-client munge failed" >&2; exit 3; }
    say "installed slurm $(dpkg-query -W -f='${Version}' slurmctld)"
}

start_munge() {
    if [ ! -s /etc/munge/munge.key ]; then
        install -d -o munge -g munge -m 0700 /etc/munge
        # 1024 random bytes: the shared secret of this one-host "cluster"
        head -c 1024 /dev/urandom > /etc/munge/munge.key
    fi
    chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
    if munge_ok; then say "munged already answering"; return; fi
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 100); do munge_ok && break; sleep 0.1; done
    munge_ok || die "munged does not answer (see /var/log/munge/munged.log)"
    cp /run/munge/munged.pid "$STATE/munged.pid"
    say "munged started (pid $(cat "$STATE/munged.pid"))"
}

write_conf() {
    # CPUs, sockets, cores and memory exactly as slurmd sees them, so the node is not drained
    local hw new
    hw=$(/usr/sbin/slurmd -C | head -n1 | sed -E 's/^NodeName=[^ ]+ //')
    new=$(mktemp)
    cat > "$new" <<EOF
$MARKER
ClusterName=monarchci
SlurmctldHost=localhost
AuthType=auth/munge
# A requeued job may only start again once its credential expires (default 120 s): keep CI short.
AuthInfo=cred_expire=10
SlurmUser=slurm
SlurmdUser=root
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
# No cgroups in CI containers: track processes through /proc, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Schedule every 2 s (defaults 30/60 s) so submitted and requeued jobs start promptly.
SchedulerParameters=bf_interval=2,sched_interval=2
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
# Seconds between SIGTERM and SIGKILL on cancel / time limit: room for the trainer's checkpoint.
KillWait=30
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
NodeName=$NODE NodeAddr=127.0.0.1 $hw State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    install -d -m 0755 /etc/slurm
    install -d -o slurm -g slurm -m 0755 /var/spool/slurmctld /var/log/slurm
    install -d -m 0755 /var/spool/slurmd
    CONF_CHANGED=0
    if ! cmp -s "$new" "$CONF"; then
        if [ -e "$CONF" ] && ! grep -qxF "$MARKER" "$CONF"; then
            cp -p "$CONF" "$CONF.before-monarch-ci"
            say "kept the previous $CONF as $CONF.before-monarch-ci"
        fi
        install -m 0644 "$new" "$CONF"
        CONF_CHANGED=1
        say "wrote $CONF"
    fi
    rm -f "$new"
}

start_slurmctld() {
    if running /run/slurmctld.pid slurmctld; then
        say "slurmctld already running (pid $(cat /run/slurmctld.pid))"
        if [ "$CONF_CHANGED" = 1 ]; then scontrol reconfigure; fi
        return
    fi
    rm -f /run/slurmctld.pid
    /usr/sbin/slurmctld -c    # -c: forget jobs and node state saved by an earlier cluster
    for _ in $(seq 150); do scontrol ping 2>/dev/null | grep -q 'is UP' && break; sleep 0.2; done
    scontrol ping 2>/dev/null | grep -q 'is UP' \
        || { tail -n 30 /var/log/slurm/slurmctld.log >&2; die "slurmctld did not come up"; }
    cp /run/slurmctld.pid "$STATE/slurmctld.pid"
    say "slurmctld started (pid $(cat "$STATE/slurmctld.pid"))"
}

start_slurmd() {
    if running /run/slurmd.pid slurmd; then
        say "slurmd already running (pid $(cat /run/slurmd.pid))"
        return
    fi
    rm -f /run/slurmd.pid
    # -N: the node name need not be this container's hostname
    /usr/sbin/slurmd -N "$NODE"
    for _ in $(seq 100); do running /run/slurmd.pid slurmd && break; sleep 0.1; done
    running /run/slurmd.pid slurmd || { tail -n 30 /var/log/slurm/slurmd.log >&2; die "slurmd did not start"; }
    cp /run/slurmd.pid "$STATE/slurmd.pid"
    say "slurmd started (pid $(cat "$STATE/slurmd.pid"))"
}

wait_idle() {
    local deadline st
    deadline=$(( $(date +%s) + TIMEOUT ))
    while :; do
        st=$(sinfo -h -n "$NODE" -o '%T' 2>/dev/null || true)
        case "$st" in idle|mixed|allocated|completing) break ;; esac
        if [ "$st" = drained ] || [ "$st" = down ]; then
            # a node left down/drained by an earlier, differently configured run
            scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true
        fi
        if [ "$(date +%s)" -ge "$deadline" ]; then
            sinfo -N -l >&2 || true
            tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
            die "node $NODE is not idle after ${TIMEOUT}s (state: ${st:-unknown})"
        fi
        sleep 0.5
    done
    say "node $NODE is $st: cluster ready"
}

stop_one() {   # stop_one NAME COMM DAEMON_PIDFILE
    local rec="$STATE/$1.pid" pid
    if [ ! -s "$rec" ]; then say "$1: not started by this script, left alone"; return; fi
    pid=$(cat "$rec")
    if [ "$(ps -o comm= -p "$pid" 2>/dev/null)" != "$2" ]; then
        say "$1: recorded pid $pid is gone"; rm -f "$rec"; return
    fi
    kill -TERM "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then say "$1: pid $pid ignored SIGTERM for 10 s, SIGKILL"; kill -KILL "$pid"; fi
    rm -f "$rec"
    # slurmctld runs as user slurm and cannot delete its root-owned pid file itself
    if [ -f "$3" ] && [ "$(cat "$3" 2>/dev/null)" = "$pid" ]; then rm -f "$3"; fi
    say "$1: stopped pid $pid"
}

cmd=${1:-}
case "$cmd" in
    start)
        [ "$(id -u)" -eq 0 ] || die "must run as root (installs packages, starts daemons)"
        mkdir -p "$STATE"
        install_packages
        start_munge
        write_conf
        start_slurmctld
        start_slurmd
        wait_idle
        sinfo
        ;;
    stop)
        [ "$(id -u)" -eq 0 ] || die "must run as root"
        mkdir -p "$STATE"
        if [ -s "$STATE/slurmctld.pid" ] && command -v squeue >/dev/null; then
            jobs=$(squeue -h -o %i 2>/dev/null || true)
            if [ -n "$jobs" ]; then
                say "cancelling jobs: $(tr "\n" " " <<<"$jobs")"
                # shellcheck disable=SC2086
                scancel $jobs 2>/dev/null || true
                for _ in $(seq 60); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.5; done
            fi
        fi
        stop_one slurmd slurmd /run/slurmd.pid
        stop_one slurmctld slurmctld /run/slurmctld.pid
        stop_one munged munged /run/munge/munged.pid
        ;;
    status)
        for d in munged slurmctld slurmd; do
            if [ -s "$STATE/$d.pid" ]; then echo "$d: started by this script, pid $(cat "$STATE/$d.pid")"; fi
        done
        command -v sinfo >/dev/null || { echo "slurm is not installed"; exit 1; }
        st=$(sinfo -h -n "$NODE" -o '%T' 2>/dev/null || true)
        echo "node $NODE: ${st:-unreachable}"
        case "$st" in idle|mixed|allocated|completing) exit 0 ;; *) exit 1 ;; esac
        ;;
    *)
        echo "usage: $0 start|stop|status" >&2
        exit 2
        ;;
esac
