# shellcheck shell=bash
# Sourced by train.sbatch and train_srun.sbatch in the batch shell (on the job's first node), after
# they set CALM_ROOT. Before any rank starts it loads the site file, finds training.output_dir,
# says where the job resumes, picks where the ranks meet (rendezvous.sh) and, on several nodes,
# checks that every node reaches that address and sees the output directory. Then the script calls
# `run_trainer COMMAND...` (the step that starts the ranks) and `finish_job`, which decides what
# happens next: finished, requeued after a pre-end signal or a failure, or stopped.

site=${CALM_SITE:-$CALM_ROOT/slurm/site.sh}
if [[ ! -f $site ]]; then
    echo "error: site file $site not found: cp slurm/site.sh.example slurm/site.sh and edit it" >&2
    exit 2
fi
# shellcheck source=/dev/null
source "$site"
cd "$CALM_ROOT" || exit 2
# Settings newer than a site file copied from an older example get the example's defaults.
: "${CALM_RESTARTS_ON_FAILURE:=2}"

out=""
for arg in "$@"; do [[ $arg == training.output_dir=* ]] && out=${arg#training.output_dir=}; done
[[ -n $out ]] || { echo "error: pass training.output_dir=DIR (the run resumes from it)" >&2; exit 2; }

# "<step> <train_steps>" of the checkpoint `latest` names; "0 0" when there is none.
progress() {
    "$CALM_PYTHON" - "$1" <<'EOF'
import json, pathlib, sys
ckpt = pathlib.Path(sys.argv[1]) / "checkpoints"
try:
    meta = json.loads((ckpt / (ckpt / "latest").read_text().strip() / "meta.json").read_text())
    print(meta["train_state"]["step"], meta["config"]["training"]["train_steps"])
except (OSError, ValueError, KeyError):
    print(0, 0)
EOF
}

# The config, validated for this job's world size before any rank starts: a refusal is one line
# here and exit 2, not one traceback per rank and a job that requeues itself to repeat it.
# `launcher` (set by the script before sourcing this file): torchrun starts GPUS_PER_NODE ranks
# per node; srun starts one rank per task.
if [[ ${launcher:-} == torchrun ]]; then world=$((SLURM_NNODES * GPUS_PER_NODE)); else world=$SLURM_NTASKS; fi
if ! WORLD_SIZE=$world RANK=0 LOCAL_RANK=0 "$CALM_PYTHON" -m calm_dist.train --dry-run "$@" >/dev/null; then
    echo "error: the training config was refused for $world rank(s) (above); no rank was started" >&2
    exit 2
fi

restarts=${SLURM_RESTART_COUNT:-0}
read -r start_step _ < <(progress "$out")
echo "[$(date -Is)] job $SLURM_JOB_ID SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-unset} nodes=$SLURM_JOB_NODELIST" \
    "output_dir=$out resuming_at_step=$start_step"

# Where the ranks meet (addr, port), checked before any rank starts.
# shellcheck source=slurm/rendezvous.sh
source "$CALM_ROOT/slurm/rendezvous.sh"

# Several nodes: one short step on every node before the ranks start. A node that cannot reach the
# rendezvous address, or does not see the output directory (checkpoints need a file system every
# node mounts), would otherwise show up as a rendezvous timeout or a checkpoint no node can resume.
preflight() {
    local marker="$out/.preflight-$SLURM_JOB_ID" ready="$out/.preflight-$SLURM_JOB_ID.listening" listener rc=0 made=""
    [[ -d $out ]] || made=1
    mkdir -p "$out" && : >"$marker"
    # A stand-in for the rendezvous store on this node, on its port, while the nodes connect.
    "$CALM_PYTHON" -c 'import pathlib, socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("", int(sys.argv[1])))
s.listen(64)
pathlib.Path(sys.argv[2]).touch()
while True:
    s.accept()[0].close()' "$port" "$ready" &
    listener=$!
    for _ in $(seq 100); do [[ -f $ready ]] && break; sleep 0.1; done
    # shellcheck disable=SC2016  # the Python snippet's own text
    srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=0 "${CALM_SRUN_ARGS[@]}" \
        "$CALM_PYTHON" -c 'import os, socket, sys
addr, port, marker = sys.argv[1], int(sys.argv[2]), sys.argv[3]
node, errors = socket.gethostname(), []
if not os.path.exists(marker):
    errors.append(f"error: node {node} does not see training.output_dir {os.path.dirname(marker)}: "
                  "put it on a file system every node mounts")
try:
    socket.create_connection((addr, port), timeout=10).close()
except OSError as err:
    errors.append(f"error: node {node} cannot reach the rendezvous {addr}:{port} on the first node ({err}): "
                  "set CALM_MASTER_ADDR in the site file to an address every node reaches, and let the port through")
if errors:
    print("\n".join(errors), file=sys.stderr)
sys.exit(2 if errors else 0)' "$addr" "$port" "$marker" || rc=$?
    kill "$listener" 2>/dev/null || true
    wait "$listener" 2>/dev/null || true
    rm -f "$marker" "$ready"
    if ((rc != 0)); then
        [[ -z $made ]] || rmdir "$out" 2>/dev/null || true  # a failed job leaves no empty run directory
        echo "error: the nodes' check failed (above); no rank was started" >&2
        exit 2
    fi
}
if ((SLURM_NNODES > 1)); then preflight; fi

stop=""
# shellcheck disable=SC2317  # called from the traps
forward() {
    stop=$1
    echo "[$(date -Is)] SIG$1: asking the trainer to save and stop"
    kill -s "$1" "$child" 2>/dev/null || true
}

# Runs the step that starts the ranks, passing on the pre-end signal (USR1) and TERM; sets rc.
run_trainer() {
    trap 'forward USR1' USR1
    trap 'forward TERM' TERM
    "$@" &
    child=$!
    # bash runs a trap only between commands: `wait` returns early on a signal, so wait again.
    rc=0
    while kill -0 "$child" 2>/dev/null; do
        if wait "$child"; then rc=0; else rc=$?; fi
    done
    trap - USR1 TERM
}

# The trainer exited with $rc: finished, requeue, or stop. "Finished" means the step in `latest`
# reached training.train_steps (both read from the checkpoint's meta.json).
finish_job() {
    local step total
    read -r step total < <(progress "$out")
    echo "[$(date -Is)] trainer exited with $rc at step $step of $total"
    if ((total > 0 && step >= total)); then
        echo "finished"
        [[ -n $stop ]] && exit 0  # torchrun's exit code after a forwarded signal is not the workers'
        exit "$rc"
    fi
    # Requeue after the pre-end signal, or when the trainer stopped early by itself with exit 0
    # (training.wall_clock_minutes).
    if [[ $stop == USR1 ]] || [[ -z $stop && $rc -eq 0 ]]; then
        if ((restarts >= CALM_MAX_REQUEUES)); then
            echo "error: not requeueing: already restarted $restarts times (CALM_MAX_REQUEUES)" >&2
            exit 1
        fi
        echo "[$(date -Is)] stopped at step $step: requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    # SIGTERM: scancel, or preemption (SLURM requeues preempted jobs itself if the site says so).
    if [[ $stop == TERM ]]; then
        echo "stopped by SIGTERM at step $step; not requeueing"
        exit $((rc == 0 ? 1 : rc))
    fi
    # A failure (a rank or a node died, a collective timed out). Exit 2 is a refusal of bad input,
    # which a restart would only repeat. Failures are counted per job in <output_dir>/failures.log.
    if ((rc == 2)); then
        exit 2
    fi
    local failures last
    failures=$(grep -c "^job $SLURM_JOB_ID " "$out/failures.log" 2>/dev/null || true)
    last=$(grep "^job $SLURM_JOB_ID " "$out/failures.log" 2>/dev/null | tail -n 1 \
        | sed -n 's/.*checkpoint at step \([0-9]*\)$/\1/p' || true)  # pipefail: no file yet is fine
    mkdir -p "$out"
    echo "job $SLURM_JOB_ID failed at $(date -Is) with exit $rc, newest checkpoint at step $step" >>"$out/failures.log"
    if ((${failures:-0} >= CALM_RESTARTS_ON_FAILURE)); then
        echo "error: the trainer failed (exit $rc) at step $step; not requeueing: $failures restart(s) after" \
            "failures already (CALM_RESTARTS_ON_FAILURE=$CALM_RESTARTS_ON_FAILURE)" >&2
        exit "$rc"
    fi
    # Failing again from the same checkpoint: a restart would repeat it (bad data, a bug), not heal it.
    if [[ -n $last ]] && ((last == step)); then
        echo "error: the trainer failed (exit $rc) again from the checkpoint at step $step; not requeueing" \
            "(no progress since the last failure: see the errors above)" >&2
        exit "$rc"
    fi
    echo "[$(date -Is)] the trainer failed (exit $rc); requeueing job $SLURM_JOB_ID to resume from step $step" \
        "(restart $((${failures:-0} + 1)) of $CALM_RESTARTS_ON_FAILURE after failures)"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
}
