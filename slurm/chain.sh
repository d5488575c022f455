#!/bin/bash
# Submit the whole CALM pipeline as one SLURM job chain, each job waiting for the previous one to
# succeed (--dependency=afterok, --kill-on-invalid-dep=yes: a failure cancels the rest):
#   1. stage 1, the autoencoder  (train.sbatch, output OUT/stage1, exports OUT/stage1/autoencoder)
#   2. stage 2, CALM             (train.sbatch, output OUT/stage2, training.autoencoder_path=OUT/stage1/autoencoder)
#   3. conversion                (convert.sbatch OUT/stage2 OUT/converted)
#   4. evaluation                (eval.sbatch OUT/converted --data EVAL_DATA --out OUT/eval.json)
#
#   slurm/chain.sh --out runs/chain --eval-data data/sotu/valid \
#       --stage1 autoencoder --stage2 calm_m --nodes 4 -- \
#       data.train_path=data/sotu/train data.valid_path=data/sotu/valid data.tokenizer=data/sotu/tokenizer.json
#
# Options:
#   --out DIR             the chain's directory (required); job logs go to DIR/logs
#   --eval-data PATH      evaluation data for calm-eval --data (required)
#   --stage1 PRESET       stage-1 preset (default autoencoder)
#   --stage2 PRESET       stage-2 preset (default calm_m)
#   --nodes N             nodes per training job (default 1)
#   --partition P         overrides CALM_PARTITION of the site file; --account A: CALM_ACCOUNT
#   --sbatch-arg ARG      an extra sbatch option for every job (repeatable), e.g. --sbatch-arg=--qos=high
#   --stage1-arg KEY=V    a trainer override for stage 1 only (repeatable); --stage2-arg for stage 2
#   --convert-arg ARG     an extra argument for the converter (repeatable); --eval-arg for eval
#   --dry-run             print the sbatch commands, submit nothing
#   -- OVERRIDES...       trainer overrides for both stages (data paths, ...)
# The site file (slurm/site.sh, or CALM_SITE) supplies partition, account and CALM_SBATCH_ARGS
# (GPU options for the training jobs). Nothing is submitted unless every check passes.
set -euo pipefail

die() { echo "chain.sh: error: $*" >&2; exit 2; }

CALM_ROOT=${CALM_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
export CALM_ROOT
site=${CALM_SITE:-$CALM_ROOT/slurm/site.sh}

dry=0 out="" eval_data="" stage1=autoencoder stage2=calm_m nodes=1 partition="" account=""
have_partition=0 have_account=0
sbatch_args=() s1_args=() s2_args=() convert_args=() eval_args=() common=()
need() { (($# >= 2)) || die "$1 needs a value"; }
while (($#)); do
    case $1 in
        --dry-run) dry=1; shift ;;
        --out | --eval-data | --stage1 | --stage2 | --nodes | --partition | --account | --sbatch-arg \
            | --stage1-arg | --stage2-arg | --convert-arg | --eval-arg)
            need "$@"
            case $1 in
                --out) out=$2 ;;
                --eval-data) eval_data=$2 ;;
                --stage1) stage1=$2 ;;
                --stage2) stage2=$2 ;;
                --nodes) nodes=$2 ;;
                --partition) partition=$2; have_partition=1 ;;
                --account) account=$2; have_account=1 ;;
                --sbatch-arg) sbatch_args+=("$2") ;;
                --stage1-arg) s1_args+=("$2") ;;
                --stage2-arg) s2_args+=("$2") ;;
                --convert-arg) convert_args+=("$2") ;;
                --eval-arg) eval_args+=("$2") ;;
            esac
            shift 2 ;;
        --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}" ;;
        --) shift; common+=("$@"); break ;;
        -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (trainer overrides go after --)" ;;
    esac
done

[[ -n $out ]] || die "--out DIR is required"
[[ -n $eval_data ]] || die "--eval-data PATH is required"
[[ $nodes =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got '$nodes'"
for a in "${common[@]}" "${s1_args[@]}" "${s2_args[@]}"; do
    case $a in
        training.output_dir=* | training.autoencoder_path=*) die "chain.sh sets $a itself (from --out)" ;;
    esac
done
[[ -f $site ]] || die "site file $site not found: cp slurm/site.sh.example slurm/site.sh and edit it"
# shellcheck source=/dev/null
source "$site"
((have_partition)) || partition=${CALM_PARTITION:-}
((have_account)) || account=${CALM_ACCOUNT:-}

if ! command -v sbatch >/dev/null 2>&1; then
    ((dry)) || die "sbatch not found on PATH (run this on a SLURM login node, or load the slurm module)"
    echo "# dry run: sbatch not on PATH, cluster checks skipped"
elif [[ -n $partition ]]; then
    command -v sinfo >/dev/null 2>&1 || die "sinfo not found on PATH"
    [[ -n $(sinfo -h -p "$partition" -o %P 2>/dev/null) ]] \
        || die "partition '$partition' does not exist (sinfo -s lists the partitions)"
fi

case $out in /*) ;; *) out=$PWD/$out ;; esac
logs=$out/logs
base=(sbatch --parsable --kill-on-invalid-dep=yes --output="$logs/%x-%j.out")
[[ -n $partition ]] && base+=(--partition="$partition")
[[ -n $account ]] && base+=(--account="$account")
base+=("${sbatch_args[@]}")
train=("${base[@]}" --nodes="$nodes" "${CALM_SBATCH_ARGS[@]}")
cmds=()

# submit NAME DEPENDENCY COMMAND...: prints the command; runs it unless --dry-run. The job id goes
# to the global `jid` (NAME_JOB_ID in a dry run, so the printed dependencies name the jobs).
jid=""
submit() {
    local name=$1 dep=$2
    shift 2
    local cmd=("$@")
    [[ -n $dep ]] && cmd=("${cmd[0]}" --dependency="afterok:$dep" "${cmd[@]:1}")
    printf '%q ' "${cmd[@]}"
    echo
    if ((dry)); then
        jid="${name^^}_JOB_ID"
    else
        jid=$("${cmd[@]}") || jid=""
        jid=${jid%%;*}
        if [[ ! $jid =~ ^[0-9]+$ ]]; then
            if ((${#cmds[@]})); then
                echo "chain.sh: cancelling the jobs already submitted: ${cmds[*]}" >&2
                scancel "${cmds[@]#*=}" || true
            fi
            die "sbatch failed for $name; nothing of the chain is left queued"
        fi
        echo "# $name: job $jid"
        cmds+=("$name=$jid")
    fi
}

((dry)) || mkdir -p "$logs"
cd "$CALM_ROOT"
submit stage1 "" "${train[@]}" --job-name=calm-stage1 slurm/train.sbatch --config "$stage1" \
    "${common[@]}" "${s1_args[@]}" "training.output_dir=$out/stage1"
j1=$jid
submit stage2 "$j1" "${train[@]}" --job-name=calm-stage2 slurm/train.sbatch --config "$stage2" \
    "${common[@]}" "${s2_args[@]}" "training.output_dir=$out/stage2" "training.autoencoder_path=$out/stage1/autoencoder"
j2=$jid
submit convert "$j2" "${base[@]}" --job-name=calm-convert slurm/convert.sbatch \
    "$out/stage2" "$out/converted" "${convert_args[@]}"
j3=$jid
submit eval "$j3" "${base[@]}" --job-name=calm-eval slurm/eval.sbatch \
    "$out/converted" --data "$eval_data" --out "$out/eval.json" "${eval_args[@]}"
((dry)) || echo "# submitted: ${cmds[*]} (squeue -u \"\$USER\"; logs in $logs)"
