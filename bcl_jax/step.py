"""The train step of a stage and its set-up, built in one place for training, benchmarks and tests.

`build(stage, reference, mesh=..., shard_classes=...)` makes the model and its optimizer, the
step-0 train state (with the method's state), lays state and reference out on the mesh
(replicated, or class axes split by class: bcl_jax.sharding) and jits the pure step

    (state, batch, reference) -> (state, metrics)

with the batch split by rows and the state donated. The loss is L_cls plus the method's terms,
each with its weight (bcl_jax.methods).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bcl_jax import losses, sharding
from bcl_jax import stage as stage_lib
from bcl_jax.methods.base import StepInputs
from bcl_jax.models import convert
from bcl_jax.models.heads import build_model


def total_steps(train_cfg, num_examples: int) -> tuple[int, float]:
    """(steps, steps_per_epoch) of a stage."""
    steps, per_epoch = stage_lib.steps_of(train_cfg, num_examples)
    if steps < 1:
        raise ValueError('the training stage has 0 steps: raise epochs/steps or lower batch_size')
    return steps, per_epoch


def make_optimizer(train_cfg, steps_per_epoch: float, *, decay_mask=None):
    """SGD with momentum and L2 weight decay added to the gradient (as torch SGD), on a step or
    cosine schedule after an optional linear warm-up.

    'step': the rate drops by `lr_drop_factor` at `lr_drop_epochs`, counted in absolute steps (a
    warm-up does not delay them); drops that fall on one step compound. 'cosine': from the full
    rate at the end of the warm-up to 0 at the stage's last step (cosine annealing, as in the
    field's recipes). `decay_mask`: params -> bool tree of the leaves weight decay applies to
    (default all; GeM's p is left out).
    """
    warmup = train_cfg.warmup_steps
    if train_cfg.get('schedule', 'step') == 'cosine':
        steps = train_cfg.steps or int(round(train_cfg.epochs * steps_per_epoch))
        decay = optax.cosine_decay_schedule(train_cfg.learning_rate, max(1, steps - warmup))
        main = lambda count: decay(jnp.maximum(count - warmup, 0))
    else:
        boundaries = {}
        for epoch in train_cfg.lr_drop_epochs:
            at = int(round(epoch * steps_per_epoch))
            boundaries[at] = boundaries.get(at, 1.0) * train_cfg.lr_drop_factor
        main = optax.piecewise_constant_schedule(train_cfg.learning_rate, boundaries)

    def schedule(count):
        return main(count) * (jnp.minimum(1.0, count / warmup) if warmup else 1.0)

    tx = optax.chain(
        optax.add_decayed_weights(train_cfg.weight_decay, mask=decay_mask),
        optax.sgd(schedule, momentum=train_cfg.momentum),
    )
    return tx, schedule


def init_model(model_cfg, num_classes: int, seed: int, *, pretrained: bool = True):
    """(graphdef, params, batch_stats) of a freshly initialised model, as pure dicts; the
    backbone from `model_cfg.pretrained` (torchvision or timm ImageNet weights) when given
    (and `pretrained`: a model about to be restored from a checkpoint needs no weights).

    The weights are drawn in one compiled call, bit for bit those of Flax's eager
    initialisation (tests/test_step.py), which compiles each initialiser on its own; the seed
    is an argument, so every seed shares the compilation (and the persistent cache keeps it:
    bcl_jax.console.use_compile_cache).
    """

    graphdef, initialise = _initialiser(model_cfg, num_classes)
    params, stats = initialise(jax.random.key(seed))
    if pretrained and model_cfg.get('pretrained'):
        params, stats = convert.load_pretrained(
            model_cfg.pretrained, params, stats, arch=model_cfg.arch
        )
    return graphdef, params, stats


# (model settings, classes) -> (graphdef, jitted initialiser): the new models of a run share
# one model, so they trace and compile its initialisation once.
_INITIALISERS: dict[str, tuple] = {}


def _initialiser(model_cfg, num_classes: int):
    settings = model_cfg.to_dict() if hasattr(model_cfg, 'to_dict') else dict(model_cfg)
    key = json.dumps([settings, num_classes], sort_keys=True, default=str)
    if key not in _INITIALISERS:
        model_cfg = copy.deepcopy(model_cfg)  # the cache keeps these settings, not the caller's

        def initialise(rng):
            model = build_model(model_cfg, num_classes, rngs=nnx.Rngs(rng))
            _, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
            return nnx.to_pure_dict(params), nnx.to_pure_dict(stats)

        abstract = nnx.eval_shape(lambda: build_model(model_cfg, num_classes, rngs=nnx.Rngs(0)))
        _INITIALISERS[key] = nnx.graphdef(abstract), jax.jit(initialise)
    return _INITIALISERS[key]


def no_decay_on_gem(params):
    """Weight decay on every leaf but GeM's p (the landmark-retrieval references leave it out)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: 'pool' not in jax.tree_util.keystr(path), params
    )


def initial_state(params, batch_stats, tx, method_state=None) -> dict:
    """The train state at step 0; `method_state`: the method's part (`Method.init_state`)."""
    return dict(
        step=jnp.int32(0),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        first_nonfinite_step=jnp.int32(-1),
        method=method_state or {},
    )


def make_train_step(graphdef, tx, *, method, model_cfg, num_classes: int | None = None):
    """The pure step `(state, batch, reference) -> (state, metrics)`; jit it with shardings.

    `num_classes`: the real classes when the class axes carry padding (bcl_jax.sharding); the
    losses leave the padding out. Parameters of the method's own (`state['method']['params']`)
    are trained with the model, by `method.optimizer`.
    """
    head = dict(kind=model_cfg.head, scale=model_cfg.scale, margin=model_cfg.margin)
    weights = method.weights

    def loss_fn(trainable, batch_stats, batch, reference, method_state, step):
        model = nnx.merge(graphdef, trainable['model'], batch_stats)
        emb, logits = model(batch['image'], train=True)
        labels = batch['label']
        terms = {'cls': losses.classification_loss(logits, labels, num_classes=num_classes, **head)}
        if 'params' in method_state:
            method_state = dict(method_state, params=trainable['method'])
        inputs = StepInputs(
            batch['image'], labels, emb, logits, trainable['model'], num_classes, step
        )
        extra, method_state = method.terms(inputs, reference, method_state)
        terms.update(extra)
        total = terms['cls'] + sum(weights[k] * extra[k] for k in weights)
        new_stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
        return total, (terms, new_stats, method_state)

    def train_step(state, batch, reference):
        method_state = state['method']
        trainable = dict(model=state['params'], method=method_state.get('params', {}))
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (total, (terms, new_stats, method_state)), grads = grad_fn(
            trainable, state['batch_stats'], batch, reference, method_state, state['step']
        )
        updates, opt_state = tx.update(grads['model'], state['opt_state'], state['params'])
        params = optax.apply_updates(state['params'], updates)
        if 'params' in method_state:
            method_tx = method.optimizer(tx)
            m_updates, m_opt = method_tx.update(
                grads['method'], method_state['opt_state'], trainable['method']
            )
            method_state = dict(
                method_state,
                params=optax.apply_updates(trainable['method'], m_updates),
                opt_state=m_opt,
            )
        # Remember the first step (counted from 1, as in the logs) whose loss or weights are not
        # finite; the host checks it at each log and before each checkpoint.
        finite = jnp.isfinite(total) & jnp.all(
            jnp.array([jnp.isfinite(p).all() for p in jax.tree.leaves(params)])
        )
        first_bad = jnp.where(
            (state['first_nonfinite_step'] < 0) & ~finite,
            state['step'] + 1,
            state['first_nonfinite_step'],
        )
        new_state = dict(
            state,
            step=state['step'] + 1,
            params=params,
            batch_stats=new_stats,
            opt_state=opt_state,
            first_nonfinite_step=first_bad,
            method=method_state,
        )
        return new_state, dict(terms, loss=total)

    return train_step


def jit_train_step(mesh, step, state_sharding, reference_sharding):
    """The step jitted for data parallelism: the batch split by rows; the state and reference
    laid out as given (from `sharding.place`); the state donated."""
    replicated, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P(sharding.AXIS))
    return jax.jit(
        step,
        in_shardings=(state_sharding, rows, reference_sharding),
        out_shardings=(state_sharding, replicated),
        donate_argnums=(0,),
    )


@dataclasses.dataclass
class Setup:
    """Everything a stage's loop needs: the placed state and reference and the jitted step."""

    graphdef: Any
    schedule: Any
    state: dict
    reference: Any
    step_fn: Any
    num_params: int


def check_reference(method, reference):
    """Stops when `method` trains against an old model and `reference` is None."""
    if method.needs_reference and reference is None:
        raise ValueError(f'method {method.name!r} needs the old model and its prototypes')


def build(stage, reference, *, mesh, shard_classes: bool) -> Setup:
    """The model, optimizer, step-0 state and jitted step of `stage` (see the module docstring)."""
    method = stage.method
    check_reference(method, reference)
    graphdef, params, stats = init_model(stage.model_cfg, stage.num_classes, stage.seed)
    _, per_epoch = total_steps(stage.train_cfg, len(stage.source))
    mask = no_decay_on_gem if stage.model_cfg.get('pool', 'avg') == 'gem' else None
    tx, schedule = make_optimizer(stage.train_cfg, per_epoch, decay_mask=mask)
    state = initial_state(params, stats, tx, method.init_state(stage, reference))
    if 'params' in state['method']:
        state['method']['opt_state'] = method.optimizer(tx).init(state['method']['params'])
    # Replicated, or the class axes (padded to a multiple of the devices) split by class.
    state, state_sharding = sharding.place(state, mesh, shard_classes=shard_classes)
    reference_sharding = None
    if reference is not None:
        reference, reference_sharding = sharding.place(reference, mesh, shard_classes=shard_classes)
    step = make_train_step(
        graphdef, tx, method=method, model_cfg=stage.model_cfg, num_classes=stage.num_classes
    )
    return Setup(
        graphdef=graphdef,
        schedule=schedule,
        state=state,
        reference=reference,
        step_fn=jit_train_step(mesh, step, state_sharding, reference_sharding),
        num_params=sum(x.size for x in jax.tree.leaves(params)),
    )
