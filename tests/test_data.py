"""Tests for bcl_jax.data: the synthetic benchmark, old/new splits, the grain pipeline, build()."""

import json
import logging

import numpy as np
import pytest
from PIL import Image

from bcl_jax import data
from bcl_jax.data import pipeline, splits
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


class _ArraySource:
    """A random-access source over arrays; label i of image i unless labels are given."""

    def __init__(self, images, labels, num_classes):
        self.images, self.num_classes = images, num_classes
        self.labels = np.asarray(labels, np.int32)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {'image': self.images[int(i)], 'label': self.labels[int(i)]}


def _indexed(n, size=6, num_classes=None, labels=None):
    rng = np.random.default_rng(n)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    if labels is None:
        labels = np.arange(n)
    return _ArraySource(images, labels, num_classes or n)


def test_relabeled_view():
    src = _indexed(6, labels=[0, 1, 2, 0, 1, 2], num_classes=3)
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


# --------------------------------------------------------------------------- pipeline


def _take(it, k):
    return [next(it) for _ in range(k)]


def test_train_stream_epochs_without_augmentation():
    src = _indexed(24)
    it = pipeline.train_stream(src, global_batch=8, seed=0)
    batches = _take(it, 9)  # 3 epochs of 3 batches
    for b in batches:
        assert b['image'].shape == (8, 6, 6, 3) and b['label'].shape == (8,)
    labels = np.concatenate([b['label'] for b in batches])
    epochs = labels.reshape(3, 24)
    for e in epochs:
        np.testing.assert_array_equal(np.sort(e), np.arange(24))  # each example once per epoch
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    assert not np.array_equal(epochs[0], np.arange(24))  # shuffled
    for b in batches:  # without augmentation the images are the source's, untouched
        np.testing.assert_array_equal(b['image'], src.images[b['label']])

    same = np.concatenate(
        [b['label'] for b in _take(pipeline.train_stream(src, global_batch=8, seed=0), 9)]
    )
    np.testing.assert_array_equal(same, labels)
    other = np.concatenate(
        [b['label'] for b in _take(pipeline.train_stream(src, global_batch=8, seed=1), 9)]
    )
    assert not np.array_equal(other, labels)


def test_train_stream_epochs_straddle_batches():
    # 20 examples, batch 8: the stream is still one permutation per 20 examples.
    it = pipeline.train_stream(_indexed(20), global_batch=8, seed=3)
    labels = np.concatenate([b['label'] for b in _take(it, 5)])
    for e in labels.reshape(2, 20):
        np.testing.assert_array_equal(np.sort(e), np.arange(20))


def _is_augmentation_of(out, img, pad):
    """True if `out` is a crop of the reflect-padded `img`, maybe mirrored left-right."""
    h, w = img.shape[:2]
    padded = np.pad(img, ((pad, pad), (pad, pad), (0, 0)), mode='reflect')
    for y in range(2 * pad + 1):
        for x in range(2 * pad + 1):
            window = padded[y : y + h, x : x + w]
            if np.array_equal(out, window) or np.array_equal(out, window[:, ::-1]):
                return True
    return False


def test_train_stream_augmentation():
    src = _indexed(16, size=8)
    it = pipeline.train_stream(src, global_batch=8, seed=0, crop_padding=2, flip=True)
    identical = 0
    for b in _take(it, 6):
        assert b['image'].shape == (8, 8, 8, 3) and b['image'].dtype == np.uint8
        assert b['label'].dtype == np.int32
        for out, i in zip(b['image'], b['label']):
            assert _is_augmentation_of(out, src.images[i], 2)
            identical += np.array_equal(out, src.images[i])
    assert identical < 48 // 2  # most crops move or flip the image
    # Flip only: each output is the image or its mirror, and both happen.
    it = pipeline.train_stream(src, global_batch=8, seed=0, flip=True)
    flipped = []
    for b in _take(it, 4):
        for out, i in zip(b['image'], b['label']):
            same = np.array_equal(out, src.images[i])
            assert same or np.array_equal(out, src.images[i][:, ::-1])
            flipped.append(not same)
    assert 0 < sum(flipped) < len(flipped)


def test_train_stream_resumes_on_the_next_batch():
    src = _indexed(20, size=8)
    kw = {'global_batch': 8, 'seed': 4, 'crop_padding': 2, 'flip': True}
    it = pipeline.train_stream(src, **kw)
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # as a checkpoint stores it
    expected = _take(it, 4)
    resumed = pipeline.train_stream(src, **kw)
    resumed.set_state(state)
    got = _take(resumed, 4)
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a['label'], b['label'])
        np.testing.assert_array_equal(a['image'], b['image'])
    # A fresh iterator does not start there: the check above can fail.
    fresh = next(pipeline.train_stream(src, **kw))
    assert not np.array_equal(fresh['label'], expected[0]['label'])


def test_eval_batches_cover_every_example_in_order():
    src = _indexed(21)
    out = list(pipeline.eval_batches(src, global_batch=8))
    assert len(out) == 3
    for batch, valid in out:
        assert batch['image'].shape == (8, 6, 6, 3) and valid.shape == (8,)
        assert valid.dtype == bool
    valid = np.concatenate([v for _, v in out])
    np.testing.assert_array_equal(valid, np.arange(24) < 21)
    labels = np.concatenate([b['label'] for b, _ in out])
    images = np.concatenate([b['image'] for b, _ in out])
    np.testing.assert_array_equal(labels[valid], np.arange(21))
    np.testing.assert_array_equal(images[valid], src.images)
    # Exact multiple: no padding at all.
    out = list(pipeline.eval_batches(_indexed(16), global_batch=8))
    assert len(out) == 2 and all(v.all() for _, v in out)


def test_check_source_errors():
    pipeline.check_source(_indexed(4, labels=[0, 1, 2, 1], num_classes=3), 'ok')
    with pytest.raises(ValueError, match='old training set: the dataset is empty'):
        pipeline.check_source(_indexed(0, labels=[], num_classes=3), 'old training set')
    with pytest.raises(ValueError, match=r'new training set: classes \[1, 3\] have no images'):
        pipeline.check_source(_indexed(3, labels=[0, 2, 2], num_classes=4), 'new training set')


def test_local_batch_size():
    assert pipeline.local_batch_size(16) == 16  # one process holds all 8 devices
    with pytest.raises(ValueError, match='batch size 12 is not divisible by the 8 devices'):
        pipeline.local_batch_size(12)
    with pytest.raises(ValueError, match='not divisible'):
        pipeline.train_stream(_indexed(8), global_batch=4, seed=0)


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


# --------------------------------------------------------------------------- augmentations


class _TrainSource(_ArraySource):
    """`train_item` gives a larger, uncropped image (as file sources do); items are unused."""

    def __init__(self, train_images):
        super().__init__(train_images, np.arange(len(train_images)), len(train_images))
        self.train_images = train_images

    def __getitem__(self, i):
        raise AssertionError('random crops must read train_item')

    def train_item(self, i):
        return {'image': self.train_images[int(i)], 'label': self.labels[int(i)]}


def test_random_crop_is_a_window_of_the_training_image():
    images = np.random.default_rng(0).integers(0, 256, (8, 12, 15, 3), dtype=np.uint8)
    augment = pipeline.Augment('random_crop', flip=True, image_size=8)
    it = pipeline.train_stream(_TrainSource(images), global_batch=8, seed=0, augment=augment)
    offsets, flips = set(), 0
    for batch in _take(it, 4):
        assert batch['image'].shape == (8, 8, 8, 3)
        for out, i in zip(batch['image'], batch['label']):
            image = images[i]
            found = [
                (y, x, mirrored)
                for y in range(5)
                for x in range(8)
                for mirrored in (False, True)
                if np.array_equal(out, image[y : y + 8, x : x + 8][:, :: -1 if mirrored else 1])
            ]
            assert len(found) == 1
            offsets.add(found[0][:2])
            flips += found[0][2]
    assert len(offsets) > 10 and 0 < flips < 32


def _recovered_box(out, size):
    """(left, top, w, h, flipped) of the crop that `out` was resized from, read off the ramps
    R = 2x, G = 3y of the training image: bilinear resampling keeps a linear ramp linear, and
    output pixel j's centre samples x = left + (j + 0.5) w / size (pixel k's centre is k + 0.5)."""
    r = out[size // 2, :, 0].astype(float) / 2
    g = out[:, size // 2, 1].astype(float) / 3
    flipped = r[0] > r[-1]
    r = r[::-1] if flipped else r
    w, h = ((v[-1] - v[0]) * size / (size - 1) for v in (r, g))
    return r[0] + 0.5 - 0.5 * w / size, g[0] + 0.5 - 0.5 * h / size, w, h, flipped


def test_random_resized_crop_area_and_aspect():
    height, width, size = 64, 96, 16
    yy, xx = np.mgrid[0:height, 0:width]
    ramp = np.stack([2 * xx, 3 * yy, np.zeros_like(xx)], axis=-1).astype(np.uint8)
    augment = pipeline.Augment('random_resized_crop', flip=True, image_size=size)
    source = _TrainSource(np.stack([ramp] * 16))
    fractions, aspects, flips = [], [], 0
    for batch in _take(pipeline.train_stream(source, global_batch=8, seed=0, augment=augment), 8):
        for out in batch['image']:
            left, top, w, h, flipped = _recovered_box(out, size)
            assert -1.5 <= left and left + w <= width + 1.5 and -1.5 <= top <= height
            fractions.append(w * h / (width * height))
            aspects.append(w / h)
            flips += flipped
    fractions, aspects = np.array(fractions), np.array(aspects)
    # Box sides are read to about a pixel: bounds with that slack.
    assert fractions.min() > 0.08 * 0.75 and fractions.max() < 1.05
    assert aspects.min() > 0.75 * 0.85 and aspects.max() < 4 / 3 * 1.15
    assert fractions.min() < 0.3 and fractions.max() > 0.6  # the whole range is drawn
    assert 0 < flips < 64


def test_resized_crop_box_bounds_and_fallback():
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = pipeline.resized_crop_box(30, 50, rng, (0.08, 1.0), (3 / 4, 4 / 3))
        assert 0 <= top and top + h <= 30 and 0 <= left and left + w <= 50
        # Rounded sides of a drawn box: area and ratio within the ranges up to that rounding.
        assert 0.08 * 1500 - (h + w) <= h * w and 0.75 - 1 / h <= w / h <= 4 / 3 + 1 / h
    # No box of ratio >= 3/4 with 8% of a 2x100 image fits in it: the central, ratio-clamped box.
    # h = round(2 / (3/4)) = 3, top = (100 - 3) // 2 = 48.
    assert pipeline.resized_crop_box(100, 2, rng, (0.08, 1.0), (3 / 4, 4 / 3)) == (48, 0, 3, 2)


def test_pad_crop_augment_is_the_default_stream():
    """Augment('pad_crop') is the stream train_stream(crop_padding=, flip=) gives: the same
    batches, so the built-in benchmark's inputs do not move."""
    src = _indexed(16, size=8)
    old = pipeline.train_stream(src, global_batch=8, seed=3, crop_padding=2, flip=True)
    augment = pipeline.Augment('pad_crop', crop_padding=2, flip=True)
    new = pipeline.train_stream(src, global_batch=8, seed=3, augment=augment)
    for a, b in zip(_take(old, 4), _take(new, 4)):
        np.testing.assert_array_equal(a['image'], b['image'])


def test_augment_from_config_description_and_fingerprint():
    cfg = synthetic_config.get_config('smoke').data
    default = data.build(cfg)
    assert default.description == 'synthetic (seed 0)'  # unchanged for the defaults
    cfg.augment, cfg.rrc_scale = 'random_resized_crop', (0.25, 1.0)
    augment = pipeline.Augment.from_config(cfg)
    assert (augment.kind, augment.scale, augment.image_size) == (
        'random_resized_crop',
        (0.25, 1.0),
        16,
    )
    built = data.build(cfg)
    assert 'random-resized crop to 16 (scale 0.25-1' in built.description
    assert built.fingerprint != default.fingerprint
    cfg.augment = 'mixup'
    with pytest.raises(ValueError, match="data.augment='mixup'"):
        pipeline.Augment.from_config(cfg)


def test_relabeled_train_item():
    images = np.random.default_rng(1).integers(0, 256, (6, 10, 11, 3), dtype=np.uint8)
    source = _TrainSource(images)
    source.labels = np.array([0, 1, 2, 0, 1, 2], np.int32)
    view = splits.Relabeled(source, np.array([1, 2, 4]), np.array([-1, 1, 0], np.int32))
    record = view.train_item(2)
    np.testing.assert_array_equal(record['image'], images[4])
    assert record['label'] == 1


def test_worker_processes_give_the_same_stream_and_resume_exactly():
    """data.workers decodes in grain worker processes: the batches are those of the threaded
    stream, and a state saved from one resumes the other on exactly the next batch."""
    src = _indexed(24, size=8)
    kw = {'global_batch': 8, 'seed': 5, 'crop_padding': 2, 'flip': True}
    threads = pipeline.train_stream(src, **kw)
    expected = _take(threads, 5)
    state = json.loads(json.dumps(threads.get_state()))
    assert state == {'next_index': 5}
    workers = pipeline.train_stream(src, workers=2, **kw)
    workers.set_state({'next_index': 2})  # a threaded stream's state, resumed by workers
    try:
        for want in expected[2:4]:
            batch = next(workers)
            np.testing.assert_array_equal(batch['image'], want['image'])
            np.testing.assert_array_equal(batch['label'], want['label'])
        resumed_state = workers.get_state()
    finally:
        workers.close()
    assert resumed_state == {'next_index': 4}
    threads.set_state(resumed_state)  # and back
    np.testing.assert_array_equal(next(threads)['image'], expected[4]['image'])
