"""Tests for bcl_jax.data: the synthetic benchmark, old/new splits and build() (the pipeline:
test_pipeline.py)."""

import logging

import numpy as np
import pytest
from fake_datasets import indexed
from PIL import Image

from bcl_jax import data
from bcl_jax.data import splits
from bcl_jax.data import synthetic as synthetic_data
from bcl_jax.data.synthetic import SyntheticBenchmark, SyntheticSpec
from configs import synthetic as synthetic_config

SMALL = {
    'image_size': 12,
    'train_families': 3,
    'test_siblings_per_family': 2,
    'siblings_per_family': 3,
    'train_images_per_class': 4,
    'test_images_per_class': 5,
    'queries_per_class': 2,
}


def _images(source):
    return np.stack([source[i]['image'] for i in range(len(source))])


# --------------------------------------------------------------------------- synthetic


def test_synthetic_images_are_pure_in_seed_split_label_index():
    a = SyntheticBenchmark(SyntheticSpec(seed=5, **SMALL))
    b = SyntheticBenchmark(SyntheticSpec(seed=5, **SMALL))
    other = SyntheticBenchmark(SyntheticSpec(seed=6, **SMALL))
    for split, label, index in [(0, 0, 0), (0, 7, 3), (1, 2, 4)]:
        img = a.image(split, label, index)
        assert img.shape == (12, 12, 3) and img.dtype == np.uint8
        np.testing.assert_array_equal(img, b.image(split, label, index))
        np.testing.assert_array_equal(img, a.image(split, label, index))  # no hidden state
        assert np.abs(img.astype(int) - other.image(split, label, index)).mean() > 5
    # Index, label and split each change the image.
    base = a.image(0, 1, 1).astype(int)
    for args in [(0, 1, 2), (0, 2, 1), (1, 1, 1)]:
        assert np.abs(base - a.image(*args)).mean() > 5
    # Sources read the same images, whatever the access order.
    src_a, src_b = a.split('train'), b.split('train')
    for i in [35, 0, 17]:
        np.testing.assert_array_equal(src_a[i]['image'], src_b[i]['image'])
        np.testing.assert_array_equal(src_a[i]['image'], a.image(0, i // 4, i % 4))


def test_synthetic_sources_keep_each_image_they_made_and_hand_out_copies(monkeypatch):
    """A source makes an image once (then serves it from its cache) and the cached image is the
    one `image` makes; a record is its own array; above CACHE_BYTES nothing is kept."""
    bench = SyntheticBenchmark(SyntheticSpec(seed=5, **SMALL))
    made = []
    image = bench.image
    monkeypatch.setattr(bench, 'image', lambda *a: made.append(a) or image(*a))
    src = bench.split('gallery')
    first = [src[i]['image'] for i in range(len(src))]
    again = src[4]['image']
    assert len(made) == len(src)  # the second read of image 4 made nothing
    np.testing.assert_array_equal(again, image(1, 4 // 3, 2 + 4 % 3))  # gallery: offset 2
    again[:] = 0  # a caller's change stays in its own copy
    np.testing.assert_array_equal(src[4]['image'], first[4])
    monkeypatch.setattr(synthetic_data, 'CACHE_BYTES', 10)
    uncached = bench.split('gallery')
    uncached[4], uncached[4]
    assert len(made) == len(src) + 2
    np.testing.assert_array_equal(uncached[4]['image'], first[4])


def test_synthetic_split_sizes_and_labels():
    bench = SyntheticBenchmark(SyntheticSpec(seed=0, **SMALL))
    train, query, gallery = (bench.split(n) for n in ('train', 'query', 'gallery'))
    assert (train.num_classes, len(train)) == (9, 9 * 4)
    assert (query.num_classes, len(query)) == (6, 6 * 2)
    assert (gallery.num_classes, len(gallery)) == (6, 6 * 3)
    np.testing.assert_array_equal(train.labels, np.repeat(np.arange(9), 4))
    np.testing.assert_array_equal(query.labels, np.repeat(np.arange(6), 2))
    np.testing.assert_array_equal(gallery.labels, np.repeat(np.arange(6), 3))
    for src in (train, query, gallery):
        for i in (0, len(src) - 1):
            rec = src[i]
            assert rec['label'] == src.labels[i] and rec['label'].dtype == np.int32
    np.testing.assert_array_equal(bench.family_of([0, 2, 3, 8]), [0, 0, 1, 2])
    with pytest.raises(ValueError, match='unknown synthetic split'):
        bench.split('test')


def test_query_and_gallery_are_different_images_and_not_training_images():
    bench = SyntheticBenchmark(SyntheticSpec(seed=1, **SMALL))
    q, g, _t = (_images(bench.split(n)).astype(int) for n in ('query', 'gallery', 'train'))
    q_labels, g_labels = bench.split('query').labels, bench.split('gallery').labels
    for c in range(6):
        for qi in q[q_labels == c]:
            for gi in g[g_labels == c]:
                assert np.abs(qi - gi).mean() > 5
    # Query k of class c is test image k; gallery image j is test image queries + j.
    np.testing.assert_array_equal(q[1], bench.image(1, 0, 1))
    np.testing.assert_array_equal(g[0], bench.image(1, 0, 2))
    # Test class 0 is not training class 0.
    assert np.abs(q[0] - bench.image(0, 0, 0)).mean() > 5


@pytest.mark.parametrize('seed', [0, 3])
def test_siblings_are_closer_than_other_families(seed):
    spec = SyntheticSpec(
        seed=seed, image_size=16, train_families=5, siblings_per_family=3, train_images_per_class=6
    )
    train = SyntheticBenchmark(spec).split('train')
    x = _images(train).reshape(len(train), -1).astype(np.float64)
    labels = np.asarray(train.labels)
    family = labels // 3
    dist = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    sibling = (family[:, None] == family[None]) & (labels[:, None] != labels[None])
    other = family[:, None] != family[None]
    assert dist[sibling].mean() < 0.99 * dist[other].mean()
    means = np.stack([x[labels == c].mean(0) for c in range(15)])
    cfam = np.arange(15) // 3
    dm = np.sqrt(((means[:, None] - means[None]) ** 2).sum(-1))
    sib_m = (cfam[:, None] == cfam[None]) & ~np.eye(15, dtype=bool)
    assert dm[sib_m].mean() < 0.95 * dm[cfam[:, None] != cfam[None]].mean()


@pytest.mark.parametrize(
    'bad,match',
    [
        ({'queries_per_class': 0}, 'queries_per_class=0'),
        ({'queries_per_class': 5, 'test_images_per_class': 5}, 'queries_per_class=5'),
        ({'train_families': 0}, 'train_families must be >= 1'),
        ({'image_size': 0}, 'image_size must be >= 1'),
    ],
)
def test_synthetic_spec_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        SyntheticSpec(**bad)


# --------------------------------------------------------------------------- splits


def test_old_split_classes_mode():
    c, per = 20, 3
    labels = np.repeat(np.arange(c), per)
    rng = np.random.default_rng(0)
    labels = labels[rng.permutation(len(labels))]
    s = splits.old_split(labels, c, fraction=0.3, mode='classes', seed=7)
    old_classes = np.flatnonzero(s.old_label >= 0)
    assert len(old_classes) == s.num_old_classes == 6  # floor(0.3 * 20)
    assert s.old_label.dtype == np.int32 and s.old_label.shape == (c,)
    np.testing.assert_array_equal(np.sort(s.old_label[old_classes]), np.arange(6))  # dense
    assert (s.old_label[s.old_label < 0] == -1).all()
    # Indices: exactly the images of the old classes, sorted.
    np.testing.assert_array_equal(s.indices, np.flatnonzero(np.isin(labels, old_classes)))
    assert len(s.indices) == 6 * per

    again = splits.old_split(labels, c, fraction=0.3, mode='classes', seed=7)
    np.testing.assert_array_equal(again.old_label, s.old_label)
    np.testing.assert_array_equal(again.indices, s.indices)
    others = [
        splits.old_split(labels, c, fraction=0.3, mode='classes', seed=k).old_label for k in (8, 9)
    ]
    assert any(not np.array_equal(o, s.old_label) for o in others)


@pytest.mark.parametrize('c,expect', [(7, 2), (40, 12), (3, 1), (1, 1)])
def test_old_split_class_count(c, expect):
    labels = np.arange(c)
    assert (
        splits.old_split(labels, c, fraction=0.3, mode='classes', seed=0).num_old_classes == expect
    )


def test_old_split_images_mode():
    sizes = [10, 1, 2, 7, 3]  # floor(0.3 * n), at least 1: 3, 1, 1, 2, 1
    labels = np.concatenate([np.full(n, k) for k, n in enumerate(sizes)])
    labels = labels[np.random.default_rng(1).permutation(len(labels))]
    s = splits.old_split(labels, 5, fraction=0.3, mode='images', seed=0)
    np.testing.assert_array_equal(s.old_label, np.arange(5))  # every class is old
    assert s.num_old_classes == 5
    assert (np.diff(s.indices) > 0).all()
    np.testing.assert_array_equal(np.bincount(labels[s.indices], minlength=5), [3, 1, 1, 2, 1])
    again = splits.old_split(labels, 5, fraction=0.3, mode='images', seed=0)
    np.testing.assert_array_equal(again.indices, s.indices)
    others = [
        splits.old_split(labels, 5, fraction=0.3, mode='images', seed=k).indices for k in (1, 2)
    ]
    assert any(not np.array_equal(o, s.indices) for o in others)


@pytest.mark.parametrize(
    'kw,match',
    [
        ({'mode': 'families', 'fraction': 0.3}, 'old_split'),
        ({'mode': 'classes', 'fraction': 0.0}, 'old_fraction'),
        ({'mode': 'images', 'fraction': 1.5}, 'old_fraction'),
        ({'mode': 'classes', 'fraction': -0.1}, 'old_fraction'),
    ],
)
def test_old_split_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        splits.old_split(np.arange(4), 4, seed=0, **kw)


def test_relabeled_view():
    src = indexed(6, labels=[0, 1, 2, 0, 1, 2], num_classes=3)
    label_map = np.array([-1, 1, 0], np.int32)
    view = splits.Relabeled(src, np.array([1, 2, 4, 5]), label_map)
    assert len(view) == 4 and view.num_classes == 2
    np.testing.assert_array_equal(view.labels, [1, 0, 1, 0])
    for k, i in enumerate([1, 2, 4, 5]):
        rec = view[k]
        np.testing.assert_array_equal(rec['image'], src.images[i])
        assert rec['label'] == view.labels[k] and rec['label'].dtype == np.int32
    assert src[1]['label'] == 1  # the underlying source is untouched
    with pytest.raises(ValueError, match='outside the label map'):
        splits.Relabeled(src, np.array([0, 1]), label_map)


# --------------------------------------------------------------------------- build


def test_build_synthetic_smoke():
    cfg = synthetic_config.get_config('smoke').data
    d = data.build(cfg)
    # smoke: 4 families x 4 siblings, 8 train images per class; 2 test families, 2 queries of 6.
    assert d.num_classes == 16 and len(d.train) == 16 * 8
    assert [t.name for t in d.tests] == ['synthetic']
    assert len(d.tests[0].query) == 8 * 2 and len(d.tests[0].gallery) == 8 * 4
    assert d.train[0]['image'].shape == (16, 16, 3)
    assert 'synthetic' in d.description
    old = np.flatnonzero(d.old_label >= 0)
    assert len(old) == 4  # floor(0.3 * 16)
    np.testing.assert_array_equal(np.sort(d.old_label[old]), np.arange(4))
    assert len(d.old_train) == 4 * 8 and d.old_train.num_classes == 4
    train_labels = np.asarray(d.train.labels)
    in_old = np.flatnonzero(np.isin(train_labels, old))
    for k in (0, len(d.old_train) - 1):
        rec = d.old_train[k]
        np.testing.assert_array_equal(rec['image'], d.train[in_old[k]]['image'])
        assert rec['label'] == d.old_label[train_labels[in_old[k]]]
    # Same config, same data and split.
    again = data.build(cfg)
    np.testing.assert_array_equal(again.old_label, d.old_label)
    np.testing.assert_array_equal(again.train[5]['image'], d.train[5]['image'])
    # data.split_seed draws another old split of the same data.
    cfg.split_seed = 1
    reseeded = data.build(cfg)
    assert not np.array_equal(reseeded.old_label, d.old_label)
    np.testing.assert_array_equal(reseeded.train[5]['image'], d.train[5]['image'])


def _write_folder(root, classes, per_class, seed):
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True)
        for k in range(per_class):
            arr = rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f'{k}.png')


def test_build_folder(tmp_path):
    _write_folder(tmp_path / 'train', ['a', 'b', 'c', 'd'], 3, 0)
    _write_folder(tmp_path / 'query', ['x', 'y'], 1, 1)
    _write_folder(tmp_path / 'gallery', ['x', 'y', 'z'], 2, 2)
    cfg = synthetic_config.get_config('smoke').data
    cfg.name = 'folder'
    cfg.image_size = 8
    cfg.folder.train_dir = str(tmp_path / 'train')
    cfg.folder.query_dir = str(tmp_path / 'query')
    cfg.folder.gallery_dir = str(tmp_path / 'gallery')
    d = data.build(cfg)
    assert d.num_classes == 4 and len(d.train) == 12
    np.testing.assert_array_equal(d.train.labels, np.repeat(np.arange(4), 3))
    assert d.train[0]['image'].shape == (8, 8, 3)
    # Query and gallery share one label mapping: x=0, y=1, z=2.
    np.testing.assert_array_equal(d.tests[0].query.labels, [0, 1])
    np.testing.assert_array_equal(d.tests[0].gallery.labels, [0, 0, 1, 1, 2, 2])
    assert (d.old_label >= 0).sum() == 1  # floor(0.3 * 4)
    assert len(d.old_train) == 3 and d.old_train.num_classes == 1
    # An 'images' split keeps every class with max(1, floor(0.3 * 3)) = 1 image each.
    cfg.old_split = 'images'
    d = data.build(cfg)
    np.testing.assert_array_equal(d.old_label, np.arange(4))
    np.testing.assert_array_equal(d.old_train.labels, np.arange(4))


def test_build_folder_needs_train_dir():
    cfg = synthetic_config.get_config('smoke').data
    cfg.name = 'folder'
    with pytest.raises(ValueError, match='data.folder.train_dir'):
        data.build(cfg)


def test_build_unknown_name():
    cfg = synthetic_config.get_config('smoke').data
    cfg.name = 'imagenet'
    with pytest.raises(ValueError, match="unknown data.name 'imagenet'"):
        data.build(cfg)


def _folder_cfg(tmp_path):
    _write_folder(tmp_path / 'train', ['a', 'b', 'c', 'd'], 3, 0)
    _write_folder(tmp_path / 'query', ['x', 'y'], 1, 1)
    _write_folder(tmp_path / 'gallery', ['x', 'y', 'z'], 2, 2)
    cfg = synthetic_config.get_config('smoke').data
    cfg.name, cfg.image_size = 'folder', 8
    for split in ('train', 'query', 'gallery'):
        cfg.folder[f'{split}_dir'] = str(tmp_path / split)
    return cfg


def test_fingerprint_is_what_the_training_data_is(tmp_path):
    synthetic = synthetic_config.get_config('smoke').data
    first = data.build(synthetic).fingerprint
    assert len(first) == 16 and int(first, 16) >= 0
    assert data.build(synthetic).fingerprint == first  # the same data, the same digest
    synthetic.synthetic.seed = 1
    assert data.build(synthetic).fingerprint != first  # other images
    synthetic.synthetic.seed, synthetic.split_seed = 0, 1
    assert data.build(synthetic).fingerprint != first  # another old split
    synthetic.split_seed, synthetic.crop_padding = 0, 0
    assert data.build(synthetic).fingerprint != first  # other preprocessing

    cfg = _folder_cfg(tmp_path / 'here')
    digest = data.build(cfg).fingerprint
    (tmp_path / 'moved').mkdir()
    for split in ('train', 'query', 'gallery'):  # the same files elsewhere: the same data
        (tmp_path / 'here' / split).rename(tmp_path / 'moved' / split)
        cfg.folder[f'{split}_dir'] = str(tmp_path / 'moved' / split)
    assert data.build(cfg).fingerprint == digest
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(tmp_path / 'moved/train/b/extra.png')
    assert data.build(cfg).fingerprint != digest  # one file added


def test_single_old_class_warns(tmp_path, caplog):
    cfg = _folder_cfg(tmp_path)  # 4 classes, old_fraction 0.3: one old class
    with caplog.at_level(logging.WARNING):
        d = data.build(cfg)
    assert d.old_train.num_classes == 1
    assert 'single class (3 images of 4 classes' in caplog.text and 'loss 0.0' in caplog.text
    caplog.clear()
    cfg.old_fraction = 0.5
    with caplog.at_level(logging.WARNING):
        data.build(cfg)
    assert 'single class' not in caplog.text


def test_skip_corrupt_is_one_switch_and_lists_the_files(tmp_path):
    cfg = _folder_cfg(tmp_path)
    bad = [tmp_path / 'train' / 'a' / 'bad.png', tmp_path / 'gallery' / 'z' / 'bad.jpg']
    for path in bad:
        path.write_bytes(b'not an image')
    with pytest.raises(ValueError, match=r'bad.png .*data.skip_corrupt=True'):
        data.build(cfg)
    cfg.skip_corrupt = True
    d = data.build(cfg)
    assert d.skipped == [str(p) for p in bad]
    assert len(d.train) == 12 and len(d.tests[0].gallery) == 6
    cfg.folder.skip_corrupt = True  # the old per-folder switch points at the one switch
    with pytest.raises(ValueError, match='now data.skip_corrupt'):
        data.build(cfg)


def test_data_roots_are_checked_up_front_naming_the_field(tmp_path):
    cfg = _folder_cfg(tmp_path)
    cfg.folder.gallery_dir = str(tmp_path / 'nowhere')
    with pytest.raises(FileNotFoundError, match=r"data.folder.gallery_dir='.*nowhere' does not"):
        data.build(cfg)
    gld = synthetic_config.get_config('smoke').data
    gld.name, gld.gldv2.root = 'gldv2', str(tmp_path / 'train')
    with pytest.raises(FileNotFoundError, match=r'train_clean.csv.*data.gldv2.csv'):
        data.build(gld)
    gld.gldv2.root = str(tmp_path / 'nowhere')
    with pytest.raises(FileNotFoundError, match='data.gldv2.root'):
        data.build(gld)
    shop = synthetic_config.get_config('smoke').data
    shop.name, shop.inshop.root = 'inshop', str(tmp_path / 'nowhere')
    with pytest.raises(FileNotFoundError, match='data.inshop.root'):
        data.build(shop)


# --------------------------------------------------------------------------- validation split


def test_validation_classes_one_per_family():
    groups = np.repeat(np.arange(100), 10)
    held = splits.validation_classes(1000, fraction=0.1, seed=0, groups=groups)
    assert len(held) == 100 and np.all(np.diff(held) > 0)
    np.testing.assert_array_equal(np.sort(groups[held]), np.arange(100))  # one of each family
    again = splits.validation_classes(1000, fraction=0.1, seed=0, groups=groups)
    np.testing.assert_array_equal(held, again)  # one fixed draw
    other = splits.validation_classes(1000, fraction=0.1, seed=1, groups=groups)
    assert not np.array_equal(held, other)
    ungrouped = splits.validation_classes(50, fraction=0.2, seed=0)
    assert len(ungrouped) == 10 and len(set(ungrouped.tolist())) == 10


@pytest.mark.parametrize('fraction', [0.0, 1.0, -0.1])
def test_validation_fraction_outside_the_range_is_refused(fraction):
    with pytest.raises(ValueError, match='validation_fraction'):
        splits.validation_classes(10, fraction=fraction, seed=0)


def test_validation_split_holds_out_training_classes_and_never_a_test_class():
    cfg = synthetic_config.get_config('smoke').data
    full = data.build(cfg)
    cfg.validation_fraction = 0.25  # one of each family's 4 siblings
    d = data.build(cfg)
    bench = SyntheticBenchmark(SyntheticSpec(image_size=16, **cfg.synthetic.to_dict()))
    held = np.asarray(d.validation_classes)
    assert len(held) == 4 and sorted(bench.family_of(held)) == [0, 1, 2, 3]
    # Both models train on the other 12 classes, re-numbered; the test classes are not scored.
    assert d.num_classes == 12 and len(d.train) == 12 * 8
    assert [t.name for t in d.tests] == ['validation']
    test = d.tests[0]
    # The held-out images search each other.
    assert test.gallery is None and len(test.query) == 4 * 8
    kept = np.setdiff1d(np.arange(16), held)
    training = {bench.image(0, int(c), i).tobytes() for c in kept for i in range(8)}
    held_images = {bench.image(0, int(c), i).tobytes() for c in held for i in range(8)}
    test = full.tests[0]
    test_images = {im.tobytes() for s in (test.query, test.gallery) for im in _images(s)}
    test = d.tests[0]
    validation = [test.query[k] for k in range(len(test.query))]
    assert {r['image'].tobytes() for r in validation} == held_images
    assert not held_images & test_images and not held_images & training
    assert {im.tobytes() for im in _images(d.train)} == training
    for r in validation:  # label k is the k-th held-out class
        own = {bench.image(0, int(held[r['label']]), i).tobytes() for i in range(8)}
        assert r['image'].tobytes() in own
    assert d.old_train.num_classes == 3  # floor(0.3 · 12) of the classes trained on
    assert d.fingerprint != full.fingerprint


def test_validation_split_keeps_a_recorded_old_split_on_the_kept_classes():
    cfg = synthetic_config.get_config('smoke').data
    parts = data.DatasetParts(
        train=SyntheticBenchmark(SyntheticSpec(image_size=16, **cfg.synthetic.to_dict())).split(
            'train'
        ),
        tests=[],
        description='synthetic',
        old_split=splits.old_split(
            np.repeat(np.arange(16), 8), 16, fraction=0.5, mode='classes', seed=0
        ),
    )
    held_parts, held = data.hold_out(parts, 0.25, 0)
    old_classes = np.flatnonzero(parts.old_split.old_label >= 0)
    kept = np.setdiff1d(np.arange(16), held)
    new_old = held_parts.old_split
    # The old classes that were not held out, in the kept classes' numbering, renumbered densely.
    want = np.flatnonzero(np.isin(kept, old_classes))
    np.testing.assert_array_equal(np.flatnonzero(new_old.old_label >= 0), want)
    np.testing.assert_array_equal(new_old.old_label[want], np.arange(len(want)))
    labels = np.asarray(held_parts.train.labels)
    assert set(labels[new_old.indices].tolist()) == set(want.tolist())
    assert len(new_old.indices) == 8 * len(want)
