#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Deletes the TPU VM (all its workers, their disks and whatever is on them).
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

YES=0

usage() {
  cat <<EOF
Usage: $0 [options]

Deletes the TPU VM or slice: gcloud compute tpus tpu-vm delete NAME --zone=ZONE --quiet
after asking for confirmation. What is on the workers' disks (code, environment, logs) goes
with them; the shared WORKDIR is untouched.

  --yes          do not ask (needed when standard input is not a terminal)

$TPU_OPTIONS_HELP
EOF
}

while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    -y | --yes) YES=1 ;;
    *) tpu_option "$1" || usage_error "unknown argument: $1" ;;
  esac
  shift
done
tpu_check

if ((!YES && !DRY_RUN)); then
  [[ -t 0 ]] || usage_error "not deleting $TPU_NAME without confirmation: pass --yes"
  read -r -p "Delete TPU VM $TPU_NAME${ZONE:+ in $ZONE} and everything on its disks? [y/N] " answer
  case $answer in
    y | Y | yes | YES) ;;
    *) die "not deleted" ;;
  esac
fi
tpu_vm delete --quiet
