"""Tests for bcl_jax.data.pipeline: shuffled epochs, augmentations (pad-and-crop, random crops,
random-resized crops), resume from the position, worker processes, evaluation batches."""

import json

import numpy as np
import pytest
from fake_datasets import ArraySource, indexed

from bcl_jax import data
from bcl_jax.data import pipeline, splits
from configs import synthetic as synthetic_config

# --------------------------------------------------------------------------- pipeline


def _take(it, k):
    return [next(it) for _ in range(k)]


def test_train_stream_epochs_without_augmentation():
    src = indexed(24)
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
    it = pipeline.train_stream(indexed(20), global_batch=8, seed=3)
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
    src = indexed(16, size=8)
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
    src = indexed(20, size=8)
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
    src = indexed(21)
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
    out = list(pipeline.eval_batches(indexed(16), global_batch=8))
    assert len(out) == 2 and all(v.all() for _, v in out)


def test_check_source_errors():
    pipeline.check_source(indexed(4, labels=[0, 1, 2, 1], num_classes=3), 'ok')
    with pytest.raises(ValueError, match='old training set: the dataset is empty'):
        pipeline.check_source(indexed(0, labels=[], num_classes=3), 'old training set')
    with pytest.raises(ValueError, match=r'new training set: classes \[1, 3\] have no images'):
        pipeline.check_source(indexed(3, labels=[0, 2, 2], num_classes=4), 'new training set')


def test_local_batch_size():
    assert pipeline.local_batch_size(16) == 16  # one process holds all 8 devices
    with pytest.raises(ValueError, match='batch size 12 is not divisible by the 8 devices'):
        pipeline.local_batch_size(12)
    with pytest.raises(ValueError, match='not divisible'):
        pipeline.train_stream(indexed(8), global_batch=4, seed=0)


# --------------------------------------------------------------------------- augmentations


class _TrainSource(ArraySource):
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
    src = indexed(16, size=8)
    old = pipeline.train_stream(src, global_batch=8, seed=3, crop_padding=2, flip=True)
    augment = pipeline.Augment('pad_crop', crop_padding=2, flip=True)
    new = pipeline.train_stream(src, global_batch=8, seed=3, augment=augment)
    for a, b in zip(_take(old, 4), _take(new, 4)):
        np.testing.assert_array_equal(a['image'], b['image'])


@pytest.mark.parametrize('padding, size', [(0, 6), (2, 6), (5, 6), (6, 6), (9, 5)])
def test_pad_crop_is_np_pad_reflect_then_a_crop_and_a_flip(padding, size):
    """The pad-crop-flip against its definition (np.pad mode='reflect', a slice, a reversal),
    drawn from the same generator: every offset and both flips, one reflection or several."""
    image = np.random.default_rng(0).integers(0, 256, (size, size + 1, 3), dtype=np.uint8)
    seen, combinations = set(), (2 * padding + 1) ** 2 * 2
    for seed in range(20 * combinations):
        got = pipeline._pad_crop(
            {'image': image, 'label': 1},
            np.random.default_rng(seed),
            crop_padding=padding,
            flip=True,
        )['image']
        rng = np.random.default_rng(seed)
        padded = np.pad(image, ((padding,) * 2, (padding,) * 2, (0, 0)), mode='reflect')
        y, x = rng.integers(0, 2 * padding + 1, size=2) if padding else (0, 0)
        want = padded[y : y + size, x : x + size + 1]
        flipped = rng.random() < 0.5
        want = want[:, ::-1] if flipped else want
        np.testing.assert_array_equal(got, want)
        assert got.flags.c_contiguous
        seen.add((int(y), int(x), flipped))
    assert len(seen) == combinations


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
    src = indexed(24, size=8)
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
