"""Integrity end to end: damaged weights, banks, statistics and embedding files, mixed embedding
folders, unchecked ids and labels and changed images never give a silent number (issue 22).

Every case damages a real artefact written by the library (a checkpoint of a tiny model, a
smoke run's work directory, a bank, an embedding folder) and checks that reading it stops with
an error naming the file; the digests are compared against hashlib over the files' bytes.
"""

import hashlib
import json
import os
import shutil

import jax
import numpy as np
import pytest

from bcl_jax import (
    checkpoint,
    crosstest,
    embedding_files,
    export,
    fingerprint,
    main,
    prototypes,
    train,
)
from bcl_jax import data as data_lib
from bcl_jax import step as step_lib
from bcl_jax.data import storage
from configs import common, synthetic
from tests import stages

NUM_CLASSES = 6


def flip(path, n=64):
    """XORs `n` bytes in the middle of the file (its size unchanged); returns the old bytes."""
    data = bytearray(open(path, 'rb').read())
    n = min(n, len(data))
    start = max(0, len(data) // 2 - n // 2)
    before = bytes(data)
    for i in range(start, start + n):
        data[i] ^= 0xFF
    with open(path, 'wb') as f:
        f.write(data)
    return before


def sha256(path):
    return hashlib.sha256(open(path, 'rb').read()).hexdigest()


def largest_file(folder):
    files = [os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs]
    return max(files, key=os.path.getsize)


# --------------------------------------------------------------------------- checkpoints


def model_cfg():
    return common.model(arch='cifar_resnet', width=4, depth=8, embedding_dim=16, head='cosface')


def saved_checkpoint(directory, seed=0):
    """A tiny model's checkpoint at step 4 of 4, as train.train writes it: the saved weights."""
    cfg = model_cfg()
    _, params, stats = step_lib.init_model(cfg, NUM_CLASSES, seed=seed)
    state = jax.tree.map(
        np.array,
        dict(
            step=np.int32(4),
            params=params,
            batch_stats=stats,
            first_nonfinite_step=np.int32(-1),
        ),
    )
    model = {k: cfg[k] for k in ('arch', 'width', 'depth', 'embedding_dim', 'head')}
    meta = dict(stage='old', model=model, num_classes=NUM_CLASSES, total_steps=4, seconds=1.0)
    ckpt = checkpoint.Checkpointer(directory, max_to_keep=None)
    ckpt.save(4, state, {}, meta)
    ckpt.close()
    return state, cfg


def test_flipped_bytes_in_saved_weights_stop_the_load_naming_the_file(tmp_path):
    directory = str(tmp_path / 'ckpt')
    state, cfg = saved_checkpoint(directory)
    step_dir = os.path.join(directory, '4')
    # The digests written with the step are those of the files' bytes.
    record = json.load(open(os.path.join(step_dir, checkpoint.DIGESTS)))['sha256']
    weights_files = [
        os.path.relpath(os.path.join(r, f), step_dir)
        for r, _, fs in os.walk(os.path.join(step_dir, 'weights'))
        for f in fs
    ]
    assert weights_files and all(
        record[f] == sha256(os.path.join(step_dir, f)) for f in weights_files
    )
    # Undamaged, the model loads as saved.
    model = train.load(directory, cfg, NUM_CLASSES, stages.mesh_of(8))
    np.testing.assert_array_equal(
        np.asarray(jax.tree.leaves(model.params)[0]), jax.tree.leaves(state['params'])[0]
    )

    target = largest_file(os.path.join(step_dir, 'weights'))
    flip(target)
    with pytest.raises(checkpoint.DamagedError, match='on_change=retrain') as e:
        train.load(directory, cfg, NUM_CLASSES, stages.mesh_of(8))
    assert target in str(e.value)
    assert os.path.isdir(step_dir)  # nothing moved or deleted


def test_a_checkpoint_without_digests_loads_with_one_warning(tmp_path, caplog):
    """A step written by an older bcl_jax (no digests.json) still loads, with a warning."""
    directory = str(tmp_path / 'ckpt')
    state, cfg = saved_checkpoint(directory, seed=1)
    os.remove(os.path.join(directory, '4', checkpoint.DIGESTS))
    with caplog.at_level('WARNING'):
        model = train.load(directory, cfg, NUM_CLASSES, stages.mesh_of(8))
    assert model.step == 4
    warned = [r for r in caplog.records if 'no content digests' in r.getMessage()]
    assert len(warned) == 1 and directory in warned[0].getMessage()


# --------------------------------------------------------------------------- a smoke run


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
    """A finished smoke run (old + BCT): (config, workdir, results)."""
    cfg = synthetic.get_config('smoke')
    cfg.methods = ('independent', 'bct')
    workdir = str(tmp_path_factory.mktemp('smoke'))
    return cfg, workdir, main.run(cfg, workdir)


def copy_run(smoke, tmp_path):
    cfg, workdir, results = smoke
    copy = str(tmp_path / 'run')
    shutil.copytree(workdir, copy)
    return cfg.copy_and_resolve_references(), copy, results


def latest_step_dir(workdir, stage):
    ckpt = os.path.join(workdir, stage, 'ckpt')
    return os.path.join(ckpt, str(max(int(d) for d in os.listdir(ckpt) if d.isdigit())))


def test_damaged_new_model_weights_stop_the_rerun_and_retrain_replaces_them(smoke, tmp_path):
    cfg, workdir, results = copy_run(smoke, tmp_path)
    target = largest_file(os.path.join(latest_step_dir(workdir, 'new_bct'), 'weights'))
    flip(target)
    with pytest.raises(checkpoint.DamagedError) as e:
        main.run(cfg, workdir)
    assert target in str(e.value) and 'on_change=retrain' in str(e.value)
    assert (
        json.load(open(os.path.join(workdir, 'results.json')))['methods']['bct']
        == (results['methods']['bct'])
    )  # no result was rewritten from the damaged model

    cfg.on_change = 'retrain'  # the remedy the error names: the stage is moved aside, retrained
    again = main.run(cfg, workdir)
    assert os.path.isdir(os.path.join(workdir, 'new_bct.replaced-1'))
    step_dir = latest_step_dir(workdir, 'new_bct')
    record = json.load(open(os.path.join(step_dir, checkpoint.DIGESTS)))['sha256']
    assert all(sha256(os.path.join(step_dir, f)) == d for f, d in record.items())
    assert again['old_old'] == results['old_old']  # the old model was reused as it was


def test_damaged_old_model_weights_stop_before_the_bank_is_touched(smoke, tmp_path):
    cfg, workdir, _ = copy_run(smoke, tmp_path)
    bank = os.path.join(workdir, 'prototypes', 'old.npy')
    bank_bytes = open(bank, 'rb').read()
    target = largest_file(os.path.join(latest_step_dir(workdir, 'old'), 'weights'))
    flip(target)
    with pytest.raises(checkpoint.DamagedError) as e:
        main.run(cfg, workdir)
    assert target in str(e.value)
    assert 'other settings' not in str(e.value)
    assert open(bank, 'rb').read() == bank_bytes  # the good bank is not overwritten


# --------------------------------------------------------------------------- banks and statistics


@pytest.fixture(scope='module')
def tiny():
    """A tiny old model, 16 random images of 4 classes (2 seen by the old model), a mesh."""
    reference = stages.reference(num_classes=4, old_classes=2)
    return reference, stages.RandomSource(n=16, num_classes=4), stages.mesh_of(8)


def test_flipped_bytes_in_a_stored_bank_stop_naming_the_file(tiny, tmp_path, caplog):
    reference, source, mesh = tiny
    kw = dict(num_classes=4, workdir=str(tmp_path), mesh=mesh, batch_size=8, data_identity='d')
    bank = prototypes.old_bank(reference.old, source, **kw)
    path = os.path.join(tmp_path, 'prototypes', 'old.npy')
    sidecar = json.load(open(path + '.json'))
    assert sidecar['sha256'] == sha256(path)
    flip(path)
    with pytest.raises(storage.DamagedError, match='on_change=retrain') as e:
        prototypes.old_bank(reference.old, source, **kw)
    assert path in str(e.value)
    # The remedy: recomputed from the old model, the same bank again.
    with caplog.at_level('WARNING'):
        again = prototypes.old_bank(reference.old, source, retrain=True, **kw)
    np.testing.assert_array_equal(again, bank)
    assert path in caplog.text and sha256(path) == json.load(open(path + '.json'))['sha256']


def test_a_bank_without_a_digest_is_reused_with_one_warning(tiny, tmp_path, caplog):
    """A bank stored by an older bcl_jax (no sha256 in its sidecar) is reused as it is."""
    reference, source, mesh = tiny
    kw = dict(num_classes=4, workdir=str(tmp_path), mesh=mesh, batch_size=8, data_identity='d')
    bank = prototypes.old_bank(reference.old, source, **kw)
    path = os.path.join(tmp_path, 'prototypes', 'old.npy')
    sidecar = json.load(open(path + '.json'))
    del sidecar['sha256']
    json.dump(sidecar, open(path + '.json', 'w'))
    before = os.stat(path).st_mtime_ns
    with caplog.at_level('WARNING'):
        again = prototypes.old_bank(reference.old, source, **kw)
    np.testing.assert_array_equal(again, bank)
    assert os.stat(path).st_mtime_ns == before  # reused, not rewritten
    warned = [r.getMessage() for r in caplog.records if 'no content digest' in r.getMessage()]
    assert len(warned) == 1 and path in warned[0]


def test_flipped_bytes_in_stored_class_statistics_stop_naming_the_file(tiny, tmp_path):
    reference, source, mesh = tiny
    kw = dict(workdir=str(tmp_path), mesh=mesh, batch_size=8, data_identity='d')
    bank = np.asarray(reference.prototypes)
    stats = prototypes.old_class_statistics(reference.old, source, bank, reference.old_label, **kw)
    path = os.path.join(tmp_path, 'prototypes', 'old_stats.npz')
    assert json.load(open(path + '.json'))['sha256'] == sha256(path)
    flip(path)
    with pytest.raises(storage.DamagedError) as e:
        prototypes.old_class_statistics(reference.old, source, bank, reference.old_label, **kw)
    assert path in str(e.value)
    again = prototypes.old_class_statistics(
        reference.old, source, bank, reference.old_label, retrain=True, **kw
    )
    assert set(again) == set(stats)
    for k in stats:
        np.testing.assert_array_equal(again[k], stats[k])


# --------------------------------------------------------------------------- embedding files


def test_flipped_bytes_in_an_embedding_file_stop_naming_the_file(tmp_path):
    rng = np.random.default_rng(0)
    emb = stages.unit_rows(rng, 20, 8)
    ids = [f'img{i}' for i in range(20)]
    embedding_files.write_embeddings(
        tmp_path, 'gallery', emb, ids=ids, labels=np.arange(20) % 4, identity={}
    )
    manifest = json.load(open(tmp_path / 'gallery.json'))
    for f in ('gallery.npy', 'gallery.ids.txt', 'gallery.labels.npy'):
        assert manifest['sha256'][f] == sha256(tmp_path / f)
    path = str(tmp_path / 'gallery.npy')
    flip(path)
    with pytest.raises(storage.DamagedError) as e:
        embedding_files.read_embeddings(tmp_path, 'gallery')
    assert path in str(e.value)


# --------------------------------------------------------------------------- embedding folders


def exported(smoke, tmp_path, stage):
    cfg, workdir, _ = smoke
    out = str(tmp_path / stage)
    export.export(cfg, os.path.join(workdir, stage, 'ckpt'), out)
    return out


def test_export_writes_one_whole_folder_with_a_manifest_of_every_file(smoke, tmp_path):
    cfg, workdir, results = smoke
    out = exported(smoke, tmp_path, 'old')
    manifest = json.load(open(os.path.join(out, 'manifest.json')))
    files = sorted(f for f in os.listdir(out) if f != 'manifest.json')
    assert sorted(manifest['sha256']) == files
    assert all(manifest['sha256'][f] == sha256(os.path.join(out, f)) for f in files)
    assert manifest['model']['weights'] == results['old_model']['identity']
    assert os.listdir(tmp_path) == ['old']  # no temporary folder left beside it
    # A second export replaces the folder whole: nothing of the first is left in it.
    open(os.path.join(out, 'stray.npy'), 'wb').write(b'x')
    exported(smoke, tmp_path, 'old')
    assert 'stray.npy' not in os.listdir(out) and os.listdir(tmp_path) == ['old']


def test_a_folder_mixing_two_models_sets_is_refused(smoke, tmp_path):
    cfg, workdir, _ = smoke
    old, new = exported(smoke, tmp_path, 'old'), exported(smoke, tmp_path, 'new_bct')
    bct = os.path.join(workdir, 'new_bct', 'ckpt')
    mixed = str(tmp_path / 'mixed')
    shutil.copytree(old, mixed)
    for suffix in ('.npy', '.ids.txt', '.labels.npy', '.json'):  # new_bct's gallery, whole
        shutil.copy(os.path.join(new, 'synthetic.gallery' + suffix), mixed)
    with pytest.raises(storage.DamagedError) as e:
        crosstest.run(cfg, dict(old=mixed, bct=bct), str(tmp_path / 'x'))
    assert 'synthetic.gallery' in str(e.value) and mixed in str(e.value)
    # Without the folder's manifest, the sets' own manifests name two models: refused too.
    os.remove(os.path.join(mixed, 'manifest.json'))
    with pytest.raises(ValueError, match='mixes embedding sets of different models'):
        crosstest.run(cfg, dict(old=mixed, bct=bct), str(tmp_path / 'y'))
    assert not os.path.exists(tmp_path / 'x') and not os.path.exists(tmp_path / 'y')


def test_ids_shuffled_against_their_rows_are_refused(smoke, tmp_path):
    """A set written elsewhere (its own digests consistent) whose ids are rolled by one against
    its rows and labels: reordering by id would silently pair rows with the wrong images."""
    cfg, workdir, _ = smoke
    old = exported(smoke, tmp_path, 'old')
    shuffled = str(tmp_path / 'shuffled')
    labels_of = {}
    for name in ('synthetic.query', 'synthetic.gallery'):
        f = embedding_files.read_embeddings(old, name)
        ids = f.ids[1:] + f.ids[:1]
        labels_of[name] = dict(zip(ids, f.labels))
        embedding_files.write_embeddings(
            shuffled, name, f.emb, ids=ids, labels=f.labels, identity=dict(framework='elsewhere')
        )
    # Independently: the labels written beside the rolled ids are not the dataset's.
    data = data_lib.build(cfg.data)
    gallery = next(t for t in data.tests if t.gallery is not None).gallery
    truth = dict(zip(export.source_ids(gallery), np.asarray(gallery.labels)))
    assert any(labels_of['synthetic.gallery'][i] != truth[i] for i in truth)
    with pytest.raises(ValueError, match='another label than in the dataset') as e:
        crosstest.run(
            cfg,
            dict(old=shuffled, bct=os.path.join(workdir, 'new_bct', 'ckpt')),
            str(tmp_path / 'x'),
        )
    assert shuffled in str(e.value)


# --------------------------------------------------------------------------- image content


def write_png(path, rng, size=16):
    """Random pixels, stored uncompressed: the file's size depends on the image's size only."""
    from PIL import Image

    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
        path, compress_level=0
    )


def folder_run_config(root):
    rng = np.random.default_rng(0)
    for split, classes, per_class in (
        ('train', 'abcd', 8),
        ('query', 'xy', 1),
        ('gallery', 'xyz', 4),
    ):
        for c in classes:
            os.makedirs(root / split / c)
            for k in range(per_class):
                write_png(root / split / c / f'{k}.png', rng)
    cfg = synthetic.get_config('smoke')
    cfg.methods = ('independent',)
    cfg.data.name, cfg.data.image_size, cfg.data.old_fraction = 'folder', 16, 0.5
    for split in ('train', 'query', 'gallery'):
        cfg.data.folder[f'{split}_dir'] = str(root / split)
    return cfg


def test_a_training_image_replaced_under_its_name_changes_the_fingerprint(tmp_path, monkeypatch):
    cfg = folder_run_config(tmp_path / 'images')
    workdir = str(tmp_path / 'run')
    results = main.run(cfg, workdir)
    # Every training image's digest is cached in the work directory, as hashlib gives it.
    cached = json.load(open(os.path.join(workdir, 'data_digests.json')))['files']
    train_dir = tmp_path / 'images' / 'train'
    images = sorted(str(p) for p in train_dir.rglob('*.png'))
    assert sorted(cached) == images
    assert all(cached[p]['sha256'] == sha256(p) for p in images)
    names_cfg = cfg.data.copy_and_resolve_references()
    names_cfg.fingerprint = 'names'
    by_names = data_lib.build(names_cfg, workdir).fingerprint

    # One image's pixels replaced by noise: the same name, the same size.
    target = train_dir / 'b' / '3.png'
    size = os.path.getsize(target)
    write_png(target, np.random.default_rng(99))
    assert os.path.getsize(target) == size and sha256(target) != cached[str(target)]['sha256']
    read = []
    real = storage.file_digest
    monkeypatch.setattr(storage, 'file_digest', lambda p: read.append(str(p)) or real(p))
    changed = data_lib.build(cfg.data, workdir).fingerprint
    assert changed != results['data']['fingerprint']
    assert read == [str(target)]  # the other images' digests came from the cache
    monkeypatch.undo()
    # The next run refuses the stages trained on the old images, naming the data.
    with pytest.raises(fingerprint.ChangedConfigError, match='data_identity'):
        main.run(cfg, workdir)
    # data.fingerprint='names', the documented cheaper mode, does not see it.
    assert data_lib.build(names_cfg, workdir).fingerprint == by_names
