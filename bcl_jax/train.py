"""The training loop of bcl_jax, for an old model or a compatible new model.

One function, `train(stage, reference, loop)`, read top to bottom: set-up (bcl_jax.step builds the
state and the jitted step), resume, the loop, shutdown. What a stage trains against (the frozen
old model and its prototypes) is its `stage.Reference`; what its method adds (loss terms, state,
work between steps) is asked of `stage.method` (bcl_jax.methods) in one place each.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time

import jax
import numpy as np
from absl import logging
from etils import epath

from bcl_jax import checkpoint, console, sharding
from bcl_jax import step as step_lib
from bcl_jax.checkpoint import MODEL_DEFAULTS
from bcl_jax.data import pipeline, storage
from bcl_jax.errors import ChangedConfigError
from bcl_jax.fingerprint import check_fingerprint
from bcl_jax.methods import HookContext
from bcl_jax.stage import Reference, Stage, Trained, describe


@dataclasses.dataclass(frozen=True)
class Loop:
    """The options of the training loop that every stage of a run shares (from its config):
    logging, checkpoints, the input stream, the class layout and what a changed stage does."""

    log_every_steps: int = 50
    ckpt_every_steps: int = 500
    max_to_keep: int | None = 2
    async_save: bool = True
    retrain: bool = False  # config.on_change='retrain': a changed or damaged stage moves aside
    shard_classes: bool = False
    augment: pipeline.Augment = pipeline.Augment()
    num_threads: int = 2
    workers: int = 0

    @classmethod
    def from_config(cls, config) -> Loop:
        return cls(
            log_every_steps=config.log_every_steps,
            ckpt_every_steps=config.ckpt.every_steps,
            max_to_keep=config.ckpt.max_to_keep,
            async_save=config.ckpt.async_save,
            retrain=config.on_change == 'retrain',
            shard_classes=config.mesh.shard_classes,
            augment=pipeline.Augment.from_config(config.data),
            num_threads=config.data.num_threads,
            workers=config.data.workers,
        )


class _Log:
    """metrics.jsonl + TensorBoard + a progress line; only process 0 writes."""

    def __init__(self, directory: str, stage: str, resume_step: int):
        self.stage, self.writer = stage, None
        self.path = epath.Path(directory) / 'metrics.jsonl'
        if jax.process_index() != 0:
            return
        # Drop lines a killed run wrote after its last checkpoint: they are about to be redone.
        if self.path.exists():
            records = []
            for line in self.path.read_text().splitlines():
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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        import importlib.util

        from tensorboardX import SummaryWriter  # TF-free event writer

        # tensorboardX writes gs:// events through google-cloud-storage, when it is installed.
        if storage.is_local(directory) or importlib.util.find_spec('google.cloud.storage'):
            self.writer = SummaryWriter(os.path.join(directory, 'tb'))
        else:
            logging.warning('[%s] no TensorBoard events: pip install google-cloud-storage', stage)

    def write(self, record: dict):
        if jax.process_index() != 0:
            return
        storage.append(self.path, json.dumps(record) + '\n')
        if self.writer is None:
            return
        for k, v in record.items():
            if isinstance(v, float):
                self.writer.add_scalar(f'{self.stage}/{k}', v, record['step'])
        self.writer.flush()

    def event(self, step: int, record: dict):
        """Something a method did between steps (e.g. a refresh), logged with its numbers."""
        self.write(dict(stage=self.stage, step=step, **record))
        numbers = ' '.join(f'{k} {v:.4g}' for k, v in record.items() if isinstance(v, float))
        logging.info('[%s] %s at step %d: %s', self.stage, record.get('event'), step, numbers)

    def progress(self, done: int, steps: int, pending: list, *, lr: float, rate: float, eta: float):
        """The mean of each metric over the steps since the last line, the rate (images/s) and
        the ETA (seconds)."""
        means = {k: float(np.mean([m[k] for m in pending])) for k in pending[0]}
        self.write(dict(stage=self.stage, step=done, lr=lr, images_per_sec=rate, **means))
        logging.info(
            '[%s] %d/%d %s lr %.4g | %.0f img/s | ETA %s',
            self.stage,
            done,
            steps,
            ' '.join(f'{k} {v:.4f}' for k, v in means.items()),
            lr,
            rate,
            _hms(eta),
        )

    def close(self):
        if self.writer is not None:
            self.writer.close()


def _resume(ckpt, state, meta: dict, stream, name: str):
    """(state, step, seconds trained) from the latest readable checkpoint, the input stream set
    to its position; the initial state at step 0 when there is none."""
    if ckpt.latest_step() is None:
        return state, 0, 0.0
    # Onto this mesh's shardings and class padding, whatever mesh wrote the checkpoint.
    state, data_state, saved, _ = ckpt.restore_latest(state, meta, strict=False)
    stream.set_state(data_state)
    start, steps = int(state['step']), meta['total_steps']
    verb = 'finished' if start >= steps else 'resuming'
    logging.info('[%s] %s at step %d/%d from %s', name, verb, start, steps, ckpt.directory)
    return state, start, saved.get('seconds', 0.0)


def _trained(stage: Stage, graphdef, state, seconds: float, steps: int) -> Trained:
    """The model of a train state, with what results.json records of its training."""
    return Trained(
        graphdef,
        state['params'],
        state['batch_stats'],
        stage.model_cfg,
        stage.num_classes,
        int(state['step']),
        seconds,
        total_steps=steps,
        notes=stage.method.notes(),
    )


def _finished(stage: Stage, ckpt, meta: dict, mesh, shard_classes: bool) -> Trained | None:
    """A finished stage's model from its last checkpoint: the weights alone, onto a model
    initialised abstractly enough to take them (no optimizer, method state or step to build).
    None when the stage is not finished, or its checkpoint predates the method's notes in it
    (then the full restore, which recomputes them)."""
    latest = ckpt.latest_step()
    if latest is None or latest < meta['total_steps'] or 'notes' not in ckpt.read_meta():
        return None
    cfg = stage.model_cfg
    graphdef, params, stats = step_lib.init_model(cfg, stage.num_classes, 0, pretrained=False)
    target, _ = sharding.place(
        dict(params=params, batch_stats=stats), mesh, shard_classes=shard_classes
    )
    weights, saved, step = ckpt.restore_latest_weights(target, meta, strict=False)
    if step < meta['total_steps']:  # the last step was unreadable: the full restore decides
        return None
    logging.info('[%s] finished at step %d/%d from %s', stage.name, step, step, ckpt.directory)
    return Trained(
        graphdef,
        weights['params'],
        weights['batch_stats'],
        cfg,
        stage.num_classes,
        step,
        saved.get('seconds', 0.0),
        total_steps=meta['total_steps'],
        notes=saved['notes'],
    )


def _banner(stage: Stage, setup, steps: int, per_epoch: float, mesh, shard_classes: bool) -> str:
    batch = stage.train_cfg.batch_size
    return (
        f'method={stage.method.name} params={setup.num_params:,} steps={steps} '
        f'({steps / per_epoch:.1f} epochs of {len(stage.source)} images) global batch={batch} '
        f'({batch // mesh.size} per device on {mesh.size} devices); {stage.num_classes} '
        f'classes {"sharded by class" if shard_classes else "replicated"}'
    )


def _learning_rate_advice(stage: Stage, directory: str) -> str:
    """How to train `stage` anew with a lower learning rate: a command that a rerun accepts (a
    changed setting alone is refused, bcl_jax.fingerprint; on_change=retrain moves the stage aside)."""
    lr = stage.train_cfg.learning_rate
    aside = f'moves {directory} aside to {directory}.replaced-<n> and trains it anew'
    if stage.name == 'old' or stage.name.startswith('new_'):
        group = 'old' if stage.name == 'old' else 'new'
        every = '' if group == 'old' else ' (every new model trains with it)'
        return (
            f'To train it anew with a lower learning rate (now {lr:g}), rerun the same command '
            f'with --config.{group}.train.learning_rate={lr / 10:g}{every} '
            f'--config.on_change=retrain: that {aside}.'
        )
    return (
        f'To train it anew with a lower learning rate (now {lr:g}), set '
        f"train=dict(learning_rate={lr / 10:g}) in config.upgrades['{stage.name}'] and rerun "
        f'with --config.on_change=retrain: that {aside}.'
    )


def _check_finite(state, stage: Stage, ckpt_dir: str, directory: str):
    bad = int(state['first_nonfinite_step'])
    if bad >= 0:
        raise FloatingPointError(
            f'[{stage.name}] the loss or the weights became NaN or Inf at step {bad}. The last '
            f'good checkpoint is in {ckpt_dir}; resuming from it with the same settings meets the '
            f'same step again. {_learning_rate_advice(stage, directory)} Or check the data.'
        )


def _hms(seconds: float) -> str:
    seconds = int(seconds) if math.isfinite(seconds) else 0
    return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


def _move_aside(directory: str) -> str:
    """Renames a stage's folder to the first free `<folder>.replaced-<n>` (nothing is deleted)."""
    n = 1
    while epath.Path(f'{directory}.replaced-{n}').exists():
        n += 1
    epath.Path(directory).rename(f'{directory}.replaced-{n}')
    return f'{directory}.replaced-{n}'


def _open_checkpoints(stage: Stage, directory: str, loop: Loop) -> checkpoint.Checkpointer:
    """The stage's checkpoints, after checking that they were made by this stage's settings.

    A file of its latest step that differs from the digest recorded when it was written stops
    (`checkpoint.DamagedError`). With `loop.retrain` (on_change='retrain') a stage made with other
    settings, or a damaged one, is moved aside first.
    """
    ckpt = checkpoint.Checkpointer(
        os.path.join(directory, 'ckpt'),
        max_to_keep=loop.max_to_keep,
        async_save=loop.async_save,
    )
    if ckpt.latest_step() is None:
        return ckpt
    try:
        saved = ckpt.read_meta().get('fingerprint')
        check_fingerprint(
            saved, stage.fingerprint, where=ckpt.directory, what=f'the stage {stage.name!r}'
        )
        ckpt.verify(ckpt.latest_step())  # every file of the step a resume or reuse reads
    except (ChangedConfigError, checkpoint.DamagedError) as e:
        if not loop.retrain or jax.process_count() > 1:
            raise
        ckpt.close()
        why = 'damaged' if isinstance(e, checkpoint.DamagedError) else 'settings changed'
        logging.warning('[%s] %s: moved to %s', stage.name, why, _move_aside(directory))
        return _open_checkpoints(stage, directory, loop)
    return ckpt


class _Waits:
    """The training loop's profile (bcl_jax.console): the time of each named part of the loop,
    and the rest of the loop's time as 'steps'."""

    def __init__(self, stage: str):
        self.stage, self.parts = stage, {}

    @contextlib.contextmanager
    def __call__(self, part: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.parts[part] = self.parts.get(part, 0.0) + time.perf_counter() - start

    def record(self, loop_seconds: float):
        console.add_time(f'{self.stage}: steps', loop_seconds - sum(self.parts.values()))
        for part, seconds in self.parts.items():
            console.add_time(f'{self.stage}: {part}', seconds)


def _meta(stage: Stage, steps: int) -> dict:
    """What a stage's checkpoints record of it (checked when they are read back)."""
    return dict(
        stage=stage.name,
        model=describe(stage.model_cfg),
        num_classes=stage.num_classes,
        total_steps=steps,
        method=stage.method.name,
        fingerprint=stage.fingerprint,
    )


def _stream(stage: Stage, loop: Loop) -> pipeline.TrainStream:
    """The stage's endless, seeded, augmented stream of training batches."""
    return pipeline.train_stream(
        stage.source,
        global_batch=stage.train_cfg.batch_size,
        seed=stage.seed,
        augment=loop.augment,
        num_threads=loop.num_threads,
        workers=loop.workers,
    )


def train(
    stage: Stage,
    reference: Reference | None,
    loop: Loop,
    *,
    mesh,
    workdir: str,
    stop_after_steps: int | None = None,
) -> Trained:
    """Trains (or resumes, or just loads a finished) `stage` against `reference` with the
    loop options `loop` (bcl_jax.plan builds all three); returns it."""
    # ---------------------------------------------------------------- set-up
    set_up_start = time.perf_counter()
    pipeline.check_source(stage.source, f'{stage.name} training set')
    directory = os.path.join(workdir, stage.name)
    steps, per_epoch = step_lib.total_steps(stage.train_cfg, len(stage.source))
    batch = stage.train_cfg.batch_size
    pipeline.local_batch_size(batch)  # fails early on a batch the devices cannot split
    shard_classes = loop.shard_classes
    step_lib.check_reference(stage.method, reference)  # before its folder is made
    ckpt = _open_checkpoints(stage, directory, loop)
    meta = _meta(stage, steps)
    finished = _finished(stage, ckpt, meta, mesh, shard_classes)
    if finished is not None:
        ckpt.close()
        console.add_time(f'{stage.name}: set-up and restore', time.perf_counter() - set_up_start)
        return finished
    logging.info('[%s] building the model, its optimizer and its train step', stage.name)
    setup = step_lib.build(stage, reference, mesh=mesh, shard_classes=shard_classes)
    state, method = setup.state, stage.method
    hooks = HookContext(
        stage, setup.reference, setup.graphdef, mesh, shard_classes, directory, per_epoch
    )

    # ---------------------------------------------------------------- resume
    stream = _stream(stage, loop)
    state, start, seconds = _resume(ckpt, state, meta, stream, stage.name)
    console.add_time(f'{stage.name}: set-up and restore', time.perf_counter() - set_up_start)
    if start >= steps:
        ckpt.close()
        stream.close()
        return _trained(stage, setup.graphdef, state, seconds, steps)
    logging.info(
        '[%s] %s', stage.name, _banner(stage, setup, steps, per_epoch, mesh, shard_classes)
    )

    # ---------------------------------------------------------------- loop
    log = _Log(directory, stage.name, start)
    end = steps if stop_after_steps is None else min(steps, stop_after_steps)
    pending, t_log, step_log = [], time.time(), start
    # However the loop ends (a NaN, an error, Ctrl-C), a save still being written completes.
    loop_start, waits = time.perf_counter(), _Waits(stage.name)
    try:
        for step in range(start, end):
            with waits('work between steps'):
                state, record = method.before_step(state, step, hooks)
            if record is not None:
                log.event(step, record)
            with waits('waiting for input'):
                images = pipeline.to_global(next(stream), mesh)
            if step == start:  # the first step compiles it: say so, and time it apart
                logging.info('[%s] compiling the train step', stage.name)
                with waits('first step (compiles)'):
                    state, metrics = setup.step_fn(state, images, setup.reference)
                    jax.block_until_ready(metrics)
            else:
                state, metrics = setup.step_fn(state, images, setup.reference)
            pending.append(metrics)
            done = step + 1
            if done % loop.log_every_steps == 0 or done == end:
                _check_finite(state, stage, ckpt.directory, directory)
                now = time.time()
                seconds += now - t_log
                rate = (done - step_log) * batch / (now - t_log)
                eta = (steps - done) * batch / max(rate, 1e-9)
                log.progress(
                    done, steps, pending, lr=float(setup.schedule(done - 1)), rate=rate, eta=eta
                )
                pending, t_log, step_log = [], now, done
            if done % loop.ckpt_every_steps == 0 or done == steps:
                with waits('checkpoints'):
                    _check_finite(state, stage, ckpt.directory, directory)
                    saved = dict(meta, seconds=seconds, notes=method.notes())
                    ckpt.save(done, state, stream.get_state(), saved)
        if end == steps:
            with waits('work between steps'):
                method.finish(state, hooks)
    finally:
        waits.record(time.perf_counter() - loop_start)
        log.close()
        ckpt.close()
        stream.close()
    return _trained(stage, setup.graphdef, state, seconds, steps)


def load(
    directory: str,
    model_cfg,
    num_classes: int,
    mesh,
    shard_classes: bool = False,
    *,
    allow_unfinished: bool = True,
    unfinished_hint: str = 'set --config.old.allow_unfinished=True to use it as it is',
) -> Trained:
    """A model from a stage's checkpoint directory (e.g. a given old model), laid out on `mesh`
    (its classifier sharded by class with `shard_classes`), whatever mesh wrote it.

    A checkpoint short of its stage's last step stops unless `allow_unfinished`; the step and the
    total are on the returned model (`step`, `total_steps`).
    """
    graphdef, params, stats = step_lib.init_model(model_cfg, num_classes, 0, pretrained=False)
    ckpt = checkpoint.Checkpointer(directory, max_to_keep=None, read_only=True)
    if ckpt.latest_step() is None:
        raise FileNotFoundError(
            f'no checkpoint in {directory}: give the directory that holds '
            'the numbered step folders of a finished old-model run'
        )
    target, _ = sharding.place(
        dict(params=params, batch_stats=stats), mesh, shard_classes=shard_classes
    )
    expected = dict(model=describe(model_cfg), num_classes=num_classes)
    weights, meta, step = ckpt.restore_latest_weights(target, expected, strict=False)
    ckpt.close()
    total = meta.get('total_steps')
    if total is not None and step < total and not allow_unfinished:
        raise ValueError(
            f'{directory} holds step {step} of {total}: the model did not finish training. '
            f'Finish it (rerun its command), point to a finished one, or {unfinished_hint}.'
        )
    return Trained(
        graphdef,
        weights['params'],
        weights['batch_stats'],
        model_cfg,
        num_classes,
        step,
        meta.get('seconds', 0.0),
        total_steps=total,
    )


def load_checkpoint(
    directory: str, mesh, *, allow_unfinished: bool = False, unfinished_hint: str = ''
) -> Trained:
    """A model from any bcl_jax stage's checkpoint, its architecture and class count read from
    the checkpoint itself (for the commands that take checkpoints, not configs). A checkpoint
    short of its stage's last step stops (`unfinished_hint`: how to accept it) unless
    `allow_unfinished`."""
    ckpt = checkpoint.Checkpointer(directory, max_to_keep=None, read_only=True)
    meta = ckpt.read_meta() if ckpt.latest_step() is not None else {}
    ckpt.close()
    if 'model' not in meta or 'num_classes' not in meta:
        raise ValueError(
            f'{directory} is not a bcl_jax checkpoint folder (no model description in its '
            'meta): give a stage\'s ckpt/ folder, e.g. runs/x/new_bct/ckpt'
        )
    from ml_collections import config_dict

    model_cfg = config_dict.ConfigDict(dict(scale=30.0, margin=0.3, dtype='float32', pretrained=''))
    model_cfg.update(dict(MODEL_DEFAULTS, **meta['model']))
    hint = unfinished_hint or 'pass --allow_unfinished to use it as it is'
    return load(
        directory,
        model_cfg,
        meta['num_classes'],
        mesh,
        allow_unfinished=allow_unfinished,
        unfinished_hint=hint,
    )
