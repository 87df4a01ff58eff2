"""Evaluating given models: exporting embeddings, scoring them from files, cross-testing
checkpoints, and the sequential upgrades' matrix and curves in a run."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from bcl_jax import crosstest, embedding_files, export, main
from configs import synthetic, synthetic_sequential

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    """A smoke run with one compatible method (old + BCT): (config, workdir, results)."""
    cfg = synthetic.get_config('smoke')
    cfg.methods = ('independent', 'bct')
    workdir = str(tmp_path_factory.mktemp('run'))
    return cfg, workdir, main.run(cfg, workdir)


def ckpt(workdir, stage):
    return os.path.join(workdir, stage, 'ckpt')


def test_export_then_score_from_files_gives_the_in_process_numbers(run, tmp_path):
    cfg, workdir, results = run
    for stage in ('old', 'new_bct'):
        export.export(cfg, ckpt(workdir, stage), str(tmp_path / stage))
    names = sorted(os.listdir(tmp_path / 'old'))
    assert 'synthetic.query.npy' in names and 'synthetic.gallery.ids.txt' in names
    manifest = json.loads((tmp_path / 'old' / 'synthetic.query.json').read_text())
    assert manifest['identity']['weights'] == results['old_model']['identity']

    paths = dict(old=str(tmp_path / 'old'), bct=str(tmp_path / 'new_bct'))
    scored = crosstest.run(cfg, paths, str(tmp_path / 'cross'))
    assert scored['old_old'] == results['old_old']
    for test in ('new_new', 'new_old'):
        assert scored['methods']['bct'][test] == results['methods']['bct'][test]
    # A mix: the old gallery from files, the new model from its checkpoint.
    mixed = crosstest.run(
        cfg, dict(old=str(tmp_path / 'old'), bct=ckpt(workdir, 'new_bct')), str(tmp_path / 'mix')
    )
    assert mixed['methods']['bct']['new_old'] == results['methods']['bct']['new_old']
    assert os.path.exists(tmp_path / 'mix' / 'compatibility_synthetic.png')


def test_files_in_another_order_are_aligned_by_id(run, tmp_path):
    cfg, workdir, results = run
    export.export(cfg, ckpt(workdir, 'old'), str(tmp_path / 'old'))
    found = embedding_files.read_embeddings(str(tmp_path / 'old'), 'synthetic.gallery')
    order = np.random.default_rng(0).permutation(len(found.ids))
    shuffled = str(tmp_path / 'shuffled')
    for name in ('synthetic.query', 'synthetic.gallery'):
        f = embedding_files.read_embeddings(str(tmp_path / 'old'), name)
        p = order if name.endswith('gallery') else np.arange(len(f.ids))
        embedding_files.write_embeddings(
            shuffled,
            name,
            f.emb[p],
            ids=[f.ids[i] for i in p],
            labels=f.labels[p],
            identity=dict(framework='elsewhere'),
        )
    scored = crosstest.run(
        cfg, dict(old=shuffled, bct=ckpt(workdir, 'new_bct')), str(tmp_path / 'cross')
    )
    assert scored['methods']['bct']['new_old'] == results['methods']['bct']['new_old']


def test_bad_inputs_stop_before_any_work(run, tmp_path):
    cfg, workdir, _ = run
    export.export(cfg, ckpt(workdir, 'old'), str(tmp_path / 'old'))
    # Another embedding dimension than the checkpoint's.
    narrow = str(tmp_path / 'narrow')
    for name in ('synthetic.query', 'synthetic.gallery'):
        f = embedding_files.read_embeddings(str(tmp_path / 'old'), name)
        embedding_files.write_embeddings(
            narrow, name, f.emb[:, :8], ids=f.ids, labels=f.labels, identity={}
        )
    with pytest.raises(ValueError, match='different dimensions'):
        crosstest.run(cfg, dict(old=narrow, bct=ckpt(workdir, 'new_bct')), str(tmp_path / 'x'))
    # An ids file of the wrong length.
    broken = str(tmp_path / 'broken')
    shutil.copytree(tmp_path / 'old', broken)
    ids = os.path.join(broken, 'synthetic.gallery.ids.txt')
    lines = open(ids).read().splitlines()
    open(ids, 'w').write('\n'.join(lines[:-1]) + '\n')
    with pytest.raises(ValueError, match='ids'):
        crosstest.run(cfg, dict(old=broken, bct=ckpt(workdir, 'new_bct')), str(tmp_path / 'y'))
    # A folder that is neither a checkpoint nor embedding files.
    with pytest.raises(ValueError, match='not a bcl_jax checkpoint'):
        crosstest.run(
            cfg, dict(old=str(tmp_path), bct=ckpt(workdir, 'new_bct')), str(tmp_path / 'z')
        )
    with pytest.raises(ValueError, match='at least two'):
        crosstest.parse(['old=x'])
    assert not os.path.exists(tmp_path / 'x')


def test_commands_say_what_they_do():
    for module in ('bcl_jax.crosstest', 'bcl_jax.export'):
        out = subprocess.run(
            [sys.executable, '-m', module, '--help'],
            cwd=REPO,
            capture_output=True,
            text=True,
            env=dict(os.environ, XLA_FLAGS=''),
            timeout=120,
        )
        text = out.stdout + out.stderr
        assert '--config' in text and ('--model' in text or '--checkpoint' in text)
        assert len(text.splitlines()) < 60


@pytest.mark.slow
def test_sequential_upgrades_matrix_curves_and_resume(tmp_path):
    """Three models in sequence: the 3×3 matrix in results.json, the figures; a run whose last
    stage lost its final checkpoint (as a kill before it) resumes to the same numbers."""
    cfg = synthetic_sequential.get_config('smoke')
    workdir = str(tmp_path / 'seq')
    first = main.run(cfg, workdir)
    matrix = first['matrix']
    assert matrix['models'] == ['old', 'v2', 'v3']
    values = matrix['tests']['synthetic']['metrics']['mAP']
    assert len(values) == 3 and all(len(row) == 3 for row in values)
    assert values[0][0] == pytest.approx(first['old_old']['mAP'])
    assert values[2][1] == pytest.approx(
        first['matrix']['tests']['synthetic']['metrics']['mAP'][2][1]
    )
    assert values[1][0] == pytest.approx(first['methods']['v2']['new_old']['mAP'])
    for png in ('compatibility_synthetic.png', 'upgrades.png'):
        assert os.path.getsize(os.path.join(workdir, png)) > 0
    steps = sorted(int(d) for d in os.listdir(ckpt(workdir, 'v3')) if d.isdigit())
    shutil.rmtree(os.path.join(ckpt(workdir, 'v3'), str(steps[-1])))
    again = main.run(cfg, workdir)
    assert again['matrix']['tests'] == first['matrix']['tests']


class _Source:
    def __init__(self, labels):
        self.labels = np.asarray(labels)

    def __len__(self):
        return len(self.labels)


def test_backfill_curves_of_the_compatible_models_in_their_orders():
    """Old embeddings near their class centre with much noise, the new model's with little, in
    the same space (compatible); a third model in a space of its own (not compatible)."""
    import ml_collections

    from bcl_jax import evaluate
    from bcl_jax.data.dataset import label_test

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, 16))
    q_labels, g_labels = np.repeat(np.arange(10), 2), np.repeat(np.arange(10), 6)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    emb = lambda labels, noise: unit(centres[labels] + noise * rng.normal(size=(len(labels), 16)))
    test = label_test('t', _Source(q_labels), _Source(g_labels), ks=(1,))
    embeddings = {
        'old': [(emb(q_labels, 1.5), emb(g_labels, 1.5))],
        'new': [(emb(q_labels, 0.5), emb(g_labels, 0.5))],
        'alien': [(unit(rng.normal(size=(20, 16))), unit(rng.normal(size=(60, 16))))],
    }
    eval_cfg = ml_collections.ConfigDict(
        dict(ks=(1,), query_block=64, backfill_fractions=(0.0, 0.5, 1.0), backfill_seed=3)
    )

    def reversed_rows(old_model, gallery):
        assert old_model == 'the old model' and gallery.shape == (60, 16)
        return np.arange(60)[::-1]

    out = evaluate.backfill_curves(
        embeddings,
        [test],
        eval_cfg,
        {'new': 'old', 'alien': 'old'},
        {'new': reversed_rows},
        {'old': 'the old model'},
    )
    assert set(out['curves']) == {'new vs old', 'new vs old, reversed_rows'}
    new_q, new_g = embeddings['new'][0]
    old_g = embeddings['old'][0][1]
    for curve in out['curves'].values():
        m = curve['metrics']['mAP']
        assert m[0] == pytest.approx(test.score(new_q, old_g, eval_cfg)['mAP'])
        assert m[-1] == pytest.approx(test.score(new_q, new_g, eval_cfg)['mAP'])
    half = np.concatenate([old_g[:30], new_g[30:]])  # the reversed order backfills rows 59..30
    got = out['curves']['new vs old, reversed_rows']['metrics']['mAP'][1]
    assert got == pytest.approx(test.score(new_q, half, eval_cfg)['mAP'])
    assert out['curves']['new vs old']['order'] == {'kind': 'random', 'seed': 3}


def _foreign_log_lines(text: str) -> list[str]:
    """absl log lines (`I1207 03:41:08.0 123 file.py:93] ...`) from files outside bcl_jax."""
    ours = {
        os.path.basename(p)
        for root, _, files in os.walk(os.path.join(REPO, 'bcl_jax'))
        for p in files
        if p.endswith('.py')
    }
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) > 3 and parts[0][:1] in 'IWEF' and parts[0][1:].isdigit():
            if parts[3].split(':')[0] not in ours:
                out.append(line)
    return out


def documented_smoke_commands() -> list[list[str]]:
    """docs/lifecycle.md's export and crosstest commands on the smoke run, as argument lists."""
    with open(os.path.join(REPO, 'docs', 'lifecycle.md')) as f:
        lines = [line.split() for line in f if 'configs/synthetic.py:smoke --' in line]
    return [line[2:] for line in lines if line[:3] in (['python', '-m', m] for m in MODULES)]


MODULES = ('bcl_jax.export', 'bcl_jax.crosstest')


@pytest.mark.slow
def test_export_and_crosstest_print_only_their_own_lines(run, tmp_path):
    """The documented smoke commands, on a smoke run's work directory: at the default verbosity,
    no orbax or grain INFO lines around the commands' own."""
    _, workdir, _ = run
    env = dict(os.environ, XLA_FLAGS='')
    commands = documented_smoke_commands()
    assert [c[0] for c in commands] == list(MODULES)
    for module, *flags in commands:
        # The docs' runs/smoke is this test's smoke run; what the commands write goes to tmp.
        flags = [
            f.replace('runs/smoke/', workdir + '/').replace('runs/', f'{tmp_path}/') for f in flags
        ]
        out = subprocess.run(
            [sys.executable, '-m', module, *flags],
            cwd=REPO,
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        text = out.stdout + out.stderr
        assert out.returncode == 0, text[-3000:]
        assert 'export.py' in text or '| model |' in text, text[-2000:]  # it says what it did
        assert _foreign_log_lines(text) == [], text[-3000:]
