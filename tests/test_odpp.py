"""bcl_jax.odpp (ODPP, method.md §5) against NumPy float64 re-computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from bcl_jax import odpp as od
from bcl_jax import perturbation


def _unit(x):
    x = np.asarray(x, np.float64)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _crowded(rng, groups, per_group, d=16, noise=0.1):
    """Prototypes in tight groups (within-group cosine ~0.99): crowded, as ODPP assumes."""
    centres = _unit(rng.standard_normal((groups, d))).astype(np.float64)
    x = np.repeat(centres, per_group, axis=0)
    return _unit(x + noise / np.sqrt(d) * rng.standard_normal(x.shape))


DEFAULTS = {
    'margin_old': 0.9,
    'margin_new': 0.9,
    'lambda_old': 1.0,
    'lambda_new': 1.0,
    'gamma': 0.0,
}


def _objective(delta, old, new, i, j, *, normalize=False, mask_self=True, **terms):
    """J of method.md §5 from its formula, in float64: p̃ = p + Δ (normalised if asked)."""
    terms = dict(DEFAULTS, **terms)
    delta, old, new = (np.asarray(x, np.float64) for x in (delta, old, new))
    p_t = old + delta
    if normalize:
        p_t = p_t / np.linalg.norm(p_t, axis=1, keepdims=True)
    keep = i != j if mask_self else np.ones(len(i), bool)
    i, j = i[keep], j[keep]
    hinge_old = np.maximum(0, np.sum(p_t[i] * p_t[j], axis=1) - terms['margin_old'])
    hinge_new = np.maximum(0, np.sum(p_t[i] * new[j], axis=1) - terms['margin_new'])
    penalty = np.mean(np.sum(delta**2, axis=1))
    return (
        terms['lambda_old'] * hinge_old.mean()
        + terms['lambda_new'] * hinge_new.mean()
        + terms['gamma'] * penalty
    )


def _all_pairs(c):
    i, j = np.meshgrid(np.arange(c), np.arange(c), indexing='ij')
    return i.ravel(), j.ravel()


def _full_objective(delta, old, new, **terms):
    """J over all ordered pairs i ≠ j: what the random pairs estimate."""
    return _objective(delta, old, new, *_all_pairs(old.shape[0]), **terms)


@pytest.fixture(scope='module')
def loss_case():
    """Rows of p + Δ with norms from ~0.8 to ~1.2, so normalising inside J matters."""
    rng = np.random.default_rng(2)
    old, new = _crowded(rng, 5, 4, d=8, noise=0.8), _crowded(rng, 5, 4, d=8, noise=0.8)
    delta = (0.1 * rng.standard_normal(old.shape)).astype(np.float32)
    i = rng.integers(0, 20, 64).astype(np.int32)
    j = rng.integers(0, 20, 64).astype(np.int32)
    j[:6] = i[:6]  # some i == j pairs, to be masked out
    terms = {
        'margin_old': 0.3,
        'margin_new': 0.2,
        'lambda_old': 1.3,
        'lambda_new': 0.7,
        'gamma': 0.05,
    }
    return delta, old, new, i, j, terms


@pytest.mark.parametrize('normalize', [False, True])
def test_odpp_loss_matches_formula(loss_case, normalize):
    delta, old, new, i, j, terms = loss_case
    want = _objective(delta, old, new, i, j, normalize=normalize, **terms)
    got = float(od.odpp_loss(delta, old, new, i, j, normalize_in_objective=normalize, **terms))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # The two readings of J differ here, so the test tells them apart.
    other = _objective(delta, old, new, i, j, normalize=not normalize, **terms)
    assert abs(other - want) > 1e-2
    # The i == j pairs are masked, not counted as (self-similarity) hinge terms.
    unmasked = _objective(delta, old, new, i, j, normalize=normalize, mask_self=False, **terms)
    assert abs(unmasked - got) > 1e-2
    all_self = float(od.odpp_loss(delta, old, new, i, i, normalize_in_objective=normalize, **terms))
    penalty = terms['gamma'] * np.mean(np.sum(delta.astype(np.float64) ** 2, axis=1))
    np.testing.assert_allclose(all_self, penalty, rtol=1e-5)


def test_odpp_loss_default_is_unnormalised():
    """Hand-worked: p = (1, 0), (0, 1); Δ_0 = (0, 1), so p̃_0 = (1, 1) and p̃_0·p̃_1 = 1, whose
    hinge at m_o = 0.5 is 0.5 (normalised: 1/√2 − 0.5 = 0.2071); q_1 = (0, 1): p̃_0·q_1 = 1,
    hinge at m_n = 0.9: 0.1 (normalised: 0). Pair (0, 1) only: J = 0.6 (normalised 0.2071)."""
    old = np.array([[1, 0], [0, 1]], np.float32)
    delta = np.array([[0, 1], [0, 0]], np.float32)
    i, j = np.array([0]), np.array([1])
    kwargs = {'margin_old': 0.5, 'margin_new': 0.9}
    assert float(od.odpp_loss(delta, old, old, i, j, **kwargs)) == pytest.approx(0.6, rel=1e-6)
    normalised = od.odpp_loss(delta, old, old, i, j, normalize_in_objective=True, **kwargs)
    assert float(normalised) == pytest.approx(2**-0.5 - 0.5, rel=1e-6)


@pytest.mark.parametrize('normalize', [False, True])
def test_odpp_loss_gradient_matches_finite_differences(loss_case, normalize):
    delta, old, new, i, j, terms = loss_case
    loss = lambda d: od.odpp_loss(d, old, new, i, j, normalize_in_objective=normalize, **terms)
    grad = np.asarray(jax.grad(loss)(delta))
    f = lambda d: _objective(d, old, new, i, j, normalize=normalize, **terms)
    d64 = delta.astype(np.float64)
    unused = sorted(set(range(20)) - set(i.tolist()) - set(j.tolist()))
    entries = [(int(i[10]), 0), (int(j[11]), 3), (int(i[20]), 7), (int(j[30]), 5)]
    entries += [(r, 2) for r in unused[:1]]  # only the γ term's gradient
    for row, col in entries:
        h = 1e-6
        plus, minus = d64.copy(), d64.copy()
        plus[row, col] += h
        minus[row, col] -= h
        fd = (f(plus) - f(minus)) / (2 * h)
        np.testing.assert_allclose(grad[row, col], fd, rtol=2e-4, atol=1e-6)
    assert np.abs(grad[entries[0]]) > 1e-3  # a hinge gradient, not only γ's


def test_passes_to_steps():
    assert od.passes_to_steps(24393, 100, 1024) == 2400
    assert od.passes_to_steps(10, 1, 4) == 3
    assert od.passes_to_steps(10, 0.5, 4) == 2
    assert od.passes_to_steps(3, 2, 1024) == 2


def test_pairs_sweep_permutation_each_pass():
    c, per_step = 10, 4
    key_perm, key_pair = jax.random.split(jax.random.key(0))
    perm = jnp.zeros((c,), jnp.int32)
    draw = jax.jit(od._draw_pairs, static_argnames=('pairs_per_step', 'pairs'))
    seen = []
    for s in range(6):  # two passes of 3 steps
        i, j, perm = draw(
            key_perm, key_pair, jnp.int32(s), perm, None, pairs_per_step=per_step, pairs='random'
        )
        seen.append(np.asarray(i))
        assert np.asarray(j).min() >= 0 and np.asarray(j).max() < c
    for one_pass in (seen[:3], seen[3:]):
        flat = np.concatenate(one_pass)
        assert sorted(flat[:c].tolist()) == list(range(c))  # every class once per pass ...
        np.testing.assert_array_equal(flat[c:], flat[:2])  # ... and the last step wraps
    assert not np.array_equal(np.concatenate(seen[:3]), np.concatenate(seen[3:]))


@pytest.fixture(scope='module')
def crowded():
    """8 groups of 8 classes at cosine ~0.99; the new bank a slightly moved copy of the old."""
    rng = np.random.default_rng(3)
    old = _crowded(rng, 8, 8)
    return old, _unit(old + 0.05 / 4 * rng.standard_normal(old.shape))


@pytest.mark.parametrize('normalize', [False, True])
def test_odpp_reduces_objective(crowded, normalize):
    old, new = crowded
    before = _full_objective(np.zeros_like(old), old, new, normalize=normalize)
    assert before > 0.01  # crowded: many pairs above the margin
    state, log = od.odpp(
        old,
        new,
        None,
        jax.random.key(0),
        passes=100,
        pairs_per_step=64,
        learning_rate=3e-3,
        normalize_in_objective=normalize,
    )
    assert log['loss'].shape == (100,) and state['delta'].shape == old.shape
    assert int(state['adam_count']) == 100
    after = _full_objective(state['delta'], old, new, normalize=normalize)
    assert after < 0.1 * before
    assert float(log['loss'][-10:].mean()) < float(log['loss'][:10].mean())
    assert float(log['objective_after']) < 0.3 * float(log['objective_before'])  # 64 pairs


def test_odpp_zero_steps(crowded):
    old, new = crowded
    state, log = od.odpp(old, new, None, jax.random.key(0), steps=0)
    np.testing.assert_array_equal(np.asarray(state['delta']), 0)
    assert log['loss'].shape == (0,) and int(state['adam_count']) == 0
    assert float(log['objective_before']) == float(log['objective_after']) > 0
    assert float(log['delta_norm_before']) == float(log['delta_norm_after']) == 0


def test_odpp_deterministic_for_key(crowded):
    old, new = crowded
    run = lambda seed: od.odpp(old, new, None, jax.random.key(seed), steps=20, pairs_per_step=16)
    (a, la), (b, lb), (_c, lc) = run(1), run(1), run(2)
    np.testing.assert_array_equal(np.asarray(a['delta']), np.asarray(b['delta']))
    np.testing.assert_array_equal(np.asarray(la['loss']), np.asarray(lb['loss']))
    assert not np.array_equal(np.asarray(la['loss']), np.asarray(lc['loss']))
    # J before is measured on fixed pairs, whatever the key.
    assert float(la['objective_before']) == float(lc['objective_before'])


def _twins(rng, twins=16, d=64, cos=0.98):
    """Pairs of classes at cosine `cos`, orthogonal to every other class."""
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0][:, : 2 * twins].T
    a = basis[0::2]
    b = cos * basis[0::2] + np.sqrt(1 - cos**2) * basis[1::2]
    return np.stack([a, b], axis=1).reshape(2 * twins, d).astype(np.float32)


def test_odpp_neighbour_pairs():
    """Twins with k=1: every neighbour pair is a twin pair, so the first step's J is exactly
    the twins' hinge; random pairs rarely are."""
    cos = 0.98
    old = _twins(np.random.default_rng(5), cos=cos)
    new = -old  # the new-space hinge stays inactive
    kwargs = {'steps': 40, 'pairs_per_step': 8, 'learning_rate': 3e-3}
    near, near_log = od.odpp(old, new, None, jax.random.key(0), pairs='neighbours', k=1, **kwargs)
    rand, rand_log = od.odpp(old, new, None, jax.random.key(0), **kwargs)
    np.testing.assert_allclose(float(near_log['loss'][0]), cos - 0.9, rtol=1e-4)
    assert float(rand_log['loss'][0]) < 0.5 * (cos - 0.9)
    # Spending the steps on the crowded pairs lowers the full objective faster.
    full = lambda s: _full_objective(s['delta'], old, new)
    assert full(near) < full(rand)


def test_odpp_logs_objective_and_offset_before_and_after():
    """With 'neighbours' pairs and k = 1 the measuring pairs are known: (i, i's twin) for
    every class i. J before and after and mean ||Δ_c|| against float64 recomputations."""
    old = _twins(np.random.default_rng(6), twins=8, d=32)
    rng = np.random.default_rng(7)
    new = _unit(old + 0.1 * rng.standard_normal(old.shape))
    i = np.arange(16)
    j = i ^ 1  # twins are rows 2t and 2t + 1
    options = {
        'pairs': 'neighbours',
        'k': 1,
        'steps': 30,
        'pairs_per_step': 4,
        'learning_rate': 1e-2,
    }
    state, log = od.odpp(old, new, None, jax.random.key(0), gamma=0.01, **options)
    delta = np.asarray(state['delta'], np.float64)
    want_before = _objective(np.zeros_like(old), old, new, i, j, gamma=0.01)
    want_after = _objective(delta, old, new, i, j, gamma=0.01)
    assert want_before > 0.05 and want_after < 0.9 * want_before
    np.testing.assert_allclose(float(log['objective_before']), want_before, rtol=1e-5)
    np.testing.assert_allclose(float(log['objective_after']), want_after, rtol=1e-5)
    assert float(log['delta_norm_before']) == 0
    np.testing.assert_allclose(
        float(log['delta_norm_after']), np.linalg.norm(delta, axis=1).mean(), rtol=1e-5
    )


def test_odpp_starts_fresh_by_default(crowded):
    """Without warm_start a given state is ignored: the same Δ as from no state."""
    old, new = crowded
    kwargs = {'steps': 30, 'pairs_per_step': 64, 'learning_rate': 3e-3}
    first, _ = od.odpp(old, new, None, jax.random.key(0), **kwargs)
    again, log = od.odpp(old, new, first, jax.random.key(1), **kwargs)
    fresh, _ = od.odpp(old, new, None, jax.random.key(1), **kwargs)
    for name in od.STATE_KEYS:
        np.testing.assert_array_equal(np.asarray(again[name]), np.asarray(fresh[name]))
    assert float(log['delta_norm_before']) == 0


def test_odpp_warm_start_continues_delta_and_adam_state(crowded):
    """Two warm-started solves of 13 and 17 steps (one key) make what one solve of 30 steps
    makes: Δ and Adam's moments and count carry over (13 is mid-pass: 64 pairs per step give
    one step per pass here, so use 16 pairs: 4 steps per pass). Resetting Adam's moments
    while keeping Δ changes the result."""
    old, new = crowded
    kwargs = {'pairs_per_step': 16, 'learning_rate': 3e-3, 'warm_start': True}
    key = jax.random.key(3)
    one, _ = od.odpp(old, new, None, key, steps=30, **kwargs)
    half, _ = od.odpp(old, new, None, key, steps=13, **kwargs)
    two, log = od.odpp(old, new, half, key, steps=17, **kwargs)
    assert int(two['adam_count']) == 30
    for name in ('delta', 'adam_mu', 'adam_nu'):
        np.testing.assert_allclose(np.asarray(two[name]), np.asarray(one[name]), atol=1e-7)
    np.testing.assert_allclose(
        float(log['delta_norm_before']),
        np.linalg.norm(np.asarray(half['delta'], np.float64), axis=1).mean(),
        rtol=1e-5,
    )
    reset = dict(
        half, adam_mu=np.zeros_like(old), adam_nu=np.zeros_like(old), adam_count=np.int32(0)
    )
    other, _ = od.odpp(old, new, reset, key, steps=17, **kwargs)
    assert np.abs(np.asarray(other['delta']) - np.asarray(one['delta'])).max() > 1e-4


@pytest.mark.slow
def test_odpp_warm_start_on_sharded_banks_equals_one_device(crowded):
    """Warm start on banks padded and sharded by class over 8 devices: the state stays
    sharded like the banks and equals the unsharded solve."""
    old, new = crowded[0][:61], crowded[1][:61]
    kwargs = {'steps': 6, 'pairs_per_step': 16, 'learning_rate': 1e-2, 'warm_start': True}
    key = jax.random.key(4)
    first, _ = od.odpp(old, new, None, key, **kwargs)
    want, want_log = od.odpp(old, new, first, key, **kwargs)
    pad = lambda x: np.pad(np.asarray(x), ((0, 3), (0, 0)))
    mesh = jax.make_mesh((8,), ('data',))
    padded_first = dict(first, **{n: pad(first[n]) for n in ('delta', 'adam_mu', 'adam_nu')})
    got, log = od.odpp(pad(old), pad(new), padded_first, key, num_classes=61, mesh=mesh, **kwargs)
    for name in ('delta', 'adam_mu', 'adam_nu'):
        assert got[name].sharding.spec == P('data', None) and got[name].shape == (64, 16)
        np.testing.assert_array_equal(np.asarray(got[name])[61:], 0)
        np.testing.assert_allclose(np.asarray(got[name])[:61], want[name], rtol=1e-5, atol=1e-7)
    for name in ('loss', 'objective_before', 'objective_after', 'delta_norm_after'):
        np.testing.assert_allclose(np.asarray(log[name]), np.asarray(want_log[name]), rtol=1e-5)


def test_odpp_initial_state_is_a_fresh_start(crowded):
    old, new = crowded
    zero = od.odpp_initial_state(*old.shape)
    assert sorted(zero) == sorted(od.STATE_KEYS) and int(zero['adam_count']) == 0
    kwargs = {'steps': 5, 'pairs_per_step': 64}
    warm, _ = od.odpp(old, new, zero, jax.random.key(0), warm_start=True, **kwargs)
    cold, _ = od.odpp(old, new, None, jax.random.key(0), **kwargs)
    np.testing.assert_array_equal(np.asarray(warm['delta']), np.asarray(cold['delta']))


def test_odpp_gamma_limits_offset(crowded):
    old, new = crowded
    kwargs = {'steps': 60, 'pairs_per_step': 64, 'learning_rate': 1e-2}
    free, _ = od.odpp(old, new, None, jax.random.key(0), **kwargs)
    tied, _ = od.odpp(old, new, None, jax.random.key(0), gamma=10.0, **kwargs)
    norm = lambda s: np.linalg.norm(np.asarray(s['delta']))
    assert norm(tied) < 0.7 * norm(free)


def test_odpp_options_take_the_config_group():
    """configs/common.py's perturb.odpp group is OdppOptions' fields; defaults from method.md §5."""
    options = od.OdppOptions()
    assert (options.passes, options.pairs_per_step, options.learning_rate) == (100, 1024, 1e-3)
    assert (options.margin_old, options.margin_new, options.gamma) == (0.9, 0.9, 0.0)
    assert not options.warm_start and not options.normalize_in_objective
    from configs import common

    group = common.base_config().perturb.odpp.to_dict()
    # The strength, resolved to margin_old, and the per-refresh margin_new: the method's
    # (bcl_jax.calibrate, methods.perturbed), not the solve's.
    assert group.pop('rho') is None and group.pop('margin_new_quantile') is False
    assert od.OdppOptions(**group) == options
    assert perturbation.odpp is od.odpp and perturbation.OdppOptions is od.OdppOptions


@pytest.mark.parametrize(
    'kwargs, match',
    [
        ({'margin_old': 1.5}, r'margin_old=1.5 is outside \[-1, 1\]'),
        ({'margin_new': -2.0}, r'margin_new=-2.0 is outside'),
        ({'pairs': 'nearest'}, 'pairs must be one of'),
        ({'steps': -1}, 'steps must be an int'),
        ({'pairs_per_step': 0}, 'pairs_per_step must be a positive int'),
        ({'gamma': -1.0}, 'gamma must be finite and >= 0'),
        ({'lambda_old': float('nan')}, 'lambda_old must be finite and >= 0'),
        ({'lambda_new': -0.5}, 'lambda_new must be finite and >= 0'),
        ({'margin_old': float('nan')}, 'margin_old=nan is outside'),
        ({'learning_rate': 0.0}, 'learning_rate must be > 0'),
        ({'passes': -1}, 'passes must be finite and >= 0'),
        ({'pairs': 'neighbours', 'k': 0}, 'k must be a positive int'),
        ({'new': np.zeros((64, 16), np.float32)}, 'new bank has zero vectors'),
        ({'warm_start': True, 'state': np.zeros((64, 16))}, 'needs the state dict'),
        (
            {'warm_start': True, 'state': od.odpp_initial_state(64, 8)},
            r'delta bank has shape \(64, 8\)',
        ),
        ({'state_nan': True}, 'adam_mu bank has NaN/Inf in classes'),
    ],
)
def test_odpp_errors(crowded, kwargs, match):
    old, new = crowded
    args = {'old': old, 'new': new, 'state': None, 'key': jax.random.key(0), 'steps': 2}
    if kwargs.pop('state_nan', False):
        state = od.odpp_initial_state(*old.shape)
        args.update(state=dict(state, adam_mu=np.full(old.shape, np.nan)), warm_start=True)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        od.odpp(**args)
