"""train_step: one jitted training step of the GLDv2 configs' models, images per second.

The old ResNet-18 and the new ResNet-50 alone (independent), and the new one with BCT, NDPP and
ODPP, at `step_image_size` px, global batch `step_batch` (split over all devices) and
`step_classes` classes, timed in turn; the ratios of NDPP's and ODPP's step to BCT's. NDPP's
and ODPP's steps differ from BCT's by the EMA update of the new prototypes; their refreshes
(`refresh.py`) come once per epoch, ~6,200 steps of GLDv2 at batch 256.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import ml_collections
import numpy as np

from bcl_jax import methods, sharding, step
from bcl_jax.bench.harness import random_bank, timed_together
from bcl_jax.bench.registry import Size, measurement, sizes
from bcl_jax.data import pipeline
from bcl_jax.stage import Reference, Stage, Trained

SIZES = sizes(
    'train_step, torch_step',
    {
        'step_image_size': Size(112, 32, 'image side (GLDv2 configs: 224)'),
        'step_batch': Size(32, 8, 'global batch (GLDv2 configs: 256)'),
        'step_classes': Size(81313, 100, 'classes of the new model'),
        'step_repeats': Size(3, 1, 'timed steps of each model, taken in turn'),
    },
)
METHODS = ('independent', 'bct', 'ndpp', 'odpp')


def gldv2_spec() -> ml_collections.ConfigDict:
    """What configs/gldv2.py (on configs/common.py) sets for the models, optimizer, loss and
    prototype EMA that these benchmarks time; tests/test_bench.py checks it against them."""

    def model(arch):
        return {
            'arch': arch,
            'width': 64,
            'depth': 20,
            'embedding_dim': 256,
            'head': 'cosface',
            'scale': 30.0,
            'margin': 0.3,
            'pool': 'avg',
            'dtype': 'float32',
            'pretrained': '',
        }

    return ml_collections.ConfigDict(
        {
            'old_model': model('resnet18'),
            'new_model': model('resnet50'),
            'train': {
                'learning_rate': 0.1,
                'momentum': 0.9,
                'weight_decay': 5e-4,
                'schedule': 'step',
                'warmup_steps': 0,
                'lr_drop_epochs': (5.0, 10.0, 20.0),
                'lr_drop_factor': 0.1,
            },
            'compat': {'weight': 1.0, 'temperature': 0.07},
            # The whole section, as NDPP's and ODPP's set-up reads it (their strength settings
            # are not timed: the step differs from BCT's only by the EMA of the new prototypes).
            'perturb': {
                'start_epochs': 2.0,
                'refresh_every_epochs': 1.0,
                'new_prototypes': 'ema',
                'ema_decay': 0.9,
                'exact_batch_size': 256,
                'perturb_negatives': False,
                'prototype_norm': 'unit',
                'ndpp': {
                    'k': 100,
                    'alpha': 0.16,
                    'beta': 0.004,
                    'clamp_weights': True,
                    'exclude_self': True,
                    'new_push': False,
                    'rho': None,
                    'rho_beta': None,
                },
                'odpp': {
                    'passes': 100,
                    'pairs_per_step': 1024,
                    'learning_rate': 1e-3,
                    'pairs': 'random',
                    'k': 100,
                    'margin_old': 0.9,
                    'margin_new': 0.9,
                    'lambda_old': 1.0,
                    'lambda_new': 1.0,
                    'gamma': 0.0,
                    'normalize_in_objective': False,
                    'warm_start': False,
                    'rho': None,
                    'margin_new_quantile': False,
                },
            },
        }
    )


class JaxStep(NamedTuple):
    step: Callable  # (state, batch) -> (state, metrics: loss, cls and, with L_comp, comp)
    state: dict  # donated to `step`: use the state it returns
    weights: Callable  # state -> (params, batch_stats), the model's pure dicts


def jax_train_step(model_cfg, method, spec, *, classes, mesh, prototypes, weights=None):
    """bcl_jax's training step of `method` for `model_cfg`, as `bcl_jax.step.build` sets it up
    for training: jitted over `mesh` (the batch split along 'data', the state replicated and
    donated), SGD as configured in `spec.train` (1,000 steps an epoch), L_comp against
    `prototypes` (C, D). `weights`: (params, batch_stats) to start from instead of the model's
    seeded initialisation. The one place here that uses bcl_jax's training code."""
    train_cfg = ml_collections.ConfigDict(
        dict(spec.train.to_dict(), batch_size=1, epochs=1.0, steps=0)
    )
    stage = Stage(
        'bench', model_cfg, train_cfg, range(1000), classes, 0, methods.build(method, spec), {}
    )
    reference = None
    if method != 'independent':  # L_comp reads the prototypes only, not the old model
        old = Trained(None, {}, {}, None, 0, 0)
        reference = Reference(old, prototypes, np.zeros(classes, np.int32))
    setup = step.build(stage, reference, mesh=mesh, shard_classes=False)
    state = setup.state
    if weights is not None:
        state = dict(state, params=weights[0], batch_stats=weights[1])
        state, _ = sharding.place(state, mesh, shard_classes=False)
    return JaxStep(
        step=lambda state, batch: setup.step_fn(state, batch, setup.reference),
        state=state,
        weights=lambda state: (state['params'], state['batch_stats']),
    )


def data_mesh() -> jax.sharding.Mesh:
    """All devices on one axis, 'data', as the training configs' default mesh."""
    n = jax.device_count()
    return jax.make_mesh((n,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))


def random_batch(batch: int, size: int, classes: int) -> dict:
    """Random uint8 images and labels (seeded: torch_step draws the same batch)."""
    rng = np.random.default_rng(0)
    return {
        'image': rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
        'label': rng.integers(0, classes, batch).astype(np.int32),
    }


def step_call(built: JaxStep, batch) -> Callable:
    """A no-argument call running one step of `built` on `batch` (the state carried over from
    call to call); it returns the loss."""
    carried = [built.state]

    def call():
        carried[0], metrics = built.step(carried[0], batch)
        return metrics['loss']

    return call


def _step_call(model_cfg, method: str, cfg, spec, mesh):
    """`step_call` of `method` at train_step's sizes."""
    classes = cfg['step_classes']
    built = jax_train_step(
        model_cfg,
        method,
        spec,
        classes=classes,
        mesh=mesh,
        prototypes=random_bank(1, classes, model_cfg.embedding_dim),
    )
    batch = random_batch(cfg['step_batch'], cfg['step_image_size'], classes)
    return step_call(built, pipeline.to_global(batch, mesh))


@measurement('train_step')
def bench_train_step(cfg, results):
    """Images/s of each model's step and the ratios to BCT (see the module docstring)."""
    del results
    spec, mesh = gldv2_spec(), data_mesh()
    calls = {'old_resnet18': (_step_call(spec.old_model, 'independent', cfg, spec, mesh), ())}
    for method in METHODS:
        calls[f'new_resnet50_{method}'] = (_step_call(spec.new_model, method, cfg, spec, mesh), ())
    timings = timed_together(calls, repeats=cfg['step_repeats'])
    for t in timings.values():
        t['images_per_sec'] = cfg['step_batch'] / t['seconds']
    bct = timings['new_resnet50_bct']['seconds']
    return {
        'image_size': cfg['step_image_size'],
        'batch': cfg['step_batch'],
        'classes': cfg['step_classes'],
        'devices': jax.device_count(),
        'steps': timings,
        'ratio_to_bct': {
            m: timings[f'new_resnet50_{m}']['seconds'] / bct for m in ('ndpp', 'odpp')
        },
    }
