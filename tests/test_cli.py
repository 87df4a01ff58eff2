"""The `bcl-jax` command and the package: the wheel installs and runs from outside the checkout."""

import glob
import os
import subprocess
import sys

import pytest

from bcl_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_config_paths_fall_back_to_the_shipped_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./configs here
    shipped = os.path.join(REPO, 'configs', 'synthetic.py')
    assert cli.resolve_config('--config=configs/synthetic.py:smoke') == f'--config={shipped}:smoke'
    assert cli.resolve_config('--config=configs/synthetic.py') == f'--config={shipped}'
    # A file that exists where the command runs, or another folder, is taken as it is.
    (tmp_path / 'configs').mkdir()
    (tmp_path / 'configs' / 'synthetic.py').write_text('')
    assert cli.resolve_config('--config=configs/synthetic.py') == '--config=configs/synthetic.py'
    assert cli.resolve_config('--config=mine/x.py:a') == '--config=mine/x.py:a'
    assert cli.resolve_config('--workdir=configs/x') == '--workdir=configs/x'


def test_unknown_or_missing_command_prints_the_usage(capsys):
    assert cli.main(['fit']) == 2
    assert "unknown command 'fit'" in capsys.readouterr().out
    assert cli.main([]) == 2 and cli.main(['--help']) == 0
    assert 'train|export|crosstest|prepare|bench' in capsys.readouterr().out


@pytest.mark.slow
def test_the_wheel_runs_the_smoke_pipeline_from_outside_the_checkout(tmp_path):
    """pip builds the wheel; installed (without dependencies, which this environment has) into
    a folder of its own, its `bcl-jax train` runs the packaged smoke config from a directory
    where no bcl_jax or configs source lies."""
    pip = [sys.executable, '-m', 'pip', '--disable-pip-version-check', '-q']
    subprocess.run([*pip, 'wheel', '--no-deps', REPO, '-w', str(tmp_path / 'dist')], check=True)
    (wheel,) = glob.glob(str(tmp_path / 'dist' / 'bcl_jax-*.whl'))
    site = tmp_path / 'site'
    subprocess.run([*pip, 'install', '--no-deps', '--target', str(site), wheel], check=True)
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site))
    run = subprocess.run(
        [
            str(site / 'bin' / 'bcl-jax'),
            'train',
            '--config=configs/synthetic.py:smoke',
            f'--workdir={tmp_path / "run"}',
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / 'run' / 'results.json').exists()
    where = subprocess.run(
        [
            sys.executable,
            '-c',
            'import bcl_jax, configs; print(bcl_jax.__file__, configs.__file__)',
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert where.stdout.count(str(site)) == 2  # the installed copies, not the checkout
