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
