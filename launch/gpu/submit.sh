#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Submits one bcl_jax run to a SLURM GPU cluster: launch/gpu/bcl_jax.sbatch, one process per GPU.
set -euo pipefail
# shellcheck source=../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

SBATCH_SCRIPT="$REPO_ROOT/launch/gpu/bcl_jax.sbatch"
NODES="" GPUS="" PARTITION="" TIME="" ACCOUNT="" CPUS="" JOB_NAME=bcl_jax
PYTHON=${BCL_PYTHON:-}
SBATCH_EXTRA=()

usage() {
  cat <<EOF
Usage: $0 [options] --nodes=N --gpus-per-node=G CONFIG WORKDIR [main flags...]

Submits launch/gpu/bcl_jax.sbatch with sbatch: N nodes with G GPUs each, one task (process)
per GPU (N x G processes), each running
  python -m bcl_jax.main --config=CONFIG --workdir=WORKDIR --distributed [main flags...]
from this checkout. --distributed: jax.distributed.initialize() finds the processes from
SLURM's variables; one task per GPU is the layout it expects (see bcl_jax.sbatch).

  CONFIG              a config file of this checkout and its argument, e.g. configs/gldv2.py:methods=bct
  WORKDIR             an absolute path that ALL NODES SHARE (a cluster filesystem, NFS, a
                      gcsfuse-mounted bucket) at the same path; created here if missing.
                      Checkpoints, results and the SLURM log (slurm-<job>.out) go there.
                      Resubmitting the same command resumes the run.
  main flags          passed on, e.g. --config.new.train.epochs=40

  --nodes=N           nodes (required)
  --gpus-per-node=G   GPUs on each node, all used (required)
  --partition=P       SLURM partition    [SBATCH_PARTITION or the cluster's default]
  --time=HH:MM:SS     time limit         [SBATCH_TIMELIMIT or the partition's default]
  --account=A         account to charge  [SBATCH_ACCOUNT or your default]
  --cpus-per-task=C   CPU cores for each process (data loading); worth setting to the node's
                      cores / G where the cluster gives 1 by default
  --job-name=NAME     [bcl_jax]
  --python=PYTHON     BCL_PYTHON: the Python of the environment with launch/requirements-gpu.txt
                      [the python on PATH when the job runs: activate the environment first]
  --sbatch-arg=ARG    one more sbatch option, e.g. --sbatch-arg=--qos=high; may be repeated
  --dry-run           print the sbatch command and the job's settings instead of submitting
  -h, --help          this help

This checkout must be visible at the same path on the compute nodes (the job runs in it).
Options go before CONFIG; everything after WORKDIR is passed to bcl_jax.main.
EOF
}

positive() { [[ $2 =~ ^[1-9][0-9]*$ ]] || usage_error "$1 must be a positive whole number, not '$2'"; }

while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --nodes=*) NODES=${1#*=} ;;
    --gpus-per-node=*) GPUS=${1#*=} ;;
    --partition=*) PARTITION=${1#*=} ;;
    --time=*) TIME=${1#*=} ;;
    --account=*) ACCOUNT=${1#*=} ;;
    --cpus-per-task=*) CPUS=${1#*=} ;;
    --job-name=?*) JOB_NAME=${1#*=} ;;
    --python=?*) PYTHON=${1#*=} ;;
    --sbatch-arg=?*) SBATCH_EXTRA+=("${1#*=}") ;;
    --nodes | --gpus-per-node | --partition | --time | --account | --cpus-per-task | \
      --job-name | --job-name= | --python | --python= | --sbatch-arg | --sbatch-arg=)
      usage_error "${1%=} needs a value: ${1%=}=VALUE" ;;
    --) shift; break ;;
    -*) usage_error "unknown option: $1 (options go before CONFIG)" ;;
    *) break ;;
  esac
  shift
done
[[ -n $NODES ]] || usage_error "--nodes=N is required"
[[ -n $GPUS ]] || usage_error "--gpus-per-node=G is required"
positive --nodes "$NODES"
positive --gpus-per-node "$GPUS"
if [[ -n $CPUS ]]; then positive --cpus-per-task "$CPUS"; fi
if [[ -n $TIME && ! $TIME =~ ^([0-9]+-)?[0-9]+(:[0-9]{2}){0,2}$ ]]; then
  usage_error "--time must be a SLURM time such as 12:00:00 or 2-00:00:00, not '$TIME'"
fi
(($# >= 2)) || usage_error "CONFIG and WORKDIR are required"
CONFIG=$1 WORKDIR=$2
shift 2
config_in_repo "$CONFIG"
check_workdir "$WORKDIR"
[[ -f $SBATCH_SCRIPT ]] || die "$SBATCH_SCRIPT is missing"

SBATCH=(sbatch "--job-name=$JOB_NAME" "--nodes=$NODES" "--ntasks-per-node=$GPUS" "--gpus-per-node=$GPUS")
if [[ -n $CPUS ]]; then SBATCH+=("--cpus-per-task=$CPUS"); fi
if [[ -n $PARTITION ]]; then SBATCH+=("--partition=$PARTITION"); fi
if [[ -n $TIME ]]; then SBATCH+=("--time=$TIME"); fi
if [[ -n $ACCOUNT ]]; then SBATCH+=("--account=$ACCOUNT"); fi
SBATCH+=("--chdir=$REPO_ROOT" "--output=${WORKDIR%/}/slurm-%j.out")
SBATCH+=(${SBATCH_EXTRA[@]+"${SBATCH_EXTRA[@]}"} "$SBATCH_SCRIPT" "$CONFIG_REL" "$WORKDIR" "$@")
if [[ -n $PYTHON ]]; then SBATCH=(env "BCL_PYTHON=$PYTHON" "${SBATCH[@]}"); fi

info "job $JOB_NAME: $NODES node(s) x $GPUS GPU(s) = $((NODES * GPUS)) processes, one per GPU"
info "each: ${PYTHON:-python} -m bcl_jax.main $(quote_words "--config=$CONFIG_REL" "--workdir=$WORKDIR" --distributed "$@")"
info "runs in $REPO_ROOT; workdir and SLURM log ${WORKDIR%/}/slurm-<job>.out (shared by all nodes)"
info "partition ${PARTITION:-default}, time limit ${TIME:-default}, account ${ACCOUNT:-default}, CPUs per process ${CPUS:-default}"
run mkdir -p "$WORKDIR"
run "${SBATCH[@]}"
