"""What bcl_jax's command-line tools print: their own log lines, not their libraries'.

orbax and grain log at INFO on every checkpoint save and restore; `quiet_logging` keeps the
absl log at INFO for bcl_jax's own lines and lets the libraries through only at WARNING and
above. Every command (`python -m bcl_jax.main`, `.export`, `.crosstest`) and the notebooks call
it first.
"""

from __future__ import annotations

from absl import logging

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
