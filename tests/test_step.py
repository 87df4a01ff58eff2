"""Tests for bcl_jax.step: the sharded train step as `step.build` sets it up, the optimizer and
its schedules.

References are independent of the library's step: a 1-device mesh for the 8-device step, a
NumPy SGD-with-momentum update from a separately computed gradient, and schedules worked by hand.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bcl_jax import step as step_lib
from tests import stages
from tests.stages import host

NUM_CLASSES = 6


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    """Leaf by leaf; the absolute tolerance grows with the leaf's largest value, as float32
    sums taken in another order (8 devices' partial sums, then a psum) differ by ~1e-6 of
    their terms, not of their (possibly near-zero) result."""
    la, ta = jax.tree_util.tree_flatten_with_path(a)
    lb, tb = jax.tree_util.tree_flatten_with_path(b)
    assert ta == tb
    for (path, x), (_, y) in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        scale = float(np.abs(y).max()) if y.size else 0.0
        np.testing.assert_allclose(
            x, y, rtol=rtol, atol=max(atol, rtol * scale), err_msg=jax.tree_util.keystr(path)
        )


# --------------------------------------------------------------------------- sharded step


LR, WD, MOMENTUM = 0.05, 1e-3, 0.9
_STEPS = {}
TERMS = dict(
    independent=(), bct=('comp',), bct_influence=('influence',), l2=('l2',), ndpp=('comp',)
)


def perturbed_banks(reference):
    """An NDPP/ODPP state after a refresh: a perturbed positive bank and a running EMA."""
    rng = np.random.default_rng(11)
    positive = reference.prototypes + 0.3 * rng.normal(size=reference.prototypes.shape)
    positive /= np.linalg.norm(positive, axis=1, keepdims=True)
    return dict(
        positive=positive.astype(np.float32),
        new=rng.normal(size=positive.shape).astype(np.float32),
    )


def one_step(method, devices):
    """(initial state, batch, new state, metrics) of one step of `step.build`'s jitted step from
    the same start on `devices` devices; cached, as each (method, mesh) costs a compilation."""
    if (method, devices) not in _STEPS:
        train = stages.train_cfg(learning_rate=LR, weight_decay=WD, momentum=MOMENTUM)
        reference = stages.reference() if method != 'independent' else None
        stage = stages.stage(method, train=train)
        mesh = stages.mesh_of(devices)
        setup = step_lib.build(stage, reference, mesh=mesh, shard_classes=False)
        state = host(setup.state)
        if method == 'ndpp':
            state['method'] = dict(banks=perturbed_banks(reference))
        replicated = NamedSharding(mesh, P())
        batch = stages.batch()
        new_state, metrics = setup.step_fn(
            jax.device_put(state, replicated),
            jax.device_put(batch, NamedSharding(mesh, P('data'))),
            setup.reference,
        )
        _STEPS[method, devices] = dict(
            graphdef=setup.graphdef,
            model_cfg=stage.model_cfg,
            reference=reference,
            state=state,
            batch=batch,
            new_state=host(new_state),
            metrics=host(metrics),
            mesh_size=mesh.devices.size,
        )
    return _STEPS[method, devices]


@pytest.mark.parametrize(
    'method',
    ['bct', 'ndpp']
    + [pytest.param(m, marks=pytest.mark.slow) for m in ('independent', 'bct_influence', 'l2')],
)
def test_step_on_8_devices_equals_step_on_1_device(method):
    assert jax.device_count() == 8
    r8, r1 = one_step(method, 8), one_step(method, 1)
    assert (r8['mesh_size'], r1['mesh_size']) == (8, 1)
    (s8, m8), (s1, m1) = (r8['new_state'], r8['metrics']), (r1['new_state'], r1['metrics'])

    assert set(m8) == set(m1) == {'cls', 'loss'} | set(TERMS[method])
    for k in m8:
        assert np.isfinite(m8[k]), k
    assert_trees_close(m8, m1)
    for key in ('params', 'batch_stats', 'opt_state', 'method'):
        assert_trees_close(s8[key], s1[key])
    assert int(s8['step']) == int(s1['step']) == 1
    assert int(s8['first_nonfinite_step']) == int(s1['first_nonfinite_step']) == -1
    # The step did something: parameters and BatchNorm statistics moved.
    for key in ('params', 'batch_stats'):
        moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), r8['state'][key], s8[key])
        assert any(jax.tree.leaves(moved)), key
    if method != 'independent':
        term = TERMS[method][0]
        assert m8[term] > 0
        assert m8['loss'] == pytest.approx(m8['cls'] + m8[term], rel=1e-5)


def test_perturbation_step_reads_the_perturbed_bank_and_updates_the_ema():
    """NDPP/ODPP: L_comp takes the positive prototype from the method's banks and the step moves
    the EMA of the batch's classes towards their batch mean, on 8 devices as on 1."""
    r8, r1 = one_step('ndpp', 8), one_step('ndpp', 1)
    new8 = r8['new_state']['method']['banks']
    assert_trees_close(new8, r1['new_state']['method']['banks'])
    bank = r8['state']['method']['banks']
    np.testing.assert_array_equal(new8['positive'], bank['positive'])

    # Independent reference from the model's embeddings of the batch (BatchNorm in train mode).
    model = nnx.merge(r8['graphdef'], r8['state']['params'], r8['state']['batch_stats'])
    emb, _ = model(jnp.asarray(r8['batch']['image']), train=True)
    emb, labels = np.asarray(emb, np.float64), r8['batch']['label']
    decay = stages.config().perturb.ema_decay
    want = bank['new'].astype(np.float64).copy()
    for c in np.unique(labels):
        want[c] = decay * bank['new'][c] + (1 - decay) * emb[labels == c].mean(0)
    np.testing.assert_allclose(new8['new'], want, rtol=1e-5, atol=1e-5)

    pos = bank['positive'].astype(np.float64)
    neg = np.asarray(r8['reference'].prototypes, np.float64)
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
    r = one_step('independent', 8)
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
    model_cfg = stages.model_cfg()
    train_cfg = stages.train_cfg(learning_rate=lr, weight_decay=wd, momentum=mom)
    _, params, _ = step_lib.init_model(model_cfg, NUM_CLASSES, seed=1)
    tx, _ = step_lib.make_optimizer(train_cfg, steps_per_epoch=10.0)
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
    cfg = stages.train_cfg(epochs=2.0, batch_size=16)
    assert step_lib.total_steps(cfg, 40) == (5, 2.5)  # round(2 * 40 / 16)
    assert step_lib.total_steps(cfg, 128) == (16, 8.0)
    cfg.epochs = 0.5
    assert step_lib.total_steps(cfg, 40) == (1, 2.5)  # round(1.25)
    cfg.steps = 7  # steps override epochs
    assert step_lib.total_steps(cfg, 40) == (7, 2.5)
    cfg.steps, cfg.epochs = 0, 0.1
    with pytest.raises(ValueError, match='0 steps'):
        step_lib.total_steps(cfg, 40)  # round(0.25) = 0


def test_learning_rate_drops_at_configured_epochs():
    cfg = stages.train_cfg(learning_rate=0.4, lr_drop_epochs=(2.0, 3.5), lr_drop_factor=0.1)
    _, schedule = step_lib.make_optimizer(cfg, steps_per_epoch=4.0)
    # Drops take effect at steps 8 and 14: the lr of step s (0-based) is the lr used by it.
    expected = [0.4] * 8 + [0.04] * 6 + [0.004] * 6
    np.testing.assert_allclose([float(schedule(s)) for s in range(20)], expected, rtol=1e-6)


def test_learning_rate_drop_at_fractional_steps_per_epoch():
    cfg = stages.train_cfg(learning_rate=1.0, lr_drop_epochs=(1.0,), lr_drop_factor=0.5)
    _, schedule = step_lib.make_optimizer(cfg, steps_per_epoch=2.5)  # epoch 1 -> round(2.5) = 2
    np.testing.assert_allclose([float(schedule(s)) for s in range(5)], [1, 1, 0.5, 0.5, 0.5])


def test_warmup_is_linear_from_zero():
    cfg = stages.train_cfg(learning_rate=0.4, warmup_steps=4, lr_drop_epochs=())
    _, schedule = step_lib.make_optimizer(cfg, steps_per_epoch=10.0)
    np.testing.assert_allclose(
        [float(schedule(s)) for s in range(7)],
        [0.0, 0.1, 0.2, 0.3, 0.4, 0.4, 0.4],
        rtol=1e-6,
        atol=1e-7,
    )


def test_warmup_does_not_shift_the_drops():
    cfg = stages.train_cfg(
        learning_rate=0.4, warmup_steps=4, lr_drop_epochs=(1.0,), lr_drop_factor=0.1
    )
    _, schedule = step_lib.make_optimizer(cfg, steps_per_epoch=10.0)  # drop at step 10
    got = [float(schedule(s)) for s in range(16)]
    expected = [0.0, 0.1, 0.2, 0.3] + [0.4] * 6 + [0.04] * 6
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_two_drops_on_the_same_step_both_apply():
    cfg = stages.train_cfg(learning_rate=1.0, lr_drop_epochs=(1.0, 1.1), lr_drop_factor=0.1)
    _, schedule = step_lib.make_optimizer(cfg, steps_per_epoch=4.0)  # both round to step 4
    assert float(schedule(5)) == pytest.approx(0.01)


def test_optimizer_uses_the_schedule():
    """The update of a zero-decay, zero-momentum step is -lr(step)·g for the scheduled lr."""
    cfg = stages.train_cfg(
        learning_rate=1.0, lr_drop_epochs=(1.0,), lr_drop_factor=0.1, momentum=0.0, weight_decay=0.0
    )
    tx, _ = step_lib.make_optimizer(cfg, steps_per_epoch=2.0)
    params = {'w': np.zeros(3, np.float32)}
    opt = tx.init(params)
    g = {'w': np.array([1.0, -2.0, 3.0], np.float32)}
    steps = []
    for _ in range(4):
        u, opt = tx.update(g, opt, params)
        steps.append(np.asarray(u['w']))
    np.testing.assert_allclose(steps, [-g['w'], -g['w'], -0.1 * g['w'], -0.1 * g['w']], rtol=1e-6)


def test_cosine_schedule_after_a_linear_warmup():
    """lr(s) = s/w · lr for s < w, then lr · (1 + cos(π (s − w) / (S − w))) / 2 to 0 at S."""
    cfg = stages.train_cfg(learning_rate=0.4, warmup_steps=2, schedule='cosine', epochs=1.0)
    _, schedule = step_lib.make_optimizer(cfg, steps_per_epoch=10.0)  # S = 10 steps
    want = [0.0, 0.2] + [0.4 * (1 + np.cos(np.pi * (s - 2) / 8)) / 2 for s in range(2, 11)]
    np.testing.assert_allclose([float(schedule(s)) for s in range(11)], want, atol=1e-7)


def test_gem_p_gets_no_weight_decay():
    """With a zero gradient, one SGD step moves a weight by −lr·wd·w, but GeM's p not at all."""
    model_cfg = stages.model_cfg()
    model_cfg.pool = 'gem'
    _, params, _ = step_lib.init_model(model_cfg, NUM_CLASSES, seed=1)
    assert float(params['backbone']['pool']['p'][0]) == 3.0
    cfg = stages.train_cfg(learning_rate=0.5, weight_decay=0.1, momentum=0.0)
    tx, _ = step_lib.make_optimizer(cfg, 10.0, decay_mask=step_lib.no_decay_on_gem)
    zeros = jax.tree.map(np.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    assert float(updates['backbone']['pool']['p'][0]) == 0.0
    kernel = params['classifier']['kernel']
    np.testing.assert_allclose(updates['classifier']['kernel'], -0.5 * 0.1 * kernel, rtol=1e-6)


@pytest.mark.parametrize('which', ['old', 'new', 'resnet18'])
def test_init_model_is_flax_eager_initialisation_bit_for_bit(which):
    """The one compiled initialisation draws what Flax's eager one draws, seed by seed."""
    from configs import synthetic

    config = synthetic.get_config()
    model_cfg = config.old.model if which == 'old' else config.new.model
    if which == 'resnet18':
        model_cfg = model_cfg.copy_and_resolve_references()
        model_cfg.update(arch='resnet18', width=8, pool='gem')
    for seed in (0, 7):
        eager = step_lib.build_model(model_cfg, 12, rngs=nnx.Rngs(seed))
        _, params, stats = nnx.split(eager, nnx.Param, nnx.BatchStat)
        expected = (nnx.to_pure_dict(params), nnx.to_pure_dict(stats))
        graphdef, *got = step_lib.init_model(model_cfg, 12, seed)
        assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(list(expected))
        for a, b in zip(jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(got)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        merged = nnx.merge(graphdef, *(nnx.State(x) for x in got))
        assert type(merged) is type(eager)
