"""Sequential upgrades (method.md §10): φ_1 (the old model) → φ_2 → φ_3 … in one run.

`config.upgrades` lists the models after the old one, in order, each a dict:

    fraction: the share of the training classes it sees (growing: the old model's share, then
        more; every class set holds the previous one);
    method:   the method (or variant, bcl_jax.methods) it is trained with against its
        predecessor's prototypes (default 'bct');
    model, train: fields of `new.model` and `new.train` to change for it (e.g. a wider net).

Each upgrade is a stage like the others (its folder is its name; it resumes, and refuses other
settings), trained on its classes against a `Reference` made of its predecessor and the
predecessor's prototypes of the upgrade's classes (bcl_jax.plan builds both; main trains them).
Class sets are nested: the old model's classes first, then the other classes in an order drawn
once with `data.split_seed`. Only class splits (`data.old_split='classes'`) nest this way.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from bcl_jax import methods
from bcl_jax.data import splits


@dataclasses.dataclass(frozen=True)
class Upgrade:
    """One model of the chain: its name, classes (sorted class ids) and settings."""

    name: str
    classes: np.ndarray
    method: methods.Method  # its config: the run's, with the variant and this model's fields set
    fraction: float = 1.0  # config.upgrades.<name>.fraction, named in its fingerprint

    @property
    def config(self):
        return self.method.config


def class_order(old_label: np.ndarray, seed: int) -> np.ndarray:
    """Every class id, the old model's classes first (in label order), then the rest in an
    order drawn with `seed`: the first n of it are the classes of a model that sees n."""
    old = np.flatnonzero(old_label >= 0)
    old = old[np.argsort(old_label[old])]
    rest = np.flatnonzero(old_label < 0)
    rest = rest[np.random.default_rng([seed, 10]).permutation(len(rest))]
    return np.concatenate([old, rest])


def methods_of(config) -> dict:
    """upgrade name -> its Method: `method` (a method or variant, default 'bct') on the run's
    config with the upgrade's `model` and `train` fields set under `new`."""
    out = {}
    for name, spec in (config.get('upgrades') or {}).items():
        changes = {
            f'new.{group}.{field}': value
            for group in ('model', 'train')
            for field, value in (spec.get(group) or {}).items()
        }
        out[name] = methods.build(spec.get('method', 'bct'), config, changes)
    return out


def plan(config, old_label: np.ndarray) -> list[Upgrade]:
    """The upgrades of `config`, with their class sets, checked before any work."""
    if not config.upgrades:
        return []
    if config.data.old_split != 'classes':
        raise ValueError(
            "config.upgrades needs data.old_split='classes': upgrades grow the set of classes"
        )
    order, built = class_order(old_label, config.data.split_seed), methods_of(config)
    num_classes, seen, out = len(old_label), int((old_label >= 0).sum()), []
    for name, spec in config.upgrades.items():
        count = splits.share(spec.fraction, num_classes) if spec.fraction < 1 else num_classes
        if count <= seen:
            raise ValueError(
                f'config.upgrades.{name}.fraction={spec.fraction}: {count} classes, not more '
                f'than the {seen} of the model before it; fractions must grow'
            )
        method = built[name]
        out.append(Upgrade(name, np.sort(order[:count]), method, float(spec.fraction)))
        seen = count
    return out


def subset(data, classes: np.ndarray):
    """(source, label_of_class) of the training images of `classes`, labels 0..n-1 in class
    order; label_of_class (C,) maps a class id to its label there, -1 outside."""
    label_of = np.full(data.num_classes, -1, np.int32)
    label_of[classes] = np.arange(len(classes), dtype=np.int32)
    indices = np.flatnonzero(label_of[np.asarray(data.train.labels)] >= 0)
    return splits.Relabeled(data.train, indices, label_of), label_of
