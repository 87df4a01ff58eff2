"""Two real JAX processes on this machine (2 CPU devices each, `--distributed`) against one
process with 4 devices: the same global batches, the same losses, one set of result files."""

import json
import os
import socket
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMAND = [
    sys.executable,
    '-m',
    'bcl_jax.main',
    '--config=configs/synthetic.py:smoke',
    '--config.methods=("bct",)',
]


def _env(devices, **extra):
    env = dict(os.environ, JAX_PLATFORMS='cpu', **extra)
    env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
    return env


def _free_port():
    with socket.socket() as s:
        s.bind(('localhost', 0))
        return s.getsockname()[1]


def _losses(workdir, stage):
    with open(os.path.join(workdir, stage, 'metrics.jsonl')) as f:
        return [(r['step'], r['loss']) for r in map(json.loads, f) if 'loss' in r]


@pytest.mark.slow
def test_two_hosts_match_one_host(tmp_path):
    multi, single = str(tmp_path / 'multi'), str(tmp_path / 'single')
    coordinator = f'localhost:{_free_port()}'
    hosts = [
        subprocess.Popen(
            [*COMMAND, f'--workdir={multi}', '--distributed'],
            cwd=REPO,
            env=_env(
                2,
                JAX_COORDINATOR_ADDRESS=coordinator,
                JAX_NUM_PROCESSES='2',
                JAX_PROCESS_ID=str(i),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [h.communicate(timeout=600)[0] for h in hosts]
    for h, out in zip(hosts, outputs):
        assert h.returncode == 0, out[-3000:]
    assert '2 process(es), 4 device(s)' in outputs[0]
    subprocess.run(
        [*COMMAND, f'--workdir={single}'], cwd=REPO, env=_env(4), check=True, capture_output=True
    )

    for stage in ('old', 'new_bct'):
        got, want = _losses(multi, stage), _losses(single, stage)
        assert [s for s, _ in got] == [s for s, _ in want]  # one log, written by process 0
        for (_, a), (_, b) in zip(got, want):
            assert a == pytest.approx(b, rel=1e-5)
    with open(os.path.join(multi, 'results.json')) as f:
        multi_results = json.load(f)
    with open(os.path.join(single, 'results.json')) as f:
        single_results = json.load(f)
    assert multi_results['old_old']['mAP'] == pytest.approx(
        single_results['old_old']['mAP'], abs=0.02
    )
