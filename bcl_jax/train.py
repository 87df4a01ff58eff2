"""The training loop of bcl_jax, for an old model or a compatible new model.

One function, `train`, read top to bottom: set-up, model and optimizer, sharding, the step
function, resume, the loop, shutdown. A new model differs from an old one only by the loss
terms that its method switches on (`METHOD_TERMS`) and by what those terms read: the frozen old
model and the prototype bank, passed to the step as `aux`. A refresh hook may replace `aux`
every `refresh_every` steps (NDPP/ODPP perturb the bank there).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bcl_jax import checkpoint, losses, perturbation, prototypes, sharding
from bcl_jax.data import pipeline
from bcl_jax.models.heads import build_model, l2_normalize

# The loss terms, besides L_cls, that each method adds with weight config.compat.weight.
METHOD_TERMS = {
    'independent': (),
    'bct': ('comp',),
    'bct_influence': ('influence',),
    'l2': ('l2',),
    'ndpp': ('comp',),
    'odpp': ('comp',),
}
PERTURBATIONS = ('ndpp', 'odpp')  # methods whose positive prototypes are perturbed


@dataclasses.dataclass
class Trained:
    """A model's graph and weights, enough to embed images or score classes."""

    graphdef: Any
    params: Any
    batch_stats: Any
    model_cfg: Any
    num_classes: int
    step: int
    seconds: float = 0.0
    _embed_fns: dict = dataclasses.field(default_factory=dict, repr=False)

    def embed_fn(self, mesh):
        """A jitted `(params, batch_stats, images) -> embeddings`, images sharded over `mesh`;
        the weights are used where they are (replicated, or a classifier sharded by class)."""
        if mesh not in self._embed_fns:
            rows = NamedSharding(mesh, P('data'))
            graphdef = self.graphdef
            self._embed_fns[mesh] = jax.jit(
                lambda params, stats, images: nnx.merge(graphdef, params, stats).embed(images),
                in_shardings=(None, None, rows),
                out_shardings=rows,
            )
        return self._embed_fns[mesh]

    def identity(self) -> str:
        """A digest of the weights: names this exact model in prototype banks and results, the
        same whatever mesh (and class padding, bcl_jax.sharding) it was trained on."""
        h = hashlib.sha256()
        weights = sharding.unpad((self.params, self.batch_stats), self.num_classes)
        for path, leaf in sorted(
            jax.tree_util.tree_leaves_with_path(weights),
            key=lambda kv: jax.tree_util.keystr(kv[0]),
        ):
            h.update(jax.tree_util.keystr(path).encode())
            h.update(leaf.tobytes())
        return h.hexdigest()[:16]


def _describe(model_cfg) -> dict:
    return {k: model_cfg[k] for k in ('arch', 'width', 'depth', 'embedding_dim', 'head')}


def check_config(config):
    """The choices a long run would otherwise only trip over hours in."""
    unknown = [m for m in config.methods if m not in METHOD_TERMS]
    if unknown:
        raise ValueError(
            f'config.methods={tuple(config.methods)}: unknown {unknown}; choose from '
            f'{tuple(METHOD_TERMS)}'
        )
    if config.perturb.new_prototypes not in ('ema', 'exact'):
        raise ValueError(
            f"config.perturb.new_prototypes={config.perturb.new_prototypes!r}: use 'ema' or 'exact'"
        )
    for stage in (config.old, config.new):
        if stage.model.head not in losses.HEADS:
            raise ValueError(f'model.head={stage.model.head!r}: use one of {losses.HEADS}')


def total_steps(train_cfg, num_examples: int) -> tuple[int, float]:
    """(steps, steps_per_epoch) of a stage."""
    per_epoch = num_examples / train_cfg.batch_size
    steps = train_cfg.steps or int(round(train_cfg.epochs * per_epoch))
    if steps < 1:
        raise ValueError('the training stage has 0 steps: raise epochs/steps or lower batch_size')
    return steps, per_epoch


def make_optimizer(train_cfg, steps_per_epoch: float):
    """SGD with momentum, L2 weight decay added to the gradient (as torch SGD), step schedule.

    Drops count absolute steps (a warmup does not delay them); drops that fall on one step
    compound.
    """
    boundaries = {}
    for epoch in train_cfg.lr_drop_epochs:
        at = int(round(epoch * steps_per_epoch))
        boundaries[at] = boundaries.get(at, 1.0) * train_cfg.lr_drop_factor
    drops = optax.piecewise_constant_schedule(train_cfg.learning_rate, boundaries)
    warmup = train_cfg.warmup_steps

    def schedule(count):
        return drops(count) * (jnp.minimum(1.0, count / warmup) if warmup else 1.0)

    tx = optax.chain(
        optax.add_decayed_weights(train_cfg.weight_decay),
        optax.sgd(schedule, momentum=train_cfg.momentum),
    )
    return tx, schedule


def init_model(model_cfg, num_classes: int, seed: int):
    model = build_model(model_cfg, num_classes, rngs=nnx.Rngs(seed))
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(stats)


def initial_state(params, batch_stats, tx, bank=None) -> dict:
    """The train state at step 0. With the old prototypes `bank` (C, D), also the perturbation
    bank: until the first refresh p̃ = p, and a class's new prototype starts at its old one."""
    state = dict(
        step=jnp.int32(0),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        first_nonfinite_step=jnp.int32(-1),
    )
    if bank is not None:  # each leaf its own buffer: the state is donated
        bank = np.asarray(bank)
        state['bank'] = dict(positive=bank.copy(), new=bank.copy(), delta=np.zeros_like(bank))
    return state


def make_train_step(
    graphdef,
    tx,
    *,
    weights: dict,
    model_cfg,
    compat_cfg,
    old: Trained | None,
    perturb_cfg=None,
    num_classes: int | None = None,
):
    """The pure step `(state, batch, aux) -> (state, metrics)`; jit it with shardings.

    With a perturbation method, `state['bank']` holds the perturbed positive prototypes that
    L_comp reads and the running new-model prototypes (`new`, updated here when they are an EMA).
    `num_classes`: the real classes when the class axes carry padding (bcl_jax.sharding); the
    losses leave the padding out.
    """
    head = dict(kind=model_cfg.head, scale=model_cfg.scale, margin=model_cfg.margin)

    def loss_fn(params, batch_stats, batch, aux):
        model = nnx.merge(graphdef, params, batch_stats)
        emb, logits = model(batch['image'], train=True)
        labels = batch['label']
        terms = {'cls': losses.classification_loss(logits, labels, num_classes=num_classes, **head)}
        if 'comp' in weights:
            positive = aux.get('positive_prototypes')
            negatives = (
                positive
                if positive is not None and perturb_cfg.perturb_negatives
                else aux['prototypes']
            )
            terms['comp'] = losses.compatibility_loss(
                emb,
                labels,
                negatives,
                temperature=compat_cfg.temperature,
                positive_prototypes=positive,
                num_classes=num_classes,
            )
        if 'influence' in weights:
            old_model = nnx.merge(old.graphdef, aux['old_params'], aux['old_batch_stats'])
            terms['influence'] = losses.influence_loss(
                old_model.classifier(emb),
                labels,
                aux['old_label'],
                kind=old.model_cfg.head,
                scale=old.model_cfg.scale,
                margin=old.model_cfg.margin,
                num_classes=old.num_classes,
            )
        if 'l2' in weights:
            old_model = nnx.merge(old.graphdef, aux['old_params'], aux['old_batch_stats'])
            old_emb = jax.lax.stop_gradient(old_model(batch['image'], train=False)[0])
            terms['l2'] = losses.l2_loss(emb, old_emb)
        total = terms['cls'] + sum(weights[k] * terms[k] for k in weights)
        new_stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
        return total, (terms, new_stats, emb)

    def train_step(state, batch, aux):
        if 'bank' in state:
            aux = dict(aux, positive_prototypes=state['bank']['positive'])
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (total, (terms, new_stats, emb)), grads = grad_fn(
            state['params'], state['batch_stats'], batch, aux
        )
        updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
        params = optax.apply_updates(state['params'], updates)
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
        )
        if 'bank' in state and perturb_cfg.new_prototypes == 'ema':
            new_state['bank'] = dict(
                state['bank'],
                new=prototypes.ema_class_means(
                    state['bank']['new'],
                    jax.lax.stop_gradient(emb),
                    batch['label'],
                    decay=perturb_cfg.ema_decay,
                ),
            )
        return new_state, dict(terms, loss=total)

    return train_step


def jit_train_step(mesh, step, state_sharding=None, aux_sharding=None):
    """The step jitted for data parallelism: the batch split by rows; the state and aux laid out
    as `state_sharding` and `aux_sharding` (from `sharding.place`; default: replicated)."""
    replicated, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
    state_sharding = replicated if state_sharding is None else state_sharding
    aux_sharding = replicated if aux_sharding is None else aux_sharding
    return jax.jit(
        step,
        in_shardings=(state_sharding, rows, aux_sharding),
        out_shardings=(state_sharding, replicated),
        donate_argnums=(0,),
    )


def make_mesh(mesh_cfg, devices=None):
    """The 1-D mesh, axis 'data', over all devices (or over `devices`, e.g. for tests)."""
    devices = jax.devices() if devices is None else list(devices)
    n = len(devices) if mesh_cfg.data == -1 else mesh_cfg.data
    if n != len(devices):
        raise ValueError(
            f'config.mesh.data={mesh_cfg.data} does not match the '
            f'{len(devices)} devices; use -1 for all devices'
        )
    return jax.make_mesh((n,), ('data',), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


class _Log:
    """metrics.jsonl + TensorBoard + a progress line; only process 0 writes."""

    def __init__(self, directory: str, stage: str, resume_step: int):
        self.stage, self.writer = stage, None
        self.path = os.path.join(directory, 'metrics.jsonl')
        if jax.process_index() != 0:
            return
        # Drop lines a killed run wrote after its last checkpoint: they are about to be redone.
        if os.path.exists(self.path):
            records = []
            with open(self.path) as f:
                for line in f:
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass  # the last line, torn by a kill
            # A refresh logged at the resume step is redone too (it precedes that step's update).
            kept = [
                json.dumps(r) + '\n'
                for r in records
                if r['step'] < resume_step or (r['step'] == resume_step and 'event' not in r)
            ]
            checkpoint.write_atomic(self.path, ''.join(kept))
        from tensorboardX import SummaryWriter  # TF-free event writer

        self.writer = SummaryWriter(os.path.join(directory, 'tb'))

    def write(self, record: dict):
        if self.writer is None:
            return
        with open(self.path, 'a') as f:
            f.write(json.dumps(record) + '\n')
        for k, v in record.items():
            if isinstance(v, float):
                self.writer.add_scalar(f'{self.stage}/{k}', v, record['step'])
        self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()


def _check_finite(state, stage: str, ckpt_dir: str):
    bad = int(state['first_nonfinite_step'])
    if bad >= 0:
        raise FloatingPointError(
            f'[{stage}] the loss or the weights became NaN or Inf at step {bad}. The last good '
            f'checkpoint is in {ckpt_dir}; lower the learning rate or check the data, then rerun to resume.'
        )


def train(
    *,
    stage: str,
    workdir: str,
    model_cfg,
    train_cfg,
    source,
    num_classes: int,
    mesh,
    seed: int,
    data_cfg,
    ckpt_cfg,
    log_every_steps: int,
    method: str = 'independent',
    compat_cfg=None,
    old: Trained | None = None,
    aux: dict | None = None,
    perturb_cfg=None,
    stop_after_steps: int | None = None,
    shard_classes: bool = False,
) -> Trained:
    """Trains (or resumes, or just loads a finished) model of one stage; returns it.

    `shard_classes` (config.mesh.shard_classes): the classifier, its momentum and the prototype
    banks are sharded by class over the mesh (bcl_jax.sharding), else replicated.
    """
    # ---------------------------------------------------------------- set-up
    if method not in METHOD_TERMS:
        raise ValueError(f'unknown method {method!r}; known: {sorted(METHOD_TERMS)}')
    weights = {t: compat_cfg.weight for t in METHOD_TERMS[method]}
    if weights and old is None:
        raise ValueError(f'method {method!r} needs the old model')
    pipeline.check_source(source, f'{stage} training set')
    directory = os.path.join(workdir, stage)
    steps, per_epoch = total_steps(train_cfg, len(source))
    batch = train_cfg.batch_size
    pipeline.local_batch_size(batch)  # fails early on a batch the devices cannot split

    # ---------------------------------------------------------------- model + optimizer
    graphdef, params, stats = init_model(model_cfg, num_classes, seed)
    tx, schedule = make_optimizer(train_cfg, per_epoch)
    perturbing = method in PERTURBATIONS
    bank = sharding.to_host(aux['prototypes'])[:num_classes] if perturbing else None
    state = initial_state(params, stats, tx, bank)
    if perturbing:
        start_step = int(round(perturb_cfg.start_epochs * per_epoch))
        every = max(1, int(round(perturb_cfg.refresh_every_epochs * per_epoch)))
    num_params = sum(x.size for x in jax.tree.leaves(params))

    # ---------------------------------------------------------------- sharding
    # Replicated, or the class axes (padded to a multiple of the devices) split by class.
    state, state_sharding = sharding.place(state, mesh, shard_classes=shard_classes)
    aux, aux_sharding = sharding.place(dict(aux or {}), mesh, shard_classes=shard_classes)
    step_fn = jit_train_step(
        mesh,
        make_train_step(
            graphdef,
            tx,
            weights=weights,
            model_cfg=model_cfg,
            compat_cfg=compat_cfg,
            old=old,
            perturb_cfg=perturb_cfg,
            num_classes=num_classes,
        ),
        state_sharding,
        aux_sharding,
    )

    # ---------------------------------------------------------------- resume
    ckpt = checkpoint.Checkpointer(
        os.path.join(directory, 'ckpt'), max_to_keep=ckpt_cfg.max_to_keep
    )
    meta = dict(
        stage=stage,
        model=_describe(model_cfg),
        num_classes=num_classes,
        total_steps=steps,
        method=method,
    )
    stream = pipeline.train_stream(
        source,
        global_batch=batch,
        seed=seed,
        crop_padding=data_cfg.crop_padding,
        flip=data_cfg.flip,
        num_threads=data_cfg.num_threads,
    )
    start, seconds = 0, 0.0
    if ckpt.latest_step() is not None:
        # Onto this mesh's shardings and class padding, whatever mesh wrote the checkpoint.
        state, data_state, saved = ckpt.restore(ckpt.latest_step(), state, meta, strict=False)
        stream.set_state(data_state)
        start, seconds = int(state['step']), saved.get('seconds', 0.0)
        logging.info(
            '[%s] %s at step %d/%d from %s',
            stage,
            'finished' if start >= steps else 'resuming',
            start,
            steps,
            ckpt.directory,
        )
    if start >= steps:
        ckpt.close()
        return Trained(
            graphdef, state['params'], state['batch_stats'], model_cfg, num_classes, start, seconds
        )
    logging.info(
        '[%s] method=%s params=%s steps=%d (%.1f epochs of %d images) global batch=%d '
        '(%d per device on %d devices); %d classes %s',
        stage,
        method,
        f'{num_params:,}',
        steps,
        steps / per_epoch,
        len(source),
        batch,
        batch // mesh.size,
        mesh.size,
        num_classes,
        'sharded by class' if shard_classes else 'replicated',
    )

    # ---------------------------------------------------------------- loop
    log = _Log(directory, stage, start)
    end = steps if stop_after_steps is None else min(steps, stop_after_steps)
    pending, t_log, step_log = [], time.time(), start
    current = Trained(graphdef, None, None, model_cfg, num_classes, start)
    for step in range(start, end):
        if perturbing and step >= start_step and (step - start_step) % every == 0:
            current.params, current.batch_stats = state['params'], state['batch_stats']
            state, stats = refresh_bank(
                state,
                old=aux['prototypes'],
                method=method,
                cfg=perturb_cfg,
                step=step,
                seed=seed,
                model=current,
                source=source,
                mesh=mesh,
                shard_classes=shard_classes,
                num_classes=num_classes,
            )
            log.write(dict(stage=stage, step=step, event='refresh', **stats))
            logging.info(
                '[%s] refresh at step %d: %s',
                stage,
                step,
                ' '.join(f'{k} {v:.4g}' for k, v in stats.items()),
            )
        images = pipeline.to_global(next(stream), mesh)
        state, metrics = step_fn(state, images, aux)
        pending.append(metrics)
        done = step + 1
        if done % log_every_steps == 0 or done == end:
            _check_finite(state, stage, ckpt.directory)
            now = time.time()
            seconds += now - t_log
            means = {k: float(np.mean([m[k] for m in pending])) for k in pending[0]}
            rate = (done - step_log) * batch / (now - t_log)
            eta = (steps - done) * batch / max(rate, 1e-9)
            log.write(
                dict(
                    stage=stage,
                    step=done,
                    lr=float(schedule(done - 1)),
                    images_per_sec=rate,
                    **means,
                )
            )
            logging.info(
                '[%s] %d/%d %s lr %.4g | %.0f img/s | ETA %s',
                stage,
                done,
                steps,
                ' '.join(f'{k} {v:.4f}' for k, v in means.items()),
                float(schedule(done - 1)),
                rate,
                _hms(eta),
            )
            pending, t_log, step_log = [], now, done
        if done % ckpt_cfg.every_steps == 0 or done == steps:
            _check_finite(state, stage, ckpt.directory)
            ckpt.save(done, state, stream.get_state(), dict(meta, seconds=seconds))

    # ---------------------------------------------------------------- shutdown
    if perturbing and end == steps and jax.process_index() == 0:
        from bcl_jax import plots  # matplotlib only where a figure is made

        bank = lambda x: sharding.to_host(x)[:num_classes]
        plots.perturbation_figure(
            bank(aux['prototypes']),
            bank(state['bank']['positive']),
            bank(l2_normalize(state['bank']['new'])),
            os.path.join(directory, 'perturbation.png'),
            title=f'{stage}: {method}',
        )
    log.close()
    ckpt.close()
    return Trained(
        graphdef,
        state['params'],
        state['batch_stats'],
        model_cfg,
        num_classes,
        int(state['step']),
        seconds,
    )


def refresh_bank(
    state,
    *,
    old,
    method: str,
    cfg,
    step: int,
    seed: int,
    model: Trained,
    source,
    mesh,
    shard_classes: bool = False,
    num_classes: int | None = None,
):
    """Recomputes the perturbed positive prototypes from the current new prototypes.

    The new prototypes q are the EMA kept by the step, or an exact pass of the current model
    over the training set (`cfg.new_prototypes`). NDPP perturbs the old bank p directly; ODPP
    solves its offset Δ afresh (Δ = 0, fresh Adam). With `shard_classes` the banks stay sharded
    by class: NDPP's neighbour search runs sharded (`knn.sharded_topk`) and ODPP's Δ and Adam
    state stay sharded. `num_classes`: the real classes when the banks carry class padding.
    Returns the new state and what to log.
    """
    bank = state['bank']
    c = old.shape[0] if num_classes is None else num_classes
    layout, rows = bank['positive'].sharding, bank['positive'].shape[0]
    place = lambda x: jax.device_put(sharding.pad_rows(x, rows), layout)
    sharded = dict(mesh=mesh, axis=sharding.AXIS) if shard_classes else {}
    if cfg.new_prototypes == 'exact':
        new = place(
            prototypes.compute(
                model,
                source,
                num_classes=c,
                mesh=mesh,
                batch_size=cfg.exact_batch_size,
                shard_classes=shard_classes,
            )
        )
    elif cfg.new_prototypes == 'ema':
        new = l2_normalize(bank['new'])
    else:
        raise ValueError(f"perturb.new_prototypes={cfg.new_prototypes!r}: use 'ema' or 'exact'")
    stats = {}
    if method == 'ndpp':
        positive = perturbation.ndpp(old, new, num_classes=c, **sharded, **cfg.ndpp.to_dict())
        delta = bank['delta']
    else:
        options = cfg.odpp.to_dict()
        steps = perturbation.passes_to_steps(c, options.pop('passes'), options['pairs_per_step'])
        key = jax.random.fold_in(jax.random.key(seed), step)
        solved, log = perturbation.odpp(
            old, new, None, key, steps=steps, num_classes=c, **sharded, **options
        )
        delta = solved['delta']
        positive = l2_normalize(old + delta)
        stats = {k: float(v) for k, v in log.items() if k != 'loss'}
        stats.update(odpp_loss_first=float(log['loss'][0]), odpp_loss_last=float(log['loss'][-1]))
    positive = place(positive)
    stats = dict(perturbation.perturbation_stats(old, positive, num_classes=c, **sharded), **stats)
    new_bank = jax.device_put(
        dict(
            positive=positive, new=bank['new'] if cfg.new_prototypes == 'ema' else new, delta=delta
        ),
        layout,
    )
    return dict(state, bank=new_bank), stats


def _hms(seconds: float) -> str:
    seconds = int(seconds) if math.isfinite(seconds) else 0
    return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


def load(directory: str, model_cfg, num_classes: int, mesh, shard_classes: bool = False) -> Trained:
    """A finished model from a stage's checkpoint directory (e.g. a given old model), laid out
    on `mesh` (its classifier sharded by class with `shard_classes`), whatever mesh wrote it."""
    graphdef, params, stats = init_model(model_cfg, num_classes, seed=0)
    ckpt = checkpoint.Checkpointer(directory, max_to_keep=None, read_only=True)
    step = ckpt.latest_step()
    if step is None:
        raise FileNotFoundError(
            f'no checkpoint in {directory}: give the directory that holds '
            'the numbered step folders of a finished old-model run'
        )
    target, _ = sharding.place(
        dict(params=params, batch_stats=stats), mesh, shard_classes=shard_classes
    )
    weights, meta = ckpt.restore_weights(
        step, target, dict(model=_describe(model_cfg), num_classes=num_classes), strict=False
    )
    ckpt.close()
    return Trained(
        graphdef,
        weights['params'],
        weights['batch_stats'],
        model_cfg,
        num_classes,
        step,
        meta.get('seconds', 0.0),
    )
