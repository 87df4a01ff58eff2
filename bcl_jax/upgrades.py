"""Sequential upgrades (method.md §10): φ_1 (the old model) → φ_2 → φ_3 … in one run.

`config.upgrades` lists the models after the old one, in order, each a dict:

    fraction: the share of the training classes it sees (growing: the old model's share, then
        more; every class set holds the previous one);
    method:   the method (or variant, bcl_jax.methods) it is trained with against its
        predecessor's prototypes (default 'bct');
    model, train: fields of `new.model` and `new.train` to change for it (e.g. a wider net).

Each upgrade is a stage like the others (its folder is its name; it resumes, and refuses other
settings), trained on its classes against a `Reference` made of its predecessor and the
predecessor's prototypes of the upgrade's classes. Class sets are nested: the old model's classes
first, then the other classes in an order drawn once with `data.split_seed`. Only class splits
(`data.old_split='classes'`) nest this way.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from bcl_jax import methods, prototypes, sharding, train
from bcl_jax import stage as stage_lib
from bcl_jax.data import splits


@dataclasses.dataclass(frozen=True)
class Upgrade:
    """One model of the chain: its name, classes (sorted class ids) and settings."""

    name: str
    classes: np.ndarray
    method: str
    config: object  # the run's config with the method's variant and this model's fields set
    fraction: float = 1.0  # config.upgrades.<name>.fraction, named in its fingerprint


def class_order(old_label: np.ndarray, seed: int) -> np.ndarray:
    """Every class id, the old model's classes first (in label order), then the rest in an
    order drawn with `seed`: the first n of it are the classes of a model that sees n."""
    old = np.flatnonzero(old_label >= 0)
    old = old[np.argsort(old_label[old])]
    rest = np.flatnonzero(old_label < 0)
    rest = rest[np.random.default_rng([seed, 10]).permutation(len(rest))]
    return np.concatenate([old, rest])


def plan(config, old_label: np.ndarray) -> list[Upgrade]:
    """The upgrades of `config`, with their class sets, checked before any work."""
    if not config.upgrades:
        return []
    if config.data.old_split != 'classes':
        raise ValueError(
            "config.upgrades needs data.old_split='classes': upgrades grow the set of classes"
        )
    order = class_order(old_label, config.data.split_seed)
    num_classes, seen, out = len(old_label), int((old_label >= 0).sum()), []
    for name, spec in config.upgrades.items():
        count = splits.share(spec.fraction, num_classes) if spec.fraction < 1 else num_classes
        if count <= seen:
            raise ValueError(
                f'config.upgrades.{name}.fraction={spec.fraction}: {count} classes, not more '
                f'than the {seen} of the model before it; fractions must grow'
            )
        method = spec.get('method', 'bct')
        _, cfg = methods.resolve(config, method)
        cfg = cfg.copy_and_resolve_references()
        for group in ('model', 'train'):
            for field, value in (spec.get(group) or {}).items():
                cfg.new[group][field] = value
        out.append(Upgrade(name, np.sort(order[:count]), method, cfg, float(spec.fraction)))
        seen = count
    return out


def _subset(data, classes: np.ndarray):
    """(source, label_of_class) of the training images of `classes`, labels 0..n-1 in class
    order; label_of_class (C,) maps a class id to its label there, -1 outside."""
    label_of = np.full(data.num_classes, -1, np.int32)
    label_of[classes] = np.arange(len(classes), dtype=np.int32)
    indices = np.flatnonzero(label_of[np.asarray(data.train.labels)] >= 0)
    return splits.Relabeled(data.train, indices, label_of), label_of


def _stage(up: Upgrade, source, reference, data) -> stage_lib.Stage:
    method = methods.build(up.method, up.config)
    c = method.config
    sections = ('seed', 'data', 'new.model', 'new.train') + method.config_sections
    bank = sharding.to_host(reference.prototypes)[: source.num_classes]
    fingerprint = dict(
        stage_lib.config_fingerprint(c, sections),
        method=type(method).name,
        data_identity=stage_lib.data_identity(data),
        classes=stage_lib.array_digest(up.classes),
        **{f'upgrades.{up.name}.fraction': up.fraction},  # what the classes' digest stands for
        old_model=reference.old.identity(),
        prototypes=stage_lib.array_digest(bank),
    )
    return stage_lib.Stage(
        name=up.name,
        model_cfg=c.new.model,
        train_cfg=c.new.train,
        source=source,
        num_classes=source.num_classes,
        seed=c.seed + 1,
        method=method,
        fingerprint=fingerprint,
    )


def run(config, data, old, *, mesh, workdir: str) -> dict:
    """Trains (or resumes, or loads) every upgrade after `old`; {name: Trained}, in order."""
    chain, previous = {}, ('old', old, np.asarray(data.old_label))
    for up in plan(config, np.asarray(data.old_label)):
        source, label_of = _subset(data, up.classes)
        prev_name, prev_model, prev_label_of = previous
        kw = dict(workdir=workdir, mesh=mesh, batch_size=config.eval.batch_size)
        identity = stage_lib.data_identity(data) + stage_lib.array_digest(up.classes)
        bank = prototypes.old_bank(
            prev_model,
            source,
            num_classes=source.num_classes,
            data_identity=identity,
            name=f'{prev_name}_for_{up.name}',
            retrain=config.on_change == 'retrain',
            **kw,
        )
        old_label = prev_label_of[up.classes]  # this model's label -> its predecessor's
        stats = {}
        if methods.build(up.method, config).needs_class_stats:
            stats = prototypes.class_statistics(
                prev_model, source, bank, old_label, mesh=mesh, batch_size=config.eval.batch_size
            )
        reference = stage_lib.Reference(prev_model, bank, old_label, stats)
        stage = _stage(up, source, reference, data)
        chain[up.name] = train.train(stage, reference, config=up.config, mesh=mesh, workdir=workdir)
        previous = (up.name, chain[up.name], label_of)
    return chain
