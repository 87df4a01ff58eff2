"""perturbation.ndpp / odpp_loss / odpp against NumPy float64 re-computations."""

import logging

import jax
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


def _ndpp_reference(p, q, k, alpha, beta, exclude_self, clamp=True):
    """method.md §4 with full C×C similarities and argsort, in float64."""
    p, q = p.astype(np.float64), q.astype(np.float64)

    def pushes(gallery, self_excluded):
        sims = p @ gallery.T
        if self_excluded:
            np.fill_diagonal(sims, -np.inf)
        idx = np.argsort(-sims, axis=1, kind='stable')[:, :k]
        w = np.take_along_axis(sims, idx, axis=1)
        w = np.maximum(w, 0.0) if clamp else w
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


@pytest.mark.parametrize('clamp', [True, False])
@pytest.mark.parametrize('exclude_self', [True, False])
@pytest.mark.parametrize('k, alpha, beta', [(5, 0.16, 0.004), (5, 0.3, 0.5), (30, 0.2, 0.4)])
def test_ndpp_matches_reference(banks, exclude_self, clamp, k, alpha, beta):
    """k=30 of 50 classes reaches negative similarities, so the clamp at 0 matters there."""
    old, new = banks
    want = _ndpp_reference(old, new, k, alpha, beta, exclude_self, clamp)
    options = {
        'k': k,
        'alpha': alpha,
        'beta': beta,
        'exclude_self': exclude_self,
        'clamp_weights': clamp,
    }
    _assert_close_to(pt.ndpp(old, new, **options), want, old)
    # Blocks smaller than C and not dividing it.
    _assert_close_to(pt.ndpp(old, new, query_block=7, gallery_block=12, **options), want, old)
    if k == 30:
        other = _ndpp_reference(old, new, k, alpha, beta, exclude_self, not clamp)
        assert np.abs(other - want).max() > 1e-3  # the clamp changes the result here


# The reference code's NDPP (PrunNet src/solver/adv_loss.py, CompatibleElasticPrototypeLoss
# .add_disturb_v0 with NORM_PROTOTYPE=True, and .analyze_new_prototype), transcribed in
# float64. Its old-space support search is not in the public release; it is taken here as
# method.md §4 states it: the K most similar other old prototypes.
def _add_disturb_v0(old_prototype, new_prototypes, topk, scale, scale_new):
    p, q = old_prototype.astype(np.float64), new_prototypes.astype(np.float64)
    sims_old = p @ p.T
    np.fill_diagonal(sims_old, -np.inf)  # j != c
    ids = np.argsort(-sims_old, axis=1, kind='stable')[:, :topk]
    support_similarities = np.take_along_axis(sims_old, ids, axis=1)
    support_prototypes = p[ids]
    # analyze_new_prototype: torch.topk over all new prototypes, j = c kept.
    sims_new = p @ q.T
    ids_new = np.argsort(-sims_new, axis=1, kind='stable')[:, :topk]
    o2n_top_similarities = np.take_along_axis(sims_new, ids_new, axis=1)
    new_prototypes_support = q[ids_new]
    disturbs = (
        scale
        * (support_similarities[..., None] * (p[:, None] - support_prototypes)).sum(axis=1)
        / (support_similarities[..., None].sum(axis=1) + 1e-8)
    )
    disturbs_n2o = (o2n_top_similarities[..., None] * (p[:, None] - new_prototypes_support)).sum(
        axis=1
    ) / (o2n_top_similarities[..., None].sum(axis=1) + 1e-8)
    disturbs += scale_new * disturbs_n2o
    x = p + scale * disturbs  # F.normalize(old_prototype + self.scale * disturbs, dim=1)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@pytest.mark.parametrize('scale, scale_new', [(0.4, 0.01), (0.7, 0.5)])
def test_ndpp_authors_mode_reproduces_add_disturb_v0(banks, scale, scale_new):
    """New prototypes near the old ones (so q_c is c's first new-space neighbour, as in
    training), and K = 30 of 50 (so some weights are negative similarities, not clamped)."""
    rng = np.random.default_rng(7)
    old = banks[0]
    new = _normalised_rows(old + 0.3 * rng.standard_normal(old.shape).astype(np.float32))
    want = _add_disturb_v0(old, new, 30, scale, scale_new)
    got = pt.ndpp(old, new, k=30, **pt.ndpp_authors_mode(scale, scale_new))
    _assert_close_to(got, want, old)
    # It is another perturbation than the default one (clamped weights, self excluded).
    spec = pt.ndpp(old, new, k=30, alpha=scale * scale, beta=scale * scale_new)
    assert np.abs(np.asarray(spec) - want).max() > 1e-3


def test_ndpp_authors_mode_values():
    """0.4 and 0.01 applied as the reference applies them: α = 0.4 · 0.4, β = 0.4 · 0.01."""
    mode = pt.ndpp_authors_mode()
    assert mode == pytest.approx(
        {'alpha': 0.16, 'beta': 0.004, 'clamp_weights': False, 'exclude_self': False}, rel=1e-12
    )


def _normalised_rows(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_ndpp_hand_worked_three_classes():
    """K = 1, α = 0.5, β = 0.25 in 2-D, worked by hand (weights s / (s + 1e-8) = 1 to 1e-8):

    p = (1, 0), (.8, .6), (0, 1);  q = (.28, .96), (.96, .28), (.6, .8).
    Old neighbours (j != c): 0 -> p1 (.8), 1 -> p0 (.8 > .6), 2 -> p1 (.6).
    New neighbours (j != c): 0 -> q1 (.96 > .6), 1 -> q2 (.96 > .8), 2 -> q0 (.96 > .28).
    d0 = .5 (.2, -.6) + .25 (.04, -.28)  = (.11, -.37)   p0 + d0 = (1.11, -.37)
    d1 = .5 (-.2, .6) + .25 (.2, -.2)    = (-.05, .25)   p1 + d1 = (.75, .85)
    d2 = .5 (-.8, .4) + .25 (-.28, .04)  = (-.47, .21)   p2 + d2 = (-.47, 1.21)
    """
    old = np.array([[1, 0], [0.8, 0.6], [0, 1]], np.float32)
    new = np.array([[0.28, 0.96], [0.96, 0.28], [0.6, 0.8]], np.float32)
    moved = np.array([[1.11, -0.37], [0.75, 0.85], [-0.47, 1.21]])
    want = moved / np.linalg.norm(moved, axis=1, keepdims=True)
    got = pt.ndpp(old, new, k=1, alpha=0.5, beta=0.25)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)


def test_ndpp_each_term_pushes_away_from_its_neighbours():
    """Each term alone lowers p̃_c's weighted similarity to the neighbours it pushes away from:
    the old term to c's old neighbours, the new term to c's new neighbours (a sign error in
    either term would raise it)."""
    rng = np.random.default_rng(1)
    old = _crowded(rng, 10, 5)
    new = _crowded(rng, 10, 5)
    p, q, k = old.astype(np.float64), new.astype(np.float64), 4

    def weighted_similarity(x, gallery, self_excluded):
        sims = p @ gallery.T
        if self_excluded:
            np.fill_diagonal(sims, -np.inf)
        idx = np.argsort(-sims, axis=1, kind='stable')[:, :k]
        w = np.maximum(np.take_along_axis(sims, idx, axis=1), 0)
        return np.sum(w * np.einsum('cd,ckd->ck', x, gallery[idx]), axis=1) / w.sum(axis=1)

    old_term = np.asarray(pt.ndpp(old, new, k=k, alpha=0.3, beta=0.0), np.float64)
    new_term = np.asarray(pt.ndpp(old, new, k=k, alpha=0.0, beta=0.3), np.float64)
    assert np.all(weighted_similarity(old_term, p, True) < weighted_similarity(p, p, True) - 1e-4)
    assert np.all(weighted_similarity(new_term, q, True) < weighted_similarity(p, q, True) - 1e-4)


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
    perturbed = pt.ndpp(old, new, k=4)
    stats = pt.perturbation_stats(old, perturbed)
    assert stats['top1_perturbed'] < stats['top1_old'] - 1e-3
    assert 0 < stats['mean_shift'] < 0.2
    # perturbation_stats against a NumPy recomputation.
    p, pp = old.astype(np.float64), np.asarray(perturbed, np.float64)

    def top1(x):
        sims = x @ x.T
        np.fill_diagonal(sims, -np.inf)
        return sims.max(axis=1).mean()

    want = {
        'mean_shift': np.linalg.norm(pp - p, axis=1).mean(),
        'top1_old': top1(p),
        'top1_perturbed': top1(pp),
    }
    assert stats == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize('exclude_self', [True, False])
def test_ndpp_sharded_equals_unsharded(banks, exclude_self):
    old, new = banks
    mesh = jax.make_mesh((8,), ('data',))
    kwargs = {'k': 9, 'alpha': 0.3, 'beta': 0.3, 'exclude_self': exclude_self}
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
