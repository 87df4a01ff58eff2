"""perturbation.ndpp / odpp_loss / odpp against NumPy float64 re-computations."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bcl_jax import perturbation as pt


def _normalised(rng, n, d=16):
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _crowded(rng, groups, per_group, d=16, noise=0.1):
    """Prototypes in tight groups (within-group cosine ~0.99): crowded, as NDPP/ODPP assume."""
    centres = _normalised(rng, groups, d).astype(np.float64)
    x = np.repeat(centres, per_group, axis=0) + noise / np.sqrt(d) * rng.standard_normal(
        (groups * per_group, d)
    )
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope='module')
def banks():
    rng = np.random.default_rng(0)
    return _normalised(rng, 50), _normalised(rng, 50)


# ----------------------------------------------------------------------------------------------
# NDPP
# ----------------------------------------------------------------------------------------------


def _ndpp_reference(p, q, k, alpha, beta, exclude_self):
    """METHOD.md §4 with full C×C similarities and argsort, in float64."""
    p, q = p.astype(np.float64), q.astype(np.float64)

    def pushes(gallery, self_excluded):
        sims = p @ gallery.T
        if self_excluded:
            np.fill_diagonal(sims, -np.inf)
        idx = np.argsort(-sims, axis=1, kind='stable')[:, :k]
        w = np.maximum(np.take_along_axis(sims, idx, axis=1), 0.0)
        w /= w.sum(axis=1, keepdims=True) + 1e-8
        return np.einsum('ck,ckd->cd', w, p[:, None, :] - gallery[idx])

    x = p + alpha * pushes(p, True) + beta * pushes(q, exclude_self)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _assert_close_to(got, want, old):
    """Error relative to the size of the perturbation itself (p̃ − p), not just to |p̃| = 1."""
    got = np.asarray(got)
    assert got.dtype == np.float32 and got.shape == want.shape
    scale = np.abs(want - old).max()
    assert scale > 1e-3  # the perturbation is not trivially zero
    assert np.abs(got - want).max() / scale < 1e-5


@pytest.mark.parametrize('exclude_self', [True, False])
@pytest.mark.parametrize('k, alpha, beta', [(5, 0.16, 0.004), (5, 0.3, 0.5), (30, 0.2, 0.4)])
def test_ndpp_matches_reference(banks, exclude_self, k, alpha, beta):
    """k=30 of 50 classes reaches negative similarities, so the clamp at 0 matters."""
    old, new = banks
    want = _ndpp_reference(old, new, k, alpha, beta, exclude_self)
    _assert_close_to(
        pt.ndpp(old, new, k=k, alpha=alpha, beta=beta, exclude_self=exclude_self), want, old
    )
    # Blocks smaller than C and not dividing it.
    _assert_close_to(
        pt.ndpp(
            old,
            new,
            k=k,
            alpha=alpha,
            beta=beta,
            exclude_self=exclude_self,
            query_block=7,
            gallery_block=12,
        ),
        want,
        old,
    )


def test_ndpp_exclude_self_changes_new_neighbours(banks):
    """With new = old, keeping j = c adds q_c = p_c, a zero push: the results must differ."""
    old = banks[0]
    a = np.asarray(pt.ndpp(old, old, k=5, beta=0.5, exclude_self=True))
    b = np.asarray(pt.ndpp(old, old, k=5, beta=0.5, exclude_self=False))
    assert np.abs(a - b).max() > 1e-3


def test_ndpp_pushes_apart_crowded_prototypes():
    rng = np.random.default_rng(1)
    old = _crowded(rng, 10, 5)
    new = _crowded(rng, 10, 5)
    stats = pt.perturbation_stats(old, pt.ndpp(old, new, k=4))
    assert stats['top1_perturbed'] < stats['top1_old'] - 1e-3
    assert 0 < stats['mean_shift'] < 0.2


@pytest.mark.parametrize('exclude_self', [True, False])
def test_ndpp_sharded_equals_unsharded(banks, exclude_self):
    old, new = banks
    mesh = jax.make_mesh((8,), ('data',))
    kwargs = dict(k=9, alpha=0.3, beta=0.3, exclude_self=exclude_self)
    want = np.asarray(pt.ndpp(old, new, **kwargs))
    got = pt.ndpp(old, new, mesh=mesh, axis='data', query_block=16, gallery_block=4, **kwargs)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)
    # Banks already laid out sharded on the (Explicit) mesh, with and without `mesh`.
    on_mesh = lambda x: jax.device_put(x[:48], jax.NamedSharding(mesh, jax.P('data')))
    want = np.asarray(pt.ndpp(old[:48], new[:48], **kwargs))
    for mesh_arg in (None, mesh):
        got = pt.ndpp(on_mesh(old), on_mesh(new), mesh=mesh_arg, **kwargs)
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)


def test_ndpp_clamps_k(banks, caplog):
    old, new = banks[0][:6], banks[1][:6]
    with caplog.at_level(logging.WARNING):
        got = pt.ndpp(old, new, k=100, beta=0.3)
    assert 'k=100 exceeds the 5 other classes' in caplog.text
    np.testing.assert_allclose(
        np.asarray(got), np.asarray(pt.ndpp(old, new, k=5, beta=0.3)), atol=1e-7
    )
    _assert_close_to(got, _ndpp_reference(old, new, 5, 0.16, 0.3, True), old)


@pytest.mark.parametrize(
    'change, match',
    [
        (
            lambda o, n: (o, n[:, :8]),
            r'new bank has shape \(50, 8\) but the old bank has \(50, 16\)',
        ),
        (lambda o, n: (o[0], n[0]), 'must be a 2-D'),
        (lambda o, n: (o[:1], n[:1]), 'at least 2 classes'),
        (lambda o, n: (o, _set(n, 7, np.nan)), r'new bank has NaN/Inf in classes \[7\]'),
        (lambda o, n: (_set(o, 3, np.inf), n), r'old bank has NaN/Inf in classes \[3\]'),
        (lambda o, n: (_set(o, 4, 0.0), n), r'old bank has zero vectors for classes \[4\]'),
        (lambda o, n: (o, _set(n, 9, 0.0)), r'new bank has zero vectors for classes \[9\]'),
    ],
)
def test_ndpp_errors(banks, change, match):
    with pytest.raises(ValueError, match=match):
        pt.ndpp(*change(*banks), k=5)


def _set(x, row, value):
    x = x.copy()
    x[row] = value
    return x


@pytest.mark.parametrize('k', [0, -1, 2.0])
def test_ndpp_bad_k(banks, k):
    with pytest.raises(ValueError, match='k must be a positive int'):
        pt.ndpp(*banks, k=k)


# ----------------------------------------------------------------------------------------------
# ODPP
# ----------------------------------------------------------------------------------------------


def _odpp_loss_reference(delta, old, new, i, j, m_o, m_n, l_o, l_n, gamma, mask_self=True):
    delta, old, new = (x.astype(np.float64) for x in (delta, old, new))
    pt_ = old + delta
    pt_ /= np.linalg.norm(pt_, axis=1, keepdims=True)
    keep = i != j if mask_self else np.ones(len(i), bool)
    i, j = i[keep], j[keep]
    hinge_old = np.maximum(0, np.sum(pt_[i] * pt_[j], axis=1) - m_o)
    hinge_new = np.maximum(0, np.sum(pt_[i] * new[j], axis=1) - m_n)
    return (
        l_o * hinge_old.mean() + l_n * hinge_new.mean() + gamma * np.mean(np.sum(delta**2, axis=1))
    )


@pytest.fixture(scope='module')
def loss_case():
    rng = np.random.default_rng(2)
    old, new = _crowded(rng, 5, 4, d=8, noise=0.8), _crowded(rng, 5, 4, d=8, noise=0.8)
    delta = (0.1 * rng.standard_normal(old.shape)).astype(np.float32)
    i = rng.integers(0, 20, 64).astype(np.int32)
    j = rng.integers(0, 20, 64).astype(np.int32)
    j[:6] = i[:6]  # some i == j pairs, to be masked out
    kwargs = dict(margin_old=0.3, margin_new=0.2, lambda_old=1.3, lambda_new=0.7, gamma=0.05)
    return delta, old, new, i, j, kwargs


def _ref_args(kwargs):
    return [kwargs[n] for n in ('margin_old', 'margin_new', 'lambda_old', 'lambda_new', 'gamma')]


def test_odpp_loss_matches_reference(loss_case):
    delta, old, new, i, j, kwargs = loss_case
    want = _odpp_loss_reference(delta, old, new, i, j, *_ref_args(kwargs))
    # Both hinges are active on some pairs and not on others: the test sees both branches.
    got = float(pt.odpp_loss(delta, old, new, i, j, **kwargs))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # The i == j pairs are masked, not counted as (self-similarity 1) hinge terms.
    unmasked = _odpp_loss_reference(delta, old, new, i, j, *_ref_args(kwargs), mask_self=False)
    assert abs(unmasked - got) > 1e-2
    all_self = float(pt.odpp_loss(delta, old, new, i, i, **kwargs))
    np.testing.assert_allclose(
        all_self,
        kwargs['gamma'] * np.mean(np.sum(delta.astype(np.float64) ** 2, axis=1)),
        rtol=1e-5,
    )


def test_odpp_loss_gradient_matches_finite_differences(loss_case):
    delta, old, new, i, j, kwargs = loss_case
    grad = np.asarray(jax.grad(pt.odpp_loss)(delta, old, new, i, j, **kwargs))
    f = lambda d: _odpp_loss_reference(d, old, new, i, j, *_ref_args(kwargs))
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


def _full_objective(delta, old, new, **kwargs):
    """J over all ordered pairs i ≠ j: what the random pairs estimate."""
    c = old.shape[0]
    i, j = np.meshgrid(np.arange(c), np.arange(c), indexing='ij')
    return _odpp_loss_reference(
        np.asarray(delta),
        old,
        new,
        i.ravel(),
        j.ravel(),
        *_ref_args(
            dict(
                dict(margin_old=0.9, margin_new=0.9, lambda_old=1.0, lambda_new=1.0, gamma=0.0),
                **kwargs,
            )
        ),
    )


@pytest.fixture(scope='module')
def crowded():
    """8 groups of 8 classes at cosine ~0.99; the new bank a slightly moved copy of the old."""
    rng = np.random.default_rng(3)
    old = _crowded(rng, 8, 8)
    new = old + 0.05 / 4 * rng.standard_normal(old.shape)
    return old, (new / np.linalg.norm(new, axis=1, keepdims=True)).astype(np.float32)


def test_passes_to_steps():
    assert pt.passes_to_steps(24393, 100, 1024) == 2400
    assert pt.passes_to_steps(10, 1, 4) == 3
    assert pt.passes_to_steps(10, 0.5, 4) == 2
    assert pt.passes_to_steps(3, 2, 1024) == 2


def test_pairs_sweep_permutation_each_pass():
    c, per_step = 10, 4
    key_perm, key_pair = jax.random.split(jax.random.key(0))
    perm = jnp.zeros((c,), jnp.int32)
    draw = jax.jit(pt._draw_pairs, static_argnames=('pairs_per_step', 'pairs'))
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


def test_odpp_reduces_objective(crowded):
    old, new = crowded
    zero = np.zeros_like(old)
    before = _full_objective(zero, old, new)
    assert before > 0.01  # crowded: many pairs above the margin
    delta, losses = pt.odpp(
        old, new, zero, jax.random.key(0), steps=100, pairs_per_step=64, learning_rate=3e-3
    )
    assert losses.shape == (100,) and delta.shape == old.shape
    after = _full_objective(delta, old, new)
    assert after < 0.1 * before
    assert float(losses[-10:].mean()) < float(losses[:10].mean())


def test_odpp_zero_steps_returns_delta0(crowded):
    old, new = crowded
    delta0 = np.random.default_rng(4).standard_normal(old.shape).astype(np.float32) * 0.01
    delta, losses = pt.odpp(old, new, delta0, jax.random.key(0), steps=0)
    np.testing.assert_array_equal(np.asarray(delta), delta0)
    assert losses.shape == (0,)


def test_odpp_deterministic_for_key(crowded):
    old, new = crowded
    run = lambda seed: pt.odpp(
        old,
        new,
        np.zeros_like(old),
        jax.random.key(seed),
        steps=20,
        pairs_per_step=16,
    )
    (a, la), (b, lb), (_, lc) = run(1), run(1), run(2)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(la), np.asarray(lb))
    assert not np.array_equal(np.asarray(la), np.asarray(lc))


def test_odpp_neighbour_pairs():
    """Twins (pairs of classes at cosine 0.98, far from the rest) with k=1: every neighbour pair
    is a twin pair, so the first step's J is exactly the twins' hinge; random pairs rarely are."""
    rng = np.random.default_rng(5)
    d, twins = 64, 16
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0][:, : 2 * twins].T
    cos = 0.98
    a = basis[0::2]
    b = cos * basis[0::2] + np.sqrt(1 - cos**2) * basis[1::2]
    old = np.stack([a, b], axis=1).reshape(2 * twins, d).astype(np.float32)
    new = -old  # the new-space hinge stays inactive
    zero = np.zeros_like(old)
    kwargs = dict(steps=40, pairs_per_step=8, learning_rate=3e-3)
    d_near, near = pt.odpp(old, new, zero, jax.random.key(0), pairs='neighbours', k=1, **kwargs)
    d_rand, rand = pt.odpp(old, new, zero, jax.random.key(0), **kwargs)
    np.testing.assert_allclose(float(near[0]), cos - 0.9, rtol=1e-4)
    assert float(rand[0]) < 0.5 * (cos - 0.9)
    # Spending the steps on the crowded pairs lowers the full objective faster.
    assert _full_objective(d_near, old, new) < _full_objective(d_rand, old, new)


def test_odpp_warm_start_continues(crowded):
    old, new = crowded
    zero = np.zeros_like(old)
    kwargs = dict(steps=30, pairs_per_step=64, learning_rate=3e-3)
    d1, _ = pt.odpp(old, new, zero, jax.random.key(0), **kwargs)
    d2, _ = pt.odpp(old, new, d1, jax.random.key(1), **kwargs)
    cold, _ = pt.odpp(old, new, zero, jax.random.key(1), **kwargs)
    j0, j1, j2 = (_full_objective(d, old, new) for d in (zero, d1, d2))
    assert j0 > j1 > j2
    assert j2 < 0.8 * _full_objective(cold, old, new)  # the second call built on the first
    assert not np.array_equal(np.asarray(d1), np.asarray(d2))


def test_odpp_gamma_limits_offset(crowded):
    old, new = crowded
    kwargs = dict(steps=60, pairs_per_step=64, learning_rate=1e-2)
    free, _ = pt.odpp(old, new, np.zeros_like(old), jax.random.key(0), **kwargs)
    tied, _ = pt.odpp(old, new, np.zeros_like(old), jax.random.key(0), gamma=10.0, **kwargs)
    assert np.linalg.norm(np.asarray(tied)) < 0.7 * np.linalg.norm(np.asarray(free))


@pytest.mark.parametrize(
    'kwargs, match',
    [
        (dict(margin_old=1.5), r'margin_old=1.5 is outside \[-1, 1\]'),
        (dict(margin_new=-2.0), r'margin_new=-2.0 is outside'),
        (dict(pairs='nearest'), 'pairs must be one of'),
        (dict(steps=-1), 'steps must be an int'),
        (dict(pairs_per_step=0), 'pairs_per_step must be a positive int'),
        (dict(gamma=-1.0), 'gamma must be finite and >= 0'),
        (dict(lambda_old=float('nan')), 'lambda_old must be finite and >= 0'),
        (dict(lambda_new=-0.5), 'lambda_new must be finite and >= 0'),
        (dict(margin_old=float('nan')), 'margin_old=nan is outside'),
        (dict(learning_rate=0.0), 'learning_rate must be > 0'),
        (dict(pairs='neighbours', k=0), 'k must be a positive int'),
        (dict(delta0=np.zeros((64, 8), np.float32)), r'delta0 bank has shape \(64, 8\)'),
        (dict(delta0=np.full((64, 16), np.nan, np.float32)), 'delta0 bank has NaN/Inf in classes'),
        (dict(new=np.zeros((64, 16), np.float32)), 'new bank has zero vectors'),
    ],
)
def test_odpp_errors(crowded, kwargs, match):
    old, new = crowded
    args = dict(old=old, new=new, delta0=np.zeros_like(old), key=jax.random.key(0), steps=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        pt.odpp(**args)
