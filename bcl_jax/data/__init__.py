"""Datasets: the built-in synthetic benchmark, image folders, GLDv2, In-shop, SOP/CUB/Cars,
the Revisited Oxford/Paris tests, old/new splits and the input pipeline.

`build(data_cfg, workdir)` gives every stage what it reads: the new training set (all classes),
the old model's share of it, and the retrieval tests, each with the protocol that scores it
exactly as the published tables do (method.md §7). Each dataset module builds its own sources
and tests (`<module>.build(cfg, workdir) -> DatasetParts`); `BUILDERS` maps data.name to the
module, imported only when a config names it (tfds, for one, is slow to import).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json

import numpy as np
from absl import logging

from bcl_jax.data import content, images, pipeline, splits
from bcl_jax.data.dataset import DatasetParts, RetrievalTest, label_test

__all__ = ['BUILDERS', 'NAMES', 'Data', 'DatasetParts', 'RetrievalTest', 'build', 'label_test']

# data.name -> the module of bcl_jax.data whose build(cfg, workdir) makes that dataset.
BUILDERS = {
    'synthetic': 'synthetic',
    'folder': 'folder',
    'gldv2': 'gldv2',
    'inshop': 'inshop',
    'sop': 'tfds_sources',
    'cub': 'tfds_sources',
    'cars': 'tfds_sources',
}
NAMES = tuple(BUILDERS)


@dataclasses.dataclass
class Data:
    train: object  # the new model's training set: all classes
    old_train: object  # the old model's share, labels re-numbered over old classes
    old_label: object  # (num_classes,) new label -> old label, -1 if not an old class
    tests: list[RetrievalTest]
    num_classes: int
    description: str
    # What the training data is: a hex digest of the training images' identities, labels,
    # preprocessing and old split, and for folder datasets their bytes (data.fingerprint): a
    # rerun on other data must not reuse trained models. A string, or a function giving it when
    # first asked for (`fingerprint`), so that commands that train nothing read no image.
    _fingerprint: object = dataclasses.field(default='', repr=False)
    skipped: list[str] = dataclasses.field(default_factory=list)  # unreadable files left out
    # The training classes held out as the validation split (labels of the whole training set).
    validation_classes: list[int] = dataclasses.field(default_factory=list)

    @property
    def fingerprint(self) -> str:
        if callable(self._fingerprint):
            self._fingerprint = self._fingerprint()
        return self._fingerprint


def build(cfg, workdir: str | None = None) -> Data:
    """The training set, the old model's share and the retrieval tests of `data_cfg`.

    `workdir`: where a freshly drawn GLDv2 old split is saved when data.gldv2.split_file is ''.
    """
    if cfg.name not in BUILDERS:
        raise ValueError(f'unknown data.name {cfg.name!r}; use one of {NAMES}')
    module = importlib.import_module(f'bcl_jax.data.{BUILDERS[cfg.name]}')
    parts: DatasetParts = module.build(cfg, workdir)
    held_out = []
    if cfg.validation_fraction:
        parts, held_out = hold_out(parts, cfg.validation_fraction, cfg.validation_seed)
    train, split = parts.train, parts.old_split
    if split is None:
        split = splits.old_split(
            train.labels,
            train.num_classes,
            fraction=cfg.old_fraction,
            mode=cfg.old_split,
            seed=cfg.split_seed,
        )
    _warn_single_old_class(split, train)
    old_train = splits.Relabeled(train, split.indices, split.old_label)
    return Data(
        train=train,
        old_train=old_train,
        old_label=np.asarray(split.old_label),
        tests=parts.tests,
        num_classes=train.num_classes,
        description=parts.description + _describe_preprocessing(cfg),
        _fingerprint=_fingerprint_fn(cfg, parts, split, workdir),
        skipped=[p for source in parts.sources() for p in getattr(source, 'skipped', ())],
        validation_classes=held_out,
    )


def hold_out(parts: DatasetParts, fraction: float, seed: int) -> tuple[DatasetParts, list[int]]:
    """The validation split (method.md §11): `splits.validation_classes` of the training set
    are held out; the old and new models train on the rest (labels re-numbered densely), and the
    only retrieval test is within the held-out classes (each of their training images a query
    against the others). The dataset's own tests, the test classes, are not used at all.
    Returns the parts and the held-out classes (labels of the full training set)."""
    train = parts.train
    c, labels = train.num_classes, np.asarray(train.labels)
    held = splits.validation_classes(c, fraction=fraction, seed=seed, groups=parts.class_groups)
    keep = np.setdiff1d(np.arange(c), held)
    to_train, to_validation = _dense_labels(keep, c), _dense_labels(held, c)
    kept = np.flatnonzero(to_train[labels] >= 0)
    validation = splits.Relabeled(train, np.flatnonzero(to_validation[labels] >= 0), to_validation)
    old_split = parts.old_split
    if old_split is not None:  # a recorded old split: its images and classes among the kept
        position = np.full(len(labels), -1)
        position[kept] = np.arange(len(kept))
        indices = position[old_split.indices]
        old_classes = np.flatnonzero(old_split.old_label[keep] >= 0)
        old_label = _dense_labels(old_classes, len(keep))
        old_split = splits.OldSplit(indices=indices[indices >= 0], old_label=old_label)
    test = label_test(
        'validation', validation, protocol='label mAP and Recall@K within the held-out classes'
    )
    record = {'fraction': fraction, 'seed': seed, 'classes': held.tolist()}
    parts = dataclasses.replace(
        parts,
        train=splits.Relabeled(train, kept, to_train),
        tests=[test],
        old_split=old_split,
        identity={**parts.identity, 'validation': record},
        description=f'{parts.description}, validation: {len(held)} held-out training classes',
        class_groups=None,
    )
    return parts, held.tolist()


def _dense_labels(classes: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes,) int32: a label's position among the sorted `classes`, -1 elsewhere."""
    out = np.full(num_classes, -1, np.int32)
    out[classes] = np.arange(len(classes), dtype=np.int32)
    return out


def preprocessing(cfg) -> dict:
    """Everything in the data config that changes the pixels models see, for the fingerprint."""
    return {
        **dataclasses.asdict(images.preprocess_from_config(cfg)),
        **dataclasses.asdict(pipeline.Augment.from_config(cfg)),
    }


def _describe_preprocessing(cfg) -> str:
    """'' for the default preprocessing (so default descriptions stay as they were), else what
    evaluation and training do to the images."""
    preprocess, augment = images.preprocess_from_config(cfg), pipeline.Augment.from_config(cfg)
    if preprocess == images.Preprocess(preprocess.image_size) and augment.kind == 'pad_crop':
        return ''
    return f' [{preprocess.describe()}; {augment.describe()}]'


def _fingerprint_fn(cfg, parts: DatasetParts, split, workdir: str | None):
    """A function giving `fingerprint` of the data, with the digest of the training images'
    bytes (bcl_jax.data.content) for a folder dataset read from its files with
    data.fingerprint='content' (the synthetic benchmark is generated from its spec, the other
    datasets are identified by their ids, and 'names' leaves the bytes out). The settings are
    read now, the images only when the fingerprint is first asked for."""
    mode = cfg.get('fingerprint', 'content')
    if mode not in content.MODES:
        raise ValueError(f'data.fingerprint={mode!r}: use one of {content.MODES}')
    paths = getattr(parts.train, 'paths', None)
    by_content = mode == 'content' and cfg.name == 'folder' and not cfg.prepared
    by_content = by_content and paths is not None
    pre, threads = preprocessing(cfg), cfg.num_threads
    digest = lambda: content.images_digest(paths, cache_dir=workdir, threads=threads)
    return lambda: fingerprint(parts, split, pre, content=digest() if by_content else None)


def fingerprint(
    parts: DatasetParts, split: splits.OldSplit, preprocessing: dict, content: str | None = None
) -> str:
    """16 hex digits of sha256 over what the training data is: the dataset's identity (e.g. the
    synthetic spec), each training image's id (path relative to the root, GLDv2 id, ...) and
    label, the preprocessing, the old split (indices and old labels) and, when given, `content`:
    the digest of the training images' bytes (`_content`). Without it arrays are hashed, not
    images, so it is cheap at any scale; where the data lives never enters."""
    train = parts.train
    digest = hashlib.sha256()

    def add(tag: str, data: bytes):
        digest.update(f'{tag}:{len(data)}:'.encode() + data)

    identity = {**getattr(train, 'identity', {}), **parts.identity}
    add('identity', json.dumps(identity, sort_keys=True, default=str).encode())
    ids = getattr(train, 'ids', None)
    add('ids', '\n'.join(ids).encode() if ids is not None else str(len(train)).encode())
    add('labels', np.asarray(train.labels, np.int64).tobytes())
    add('num_classes', str(int(train.num_classes)).encode())
    add('preprocessing', json.dumps(preprocessing, sort_keys=True).encode())
    add('old_indices', np.asarray(split.indices, np.int64).tobytes())
    add('old_label', np.asarray(split.old_label, np.int64).tobytes())
    if content is not None:  # absent: the digest of the ids alone, as before content entered
        add('content', content.encode())
    return digest.hexdigest()[:16]


def _warn_single_old_class(split: splits.OldSplit, train) -> None:
    if split.num_old_classes == 1:
        logging.warning(
            'The old split has a single class (%d images of %d classes in the training set, '
            'old_fraction and old_split as configured): the old model would train to loss 0.0 '
            'and learn nothing to retrieve with. Raise data.old_fraction or use more classes.',
            len(split.indices),
            train.num_classes,
        )
