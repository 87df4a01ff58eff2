# shellcheck shell=bash source-path=SCRIPTDIR disable=SC2034  # (read by the scripts)
# Sourced by the Cloud TPU VM scripts: their shared options (flags with environment-variable
# defaults) and the gcloud commands they build.

# shellcheck source=../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

# Paths on the workers start with ~/ (the worker's home directory) or /.
# shellcheck disable=SC2088
{
  TPU_NAME=${TPU_NAME:-bcl-jax}
  ZONE=${ZONE:-}
  PROJECT=${PROJECT:-}
  TPU_REMOTE_DIR=${TPU_REMOTE_DIR:-'~/bcl_jax'}
  TPU_VENV=${TPU_VENV:-'~/bcl_jax_venv'}
  TPU_LOG_DIR=${TPU_LOG_DIR:-'~/bcl_jax_logs'}
}

TPU_OPTIONS_HELP='Common options (a flag, or the environment variable named after it):
  --name=NAME         TPU_NAME        the TPU VM (one host) or slice (several) [bcl-jax]
  --zone=ZONE         ZONE            e.g. us-central2-b [gcloud config compute/zone]
  --project=PROJECT   PROJECT         [gcloud config core/project]
  --remote-dir=DIR    TPU_REMOTE_DIR  the code on every worker [~/bcl_jax]
  --venv=DIR          TPU_VENV        the Python environment on every worker [~/bcl_jax_venv]
  --log-dir=DIR       TPU_LOG_DIR     run logs on every worker [~/bcl_jax_logs]
  --dry-run           print the commands (shell-quoted, after "+ ") instead of running them
  -h, --help          this help'

# tpu_option ARG: handles one of the common options; returns 1 for any other argument.
tpu_option() {
  case $1 in
    --name=*) TPU_NAME=${1#*=} ;;
    --zone=*) ZONE=${1#*=} ;;
    --project=*) PROJECT=${1#*=} ;;
    --remote-dir=*) TPU_REMOTE_DIR=${1#*=} ;;
    --venv=*) TPU_VENV=${1#*=} ;;
    --log-dir=*) TPU_LOG_DIR=${1#*=} ;;
    --dry-run) DRY_RUN=1 ;;
    --name | --zone | --project | --remote-dir | --venv | --log-dir)
      usage_error "$1 needs a value: $1=VALUE" ;;
    *) return 1 ;;
  esac
}

# tpu_check: the values every TPU script needs.
tpu_check() {
  [[ -n $TPU_NAME ]] || usage_error "no TPU name: pass --name=NAME or set TPU_NAME"
  [[ $TPU_NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    usage_error "TPU name '$TPU_NAME': lower-case letters, digits and '-', starting with a letter"
  local dir re='^(~/|/)[A-Za-z0-9_.][A-Za-z0-9_./-]*$'
  for dir in "$TPU_REMOTE_DIR" "$TPU_VENV" "$TPU_LOG_DIR"; do
    [[ $dir =~ $re ]] || usage_error "worker path '$dir': ~/PATH or /PATH, of letters, digits and _ . / -"
  done
}

# location_flags: --zone and --project where given (else gcloud's configured defaults).
location_flags() {
  LOCATION=()
  if [[ -n $ZONE ]]; then LOCATION+=("--zone=$ZONE"); fi
  if [[ -n $PROJECT ]]; then LOCATION+=("--project=$PROJECT"); fi
}

# tpu_vm VERB [FLAG...]: gcloud compute tpus tpu-vm VERB NAME --zone --project FLAG...
tpu_vm() {
  local verb=$1
  shift
  location_flags
  run gcloud compute tpus tpu-vm "$verb" "$TPU_NAME" ${LOCATION[@]+"${LOCATION[@]}"} "$@"
}

# on_workers WORKER COMMAND: run the shell COMMAND on worker WORKER (a number, or all).
on_workers() {
  tpu_vm ssh "--worker=$1" "--command=$2"
}

# rpath PATH: PATH as a word for the worker's shell: ~/x becomes "$HOME"/x.
# shellcheck disable=SC2016
rpath() {
  case $1 in
    \~/*) printf '"$HOME"/%s' "$(quote "${1#\~/}")" ;;
    *) quote "$1" ;;
  esac
}
