"""Every config error before any work: a typo or an impossible setting must not cost a model.

`check_config(config)` runs before the data is read; `check_run(config, data)` after, before the
first stage trains. Each error is a `ConfigError` of one line: the field, its value and what is
allowed.
"""

from __future__ import annotations

import jax
import numpy as np
from etils import epath

from bcl_jax import calibrate, losses, methods
from bcl_jax.data import pipeline, splits

ARCHS = ('cifar_resnet', 'resnet18', 'resnet50')
ON_CHANGE = ('error', 'retrain')


class ConfigError(ValueError):
    """A config field with a value that cannot work; the message names field and allowed values."""

    def __init__(self, field: str, value, allowed: str):
        super().__init__(f'config.{field}={value!r}: {allowed}')
        self.field = field


def _require(ok: bool, field: str, value, allowed: str):
    if not ok:
        raise ConfigError(field, value, allowed)


def _batch(field: str, value: int, devices: int):
    _require(
        isinstance(value, int) and value > 0 and value % devices == 0,
        field,
        value,
        f'a positive multiple of the {devices} devices',
    )


def _stage(config, prefix: str, devices: int):
    """A model and its schedule: config.old or config.new (of a method's resolved config)."""
    model, train = config[prefix].model, config[prefix].train
    _require(model.arch in ARCHS, f'{prefix}.model.arch', model.arch, f'one of {ARCHS}')
    _require(
        model.head in losses.HEADS, f'{prefix}.model.head', model.head, f'one of {losses.HEADS}'
    )
    _require(model.embedding_dim > 0, f'{prefix}.model.embedding_dim', model.embedding_dim, '> 0')
    _require(model.pool in ('avg', 'gem'), f'{prefix}.model.pool', model.pool, "'avg' or 'gem'")
    dtypes = ('float32', 'bfloat16', 'float16')
    _require(model.dtype in dtypes, f'{prefix}.model.dtype', model.dtype, f'one of {dtypes}')
    if model.pretrained:
        _require(
            model.arch in ('resnet18', 'resnet50'),
            f'{prefix}.model.arch',
            model.arch,
            "resnet18 or resnet50 with model.pretrained (ImageNet weights)",
        )
        _require(
            epath.Path(model.pretrained).exists(),
            f'{prefix}.model.pretrained',
            model.pretrained,
            'an existing .pth (torchvision) or .safetensors (timm) file',
        )
    schedules = ('step', 'cosine')
    _require(
        train.schedule in schedules,
        f'{prefix}.train.schedule',
        train.schedule,
        f'one of {schedules}',
    )
    _require(train.epochs >= 0, f'{prefix}.train.epochs', train.epochs, '>= 0')
    _require(train.steps >= 0, f'{prefix}.train.steps', train.steps, '>= 0 (0: use epochs)')
    _require(
        train.steps > 0 or train.epochs > 0,
        f'{prefix}.train.epochs',
        train.epochs,
        f'> 0 (or {prefix}.train.steps > 0)',
    )
    _batch(f'{prefix}.train.batch_size', train.batch_size, devices)
    _require(train.learning_rate > 0, f'{prefix}.train.learning_rate', train.learning_rate, '> 0')
    _require(0 <= train.momentum < 1, f'{prefix}.train.momentum', train.momentum, 'in [0, 1)')
    _require(train.weight_decay >= 0, f'{prefix}.train.weight_decay', train.weight_decay, '>= 0')
    _require(train.warmup_steps >= 0, f'{prefix}.train.warmup_steps', train.warmup_steps, '>= 0')


def _perturb(cfg):
    _require(
        cfg.new_prototypes in ('ema', 'exact'),
        'perturb.new_prototypes',
        cfg.new_prototypes,
        "'ema' or 'exact'",
    )
    _require(0 <= cfg.ema_decay < 1, 'perturb.ema_decay', cfg.ema_decay, 'in [0, 1)')
    _require(
        cfg.prototype_norm in ('unit', 'mean'),
        'perturb.prototype_norm',
        cfg.prototype_norm,
        "'unit' or 'mean'",
    )
    _require(cfg.start_epochs >= 0, 'perturb.start_epochs', cfg.start_epochs, '>= 0')
    _require(
        cfg.refresh_every_epochs > 0,
        'perturb.refresh_every_epochs',
        cfg.refresh_every_epochs,
        '> 0',
    )
    _require(cfg.ndpp.k >= 1, 'perturb.ndpp.k', cfg.ndpp.k, '>= 1')
    _require(cfg.odpp.k >= 1, 'perturb.odpp.k', cfg.odpp.k, '>= 1')
    _require(cfg.odpp.passes >= 0, 'perturb.odpp.passes', cfg.odpp.passes, '>= 0')
    _require(
        cfg.odpp.pairs in ('random', 'neighbours'),
        'perturb.odpp.pairs',
        cfg.odpp.pairs,
        "'random' or 'neighbours'",
    )
    for field in ('ndpp.rho', 'ndpp.rho_beta', 'odpp.rho'):
        method, name = field.split('.')
        rho = cfg[method][name]
        _require(
            rho is None or 0 < rho <= calibrate.RHO_MAX,
            f'perturb.{field}',
            rho,
            f'unset, or in (0, {calibrate.RHO_MAX}] nearest-neighbour distances',
        )
    _require(
        not cfg.odpp.margin_new_quantile or cfg.odpp.rho is not None,
        'perturb.odpp.margin_new_quantile',
        cfg.odpp.margin_new_quantile,
        'False unless perturb.odpp.rho is set (its quantile is the calibrated one)',
    )
    if cfg.odpp.rho is not None:
        for field, wanted in (('pairs', 'neighbours'), ('normalize_in_objective', True)):
            _require(
                cfg.odpp[field] == wanted,
                f'perturb.odpp.{field}',
                cfg.odpp[field],
                f'{wanted!r} when perturb.odpp.rho is set (method.md §11)',
            )


def check_config(config):
    """Everything that can be checked without reading the data."""
    devices = jax.device_count()
    d = config.data
    _require(d.old_split in splits.MODES, 'data.old_split', d.old_split, f'one of {splits.MODES}')
    _require(0 < d.old_fraction <= 1, 'data.old_fraction', d.old_fraction, 'in (0, 1]')
    _require(
        0 <= d.validation_fraction < 1,
        'data.validation_fraction',
        d.validation_fraction,
        'in [0, 1) (0: no validation split)',
    )
    _require(d.image_size > 0, 'data.image_size', d.image_size, '> 0')
    try:
        pipeline.Augment.from_config(d)
    except ValueError as e:
        raise ConfigError('data.augment', d.augment, str(e)) from None
    for field, allowed in (
        ('eval_preprocess', ('center_crop', 'resize')),
        ('scan_images', ('header', 'decode', 'off')),
        ('fingerprint', ('content', 'names')),
    ):
        _require(d[field] in allowed, f'data.{field}', d[field], f'one of {allowed}')
    _require(d.workers >= 0, 'data.workers', d.workers, '>= 0')
    _require(config.on_change in ON_CHANGE, 'on_change', config.on_change, f'one of {ON_CHANGE}')
    _require(
        all(isinstance(s, int) for s in config.seeds),
        'seeds',
        config.seeds,
        'a tuple of ints, e.g. (0, 1, 2, 3, 4)',
    )
    _batch('eval.batch_size', config.eval.batch_size, devices)
    _require(config.log_every_steps > 0, 'log_every_steps', config.log_every_steps, '> 0')
    _require(config.ckpt.every_steps > 0, 'ckpt.every_steps', config.ckpt.every_steps, '> 0')
    given = config.old.get('embeddings')
    if given:
        _require(
            not config.old.checkpoint,
            'old.embeddings',
            given,
            'given alone: old.checkpoint is set too (one old model: its files or its checkpoint)',
        )
        _require(
            not config.upgrades,
            'old.embeddings',
            given,
            'without upgrades (sequential upgrades train against a network; give old.checkpoint)',
        )
    elif not config.old.checkpoint:
        _stage(config, 'old', devices)
    names = list(config.methods)
    _require(len(set(names)) == len(names), 'methods', tuple(names), 'each method once')
    for name in names:
        try:
            _, stage_config = methods.resolve(config, name)
        except ValueError as e:
            raise ConfigError('methods', tuple(names), str(e)) from None
        if given:
            _require(
                not methods.build(name, config).needs_old_network,
                'methods',
                tuple(names),
                f'without {name!r} when old.embeddings is set: {name} runs the old network on '
                'every batch (give old.checkpoint for it)',
            )
        _stage(stage_config, 'new', devices)
        _require(
            stage_config.compat.temperature > 0,
            'compat.temperature',
            stage_config.compat.temperature,
            '> 0',
        )
        _perturb(stage_config.perturb)
        _batch('perturb.exact_batch_size', stage_config.perturb.exact_batch_size, devices)
    _upgrades(config, devices)
    if not (config.old.checkpoint or config.old.get('embeddings')):
        check_dims(config)  # a given old model: once it is loaded (its dim is known then)


def check_dims(
    config, old_dim: int | None = None, old_name: str = 'config.old.model.embedding_dim'
):
    """Every new model and upgrade embeds in the dimension of the model before it; `old_dim`:
    the old model's, when it is given as files (`old_name` says where it was read)."""
    if old_dim is None:
        old_dim = config.old.model.embedding_dim
    for name in config.methods:
        base, stage_config = methods.resolve(config, name)
        _same_dim(base, stage_config.new.model.embedding_dim, old_dim, old_name)
    before, before_name = old_dim, old_name
    for name, spec in (config.get('upgrades') or {}).items():
        base, cfg = methods.resolve(config, spec.get('method', 'bct'))
        dim = (spec.get('model') or {}).get('embedding_dim', cfg.new.model.embedding_dim)
        _require(
            dim == before,
            f'upgrades.{name}.model.embedding_dim',
            dim,
            f'{before}, as {before_name} (the model before it): {_dim_rule(base)}',
        )
        before, before_name = dim, f'config.upgrades.{name}.model.embedding_dim'


def _dim_rule(method: str) -> str:
    """Why `method`'s new model must embed in its predecessor's dimension."""
    base = methods.REGISTRY.get(method)
    if base is not None and base.needs_reference:
        return (
            f'{method} compares the new embeddings with the old prototypes (or the old '
            'classifier) directly, with no learned transformation between the two spaces'
        )
    return 'the new/old cross-test searches the old gallery with new queries'


def _same_dim(method: str, dim: int, old_dim: int, old_name: str):
    """Embedding dims may differ only across a learned transformation between the spaces (as
    LCE's K > 0 blocks would add); no bcl_jax method has one, so every new model embeds in the
    dimension of the model it must stay compatible with."""
    _require(
        dim == old_dim,
        'new.model.embedding_dim',
        dim,
        f'{old_dim}, as {old_name}: {_dim_rule(method)}',
    )


def _upgrades(config, devices: int):
    """config.upgrades, each field named by its upgrade (config.upgrades.<name>.<field>)."""
    variants = tuple(config.get('variants') or {})
    for name, spec in (config.get('upgrades') or {}).items():
        where = f'upgrades.{name}'
        fraction = spec.get('fraction')
        _require(
            isinstance(fraction, (int, float)) and 0 < fraction <= 1,
            f'{where}.fraction',
            fraction,
            'in (0, 1]: the share of the training classes this model sees',
        )
        method = spec.get('method', 'bct')
        _require(
            method in methods.REGISTRY or method in variants,
            f'{where}.method',
            method,
            f'one of {methods.NAMES} or a variant declared in config.variants '
            f'({variants or "none declared"})',
        )
        _, cfg = methods.resolve(config, method)
        cfg = cfg.copy_and_resolve_references()
        for group in ('model', 'train'):
            for field, value in (spec.get(group) or {}).items():
                _require(
                    field in cfg.new[group],
                    f'{where}.{group}.{field}',
                    value,
                    f'a field of config.new.{group} ({", ".join(sorted(cfg.new[group]))})',
                )
                cfg.new[group][field] = value
        _stage(cfg, 'new', devices)


def check_run(config, data):
    """What needs the data: every stage has steps; warnings about degenerate splits."""
    given_old = config.old.checkpoint or config.old.get('embeddings')
    stages = [] if given_old else [('old', 'old', config.old.train, data.old_train)]
    for m in config.methods:
        stages.append((f'new ({m})', 'new', methods.resolve(config, m)[1].new.train, data.train))
    for name, prefix, train_cfg, source in stages:
        steps = train_cfg.steps or int(round(train_cfg.epochs * len(source) / train_cfg.batch_size))
        _require(
            steps >= 1,
            f'{prefix}.train.epochs',
            train_cfg.epochs,
            f'gives 0 steps for the {name} model ({len(source)} images at batch '
            f'{train_cfg.batch_size}): raise epochs (or set steps) or lower the batch size',
        )
    from bcl_jax import upgrades  # trains models: imported where the data is known

    try:
        planned = upgrades.plan(config, data.old_label)
    except ValueError as e:
        raise ConfigError('upgrades', tuple(config.upgrades), str(e)) from None
    labels = np.asarray(data.train.labels)
    for up in planned:
        _stage(up.config, 'new', jax.device_count())
        train_cfg, images = up.config.new.train, int(np.isin(labels, up.classes).sum())
        steps = train_cfg.steps or round(train_cfg.epochs * images / train_cfg.batch_size)
        _require(
            steps >= 1,
            f'upgrades.{up.name}.train.epochs',
            train_cfg.epochs,
            f'gives 0 steps for the upgrade {up.name!r} ({images} images of its '
            f'{len(up.classes)} classes at batch {train_cfg.batch_size}): raise '
            f'config.upgrades.{up.name}.train.epochs (or set its train.steps) or lower its '
            'train.batch_size',
        )
