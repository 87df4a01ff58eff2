#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Shows the log of the latest background run (run.sh) on one worker of the TPU VM.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

WORKER=0
LINES=100
FOLLOW=1

usage() {
  cat <<EOF
Usage: $0 [options]

Streams LOG_DIR/latest.log, the log of the latest run started by run.sh, from one worker
(tail -F over gcloud compute tpus tpu-vm ssh; Ctrl-C stops watching, not the run).
Worker 0 writes the results and the config; all workers log their own progress.

  --worker=N     the worker to read [0]
  --lines=N      start with the last N lines [100]
  --no-follow    print the last lines and return

$TPU_OPTIONS_HELP
EOF
}

while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --worker=*) WORKER=${1#*=} ;;
    --lines=*) LINES=${1#*=} ;;
    --no-follow) FOLLOW=0 ;;
    --worker | --lines) usage_error "$1 needs a value: $1=N" ;;
    *) tpu_option "$1" || usage_error "unknown argument: $1" ;;
  esac
  shift
done
tpu_check
[[ $WORKER =~ ^[0-9]+$ ]] || usage_error "--worker must be a worker number (0, 1, ...), not '$WORKER'"
[[ $LINES =~ ^[0-9]+$ ]] || usage_error "--lines must be a number, not '$LINES'"

LOG=$(rpath "$TPU_LOG_DIR/latest.log")
TAIL="tail -n $LINES"
if ((FOLLOW)); then TAIL+=" -F"; fi
info "worker $WORKER of $TPU_NAME: $TPU_LOG_DIR/latest.log"
on_workers "$WORKER" "[ -e $LOG ] || { echo \"\$(hostname): no $TPU_LOG_DIR/latest.log: start a run with run.sh\" >&2; exit 1; }; $TAIL $LOG"
