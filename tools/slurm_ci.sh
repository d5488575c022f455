#!/bin/bash
# A real single-node SLURM cluster for CI and local tests (Debian's slurm-wlm + munge, localhost,
# no cgroups, no systemd). The configuration is the one verified in the shared SLURM_CI notes.
#
#   eval "$(tools/slurm_ci.sh start)"   # installs what is missing, starts munged/slurmctld/slurmd,
#                                       # waits for the node to be idle, prints `export SLURM_CONF=...`
#   sbatch ...; squeue; sinfo
#   tools/slurm_ci.sh stop              # cancels every job, then stops the daemons it started
#
# Environment: SLURM_CI_BASE (state, spool, logs; default $TMPDIR/calm-slurm-ci), SLURM_CI_CPUS
# (default: the CPUs this process may use), SLURM_CI_MEM (MB, default 4000), SLURM_CI_PORT (slurmctld port, default 6817;
# slurmd uses the next one). Installing needs root and apt-get; starting needs root (the daemons
# run as root, munged as the munge user). Progress goes to stderr, the export line to stdout.
set -euo pipefail

BASE=${SLURM_CI_BASE:-${TMPDIR:-/tmp}/calm-slurm-ci}
# The machine's CPUs: nproc follows OMP_NUM_THREADS (often 1 on clusters), which would make a node
# too small for any 2-rank job.
CPUS=${SLURM_CI_CPUS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}
MEM=${SLURM_CI_MEM:-4000}
PORT=${SLURM_CI_PORT:-6817}
export SLURM_CONF="$BASE/etc/slurm.conf"

log() { echo "slurm_ci: $*" >&2; }
die() { log "error: $*"; exit 1; }

install_missing() {
    local pkgs=()
    command -v slurmctld >/dev/null 2>&1 && command -v slurmd >/dev/null 2>&1 \
        && command -v sbatch >/dev/null 2>&1 || pkgs+=(slurm-wlm)
    command -v munged >/dev/null 2>&1 || pkgs+=(munge)
    command -v shellcheck >/dev/null 2>&1 || pkgs+=(shellcheck)
    ((${#pkgs[@]} == 0)) && return 0
    [[ $(id -u) -eq 0 ]] || die "missing ${pkgs[*]}; install them (apt-get install ${pkgs[*]}) or run as root"
    command -v apt-get >/dev/null 2>&1 || die "missing ${pkgs[*]} and no apt-get to install them"
    log "installing ${pkgs[*]}"
    local t0=$SECONDS
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >&2
    log "installed in $((SECONDS - t0)) s"
}

write_conf() {
    mkdir -p "$BASE"/{etc,state,spool,log}
    cat >"$SLURM_CONF" <<EOF
ClusterName=ci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
AuthType=auth/munge
MailProg=/bin/true
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool
SlurmctldPidFile=$BASE/slurmctld.pid
SlurmdPidFile=$BASE/slurmd.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MpiDefault=none
SwitchType=switch/none
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$BASE/log/jobcomp.txt
SchedulerType=sched/backfill
DependencyParameters=kill_invalid_depend
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=300
InactiveLimit=0
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    if [[ ! -s /etc/munge/munge.key ]]; then
        mungekey --create --keyfile=/etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key
        chmod 400 /etc/munge/munge.key
    fi
    mkdir -p /run/munge && chown munge:munge /run/munge && chmod 755 /run/munge  # no systemd tmpfiles
    rm -f "$BASE/munged.pid"
    if ! munge -n >/dev/null 2>&1; then
        runuser -u munge -- munged
        for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.1; done
        munge -n >/dev/null 2>&1 || die "munged did not start"
        cat /run/munge/munged.pid >"$BASE/munged.pid"  # recorded only when we started it
    fi
}

alive() { local p; p=$(cat "$1" 2>/dev/null) && kill -0 "$p" 2>/dev/null; }

start() {
    install_missing
    [[ $(id -u) -eq 0 ]] || die "starting the daemons needs root"
    if alive "$BASE/slurmctld.bgpid"; then
        log "already running (base $BASE)"
    else
        write_conf
        start_munge
        slurmctld -D -i >"$BASE/log/slurmctld.out" 2>&1 &
        echo $! >"$BASE/slurmctld.bgpid"
        slurmd -D -N localhost >"$BASE/log/slurmd.out" 2>&1 &
        echo $! >"$BASE/slurmd.bgpid"
    fi
    local st=""
    for _ in $(seq 120); do
        st=$(sinfo -h -N -o %t 2>/dev/null || true)
        [[ $st == idle ]] && break
        sleep 0.5
    done
    if [[ $st != idle ]]; then
        tail -n 20 "$BASE"/log/*.log >&2 || true
        die "the node did not become idle (state '${st:-none}')"
    fi
    sinfo >&2
    echo "export SLURM_CONF=$SLURM_CONF"
}

stop() {
    [[ -f $SLURM_CONF ]] || { log "nothing to stop (no $SLURM_CONF)"; return 0; }
    # Jobs first: `scontrol shutdown` leaves running jobs (and their slurmstepd) alive.
    scancel --user="$(id -un)" 2>/dev/null || true
    for _ in $(seq 60); do [[ -z $(squeue -h 2>/dev/null) ]] && break; sleep 0.5; done
    scontrol shutdown 2>/dev/null || true
    local f p
    for f in slurmctld.bgpid slurmd.bgpid; do
        p=$(cat "$BASE/$f" 2>/dev/null) || continue
        for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
        if kill -0 "$p" 2>/dev/null; then
            kill -TERM "$p" 2>/dev/null || true
            sleep 2
            kill -0 "$p" 2>/dev/null && kill -KILL "$p" 2>/dev/null
        fi
        rm -f "$BASE/$f"
    done
    if p=$(cat "$BASE/munged.pid" 2>/dev/null); then
        kill -TERM "$p" 2>/dev/null || true
        rm -f "$BASE/munged.pid"
    fi
    log "stopped (logs in $BASE/log)"
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    install) install_missing ;;
    *) echo "usage: $0 start|stop|install" >&2; exit 2 ;;
esac
