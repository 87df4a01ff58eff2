"""Input pipeline (grain): deterministic shuffling, augmentation, per-host sharding, batches.

A training stream is a pure function of (source, seed, position): its state is just the
position (`{'next_index': batches read}`), so a checkpoint that stores it resumes on exactly the
next batch, with any number of decoding threads or worker processes. Each host reads its own
slice of every global batch; `to_global` assembles the host-local arrays into one array sharded
over the mesh.

Augmentations (`Augment`, data.augment):

- 'pad_crop' (default): the source's evaluation image, reflect-padded by crop_padding and
  cropped back at a random offset, and flipped (CIFAR-style; the built-in benchmark's).
- 'random_crop': a random image_size square of the image decoded with its shorter side at
  data.train_resize_size (PrunNet's GLDv2 training: Resize(256), RandomCrop(224), flip).
- 'random_resized_crop': the Inception crop (Szegedy et al., "Going deeper with convolutions",
  2015; torchvision's RandomResizedCrop): a box of a random fraction of the area (scale, default
  0.08-1) and random aspect ratio (log-uniform in ratio, default 3/4-4/3), resized to
  image_size, from the image decoded with its shorter side at data.train_resize_size.

Decoding in worker processes (data.workers > 0, grain's `mp_prefetch`) takes JPEG decoding
off the training process; 0 keeps today's threads (data.num_threads).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import grain
import jax
import numpy as np
from absl import flags
from PIL import Image

AUGMENTS = ('pad_crop', 'random_crop', 'random_resized_crop')
_DATA_AXIS = jax.sharding.PartitionSpec('data')


def check_source(source, what: str):
    """Stops early, with the name of the dataset, on a source that cannot be trained on."""
    if len(source) == 0:
        raise ValueError(f'{what}: the dataset is empty')
    counts = np.bincount(np.asarray(source.labels), minlength=source.num_classes)
    if (counts == 0).any():
        empty = np.flatnonzero(counts == 0)[:10].tolist()
        raise ValueError(
            f'{what}: classes {empty} have no images; every class needs at least one '
            '(remove the class or add images)'
        )


@dataclasses.dataclass(frozen=True)
class Augment:
    """A training augmentation: `kind` (one of AUGMENTS), then a random horizontal flip.

    crop_padding: pad_crop's reflect padding. image_size: the random crops' output side.
    scale, ratio: random_resized_crop's area fraction and aspect ratio (width / height) ranges.
    """

    kind: str = 'pad_crop'
    crop_padding: int = 0
    flip: bool = False
    image_size: int = 0
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __post_init__(self):
        if self.kind not in AUGMENTS:
            raise ValueError(f'data.augment={self.kind!r} is not one of {AUGMENTS}.')
        if self.kind != 'pad_crop' and self.image_size < 1:
            raise ValueError(f'augment {self.kind!r} needs image_size >= 1.')
        low, high = self.scale
        if not 0 < low <= high <= 1:
            raise ValueError(f'data.rrc_scale={self.scale} must satisfy 0 < low <= high <= 1.')
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f'data.rrc_ratio={self.ratio} must satisfy 0 < low <= high.')

    @classmethod
    def from_config(cls, cfg) -> Augment:
        """data.augment ('pad_crop'), data.crop_padding, data.flip, data.image_size,
        data.rrc_scale ((0.08, 1.0)), data.rrc_ratio ((3/4, 4/3))."""
        return cls(
            kind=cfg.get('augment', 'pad_crop'),
            crop_padding=int(cfg.get('crop_padding', 0)),
            flip=bool(cfg.get('flip', False)),
            image_size=int(cfg.image_size),
            scale=tuple(float(v) for v in cfg.get('rrc_scale', (0.08, 1.0))),
            ratio=tuple(float(v) for v in cfg.get('rrc_ratio', (3 / 4, 4 / 3))),
        )

    @property
    def active(self) -> bool:
        return self.kind != 'pad_crop' or bool(self.crop_padding) or self.flip

    def describe(self) -> str:
        flip = ', flip' if self.flip else ''
        if self.kind == 'pad_crop':
            return f'train: pad {self.crop_padding} and crop{flip}'
        if self.kind == 'random_crop':
            return f'train: random {self.image_size}x{self.image_size} crop{flip}'
        return (
            f'train: random-resized crop to {self.image_size} (scale {self.scale[0]:g}-'
            f'{self.scale[1]:g}, ratio {self.ratio[0]:.3g}-{self.ratio[1]:.3g}){flip}'
        )


def _flip(image: np.ndarray, rng: np.random.Generator, flip: bool) -> np.ndarray:
    return image[:, ::-1] if flip and rng.random() < 0.5 else image


@functools.lru_cache(maxsize=256)
def _reflected(n: int, shift: int) -> np.ndarray:
    """The source index of each of n positions shifted by `shift` on an axis of length n
    reflect-padded as np.pad's mode='reflect' does (edge not repeated), for |shift| < n."""
    k = np.abs(np.arange(n) + shift)
    return np.where(k > n - 1, 2 * (n - 1) - k, k)


def _pad_crop(record: dict, rng: np.random.Generator, *, crop_padding: int, flip: bool) -> dict:
    """Reflect-pad by `crop_padding`, crop back at a random offset, flip at random: one gather
    of the image's pixels (what np.pad, a slice and a reversal give, with the same draws)."""
    image, p = record['image'], crop_padding
    h, w = image.shape[:2]
    if p >= min(h, w):  # beyond one reflection: np.pad's own rule
        padded = np.pad(image, ((p, p), (p, p), (0, 0)), mode='reflect')
        y, x = rng.integers(0, 2 * p + 1, size=2)
        image = np.ascontiguousarray(_flip(padded[y : y + h, x : x + w], rng, flip))
        return {'image': image, 'label': record['label']}
    rows, cols = np.arange(h), np.arange(w)
    if p:
        y, x = rng.integers(0, 2 * p + 1, size=2)
        rows, cols = _reflected(h, int(y) - p), _reflected(w, int(x) - p)
    if flip and rng.random() < 0.5:
        cols = cols[::-1]
    return {'image': image[rows[:, None], cols[None, :]], 'label': record['label']}


def _random_crop(record: dict, rng: np.random.Generator, *, augment: Augment) -> dict:
    image, size = record['image'], augment.image_size
    h, w = image.shape[:2]
    if h < size or w < size:
        raise ValueError(
            f'random_crop: a {w}x{h} training image is smaller than the {size}x{size} crop; '
            'set data.train_resize_size >= data.image_size.'
        )
    y, x = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
    image = _flip(image[y : y + size, x : x + size], rng, augment.flip)
    return {'image': np.ascontiguousarray(image), 'label': record['label']}


def resized_crop_box(
    height: int, width: int, rng: np.random.Generator, scale, ratio
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of an Inception crop: up to 10 draws of an area fraction uniform in
    `scale` and an aspect ratio w/h log-uniform in `ratio`, the first that fits the image
    placed uniformly; otherwise the largest central box with the ratio clamped to `ratio`."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _random_resized_crop(record: dict, rng: np.random.Generator, *, augment: Augment) -> dict:
    image = record['image']
    top, left, h, w = resized_crop_box(*image.shape[:2], rng, augment.scale, augment.ratio)
    size = augment.image_size
    crop = Image.fromarray(image).resize(
        (size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h)
    )
    image = _flip(np.asarray(crop, np.uint8), rng, augment.flip)
    return {'image': np.ascontiguousarray(image), 'label': record['label']}


class TrainImages:
    """The source's training records: `train_item` (the image uncropped, for random crops) where
    the source has it, else its evaluation image."""

    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        item = getattr(self.source, 'train_item', None)
        return item(index) if item is not None else self.source[index]


def local_batch_size(global_batch: int) -> int:
    hosts = jax.process_count()
    if global_batch % jax.device_count():
        raise ValueError(
            f'batch size {global_batch} is not divisible by the {jax.device_count()} '
            'devices; choose a multiple of the device count'
        )
    return global_batch // hosts


class TrainStream:
    """An endless iterator of host-local batches whose state is its position.

    `get_state()` is `{'next_index': batches read}`; `set_state` restarts the pipeline there
    (the batches are a pure function of the position, so the restart is exact). `workers` > 0
    decodes in that many processes (grain `mp_prefetch`), each with `num_threads` threads.
    """

    def __init__(self, batches: grain.MapDataset, *, num_threads: int, workers: int):
        self._batches, self._threads, self._workers = batches, num_threads, int(workers)
        self._position, self._iterator = 0, None

    def _start(self):
        options = grain.ReadOptions(num_threads=self._threads, prefetch_buffer_size=4)
        ds = self._batches[self._position :].to_iter_dataset(options)
        if self._workers:
            if not flags.FLAGS.is_parsed():  # grain reads its absl flags in the workers
                flags.FLAGS.mark_as_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._workers))
        self._iterator = iter(ds)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._iterator is None:
            self._start()
        batch = next(self._iterator)
        self._position += 1
        return batch

    def get_state(self) -> dict:
        return {'next_index': self._position}

    def set_state(self, state: dict) -> None:
        self.close()
        self._position = int(state['next_index'])

    def close(self) -> None:
        """Stops the worker processes, if any (they also stop when the stream is collected)."""
        if self._iterator is not None and hasattr(self._iterator, 'close'):
            self._iterator.close()
        self._iterator = None


def train_stream(
    source,
    *,
    global_batch: int,
    seed: int,
    crop_padding: int = 0,
    flip: bool = False,
    num_threads: int = 2,
    augment: Augment | None = None,
    workers: int = 0,
) -> TrainStream:
    """An endless, reshuffled-every-epoch, augmented stream of host-local batches.

    `augment` (default: pad_crop with `crop_padding` and `flip`) chooses the augmentation;
    `workers` the decoding processes (0: `num_threads` threads in this process). Returns a
    `TrainStream` with get_state()/set_state() for checkpoints.
    """
    augment = augment or Augment(crop_padding=crop_padding, flip=flip)
    if augment.kind == 'pad_crop':
        ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat(None)
        transform = functools.partial(
            _pad_crop, crop_padding=augment.crop_padding, flip=augment.flip
        )
    else:
        ds = grain.MapDataset.source(TrainImages(source)).seed(seed).shuffle().repeat(None)
        crop = _random_crop if augment.kind == 'random_crop' else _random_resized_crop
        transform = functools.partial(crop, augment=augment)
    if augment.active:  # keyed by the global position: the same on any number of hosts
        ds = ds.random_map(transform)
    # Host h reads the h-th slice of every global batch, so that the global batch is the same
    # run of examples, in the same order, on 1 host or many.
    ds = ds.batch(local_batch_size(global_batch), drop_remainder=True)
    ds = ds[jax.process_index() :: jax.process_count()]
    return TrainStream(ds, num_threads=num_threads, workers=workers)


def eval_batches(source, *, global_batch: int, num_threads: int = 2):
    """One ordered pass in host-local batches, the last one padded; yields (batch, valid_mask)."""
    local = local_batch_size(global_batch)
    n = len(source)
    num_batches = -(-n // global_batch)
    offset = jax.process_index() * local

    def load(b):
        rows = [b * global_batch + offset + i for i in range(local)]
        records = [source[min(r, n - 1)] for r in rows]
        batch = {k: np.stack([rec[k] for rec in records]) for k in ('image', 'label')}
        return batch, np.array([r < n for r in rows])

    ds = grain.MapDataset.range(num_batches).map(load)
    yield from ds.to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=4)
    )


def to_global(tree, mesh, spec=_DATA_AXIS):
    """Host-local numpy arrays -> global jax arrays sharded over the mesh's data axis."""
    sharding = jax.sharding.NamedSharding(mesh, spec)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), tree)
