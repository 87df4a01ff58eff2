"""The measurements by name, the sizes they read, running them, and writing the results.

A measurement is a function `(cfg, results) -> dict` registered with `@measurement(name)`:
`cfg` holds every size (`SIZES`, a flag each in `python -m bcl_jax.bench`) and `results` the
results of the measurements run before it in the same run.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
import platform
import tempfile
import textwrap
from collections.abc import Callable

import jax

MEASUREMENTS: dict[str, Callable[[dict, dict], dict]] = {}


@dataclasses.dataclass(frozen=True)
class Size:
    """One size a measurement group reads: its default (GLDv2 scale), its `--quick` value (the
    whole run in seconds, for tests) and a short help line."""

    default: int | float | bool
    quick: int | float | bool
    help: str


SIZES: dict[str, Size] = {}
SIZE_GROUPS: dict[str, tuple[str, ...]] = {}  # group (module) name -> its sizes, in order


def measurement(name: str):
    """Registers the decorated function as measurement `name`."""

    def register(fn):
        if name in MEASUREMENTS:
            raise ValueError(f'measurement {name!r} is registered twice')
        MEASUREMENTS[name] = fn
        return fn

    return register


def sizes(group: str, table: dict[str, Size]) -> dict[str, Size]:
    """Registers a measurement group's sizes (names are shared by all groups: one flag each)."""
    clash = sorted(set(table) & set(SIZES))
    if clash:
        raise ValueError(f'sizes {clash} of {group} are already defined by another group')
    SIZES.update(table)
    SIZE_GROUPS[group] = tuple(table)
    return table


def config(*, quick: bool = False, **overrides) -> dict:
    """Every size: the defaults or, with `quick`, the quick values; `overrides` win."""
    unknown = sorted(set(overrides) - set(SIZES))
    if unknown:
        raise ValueError(f'unknown sizes {unknown}; known: {sorted(SIZES)}')
    cfg = {name: (s.quick if quick else s.default) for name, s in SIZES.items()}
    return dict(cfg, **overrides, quick=quick)


def define_flags(flag_values=None) -> None:
    """One absl flag per size, its default the size's default (`python -m bcl_jax.bench`)."""
    from absl import flags

    flag_values = flags.FLAGS if flag_values is None else flag_values
    define = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float}
    for group, names in SIZE_GROUPS.items():
        for name in names:
            size = SIZES[name]
            help_line = f'{group}: {size.help} (--quick: {size.quick})'
            define[type(size.default)](name, size.default, help_line, flag_values=flag_values)


def sizes_usage(width: int = 96) -> str:
    """The sizes by group as `--name=default`, wrapped, for the usage text."""
    lines = ['', 'Sizes (defaults; --quick sets small ones):']
    for group, names in SIZE_GROUPS.items():
        flags_text = ' '.join(f'--{n}={_flag_text(SIZES[n].default)}' for n in names)
        lines += textwrap.wrap(
            f'{group}: {flags_text}', width, initial_indent='  ', subsequent_indent='      '
        )
    return '\n'.join(lines) + '\n'


def _flag_text(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def environment() -> dict:
    return {
        'jax': jax.__version__,
        'backend': jax.default_backend(),
        'devices': [str(d) for d in jax.devices()],
        'cpu_count': os.cpu_count(),
        'machine': platform.machine(),
        'python': platform.python_version(),
    }


def run(cfg: dict, measure: list[str]) -> dict:
    """Runs the named measurements in order, printing one JSON line each; the report."""
    unknown = [m for m in measure if m not in MEASUREMENTS]
    if unknown:
        raise ValueError(f'unknown measurements {unknown}; known: {sorted(MEASUREMENTS)}')
    results = {}
    for name in measure:
        results[name] = MEASUREMENTS[name](cfg, results)
        print(f'{name}: {json.dumps(results[name])}', flush=True)
    return {
        'config': dict(cfg, measure=list(measure)),
        'environment': environment(),
        'results': results,
    }


def default_out_dir() -> pathlib.Path:
    """runs/bench/ of the checkout that holds this bcl_jax (git-ignored), else, for an installed
    package, ~/.cache/bcl_jax/bench: never the current directory."""
    checkout = pathlib.Path(__file__).resolve().parents[2]
    if (checkout / 'pyproject.toml').is_file() and (checkout / 'bcl_jax').is_dir():
        return checkout / 'runs' / 'bench'
    return pathlib.Path.home() / '.cache' / 'bcl_jax' / 'bench'


def default_out_path(now: datetime.datetime | None = None) -> pathlib.Path:
    """default_out_dir()/bench-<local time>.json, a new name (a suffix when taken)."""
    stamp = (now or datetime.datetime.now()).strftime('%Y%m%d-%H%M%S')
    folder = default_out_dir()
    path, n = folder / f'bench-{stamp}.json', 1
    while path.exists():
        n += 1
        path = folder / f'bench-{stamp}-{n}.json'
    return path


def write_json(report: dict, path) -> pathlib.Path:
    """Writes `report` to `path` atomically (a temporary file in the same folder, then renamed
    over it): a reader never sees half a file, and a failed run leaves the old one."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'w') as f:
            json.dump(report, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)  # mkstemp makes the file 0600; give it the usual permissions
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path
