#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Creates a Cloud TPU VM (one host) or slice (several hosts).
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v5litepod-32}
TPU_RUNTIME=${TPU_RUNTIME:-}
SPOT=0

usage() {
  cat <<EOF
Usage: $0 [options] [-- gcloud flags...]

Creates the TPU VM or slice:
  gcloud compute tpus tpu-vm create NAME --zone=ZONE --accelerator-type=TYPE --version=RUNTIME

  --accelerator=TYPE  ACCELERATOR_TYPE  e.g. v5litepod-32, v4-32, v6e-16, v5p-32 [v5litepod-32]
  --version=RUNTIME   TPU_RUNTIME       the TPU VM software version [from TYPE: v6e-*
                                        v2-alpha-tpuv6e, v5p-* v2-alpha-tpuv5, v5litepod-*
                                        v2-alpha-tpuv5-lite, v4-*/v3-*/v2-* tpu-ubuntu2204-base]
  --spot              a Spot VM: cheaper, can be preempted (then delete, create and rerun:
                      runs resume from their last checkpoint)
  -- FLAGS...         further flags for gcloud, e.g. -- --network=NET --internal-ips

$TPU_OPTIONS_HELP

A slice of more than one host (e.g. v5litepod-32 = 4 hosts, v4-32 = 4 hosts) needs a WORKDIR
that all hosts share (see run.sh). Next: copy.sh, setup.sh, run.sh (launch/README.md).
EOF
}

EXTRA=()
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --accelerator=*) ACCELERATOR_TYPE=${1#*=} ;;
    --version=*) TPU_RUNTIME=${1#*=} ;;
    --spot) SPOT=1 ;;
    --accelerator | --version) usage_error "$1 needs a value: $1=VALUE" ;;
    --) shift; EXTRA=("$@"); break ;;
    *) tpu_option "$1" || usage_error "unknown argument: $1" ;;
  esac
  shift
done
tpu_check

if [[ -z $TPU_RUNTIME ]]; then
  case $ACCELERATOR_TYPE in
    v6e-*) TPU_RUNTIME=v2-alpha-tpuv6e ;;
    v5p-*) TPU_RUNTIME=v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) TPU_RUNTIME=v2-alpha-tpuv5-lite ;;
    v2-* | v3-* | v4-*) TPU_RUNTIME=tpu-ubuntu2204-base ;;
    *) usage_error "no default runtime for accelerator type '$ACCELERATOR_TYPE': pass --version=RUNTIME" ;;
  esac
fi

FLAGS=("--accelerator-type=$ACCELERATOR_TYPE" "--version=$TPU_RUNTIME")
KIND=""
if ((SPOT)); then FLAGS+=(--spot); KIND=", Spot"; fi
info "TPU VM $TPU_NAME: $ACCELERATOR_TYPE, runtime $TPU_RUNTIME$KIND"
tpu_vm create "${FLAGS[@]}" ${EXTRA[@]+"${EXTRA[@]}"}
