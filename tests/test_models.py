"""Tests for bcl_jax.models: shapes, parameter counts, BatchNorm modes, functional use in jit."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from bcl_jax.models.heads import (
    Classifier,
    EmbeddingHead,
    EmbeddingModel,
    build_model,
    l2_normalize,
)
from bcl_jax.models.resnet import GeM, ResNet, build_backbone, gem_pool


def n_params(model) -> int:
    """Trainable parameters only (conv kernels, BN scale/bias, linear); not BN running stats."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def abstract(fn):
    """Build a module without allocating or initialising its weights."""
    return nnx.eval_shape(fn)


def images(b=4, h=8, w=8, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (b, h, w, 3), dtype=np.uint8))


def tiny_cfg(head="cosface"):
    return ml_collections.ConfigDict(
        dict(arch="cifar_resnet", width=4, depth=8, embedding_dim=16, head=head)
    )


# --------------------------------------------------------------------------- backbones


@pytest.mark.parametrize(
    "name,width,size,expect",
    [
        ("cifar_resnet", 4, 8, 16),  # 4 * width
        ("resnet18", 4, 32, 32),  # 8 * width
        pytest.param("resnet50", 2, 32, 64, marks=pytest.mark.slow),  # 8 * width * 4
    ],
)
def test_backbone_output_shape(name, width, size, expect):
    m = build_backbone(name, width=width, depth=8, rngs=nnx.Rngs(0))
    assert m.out_features == expect
    y = m(jnp.ones((2, size, size, 3)), train=False)
    assert y.shape == (2, expect) and y.dtype == jnp.float32
    assert np.all(np.isfinite(y))


def test_torchvision_param_counts():
    """torchvision totals minus the 1000-way fc (512*1000+1000, 2048*1000+1000)."""
    r18 = abstract(lambda: build_backbone("resnet18", width=64, depth=18, rngs=nnx.Rngs(0)))
    r50 = abstract(lambda: build_backbone("resnet50", width=64, depth=50, rngs=nnx.Rngs(0)))
    assert n_params(r18) == 11_689_512 - 513_000 == 11_176_512
    assert n_params(r50) == 25_557_032 - 2_049_000 == 23_508_032


def test_cifar_resnet20_param_count():
    def conv(k, cin, cout):
        return k * k * cin * cout

    def bn(c):
        return 2 * c  # scale + bias

    w, n = 16, 3
    expected = conv(3, 3, w) + bn(w)  # stem
    cin = w
    for stage in range(3):
        cout = w * 2**stage
        for j in range(n):
            expected += conv(3, cin, cout) + bn(cout) + conv(3, cout, cout) + bn(cout)
            if cin != cout:  # projection shortcut at the first block of stages 2 and 3
                expected += conv(1, cin, cout) + bn(cout)
            cin = cout
    m = abstract(lambda: build_backbone("cifar_resnet", width=16, depth=20, rngs=nnx.Rngs(0)))
    assert expected == 271_824  # the classic ~0.27M, plus two small projections
    assert n_params(m) == expected


def test_zero_init_residual():
    m = ResNet(stage_sizes=(1, 1), block="bottleneck", width=4, stem="cifar", rngs=nnx.Rngs(0))
    for blk in m.blocks:
        assert np.all(blk.bn3.scale[...] == 0)
        assert np.all(blk.bn1.scale[...] == 1)
    m = ResNet(
        stage_sizes=(1,),
        block="basic",
        width=4,
        stem="cifar",
        rngs=nnx.Rngs(0),
        zero_init_residual=False,
    )
    assert np.all(m.blocks[0].bn2.scale[...] == 1)


def test_bad_names_and_depths_raise():
    with pytest.raises(ValueError, match="valid names"):
        build_backbone("vgg16", width=64, depth=16, rngs=nnx.Rngs(0))
    for depth in (18, 21, 2, None):
        with pytest.raises(ValueError, match="6n\\+2"):
            build_backbone("cifar_resnet", width=16, depth=depth, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="block"):
        ResNet(stage_sizes=(1,), block="wide", stem="cifar", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="stem"):
        ResNet(stage_sizes=(1,), block="basic", stem="tiny", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="classifier kind"):
        Classifier(8, 3, kind="sphereface", rngs=nnx.Rngs(0))


# --------------------------------------------------------------------------- heads


def test_l2_normalize_is_safe_at_zero():
    y = l2_normalize(jnp.array([[3.0, 4.0], [0.0, 0.0]]))
    np.testing.assert_allclose(y, [[0.6, 0.8], [0.0, 0.0]], atol=1e-7)
    g = jax.grad(lambda x: l2_normalize(x).sum())(jnp.zeros((1, 3)))
    assert np.all(np.isfinite(g))


def test_embedding_head_unit_norm():
    head = EmbeddingHead(10, 6, rngs=nnx.Rngs(0))
    e = head(jax.random.normal(jax.random.key(1), (5, 10)))
    assert e.shape == (5, 6)
    np.testing.assert_allclose(jnp.linalg.norm(e, axis=-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("kind", ["cosface", "arcface"])
def test_cosine_classifier_logits_are_cosines(kind):
    clf = Classifier(8, 5, kind=kind, rngs=nnx.Rngs(0))
    assert clf.kernel.shape == (8, 5) and clf.bias is None
    emb = jax.random.normal(jax.random.key(2), (6, 8)) * 3.0  # not unit: the head normalises
    logits = clf(emb)
    assert logits.shape == (6, 5)
    assert np.all(np.abs(logits) <= 1.0)
    e = np.asarray(emb, np.float64)
    w = np.asarray(clf.kernel[...], np.float64)
    ref = (e / np.linalg.norm(e, axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=0))
    np.testing.assert_allclose(logits, ref, atol=1e-5)
    # A column aligned with the embedding gives cosine 1 exactly (clipped, never above).
    clf.kernel[...] = clf.kernel[...].at[:, 0].set(emb[0] * 7.0)
    assert float(clf(emb[:1])[0, 0]) == pytest.approx(1.0, abs=1e-6)


def test_softmax_classifier_is_affine():
    clf = Classifier(4, 3, kind="softmax", rngs=nnx.Rngs(0))
    clf.bias[...] = jnp.array([1.0, 2.0, 3.0])
    emb = jax.random.normal(jax.random.key(3), (2, 4))
    np.testing.assert_allclose(clf(emb), emb @ clf.kernel[...] + clf.bias[...], atol=1e-6)


@pytest.mark.parametrize("head", ["softmax", "cosface", "arcface"])
def test_embedding_model_outputs(head):
    m = build_model(tiny_cfg(head), 7, rngs=nnx.Rngs(0))
    assert (m.embedding_dim, m.num_classes) == (16, 7)
    emb, logits = m(images(), train=True)
    assert emb.shape == (4, 16) and logits.shape == (4, 7)
    np.testing.assert_allclose(jnp.linalg.norm(emb, axis=-1), 1.0, atol=1e-5)


def test_embedding_model_without_classifier():
    m = build_model(tiny_cfg(), None, rngs=nnx.Rngs(0))
    assert m.classifier is None and m.num_classes is None
    emb, logits = m(images(), train=False)
    assert logits is None
    np.testing.assert_allclose(m.embed(images()), emb, atol=1e-6)


def test_preprocessing_lives_in_the_model():
    m = build_model(tiny_cfg(), None, rngs=nnx.Rngs(0))
    x = images()
    np.testing.assert_allclose(m.embed(x), m.embed(x.astype(jnp.float32)), atol=1e-6)
    # A mid-grey image maps to roughly zero mean per channel after ImageNet standardisation.
    z = EmbeddingModel.normalize_images(
        jnp.full((1, 1, 1, 3), 255.0) * jnp.array([0.485, 0.456, 0.406])
    )
    np.testing.assert_allclose(z, 0.0, atol=1e-6)


def test_build_model_accepts_plain_objects_and_dtype():
    class Cfg:
        arch, width, depth, embedding_dim, head, dtype = (
            "cifar_resnet",
            4,
            8,
            8,
            "softmax",
            "bfloat16",
        )

    m = build_model(Cfg(), 3, rngs=nnx.Rngs(0))
    emb, logits = m(images(), train=True)
    assert emb.dtype == jnp.float32 and logits.shape == (4, 3)
    assert m.backbone.stem_conv.kernel.dtype == jnp.float32  # params stay float32


# --------------------------------------------------------------------------- BatchNorm + jit


def batch_stats(model):
    return jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))


def trees_equal(a, b):
    return all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))


def test_train_updates_batch_stats_eval_does_not():
    m = build_model(tiny_cfg(), 5, rngs=nnx.Rngs(0))
    before = batch_stats(m)
    m(images(), train=False)
    assert trees_equal(before, batch_stats(m))
    m(images(), train=True)
    assert not trees_equal(before, batch_stats(m))


def test_eval_uses_running_stats_train_uses_batch_stats():
    m = build_model(tiny_cfg(), None, rngs=nnx.Rngs(0))
    m(images(8, seed=1), train=True)  # move running stats away from their initial values
    a, b = images(4, seed=2), images(4, seed=3)
    mixed = jnp.concatenate([a[:2], b[:2]])
    # Eval: a sample's embedding does not depend on the rest of the batch.
    np.testing.assert_allclose(m.embed(a)[:2], m.embed(mixed)[:2], atol=1e-5)
    # Train: batch statistics couple the samples (checked on a copy; stats move each call).
    g, s = nnx.split(m)
    out_a = nnx.merge(g, s)(a, train=True)[0][:2]
    out_mixed = nnx.merge(g, s)(mixed, train=True)[0][:2]
    assert not np.allclose(out_a, out_mixed, atol=1e-4)


def test_functional_split_merge_inside_jit():
    m = build_model(tiny_cfg(), 5, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(m)

    @jax.jit
    def step(state, x):
        model = nnx.merge(graphdef, state)
        emb, logits = model(x, train=True)
        return emb, logits, nnx.split(model)[1]

    emb, logits, new_state = step(state, images())
    assert emb.shape == (4, 16) and logits.shape == (4, 5)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    old_params, old_stats = nnx.split_state(state, nnx.Param, nnx.BatchStat)
    new_params, new_stats = nnx.split_state(new_state, nnx.Param, nnx.BatchStat)
    assert trees_equal(jax.tree.map(np.asarray, old_params), jax.tree.map(np.asarray, new_params))
    assert not trees_equal(jax.tree.map(np.asarray, old_stats), jax.tree.map(np.asarray, new_stats))
    # The updated statistics are what a later eval call uses.
    updated = nnx.merge(graphdef, new_state)
    assert trees_equal(batch_stats(updated), jax.tree.map(np.asarray, new_stats))


# --------------------------------------------------------------------------- GeM pooling


def gem_np(x, p, eps=1e-6):
    """float64 GeM from the formula: (mean over H, W of max(x, eps)^p)^(1/p)."""
    x = np.maximum(np.asarray(x, np.float64), eps)
    return np.mean(x**p, axis=(1, 2)) ** (1.0 / p)


def test_gem_pool_matches_float64_formula():
    x = np.random.default_rng(0).normal(size=(3, 5, 4, 6)).astype(np.float32)  # negatives clamp
    for p in (1.0, 3.0, 4.5):
        got = gem_pool(jnp.asarray(x), jnp.full((1,), p, jnp.float32))
        assert got.shape == (3, 6) and got.dtype == jnp.float32
        np.testing.assert_allclose(got, gem_np(x, p), rtol=1e-5, atol=1e-7)
    # All-negative input: every value is clamped to eps, so the pool is eps.
    np.testing.assert_allclose(
        gem_pool(-jnp.ones((1, 2, 2, 1)), jnp.ones((1,)) * 3.0), 1e-6, rtol=1e-5
    )


def test_gem_p_gets_the_gradient_of_the_formula():
    """d/dp of y = m^(1/p), m = mean(x^p): y * (mean(x^p ln x) / (p m) - ln m / p^2)."""
    x = np.random.default_rng(1).uniform(0.1, 2.0, (2, 3, 3, 4))
    gem = GeM()
    assert gem.p[...].shape == (1,) and float(gem.p[...][0]) == 3.0 and gem.eps == 1e-6

    def total(p):
        return jnp.sum(gem_pool(jnp.asarray(x, jnp.float32), p))

    grad = jax.grad(total)(gem.p[...])
    p = 3.0
    m = np.mean(x**p, axis=(1, 2))
    dm = np.mean(x**p * np.log(x), axis=(1, 2))
    expected = np.sum(m ** (1 / p) * (dm / (p * m) - np.log(m) / p**2))
    assert abs(expected) > 1e-2  # a gradient that matters
    np.testing.assert_allclose(grad, [expected], rtol=1e-4)


@pytest.mark.slow
def test_gem_model_trains_p_and_p1_is_the_average():
    cfg = ml_collections.ConfigDict(
        {"arch": "resnet18", "width": 4, "depth": None, "embedding_dim": 8, "head": "cosface"}
    )
    avg = build_model(cfg, 5, rngs=nnx.Rngs(0))
    cfg_avg = ml_collections.ConfigDict(dict(cfg.to_dict(), pool="avg"))
    cfg_gem = ml_collections.ConfigDict(dict(cfg.to_dict(), pool="gem"))
    explicit = build_model(cfg_avg, 5, rngs=nnx.Rngs(0))
    gem = build_model(cfg_gem, 5, rngs=nnx.Rngs(0))
    x = images(2, 96, 96)  # a 3 x 3 last feature map: GeM with p != 1 differs from the average
    # pool='avg' (or no field) is today's model: same parameters, same outputs, no p.
    _, p_avg, _ = nnx.split(avg, nnx.Param, nnx.BatchStat)
    _, p_explicit, _ = nnx.split(explicit, nnx.Param, nnx.BatchStat)
    assert trees_equal(jax.tree.map(np.asarray, p_avg), jax.tree.map(np.asarray, p_explicit))
    np.testing.assert_array_equal(avg.embed(x), explicit.embed(x))
    # The GeM model has the same weights plus p; with p = 1 it is the average up to the clamp
    # (post-ReLU features are >= 0, so max(x, 1e-6) moves each by at most 1e-6).
    gem_params = nnx.to_pure_dict(nnx.state(gem, nnx.Param))
    assert gem_params["backbone"].pop("pool") == {"p": pytest.approx(np.array([3.0]))}
    assert trees_equal(jax.tree.map(np.asarray, gem_params), nnx.to_pure_dict(p_avg))
    graphdef, params, stats = nnx.split(gem, nnx.Param, nnx.BatchStat)
    params, stats = nnx.to_pure_dict(params), nnx.to_pure_dict(stats)  # as the train step
    gem.backbone.pool.p[...] = jnp.ones((1,))
    normalized = EmbeddingModel.normalize_images(x)
    np.testing.assert_allclose(
        gem.backbone(normalized, train=False), avg.backbone(normalized, train=False), atol=2e-6
    )

    def loss(params, stats):
        emb, logits = nnx.merge(graphdef, params, stats)(x, train=True)
        return jnp.sum(logits[:, 0]) + jnp.sum(emb[:, 0])

    # At its initial 3, p changes the features and receives a gradient through the loss.
    at_init = nnx.merge(graphdef, params, stats)
    assert not np.allclose(at_init.embed(x), avg.embed(x), atol=1e-3)  # p = 3 is no average
    grad = jax.grad(loss)(params, stats)
    assert float(jnp.abs(grad["backbone"]["pool"]["p"]).max()) > 0


def test_bad_pool_raises():
    with pytest.raises(ValueError, match="pool must be one of"):
        build_backbone("resnet18", width=4, depth=None, rngs=nnx.Rngs(0), pool="max")
