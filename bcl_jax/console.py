"""What bcl_jax's commands set up before any work: their log, and JAX's compilation cache.

orbax and grain log at INFO on every checkpoint save and restore; `quiet_logging` keeps the
absl log at INFO for bcl_jax's own lines and lets the libraries through only at WARNING and
above. Every command (`python -m bcl_jax.main`, `.export`, `.crosstest`) and the notebooks call
it first.

`parse_flags` parses a command's flags with a config error (an unknown field, a wrong type) in
one line, naming the nearest field for a typo; `input_errors` marks an error raised while a
command reads its inputs (data, checkpoints, embedding files) so that the command ends it with
one line (`exit_on_input_error`) instead of a traceback; `check_writable` refuses an output
folder that cannot be written before any work.

`use_compile_cache` turns on JAX's persistent compilation cache, so that a rerun, a second
seed or another command on the same models loads its compiled steps instead of compiling them
again. `bcl_jax.main.run` and every command call it.

`timed` and `take_profile` measure where a run's time goes: each stage of `bcl_jax.main` and,
inside training, set-up, the first step (compilation), the steps, the waits for input and the
work between steps. The run prints the breakdown and writes it to results.json (`profile`).
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import os
import sys
import time
import uuid

import jax
from absl import flags, logging
from etils import epath

# Where the compiled programs go: this variable's folder, else ~/.cache/bcl_jax/jax ('off': none).
COMPILE_CACHE_ENV = 'BCL_JAX_COMPILE_CACHE'
# Compilations shorter than this are not worth a file (the cache holds the steps, not every op).
_MIN_COMPILE_SECONDS = 0.2

_LIBRARIES = ('orbax', 'grain', 'jax')
# Warnings that say only what bcl_jax asked for: it opens finished checkpoints read-only.
_EXPECTED = ('read_only=True', 'Given directory is read only')
# Errors that bcl_jax raises once, in one line (checkpoint.DiskFullError): each library thread
# that meets them logs them again with its traceback.
_SAID_ONCE = ('No space left on device',)


def _quiet_libraries(record) -> bool:
    if not any(f'/{lib}/' in record.pathname for lib in _LIBRARIES):
        return True
    if record.levelno < logging.converter.STANDARD_WARNING:
        return False
    error = record.exc_info[1] if record.exc_info else None
    text = f'{record.msg} {record.args or ""} {error!r}'
    while error is not None and not any(t in text for t in _SAID_ONCE):
        error = error.__cause__ or error.__context__
        text += f' {error!r}'
    return not any(t in text for t in _EXPECTED + _SAID_ONCE)


def quiet_logging():
    """bcl_jax's own log lines at INFO, the libraries' from WARNING (in a notebook too)."""
    logging.set_verbosity(logging.INFO)
    logger = logging.get_absl_logger()
    if _quiet_libraries not in logger.filters:
        logger.addFilter(_quiet_libraries)


def compile_cache_dir() -> str | None:
    """The compilation cache's folder: $BCL_JAX_COMPILE_CACHE, else $XDG_CACHE_HOME/bcl_jax/jax
    (~/.cache/bcl_jax/jax); None when the variable says 'off'."""
    where = os.environ.get(COMPILE_CACHE_ENV, '').strip()
    if where.lower() in ('off', '0', 'false', 'none'):
        return None
    if where:
        return os.path.expanduser(where)
    cache = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(cache, 'bcl_jax', 'jax')


def use_compile_cache() -> str | None:
    """Turns on JAX's persistent compilation cache (compile_cache_dir()) unless a cache is
    already set (by the user, through JAX's own settings: that one is kept) or turned off.

    Safe to share between runs and versions: JAX keys each entry by the program, the jax and
    jaxlib versions, the device and the compiler flags, and XLA:CPU refuses an entry compiled
    for another processor (it compiles anew). Returns the folder in use, or None.
    """
    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    where = compile_cache_dir()
    if where is None:
        return None
    jax.config.update('jax_compilation_cache_dir', where)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', _MIN_COMPILE_SECONDS)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
    return where


# Seconds per part of the run, in the order the parts first ran (one process runs one pipeline).
_PROFILE: dict[str, float] = {}


@contextlib.contextmanager
def timed(part: str):
    """Adds the wall time of the `with` block to `part` of the profile."""
    start = time.perf_counter()
    try:
        yield
    finally:
        add_time(part, time.perf_counter() - start)


def add_time(part: str, seconds: float):
    _PROFILE[part] = _PROFILE.get(part, 0.0) + seconds


def take_profile() -> dict[str, float]:
    """The parts timed since the last call, and a fresh profile."""
    profile = dict(_PROFILE)
    _PROFILE.clear()
    return profile


def profile_table(profile: dict[str, float], total: float) -> str:
    """The profile as lines of `seconds  share  part`, the untimed rest last."""
    rest = total - sum(profile.values())
    rows = [*profile.items(), ('other (untimed)', rest)] if rest > 0.05 * total else profile.items()
    width = max(len(part) for part, _ in rows)
    return '\n'.join(
        f'  {part:<{width}}  {seconds:8.1f} s  {100 * seconds / total:5.1f}%'
        for part, seconds in rows
    )


# ------------------------------------------------------------------------- command-line errors

CONFIG_HELP = 'See the config file (configs/common.py lists every field).'


def config_fields(tree, prefix: str = '') -> list[str]:
    """Every field's dotted path in a config (groups and leaves)."""
    out = []
    for key, value in tree.items():
        path = f'{prefix}{key}'
        out.append(path)
        if hasattr(value, 'items'):
            out += config_fields(value, path + '.')
    return out


def unknown_field(config, path: str) -> str | None:
    """'unknown field P (did you mean Q?)' when `path` is not a field of `config`, else None."""
    group = config
    for part in path.split('.'):
        if not hasattr(group, 'items') or part not in group:
            break
        group = group[part]
    else:
        return None
    fields = config_fields(config)
    leaf = path.rsplit('.', 1)[-1]
    same_leaf = [f for f in fields if f.rsplit('.', 1)[-1] == leaf]
    near = difflib.get_close_matches(
        path, same_leaf or fields, n=1, cutoff=0.0 if same_leaf else 0.6
    )
    return f'unknown field {path}' + (f' (did you mean {near[0]}?)' if near else '')


def _config_of(argv) -> object | None:
    """The config that --config= names in `argv`, loaded without its overrides (or None)."""
    from ml_collections.config_flags import config_flags

    for arg in argv:
        if arg.startswith('--config='):
            try:
                return config_flags.ConfigFileFlagParser(name='config').parse(arg[9:])
            except Exception:  # noqa: BLE001  (the original error says what is wrong)
                return None
    return None


def flag_error(argv, error: Exception) -> str:
    """One line for a flag error: an unknown config field named with its nearest field."""
    overrides = [a[len('--config.') :].partition('=')[0] for a in argv if a.startswith('--config.')]
    config = _config_of(argv) if overrides else None
    for path in overrides if config is not None else ():
        message = unknown_field(config, path)
        if message:
            return message
    return str(error).replace('\n', ' ')


def parse_flags(argv):
    """absl's flag parsing, with a config error (unknown field, wrong type) in one line."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, KeyError, TypeError, ValueError, AttributeError) as e:
        sys.exit(f'bcl_jax: {flag_error(argv, e)}\n{CONFIG_HELP}')


@contextlib.contextmanager
def input_errors():
    """Marks an OSError or ValueError raised inside as an error of the command's inputs (its
    type unchanged): `exit_on_input_error` ends the command with its message in one line."""
    try:
        yield
    except (OSError, ValueError) as e:
        e.bcl_jax_input = True
        raise


@contextlib.contextmanager
def exit_on_input_error():
    """A command's body: an input error (`input_errors`) exits with one line, not a traceback."""
    try:
        yield
    except (OSError, ValueError) as e:
        if not getattr(e, 'bcl_jax_input', False):
            raise
        message = f'bcl_jax: {" ".join(str(e).split())}'
        if getattr(e, 'errno', None) == errno.ENOSPC:
            # With the disk full the checkpoint writer's threads keep failing, each printing a
            # traceback, and nothing is left to finish: silence them, say why, leave at once.
            sys.stdout.flush()
            sys.stderr.flush()
            stderr = os.dup(2)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
            os.write(
                stderr, f'\n{message}\n'.encode()
            )  # on its own line, whatever was half-written
            os._exit(1)
        sys.exit(message)


def check_writable(folder: str, flag: str):
    """Refuses, before any work, an output folder that cannot be written: creates `folder`
    (local or any epath filesystem), writes and removes a probe file in it, and removes the
    folders it made. An OSError naming `flag` and the cause when that fails."""
    path = epath.Path(folder)
    created = []  # the folders this check makes, removed again: a refused command leaves none
    try:
        missing = path
        while not missing.exists() and missing.parent != missing:
            created.append(missing)
            missing = missing.parent
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f'.bcl_jax-write-check-{uuid.uuid4().hex[:8]}'
        probe.write_text('')
        probe.unlink()
        for made in created:
            made.rmdir()
    except OSError as e:
        error = OSError(f'{flag}={folder} cannot be written ({type(e).__name__}: {e})')
        error.bcl_jax_input = True
        raise error from e
