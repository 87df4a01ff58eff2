#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Puts the code on every worker of the TPU VM: this checkout, or a git clone.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

GIT=""
EXCLUDES=(.git ./runs __pycache__ .pytest_cache .ruff_cache .venv '*.egg-info')

usage() {
  cat <<EOF
Usage: $0 [options]

Copies this checkout (as it is on disk, uncommitted changes included) to every worker, into
--remote-dir (replaced; a directory there that is not a bcl_jax checkout is left alone):
a tar of the checkout, 'gcloud compute tpus tpu-vm scp ... --worker=all', and an unpack on
each worker.

  --git=URL[@REV]     clone URL on every worker instead and check out REV (a commit, tag or
                      branch; default: the default branch), e.g.
                      --git=https://github.com/ORG/bcl_jax.git@v0.1
  --exclude=PATTERN   leave PATTERN out of the copy (tar --exclude); may be repeated.
                      Always left out: ${EXCLUDES[*]}

$TPU_OPTIONS_HELP

Next: setup.sh (once per TPU VM), then run.sh. Rerun copy.sh after changing the code.
EOF
}

while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --git=?*) GIT=${1#*=} ;;
    --exclude=?*) EXCLUDES+=("${1#*=}") ;;
    --git | --git= | --exclude | --exclude=) usage_error "${1%=} needs a value: ${1%=}=VALUE" ;;
    *) tpu_option "$1" || usage_error "unknown argument: $1" ;;
  esac
  shift
done
tpu_check

DIR=$(rpath "$TPU_REMOTE_DIR")
NEW=$(rpath "$TPU_REMOTE_DIR.new")
# On each worker: never replace a directory that is not a bcl_jax checkout (a wrong --remote-dir).
GUARD="if [ -e $DIR ] && [ ! -e $DIR/bcl_jax/main.py ]; then echo \"\$(hostname): $TPU_REMOTE_DIR is not a bcl_jax checkout: not replacing it\" >&2; exit 1; fi"
SWAP="rm -rf $DIR; mv $NEW $DIR; echo \"\$(hostname): code in $TPU_REMOTE_DIR\""

if [[ -n $GIT ]]; then
  # URL@REV: REV is what follows the last @, unless that holds a / or a : (git@host:org/repo).
  URL=$GIT REV=""
  if [[ $GIT == *@* ]]; then
    tail=${GIT##*@}
    if [[ $tail != */* && $tail != *:* ]]; then URL=${GIT%@*} REV=$tail; fi
  fi
  [[ -n $URL ]] || usage_error "--git needs a URL"
  CHECKOUT=""
  if [[ -n $REV ]]; then
    r=$(quote "$REV")
    ro=$(quote "origin/$REV")
    CHECKOUT="{ git -C $NEW checkout --quiet --detach $ro 2>/dev/null || git -C $NEW checkout --quiet --detach $r; }; "
  fi
  info "cloning $URL${REV:+ at $REV} into $TPU_REMOTE_DIR on every worker of $TPU_NAME"
  on_workers all "set -e; $GUARD; rm -rf $NEW; git clone --quiet $(quote "$URL") $NEW; $CHECKOUT$SWAP"
  exit 0
fi

# The local checkout: one tar, copied to all workers, unpacked on each.
if ((DRY_RUN)); then
  TARBALL="${TMPDIR:-/tmp}/bcl_jax-code.tar.gz"
else
  TMP=$(mktemp -d)
  trap 'rm -rf "$TMP"' EXIT
  TARBALL="$TMP/bcl_jax-code.tar.gz"
fi
TAR=(tar -C "$REPO_ROOT" -czf "$TARBALL")
for pattern in "${EXCLUDES[@]}"; do TAR+=("--exclude=$pattern"); done
TAR+=(.)
REMOTE_TAR='bcl_jax-code.tar.gz' # in the worker's home directory

info "copying $REPO_ROOT to $TPU_REMOTE_DIR on every worker of $TPU_NAME"
run "${TAR[@]}"
location_flags
run gcloud compute tpus tpu-vm scp "$TARBALL" "$TPU_NAME:$REMOTE_TAR" --worker=all \
  ${LOCATION[@]+"${LOCATION[@]}"}
on_workers all "set -e; $GUARD; rm -rf $NEW; mkdir -p $NEW; tar -xzf $REMOTE_TAR -C $NEW; rm -f $REMOTE_TAR; $SWAP"
