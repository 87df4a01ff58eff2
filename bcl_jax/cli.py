"""The `bcl-jax` command: one entry point for bcl_jax's command-line tools.

    bcl-jax train --config=configs/synthetic.py:smoke --workdir=runs/smoke
    bcl-jax export --checkpoint=... --out=...      (python -m bcl_jax.export)
    bcl-jax crosstest ...                          (python -m bcl_jax.crosstest)
    bcl-jax prepare ...                            (python -m bcl_jax.data.prepare)
    bcl-jax bench ...                              (python -m bcl_jax.bench)

Each subcommand is the module's own command line, run as `python -m <module>` would run it.
`--config=configs/<file>` names a config shipped with bcl_jax when no such file exists where the
command runs, so the same command works from a checkout and from an installed package.
"""

from __future__ import annotations

import os
import runpy
import sys

import configs

COMMANDS = {
    'train': 'bcl_jax.main',
    'export': 'bcl_jax.export',
    'crosstest': 'bcl_jax.crosstest',
    'prepare': 'bcl_jax.data.prepare',
    'bench': 'bcl_jax.bench',
}
_CONFIG_FLAG = '--config='
_SHIPPED = os.path.dirname(os.path.abspath(configs.__file__))


def resolve_config(arg: str) -> str:
    """`--config=configs/x.py[:arg]` -> the shipped configs/x.py when ./configs/x.py is absent."""
    if not arg.startswith(_CONFIG_FLAG):
        return arg
    path, sep, rest = arg[len(_CONFIG_FLAG) :].partition(':')
    head, name = os.path.split(os.path.normpath(path))
    if os.path.exists(path) or head != 'configs':
        return arg
    shipped = os.path.join(_SHIPPED, name)
    return f'{_CONFIG_FLAG}{shipped}{sep}{rest}' if os.path.exists(shipped) else arg


def usage() -> str:
    return f'usage: bcl-jax {{{"|".join(COMMANDS)}}} [flags]  (bcl-jax <command> --help)'


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(usage() if not argv else f'bcl-jax: unknown command {argv[0]!r}\n{usage()}')
        return 0 if argv[:1] in (['-h'], ['--help']) else 2
    command, *flags = argv
    sys.argv = [f'bcl-jax {command}', *map(resolve_config, flags)]
    runpy.run_module(COMMANDS[command], run_name='__main__', alter_sys=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
