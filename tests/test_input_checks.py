"""What happens when an input is wrong: each test is one bad input and what bcl_jax does.

Every test here failed on bcl_jax before these checks (a late TypeError, a raw traceback, a
silent misreading, advice that did not work). The first line of each test's docstring is a row
of the "What happens when" table in docs/running.md; `test_the_docs_table_lists_every_case`
keeps the two in step.
"""

import ast
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from bcl_jax import crosstest, export, fingerprint, main, sharding, train, validate
from bcl_jax import data as data_lib
from bcl_jax import plan as plan_lib
from bcl_jax.data.folder import ImageFolder
from bcl_jax.data.images import CorruptImageError
from configs import synthetic, synthetic_sequential
from tests import stages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(REPO, 'docs', 'running.md')


def smoke(arg='smoke', module=synthetic, **changes):
    cfg = module.get_config(arg)
    if module is synthetic:
        cfg.methods = ('bct',)
    for field, value in changes.items():
        group = cfg
        *parents, leaf = field.split('.')
        for p in parents:
            group = group[p]
        group[leaf] = value
    return cfg


@pytest.fixture(scope='module')
def smoke_data():
    return data_lib.build(smoke().data)


# --------------------------------------------------------------------------- config checks


def test_new_embedding_dim_differs_from_old():
    """A new model's `embedding_dim` differs from the old model's"""
    cfg = smoke(**{'new.model.embedding_dim': 32})
    with pytest.raises(validate.ConfigError) as err:
        validate.check_config(cfg)
    message = str(err.value)
    assert 'config.new.model.embedding_dim=32' in message
    assert '16, as config.old.model.embedding_dim' in message
    assert 'no learned transformation' in message


def test_independent_embedding_dim_differs_from_old():
    """An independent model's `embedding_dim` differs from the old model's"""
    cfg = smoke(methods=('independent',), **{'new.model.embedding_dim': 32})
    with pytest.raises(validate.ConfigError, match='new/old cross-test'):
        validate.check_config(cfg)


def test_upgrade_embedding_dim_differs_from_its_predecessor():
    """An upgrade's `embedding_dim` differs from the model before it"""
    cfg = smoke(module=synthetic_sequential)
    cfg.upgrades.v3.model.embedding_dim = 32
    with pytest.raises(validate.ConfigError) as err:
        validate.check_config(cfg)
    assert 'config.upgrades.v3.model.embedding_dim=32' in str(err.value)
    assert 'config.upgrades.v2.model.embedding_dim' in str(err.value)


def test_unknown_upgrade_method():
    """An upgrade names an unknown method"""
    cfg = smoke(module=synthetic_sequential)
    cfg.upgrades.v2.method = 'bcd'
    with pytest.raises(validate.ConfigError) as err:
        validate.check_config(cfg)
    assert str(err.value).startswith("config.upgrades.v2.method='bcd': one of (")
    assert 'config.methods' not in str(err.value)


def test_upgrade_with_zero_steps(smoke_data):
    """An upgrade's schedule gives 0 steps"""
    cfg = smoke(module=synthetic_sequential)
    cfg.upgrades.v2.train = {'epochs': 0.01}
    validate.check_config(cfg)
    with pytest.raises(validate.ConfigError) as err:
        validate.check_run(cfg, smoke_data)
    message = str(err.value)
    assert message.startswith('config.upgrades.v2.train.epochs=0.01: gives 0 steps')
    assert "upgrade 'v2'" in message


def test_changed_upgrade_fraction():
    """A rerun changes an upgrade's `fraction`"""
    cfg = smoke(module=synthetic_sequential)
    data = data_lib.build(cfg.data)
    reference = stages.reference(num_classes=data.num_classes, old_classes=4, dim=16)

    def stamp(config):
        run = plan_lib.plan(config, data)
        return plan_lib.upgrade_stage(run, run.upgrades[0], reference).fingerprint

    saved = stamp(cfg)
    cfg.upgrades.v2.fraction = 0.8
    with pytest.raises(fingerprint.ChangedConfigError) as err:
        fingerprint.check_fingerprint(saved, stamp(cfg), where='v2/ckpt', what='v2')
    assert 'upgrades.v2.fraction: 0.6 -> 0.8' in str(err.value)
    # A stage saved before the fraction was recorded: its classes' digest alone decides.
    legacy = {k: v for k, v in saved.items() if not k.endswith('.fraction')}
    assert fingerprint.differences(legacy, saved) == []


# --------------------------------------------------------------------------- training runs


@pytest.fixture(scope='module')
def nan_run(tmp_path_factory):
    """A run whose old model diverges after a checkpoint: (workdir, the NaN error, the rerun's
    refusal with a lower rate alone, the results of the advised command)."""
    workdir = str(tmp_path_factory.mktemp('nan'))
    changes = {'methods': (), 'log_every_steps': 1, 'ckpt.every_steps': 1}
    with pytest.raises(FloatingPointError) as nan:
        main.run(smoke(**changes, **{'old.train.learning_rate': 1e30}), workdir)
    lower = {**changes, 'old.train.learning_rate': 0.1}
    with pytest.raises(fingerprint.ChangedConfigError) as refused:
        main.run(smoke(**lower), workdir)
    results = main.run(smoke(**lower, on_change='retrain'), workdir)
    return workdir, str(nan.value), str(refused.value), results


def test_nan_stop_advises_a_command_that_works(nan_run):
    """Training meets NaN or Inf"""
    workdir, message, refused, results = nan_run
    assert '--config.old.train.learning_rate=1e+29' in message
    assert '--config.on_change=retrain' in message
    assert os.path.join(workdir, 'old') + '.replaced-<n>' in message
    assert 'rerun to resume' not in message
    assert 'old.train.learning_rate: 1e+30 -> 0.1' in refused  # a lower rate alone is refused
    assert os.path.isdir(os.path.join(workdir, 'old.replaced-1'))  # the advice moved it aside
    assert results['old_old']  # the run finished and scored the retrained model


def test_refused_rerun_leaves_config_json(nan_run, tmp_path):
    """A rerun with changed settings is refused"""
    workdir = str(tmp_path / 'copy')
    shutil.copytree(nan_run[0], workdir)
    config_json = tmp_path / 'copy' / 'config.json'
    before = config_json.read_text()
    assert json.loads(before)['old']['train']['learning_rate'] == 0.1
    changes = {'methods': (), 'log_every_steps': 1, 'ckpt.every_steps': 1}
    with pytest.raises(fingerprint.ChangedConfigError):
        main.run(smoke(**changes, **{'old.train.learning_rate': 0.05}), workdir)
    assert config_json.read_text() == before


@pytest.fixture(scope='module')
def unfinished(tmp_path_factory):
    """An old model stopped at step 2 of 5, and its embeddings exported: (config, checkpoint
    folder, embeddings folder)."""
    cfg = smoke()
    data = data_lib.build(cfg.data)
    workdir = str(tmp_path_factory.mktemp('unfinished'))
    stage = plan_lib.old_stage(plan_lib.plan(cfg, data))
    mesh = sharding.make_mesh(cfg.mesh)
    train.train(
        stage, None, train.Loop.from_config(cfg), mesh=mesh, workdir=workdir, stop_after_steps=2
    )
    ckpt, files = os.path.join(workdir, 'old', 'ckpt'), os.path.join(workdir, 'embeddings')
    export.export(cfg, ckpt, files, allow_unfinished=True)
    return cfg, ckpt, files


def test_output_folder_not_writable(tmp_path):
    """The output folder of export or crosstest cannot be written"""
    blocker = tmp_path / 'a_file'
    blocker.write_text('')
    out = str(blocker / 'out')
    cfg = smoke()
    with pytest.raises(OSError, match=r'--out=.*a_file/out cannot be written'):
        export.export(cfg, str(tmp_path / 'no_checkpoint'), out)
    models = {'old': str(tmp_path / 'x'), 'new': str(tmp_path / 'y')}
    with pytest.raises(OSError, match=r'--workdir=.*a_file/out cannot be written'):
        crosstest.run(cfg, models, out)
    # A writable one that did not exist is checked and left as it was: not there.
    with pytest.raises(FileNotFoundError, match='no_checkpoint'):
        export.export(cfg, str(tmp_path / 'no_checkpoint'), str(tmp_path / 'new' / 'out'))
    assert not (tmp_path / 'new').exists()


def test_unfinished_checkpoint(unfinished, tmp_path):
    """export or crosstest is given an unfinished checkpoint"""
    cfg, ckpt, files = unfinished
    with pytest.raises(ValueError, match=r'holds step 2 of 5.*--allow_unfinished'):
        export.export(cfg, ckpt, str(tmp_path / 'out'))
    with pytest.raises(ValueError, match=r'holds step 2 of 5.*--allow_unfinished'):
        crosstest.run(cfg, {'files': files, 'old': ckpt}, str(tmp_path / 'cross'))
    assert not (tmp_path / 'out').exists() and not (tmp_path / 'cross').exists()


def test_embedding_folder_without_manifests(unfinished, tmp_path):
    """An embeddings folder has no manifests"""
    cfg, _, files = unfinished
    bare = tmp_path / 'bare'
    shutil.copytree(files, bare)
    for manifest in bare.glob('*.json'):
        manifest.unlink()
    with pytest.raises(ValueError, match=r'bare holds embeddings .* but no manifests'):
        crosstest.run(cfg, {'bare': str(bare), 'files': files}, str(tmp_path / 'cross'))


def test_embedding_manifest_is_broken_json(unfinished, tmp_path):
    """An embeddings manifest is not valid JSON"""
    cfg, _, files = unfinished
    broken = tmp_path / 'broken'
    shutil.copytree(files, broken)
    (broken / 'manifest.json').unlink()  # a folder put together by hand: its sets one by one
    (broken / 'synthetic.query.json').write_text('{"format": ')
    with pytest.raises(ValueError) as err:
        crosstest.run(cfg, {'broken': str(broken), 'files': files}, str(tmp_path / 'cross'))
    assert str(broken / 'synthetic.query.json') + ' is not valid JSON' in str(err.value)


# --------------------------------------------------------------------------- image folders


def _images(folder, names, size=16, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        pixels = rng.integers(0, 256, (size, size, 3), np.uint8)
        Image.fromarray(pixels).save(folder / name)


def test_class_folder_symlinked_into_the_dataset(tmp_path):
    """A class folder is a symlink to the dataset root or to another class"""
    root = tmp_path / 'data'
    _images(root / 'a', ['1.png', '2.png'])
    _images(root / 'b', ['1.png', '2.png'])
    (root / 'c').symlink_to(root, target_is_directory=True)
    with pytest.raises(ValueError) as err:
        ImageFolder(root, image_size=8)
    assert "class folder 'c' is a symlink to" in str(err.value)
    assert '(the dataset root)' in str(err.value)
    (root / 'c').unlink()
    (root / 'c').symlink_to(root / 'a', target_is_directory=True)
    with pytest.raises(ValueError, match="'a', inside the dataset root"):
        ImageFolder(root, image_size=8)
    # A link to a folder outside the root is one class's images: followed.
    (root / 'c').unlink()
    _images(tmp_path / 'elsewhere', ['1.png'])
    (root / 'c').symlink_to(tmp_path / 'elsewhere', target_is_directory=True)
    ds = ImageFolder(root, image_size=8)
    assert ds.classes == ['a', 'b', 'c'] and len(ds) == 5


def _truncated(path):
    _images(path.parent, [path.name], size=64)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


def test_truncated_image(tmp_path):
    """An image file is truncated"""
    root = tmp_path / 'data'
    _images(root / 'a', ['1.jpg', '2.png'])
    _images(root / 'b', ['1.jpg'])
    _truncated(root / 'a' / 'cut.jpg')
    _truncated(root / 'b' / 'cut.png')
    with pytest.raises(CorruptImageError, match='2 of 5 images cannot be read') as err:
        ImageFolder(root, image_size=8)  # the default scan: headers and end markers
    assert f'{root / "a" / "cut.jpg"} (truncated' in str(err.value)
    ds = ImageFolder(root, image_size=8, skip_corrupt=True)
    assert len(ds) == 3 and sorted(ds.skipped) == [str(root / 'a/cut.jpg'), str(root / 'b/cut.png')]
    # Unscanned and read later: the hint is the scan that finds it, not the switch already set.
    ds = ImageFolder(root, image_size=8, skip_corrupt=True, scan='off')
    with pytest.raises(CorruptImageError) as err:
        ds[ds.paths.index(str(root / 'a' / 'cut.jpg'))]
    assert "data.scan_images='decode'" in str(err.value)
    assert 'or set data.skip_corrupt=True to skip' not in str(err.value)


# --------------------------------------------------------------------------- command lines


def command(module, *args, timeout=180):
    env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu', BCL_JAX_COMPILE_CACHE='off')
    return subprocess.run(
        [sys.executable, '-m', module, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_unknown_config_field(tmp_path):
    """A config flag names an unknown field"""
    out = command(
        'bcl_jax.main',
        '--config=configs/synthetic.py:smoke',
        f'--workdir={tmp_path / "run"}',
        '--config.data.folder.skip_corrupt=True',
    )
    assert out.returncode != 0
    first = out.stderr.strip().splitlines()[0]
    assert (
        first == 'bcl_jax: unknown field data.folder.skip_corrupt (did you mean data.skip_corrupt?)'
    )
    assert 'Traceback' not in out.stderr


def test_data_error_in_a_command(unfinished, tmp_path):
    """A command meets an unreadable data file"""
    _, ckpt, files = unfinished
    for split, classes in (('train', 'abcd'), ('query', 'xy'), ('gallery', 'xy')):
        for c in classes:
            _images(tmp_path / split / c, ['1.png', '2.png', '3.png'])
    bad = tmp_path / 'gallery' / 'y' / 'bad.png'
    bad.write_text('not an image')
    data = [
        '--config=configs/synthetic.py:smoke',
        '--config.data.name=folder',
        '--config.data.image_size=16',
        *(f'--config.data.folder.{s}_dir={tmp_path / s}' for s in ('train', 'query', 'gallery')),
    ]
    runs = {
        'bcl_jax.main': [f'--workdir={tmp_path / "run"}'],
        'bcl_jax.export': [
            f'--checkpoint={ckpt}',
            f'--out={tmp_path / "out"}',
            '--allow_unfinished',
        ],
        'bcl_jax.crosstest': [
            f'--workdir={tmp_path / "cross"}',
            f'--model=a={files}',
            f'--model=b={files}',
        ],
    }
    for module, args in runs.items():
        out = command(module, *data, *args)
        assert out.returncode != 0, module
        assert 'Traceback' not in out.stderr, (module, out.stderr[-3000:])
        last = out.stderr.strip().splitlines()[-1]
        assert last.startswith('bcl_jax: ') and str(bad) in last, (module, last)


def test_disk_full_while_saving_a_checkpoint(tmp_path):
    """The disk fills up while a checkpoint is saved"""
    disk = tmp_path / 'small_disk'
    disk.mkdir()
    mounted = subprocess.run(
        ['mount', '-t', 'tmpfs', '-o', 'size=128k', 'tmpfs', str(disk)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip('needs a small real filesystem (mount -t tmpfs, as root)')
    try:
        out = command(
            'bcl_jax.main', '--config=configs/synthetic.py:smoke', f'--workdir={disk / "run"}'
        )
    finally:
        subprocess.run(['umount', str(disk)], check=False)
    assert out.returncode != 0
    # No traceback, not even the 'Event loop is closed' reports of tensorstore's callbacks that
    # orbax's failed background save leaves behind (bcl_jax.checkpoint silences those alone):
    # bcl_jax's own line comes last, whole, after nothing but the log.
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith('bcl_jax: no space left on the device writing a checkpoint to ')
    assert 'Traceback' not in out.stderr, out.stderr[-3000:]
    errors = [line for line in lines[:-1] if 'Error' in line]
    assert not errors, out.stderr[-3000:]


def cases() -> dict[str, str]:
    """{test name: the first line of its docstring} of every test in this file."""
    with open(__file__, encoding='utf-8') as f:
        tree = ast.parse(f.read())
    return {
        node.name: (ast.get_docstring(node) or '').splitlines()[0]
        if ast.get_docstring(node)
        else ''
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and node.name.startswith('test_')
    }


def test_the_docs_table_lists_every_case():
    """(the table itself)"""
    with open(DOCS, encoding='utf-8') as f:
        text = f.read()
    section = text.split('## What happens when', 1)[1].split('\n## ', 1)[0]
    rows = {line.split('|')[1].strip() for line in section.splitlines() if line.startswith('| ')}
    for name, case in cases().items():
        if name == 'test_the_docs_table_lists_every_case':
            continue
        assert case, f'{name} has no docstring: its first line is its row in docs/running.md'
        assert case in rows, f'docs/running.md "What happens when" has no row {case!r} ({name})'
    listed = set(cases().values())
    assert rows - {'When'} <= listed, f'rows without a test: {sorted(rows - listed - {"When"})}'
