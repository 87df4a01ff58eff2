"""Every config error before any work: a typo or an impossible setting must not cost a model.

`check_config(config)` runs before the data is read; `check_run(config, data)` after, before the
first stage trains, and returns the run's plan (bcl_jax.plan). Each method checks its own
settings (`Method.check`). Each error is a `ConfigError` of one line: the field, its value and
what is allowed.
"""

from __future__ import annotations

import jax
import numpy as np
from etils import epath

from bcl_jax import losses, methods, upgrades
from bcl_jax import plan as plan_lib
from bcl_jax.data import pipeline, splits
from bcl_jax.errors import ConfigError, require
from bcl_jax.stage import steps_of

ARCHS = ('cifar_resnet', 'resnet18', 'resnet50')
ON_CHANGE = ('error', 'retrain')


def _batch(field: str, value: int, devices: int):
    require(
        isinstance(value, int) and value > 0 and value % devices == 0,
        field,
        value,
        f'a positive multiple of the {devices} devices',
    )


def _stage(config, prefix: str, devices: int):
    """A model and its schedule: config.old or config.new (of a method's resolved config)."""
    model, train = config[prefix].model, config[prefix].train
    require(model.arch in ARCHS, f'{prefix}.model.arch', model.arch, f'one of {ARCHS}')
    require(
        model.head in losses.HEADS, f'{prefix}.model.head', model.head, f'one of {losses.HEADS}'
    )
    require(model.embedding_dim > 0, f'{prefix}.model.embedding_dim', model.embedding_dim, '> 0')
    require(model.pool in ('avg', 'gem'), f'{prefix}.model.pool', model.pool, "'avg' or 'gem'")
    dtypes = ('float32', 'bfloat16', 'float16')
    require(model.dtype in dtypes, f'{prefix}.model.dtype', model.dtype, f'one of {dtypes}')
    if model.pretrained:
        require(
            model.arch in ('resnet18', 'resnet50'),
            f'{prefix}.model.arch',
            model.arch,
            "resnet18 or resnet50 with model.pretrained (ImageNet weights)",
        )
        require(
            epath.Path(model.pretrained).exists(),
            f'{prefix}.model.pretrained',
            model.pretrained,
            'an existing .pth (torchvision) or .safetensors (timm) file',
        )
    schedules = ('step', 'cosine')
    require(
        train.schedule in schedules,
        f'{prefix}.train.schedule',
        train.schedule,
        f'one of {schedules}',
    )
    require(train.epochs >= 0, f'{prefix}.train.epochs', train.epochs, '>= 0')
    require(train.steps >= 0, f'{prefix}.train.steps', train.steps, '>= 0 (0: use epochs)')
    require(
        train.steps > 0 or train.epochs > 0,
        f'{prefix}.train.epochs',
        train.epochs,
        f'> 0 (or {prefix}.train.steps > 0)',
    )
    _batch(f'{prefix}.train.batch_size', train.batch_size, devices)
    require(train.learning_rate > 0, f'{prefix}.train.learning_rate', train.learning_rate, '> 0')
    require(0 <= train.momentum < 1, f'{prefix}.train.momentum', train.momentum, 'in [0, 1)')
    require(train.weight_decay >= 0, f'{prefix}.train.weight_decay', train.weight_decay, '>= 0')
    require(train.warmup_steps >= 0, f'{prefix}.train.warmup_steps', train.warmup_steps, '>= 0')


def check_config(config):
    """Everything that can be checked without reading the data."""
    devices = jax.device_count()
    d = config.data
    require(d.old_split in splits.MODES, 'data.old_split', d.old_split, f'one of {splits.MODES}')
    require(0 < d.old_fraction <= 1, 'data.old_fraction', d.old_fraction, 'in (0, 1]')
    require(
        0 <= d.validation_fraction < 1,
        'data.validation_fraction',
        d.validation_fraction,
        'in [0, 1) (0: no validation split)',
    )
    require(d.image_size > 0, 'data.image_size', d.image_size, '> 0')
    try:
        pipeline.Augment.from_config(d)
    except ValueError as e:
        raise ConfigError('data.augment', d.augment, str(e)) from None
    for field, allowed in (
        ('eval_preprocess', ('center_crop', 'resize')),
        ('scan_images', ('header', 'decode', 'off')),
        ('fingerprint', ('content', 'names')),
    ):
        require(d[field] in allowed, f'data.{field}', d[field], f'one of {allowed}')
    require(d.workers >= 0, 'data.workers', d.workers, '>= 0')
    require(config.on_change in ON_CHANGE, 'on_change', config.on_change, f'one of {ON_CHANGE}')
    require(
        all(isinstance(s, int) for s in config.seeds),
        'seeds',
        config.seeds,
        'a tuple of ints, e.g. (0, 1, 2, 3, 4)',
    )
    _batch('eval.batch_size', config.eval.batch_size, devices)
    require(config.log_every_steps > 0, 'log_every_steps', config.log_every_steps, '> 0')
    require(config.ckpt.every_steps > 0, 'ckpt.every_steps', config.ckpt.every_steps, '> 0')
    given = config.old.get('embeddings')
    if given:
        require(
            not config.old.checkpoint,
            'old.embeddings',
            given,
            'given alone: old.checkpoint is set too (one old model: its files or its checkpoint)',
        )
        require(
            not config.upgrades,
            'old.embeddings',
            given,
            'without upgrades (sequential upgrades train against a network; give old.checkpoint)',
        )
    elif not config.old.checkpoint:
        _stage(config, 'old', devices)
    names = tuple(config.methods)
    require(len(set(names)) == len(names), 'methods', names, 'each method once')
    try:
        built = plan_lib.methods_of(config)
    except ValueError as e:
        raise ConfigError('methods', names, str(e)) from None
    for name, method in built.items():
        if given:
            require(
                not method.needs_old_network,
                'methods',
                names,
                f'without {name!r} when old.embeddings is set: {name} runs the old network on '
                'every batch (give old.checkpoint for it)',
            )
        stage_config = method.config
        _stage(stage_config, 'new', devices)
        require(
            stage_config.compat.temperature > 0,
            'compat.temperature',
            stage_config.compat.temperature,
            '> 0',
        )
        _batch('perturb.exact_batch_size', stage_config.perturb.exact_batch_size, devices)
        method.check()
    chain = _upgrades(config, devices)
    if not (config.old.checkpoint or config.old.get('embeddings')):
        # a given old model: once it is loaded (its dim is known then)
        check_dims(built, chain, config.old.model.embedding_dim)


def check_dims(
    new_models: dict,
    upgrade_models: dict,
    old_dim: int,
    old_name: str = 'config.old.model.embedding_dim',
):
    """Every new model and upgrade (name -> Method, in order) embeds in the dimension of the
    model before it; `old_dim`: the old model's (`old_name`: where it was read)."""
    for method in new_models.values():
        _same_dim(type(method).name, method.config.new.model.embedding_dim, old_dim, old_name)
    before, before_name = old_dim, old_name
    for name, method in upgrade_models.items():
        dim = method.config.new.model.embedding_dim
        require(
            dim == before,
            f'upgrades.{name}.model.embedding_dim',
            dim,
            f'{before}, as {before_name} (the model before it): {_dim_rule(type(method).name)}',
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
    require(
        dim == old_dim,
        'new.model.embedding_dim',
        dim,
        f'{old_dim}, as {old_name}: {_dim_rule(method)}',
    )


def _upgrades(config, devices: int) -> dict:
    """config.upgrades, each field named by its upgrade (config.upgrades.<name>.<field>);
    returns name -> its Method."""
    variants = tuple(config.get('variants') or {})
    for name, spec in (config.get('upgrades') or {}).items():
        where = f'upgrades.{name}'
        fraction = spec.get('fraction')
        require(
            isinstance(fraction, (int, float)) and 0 < fraction <= 1,
            f'{where}.fraction',
            fraction,
            'in (0, 1]: the share of the training classes this model sees',
        )
        method = spec.get('method', 'bct')
        require(
            method in methods.REGISTRY or method in variants,
            f'{where}.method',
            method,
            f'one of {methods.NAMES} or a variant declared in config.variants '
            f'({variants or "none declared"})',
        )
        for group in ('model', 'train'):
            for field, value in (spec.get(group) or {}).items():
                require(
                    field in config.new[group],
                    f'{where}.{group}.{field}',
                    value,
                    f'a field of config.new.{group} ({", ".join(sorted(config.new[group]))})',
                )
    chain = upgrades.methods_of(config)
    for method in chain.values():
        _stage(method.config, 'new', devices)
        method.check()
    return chain


def check_run(config, data) -> plan_lib.Plan:
    """What needs the data: every stage has steps, upgrades' class sets; returns the plan."""
    try:
        plan = plan_lib.plan(config, data)
    except ValueError as e:
        raise ConfigError('upgrades', tuple(config.upgrades), str(e)) from None
    given_old = config.old.checkpoint or config.old.get('embeddings')
    stages = [] if given_old else [('old', 'old', config.old.train, data.old_train)]
    for m, method in plan.methods.items():
        stages.append((f'new ({m})', 'new', method.config.new.train, data.train))
    for name, prefix, train_cfg, source in stages:
        steps, _ = steps_of(train_cfg, len(source))
        require(
            steps >= 1,
            f'{prefix}.train.epochs',
            train_cfg.epochs,
            f'gives 0 steps for the {name} model ({len(source)} images at batch '
            f'{train_cfg.batch_size}): raise epochs (or set steps) or lower the batch size',
        )
    labels = np.asarray(data.train.labels)
    for up in plan.upgrades:
        _stage(up.config, 'new', jax.device_count())
        train_cfg, images = up.config.new.train, int(np.isin(labels, up.classes).sum())
        steps, _ = steps_of(train_cfg, images)
        require(
            steps >= 1,
            f'upgrades.{up.name}.train.epochs',
            train_cfg.epochs,
            f'gives 0 steps for the upgrade {up.name!r} ({images} images of its '
            f'{len(up.classes)} classes at batch {train_cfg.batch_size}): raise '
            f'config.upgrades.{up.name}.train.epochs (or set its train.steps) or lower its '
            'train.batch_size',
        )
    return plan
