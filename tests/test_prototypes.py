"""Tests for bcl_jax.prototypes: segment sums, class means, sharded compute, the stored old bank."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from bcl_jax import embed as embed_lib
from bcl_jax import prototypes, sharding, step
from bcl_jax.data.synthetic import SyntheticBenchmark, SyntheticSpec
from bcl_jax.stage import Trained

BATCH = 8  # divisible by the 8 fake devices


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _ref_bank(emb, labels, num_classes):
    """method.md §2 in float64: mean of the L2-normalised embeddings of each class, normalised."""
    emb = _unit(emb)
    means = np.stack([emb[labels == c].mean(axis=0) for c in range(num_classes)])
    return _unit(means)


# --------------------------------------------------------------------------- sums and means


def test_class_sums_with_valid_mask_and_means():
    rng = np.random.default_rng(0)
    n, c, d = 40, 5, 6
    emb = _unit(rng.normal(size=(n, d))).astype(np.float32)
    labels = rng.integers(0, c, n).astype(np.int32)
    labels[:c] = np.arange(c)  # every class has a valid row
    valid = rng.random(n) < 0.7
    valid[:c] = True
    sums, counts = prototypes.class_sums(
        jnp.asarray(emb), jnp.asarray(labels), jnp.asarray(valid), num_classes=c
    )
    e64 = emb.astype(np.float64)
    want_sums = np.stack([e64[(labels == k) & valid].sum(axis=0) for k in range(c)])
    want_counts = np.array([((labels == k) & valid).sum() for k in range(c)])
    np.testing.assert_allclose(np.asarray(sums), want_sums, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(counts), want_counts)

    bank = prototypes.class_means(sums, counts)
    assert bank.shape == (c, d) and bank.dtype == np.float32
    np.testing.assert_allclose(bank, _ref_bank(emb[valid], labels[valid], c), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(bank, axis=1), 1.0, atol=1e-6)


def test_class_means_hand_case():
    # Class 0: e1 and e2 -> mean (0.5, 0.5) -> (1, 1)/√2. Class 1: one vector (0, 3) -> (0, 1).
    sums = np.array([[1.0, 1.0], [0.0, 3.0]])
    bank = prototypes.class_means(sums, np.array([2.0, 1.0]))
    np.testing.assert_allclose(bank, [[2**-0.5, 2**-0.5], [0.0, 1.0]], atol=1e-7)


def test_empty_class_error_names_the_class():
    sums = np.ones((4, 3))
    with pytest.raises(ValueError, match=r'old bank: classes \[1, 3\] have no images'):
        prototypes.class_means(sums, np.array([2, 0, 5, 0]), what='old bank')


# --------------------------------------------------------------------------- compute, end to end


MODEL_CFG = ml_collections.ConfigDict(
    dict(
        arch='cifar_resnet',
        width=4,
        depth=8,
        embedding_dim=8,
        head='cosface',
        scale=30.0,
        margin=0.3,
    )
)


@pytest.fixture(scope='module')
def source():
    # 4 classes x 5 images = 20: not a multiple of the batch of 8, so the last batch is padded.
    spec = SyntheticSpec(
        seed=3,
        image_size=16,
        train_families=2,
        test_siblings_per_family=1,
        siblings_per_family=2,
        train_images_per_class=5,
        test_images_per_class=2,
        queries_per_class=1,
    )
    src = SyntheticBenchmark(spec).split('train')
    assert len(src) == 20 and len(src) % BATCH
    return src


def _model(seed, num_classes=4):
    graphdef, params, stats = step.init_model(MODEL_CFG, num_classes, seed)
    # A fresh model's BatchNorm running stats are (0, 1); move them so inference is not trivial.
    stats = jax.tree.map(
        lambda x: x + 0.05 * jnp.arange(x.size, dtype=x.dtype).reshape(x.shape) / max(x.size, 1),
        stats,
    )
    return Trained(graphdef, params, stats, MODEL_CFG, num_classes, step=0)


@pytest.fixture(scope='module')
def model():
    return _model(seed=0)


@pytest.fixture(scope='module')
def mesh8():
    return sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1)))


@pytest.fixture(scope='module')
def mesh1():
    return jax.make_mesh(
        (1,), ('data',), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1]
    )


def test_embed_matches_direct_forward(model, source, mesh8):
    """The reference embeddings: evaluate.embed covers every image once, in order, padding cut."""
    emb = embed_lib.embed(model, source, mesh=mesh8, batch_size=BATCH)
    assert emb.shape == (len(source), MODEL_CFG.embedding_dim)
    images = np.stack([source[i]['image'] for i in range(len(source))])
    direct = nnx.merge(model.graphdef, model.params, model.batch_stats).embed(jnp.asarray(images))
    np.testing.assert_allclose(emb, np.asarray(direct), atol=2e-5)


@pytest.mark.parametrize('which', ['mesh8', 'mesh1'])
def test_compute_matches_numpy(which, model, source, request):
    mesh = request.getfixturevalue(which)
    assert mesh.devices.size == (8 if which == 'mesh8' else 1)
    bank = prototypes.compute(model, source, num_classes=4, mesh=mesh, batch_size=BATCH)
    emb = embed_lib.embed(model, source, mesh=mesh, batch_size=BATCH)
    assert emb.shape[0] == len(source)  # padded rows were dropped
    expect = _ref_bank(emb, np.asarray(source.labels), 4)
    assert bank.shape == (4, MODEL_CFG.embedding_dim) and bank.dtype == np.float32
    np.testing.assert_allclose(bank, expect, atol=1e-5)


def test_compute_padding_is_masked(model, source, mesh8):
    """The last batch repeats the last image 4 times; counting it would move class 3's mean."""
    emb = embed_lib.embed(model, source, mesh=mesh8, batch_size=BATCH)
    labels = np.asarray(source.labels)
    padded_emb = np.concatenate([emb, np.repeat(emb[-1:], 4, axis=0)])
    padded_labels = np.concatenate([labels, np.repeat(labels[-1:], 4)])
    wrong = _ref_bank(padded_emb, padded_labels, 4)
    right = _ref_bank(emb, labels, 4)
    assert np.abs(wrong[3] - right[3]).max() > 1e-4  # the check below can tell them apart
    bank = prototypes.compute(model, source, num_classes=4, mesh=mesh8, batch_size=BATCH)
    np.testing.assert_allclose(bank, right, atol=1e-5)


def test_compute_empty_class_is_an_error(model, source, mesh8):
    # 5 classes declared, the source has only 0..3: class 4 has no prototype.
    with pytest.raises(ValueError, match=r'classes \[4\] have no images'):
        prototypes.compute(model, source, num_classes=5, mesh=mesh8, batch_size=BATCH)


# --------------------------------------------------------------------------- old bank on disk


def test_old_bank_writes_reuses_and_recomputes(model, source, mesh8, tmp_path, monkeypatch):
    workdir = str(tmp_path)
    kw = dict(num_classes=4, workdir=workdir, mesh=mesh8, batch_size=BATCH, data_identity='d1')
    bank = prototypes.old_bank(model, source, **kw)

    path = os.path.join(workdir, 'prototypes', 'old.npy')
    stored = np.load(path)  # a binary .npy array, not JSON
    np.testing.assert_array_equal(stored, bank)
    emb = embed_lib.embed(model, source, mesh=mesh8, batch_size=BATCH)
    np.testing.assert_allclose(bank, _ref_bank(emb, np.asarray(source.labels), 4), atol=1e-5)
    with open(path + '.json') as f:
        meta = json.load(f)
    assert meta['old_model'] == model.identity()
    assert meta['num_classes'] == 4 and meta['num_images'] == len(source)
    assert meta['data'] == 'd1'

    # Second call with the same model: read from disk, no computation.
    real_compute = prototypes.compute

    def must_not_run(*args, **kwargs):
        raise AssertionError('old_bank recomputed a bank it had stored')

    monkeypatch.setattr(prototypes, 'compute', must_not_run)
    np.testing.assert_array_equal(prototypes.old_bank(model, source, **kw), bank)

    # Another old model: its identity differs, so the bank is recomputed and replaced.
    other = _model(seed=1)
    assert other.identity() != model.identity()
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return real_compute(*args, **kwargs)

    monkeypatch.setattr(prototypes, 'compute', counting)
    new_bank = prototypes.old_bank(other, source, **kw)
    assert calls == [1]
    emb = embed_lib.embed(other, source, mesh=mesh8, batch_size=BATCH)
    np.testing.assert_allclose(new_bank, _ref_bank(emb, np.asarray(source.labels), 4), atol=1e-5)
    assert np.abs(new_bank - bank).max() > 1e-3
    np.testing.assert_array_equal(np.load(path), new_bank)
    with open(path + '.json') as f:
        assert json.load(f)['old_model'] == other.identity()


def test_ema_class_means_matches_numpy():
    """Classes present in the batch move towards their batch mean; absent ones keep their value."""
    from bcl_jax import prototypes

    rng = np.random.default_rng(5)
    bank = rng.normal(size=(6, 4)).astype(np.float32)
    emb = rng.normal(size=(9, 4)).astype(np.float32)
    labels = np.array([0, 0, 2, 2, 2, 5, 0, 5, 2], np.int32)
    got = np.asarray(prototypes.ema_class_means(bank, emb, labels, decay=0.75))
    want = bank.astype(np.float64).copy()
    for c in np.unique(labels):
        want[c] = 0.75 * bank[c] + 0.25 * emb[labels == c].astype(np.float64).mean(0)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got[[1, 3, 4]], bank[[1, 3, 4]])


def test_old_bank_of_other_data_is_recomputed(model, source, mesh8, tmp_path, monkeypatch):
    """The same old model and image count, but other data (another data identity): recomputed."""
    kw = dict(num_classes=4, workdir=str(tmp_path), mesh=mesh8, batch_size=BATCH)
    prototypes.old_bank(model, source, data_identity='data-a', **kw)
    calls = []
    real = prototypes.compute
    monkeypatch.setattr(prototypes, 'compute', lambda *a, **k: calls.append(1) or real(*a, **k))
    prototypes.old_bank(model, source, data_identity='data-b', **kw)
    assert calls == [1]


@pytest.mark.parametrize('damage', ['truncate', 'garbage_sidecar', 'nan'])
def test_damaged_old_bank_is_recomputed_with_a_warning(
    model, source, mesh8, tmp_path, damage, caplog
):
    """A garbled sidecar is recomputed; a bank whose bytes differ from its digest is recomputed
    when the run says on_change=retrain (without it, it stops: tests/test_integrity.py)."""
    kw = dict(num_classes=4, workdir=str(tmp_path), mesh=mesh8, batch_size=BATCH)
    bank = prototypes.old_bank(model, source, data_identity='d', **kw)
    path = os.path.join(tmp_path, 'prototypes', 'old.npy')
    if damage == 'truncate':
        with open(path, 'r+b') as f:
            f.truncate(os.path.getsize(path) // 2)
    elif damage == 'garbage_sidecar':
        with open(path + '.json', 'w') as f:
            f.write('{"old_model": ')
    else:
        bad = bank.copy()
        bad[1, 0] = np.nan
        np.save(path, bad)
    with caplog.at_level('WARNING'):
        again = prototypes.old_bank(model, source, data_identity='d', retrain=True, **kw)
    np.testing.assert_array_equal(again, bank)
    assert path in caplog.text
    np.testing.assert_array_equal(np.load(path), bank)  # rewritten whole
