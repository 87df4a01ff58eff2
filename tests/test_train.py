"""Tests for bcl_jax.train: the sharded train step, the optimizer, schedules, NaN stops, bad input.

References are independent of the library's step: a 1-device mesh for the 8-device step, a
NumPy SGD-with-momentum update from a separately computed gradient, and schedules worked by hand.
"""

import json
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bcl_jax import checkpoint, train
from bcl_jax import data as data_lib
from bcl_jax.data import pipeline
from configs import common, synthetic

NUM_CLASSES = 6
OLD_CLASSES = 3
BATCH = 16
SIZE = 16


def tiny_model_cfg(embedding_dim=16, head='cosface'):
    return common.model(
        arch='cifar_resnet', width=4, depth=8, embedding_dim=embedding_dim, head=head
    )


def tiny_train_cfg(**overrides):
    cfg = common.train(epochs=1.0, batch_size=BATCH, learning_rate=0.1, lr_drop_epochs=())
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


def one_device_mesh():
    return jax.make_mesh(
        (1,), ('data',), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1]
    )


def host(tree):
    """A host (NumPy) copy of a pytree: device_put of it never aliases a donated buffer."""
    return jax.tree.map(lambda x: np.array(x), tree)


def make_batch(seed=0):
    rng = np.random.default_rng(seed)
    return dict(
        image=rng.integers(0, 256, (BATCH, SIZE, SIZE, 3), dtype=np.uint8),
        label=rng.integers(0, NUM_CLASSES, BATCH).astype(np.int32),
    )


def initial_state(model_cfg, train_cfg, seed=1):
    """The state train.train starts from, on the host."""
    graphdef, params, stats = train.init_model(model_cfg, NUM_CLASSES, seed)
    tx, _ = train.make_optimizer(train_cfg, steps_per_epoch=10.0)
    state = dict(
        step=np.int32(0),
        params=params,
        batch_stats=stats,
        opt_state=tx.init(params),
        first_nonfinite_step=np.int32(-1),
    )
    return graphdef, tx, host(state)


def old_model_and_aux():
    """A (randomly initialised) old model and the aux dict main.run builds from it."""
    old_cfg = tiny_model_cfg()
    graphdef, params, stats = train.init_model(old_cfg, OLD_CLASSES, seed=7)
    old = train.Trained(graphdef, params, stats, old_cfg, OLD_CLASSES, step=0)
    rng = np.random.default_rng(3)
    bank = rng.normal(size=(NUM_CLASSES, old_cfg.embedding_dim)).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    old_label = np.array([0, -1, 1, -1, 2, -1], np.int32)
    aux = dict(
        prototypes=bank, old_params=host(params), old_batch_stats=host(stats), old_label=old_label
    )
    return old, aux


def run_step(mesh, method, state, batch, aux, *, graphdef, tx, model_cfg, old, perturb=None):
    """One step jitted the way train.train jits it, on `mesh`."""
    compat = ml_collections.ConfigDict(dict(weight=1.0, temperature=0.07))
    weights = {t: compat.weight for t in train.METHOD_TERMS[method]}
    replicated, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
    step = train.jit_train_step(
        mesh,
        train.make_train_step(
            graphdef,
            tx,
            weights=weights,
            model_cfg=model_cfg,
            compat_cfg=compat,
            old=old,
            perturb_cfg=perturb,
        ),
    )
    new_state, metrics = step(
        jax.device_put(host(state), replicated),
        jax.device_put(batch, rows),
        jax.device_put(host(aux), replicated),
    )
    return host(new_state), host(metrics)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    la, ta = jax.tree_util.tree_flatten_with_path(a)
    lb, tb = jax.tree_util.tree_flatten_with_path(b)
    assert ta == tb
    for (path, x), (_, y) in zip(la, lb):
        np.testing.assert_allclose(
            np.asarray(x), np.asarray(y), rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path)
        )


# --------------------------------------------------------------------------- sharded step


LR, WD, MOMENTUM = 0.05, 1e-3, 0.9
_STEPS = {}


def perturbed_bank_state(state, aux):
    """The state of an NDPP/ODPP run after a refresh: a perturbed positive bank and an EMA."""
    rng = np.random.default_rng(11)
    positive = aux['prototypes'] + 0.3 * rng.normal(size=aux['prototypes'].shape)
    positive /= np.linalg.norm(positive, axis=1, keepdims=True)
    return dict(
        state,
        bank=dict(
            positive=positive.astype(np.float32),
            new=rng.normal(size=positive.shape).astype(np.float32),
            delta=np.zeros_like(positive, np.float32),
        ),
    )


def one_step(method, mesh_name):
    """(initial state, batch, new state, metrics) of one step from the same start; cached, as
    each (method, mesh) pair costs a compilation."""
    if (method, mesh_name) not in _STEPS:
        model_cfg = tiny_model_cfg()
        train_cfg = tiny_train_cfg(learning_rate=LR, weight_decay=WD, momentum=MOMENTUM)
        graphdef, tx, state = initial_state(model_cfg, train_cfg)
        old, aux = old_model_and_aux() if method != 'independent' else (None, {})
        perturb = None
        if method in train.PERTURBATIONS:
            state = perturbed_bank_state(state, aux)
            perturb = common.base_config().perturb
        batch = make_batch()
        mesh = (
            train.make_mesh(ml_collections.ConfigDict(dict(data=-1)))
            if mesh_name == '8'
            else one_device_mesh()
        )
        new_state, metrics = run_step(
            mesh,
            method,
            state,
            batch,
            aux,
            graphdef=graphdef,
            tx=tx,
            model_cfg=model_cfg,
            old=old,
            perturb=perturb,
        )
        _STEPS[method, mesh_name] = dict(
            graphdef=graphdef,
            model_cfg=model_cfg,
            state=state,
            batch=batch,
            new_state=new_state,
            metrics=metrics,
            mesh_size=mesh.devices.size,
        )
    return _STEPS[method, mesh_name]


@pytest.mark.parametrize('method', ['independent', 'bct', 'bct_influence', 'l2', 'ndpp'])
def test_step_on_8_devices_equals_step_on_1_device(method):
    assert jax.device_count() == 8
    r8, r1 = one_step(method, '8'), one_step(method, '1')
    assert (r8['mesh_size'], r1['mesh_size']) == (8, 1)
    (s8, m8), (s1, m1) = (r8['new_state'], r8['metrics']), (r1['new_state'], r1['metrics'])

    expected_terms = {'cls', 'loss'} | set(train.METHOD_TERMS[method])
    assert set(m8) == set(m1) == expected_terms
    for k in m8:
        assert np.isfinite(m8[k]), k
    assert_trees_close(m8, m1)
    for key in ('params', 'batch_stats', 'opt_state'):
        assert_trees_close(s8[key], s1[key])
    assert int(s8['step']) == int(s1['step']) == 1
    assert int(s8['first_nonfinite_step']) == int(s1['first_nonfinite_step']) == -1
    # The step did something: parameters and BatchNorm statistics moved.
    for key in ('params', 'batch_stats'):
        moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), r8['state'][key], s8[key])
        assert any(jax.tree.leaves(moved)), key
    if method != 'independent':
        term = train.METHOD_TERMS[method][0]
        assert m8[term] > 0
        assert m8['loss'] == pytest.approx(m8['cls'] + m8[term], rel=1e-5)


def test_perturbation_step_reads_the_perturbed_bank_and_updates_the_ema():
    """NDPP/ODPP: L_comp takes the positive prototype from state['bank'] and the step moves the
    EMA of the batch's classes towards their batch mean, on 8 devices as on 1."""
    r8, r1 = one_step('ndpp', '8'), one_step('ndpp', '1')
    assert_trees_close(r8['new_state']['bank'], r1['new_state']['bank'])
    bank = r8['state']['bank']
    np.testing.assert_array_equal(r8['new_state']['bank']['positive'], bank['positive'])

    # Independent reference from the model's embeddings of the batch (BatchNorm in train mode).
    model = nnx.merge(r8['graphdef'], r8['state']['params'], r8['state']['batch_stats'])
    emb, _ = model(jnp.asarray(r8['batch']['image']), train=True)
    emb, labels = np.asarray(emb, np.float64), r8['batch']['label']
    decay = common.base_config().perturb.ema_decay
    want = bank['new'].astype(np.float64).copy()
    for c in np.unique(labels):
        want[c] = decay * bank['new'][c] + (1 - decay) * emb[labels == c].mean(0)
    np.testing.assert_allclose(r8['new_state']['bank']['new'], want, rtol=1e-5, atol=1e-5)

    _, aux = old_model_and_aux()
    pos, neg = bank['positive'].astype(np.float64), aux['prototypes'].astype(np.float64)
    logits = emb @ neg.T
    logits[np.arange(len(labels)), labels] = np.sum(emb * pos[labels], axis=1)
    z = logits / 0.07
    z -= z.max(axis=1, keepdims=True)
    comp = np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(labels)), labels])
    assert r8['metrics']['comp'] == pytest.approx(comp, rel=1e-4)


# --------------------------------------------------------------------------- optimizer


def cosface_loss_reference(params, stats, graphdef, batch, scale, margin):
    """Cross-entropy of s·(cos − m·onehot), written here without bcl_jax.losses."""
    model = nnx.merge(graphdef, params, stats)
    _, cos = model(jnp.asarray(batch['image']), train=True)
    onehot = jax.nn.one_hot(batch['label'], cos.shape[-1])
    z = scale * (cos - margin * onehot)
    return jnp.mean(jax.nn.logsumexp(z, axis=-1) - jnp.sum(z * onehot, axis=-1))


def test_one_independent_step_is_sgd_momentum_with_weight_decay():
    r = one_step('independent', '8')
    state, batch, new_state, model_cfg = r['state'], r['batch'], r['new_state'], r['model_cfg']
    graphdef = r['graphdef']
    loss, grads = jax.jit(
        jax.value_and_grad(
            lambda p, s, b: cosface_loss_reference(
                p, s, graphdef, b, model_cfg.scale, model_cfg.margin
            )
        )
    )(state['params'], state['batch_stats'], batch)
    assert float(r['metrics']['cls']) == pytest.approx(float(loss), rel=1e-5)
    grads = host(grads)
    checked = 0
    for path, p in jax.tree_util.tree_flatten_with_path(state['params'])[0]:
        g = np.asarray(_get(grads, path), np.float64)
        p64 = np.asarray(p, np.float64)
        buffer = g + WD * p64  # first momentum buffer: no history yet
        expected = p64 - LR * buffer
        got = np.asarray(_get(new_state['params'], path), np.float64)
        np.testing.assert_allclose(
            got, expected, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path)
        )
        checked += 1
    assert checked == len(jax.tree.leaves(state['params']))


def _get(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def test_second_step_uses_momentum():
    """Two steps with a constant gradient direction check the buffer: b2 = m·b1 + g2 + wd·p1."""
    lr, wd, mom = 0.05, 1e-3, 0.9
    model_cfg = tiny_model_cfg()
    train_cfg = tiny_train_cfg(learning_rate=lr, weight_decay=wd, momentum=mom)
    _, params, _ = train.init_model(model_cfg, NUM_CLASSES, seed=1)
    tx, _ = train.make_optimizer(train_cfg, steps_per_epoch=10.0)
    params = host(params)
    rng = np.random.default_rng(0)
    g1 = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
    g2 = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
    opt = tx.init(params)
    u1, opt = tx.update(g1, opt, params)
    p1 = jax.tree.map(lambda p, u: np.asarray(p) + np.asarray(u), params, u1)
    u2, _ = tx.update(g2, opt, p1)
    for path, p0 in jax.tree_util.tree_flatten_with_path(params)[0]:
        p0 = np.asarray(p0, np.float64)
        b1 = _get(g1, path) + wd * p0
        q1 = p0 - lr * b1
        b2 = mom * b1 + _get(g2, path) + wd * q1
        np.testing.assert_allclose(np.asarray(_get(u2, path)), -lr * b2, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- schedule


def test_total_steps():
    cfg = tiny_train_cfg(epochs=2.0, batch_size=16)
    assert train.total_steps(cfg, 40) == (5, 2.5)  # round(2 * 40 / 16)
    assert train.total_steps(cfg, 128) == (16, 8.0)
    cfg.epochs = 0.5
    assert train.total_steps(cfg, 40) == (1, 2.5)  # round(1.25)
    cfg.steps = 7  # steps override epochs
    assert train.total_steps(cfg, 40) == (7, 2.5)
    cfg.steps, cfg.epochs = 0, 0.1
    with pytest.raises(ValueError, match='0 steps'):
        train.total_steps(cfg, 40)  # round(0.25) = 0


def test_learning_rate_drops_at_configured_epochs():
    cfg = tiny_train_cfg(learning_rate=0.4, lr_drop_epochs=(2.0, 3.5), lr_drop_factor=0.1)
    _, schedule = train.make_optimizer(cfg, steps_per_epoch=4.0)
    # Drops take effect at steps 8 and 14: the lr of step s (0-based) is the lr used by it.
    expected = [0.4] * 8 + [0.04] * 6 + [0.004] * 6
    np.testing.assert_allclose([float(schedule(s)) for s in range(20)], expected, rtol=1e-6)


def test_learning_rate_drop_at_fractional_steps_per_epoch():
    cfg = tiny_train_cfg(learning_rate=1.0, lr_drop_epochs=(1.0,), lr_drop_factor=0.5)
    _, schedule = train.make_optimizer(cfg, steps_per_epoch=2.5)  # epoch 1 -> round(2.5) = 2
    np.testing.assert_allclose([float(schedule(s)) for s in range(5)], [1, 1, 0.5, 0.5, 0.5])


def test_warmup_is_linear_from_zero():
    cfg = tiny_train_cfg(learning_rate=0.4, warmup_steps=4, lr_drop_epochs=())
    _, schedule = train.make_optimizer(cfg, steps_per_epoch=10.0)
    np.testing.assert_allclose(
        [float(schedule(s)) for s in range(7)],
        [0.0, 0.1, 0.2, 0.3, 0.4, 0.4, 0.4],
        rtol=1e-6,
        atol=1e-7,
    )


def test_warmup_does_not_shift_the_drops():
    cfg = tiny_train_cfg(
        learning_rate=0.4, warmup_steps=4, lr_drop_epochs=(1.0,), lr_drop_factor=0.1
    )
    _, schedule = train.make_optimizer(cfg, steps_per_epoch=10.0)  # drop at step 10
    got = [float(schedule(s)) for s in range(16)]
    expected = [0.0, 0.1, 0.2, 0.3] + [0.4] * 6 + [0.04] * 6
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_two_drops_on_the_same_step_both_apply():
    cfg = tiny_train_cfg(learning_rate=1.0, lr_drop_epochs=(1.0, 1.1), lr_drop_factor=0.1)
    _, schedule = train.make_optimizer(cfg, steps_per_epoch=4.0)  # both round to step 4
    assert float(schedule(5)) == pytest.approx(0.01)


def test_optimizer_uses_the_schedule():
    """The update of a zero-decay, zero-momentum step is -lr(step)·g for the scheduled lr."""
    cfg = tiny_train_cfg(
        learning_rate=1.0, lr_drop_epochs=(1.0,), lr_drop_factor=0.1, momentum=0.0, weight_decay=0.0
    )
    tx, _ = train.make_optimizer(cfg, steps_per_epoch=2.0)
    params = {'w': np.zeros(3, np.float32)}
    opt = tx.init(params)
    g = {'w': np.array([1.0, -2.0, 3.0], np.float32)}
    steps = []
    for _ in range(4):
        u, opt = tx.update(g, opt, params)
        steps.append(np.asarray(u['w']))
    np.testing.assert_allclose(steps, [-g['w'], -g['w'], -0.1 * g['w'], -0.1 * g['w']], rtol=1e-6)


# --------------------------------------------------------------------------- NaN stop


@pytest.fixture(scope='module')
def smoke():
    cfg = synthetic.get_config('smoke')
    return cfg, data_lib.build(cfg.data)


def train_old(cfg, data, workdir, **kw):
    return train.train(
        stage='old',
        workdir=str(workdir),
        model_cfg=cfg.old.model,
        train_cfg=cfg.old.train,
        source=data.old_train,
        num_classes=data.old_train.num_classes,
        mesh=train.make_mesh(cfg.mesh),
        seed=cfg.seed,
        data_cfg=cfg.data,
        ckpt_cfg=cfg.ckpt,
        log_every_steps=cfg.log_every_steps,
        **kw,
    )


def restore_params(directory, cfg, data, step):
    ckpt = checkpoint.Checkpointer(directory, max_to_keep=None, read_only=True)
    _, params, stats = train.init_model(cfg.old.model, data.old_train.num_classes, seed=0)
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
    graphdef, params, stats = train.init_model(cfg.old.model, data.old_train.num_classes, 0)
    tx, _ = train.make_optimizer(cfg.old.train, len(data.old_train) / cfg.old.train.batch_size)
    template = jax.device_put(
        dict(
            step=jnp.int32(0),
            params=params,
            batch_stats=stats,
            opt_state=tx.init(params),
            first_nonfinite_step=jnp.int32(-1),
        )
    )
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


def test_unknown_method_is_refused(smoke, tmp_path):
    cfg, data = smoke
    with pytest.raises(ValueError, match=r"unknown method 'btc'.*'bct'"):
        train_old(cfg, data, tmp_path, method='btc')
    assert not os.path.exists(os.path.join(tmp_path, 'old'))


def test_compatible_method_without_old_model_is_refused(smoke, tmp_path):
    cfg, data = smoke
    with pytest.raises(ValueError, match="'bct' needs the old model"):
        train_old(cfg, data, tmp_path, method='bct', compat_cfg=cfg.compat)


@pytest.mark.parametrize('n', [3, 16])
def test_mesh_size_that_does_not_match_the_devices(n):
    with pytest.raises(ValueError, match=rf'config.mesh.data={n} does not match the 8 devices'):
        train.make_mesh(ml_collections.ConfigDict(dict(data=n)))


def test_mesh_of_all_devices():
    assert train.make_mesh(ml_collections.ConfigDict(dict(data=8))).devices.size == 8


def test_batch_not_divisible_by_devices(smoke, tmp_path):
    cfg, data = smoke
    bad = synthetic.get_config('smoke')
    bad.old.train.batch_size = 12
    with pytest.raises(ValueError, match='batch size 12 is not divisible by the 8 devices'):
        train_old(bad, data, tmp_path)
    assert not os.path.exists(os.path.join(tmp_path, 'old', 'ckpt'))


def test_class_sharded_run_resumes_on_another_mesh(smoke, tmp_path):
    """Stopped after 2 steps with the classifier sharded by class over 8 devices (4 classes,
    padded to 8), then resumed replicated on 1 device: the weights of a 1-device run."""
    cfg, data = smoke
    eight, one = train.make_mesh(cfg.mesh), train.make_mesh(cfg.mesh, devices=jax.devices()[:1])

    def run(workdir, mesh, shard_classes, stop=None):
        return train.train(
            stage='old',
            workdir=str(workdir),
            model_cfg=cfg.old.model,
            train_cfg=cfg.old.train,
            source=data.old_train,
            num_classes=data.old_train.num_classes,
            mesh=mesh,
            seed=cfg.seed,
            data_cfg=cfg.data,
            ckpt_cfg=cfg.ckpt,
            log_every_steps=cfg.log_every_steps,
            shard_classes=shard_classes,
            stop_after_steps=stop,
        )

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


@pytest.mark.parametrize('mode', ['exact', 'ema'])
def test_refresh_bank_recomputes_the_perturbed_positives(mode):
    """A refresh feeds the current new prototypes (an exact pass over the data, or the
    normalised EMA) to NDPP and stores its output as the positive bank; ODPP's Δ stays put."""
    from bcl_jax import perturbation, prototypes
    from bcl_jax.data.synthetic import SyntheticBenchmark, SyntheticSpec

    spec = SyntheticSpec(
        image_size=SIZE,
        train_families=2,
        siblings_per_family=3,
        train_images_per_class=3,
        test_images_per_class=4,
        queries_per_class=1,
    )
    source = SyntheticBenchmark(spec).split('train')
    model_cfg = tiny_model_cfg()
    graphdef, params, stats = train.init_model(model_cfg, source.num_classes, seed=2)
    model = train.Trained(graphdef, params, stats, model_cfg, source.num_classes, step=0)
    rng = np.random.default_rng(4)
    old = rng.normal(size=(source.num_classes, model_cfg.embedding_dim)).astype(np.float32)
    old /= np.linalg.norm(old, axis=1, keepdims=True)
    ema = rng.normal(size=old.shape).astype(np.float32)
    state = dict(
        bank=dict(positive=jnp.asarray(old), new=jnp.asarray(ema), delta=jnp.zeros_like(old))
    )
    cfg = common.base_config().perturb
    cfg.new_prototypes, cfg.ndpp.k = mode, 3
    mesh = train.make_mesh(ml_collections.ConfigDict(dict(data=-1)))
    new_state, logged = train.refresh_bank(
        state,
        old=old,
        method='ndpp',
        cfg=cfg,
        step=5,
        seed=0,
        model=model,
        source=source,
        mesh=mesh,
    )
    if mode == 'exact':
        q = prototypes.compute(
            model,
            source,
            num_classes=source.num_classes,
            mesh=mesh,
            batch_size=cfg.exact_batch_size,
        )
        np.testing.assert_allclose(new_state['bank']['new'], q, rtol=1e-5, atol=1e-6)
    else:
        q = ema / np.linalg.norm(ema, axis=1, keepdims=True)
        np.testing.assert_array_equal(new_state['bank']['new'], ema)  # the EMA keeps running
    want = perturbation.ndpp(old, q, k=3, alpha=cfg.ndpp.alpha, beta=cfg.ndpp.beta)
    np.testing.assert_allclose(new_state['bank']['positive'], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(new_state['bank']['delta'], 0)
    shift = np.linalg.norm(np.asarray(want) - old, axis=1).mean()
    assert logged['mean_shift'] == pytest.approx(shift, rel=1e-4)
