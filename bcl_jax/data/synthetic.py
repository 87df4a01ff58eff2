"""The built-in benchmark: procedurally generated fine-grained image classes.

Every image is made on the fly from (seed, split, index); nothing is stored or downloaded, so
anyone can run the whole bcl_jax pipeline in minutes on a laptop.

How classes are made. A shared vocabulary of smooth colour patterns (random low-frequency
gratings, the "bases") is drawn from the seed. Classes come in *families* of `siblings_per_family`
classes. A family has a strong family pattern (a random mix of the coarse bases); each sibling
adds a weak pattern of its own (a random mix of the fine bases) scaled by `sibling_scale`. So
siblings share most of their appearance and differ by a faint detail: a model that has not been
trained to separate a family's siblings puts them close together, which is the crowding of old
prototypes that prototype perturbation is about. Every image then gets a random translation, a
random gain, an image-specific nuisance pattern (`nuisance_scale`) and pixel noise
(`noise_scale`), so that a class is a distribution rather than one picture.

Difficulty. `sibling_scale` sets how close siblings are (smaller: closer, harder);
`nuisance_scale` and `noise_scale` set the intra-class spread. Test classes are new siblings
(`test_siblings_per_family` per family) of the training families: classes that no model has
seen, disjoint from the training classes, in the categories the models were trained on — as a
product-search gallery gets new products of known kinds. Retrieving them needs the fine features
that separate siblings, which a weak old model trained on few classes lacks.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from bcl_jax.data.dataset import DatasetParts, label_test

_TRAIN, _TEST = 0, 1


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    """Everything that defines the benchmark; the same spec always gives the same images."""

    seed: int = 0
    image_size: int = 16
    train_families: int = 100
    siblings_per_family: int = 10
    test_siblings_per_family: int = 2
    train_images_per_class: int = 10
    test_images_per_class: int = 10
    queries_per_class: int = 3
    coarse_bases: int = 24
    fine_bases: int = 24
    sibling_scale: float = 0.25
    nuisance_scale: float = 0.5
    noise_scale: float = 0.2
    max_shift: int = 3

    def __post_init__(self):
        if not 0 < self.queries_per_class < self.test_images_per_class:
            raise ValueError(
                f'queries_per_class={self.queries_per_class} must be between 1 and '
                f'test_images_per_class-1={self.test_images_per_class - 1} so that every test class '
                'has both queries and gallery images.'
            )
        for name in (
            'train_families',
            'test_siblings_per_family',
            'siblings_per_family',
            'train_images_per_class',
            'coarse_bases',
            'fine_bases',
            'image_size',
        ):
            if getattr(self, name) < 1:
                raise ValueError(f'synthetic data: {name} must be >= 1, got {getattr(self, name)}')


def _gratings(rng: np.random.Generator, count: int, size: int, max_freq: float) -> np.ndarray:
    """`count` smooth random colour patterns (count, size*size*3), each a sum of 3 gratings."""
    yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing='ij')
    out = np.zeros((count, size, size, 3))
    for _ in range(3):
        # Integer frequencies keep the patterns periodic, so a translation (np.roll) has no seam.
        fy = rng.integers(-max_freq, max_freq + 1, size=(count, 1, 1))
        fx = rng.integers(-max_freq, max_freq + 1, size=(count, 1, 1))
        phase = rng.uniform(0, 2 * np.pi, size=(count, 1, 1))
        wave = np.cos(2 * np.pi * (fy * yy + fx * xx) / size + phase)
        colour = rng.normal(size=(count, 1, 1, 3))
        out += wave[..., None] * colour
    out /= np.sqrt((out**2).mean(axis=(1, 2, 3), keepdims=True)) + 1e-8
    return out.reshape(count, -1).astype(np.float32)


class SyntheticBenchmark:
    """Class codes and bases for one spec; `split(...)` gives grain-compatible sources."""

    def __init__(self, spec: SyntheticSpec):
        self.spec = spec
        rng = np.random.default_rng([spec.seed, 1234])
        self.coarse = _gratings(rng, spec.coarse_bases, spec.image_size, max_freq=3)
        self.fine = _gratings(rng, spec.fine_bases, spec.image_size, max_freq=6)
        self.nuisance = _gratings(rng, spec.coarse_bases, spec.image_size, max_freq=4)
        family = (
            rng.normal(size=(spec.train_families, spec.coarse_bases)) / np.sqrt(spec.coarse_bases)
        ) @ self.coarse
        self.patterns = {
            _TRAIN: self._sibling_patterns(rng, family, spec.siblings_per_family),
            _TEST: self._sibling_patterns(rng, family, spec.test_siblings_per_family),
        }

    def _sibling_patterns(self, rng, family, siblings):
        """(families * siblings, pixels): each family's pattern plus a faint pattern per sibling."""
        s = self.spec
        codes = rng.normal(size=(len(family), siblings, s.fine_bases)) / np.sqrt(s.fine_bases)
        pattern = family[:, None] + s.sibling_scale * (codes @ self.fine)
        return pattern.reshape(len(family) * siblings, -1).astype(np.float32)

    @property
    def num_train_classes(self) -> int:
        return self.spec.train_families * self.spec.siblings_per_family

    @property
    def num_test_classes(self) -> int:
        return self.spec.train_families * self.spec.test_siblings_per_family

    def family_of(self, label, split: str = 'train'):
        """Family index of a class label of a split: siblings share it."""
        per_family = (
            self.spec.siblings_per_family
            if split == 'train'
            else self.spec.test_siblings_per_family
        )
        return np.asarray(label) // per_family

    def image(self, split: int, label: int, index: int) -> np.ndarray:
        """The uint8 (size, size, 3) image number `index` of class `label`; pure in its arguments."""
        s = self.spec
        rng = np.random.default_rng([s.seed, split, label, index])
        code = rng.normal(size=s.coarse_bases) / np.sqrt(s.coarse_bases)
        x = self.patterns[split][label] + s.nuisance_scale * (code @ self.nuisance)
        x = x.reshape(s.image_size, s.image_size, 3) * rng.uniform(0.7, 1.3)
        x = x + s.noise_scale * rng.normal(size=x.shape)
        shift = rng.integers(-s.max_shift, s.max_shift + 1, size=2)
        x = np.roll(x, tuple(shift), axis=(0, 1))
        return np.clip(128 + 40 * x, 0, 255).astype(np.uint8)

    def split(self, name: str) -> SyntheticSource:
        """'train' (all training classes), 'query' or 'gallery' (disjoint test classes)."""
        s = self.spec
        if name == 'train':
            per_class, offset, split = s.train_images_per_class, 0, _TRAIN
        elif name == 'query':
            per_class, offset, split = s.queries_per_class, 0, _TEST
        elif name == 'gallery':
            per_class = s.test_images_per_class - s.queries_per_class
            offset, split = s.queries_per_class, _TEST
        else:
            raise ValueError(f"unknown synthetic split {name!r}: use 'train', 'query' or 'gallery'")
        classes = self.num_train_classes if split == _TRAIN else self.num_test_classes
        return SyntheticSource(self, split, classes, per_class, offset)


# Images kept after they are first made, up to this many bytes per source (the built-in
# benchmark's training set is 7.7 MB): making one costs ~6x its augmentation, once per epoch.
CACHE_BYTES = 1 << 30


class SyntheticSource:
    """Random-access source of {'image', 'label'} records (the grain source protocol). Each
    image is made once, on first access, and kept (`CACHE_BYTES`): images are pure functions
    of their index, so the cache changes no number."""

    def __init__(
        self, bench: SyntheticBenchmark, split: int, num_classes: int, per_class: int, offset: int
    ):
        self._bench, self._split = bench, split
        self._per_class, self._offset = per_class, offset
        self.num_classes = num_classes
        self.labels = np.repeat(np.arange(num_classes, dtype=np.int32), per_class)
        size = bench.spec.image_size
        shape = (len(self.labels), size, size, 3)
        self._cache = np.zeros(shape, np.uint8) if np.prod(shape) <= CACHE_BYTES else None
        self._made = np.zeros(len(self.labels), bool)  # threads may make an image twice: alike

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        label, within = divmod(index, self._per_class)
        if self._cache is None:
            image = self._bench.image(self._split, label, self._offset + within)
        else:
            if not self._made[index]:
                self._cache[index] = self._bench.image(self._split, label, self._offset + within)
                self._made[index] = True
            image = self._cache[index].copy()  # a record of its own, as before the cache
        return {'image': image, 'label': np.int32(label)}

    def __repr__(self):
        return (
            f'SyntheticSource(split={self._split}, classes={self.num_classes}, images={len(self)})'
        )


def build(cfg, workdir: str | None) -> DatasetParts:
    """The built-in benchmark of data.synthetic at data.image_size: its training classes, and
    its unseen sibling classes as query and gallery (label mAP and Recall@K)."""
    del workdir  # Nothing is stored: every image is made from the spec.
    bench = SyntheticBenchmark(SyntheticSpec(image_size=cfg.image_size, **cfg.synthetic.to_dict()))
    test = label_test('synthetic', bench.split('query'), bench.split('gallery'))
    return DatasetParts(
        train=bench.split('train'),
        tests=[test],
        description=f'synthetic (seed {cfg.synthetic.seed})',
        identity={'synthetic': dataclasses.asdict(bench.spec)},
        class_groups=bench.family_of(np.arange(bench.num_train_classes)),
    )
