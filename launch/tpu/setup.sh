#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Installs bcl_jax's Python environment on every worker of the TPU VM.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

PYTHON=${TPU_PYTHON:-python3.11}
REQUIREMENTS=launch/requirements-tpu.txt

usage() {
  cat <<EOF
Usage: $0 [options]

On every worker (gcloud compute tpus tpu-vm ssh NAME --worker=all --command=...): installs
PYTHON (with apt, where the worker lacks it or its venv module), makes the virtual environment
--venv with it and installs $REQUIREMENTS from the copied code
(jax[tpu] and the project's pins). Run copy.sh first; rerun setup.sh when the pins change.

  --python=PYTHON     TPU_PYTHON  the interpreter for the environment: bcl_jax's pins need
                                  Python 3.11 or newer, and the TPU VM images (Ubuntu 22.04)
                                  come with 3.10 [python3.11]

$TPU_OPTIONS_HELP
EOF
}

while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --python=?*) PYTHON=${1#*=} ;;
    --python | --python=) usage_error "--python needs a value: --python=PYTHON" ;;
    *) tpu_option "$1" || usage_error "unknown argument: $1" ;;
  esac
  shift
done
tpu_check
[[ -f $REPO_ROOT/$REQUIREMENTS ]] || die "$REPO_ROOT/$REQUIREMENTS is missing"

DIR=$(rpath "$TPU_REMOTE_DIR")
VENV=$(rpath "$TPU_VENV")
PY=$(quote "$PYTHON")
# apt's packages for a bare name like python3.11 (an absolute path must already work).
APT="echo \"$PYTHON lacks venv/ensurepip: pass --python=...\" >&2; exit 1"
if [[ $PYTHON =~ ^python3\.[0-9]+$ ]]; then
  APT="sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $PY $PY-venv"
fi

info "installing $REQUIREMENTS into $TPU_VENV on every worker of $TPU_NAME (Python: $PYTHON)"
on_workers all "set -e; [ -e $DIR/$REQUIREMENTS ] || { echo \"\$(hostname): no $TPU_REMOTE_DIR/$REQUIREMENTS: run copy.sh first\" >&2; exit 1; }; \
$PY -c 'import ensurepip, venv' >/dev/null 2>&1 || { $APT; }; \
$PY -m venv $VENV; $VENV/bin/python -m pip install --quiet --upgrade pip; \
cd $DIR; $VENV/bin/python -m pip install --quiet -r $REQUIREMENTS; \
echo \"\$(hostname): \$($VENV/bin/python -c 'import sys, jax; print(sys.version.split()[0], \"jax\", jax.__version__)')\""
