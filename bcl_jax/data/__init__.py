"""Datasets: the built-in synthetic benchmark, image folders, GLDv2, In-shop, SOP/CUB/Cars,
the Revisited Oxford/Paris tests, old/new splits and the input pipeline.

`build(data_cfg, workdir)` gives every stage what it reads: the new training set (all classes),
the old model's share of it, and the retrieval tests, each with the protocol that scores it
exactly as the published tables do (METHOD.md §7). Each dataset module builds its own sources
and tests (`<module>.build(cfg, workdir) -> DatasetParts`); `BUILDERS` maps data.name to the
module, imported only when a config names it (tfds, for one, is slow to import).
"""

from __future__ import annotations

import dataclasses
import importlib

import numpy as np

from bcl_jax.data import splits
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


def build(cfg, workdir: str | None = None) -> Data:
    """The training set, the old model's share and the retrieval tests of `data_cfg`.

    `workdir`: where a freshly drawn GLDv2 old split is saved when data.gldv2.split_file is ''.
    """
    if cfg.name not in BUILDERS:
        raise ValueError(f'unknown data.name {cfg.name!r}; use one of {NAMES}')
    module = importlib.import_module(f'bcl_jax.data.{BUILDERS[cfg.name]}')
    parts: DatasetParts = module.build(cfg, workdir)
    train, split = parts.train, parts.old_split
    if split is None:
        split = splits.old_split(
            train.labels,
            train.num_classes,
            fraction=cfg.old_fraction,
            mode=cfg.old_split,
            seed=cfg.split_seed,
        )
    old_train = splits.Relabeled(train, split.indices, split.old_label)
    return Data(
        train=train,
        old_train=old_train,
        old_label=np.asarray(split.old_label),
        tests=parts.tests,
        num_classes=train.num_classes,
        description=parts.description,
    )
