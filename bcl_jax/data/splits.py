"""Old/new training splits: the old model sees a fraction of the classes or of each class's images.

The new model trains on everything; the old model on `fraction` of it, drawn with a recorded seed.
The old model's classifier has one output per *old* class, so old labels are re-numbered densely;
`old_label` maps a new-split label to its old label, or -1 for classes the old model never saw.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

MODES = ('classes', 'images')


@dataclasses.dataclass(frozen=True)
class OldSplit:
    indices: np.ndarray  # indices into the full training source, sorted
    old_label: np.ndarray  # (num_classes,) int32: new label -> old label, -1 if not an old class

    @property
    def num_old_classes(self) -> int:
        return int((self.old_label >= 0).sum())


def share(fraction: float, count: int) -> int:
    """floor(fraction · count), at least 1: 30% of GLDv2's 81,313 classes is 24,393, as published.
    The epsilon keeps products such as 0.29 · 100 = 28.999… at 29."""
    return max(1, math.floor(fraction * count + 1e-9))


def old_split(
    labels: np.ndarray, num_classes: int, *, fraction: float, mode: str, seed: int
) -> OldSplit:
    """Draws the old model's share of the training set; the same arguments give the same split."""
    if mode not in MODES:
        raise ValueError(f'data.old_split={mode!r} is not one of {MODES}')
    if not 0 < fraction <= 1:
        raise ValueError(f'data.old_fraction={fraction} must be in (0, 1]')
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    if mode == 'classes':
        n_old = share(fraction, num_classes)
        old_classes = np.sort(rng.choice(num_classes, size=n_old, replace=False))
        indices = np.flatnonzero(np.isin(labels, old_classes))
        old_label = np.full(num_classes, -1, np.int32)
        old_label[old_classes] = np.arange(n_old, dtype=np.int32)
    else:
        chosen = []
        for c in range(num_classes):
            members = np.flatnonzero(labels == c)
            n = share(fraction, len(members))
            chosen.append(rng.choice(members, size=n, replace=False))
        indices = np.sort(np.concatenate(chosen))
        old_label = np.arange(num_classes, dtype=np.int32)
    return OldSplit(indices=indices, old_label=old_label)


class Relabeled:
    """A view of `source` restricted to `indices` with labels mapped through `label_map`."""

    def __init__(self, source, indices: np.ndarray, label_map: np.ndarray):
        self._source, self._indices, self._map = source, np.asarray(indices), np.asarray(label_map)
        self.labels = self._map[np.asarray(source.labels)[self._indices]]
        if (self.labels < 0).any():
            raise ValueError('Relabeled: an index maps to a class outside the label map')
        self.num_classes = int(self._map.max()) + 1
        ids = getattr(source, 'ids', None)
        if ids is not None:  # the images' identities, for the data fingerprint
            self.ids = [ids[i] for i in self._indices]
        paths = getattr(source, 'paths', None)
        if paths is not None:  # the image files, for the fingerprint of their bytes
            self.paths = [paths[i] for i in self._indices]

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index: int) -> dict:
        return self._relabel(self._source[int(self._indices[int(index)])])

    def train_item(self, index: int) -> dict:
        """The source's training record (`train_item`, else its item), relabeled."""
        item = getattr(self._source, 'train_item', self._source.__getitem__)
        return self._relabel(item(int(self._indices[int(index)])))

    def _relabel(self, record: dict) -> dict:
        record = dict(record)
        record['label'] = np.int32(self._map[record['label']])
        return record


def validation_classes(
    num_classes: int, *, fraction: float, seed: int, groups: np.ndarray | None = None
) -> np.ndarray:
    """The training classes held out for selecting hyperparameters (method.md §11), sorted:
    `share(fraction, n)` of each group's n classes (`groups`: (num_classes,) group ids, e.g. the
    synthetic benchmark's families, one sibling of 10 each at fraction 0.1), or of all classes
    when no groups are given. The same arguments give the same classes."""
    if not 0 < fraction < 1:
        raise ValueError(f'data.validation_fraction={fraction} must be in (0, 1) to hold out')
    rng = np.random.default_rng([seed, 1])  # a stream of its own, apart from the old split's
    groups = np.zeros(num_classes, np.int64) if groups is None else np.asarray(groups)
    if groups.shape != (num_classes,):
        raise ValueError(f'groups has shape {groups.shape}, not ({num_classes},)')
    held = []
    for g in np.unique(groups):
        members = np.flatnonzero(groups == g)
        held.append(rng.choice(members, size=share(fraction, len(members)), replace=False))
    held = np.sort(np.concatenate(held))
    if num_classes - len(held) < 2:
        raise ValueError(
            f'data.validation_fraction={fraction} leaves {num_classes - len(held)} of '
            f'{num_classes} classes to train on; lower it'
        )
    return held
