# shellcheck shell=bash disable=SC2034  # (variables set here are read by the scripts)
# Sourced by every launch script: the repository root, the dry-run `run` helper, shell quoting,
# errors, and the checks of CONFIG and WORKDIR. Works with bash 3.2 (macOS) and newer.

# The checkout's root, whatever directory a script is started from.
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
DRY_RUN=0
CONFIG_REL="" # set by config_in_repo

# die MESSAGE: stop with an error (exit 1).
die() {
  printf '%s: error: %s\n' "${0##*/}" "$*" >&2
  exit 1
}

# usage_error MESSAGE: stop on bad arguments (exit 2), pointing to --help.
usage_error() {
  printf '%s: error: %s\n' "${0##*/}" "$*" >&2
  printf "Run '%s --help' for usage.\n" "$0" >&2
  exit 2
}

# quote WORD: WORD as one shell word: unchanged when it is plainly safe, else single-quoted.
quote() {
  local word=$1 q="'"
  if [[ -n $word && $word =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$word"
  else
    printf "'%s'" "${word//$q/$q\\$q$q}"
  fi
}

# quote_words WORD...: the words quoted and joined by spaces: a command line to copy and paste.
quote_words() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(quote "$word")"
  done
  printf '%s' "$out"
}

# run COMMAND [ARG...]: with --dry-run, print the command (`+ ` and shell-quoted) instead of
# running it; otherwise print it on stderr and run it.
run() {
  if ((DRY_RUN)); then
    printf '+ %s\n' "$(quote_words "$@")"
    return 0
  fi
  command -v "$1" >/dev/null 2>&1 || die "'$1' is not installed or not on PATH"
  printf '+ %s\n' "$(quote_words "$@")" >&2
  "$@"
}

# info TEXT: a `# ` comment line: on stdout in a dry run (the printed plan), else on stderr.
info() {
  if ((DRY_RUN)); then
    printf '# %s\n' "$*"
  else
    printf '# %s\n' "$*" >&2
  fi
}

# config_in_repo CONFIG[:ARG]: checks that the config file exists (relative to the current
# directory or to the checkout) inside the checkout, and sets CONFIG_REL to it relative to the
# checkout's root, the directory the hosts run from (":ARG", e.g. ":smoke", is kept).
config_in_repo() {
  local spec=$1 file arg="" dir
  file=${spec%%:*}
  if [[ $spec == *:* ]]; then arg=":${spec#*:}"; fi
  [[ -n $file ]] || usage_error "CONFIG is empty"
  if [[ ! -f $file && $file != /* && -f $REPO_ROOT/$file ]]; then file=$REPO_ROOT/$file; fi
  [[ -f $file ]] || usage_error "config file not found: $file"
  dir=$(cd "$(dirname "$file")" && pwd -P)
  file="$dir/${file##*/}"
  case $file in
    "$REPO_ROOT"/*) CONFIG_REL="${file#"$REPO_ROOT"/}$arg" ;;
    *) usage_error "config $file is outside the checkout $REPO_ROOT: the hosts run the checkout's copy, so put it there" ;;
  esac
}

# check_workdir WORKDIR: an absolute path: every host must write the same directory.
check_workdir() {
  [[ $1 == /* ]] || usage_error "WORKDIR must be an absolute path on storage that every host \
mounts at the same place (a gcsfuse-mounted bucket, Filestore/NFS, a cluster filesystem), not '$1'"
}
