"""bcl_jax.methods (LCE, UniBCT, Hot-refresh/RACT, AdvBCT) against NumPy float64 transcriptions of
the reference code's formulas, hand-worked cases and finite differences; every function jitted."""

import functools
import math

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bcl_jax import class_stats, prototypes
from bcl_jax.methods import advbct, hot_refresh, lce, unibct

RTOL = 1e-5


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _f32(*arrays):
    return [jnp.asarray(np.asarray(a, np.float32)) for a in arrays]


def _log_softmax(z, axis=-1):
    z = np.asarray(z, np.float64)
    m = z.max(axis=axis, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=axis, keepdims=True))


def _softmax(z, axis):
    return np.exp(_log_softmax(z, axis))


def _clustered(rng, labels, num_classes, d, spread=0.4, outliers=()):
    """Unit embeddings scattered around one random direction per class; rows in `outliers` are
    random directions, far from their class."""
    centres = _unit(rng.normal(size=(num_classes, d)))
    x = centres[labels] + spread * rng.normal(size=(len(labels), d)) / np.sqrt(d)
    x[list(outliers)] = rng.normal(size=(len(outliers), d))
    return _unit(x).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# LCE: per-class statistics
# ----------------------------------------------------------------------------------------------


def _ref_class_meta(feat, labels, metric):
    """AdvBCT extract_feat.gen_class_meta / gen_class_theta, per class in float64:
    {class: (centre, sorted radii kept by the 1.5·IQR rule)}."""
    feat = _unit(feat)
    meta = {}
    for k in sorted(set(labels.tolist())):
        f = feat[labels == k]
        centre = f.mean(axis=0)
        if metric == 'distance':
            radius = sorted(np.linalg.norm(f - centre, axis=1).tolist())
        else:
            cos = np.minimum(f @ (centre / np.linalg.norm(centre)), 1.0)
            radius = sorted(np.arccos(cos).tolist())
        kept = radius
        if len(radius) >= 4:
            n = len(radius)
            q3, q1 = radius[int(3 * n / 4)], radius[int(n / 4)]
            iqr = q3 - q1
            kept = [r for r in radius if not (r < q1 - 1.5 * iqr or r > q3 + 1.5 * iqr)]
        meta[k] = (centre, kept or radius)
    return meta


SIZES = [0, 1, 2, 3, 4, 5, 9, 16, 30, 40]  # images per class; class 0 has none


@pytest.fixture(scope='module')
def old_data():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(len(SIZES)), SIZES).astype(np.int32)
    start = np.cumsum([0] + SIZES)
    # A far outlier in each class big enough for the IQR rule to drop it.
    outliers = [start[c] for c in range(len(SIZES)) if SIZES[c] >= 9]
    feat = _clustered(rng, labels, len(SIZES), d=8, outliers=outliers)
    perm = rng.permutation(len(labels))
    return feat[perm], labels[perm]


@pytest.mark.parametrize('metric', ['distance', 'angle'])
def test_class_statistics_match_reference(old_data, metric):
    feat, labels = old_data
    num_classes = len(SIZES) + 3  # three padding classes after the real ones
    sums, counts = prototypes.class_sums(
        *_f32(feat), jnp.asarray(labels), jnp.ones(len(labels), bool), num_classes=num_classes
    )
    protos, norms = jax.jit(class_stats.class_centres)(sums, counts)
    radii = jax.jit(functools.partial(class_stats.sample_radii, metric=metric))(
        *_f32(feat), jnp.asarray(labels), protos, norms
    )
    stats = jax.jit(class_stats.class_radii, static_argnames=('num_classes', 'outlier_rule'))
    r_max, kept = stats(radii, jnp.asarray(labels), num_classes=num_classes)

    meta = _ref_class_meta(feat, labels, metric)
    dropped = 0
    for k in range(num_classes):
        if k not in meta:  # no images: zero statistics
            assert float(norms[k]) == 0 and int(kept[k]) == 0 and float(r_max[k]) == 0
            continue
        centre, kept_radii = meta[k]
        np.testing.assert_allclose(
            np.asarray(protos[k]) * float(norms[k]), centre, rtol=RTOL, atol=1e-6
        )
        assert int(kept[k]) == len(kept_radii)
        np.testing.assert_allclose(float(r_max[k]), kept_radii[-1], rtol=RTOL, atol=1e-6)
        dropped += SIZES[k] - len(kept_radii)
    assert dropped >= 4  # the outliers really were dropped


def test_class_radii_streams_without_outlier_rule(old_data):
    _feat, labels = old_data
    rng = np.random.default_rng(1)
    radii = jnp.asarray(rng.random(len(labels)).astype(np.float32))
    valid = rng.random(len(labels)) < 0.8
    stats = jax.jit(class_stats.class_radii, static_argnames=('num_classes', 'outlier_rule'))
    c = len(SIZES)
    whole = stats(
        radii, jnp.asarray(labels), jnp.asarray(valid), num_classes=c, outlier_rule='none'
    )
    half = len(labels) // 2
    a = stats(
        radii[:half],
        jnp.asarray(labels[:half]),
        jnp.asarray(valid[:half]),
        num_classes=c,
        outlier_rule='none',
    )
    b = stats(
        radii[half:],
        jnp.asarray(labels[half:]),
        jnp.asarray(valid[half:]),
        num_classes=c,
        outlier_rule='none',
    )
    np.testing.assert_array_equal(np.maximum(a[0], b[0]), whole[0])
    np.testing.assert_array_equal(a[1] + b[1], whole[1])
    r = np.asarray(radii)
    for k in range(c):
        sel = (labels == k) & valid
        assert int(whole[1][k]) == sel.sum()
        assert float(whole[0][k]) == (r[sel].max() if sel.any() else 0.0)


def test_class_radii_hand_case():
    # One class, radii 1..7 and 100: q1 = r[2] = 3, q3 = r[6] = 7, fences [-3, 13] drop 100.
    radii = jnp.array([5.0, 100.0, 1.0, 7.0, 2.0, 6.0, 3.0, 4.0])
    stats = jax.jit(functools.partial(class_stats.class_radii, num_classes=1))
    r_max, kept = stats(radii, jnp.zeros(8, jnp.int32))
    assert float(r_max[0]) == 7.0 and int(kept[0]) == 7


# ----------------------------------------------------------------------------------------------
# LCE: losses
# ----------------------------------------------------------------------------------------------


def _lce_batch(seed=0, b=12, c=6, pad=2, d=5):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, b).astype(np.int32)
    emb = _unit(rng.normal(size=(b, d)))
    protos = np.concatenate([_unit(rng.normal(size=(c, d))), np.zeros((pad, d))])
    kernel = np.concatenate([rng.normal(size=(d, c)), np.zeros((d, pad))], axis=1)
    angle = np.concatenate([rng.uniform(0.3, 1.2, c), np.zeros(pad)])
    valid = np.concatenate([rng.random(c) < 0.7, [True] * pad])  # padding marked valid on purpose
    valid[labels[0]] = True
    return emb, labels, protos, kernel, angle, valid


@pytest.mark.parametrize('over', ['batch', 'classes'])
def test_alignment_loss_matches_reference(over):
    _emb, labels, protos, kernel, _, valid = _lce_batch()
    c = 6
    fn = jax.jit(functools.partial(lce.alignment_loss, over=over, num_classes=c))
    got = float(fn(*_f32(kernel), jnp.asarray(labels), *_f32(protos), jnp.asarray(valid)))
    w = _unit(kernel[:, :c].T)
    if over == 'batch':  # AdvBCT: mean over valid samples of 1 - cos(w_y, p_y)
        cos = np.sum(w[labels] * protos[labels], axis=1)
        want = np.mean((1 - cos)[valid[labels]])
    else:  # LCE official: mse over the valid real classes and the dims
        want = np.mean(((w - protos[:c]) ** 2)[valid[:c]])
    np.testing.assert_allclose(got, want, rtol=RTOL)


@pytest.mark.parametrize('space', ['angle', 'cosine'])
def test_boundary_loss_matches_reference(space):
    emb, labels, protos, _, angle, valid = _lce_batch(seed=1)
    fn = jax.jit(functools.partial(lce.boundary_loss, space=space))
    got = float(fn(*_f32(emb), jnp.asarray(labels), *_f32(protos, angle), jnp.asarray(valid)))
    cos = np.sum(emb * protos[labels], axis=1)
    if space == 'angle':
        gap = np.arccos(cos) - angle[labels]
    else:
        gap = np.cos(angle[labels]) - cos
    want = np.mean(np.maximum(gap, 0)[valid[labels]])
    assert want > 0
    np.testing.assert_allclose(got, want, rtol=RTOL)


def test_boundary_loss_hand_case():
    # Centre (1, 0), radius 30°: a sample at 60° is 30° outside, one at 10° inside.
    p = jnp.array([[1.0, 0.0]])
    f = jnp.array([[0.5, math.sqrt(3) / 2], [math.cos(0.1745), math.sin(0.1745)]])
    args = (f, jnp.zeros(2, jnp.int32), p, jnp.array([math.pi / 6]), jnp.array([True]))
    angle = jax.jit(lce.boundary_loss)
    cosine = jax.jit(functools.partial(lce.boundary_loss, space='cosine'))
    np.testing.assert_allclose(float(angle(*args)), math.pi / 12, rtol=RTOL)
    np.testing.assert_allclose(float(cosine(*args)), (math.sqrt(3) / 2 - 0.5) / 2, rtol=RTOL)
    # On the centre (cos = 1) the gradient stays finite.
    g = jax.jit(jax.grad(angle))(jnp.array([[1.0, 0.0], [0.0, 1.0]]), *args[1:])
    assert np.isfinite(np.asarray(g)).all()


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match='class_stats.class_radii: outlier_rule'):
        class_stats.class_radii(
            jnp.ones(3), jnp.zeros(3, jnp.int32), num_classes=1, outlier_rule='max'
        )
    with pytest.raises(ValueError, match='class_stats.sample_radii: metric'):
        class_stats.sample_radii(
            jnp.ones((1, 2)), jnp.zeros(1, jnp.int32), jnp.ones((1, 2)), jnp.ones(1), metric='cos'
        )
    with pytest.raises(ValueError, match=r'lce.alignment_loss: kernel \(5, 3\)'):
        lce.alignment_loss(
            jnp.ones((5, 3)), jnp.zeros(2, jnp.int32), jnp.ones((3, 4)), jnp.ones(3, bool)
        )
    with pytest.raises(ValueError, match='unibct.compatibility_loss: embeddings'):
        unibct.compatibility_loss(jnp.ones((2, 4)), jnp.zeros(3, jnp.int32), jnp.ones((3, 4)))


# ----------------------------------------------------------------------------------------------
# Hot-refresh / RACT
# ----------------------------------------------------------------------------------------------


def _ref_ract(f, o, labels, temperature, k, negatives=None):
    """OpenCompatible calculate_loss('contra_ract') in float64, one GPU; `negatives` replaces the
    new embeddings on the negative side (frozen copies, as all_gather gives)."""
    f, o = np.asarray(f, np.float64), _unit(o)
    neg = f if negatives is None else np.asarray(negatives, np.float64)
    masks = (labels[:, None] == labels[None, :]).astype(np.float64)
    pos = np.sum(f * o, axis=1, keepdims=True)
    n2o = f @ o.T - masks * 1e9
    n2n = f @ neg.T - masks * 1e9
    if k > 0:
        n2o = -np.sort(-n2o, axis=1)[:, :k]
        n2n = -np.sort(-n2n, axis=1)[:, :k]
    logits = np.concatenate([pos, n2o, n2n], axis=1) / temperature
    return -np.mean(_log_softmax(logits)[:, 0])


def _ract_batch(seed=0, b=12, d=8):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, b).astype(np.int32)
    f = _unit(rng.normal(size=(b, d)))
    o = _unit(f + 0.8 * rng.normal(size=(b, d)))
    return f, o, labels


@pytest.mark.parametrize('k', [3, 0])
def test_ract_loss_matches_reference(k):
    f, o, labels = _ract_batch()
    fn = jax.jit(functools.partial(hot_refresh.ract_loss, temperature=0.01, topk_negatives=k))
    got = float(fn(*_f32(f, o), jnp.asarray(labels)))
    np.testing.assert_allclose(got, _ref_ract(f, o, labels, 0.01, k), rtol=RTOL)


def test_ract_gradient_moves_only_the_anchor():
    f, o, labels = _ract_batch(seed=2)
    t, k = 0.1, 3
    grad = jax.jit(
        jax.grad(functools.partial(hot_refresh.ract_loss, temperature=t, topk_negatives=k))
    )
    got = np.asarray(grad(*_f32(f, o), jnp.asarray(labels)))
    want, eps = np.zeros_like(f), 1e-6
    for idx in np.ndindex(*f.shape):  # central differences with the negatives held fixed
        step = np.zeros_like(f)
        step[idx] = eps
        up = _ref_ract(f + step, o, labels, t, k, negatives=f)
        down = _ref_ract(f - step, o, labels, t, k, negatives=f)
        want[idx] = (up - down) / (2 * eps)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5)
    both = jax.jit(
        jax.grad(
            functools.partial(
                hot_refresh.ract_loss,
                temperature=t,
                topk_negatives=k,
                stop_gradient_negatives=False,
            )
        )
    )
    assert not np.allclose(np.asarray(both(*_f32(f, o), jnp.asarray(labels))), got, atol=1e-4)


def test_gallery_uncertainty_and_order():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(7, 5)).astype(np.float32)
    logits[:, 4] = 50.0  # a padding column: ignored
    fn = jax.jit(functools.partial(hot_refresh.gallery_uncertainty, scale=3.0, num_classes=4))
    got = np.asarray(fn(jnp.asarray(logits)))
    p = _softmax(3.0 * logits[:, :4].astype(np.float64), axis=1)
    np.testing.assert_allclose(got, -np.sum(p * np.log(p), axis=1), rtol=RTOL)
    # Hand cases: uniform over 4 classes -> log 4; near-certain -> ~0.
    hand = jax.jit(hot_refresh.gallery_uncertainty)(jnp.array([[0.0, 0, 0, 0], [40.0, 0, 0, 0]]))
    np.testing.assert_allclose(np.asarray(hand), [math.log(4), 0.0], atol=1e-6)

    order = jax.jit(hot_refresh.backfill_order)(jnp.array([0.1, 0.5, 0.5, 0.2]))
    np.testing.assert_array_equal(np.asarray(order), [1, 2, 3, 0])  # ties keep row order
    mask = jax.jit(hot_refresh.backfill_mask)(order, jnp.int32(2))
    np.testing.assert_array_equal(np.asarray(mask), [False, True, True, False])


# ----------------------------------------------------------------------------------------------
# UniBCT
# ----------------------------------------------------------------------------------------------


def _ref_refine(old, new, lam, temperature, axis):
    """MixBCT refine_prototype.PrototypeGeneration for one class in float64 (axis 0: its
    torch.softmax(edges, dim=0)), then the mean, normalised."""
    edges = new @ new.T / temperature
    np.fill_diagonal(edges, -1e9)
    edges = _softmax(edges, axis=axis)
    refined = (1 - lam) * np.linalg.inv(np.eye(len(old)) - lam * edges) @ old
    return _unit(refined.mean(axis=0))


def _groups(seed=0, sizes=(1, 3, 5, 0, 4), n=5, d=6):
    rng = np.random.default_rng(seed)
    g = len(sizes)
    mask = np.arange(n)[None, :] < np.array(sizes)[:, None]
    old = np.where(mask[..., None], _unit(rng.normal(size=(g, n, d))), 0.0)
    new = np.where(mask[..., None], _unit(rng.normal(size=(g, n, d))), 7.0)  # junk padding
    return old, new, mask


@pytest.mark.parametrize('normalize_over, axis', [('columns', 0), ('rows', 1)])
def test_refine_prototypes_matches_reference(normalize_over, axis):
    old, new, mask = _groups()
    fn = jax.jit(functools.partial(unibct.refine_prototypes, normalize_over=normalize_over))
    got = np.asarray(fn(*_f32(old, new), jnp.asarray(mask)))
    for g in range(len(mask)):
        m = mask[g]
        if not m.any():
            np.testing.assert_array_equal(got[g], 0.0)
            continue
        want = _ref_refine(old[g][m], new[g][m], 0.9, 0.05, axis)
        np.testing.assert_allclose(got[g], want, rtol=RTOL, atol=2e-6)
    if normalize_over == 'columns':  # column-stochastic propagation keeps the class mean
        means = np.stack([_unit(old[g][mask[g]].mean(0)) for g in (0, 1, 2, 4)])
        np.testing.assert_allclose(got[[0, 1, 2, 4]], means, atol=2e-6)


def _ref_arcface_ce(cos, target, scale, margin, columns):
    z = cos.copy()
    rows = np.arange(len(target))
    theta = np.arccos(cos[rows, target])
    assert np.all(theta + margin < np.pi)
    z[rows, target] = np.cos(theta + margin)
    z = scale * z
    z[:, ~columns] = -np.inf
    return -_log_softmax(z)[rows, target]


def test_unibct_compatibility_loss_matches_reference():
    rng = np.random.default_rng(4)
    b, c, pad, d = 10, 6, 2, 5
    labels = rng.integers(0, c, b).astype(np.int32)
    emb = _unit(rng.normal(size=(b, d)))
    protos = np.concatenate([_unit(rng.normal(size=(c, d))), np.zeros((pad, d))])
    old_label = np.array([0, -1, 1, 2, -1, 3, 0, 0], np.int32)  # padding rows map to 0
    cos = emb @ protos[:c].T
    args = (*_f32(emb), jnp.asarray(labels), *_f32(protos))

    fn = jax.jit(functools.partial(unibct.compatibility_loss, num_classes=c))
    got = float(fn(*args, old_label=jnp.asarray(old_label)))
    counted = old_label[labels] >= 0
    per = _ref_arcface_ce(cos, labels, 30.0, 0.3, old_label[:c] >= 0)
    np.testing.assert_allclose(got, per[counted].mean(), rtol=RTOL)

    softmax = jax.jit(functools.partial(unibct.compatibility_loss, kind='softmax', num_classes=c))
    plain = float(softmax(*args))  # MixBCT: cos logits, all classes
    np.testing.assert_allclose(plain, -np.mean(_log_softmax(cos)[np.arange(b), labels]), rtol=RTOL)

    g = jax.jit(jax.grad(fn))(*args, old_label=jnp.asarray(old_label))
    assert np.isfinite(np.asarray(g)).all()
    assert np.abs(np.asarray(g)[~counted]).max() == 0  # new-class samples do not count


# ----------------------------------------------------------------------------------------------
# AdvBCT
# ----------------------------------------------------------------------------------------------


def test_gradient_reversal_is_identity_forward_and_flips_backward():
    x = jnp.array([[1.0, -2.0], [0.5, 3.0]])
    g = jnp.array([[0.3, 1.0], [-2.0, 4.0]])
    fn = jax.jit(advbct.gradient_reversal)
    np.testing.assert_array_equal(np.asarray(fn(x, 0.25)), np.asarray(x))
    _out, vjp = jax.vjp(fn, x, jnp.float32(0.25))
    dx, dscale = vjp(g)
    np.testing.assert_allclose(np.asarray(dx), -0.25 * np.asarray(g), rtol=RTOL)
    assert float(dscale) == 0.0
    # Through a loss: d/dx sum(3·R(x)) = -α·3.
    dx = jax.jit(jax.grad(lambda v: jnp.sum(3.0 * advbct.gradient_reversal(v, 0.5))))(x)
    np.testing.assert_allclose(np.asarray(dx), -1.5, rtol=RTOL)


def test_schedules_hand_values():
    alpha = np.asarray(jax.jit(advbct.reversal_scale)(jnp.array([0.0, 0.1, 1.0])))
    np.testing.assert_allclose(
        alpha, [0.0, 2 / (1 + math.exp(-1)) - 1, 2 / (1 + math.exp(-10)) - 1], rtol=RTOL, atol=1e-7
    )
    weight = jax.jit(advbct.adversarial_weight, static_argnames='num_epochs')
    np.testing.assert_allclose(float(weight(0, num_epochs=30)), 31 / 30, rtol=RTOL)
    np.testing.assert_allclose(float(weight(29, num_epochs=30)), 2 / 30, rtol=RTOL)


def _ref_discriminator(params, x):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    h = np.asarray(x, np.float64) @ p['fc1']['kernel'] + p['fc1']['bias']
    h = (h - h.mean(0)) / np.sqrt(h.var(0) + 1e-5) * p['bn']['scale'] + p['bn']['bias']
    return np.maximum(h, 0) @ p['fc2']['kernel'] + p['fc2']['bias']


def _ref_adversarial(params, new, old):
    return (
        -_log_softmax(_ref_discriminator(params, new))[:, 0].mean()
        - _log_softmax(_ref_discriminator(params, old))[:, 1].mean()
    )


def _adv_batch(seed=5, b=9, d=6):
    rng = np.random.default_rng(seed)
    init = jax.jit(advbct.init_discriminator, static_argnames=('dim', 'hidden'))
    params = init(jax.random.key(seed), dim=d, hidden=5)
    params['bn'] = {
        'scale': jnp.asarray(rng.uniform(0.5, 1.5, 5), jnp.float32),
        'bias': jnp.asarray(rng.normal(size=5) * 0.1, jnp.float32),
    }
    return params, _unit(rng.normal(size=(b, d))), _unit(rng.normal(size=(b, d)) + 0.5)


def test_discriminator_and_adversarial_loss_match_reference():
    params, new, old = _adv_batch()
    assert params['fc1']['kernel'].shape == (6, 5) and params['fc2']['kernel'].shape == (5, 2)
    assert float(jnp.abs(params['fc1']['kernel']).max()) <= 1 / math.sqrt(6)
    logits = jax.jit(advbct.discriminator_logits)(params, *_f32(new))
    np.testing.assert_allclose(
        np.asarray(logits), _ref_discriminator(params, new), rtol=RTOL, atol=1e-5
    )
    loss = jax.jit(functools.partial(advbct.adversarial_loss, reversal=0.7))
    np.testing.assert_allclose(
        float(loss(params, *_f32(new, old))), _ref_adversarial(params, new, old), rtol=RTOL
    )


def test_adversarial_loss_gradients_by_finite_differences():
    params, new, old = _adv_batch(seed=6)
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        loss = functools.partial(advbct.adversarial_loss, reversal=0.7)
        grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(p64, jnp.asarray(new), jnp.asarray(old))
        flat, unravel = jax.flatten_util.ravel_pytree(p64)
        value = jax.jit(lambda v: loss(unravel(v), jnp.asarray(new), jnp.asarray(old)))
        eps = 1e-6
        fd = np.array(
            [
                (float(value(flat.at[i].add(eps))) - float(value(flat.at[i].add(-eps)))) / (2 * eps)
                for i in range(flat.size)
            ]
        )
        got = np.asarray(jax.flatten_util.ravel_pytree(grads[0])[0])
    np.testing.assert_allclose(got, fd, rtol=1e-5, atol=1e-8)
    # The new embeddings' gradient is the finite-difference slope of the value, reversed and
    # scaled by α = 0.7.
    fd_new = np.zeros_like(new)
    for idx in np.ndindex(*new.shape):
        step = np.zeros_like(new)
        step[idx] = eps
        fd_new[idx] = (
            _ref_adversarial(params, new + step, old) - _ref_adversarial(params, new - step, old)
        ) / (2 * eps)
    np.testing.assert_allclose(np.asarray(grads[1]), -0.7 * fd_new, rtol=1e-4, atol=1e-7)


def test_elastic_radius_hand_case():
    # r = 0.6 < T = 1: r + |r - T|·σ(0) = 0.8; r = 1.2 > T: r - |r - T|·σ(0) = 1.1.
    got = jax.jit(advbct.elastic_radius)(jnp.array([0.6, 1.2]), jnp.zeros(2))
    np.testing.assert_allclose(np.asarray(got), [0.8, 1.1], rtol=RTOL)


def _ref_elastic_boundary(f, labels, centres, r_max, valid, w, threshold):
    """AdvBCT trainer 'bct_limit' with ELASTIC_BOUNDARY, sample by sample in float64."""
    total, count = 0.0, 0
    for j, y in enumerate(labels):
        if not valid[y]:
            continue
        eb = abs(r_max[y] - threshold) / (1 + np.exp(-w[y]))
        radius = r_max[y] + eb if r_max[y] < threshold else r_max[y] - eb
        tmp = max(np.linalg.norm(f[j] - centres[y]) - radius, 0)
        if tmp > 0:
            total, count = total + tmp, count + 1
    return total / count if count else 0.0


def test_elastic_boundary_loss_matches_reference():
    rng = np.random.default_rng(7)
    b, c, pad, d = 16, 6, 2, 5
    labels = rng.integers(0, c, b).astype(np.int32)
    emb = _unit(rng.normal(size=(b, d)))
    protos = np.concatenate([_unit(rng.normal(size=(c, d))), np.zeros((pad, d))])
    norms = np.concatenate([rng.uniform(0.5, 0.95, c), np.zeros(pad)])
    r_max = np.concatenate([rng.uniform(0.6, 1.4, c), np.zeros(pad)])
    valid = np.concatenate([rng.random(c) < 0.8, [False] * pad])
    w = rng.uniform(-1, 1, c + pad)
    fn = jax.jit(functools.partial(advbct.elastic_boundary_loss, threshold=1.0))
    args = (*_f32(emb), jnp.asarray(labels), *_f32(protos, norms, r_max), jnp.asarray(valid))
    got = float(fn(*args, jnp.asarray(w, jnp.float32)))
    want = _ref_elastic_boundary(emb, labels, protos * norms[:, None], r_max, valid, w, 1.0)
    assert want > 0
    np.testing.assert_allclose(got, want, rtol=RTOL)
    # The gate's gradient: a violated class with r < T lowers the loss by growing its radius.
    gw = np.asarray(jax.jit(jax.grad(fn, argnums=6))(*args, jnp.asarray(w, jnp.float32)))
    assert np.isfinite(gw).all() and np.all(gw[:c][(r_max[:c] < 1) & ~valid[:c]] == 0)
    assert np.any(gw[:c][r_max[:c] < 1] < 0)


# ----------------------------------------------------------------------------------------------
# Sharded inputs: class-sharded banks and kernels with padding, batch split over 8 devices
# ----------------------------------------------------------------------------------------------


def test_losses_on_sharded_inputs_match_unsharded():
    # As bcl_jax's train loop lays out its step: a 1-D 'data' mesh with Auto axes.
    mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
    rows, classes = NamedSharding(mesh, P('data')), NamedSharding(mesh, P('data', None))
    columns = NamedSharding(mesh, P(None, 'data'))
    rng = np.random.default_rng(8)
    b, c, padded, d = 16, 13, 16, 8
    labels = jnp.asarray(rng.integers(0, c, b).astype(np.int32))
    emb, old = _f32(_unit(rng.normal(size=(b, d))), _unit(rng.normal(size=(b, d))))
    protos = np.zeros((padded, d), np.float32)
    protos[:c] = _unit(rng.normal(size=(c, d)))
    kernel = np.zeros((d, padded), np.float32)
    kernel[:, :c] = rng.normal(size=(d, c))
    valid = jnp.asarray(np.arange(padded) < c)
    angle = jnp.asarray(np.where(np.arange(padded) < c, 0.5, 0.0).astype(np.float32))

    def all_losses(emb, old, labels, protos, kernel):
        return jnp.stack(
            [
                hot_refresh.ract_loss(emb, old, labels),
                lce.alignment_loss(kernel, labels, protos, valid, num_classes=c),
                lce.alignment_loss(kernel, labels, protos, valid, over='classes', num_classes=c),
                lce.boundary_loss(emb, labels, protos, angle, valid),
                unibct.compatibility_loss(emb, labels, protos, num_classes=c),
            ]
        )

    plain = jax.jit(all_losses)(emb, old, labels, jnp.asarray(protos), jnp.asarray(kernel))
    placed = [
        jax.device_put(x, s)
        for x, s in [(emb, rows), (old, rows), (labels, rows), (protos, classes), (kernel, columns)]
    ]
    sharded = jax.jit(all_losses)(*placed)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(plain), rtol=RTOL)
