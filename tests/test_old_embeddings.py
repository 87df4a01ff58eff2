"""An old model given only as embedding files (`old.embeddings`, bcl_jax.old_embeddings): the same
results as the old model in bcl_jax, a PyTorch model's files through the documented recipe, and
the refusals before any work."""

import json
import os

import numpy as np
import pytest

from bcl_jax import data as data_lib
from bcl_jax import embedding_files, export, main, validate
from configs import synthetic

METHODS = ('independent', 'bct', 'ndpp')


def smoke(**old):
    c = synthetic.get_config('smoke')
    c.methods = METHODS
    c.old.update(old)
    return c


@pytest.fixture(scope='module')
def in_bcl_jax(tmp_path_factory):
    """A smoke run with the old model trained in bcl_jax, and its embeddings of every set."""
    base = tmp_path_factory.mktemp('old_embeddings')
    results = main.run(smoke(), str(base / 'run'))
    folder = str(base / 'old_files')
    export.export(smoke(), str(base / 'run' / 'old' / 'ckpt'), folder, which='all')
    return base, results, folder


def numbers(results):
    """Every metric of the run: old/old, and new/new and new/old of each method."""
    out = {'old_old': results['old_old']}
    for name, r in results['methods'].items():
        out[name] = (r['new_new'], r['new_old'], r['compatible'])
    return out


def test_files_of_the_old_model_give_the_same_run(in_bcl_jax, tmp_path):
    base, results, folder = in_bcl_jax
    assert sorted(os.listdir(folder)) == sorted(
        ['manifest.json']  # the folder as one unit (bcl_jax.embedding_files.check_folder)
        + [
            f'{name}.{ext}'
            for name in ('train', 'synthetic.query', 'synthetic.gallery')
            for ext in ('npy', 'ids.txt', 'labels.npy', 'json')
        ]
    )
    given = main.run(smoke(embeddings=folder), str(tmp_path / 'run'))
    assert numbers(given) == numbers(results)
    assert not os.path.exists(tmp_path / 'run' / 'old')  # no old model was trained
    bank = lambda run: np.load(os.path.join(run, 'prototypes', 'old.npy'))
    np.testing.assert_array_equal(bank(str(tmp_path / 'run')), bank(str(base / 'run')))
    assert given['old_model']['embeddings'] == folder
    assert given['old_model']['sets'] == ['train', 'synthetic.query', 'synthetic.gallery']


def _write_set(directory, name, emb, ids, labels):
    """The format by hand, as a script of another framework writes it (NumPy and json only)."""
    np.save(os.path.join(directory, f'{name}.npy'), emb.astype(np.float32))
    with open(os.path.join(directory, f'{name}.ids.txt'), 'w') as f:
        f.write(''.join(f'{i}\n' for i in ids))
    np.save(os.path.join(directory, f'{name}.labels.npy'), labels.astype(np.int64))
    manifest = {
        'format': 'bcl_jax.embeddings/1',
        'num_items': len(emb),
        'dim': emb.shape[1],
        'dtype': 'float32',
        'has_labels': True,
        'identity': {'framework': 'pytorch', 'model': 'a random conv net'},
    }
    with open(os.path.join(directory, f'{name}.json'), 'w') as f:
        json.dump(manifest, f)


def test_a_pytorch_models_embeddings_train_new_models(tmp_path):
    """docs/lifecycle.md's recipe: a PyTorch model embeds every set; the rows go in any order
    (matched by id); the prototypes are its class means (NumPy float64 reference)."""
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 16),
    )
    data = data_lib.build(smoke().data)
    folder = tmp_path / 'torch_files'
    folder.mkdir()
    sets = {'train': data.train}
    for test in data.tests:
        sets[f'{test.name}.query'] = test.query
        sets[f'{test.name}.gallery'] = test.gallery
    train_emb = None
    for name, source in sets.items():
        images = np.stack([source[i]['image'] for i in range(len(source))])
        with torch.no_grad():
            x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
            emb = torch.nn.functional.normalize(net(x), dim=1).numpy()
        order = np.random.default_rng(1).permutation(len(source))  # shuffled: matched by id
        labels = np.asarray(source.labels)
        _write_set(str(folder), name, emb[order], [str(i) for i in order], labels[order])
        if name == 'train':
            train_emb, train_labels = emb.astype(np.float64), labels

    run = tmp_path / 'run'
    results = main.run(smoke(embeddings=str(folder)), str(run))
    assert set(results['methods']) == set(METHODS)
    means = np.stack([train_emb[train_labels == c].mean(0) for c in range(data.num_classes)])
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    np.testing.assert_allclose(np.load(run / 'prototypes' / 'old.npy'), means, atol=1e-5)


def test_refused_before_any_work(in_bcl_jax, tmp_path):
    _, _, folder = in_bcl_jax
    validate.check_config(smoke(embeddings=folder))  # prototype methods: fine
    with pytest.raises(validate.ConfigError, match='given alone'):
        validate.check_config(smoke(embeddings=folder, checkpoint='/some/ckpt'))
    l2 = smoke(embeddings=folder)
    l2.methods = ('bct', 'l2')
    with pytest.raises(validate.ConfigError, match='l2 runs the old network on every batch'):
        validate.check_config(l2)
    upgrades = synthetic.get_config('smoke')
    upgrades.old.embeddings = folder
    upgrades.upgrades = dict(v2=dict(fraction=1.0, method='bct', model=dict(width=4)))
    with pytest.raises(validate.ConfigError, match='without upgrades'):
        validate.check_config(upgrades)


def test_a_missing_set_or_other_labels_stop_with_the_file_named(in_bcl_jax, tmp_path):
    _, _, folder = in_bcl_jax
    partial = tmp_path / 'partial'  # a folder put together by hand: no folder manifest
    partial.mkdir()
    for f in os.listdir(folder):
        if not f.startswith(('synthetic.gallery', 'manifest')):
            (partial / f).write_bytes(open(os.path.join(folder, f), 'rb').read())
    with pytest.raises(FileNotFoundError, match='synthetic.gallery.json'):
        main.run(smoke(embeddings=str(partial)), str(tmp_path / 'a'))
    # The gallery written whole, but with labels that are not the dataset's: files made for
    # other data.
    gallery = embedding_files.read_embeddings(folder, 'synthetic.gallery')
    embedding_files.write_embeddings(
        partial,
        'synthetic.gallery',
        gallery.emb,
        ids=gallery.ids,
        labels=np.roll(gallery.labels, 1),
        identity=gallery.manifest['identity'],
    )
    with pytest.raises(ValueError, match='labels of .* items differ'):
        main.run(smoke(embeddings=str(partial)), str(tmp_path / 'b'))


def test_files_of_another_dimension_stop_before_training(in_bcl_jax, tmp_path):
    _, _, folder = in_bcl_jax
    wide = smoke(embeddings=folder)
    wide.new.model.embedding_dim = 32  # the files hold 16-d rows
    with pytest.raises(validate.ConfigError, match='16, as the dim of the files in'):
        main.run(wide, str(tmp_path / 'wide'))
    assert not os.path.exists(tmp_path / 'wide' / 'new_independent')
