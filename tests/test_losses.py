"""Tests for bcl_jax.losses against NumPy float64 re-computations of method.md §3."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bcl_jax import losses

SCALE, MARGIN, TAU = 30.0, 0.3, 0.07


# --------------------------------------------------------------------------- references


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _ce(z, y):
    """Per-sample softmax cross-entropy in float64: logsumexp(z) - z[y]."""
    z = np.asarray(z, np.float64)
    zmax = z.max(axis=1, keepdims=True)
    lse = zmax[:, 0] + np.log(np.exp(z - zmax).sum(axis=1))
    return lse - z[np.arange(len(y)), y]


def _ref_margin_logits(cos, y, kind, s=SCALE, m=MARGIN):
    """Head logits written from the definitions: softmax plain; CosFace s(cos - m) on the target;
    ArcFace s·cos(θ + m) on the target while θ + m <= π, else s(cos - m·sin m)."""
    cos = np.asarray(cos, np.float64)
    z = cos.copy()
    if kind == 'softmax':
        return z
    rows = np.arange(len(y))
    c = cos[rows, y]
    if kind == 'cosface':
        z[rows, y] = c - m
    else:
        theta = np.arccos(c)
        z[rows, y] = np.where(theta + m <= np.pi, np.cos(theta + m), c - m * np.sin(m))
    return s * z


def _ref_classification(cos, y, kind, s=SCALE, m=MARGIN):
    return _ce(_ref_margin_logits(cos, y, kind, s, m), y).mean()


def _ref_compat(f, y, negatives, positives, tau=TAU):
    """L_comp = -(1/B) Σ log softmax over n_c, with n_{y_i} = positives[y_i], else negatives[c]."""
    f = np.asarray(f, np.float64)
    z = f @ np.asarray(negatives, np.float64).T
    rows = np.arange(len(y))
    z[rows, y] = np.sum(f * np.asarray(positives, np.float64)[y], axis=1)
    return _ce(z / tau, y).mean()


def _cosines(rng, b, c):
    return np.clip(np.tanh(rng.normal(size=(b, c))), -0.95, 0.95).astype(np.float32)


# --------------------------------------------------------------------------- classification


@pytest.mark.parametrize('kind', ['softmax', 'cosface', 'arcface'])
def test_classification_loss_matches_float64(kind):
    rng = np.random.default_rng(0)
    cos = _cosines(rng, 16, 7)
    y = rng.integers(0, 7, 16)
    got = float(
        losses.classification_loss(
            jnp.asarray(cos), jnp.asarray(y), kind=kind, scale=SCALE, margin=MARGIN
        )
    )
    np.testing.assert_allclose(got, _ref_classification(cos, y, kind), rtol=1e-5, atol=1e-5)


def test_classification_heads_differ_and_hand_case():
    # One sample, two classes, target cosine 0.5, other 0: worked by hand.
    cos = np.array([[0.5, 0.0]], np.float32)
    y = np.array([0])
    c = lambda kind: float(
        losses.classification_loss(  # noqa: E731
            jnp.asarray(cos), jnp.asarray(y), kind=kind, scale=SCALE, margin=MARGIN
        )
    )
    # softmax: log(1 + e^{-0.5}); cosface: log(1 + e^{-30·0.2}); arcface: θ = π/3.
    np.testing.assert_allclose(c('softmax'), np.log1p(np.exp(-0.5)), rtol=1e-6)
    np.testing.assert_allclose(c('cosface'), np.log1p(np.exp(-6.0)), rtol=1e-5, atol=1e-6)
    arc = np.cos(np.pi / 3 + MARGIN)
    np.testing.assert_allclose(c('arcface'), np.log1p(np.exp(-SCALE * arc)), rtol=1e-5, atol=1e-6)


def test_arcface_fallback_region_past_pi_minus_m():
    # Target cosines below cos(π - m) ≈ -0.955 (θ > π - m) take the fallback cos - m·sin(m);
    # the others take cos(θ + m). Mix both in one batch, away from the boundary.
    rng = np.random.default_rng(1)
    cos = _cosines(rng, 6, 5)
    y = np.array([0, 1, 2, 3, 4, 0])
    target = np.array([-0.99, -0.97, -0.5, 0.2, 0.9, -0.999], np.float32)
    cos[np.arange(6), y] = target
    assert (target[[0, 1, 5]] < np.cos(np.pi - MARGIN)).all()
    z = np.asarray(
        losses.margin_logits(
            jnp.asarray(cos), jnp.asarray(y), kind='arcface', scale=SCALE, margin=MARGIN
        )
    )
    expect = _ref_margin_logits(cos, y, 'arcface')
    np.testing.assert_allclose(z, expect, rtol=1e-5, atol=1e-4)
    # The fallback keeps the target logit monotone: below the boundary it is cos - m sin m.
    np.testing.assert_allclose(z[0, 0] / SCALE, -0.99 - MARGIN * np.sin(MARGIN), atol=1e-5)
    got = float(
        losses.classification_loss(
            jnp.asarray(cos), jnp.asarray(y), kind='arcface', scale=SCALE, margin=MARGIN
        )
    )
    np.testing.assert_allclose(got, _ref_classification(cos, y, 'arcface'), rtol=1e-5)


def test_unknown_head_is_an_error():
    with pytest.raises(ValueError, match='unknown head'):
        losses.classification_loss(jnp.zeros((2, 3)), jnp.zeros(2, jnp.int32), kind='sphere')


@pytest.mark.parametrize('kind', ['cosface', 'arcface'])
def test_gradients_finite_at_cos_plus_minus_one(kind):
    # Exactly ±1 cosines in target and non-target positions: arccos' derivative is infinite
    # there, so the arcface path must keep its gradient finite.
    cos = jnp.asarray([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.3], [1.0, 1.0, -1.0]], jnp.float32)
    y = jnp.asarray([0, 0, 2])
    loss, g = jax.value_and_grad(
        lambda c: losses.classification_loss(c, y, kind=kind, scale=SCALE, margin=MARGIN)
    )(cos)
    assert np.isfinite(float(loss))
    assert np.isfinite(np.asarray(g)).all()

    # Through normalised embeddings and weights: emb equal to a class weight gives cos = 1.
    w = _unit(np.random.default_rng(2).normal(size=(3, 4))).astype(np.float32)
    emb = np.stack([w[0], -w[1], w[2]]).astype(np.float32)

    def from_emb(e):
        e = e / jnp.linalg.norm(e, axis=-1, keepdims=True)
        c = jnp.clip(e @ jnp.asarray(w).T, -1.0, 1.0)
        return losses.classification_loss(
            c, jnp.asarray([0, 1, 2]), kind=kind, scale=SCALE, margin=MARGIN
        )

    g = jax.grad(from_emb)(jnp.asarray(emb))
    assert np.isfinite(np.asarray(g)).all()


# --------------------------------------------------------------------------- compatibility


def _compat_inputs(seed=0, b=12, c=6, d=5):
    rng = np.random.default_rng(seed)
    f = _unit(rng.normal(size=(b, d))).astype(np.float32)
    p = _unit(rng.normal(size=(c, d))).astype(np.float32)
    p_tilde = _unit(p + 0.3 * rng.normal(size=(c, d))).astype(np.float32)
    y = rng.integers(0, c, b)
    return f, y, p, p_tilde


def test_compatibility_plain_bct_matches_float64():
    f, y, p, _ = _compat_inputs()
    got = float(
        losses.compatibility_loss(jnp.asarray(f), jnp.asarray(y), jnp.asarray(p), temperature=TAU)
    )
    np.testing.assert_allclose(got, _ref_compat(f, y, p, p), rtol=1e-5)


def test_compatibility_perturbed_positive_matches_float64():
    f, y, p, p_tilde = _compat_inputs(1)
    got = float(
        losses.compatibility_loss(
            jnp.asarray(f),
            jnp.asarray(y),
            jnp.asarray(p),
            temperature=TAU,
            positive_prototypes=jnp.asarray(p_tilde),
        )
    )
    expect = _ref_compat(f, y, p, p_tilde)  # only the ground-truth prototype is perturbed
    np.testing.assert_allclose(got, expect, rtol=1e-5)
    # It is a different number from plain BCT and from perturbing every class.
    assert abs(expect - _ref_compat(f, y, p, p)) > 1e-3
    assert abs(expect - _ref_compat(f, y, p_tilde, p_tilde)) > 1e-3


def test_compatibility_perturb_negatives_form():
    # perturb_negatives=True: pass the perturbed bank as the prototypes: n_c = p̃_c for every c.
    f, y, _, p_tilde = _compat_inputs(2)
    got = float(
        losses.compatibility_loss(
            jnp.asarray(f), jnp.asarray(y), jnp.asarray(p_tilde), temperature=0.1
        )
    )
    np.testing.assert_allclose(got, _ref_compat(f, y, p_tilde, p_tilde, tau=0.1), rtol=1e-5)


def test_compatibility_positive_equal_to_prototypes_is_plain():
    f, y, p, _ = _compat_inputs(3)
    args = (jnp.asarray(f), jnp.asarray(y), jnp.asarray(p))
    plain = float(losses.compatibility_loss(*args, temperature=TAU))
    same = float(
        losses.compatibility_loss(*args, temperature=TAU, positive_prototypes=jnp.asarray(p))
    )
    np.testing.assert_allclose(same, plain, rtol=1e-6)


def test_compatibility_hand_case():
    # f = e1, prototypes e1 and e2, label 0, τ = 0.5: loss = log(1 + e^{(0 - 1)/0.5}).
    f = jnp.asarray([[1.0, 0.0]])
    p = jnp.asarray([[1.0, 0.0], [0.0, 1.0]])
    got = float(losses.compatibility_loss(f, jnp.asarray([0]), p, temperature=0.5))
    np.testing.assert_allclose(got, np.log1p(np.exp(-2.0)), rtol=1e-6)
    # Positive replaced by (0.6, 0.8): f·p̂ = 0.6 -> log(1 + e^{(0 - 0.6)/0.5}).
    pos = jnp.asarray([[0.6, 0.8], [0.0, 1.0]])
    got = float(
        losses.compatibility_loss(f, jnp.asarray([0]), p, temperature=0.5, positive_prototypes=pos)
    )
    np.testing.assert_allclose(got, np.log1p(np.exp(-1.2)), rtol=1e-6)


# --------------------------------------------------------------------------- influence


@pytest.mark.parametrize('kind', ['softmax', 'cosface', 'arcface'])
def test_influence_loss_excludes_new_classes(kind):
    rng = np.random.default_rng(4)
    c_new, c_old, b = 8, 3, 20
    old_label = np.full(c_new, -1, np.int32)
    old_label[[1, 4, 6]] = [0, 1, 2]
    y = rng.integers(0, c_new, b)
    y[:3] = [1, 0, 6]  # at least one old and one new class
    logits = _cosines(rng, b, c_old)
    got = float(
        losses.influence_loss(
            jnp.asarray(logits),
            jnp.asarray(y),
            jnp.asarray(old_label),
            kind=kind,
            scale=SCALE,
            margin=MARGIN,
        )
    )
    keep = old_label[y] >= 0
    assert 0 < keep.sum() < b
    mapped = old_label[y][keep]
    expect = _ce(_ref_margin_logits(logits[keep], mapped, kind), mapped).mean()
    np.testing.assert_allclose(got, expect, rtol=1e-5)


def test_influence_loss_all_excluded_is_zero():
    old_label = jnp.asarray([-1, -1, 0], jnp.int32)
    logits = jnp.asarray(_cosines(np.random.default_rng(5), 4, 1))
    y = jnp.asarray([0, 1, 1, 0])
    got = losses.influence_loss(logits, y, old_label, kind='cosface')
    assert float(got) == 0.0
    g = jax.grad(lambda z: losses.influence_loss(z, y, old_label, kind='cosface'))(logits)
    np.testing.assert_array_equal(np.asarray(g), 0.0)


# --------------------------------------------------------------------------- l2


def test_l2_loss_normalises_old_embeddings():
    rng = np.random.default_rng(6)
    f = _unit(rng.normal(size=(10, 6))).astype(np.float32)
    old = (rng.normal(size=(10, 6)) * rng.uniform(0.1, 20, size=(10, 1))).astype(np.float32)
    got = float(losses.l2_loss(jnp.asarray(f), jnp.asarray(old)))
    expect = np.mean(np.sum((f.astype(np.float64) - _unit(old)) ** 2, axis=1))
    np.testing.assert_allclose(got, expect, rtol=1e-5)
    # Hand case: f = e1, old = (0, 5): ||e1 - e2||² = 2.
    got = float(losses.l2_loss(jnp.asarray([[1.0, 0.0]]), jnp.asarray([[0.0, 5.0]])))
    np.testing.assert_allclose(got, 2.0, rtol=1e-6)
