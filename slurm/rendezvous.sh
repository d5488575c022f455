# shellcheck shell=bash
# Sourced by train.sbatch and train_srun.sbatch in the batch shell, which runs on the job's first
# node: sets `addr` and `port`, where the ranks meet, or stops the job with one line saying why.
#
# The address: the node's first non-loopback one, unless the site sets CALM_MASTER_ADDR
# (hostname --ip-address can resolve to 127.0.1.1 on some sites). The port: CALM_MASTER_PORT, else
# one derived from the job id. A port another process already listens on would make every rank
# wait out the rendezvous timeout with nothing in the log: it is checked here, before any rank starts.

addr=${CALM_MASTER_ADDR:-}
if [[ -z $addr ]]; then
    for a in $(hostname -I 2>/dev/null) $(hostname --ip-address 2>/dev/null); do
        [[ $a == 127.* || $a == *:* ]] && continue
        addr=$a && break
    done
fi
if [[ -z $addr ]]; then
    ((SLURM_NNODES == 1)) || { echo "error: no address for $(hostname); set CALM_MASTER_ADDR" >&2; exit 2; }
    addr=127.0.0.1
fi
port=${CALM_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
# The store is hosted here (node 0) whatever the address. SO_REUSEADDR as torch's store sets it:
# a port left in TIME_WAIT is usable, one with a listener is not. Exit 3: in use; other errors
# (a broken CALM_PYTHON) speak for themselves.
probe=0
"$CALM_PYTHON" -c 'import errno, socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("", int(sys.argv[1])))
except OSError as err:
    sys.exit(3 if err.errno == errno.EADDRINUSE else str(err))' "$port" || probe=$?
if ((probe == 3)); then
    echo "error: rendezvous port $port on $(hostname) is already in use (another job or service):" \
        "set CALM_MASTER_PORT in the site file to a free port" >&2
    exit 2
elif ((probe != 0)); then
    echo "error: could not check rendezvous port $port with $CALM_PYTHON (see above)" >&2
    exit 2
fi
