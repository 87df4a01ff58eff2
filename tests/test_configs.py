"""The experiment configs: each loads, documents its command, and its `:smoke` variant runs end to
end through bcl_jax.main on small fake files in the real dataset formats."""

import glob
import importlib
import json
import os

import fake_datasets
import numpy as np
import pytest

from bcl_jax import data as data_lib
from bcl_jax import embed as embed_lib
from bcl_jax import main, sharding, train, validate
from bcl_jax.data import gldv2, prepare, revisited

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(
    os.path.basename(p)[:-3]
    for p in glob.glob(os.path.join(REPO, 'configs', '*.py'))
    if not p.endswith(('__init__.py', 'common.py'))
)
GLDV2_COLUMNS = [
    'roxford5k/medium/mAP',
    'roxford5k/hard/mAP',
    'rparis6k/medium/mAP',
    'rparis6k/hard/mAP',
    'gldv2/mAP@100/private',
    'gldv2/mAP@100/public',
]


def config(name, arg=None):
    """configs/<name>.py's config; `name` may carry the argument: 'gldv2:methods=bct'."""
    name, _, given = name.partition(':')
    arg = ','.join(a for a in (given, arg) if a) or None
    return importlib.import_module(f'configs.{name}').get_config(arg)


@pytest.mark.parametrize('name', CONFIGS)
def test_config_loads_and_documents_its_command(name):
    module = importlib.import_module(f'configs.{name}')
    assert f'--config=configs/{name}.py' in module.__doc__
    full, smoke = config(name), config(name, 'smoke')
    validate.check_config(full)
    assert smoke.data.name == full.data.name and smoke.methods == full.methods
    assert smoke.data.image_size <= full.data.image_size
    with pytest.raises(ValueError, match='unknown config argument'):
        config(name, 'huge')


def test_gldv2_configs_follow_the_reference_schedule():
    c = config('gldv2')
    assert (c.old.model.arch, c.new.model.arch, c.new.model.embedding_dim) == (
        'resnet18',
        'resnet50',
        256,
    )
    # Standard widths: tests/test_models.py checks these nets' published parameter counts.
    assert c.old.model.width == c.new.model.width == config('inshop').new.model.width == 64
    assert c.data.image_size == 224 and c.data.flip and c.data.old_fraction == 0.3
    for stage in (c.old.train, c.new.train):
        assert (stage.epochs, tuple(stage.lr_drop_epochs)) == (30.0, (5.0, 10.0, 20.0))
        assert (stage.learning_rate, stage.momentum, stage.weight_decay) == (0.1, 0.9, 5e-4)
    assert config('gldv2').methods == ('independent', 'bct', 'ndpp', 'odpp')
    inshop = config('inshop')
    assert (inshop.new.train.epochs, tuple(inshop.new.train.lr_drop_epochs)) == (
        200.0,
        (50.0, 100.0, 150.0),
    )


@pytest.fixture(scope='module')
def gldv2_files(tmp_path_factory):
    base = tmp_path_factory.mktemp('gldv2_files')
    root = fake_datasets.gldv2_root(base / 'gldv2')
    for dataset in revisited.DATASETS:
        fake_datasets.revisited_root(base / 'revisitop', dataset)
    return root, str(base / 'revisitop')


def gldv2_smoke(name, files):
    c = config(name, 'smoke')
    c.data.gldv2.root, c.data.revisited.root = files
    return c


def read_json(path):
    with open(path) as f:
        return json.load(f)


def test_gldv2_smoke_end_to_end(gldv2_files, tmp_path):
    """methods=none, then methods=bct in the same workdir (which reuses the old model), scored by the
    three GLDv2 tests; every number checked against the tests' own scoring of fresh embeddings."""
    workdir = str(tmp_path / 'run')
    old_only = main.run(gldv2_smoke('gldv2:methods=none', gldv2_files), workdir)
    assert old_only['methods'] == {}
    assert old_only['columns'] == GLDV2_COLUMNS
    assert old_only['primary_metric'] == 'roxford5k/medium/mAP'
    assert 'cropped to their box' in old_only['tests']['roxford5k']

    # The old split was drawn with the recorded seed and saved with its checksum.
    split_file = os.path.join(workdir, 'old_split.json')
    split, meta = gldv2.read_split_file(split_file)
    expected = gldv2.old_split_for(
        os.path.join(gldv2_files[0], 'train_clean.csv'), fraction=0.3, mode='classes', seed=0
    )
    np.testing.assert_array_equal(split.indices, expected.indices)
    assert (meta['fraction'], meta['mode'], meta['seed']) == (0.3, 'classes', 0)
    assert split.num_old_classes == 3  # floor(0.3 * 10)

    cfg = gldv2_smoke('gldv2:methods=bct', gldv2_files)
    results = main.run(cfg, workdir)
    assert results['old_old'] == old_only['old_old']  # the same old model, not retrained
    assert list(results['methods']) == ['bct']
    assert read_json(os.path.join(workdir, 'results.json'))['columns'] == GLDV2_COLUMNS
    banner, _, table = open(os.path.join(workdir, 'results.md')).read().partition('\n\n')
    assert banner == f'**{main.SMOKE_NOTE}**'
    assert table.startswith('| model | test | ' + ' | '.join(GLDV2_COLUMNS) + ' |')

    # Recompute every test from embeddings of the saved models.
    data = data_lib.build(cfg.data, workdir=workdir)
    mesh = sharding.make_mesh(cfg.mesh)
    old = train.load(
        os.path.join(workdir, 'old', 'ckpt'), cfg.old.model, data.old_train.num_classes, mesh
    )
    new = train.load(
        os.path.join(workdir, 'new_bct', 'ckpt'), cfg.new.model, data.num_classes, mesh
    )
    embed = lambda model, s: embed_lib.embed(model, s, mesh=mesh, batch_size=8)
    tests = {t.name: t for t in data.tests}
    assert list(tests) == ['roxford5k', 'rparis6k', 'gldv2']
    for name in ('roxford5k', 'rparis6k'):
        t = tests[name]
        new_q, old_db = embed(new, t.query), embed(old, t.gallery)
        want = revisited.evaluate(new_q, old_db, t.query.gnd, crop_queries=True)
        for protocol in ('medium', 'hard'):
            got = results['methods']['bct']['new_old'][f'{name}/{protocol}/mAP']
            assert got == pytest.approx(want[protocol]['mAP'], abs=1e-6)
    t = tests['gldv2']
    assert len(t.query) == 6 and len(t.gallery) == 20  # the Ignored query is not embedded
    want = gldv2.evaluate_retrieval(
        t.query.ids,
        embed(old, t.query),
        t.gallery.ids,
        embed(old, t.gallery),
        gldv2.read_retrieval_solution(os.path.join(gldv2_files[0], gldv2.SOLUTION_FILE)),
    )
    assert results['old_old']['gldv2/mAP@100/public'] == pytest.approx(want['public'], abs=1e-6)
    assert results['old_old']['gldv2/num_private'] == want['num_private'] == 3


def test_gldv2_split_file_must_match_the_config(gldv2_files, tmp_path):
    cfg = gldv2_smoke('gldv2:methods=bct', gldv2_files)
    split_file = str(tmp_path / 'split.json')
    gldv2.old_split_for(
        os.path.join(gldv2_files[0], 'train_clean.csv'),
        fraction=0.5,
        mode='classes',
        seed=0,
        out=split_file,
    )
    cfg.data.gldv2.split_file = split_file
    with pytest.raises(ValueError, match='fraction=0.5'):
        main.run(cfg, str(tmp_path / 'run'))
    assert not os.path.exists(tmp_path / 'run' / 'old')


def test_gldv2_prepared_smoke_and_manifest_check(gldv2_files, tmp_path):
    prepared_dir = str(tmp_path / 'prepared')
    prepare.prepare(dataset='gldv2', src=gldv2_files[0], dst=prepared_dir, image_size=24, workers=2)
    cfg = gldv2_smoke('gldv2:methods=ndpp', gldv2_files)
    cfg.data.prepared = prepared_dir
    cfg.data.gldv2.tests = ('gldv2',)
    results = main.run(cfg, str(tmp_path / 'run'))
    assert results['columns'] == ['mAP@100/private', 'mAP@100/public']
    assert set(results['methods']) == {'ndpp'}

    # A config whose old split differs from the prepared one stops before anything trains.
    cfg.data.old_fraction = 0.5
    with pytest.raises(ValueError, match='old split'):
        main.run(cfg, str(tmp_path / 'other'))
    assert not os.path.exists(tmp_path / 'other' / 'old')


def test_inshop_smoke_end_to_end(tmp_path):
    cfg = config('inshop:methods=odpp', 'smoke')
    cfg.data.inshop.root = fake_datasets.inshop_root(tmp_path / 'inshop')
    results = main.run(cfg, str(tmp_path / 'run'))
    assert results['columns'] == ['mAP'] + [f'recall@{k}' for k in (1, 10, 20, 30, 40, 50)]
    for test in ('old_old',):
        m = results[test]
        assert m['num_queries'] == 10 and m['recall@50'] == 1.0  # every item is in the top 50
    assert set(results['methods']) == {'odpp'}


@pytest.mark.slow
def test_cub_end_to_end_query_set_is_its_own_gallery(tmp_path):
    """data.name=cub: CUB's DML split by class, and the test set searched against itself with
    each query left out, for old/old, new/new and new/old alike."""
    from test_tfds_sources import write_tfds

    from bcl_jax import metrics
    from configs import synthetic

    class_ids = {'train': [c for c in range(10) for _ in range(4)]}
    class_ids['test'] = [c for c in range(100, 110) for _ in range(3)]
    write_tfds(tmp_path / 'tfds', 'cub', class_ids)
    cfg = synthetic.get_config('smoke')
    cfg.data.name, cfg.data.tfds.data_dir = 'cub', str(tmp_path / 'tfds')
    cfg.methods = ('bct',)
    workdir = str(tmp_path / 'run')
    results = main.run(cfg, workdir)
    assert results['columns'] == ['mAP'] + [f'recall@{k}' for k in (1, 2, 4, 8)]
    assert 'excluded from its own gallery' in results['tests']['cub']

    data = data_lib.build(cfg.data)
    (test,) = data.tests
    assert test.gallery is None and len(test.query) == 30 and data.num_classes == 10
    mesh = sharding.make_mesh(cfg.mesh)
    old = train.load(
        os.path.join(workdir, 'old', 'ckpt'), cfg.old.model, data.old_train.num_classes, mesh
    )
    new = train.load(os.path.join(workdir, 'new_bct', 'ckpt'), cfg.new.model, 10, mesh)
    old_emb, new_emb = (
        embed_lib.embed(m, test.query, mesh=mesh, batch_size=16) for m in (old, new)
    )
    labels = np.asarray(test.query.labels)
    want = metrics.retrieval_metrics(
        new_emb, labels, old_emb, labels, ks=(1, 2, 4, 8), exclude_self=True
    )
    got = results['methods']['bct']['new_old']
    assert got['mAP'] == pytest.approx(want['mAP'], abs=1e-6)
    assert got['num_queries'] == 30


@pytest.mark.slow
def test_gldv2_odpp_smoke_from_pretrained_weights_with_the_field_recipe(gldv2_files, tmp_path):
    """The user's command with ImageNet-style weights (a torchvision ResNet-18 state dict saved
    by PyTorch, random weights), GeM, a cosine schedule and bf16 switched on from the command
    line: it runs end to end, and the new model started from the file's backbone."""
    import subprocess
    import sys

    import torch
    import torchvision

    weights = str(tmp_path / 'resnet18.pth')
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    root, revisitop = gldv2_files
    workdir = str(tmp_path / 'run')
    flags = [
        f'--config.data.gldv2.root={root}',
        f'--config.data.revisited.root={revisitop}',
        '--config.new.model.arch=resnet18',
        '--config.new.model.width=64',
        f'--config.new.model.pretrained={weights}',
        '--config.new.model.pool=gem',
        '--config.new.model.dtype=bfloat16',
        '--config.new.train.schedule=cosine',
        '--config.new.train.warmup_steps=2',
    ]
    out = subprocess.run(
        [
            sys.executable,
            '-m',
            'bcl_jax.main',
            '--config=configs/gldv2.py:methods=odpp,smoke',
            f'--workdir={workdir}',
            *flags,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu'),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = read_json(os.path.join(workdir, 'results.json'))
    assert set(results['methods']) == {'odpp'}
    model = results['config']['new']['model']
    assert (model['pool'], model['dtype'], model['pretrained']) == ('gem', 'bfloat16', weights)
    with open(os.path.join(workdir, 'new_odpp', 'metrics.jsonl')) as f:
        lrs = [json.loads(l)['lr'] for l in f if 'lr' in l]
    assert lrs[-1] < lrs[1]  # the cosine schedule decays


@pytest.mark.parametrize('dataset', ['gldv2', pytest.param('inshop', marks=pytest.mark.slow)])
def test_the_field_baselines_configs_run_end_to_end(dataset, gldv2_files, tmp_path):
    """configs/<dataset>.py:methods=lce+unibct+hot_refresh+advbct,smoke: the field's baselines
    together in one run on the fake files."""
    names = ('lce', 'unibct', 'hot_refresh', 'advbct')
    cfg = config(dataset, f'methods={"+".join(names)},smoke')
    assert tuple(cfg.methods) == names
    if dataset == 'gldv2':
        cfg.data.gldv2.root, cfg.data.revisited.root = gldv2_files
        cfg.data.gldv2.tests = ('roxford5k',)
    else:
        cfg.data.inshop.root = fake_datasets.inshop_root(tmp_path / 'inshop')
    results = main.run(cfg, str(tmp_path / 'run'))
    assert set(results['methods']) == set(names)
    for m in names:
        assert all(v is None or np.isfinite(v) for v in results['methods'][m]['new_new'].values())


def _refreshes(stage_dir):
    """The refresh records of a stage's metrics.jsonl."""
    with open(os.path.join(stage_dir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f if '"refresh"' in line]


def _json(path):
    with open(path) as f:
        return json.load(f)


@pytest.mark.slow
def test_calibrated_study_selection_then_confirmation_end_to_end(tmp_path):
    """method.md §11's two phases on the smoke benchmark: the selection phase's command writes
    the per-ρ paired analysis, the chosen ρ and the dose–response figure, with the validation
    classes and every arm's calibrated parameter in results.json; the confirmation phase reads
    the chosen ρ back and trains its arms on the test classes."""
    study = importlib.import_module('configs.synthetic_calibrated')
    cfg = config('synthetic_calibrated', 'selection,smoke')
    cfg.methods = ('independent', 'bct', 'ndpp_rho25', 'ndpp_rho50', 'odpp_rho50')
    cfg.seeds = (0, 1)
    selection = tmp_path / 'selection'
    results = main.run(cfg, str(selection))
    chosen = results['selection']['methods']
    assert set(chosen) == {'ndpp', 'odpp'}
    assert [r['rho'] for r in chosen['ndpp']['arms']] == [0.25, 0.5]
    assert (selection / 'dose_response.png').exists()
    assert 'Strength selection' in (selection / 'results.md').read_text()
    seed = _json(selection / 'seed_0' / 'results.json')
    assert list(seed['tests']) == ['validation']
    assert len(seed['data']['validation_classes']) == 4  # one sibling of each smoke family
    assert seed['methods']['ndpp_rho50']['calibration']['rho'] == pytest.approx(0.5, rel=0.02)
    assert 'margin_old' in seed['methods']['odpp_rho50']['calibration']
    assert 'calibration' not in seed['methods']['bct']
    refreshes = _refreshes(selection / 'seed_0' / 'new_ndpp_rho50')
    assert refreshes and {'rho', 'own_nearest', 'common_mode'} <= set(refreshes[-1])

    confirm = config('synthetic_calibrated', f'confirmation,smoke={selection}')
    assert confirm.methods[:4] == ('independent', 'bct', 'ndpp_star', 'odpp_star')
    want = study.chosen_strengths(str(selection))
    assert f"rho={want['ndpp']}" in confirm.variants.ndpp_star
    assert confirm.data.validation_fraction == 0.0
    confirm.seeds = (5, 6)  # fresh seeds
    results = main.run(confirm, str(tmp_path / 'confirmation'))
    assert list(results['confirmation']['arms']) == ['ndpp_star', 'odpp_star']
    assert results['selection'] == _json(selection / 'results.json')['selection']
    assert results['confirmation']['arms']['ndpp_star']['recovered'] is not None
    seed_dir = tmp_path / 'confirmation' / 'seed_5'
    seed = _json(seed_dir / 'results.json')
    assert list(seed['tests']) == ['synthetic'] and seed['data']['validation_classes'] == []
    assert 'beta' in seed['methods']['ndpp_star_beta']['calibration']
    assert 'ndpp_star_mean' in seed['methods'] and 'ndpp_star_new_push' in seed['methods']
    refreshes = _refreshes(seed_dir / 'new_odpp_star_new_margin')
    assert refreshes and all('margin_new' in r for r in refreshes)
    with pytest.raises(FileNotFoundError, match='run phase 1'):
        config('synthetic_calibrated', f'confirmation={tmp_path / "nothing"}')


def test_the_argument_picks_methods_and_size():
    """configs/<benchmark>.py:methods=a+b,smoke (configs/common.py `options`)."""
    assert config('gldv2', 'methods=odpp').methods == ('odpp',)
    both = config('gldv2', 'methods=bct+ndpp,smoke')
    assert both.methods == ('bct', 'ndpp') and both.smoke
    assert both.data.image_size == config('gldv2', 'smoke').data.image_size
    assert config('inshop', 'smoke,methods=none').methods == ()
    assert config('synthetic', 'methods=lce').methods == ('lce',)
    for bad in ('methods', 'methods=', 'smoke,huge', 'method=bct'):
        with pytest.raises(ValueError, match='unknown config argument'):
            config('gldv2', bad)
    with pytest.raises(ValueError, match='unknown config argument'):
        config('synthetic_sequential', 'methods=bct')  # a study's own argument only
    # An unknown method name stops before any work, as in the config file.
    with pytest.raises(validate.ConfigError, match='nddp'):
        validate.check_config(config('synthetic', 'methods=bct+nddp'))


def test_a_documented_argument_reaches_the_run_through_the_command_line(tmp_path):
    """ml_collections splits the config file from its argument at the first ':'."""
    import subprocess
    import sys

    program = (
        'from absl import app, flags\n'
        'from ml_collections import config_flags\n'
        "c = config_flags.DEFINE_config_file('config')\n"
        "app.run(lambda _: print(c.value.methods, c.value.smoke))\n"
    )
    out = subprocess.run(
        [sys.executable, '-c', program, '--config=configs/synthetic.py:methods=bct+ndpp,smoke'],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["('bct',", "'ndpp')", 'True']
