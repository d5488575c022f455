#!/bin/bash
# A real SLURM cluster on this one machine for CI and local tests (Debian's slurm-wlm + munge, no
# cgroups, no systemd): one node on localhost by default, or N nodes, each a network + UTS namespace
# with its own address and hostname on a Linux bridge (slurmctld stays on the host).
#
#   eval "$(tools/slurm_ci.sh start)"   # installs what is missing, starts munged/slurmctld/slurmd(s),
#                                       # waits for every node to be idle, prints `export SLURM_CONF=...`
#   sbatch ...; squeue; sinfo
#   tools/slurm_ci.sh crash-node ci-n2  # (N nodes) kill -9 everything on that node, slurmd included
#   tools/slurm_ci.sh restart-node ci-n2
#   tools/slurm_ci.sh stop              # cancels every job, stops the daemons it started and removes
#                                       # the namespaces, links and /etc/hosts lines it added
#
# Environment: SLURM_CI_BASE (state, spool, logs; default $TMPDIR/calm-slurm-ci), SLURM_CI_NODES
# (default 1), SLURM_CI_CPUS (per node; default: the machine's CPUs divided among the nodes),
# SLURM_CI_MEM (MB per node, default 4000), SLURM_CI_PORT (slurmctld port, default 6817; slurmd uses
# the next one), SLURM_CI_SUBNET (N nodes: the first three octets of the bridge's /24, default
# 10.77.0; the host is .1, node i is .(10+i)), SLURM_CI_PREFIX (N nodes: names of the bridge,
# namespaces and nodes, default "ci": bridge ci-br, node i ci-n<i>). Installing needs root and
# apt-get; starting needs root (the daemons run as root, munged as the munge user). Progress goes
# to stderr, the export line to stdout. A failed start tears down what it had set up.
set -euo pipefail

BASE=${SLURM_CI_BASE:-${TMPDIR:-/tmp}/calm-slurm-ci}
NODES=${SLURM_CI_NODES:-1}
[[ $NODES =~ ^[1-9][0-9]*$ ]] || { echo "slurm_ci: error: SLURM_CI_NODES must be a positive integer" >&2; exit 2; }
# The machine's CPUs: nproc follows OMP_NUM_THREADS (often 1 on clusters), which would make a node
# too small for any 2-rank job.
MACHINE_CPUS=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
CPUS=${SLURM_CI_CPUS:-$(( MACHINE_CPUS / NODES > 0 ? MACHINE_CPUS / NODES : 1 ))}
MEM=${SLURM_CI_MEM:-4000}
PORT=${SLURM_CI_PORT:-6817}
SUBNET=${SLURM_CI_SUBNET:-10.77.0}
PREFIX=${SLURM_CI_PREFIX:-ci}
BRIDGE=$PREFIX-br
HOSTS_TAG="# calm-slurm-ci $PREFIX"  # marks the /etc/hosts lines this script adds
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

node_name() { echo "$PREFIX-n$1"; }
node_addr() { echo "$SUBNET.$((10 + $1))"; }

write_conf() {
    mkdir -p "$BASE"/{etc,state,spool,log}
    local ctld nodes="" names="" i
    if ((NODES == 1)); then
        ctld=localhost
        nodes="NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN"
        names=localhost
    else
        # The controller must be named by this host's real hostname; its address is the bridge's.
        ctld="$(hostname)($SUBNET.1)"
        for ((i = 1; i <= NODES; i++)); do
            nodes+="NodeName=$(node_name "$i") NodeAddr=$(node_addr "$i") CPUs=$CPUS RealMemory=$MEM State=UNKNOWN"$'\n'
            names+="${names:+,}$(node_name "$i")"
        done
        nodes=${nodes%$'\n'}
    fi
    # %n: every slurmd (one per node, all on this filesystem) keeps its own spool, pid and log.
    # SlurmdTimeout: a node whose slurmd stops answering is DOWN (and its jobs NODE_FAIL) after
    # 10 s instead of SLURM's 300 s; the node-failure tests rely on it.
    cat >"$SLURM_CONF" <<EOF
ClusterName=ci
SlurmctldHost=$ctld
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
AuthType=auth/munge
MailProg=/bin/true
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool/%n
SlurmctldPidFile=$BASE/slurmctld.pid
SlurmdPidFile=$BASE/slurmd-%n.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmdTimeout=10
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
$nodes
PartitionName=debug Nodes=$names Default=YES MaxTime=INFINITE State=UP
EOF
}

# N nodes: a bridge with the host on .1 and, per node, a network namespace joined to it by a veth
# pair, plus an /etc/hosts line so that node names resolve everywhere (torchrun, c10d, srun).
make_network() {
    command -v ip >/dev/null 2>&1 || die "an N-node cluster needs iproute2 (ip)"
    command -v nsenter >/dev/null 2>&1 || die "an N-node cluster needs util-linux (nsenter, unshare)"
    ip link add "$BRIDGE" type bridge
    ip addr add "$SUBNET.1/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    local i ns
    for ((i = 1; i <= NODES; i++)); do
        ns=$(node_name "$i")
        ip netns add "$ns"
        ip link add "$PREFIX-v$i" type veth peer name "$PREFIX-e$i"
        ip link set "$PREFIX-v$i" master "$BRIDGE"
        ip link set "$PREFIX-v$i" up
        ip link set "$PREFIX-e$i" netns "$ns"
        ip -n "$ns" addr add "$(node_addr "$i")/24" dev "$PREFIX-e$i"
        ip -n "$ns" link set "$PREFIX-e$i" up
        ip -n "$ns" link set lo up
        echo "$(node_addr "$i") $ns $HOSTS_TAG" >>/etc/hosts
    done
}

# $1: how many nodes' veths and namespaces to remove (default: this cluster's).
remove_network() {
    local i kept n=${1:-$NODES}
    for ((i = 1; i <= n; i++)); do
        ip link del "$PREFIX-v$i" 2>/dev/null || true
        ip netns del "$(node_name "$i")" 2>/dev/null || true
    done
    ip link del "$BRIDGE" 2>/dev/null || true
    if grep -qF "$HOSTS_TAG" /etc/hosts 2>/dev/null; then
        # /etc/hosts may be a bind mount (containers): rewrite it in place, never replace the file.
        kept=$(grep -vF "$HOSTS_TAG" /etc/hosts || true)
        printf '%s\n' "$kept" >/etc/hosts
    fi
}

# A bridge of this prefix left by a run that was killed before its stop (the bridge, namespaces and
# /etc/hosts lines outlive their processes) is removed; one whose nodes still run a process belongs
# to a live cluster and is refused. A live cluster always has a slurmd in some node's namespace, even
# while crash-node has emptied another.
clear_stale_network() {
    ip link show "$BRIDGE" >/dev/null 2>&1 || return 0
    local ns busy=""
    for ns in $(ip netns list 2>/dev/null | awk -v p="$PREFIX-n" 'index($1, p) == 1 {print $1}'); do
        [[ -n $(ip netns pids "$ns" 2>/dev/null) ]] && busy+=" $ns"
    done
    [[ -z $busy ]] || die "bridge $BRIDGE exists and processes run in$busy: another cluster runs (stop it, or set SLURM_CI_PREFIX, SLURM_CI_SUBNET and SLURM_CI_PORT)"
    log "removing what a killed run left of cluster '$PREFIX' (bridge, namespaces, /etc/hosts lines)"
    for ns in $(ip netns list 2>/dev/null | awk -v p="$PREFIX-n" 'index($1, p) == 1 {print $1}'); do
        ip netns del "$ns" 2>/dev/null || true
    done
    # (deleting a namespace deletes the veth pair whose one end it holds)
    remove_network 0  # the bridge and the tagged /etc/hosts lines
}

# slurmd of node i inside its namespace, under the node's hostname (slurmd finds its NodeName by
# hostname). nsenter, not `ip netns exec`: that remounts /sys and slurmd loses the cgroup mounts.
# nsenter and unshare exec (no fork), so $! is slurmd's pid.
start_slurmd() {
    local name
    name=$(node_name "$1")
    nsenter --net="/run/netns/$name" unshare --uts bash -c "hostname $name; exec slurmd -D" \
        >"$BASE/log/slurmd-$name.out" 2>&1 &
    echo $! >"$BASE/slurmd-$name.bgpid"
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

wait_idle() {
    local st=""
    for _ in $(seq 120); do
        st=$(sinfo -h -N -o %t 2>/dev/null | sort | uniq -c | xargs || true)
        [[ $st == "$NODES idle" ]] && return 0
        sleep 0.5
    done
    tail -n 20 "$BASE"/log/*.log >&2 || true
    die "the nodes did not become idle (states: '${st:-none}')"
}

# Whether something on this host accepts connections on port $1 (slurmctld binds every address).
port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start() {
    install_missing
    [[ $(id -u) -eq 0 ]] || die "starting the daemons needs root"
    if alive "$BASE/slurmctld.bgpid"; then
        log "already running (base $BASE)"
    else
        ((NODES == 1)) || clear_stale_network
        # Otherwise slurmctld dies with "Address already in use" in its log, and sinfo would
        # report the other cluster's nodes.
        ! port_taken "$PORT" || die "port $PORT (slurmctld) is taken: another SLURM cluster runs here (one left" \
            "from an interrupted test run? stop it with SLURM_CI_BASE=<its base> $0 stop), or set SLURM_CI_PORT"
        trap 'log "start failed: tearing down"; stop >&2' EXIT
        # What stop and the node commands need to know about this cluster.
        mkdir -p "$BASE"
        printf 'NODES=%s\nPREFIX=%s\nSUBNET=%s\n' "$NODES" "$PREFIX" "$SUBNET" >"$BASE/cluster.env"
        write_conf
        start_munge
        ((NODES == 1)) || make_network
        slurmctld -D -i >"$BASE/log/slurmctld.out" 2>&1 &
        echo $! >"$BASE/slurmctld.bgpid"
        if ((NODES == 1)); then
            slurmd -D -N localhost >"$BASE/log/slurmd.out" 2>&1 &
            echo $! >"$BASE/slurmd-localhost.bgpid"
        else
            local i
            for ((i = 1; i <= NODES; i++)); do start_slurmd "$i"; done
        fi
    fi
    wait_idle
    trap - EXIT
    sinfo >&2
    echo "export SLURM_CONF=$SLURM_CONF"
}

# The cluster a start under this base recorded (stop and the node commands need its shape).
load_cluster() {
    [[ -f $BASE/cluster.env ]] || return 1
    NODES=$(sed -n 's/^NODES=//p' "$BASE/cluster.env")
    PREFIX=$(sed -n 's/^PREFIX=//p' "$BASE/cluster.env")
    SUBNET=$(sed -n 's/^SUBNET=//p' "$BASE/cluster.env")
    BRIDGE=$PREFIX-br
    HOSTS_TAG="# calm-slurm-ci $PREFIX"
}

stop_pid() {
    local p=$1
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || return 0; sleep 0.2; done
    kill -TERM "$p" 2>/dev/null || true
    sleep 2
    kill -0 "$p" 2>/dev/null && kill -KILL "$p" 2>/dev/null
    return 0
}

stop() {
    load_cluster || { log "nothing to stop (no $BASE/cluster.env)"; return 0; }
    if [[ -f $SLURM_CONF ]]; then
        # Jobs first: `scontrol shutdown` leaves running jobs (and their slurmstepd) alive.
        scancel --user="$(id -un)" 2>/dev/null || true
        for _ in $(seq 60); do [[ -z $(squeue -h 2>/dev/null) ]] && break; sleep 0.5; done
        scontrol shutdown 2>/dev/null || true
    fi
    local f p i
    for f in "$BASE"/slurmctld.bgpid "$BASE"/slurmd-*.bgpid; do
        [[ -f $f ]] || continue
        p=$(cat "$f") && stop_pid "$p"
        rm -f "$f"
    done
    if ((NODES > 1)); then
        for ((i = 1; i <= NODES; i++)); do  # whatever a job left running on a node
            kill_namespace "$(node_name "$i")" || true
        done
        remove_network
    fi
    if p=$(cat "$BASE/munged.pid" 2>/dev/null); then
        kill -TERM "$p" 2>/dev/null || true
        rm -f "$BASE/munged.pid"
    fi
    rm -f "$BASE/cluster.env"
    log "stopped (logs in $BASE/log)"
}

# The node's index from its name, for an N-node cluster this base started.
node_index() {
    load_cluster || die "no cluster under $BASE"
    ((NODES > 1)) || die "crash-node and restart-node need an N-node cluster (SLURM_CI_NODES>1)"
    local i
    for ((i = 1; i <= NODES; i++)); do [[ $(node_name "$i") == "$1" ]] && { echo "$i"; return 0; }; done
    die "no node '$1' (nodes: $(node_name 1) .. $(node_name "$NODES"))"
}

# SIGKILL every process in a node's namespace until none is left. A process may exit between the
# listing and the kill (kill then fails for that pid, which is fine), and one may fork meanwhile
# (hence the repeat).
kill_namespace() {
    local pids _
    for _ in $(seq 50); do
        pids=$(ip netns pids "$1" 2>/dev/null) || return 0
        [[ -z $pids ]] && return 0
        # shellcheck disable=SC2086  # one argument per pid
        kill -KILL $pids 2>/dev/null || true
        sleep 0.1
    done
    log "processes still run in namespace $1 after 5 s of SIGKILL: $(ip netns pids "$1" | xargs)"
    return 1
}

# A node that dies at once: every process on it (slurmd, slurmstepd, the job's ranks) gets SIGKILL;
# its network stays up, as a rebooting machine's switch port does.
crash_node() {
    local i
    i=$(node_index "$1")
    kill_namespace "$1" || die "could not crash $1"
    rm -f "$BASE/slurmd-$1.bgpid"
    log "crashed $1"
}

restart_node() {
    local i
    i=$(node_index "$1")
    alive "$BASE/slurmd-$1.bgpid" && die "$1's slurmd is running"
    start_slurmd "$i"
    log "restarted slurmd on $1"
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    install) install_missing ;;
    crash-node) crash_node "${2:?usage: $0 crash-node NODE}" ;;
    restart-node) restart_node "${2:?usage: $0 restart-node NODE}" ;;
    *) echo "usage: $0 start|stop|install|crash-node NODE|restart-node NODE" >&2; exit 2 ;;
esac
