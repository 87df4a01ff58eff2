"""What bcl_jax's commands set up before any work: their log, and JAX's compilation cache.

orbax and grain log at INFO on every checkpoint save and restore; `quiet_logging` keeps the
absl log at INFO for bcl_jax's own lines and lets the libraries through only at WARNING and
above. Every command (`python -m bcl_jax.main`, `.export`, `.crosstest`) and the notebooks call
it first.

`use_compile_cache` turns on JAX's persistent compilation cache, so that a rerun, a second
seed or another command on the same models loads its compiled steps instead of compiling them
again. `bcl_jax.main.run` and every command call it.

`timed` and `take_profile` measure where a run's time goes: each stage of `bcl_jax.main` and,
inside training, set-up, the first step (compilation), the steps, the waits for input and the
work between steps. The run prints the breakdown and writes it to results.json (`profile`).
"""

from __future__ import annotations

import contextlib
import os
import time

import jax
from absl import logging

# Where the compiled programs go: this variable's folder, else ~/.cache/bcl_jax/jax ('off': none).
COMPILE_CACHE_ENV = 'BCL_JAX_COMPILE_CACHE'
# Compilations shorter than this are not worth a file (the cache holds the steps, not every op).
_MIN_COMPILE_SECONDS = 0.2

_LIBRARIES = ('orbax', 'grain', 'jax')
# Warnings that say only what bcl_jax asked for: it opens finished checkpoints read-only.
_EXPECTED = ('read_only=True', 'Given directory is read only')


def _quiet_libraries(record) -> bool:
    if not any(f'/{lib}/' in record.pathname for lib in _LIBRARIES):
        return True
    if record.levelno < logging.converter.STANDARD_WARNING:
        return False
    return not any(text in str(record.msg) for text in _EXPECTED)


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
