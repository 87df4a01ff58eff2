"""Tests for bcl_jax.train: the loop's NaN stops, bad input, resume on another mesh, and the
refusal to reuse or resume a stage trained under other settings.
"""

import json
import os
import re

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from bcl_jax import checkpoint, main, sharding, train
from bcl_jax import data as data_lib
from bcl_jax import plan as plan_lib
from bcl_jax import step as step_lib
from bcl_jax.data import pipeline
from configs import synthetic
from tests.stages import host
from tests.test_step import assert_trees_close, cosface_loss_reference

# --------------------------------------------------------------------------- NaN stop


@pytest.fixture(scope='module')
def smoke():
    cfg = synthetic.get_config('smoke')
    return cfg, data_lib.build(cfg.data)


def train_old(cfg, data, workdir, mesh=None, **kw):
    """The old stage of `cfg` as main.run trains it."""
    mesh = sharding.make_mesh(cfg.mesh) if mesh is None else mesh
    stage = plan_lib.old_stage(plan_lib.plan(cfg, data))
    return train.train(
        stage, None, train.Loop.from_config(cfg), mesh=mesh, workdir=str(workdir), **kw
    )


def restore_params(directory, cfg, data, step):
    ckpt = checkpoint.Checkpointer(directory, max_to_keep=None, read_only=True)
    _, params, stats = step_lib.init_model(cfg.old.model, data.old_train.num_classes, seed=0)
    weights, _ = ckpt.restore_weights(
        step, jax.device_put(dict(params=params, batch_stats=stats)), {}
    )
    ckpt.close()
    return host(weights), saved_steps(directory)


def saved_steps(directory):
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def all_finite(tree):
    return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(tree))


def nan_config(lr, drop_factor=0.1, drop_epochs=()):
    cfg = synthetic.get_config('smoke')
    cfg.old.train.learning_rate = lr
    cfg.old.train.lr_drop_factor = drop_factor
    cfg.old.train.lr_drop_epochs = drop_epochs
    cfg.old.train.epochs = 4  # 10 steps of 16 of the 40 old images
    cfg.ckpt.every_steps, cfg.log_every_steps = 1, 1
    return cfg


@pytest.fixture(scope='module')
def nan_run(smoke, tmp_path_factory):
    """lr 0.1 for 2 steps, then 1e30 (a drop 'factor' of 1e31 at epoch 0.8 = step 2).

    Step 3 (1-based, lr 1e30) still computes a finite loss from finite weights but moves them
    to ~1e31; step 4's forward pass then overflows. So the 4th step is the first with a
    non-finite loss, and checkpoints 1..3 are saved.
    """
    _, data = smoke
    cfg = nan_config(0.1, drop_factor=1e31, drop_epochs=(0.8,))
    workdir = tmp_path_factory.mktemp('nan')
    with pytest.raises(FloatingPointError) as err:
        train_old(cfg, data, workdir)
    return cfg, data, workdir, str(err.value)


def test_nan_loss_stops_training_with_the_last_good_checkpoint(nan_run):
    cfg, data, workdir, message = nan_run
    ckpt_dir = os.path.join(workdir, 'old', 'ckpt')
    assert 'NaN or Inf' in message and ckpt_dir in message and '[old]' in message
    # It names the bad step as the logs count steps (from 1).
    assert re.search(r'at step 4\b', message), message
    weights, steps = restore_params(ckpt_dir, cfg, data, 3)
    assert steps[-1] == 3  # nothing saved after the bad step
    assert all_finite(weights)
    # The metrics written before the stop are the finite ones: steps 1..3.
    with open(os.path.join(workdir, 'old', 'metrics.jsonl')) as f:
        records = [json.loads(l) for l in f]
    assert [r['step'] for r in records] == [1, 2, 3]
    assert all(np.isfinite(r['loss']) for r in records)
    assert records[2]['lr'] == pytest.approx(1e30, rel=1e-6)

    # Independently: from checkpoint 3's weights, the next batch's loss is not finite.
    graphdef, params, stats = step_lib.init_model(cfg.old.model, data.old_train.num_classes, 0)
    tx, _ = step_lib.make_optimizer(cfg.old.train, len(data.old_train) / cfg.old.train.batch_size)
    template = jax.device_put(step_lib.initial_state(params, stats, tx))
    ckpt = checkpoint.Checkpointer(ckpt_dir, max_to_keep=None, read_only=True)
    state, data_state, _ = ckpt.restore(3, template, {})
    ckpt.close()
    assert int(state['step']) == 3 and int(state['first_nonfinite_step']) == -1
    stream = pipeline.train_stream(
        data.old_train,
        global_batch=16,
        seed=cfg.seed,
        crop_padding=cfg.data.crop_padding,
        flip=cfg.data.flip,
    )
    stream.set_state(data_state)
    batch = next(stream)
    loss = cosface_loss_reference(
        state['params'],
        state['batch_stats'],
        graphdef,
        batch,
        cfg.old.model.scale,
        cfg.old.model.margin,
    )
    assert not np.isfinite(float(loss))


def test_nan_message_uses_the_numbering_of_the_logs(nan_run):
    assert 'at step 4.' in nan_run[3]


def test_overflowing_update_is_not_checkpointed(smoke, tmp_path):
    _, data = smoke
    cfg = nan_config(1e38)
    with pytest.raises(FloatingPointError):
        train_old(cfg, data, tmp_path)
    ckpt_dir = os.path.join(tmp_path, 'old', 'ckpt')
    for step in saved_steps(ckpt_dir):
        weights, _ = restore_params(ckpt_dir, cfg, data, step)
        assert all_finite(weights), f'checkpoint {step} holds non-finite weights'


# --------------------------------------------------------------------------- bad input


def test_compatible_method_without_old_model_is_refused(smoke, tmp_path):
    cfg, data = smoke
    stage = plan_lib.new_stage(plan_lib.plan(cfg, data), 'bct', None)
    with pytest.raises(ValueError, match="'bct' needs the old model"):
        train.train(
            stage,
            None,
            train.Loop.from_config(cfg),
            mesh=sharding.make_mesh(cfg.mesh),
            workdir=str(tmp_path),
        )
    assert not os.path.exists(os.path.join(tmp_path, 'new_bct'))


@pytest.mark.parametrize('n', [3, 16])
def test_mesh_size_that_does_not_match_the_devices(n):
    with pytest.raises(ValueError, match=rf'config.mesh.data={n} does not match the 8 devices'):
        sharding.make_mesh(ml_collections.ConfigDict(dict(data=n)))


def test_mesh_of_all_devices():
    assert sharding.make_mesh(ml_collections.ConfigDict(dict(data=8))).devices.size == 8


def test_batch_not_divisible_by_devices(smoke, tmp_path):
    cfg, data = smoke
    bad = synthetic.get_config('smoke')
    bad.old.train.batch_size = 12
    with pytest.raises(ValueError, match='batch size 12 is not divisible by the 8 devices'):
        train_old(bad, data, tmp_path)
    assert not os.path.exists(os.path.join(tmp_path, 'old', 'ckpt'))


@pytest.mark.slow
def test_class_sharded_run_resumes_on_another_mesh(smoke, tmp_path):
    """Stopped after 2 steps with the classifier sharded by class over 8 devices (4 classes,
    padded to 8), then resumed replicated on 1 device: the weights of a 1-device run."""
    cfg, data = smoke
    eight, one = (
        sharding.make_mesh(cfg.mesh),
        sharding.make_mesh(cfg.mesh, devices=jax.devices()[:1]),
    )

    def run(workdir, mesh, shard_classes, stop=None):
        c = cfg.copy_and_resolve_references()
        c.mesh.shard_classes = shard_classes
        return train_old(c, data, workdir, mesh=mesh, stop_after_steps=stop)

    dim, classes = cfg.old.model.embedding_dim, data.old_train.num_classes
    first = run(tmp_path / 'a', eight, True, stop=2)
    kernel = first.params['classifier']['kernel']
    assert first.step == 2 and classes == 4
    assert kernel.shape == (dim, 8) and kernel.sharding.spec == P(None, 'data')
    resumed = run(tmp_path / 'a', one, False)
    straight = run(tmp_path / 'b', one, False)
    assert resumed.step == straight.step == 5
    kernel = resumed.params['classifier']['kernel']
    assert kernel.shape == (dim, classes) and kernel.sharding.mesh == one
    assert_trees_close(host(resumed.params), host(straight.params))
    assert_trees_close(host(resumed.batch_stats), host(straight.batch_stats))


# --------------------------------------------------------------------------- finished stages


def _no_build(*args, **kwargs):
    raise AssertionError('a finished stage built its train step')


def test_a_finished_stage_loads_its_weights_without_building_its_step(smoke, tmp_path, monkeypatch):
    """A rerun of a finished stage reads the weights alone: the same model, step and time as the
    run that trained it, and no optimizer, method state or step is built."""
    cfg, data = smoke
    first = train_old(cfg, data, tmp_path)
    monkeypatch.setattr(step_lib, 'build', _no_build)
    again = train_old(cfg, data, tmp_path)
    assert (again.step, again.total_steps, again.seconds) == (
        first.step,
        first.total_steps,
        first.seconds,
    )
    assert again.identity() == first.identity()
    np.testing.assert_array_equal(
        host(again.params)['classifier']['kernel'], host(first.params)['classifier']['kernel']
    )


def test_a_finished_stage_keeps_its_method_notes_and_older_checkpoints_restore_in_full(
    tmp_path, monkeypatch
):
    """NDPP's calibration (its notes) comes back from the checkpoint, as the run that trained it
    computed it; a checkpoint without notes (an older bcl_jax) is restored in full, which
    recomputes them."""
    cfg = synthetic.get_config('smoke,methods=ndpp')
    cfg.perturb.ndpp.rho = 0.5
    first = main.run(cfg, str(tmp_path))['methods']['ndpp']
    assert first['calibration']['rho'] > 0
    builds = []
    build = step_lib.build
    monkeypatch.setattr(
        step_lib, 'build', lambda *a, **k: builds.append(a[0].name) or build(*a, **k)
    )
    again = main.run(cfg, str(tmp_path))['methods']['ndpp']
    assert builds == [] and again == first
    read_meta = checkpoint.Checkpointer.read_meta
    monkeypatch.setattr(
        checkpoint.Checkpointer,
        'read_meta',
        lambda self: {k: v for k, v in read_meta(self).items() if k != 'notes'},
    )
    legacy = main.run(cfg, str(tmp_path))['methods']['ndpp']
    assert builds == ['old', 'new_ndpp'] and legacy == first
