"""A run's plan, built once from its config and data: every stage with its resolved settings,
the loop options, and the references they train against.

`plan(config, data)` resolves each method (and variant) of `config.methods` and each upgrade
(bcl_jax.upgrades) once; `bcl_jax.validate` checks the plan, `bcl_jax.main` walks it:

    old = plan.old_model(p, mesh=..., workdir=...)           # given, or trained (`old_stage`)
    ref = plan.reference(p, old, mesh=..., workdir=...)      # its prototypes of the new classes
    for name in p.methods: train.train(plan.new_stage(p, name, ref), ref, p.loop, ...)
    then each upgrade: `upgrade_reference` and `upgrade_stage` against the model before it.

A new model's stage needs its reference (its fingerprint names the old model and prototypes it
trained against), so stages are made from the plan as the run reaches them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from bcl_jax import fingerprint, methods, prototypes, sharding, train, upgrades
from bcl_jax.old_embeddings import GivenEmbeddings
from bcl_jax.stage import Reference, Stage, Trained


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a run trains: `methods` (name -> Method, its resolved config on it), in order, and
    `upgrades` (bcl_jax.upgrades.Upgrade, in order), with the loop options they share."""

    config: Any
    data: Any
    loop: train.Loop
    methods: dict
    upgrades: tuple

    @property
    def data_identity(self) -> str:
        return fingerprint.data_identity(self.data)


def methods_of(config) -> dict:
    """name -> Method of every new model of `config.methods` (a method or a variant of one,
    bcl_jax.methods), each with its own resolved config: the one place methods are resolved."""
    return {name: methods.build(name, config) for name in config.methods}


def plan(config, data) -> Plan:
    """The run of `config` on `data`; upgrades' class sets are drawn here (ValueError: bad ones)."""
    chain = upgrades.plan(config, np.asarray(data.old_label))
    return Plan(config, data, train.Loop.from_config(config), methods_of(config), tuple(chain))


# --------------------------------------------------------------------------------- the old model


def old_stage(p: Plan) -> Stage:
    """The old model's stage: trained alone (no compatibility term) on the old split."""
    config, data = p.config, p.data
    sections = ('seed', 'data', 'old.model', 'old.train')
    stamp = dict(fingerprint.config_fingerprint(config, sections), data_identity=p.data_identity)
    return Stage(
        name='old',
        model_cfg=config.old.model,
        train_cfg=config.old.train,
        source=data.old_train,
        num_classes=data.old_train.num_classes,
        seed=config.seed,
        method=methods.build('independent', config),
        fingerprint=stamp,
    )


def old_model(p: Plan, *, mesh, workdir: str) -> Trained | GivenEmbeddings:
    """The old model: its embedding files (`config.old.embeddings`), loaded from
    `config.old.checkpoint`, or trained on the old split."""
    old, data = p.config.old, p.data
    if old.embeddings:
        return GivenEmbeddings.for_data(old.embeddings, data)
    if old.checkpoint:
        return train.load(
            old.checkpoint,
            old.model,
            data.old_train.num_classes,
            mesh,
            shard_classes=p.loop.shard_classes,
            allow_unfinished=old.allow_unfinished,
        )
    return train.train(old_stage(p), None, p.loop, mesh=mesh, workdir=workdir)


# ---------------------------------------------------------------------------------- references


def _reference(p: Plan, old, source, old_label, *, name: str, identity: str, stats: bool, **kw):
    """`old` with its prototypes of `source`'s classes (stored as prototypes/<name>.npy and
    reused while the old model and the data are the same), and its per-class statistics when
    `stats` (stored beside them, <name>_stats.npz)."""
    kw.update(data_identity=identity, name=name, retrain=p.loop.retrain)
    bank = prototypes.old_bank(old, source, num_classes=source.num_classes, **kw)
    statistics = {}
    if stats:
        statistics = prototypes.old_class_statistics(old, source, bank, old_label, **kw)
    return Reference(old, bank, old_label, statistics)


def reference(p: Plan, old, *, mesh, workdir: str) -> Reference:
    """What the new models of `config.methods` train against: the old model and its prototypes
    of every class of the new training set (and class statistics, when a method asks)."""
    stats = any(m.needs_class_stats for m in p.methods.values())
    kw = dict(workdir=workdir, mesh=mesh, batch_size=p.config.eval.batch_size)
    data = p.data
    return _reference(
        p, old, data.train, data.old_label, name='old', identity=p.data_identity, stats=stats, **kw
    )


def upgrade_reference(p: Plan, up, before, model_before, *, mesh, workdir: str) -> Reference:
    """What upgrade `up` trains against: the model before it (`before`, the upgrade that made
    `model_before`, None for the old model) with its prototypes of the upgrade's classes."""
    if before is None:
        prev_name, prev_label_of = 'old', np.asarray(p.data.old_label)
    else:
        prev_name, (_, prev_label_of) = before.name, upgrades.subset(p.data, before.classes)
    source, _ = upgrades.subset(p.data, up.classes)
    identity = p.data_identity + fingerprint.array_digest(up.classes)
    kw = dict(workdir=workdir, mesh=mesh, batch_size=p.config.eval.batch_size)
    old_label = prev_label_of[up.classes]  # this model's label -> its predecessor's
    name = f'{prev_name}_for_{up.name}'
    stats = up.method.needs_class_stats
    return _reference(
        p, model_before, source, old_label, name=name, identity=identity, stats=stats, **kw
    )


# ---------------------------------------------------------------------------------- new models


def _new_model_stage(p: Plan, name: str, method, source, reference, **identity) -> Stage:
    """A new model trained with `method` on `source` against `reference`. Every new model of a
    run starts from the same initialisation and reads the data in the same order (seed + 1), so
    methods are compared paired by seed."""
    c = method.config  # with the variant's (and the upgrade's) settings
    sections = ('seed', 'data', 'new.model', 'new.train') + method.config_sections
    stamp = dict(
        fingerprint.config_fingerprint(c, sections),
        method=type(method).name,
        data_identity=p.data_identity,
        **identity,
    )
    if method.needs_reference and reference is not None:
        bank = sharding.to_host(reference.prototypes)[: source.num_classes]
        stamp.update(old_model=reference.old.identity(), prototypes=fingerprint.array_digest(bank))
    return Stage(
        name=name,
        model_cfg=c.new.model,
        train_cfg=c.new.train,
        source=source,
        num_classes=source.num_classes,
        seed=c.seed + 1,
        method=method,
        fingerprint=stamp,
    )


def new_stage(p: Plan, name: str, reference: Reference | None) -> Stage:
    """The new model of method (or variant) `name`, trained on all classes against `reference`."""
    return _new_model_stage(p, f'new_{name}', p.methods[name], p.data.train, reference)


def upgrade_stage(p: Plan, up, reference: Reference) -> Stage:
    """Upgrade `up`, trained on its classes against the model before it (`upgrade_reference`)."""
    source, _ = upgrades.subset(p.data, up.classes)
    return _new_model_stage(
        p,
        up.name,
        up.method,
        source,
        reference,
        classes=fingerprint.array_digest(up.classes),
        # what the classes' digest stands for
        **{f'upgrades.{up.name}.fraction': up.fraction},
    )
