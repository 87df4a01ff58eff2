"""End-to-end tests of bcl_jax.main: the smoke pipeline, its results against a NumPy float64
recomputation, reruns that skip finished stages, resuming after an interruption, the command
line and bad input."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from bcl_jax import data as data_lib
from bcl_jax import embed as embed_lib
from bcl_jax import fingerprint, main, sharding, train
from bcl_jax import plan as plan_lib
from bcl_jax import stage as stage_lib
from configs import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KS = (1, 5, 10)


def smoke_config():
    return synthetic.get_config('smoke')


@pytest.fixture(scope='module')
def data():
    return data_lib.build(smoke_config().data)


@pytest.fixture(scope='module')
def e2e(tmp_path_factory):
    """One uninterrupted smoke run: (config, workdir, returned results, seconds)."""
    cfg = smoke_config()
    workdir = str(tmp_path_factory.mktemp('e2e'))
    start = time.time()
    results = main.run(cfg, workdir)
    return cfg, workdir, results, time.time() - start


def read_json(path):
    with open(path) as f:
        return json.load(f)


def canonical(results):
    """The results without wall time and its profile, as comparable text (NaN == NaN here)."""
    timings = ('wall_seconds', 'profile')
    return json.dumps({k: v for k, v in results.items() if k not in timings}, sort_keys=True)


def mesh():
    return sharding.make_mesh(smoke_config().mesh)


# --------------------------------------------------------------------------- NumPy references


def reference_retrieval(queries, query_labels, gallery, gallery_labels, ks=KS, ties=+1):
    """mAP and Recall@K in float64 by the textbook definition, one query at a time.

    Scores within 1e-6 of each other (chained) are a tie that float32 rounding may order either
    way: `ties=+1` ranks the relevant items of a tie first, `ties=-1` last."""
    queries, gallery = np.asarray(queries, np.float64), np.asarray(gallery, np.float64)
    aps, hits = [], []
    for q, label in zip(queries, query_labels):
        scores = gallery @ q
        order = np.argsort(-scores, kind='stable')
        tie_group = np.concatenate([[0], np.cumsum(-np.diff(scores[order]) > 1e-6)])
        relevant = np.asarray(gallery_labels)[order] == label
        order = np.lexsort((-ties * relevant, tie_group))
        relevant = relevant[order]
        ranks = np.flatnonzero(relevant) + 1  # 1-based ranks of hits
        aps.append(np.mean(np.arange(1, len(ranks) + 1) / ranks))
        hits.append([relevant[:k].any() for k in ks])
    out = {'mAP': float(np.mean(aps))}
    out.update({f'recall@{k}': float(np.mean([h[i] for h in hits])) for i, k in enumerate(ks)})
    return out


def assert_metrics_match(got, *reference_args):
    """`got` lies between the reference's metrics with ties ranked worst and best (equal to
    both where there is no tie)."""
    worst = reference_retrieval(*reference_args, ties=-1)
    best = reference_retrieval(*reference_args, ties=+1)
    for k in best:
        assert worst[k] - 1e-6 <= got[k] <= best[k] + 1e-6, (k, got[k], worst[k], best[k])


# --------------------------------------------------------------------------- end to end


def test_results_file_layout(e2e, data):
    cfg, workdir, results, _ = e2e
    on_disk = read_json(os.path.join(workdir, 'results.json'))
    assert canonical(on_disk) == canonical(results)
    for key in ('benchmark', 'primary_metric', 'old_old', 'methods', 'config', 'old_model'):
        assert key in on_disk, key
    assert on_disk['primary_metric'] == 'mAP'
    assert on_disk['benchmark'] == 'synthetic (seed 0)'
    assert on_disk['config'] == json.loads(cfg.to_json())
    assert read_json(os.path.join(workdir, 'config.json')) == json.loads(cfg.to_json())
    assert list(on_disk['methods']) == list(cfg.methods) == ['independent', 'bct', 'ndpp', 'odpp']
    # Where the time went: each stage's parts, in the order they ran, within the run's time.
    parts = list(on_disk['profile'])
    stages = ['old', *(f'new_{m}' for m in cfg.methods)]
    for stage in stages:
        for part in ('set-up and restore', 'first step (compiles)', 'steps', 'waiting for input'):
            assert f'{stage}: {part}' in parts, (stage, part)
    assert parts.index('data') < parts.index('old: steps') < parts.index('old prototypes')
    assert parts.index('old prototypes') < parts.index('new_independent: steps')
    assert parts[-1] == 'evaluation'
    assert all(v >= 0 for v in on_disk['profile'].values())
    assert sum(on_disk['profile'].values()) <= on_disk['wall_seconds']
    # A smoke run says that its numbers mean nothing, in both results files.
    assert on_disk['note'] == main.SMOKE_NOTE
    with open(os.path.join(workdir, 'results.md')) as f:
        assert f.readline().startswith('**smoke run:')

    def check_test(m):
        assert m['mAP'] > 0
        for k in ('mAP',) + tuple(f'recall@{k}' for k in KS):
            assert 0.0 <= m[k] <= 1.0, k
        assert m['recall@1'] <= m['recall@5'] <= m['recall@10']
        # 2 test families x 4 siblings x 2 queries, each with 4 gallery images of its class.
        assert m['num_queries'] == len(data.tests[0].query) == 16
        assert m['num_queries_without_positives'] == 0

    check_test(on_disk['old_old'])
    old_old = on_disk['old_old']['mAP']
    reference = on_disk['methods']['independent']['new_new']['mAP']
    for name, r in on_disk['methods'].items():
        for key in ('new_new', 'new_old', 'update_gain', 'train_seconds'):
            assert key in r, (name, key)
        check_test(r['new_new'])
        check_test(r['new_old'])
        assert r['train_seconds'] > 0
        assert r['compatible'] == (r['new_old']['mAP'] > old_old)
        if reference > old_old:
            assert r['update_gain'] == pytest.approx(
                (r['new_old']['mAP'] - old_old) / (reference - old_old)
            )
        else:
            assert r['update_gain'] is None  # undefined: strict JSON has no NaN
        if name == 'independent' and r['update_gain'] is not None:
            assert r['update_gain'] == pytest.approx(
                (r['new_old']['mAP'] - old_old) / (r['new_new']['mAP'] - old_old)
            )

    _, _, table = open(os.path.join(workdir, 'results.md')).read().partition('\n\n')
    assert table.startswith('| model | test | mAP |')
    assert f"| old | old/old | {100 * old_old:.2f} |" in table
    for name in cfg.methods:
        assert f'| {name} | new/new |' in table and f'| {name} | new/old |' in table


def test_stage_folders(e2e, data):
    cfg, workdir, _, _ = e2e
    expected_steps = {
        'old': round(2.5 * len(data.old_train) / 16),  # 5
        'new_independent': round(2 * len(data.train) / 16),  # 16
        'new_bct': round(2 * len(data.train) / 16),
    }
    assert expected_steps == {'old': 5, 'new_independent': 16, 'new_bct': 16}
    for stage, steps in expected_steps.items():
        folder = os.path.join(workdir, stage)
        assert os.path.isdir(os.path.join(folder, 'tb')) and os.listdir(os.path.join(folder, 'tb'))
        saved = sorted(int(d) for d in os.listdir(os.path.join(folder, 'ckpt')) if d.isdigit())
        assert saved[-1] == steps and len(saved) <= cfg.ckpt.max_to_keep
        with open(os.path.join(folder, 'metrics.jsonl')) as f:
            records = [json.loads(l) for l in f]
        # A line every log_every_steps=2 steps, and one at the end.
        assert [r['step'] for r in records] == sorted(set(list(range(2, steps + 1, 2)) + [steps]))
        assert all(np.isfinite(r['loss']) for r in records)
        if stage == 'new_bct':
            assert all(r['loss'] == pytest.approx(r['cls'] + r['comp'], rel=1e-5) for r in records)
    for stage in ('new_ndpp', 'new_odpp'):  # refreshes logged besides the step lines
        with open(os.path.join(workdir, stage, 'metrics.jsonl')) as f:
            assert any(json.loads(l).get('event') == 'refresh' for l in f)
        assert os.path.getsize(os.path.join(workdir, stage, 'perturbation.png')) > 0


def test_metrics_agree_with_a_numpy_recomputation(e2e, data):
    cfg, workdir, results, _ = e2e
    m = mesh()
    old = train.load(
        os.path.join(workdir, 'old', 'ckpt'), cfg.old.model, data.old_train.num_classes, m
    )
    assert old.step == 5
    assert old.identity() == results['old_model']['identity']
    assert (results['old_model']['step'], results['old_model']['total_steps']) == (5, 5)

    def embeddings(model):
        return [
            embed_lib.embed(model, s, mesh=m, batch_size=cfg.eval.batch_size)
            for s in (data.tests[0].query, data.tests[0].gallery)
        ]

    old_q, old_g = embeddings(old)
    test = data.tests[0]
    assert old_q.shape == (len(test.query), 16) and old_g.shape == (len(test.gallery), 16)
    q_labels, g_labels = np.asarray(test.query.labels), np.asarray(test.gallery.labels)
    assert_metrics_match(results['old_old'], old_q, q_labels, old_g, g_labels)

    # The old prototypes: normalised class means of normalised old embeddings of the new set.
    train_emb = np.asarray(embed_lib.embed(old, data.train, mesh=m, batch_size=16), np.float64)
    labels = np.asarray(data.train.labels)
    means = np.stack([train_emb[labels == c].mean(0) for c in range(data.num_classes)])
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    bank = np.load(os.path.join(workdir, 'prototypes', 'old.npy'))
    assert bank.shape == (data.num_classes, 16)
    np.testing.assert_allclose(bank, means, atol=1e-5)

    for name in cfg.methods:
        new = train.load(
            os.path.join(workdir, f'new_{name}', 'ckpt'), cfg.new.model, data.num_classes, m
        )
        new_q, new_g = embeddings(new)
        r = results['methods'][name]
        assert_metrics_match(r['new_new'], new_q, q_labels, new_g, g_labels)
        assert_metrics_match(r['new_old'], new_q, q_labels, old_g, g_labels)


def test_rerun_skips_finished_stages(e2e):
    cfg, workdir, results, first_seconds = e2e

    def snapshot():
        out = {}
        for root, _, files in os.walk(workdir):
            for f in files:
                if f.startswith('results.') or f == 'config.json' or root == workdir:
                    continue  # the results files and figures are rewritten by every run
                p = os.path.join(root, f)
                out[p] = (os.path.getmtime(p), os.path.getsize(p))
        return out

    before = snapshot()
    start = time.time()
    again = main.run(smoke_config(), workdir)
    seconds = time.time() - start
    assert seconds < first_seconds / 2, (seconds, first_seconds)
    assert canonical(again) == canonical(results)
    assert again['wall_seconds'] != results['wall_seconds']
    assert canonical(read_json(os.path.join(workdir, 'results.json'))) == canonical(results)
    # Nothing was trained or recomputed: checkpoints, logs and the prototype bank untouched.
    assert snapshot() == before


def run_old_stage(cfg, data, workdir, **kw):
    stage = plan_lib.old_stage(plan_lib.plan(cfg, data))
    return train.train(stage, None, train.Loop.from_config(cfg), mesh=mesh(), workdir=workdir, **kw)


@pytest.mark.parametrize('stop', [2, 3])
def test_interrupted_training_resumes_to_the_same_params(e2e, data, tmp_path, stop):
    """stop=2: stopped on a checkpoint; stop=3: as if killed one step after checkpoint 2, so
    step 3 is redone and its logged line replaced."""
    cfg, e2e_dir, _, _ = e2e
    workdir = str(tmp_path)
    assert cfg.ckpt.every_steps == 2
    first = run_old_stage(cfg, data, workdir, stop_after_steps=stop)
    assert first.step == stop
    assert sorted(
        int(d) for d in os.listdir(os.path.join(workdir, 'old', 'ckpt')) if d.isdigit()
    ) == [2]
    with open(os.path.join(workdir, 'old', 'metrics.jsonl')) as f:
        assert [json.loads(l)['step'] for l in f] == list(range(2, stop + 1))
    final = run_old_stage(cfg, data, workdir)
    assert final.step == 5

    reference = train.load(
        os.path.join(e2e_dir, 'old', 'ckpt'), cfg.old.model, data.old_train.num_classes, mesh()
    )
    for key in ('params', 'batch_stats'):
        got, want = getattr(final, key), getattr(reference, key)
        for (path, a), (_, b) in zip(
            jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves_with_path(want)
        ):
            np.testing.assert_allclose(
                np.asarray(a),
                np.asarray(b),
                rtol=1e-6,
                atol=1e-6,
                err_msg=jax.tree_util.keystr(path),
            )
    # The resumed run logged each step once, with the uninterrupted run's losses.
    with open(os.path.join(workdir, 'old', 'metrics.jsonl')) as f:
        resumed = [json.loads(l) for l in f]
    with open(os.path.join(e2e_dir, 'old', 'metrics.jsonl')) as f:
        straight = [json.loads(l) for l in f]
    assert [r['step'] for r in resumed] == [r['step'] for r in straight] == [2, 4, 5]
    for a, b in zip(resumed, straight):
        assert a['loss'] == pytest.approx(b['loss'], rel=1e-5)
    # A third call finds the stage finished and trains nothing.
    assert run_old_stage(cfg, data, workdir).step == 5


def test_interrupted_odpp_training_resumes_to_the_same_params_and_bank(e2e, data, tmp_path):
    """ODPP keeps Δ, p̃ and the EMA prototypes in the checkpoint: a run stopped between
    refreshes ends where the uninterrupted one did, with each refresh logged once."""
    cfg, e2e_dir, _, _ = e2e
    old = train.load(
        os.path.join(e2e_dir, 'old', 'ckpt'), cfg.old.model, data.old_train.num_classes, mesh()
    )
    bank = np.load(os.path.join(e2e_dir, 'prototypes', 'old.npy'))
    reference = stage_lib.Reference(old, bank, data.old_label)
    stage = plan_lib.new_stage(plan_lib.plan(cfg, data), 'odpp', reference)

    def run(**kw):
        return train.train(
            stage, reference, train.Loop.from_config(cfg), mesh=mesh(), workdir=str(tmp_path), **kw
        )

    assert run(stop_after_steps=9).step == 9  # killed after checkpoint 8, past refresh 4
    final = run()
    reference = train.load(
        os.path.join(e2e_dir, 'new_odpp', 'ckpt'), cfg.new.model, data.num_classes, mesh()
    )
    for a, b in zip(
        jax.tree.leaves((final.params, final.batch_stats)),
        jax.tree.leaves((reference.params, reference.batch_stats)),
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)

    def log(workdir):
        with open(os.path.join(workdir, 'new_odpp', 'metrics.jsonl')) as f:
            return [json.loads(l) for l in f]

    resumed, straight = log(str(tmp_path)), log(e2e_dir)
    assert [(r['step'], 'event' in r) for r in resumed] == [
        (r['step'], 'event' in r) for r in straight
    ]
    refreshes = [r for r in straight if r.get('event') == 'refresh']
    assert len(refreshes) >= 2 and all(r['mean_shift'] > 0 for r in refreshes)
    for a, b in zip(resumed, straight):
        assert a.get('loss', 0) == pytest.approx(b.get('loss', 0), rel=1e-4)
        assert a.get('mean_shift', 0) == pytest.approx(b.get('mean_shift', 0), rel=1e-4)


# --------------------------------------------------------------------------- bad input


def stage_dirs(workdir):
    return [d for d in os.listdir(workdir) if d == 'old' or d.startswith('new_')]


def test_missing_old_checkpoint_fails_before_training(tmp_path):
    cfg = smoke_config()
    missing = str(tmp_path / 'nowhere' / 'ckpt')
    cfg.old.checkpoint = missing
    workdir = str(tmp_path / 'run')
    with pytest.raises(FileNotFoundError) as err:
        main.run(cfg, workdir)
    assert missing in str(err.value)
    assert stage_dirs(workdir) == []
    assert not os.path.exists(os.path.join(workdir, 'results.json'))


def test_old_checkpoint_of_another_embedding_size_is_refused(e2e, tmp_path):
    _, e2e_dir, _, _ = e2e
    cfg = smoke_config()
    cfg.old.checkpoint = os.path.join(e2e_dir, 'old', 'ckpt')
    cfg.old.model.embedding_dim = 32
    workdir = str(tmp_path / 'run')
    with pytest.raises(ValueError) as err:
        main.run(cfg, workdir)
    message = str(err.value)
    assert 'model.embedding_dim: checkpoint has 16, config says 32' in message
    assert cfg.old.checkpoint in message
    assert 'width' not in message and 'depth' not in message
    assert stage_dirs(workdir) == []


# --------------------------------------------------------------------------- command line


def cli(*args, timeout=120):
    env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu')
    return subprocess.run(
        [sys.executable, '-m', 'bcl_jax.main', '--config=configs/synthetic.py:smoke', *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cli_unknown_config_key(tmp_path):
    workdir = str(tmp_path / 'run')
    out = cli(f'--workdir={workdir}', '--config.not_a_key=1')
    assert out.returncode != 0
    assert 'not_a_key' in out.stderr
    assert not os.path.exists(workdir)


def test_cli_wrong_type(tmp_path):
    workdir = str(tmp_path / 'run')
    out = cli(f'--workdir={workdir}', '--config.seed=abc')
    assert out.returncode != 0
    assert 'config.seed' in out.stderr and 'abc' in out.stderr
    assert not os.path.exists(workdir)


# --------------------------------------------------------------------------- a real kill


def metrics_of(results):
    keep = {'old_old': results['old_old']}
    for name, r in results['methods'].items():
        keep[name] = {k: r[k] for k in ('new_new', 'new_old', 'update_gain', 'compatible')}
    return keep


@pytest.mark.slow
def test_sigkill_mid_training_then_rerun_matches_an_uninterrupted_run(tmp_path):
    straight = str(tmp_path / 'straight')
    out = cli(f'--workdir={straight}', timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]

    killed = str(tmp_path / 'killed')
    env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu')
    proc = subprocess.Popen(
        [
            sys.executable,
            '-m',
            'bcl_jax.main',
            '--config=configs/synthetic.py:smoke',
            f'--workdir={killed}',
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    ckpt_dir = os.path.join(killed, 'new_independent', 'ckpt')
    deadline = time.time() + 600
    try:
        while time.time() < deadline and proc.poll() is None:
            if os.path.isdir(ckpt_dir) and any(d.isdigit() for d in os.listdir(ckpt_dir)):
                break
            time.sleep(0.05)
        assert proc.poll() is None, 'the run ended before its first new-model checkpoint'
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(killed, 'results.json'))
    saved = [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()]
    assert saved and max(saved) < 16

    out = cli(f'--workdir={killed}', timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    a = metrics_of(read_json(os.path.join(killed, 'results.json')))
    b = metrics_of(read_json(os.path.join(straight, 'results.json')))
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True) or _close(a, b)
    with open(os.path.join(killed, 'new_independent', 'metrics.jsonl')) as f:
        steps = [json.loads(l)['step'] for l in f]
    assert steps == list(range(2, 17, 2))  # each step logged once across the kill


def _close(a, b):
    fa, fb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(fa, fb):
        if isinstance(x, float) and math.isnan(x):
            assert math.isnan(y)
        else:
            assert x == pytest.approx(y, abs=1e-6)
    return True


def test_seeds_run_apart_are_aggregated_from_their_results_files(e2e, tmp_path):
    """--from_results: each seed's results.json (run by its own command, here seed 0's from the
    e2e run) aggregated without training; a file made with other settings stops."""
    _, workdir, results, _ = e2e
    seeds = tmp_path / 'seeds'
    for seed, value in ((0, 0.25), (1, 0.75)):
        saved = json.loads(json.dumps(results))
        saved['config']['seed'] = seed
        saved['old_old']['mAP'] = value  # distinct per seed: the mean below is checked
        (seeds / f'seed_{seed}').mkdir(parents=True)
        (seeds / f'seed_{seed}' / 'results.json').write_text(json.dumps(saved))
    cfg = smoke_config()
    cfg.seeds = (0, 1)
    aggregated = main.run(cfg, str(seeds), from_results=True)
    assert aggregated['seeds'] == [0, 1]
    assert aggregated['old_old']['mAP'] == pytest.approx(0.5)
    assert aggregated['std']['old_old']['mAP'] == pytest.approx(np.std([0.25, 0.75], ddof=1))
    assert not (seeds / 'seed_0' / 'old').exists()  # nothing trained
    assert read_json(seeds / 'results.json')['old_old']['mAP'] == pytest.approx(0.5)

    other = json.loads((seeds / 'seed_1' / 'results.json').read_text())
    other['config']['new']['train']['epochs'] = 3
    (seeds / 'seed_1' / 'results.json').write_text(json.dumps(other))
    with pytest.raises(fingerprint.ChangedConfigError, match=r'new\.train\.epochs: 3 -> 2'):
        main.run(cfg, str(seeds), from_results=True)
    cfg.seeds = (0, 2)
    with pytest.raises(FileNotFoundError, match='seed_2'):
        main.run(cfg, str(seeds), from_results=True)
