#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Starts one bcl_jax run on all workers of the TPU VM at once.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

FOREGROUND=0

usage() {
  cat <<EOF
Usage: $0 [options] CONFIG WORKDIR [main flags...]

Runs, on every worker at once (gcloud compute tpus tpu-vm ssh NAME --worker=all):
  python -m bcl_jax.main --config=CONFIG --workdir=WORKDIR --distributed [main flags...]
from the code that copy.sh put there, in the environment that setup.sh made. --distributed
makes each host join the slice's jax.distributed job (jax.distributed.initialize() finds the
slice's hosts by itself).

  CONFIG         a config file of this checkout and its argument, e.g. configs/gldv2.py:methods=bct (or
                 configs/gldv2.py:smoke); checked here before anything starts
  WORKDIR        an absolute path that EVERY WORKER SHARES: a gcsfuse-mounted bucket,
                 Filestore/NFS or another shared filesystem mounted at the same place on all
                 workers. Checkpoints, prototypes and results go there; a worker-local disk
                 breaks a run on more than one host. Rerunning the same command resumes.
  main flags     passed on, e.g. --config.new.train.epochs=40

Options:
  --foreground   stay attached and show the output of all workers (stopping the command or a
                 dropped connection stops the run). By default the run starts in the background
                 with nohup, so that it outlives the ssh session, and each worker writes its own
                 log, LOG_DIR/run-<time>.log (LOG_DIR/latest.log points to it): see logs.sh.

$TPU_OPTIONS_HELP

Options go before CONFIG; everything after WORKDIR is passed to bcl_jax.main.
EOF
}

while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --foreground) FOREGROUND=1 ;;
    --) shift; break ;;
    -*) tpu_option "$1" || usage_error "unknown option: $1 (options go before CONFIG)" ;;
    *) break ;;
  esac
  shift
done
(($# >= 2)) || usage_error "CONFIG and WORKDIR are required"
CONFIG=$1 WORKDIR=$2
shift 2
tpu_check
config_in_repo "$CONFIG"
check_workdir "$WORKDIR"

DIR=$(rpath "$TPU_REMOTE_DIR")
PYTHON=$(rpath "$TPU_VENV/bin/python")
MAIN="$PYTHON -m bcl_jax.main $(quote_words "--config=$CONFIG_REL" "--workdir=$WORKDIR" --distributed "$@")"
# On each worker: the environment must exist (setup.sh) and the code be there (copy.sh).
CHECK="[ -x $PYTHON ] || { echo \"\$(hostname): no $TPU_VENV: run setup.sh\" >&2; exit 1; }; cd $DIR"

info "config $CONFIG_REL, workdir $WORKDIR (shared by all workers)"
if ((FOREGROUND)); then
  info "running on all workers of $TPU_NAME in the foreground"
  on_workers all "set -e; $CHECK; $MAIN"
  exit 0
fi

LOG_DIR=$(rpath "$TPU_LOG_DIR")
NAME="run-$(date +%Y%m%d-%H%M%S).log"
LOG="$(rpath "$TPU_LOG_DIR/$NAME")"
info "starting in the background on all workers of $TPU_NAME; each logs to $TPU_LOG_DIR/$NAME"
on_workers all "set -e; $CHECK; mkdir -p $LOG_DIR; ln -sfn $NAME $LOG_DIR/latest.log; \
nohup $MAIN > $LOG 2>&1 < /dev/null & echo \"\$(hostname): started, pid \$!, log $TPU_LOG_DIR/$NAME\""
info "follow it with ${0%/*}/logs.sh (with the same --name, --zone, --project)"
