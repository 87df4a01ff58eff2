"""knn.topk / knn.sharded_topk against a NumPy float64 brute force."""

import jax
import numpy as np
import pytest
from jax.sharding import AxisType

from bcl_jax import knn


def _normalised(rng, n, d=16):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute_force(queries, gallery, k, exclude_self=False):
    """Full float64 similarity, stable descending argsort (lower index wins ties)."""
    sims = queries.astype(np.float64) @ gallery.astype(np.float64).T
    if exclude_self:
        np.fill_diagonal(sims, -np.inf)
    idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, idx, axis=1), idx


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    # Sizes that are not multiples of the blocks used below.
    return _normalised(rng, 37), _normalised(rng, 203)


def _check(got, want):
    scores, idx = got
    assert scores.dtype == np.float32 and idx.dtype == np.int32
    np.testing.assert_array_equal(np.asarray(idx), want[1])
    np.testing.assert_allclose(np.asarray(scores), want[0], atol=1e-5)


@pytest.mark.parametrize("k", [1, 7, 203])
def test_topk_matches_brute_force(data, k):
    queries, gallery = data
    got = knn.topk(queries, gallery, k, query_block=8, gallery_block=32)
    _check(got, _brute_force(queries, gallery, k))


def test_topk_default_blocks_clamped(data):
    queries, gallery = data
    _check(knn.topk(queries, gallery, 5), _brute_force(queries, gallery, 5))


@pytest.mark.parametrize("k", [1, 10, 202])
def test_topk_exclude_self(data, k):
    bank = data[1]
    scores, idx = knn.topk(bank, bank, k, query_block=16, gallery_block=24, exclude_self=True)
    _check((scores, idx), _brute_force(bank, bank, k, exclude_self=True))
    assert not np.any(np.asarray(idx) == np.arange(len(bank))[:, None])


def test_topk_ties_prefer_lower_index():
    gallery = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]], np.float32)
    _, idx = knn.topk(gallery[:1], gallery, 3, gallery_block=2)
    np.testing.assert_array_equal(np.asarray(idx), [[0, 2, 3]])


@pytest.mark.parametrize("n_devices", [8, 2])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_sharded_equals_unsharded(data, n_devices, exclude_self):
    queries, gallery = data
    if exclude_self:
        queries = gallery  # prototype neighbours: the bank against itself
    mesh = jax.make_mesh((n_devices,), ("data",), devices=jax.devices()[:n_devices])
    k = 9
    want = knn.topk(
        queries, gallery, k, query_block=16, gallery_block=32, exclude_self=exclude_self
    )
    got = knn.sharded_topk(
        queries,
        gallery,
        k,
        mesh=mesh,
        axis="data",
        query_block=16,
        gallery_block=10,
        exclude_self=exclude_self,
    )
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), atol=1e-6)


@pytest.mark.parametrize("data_axis_type", [AxisType.Auto, AxisType.Explicit])
def test_sharded_k_larger_than_shard_2d_mesh(data, data_axis_type):
    """k = N - 1 exceeds every shard's size; a 2-D mesh with an Auto axis, sharding one axis."""
    bank = data[1][:50]
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(data_axis_type, AxisType.Auto))
    got = knn.sharded_topk(bank, bank, 49, mesh=mesh, axis="data", exclude_self=True)
    _check(got, _brute_force(bank, bank, 49, exclude_self=True))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"k": 0}, "positive int"),
        ({"k": 204}, "exceeds the 203 eligible"),
        ({"k": 203, "exclude_self": True, "same": True}, "exceeds the 202 eligible"),
        ({"k": 3, "exclude_self": True}, "Q == N"),
        ({"k": 3, "dim": 8}, "dims differ"),
        ({"k": 2.0}, "positive int"),
    ],
)
def test_errors(data, kwargs, match):
    queries, gallery = data
    if kwargs.pop("same", False):
        queries = gallery
    if "dim" in kwargs:
        queries = queries[:, : kwargs.pop("dim")]
    with pytest.raises(ValueError, match=match):
        knn.topk(queries, gallery, **kwargs)
    mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
    with pytest.raises(ValueError, match=match):
        knn.sharded_topk(queries, gallery, mesh=mesh, axis="data", **kwargs)


def test_error_unknown_axis(data):
    mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
    with pytest.raises(ValueError, match="not in mesh"):
        knn.sharded_topk(*data, 3, mesh=mesh, axis="model")


def test_explicitly_sharded_inputs(data):
    """Arrays laid out on a make_mesh (Explicit) mesh, as the training code makes them."""
    queries, gallery = data[0][:32], data[1][:200]
    mesh = jax.make_mesh((8,), ("data",))
    on_mesh = lambda x: jax.device_put(x, jax.NamedSharding(mesh, jax.P("data")))
    want = _brute_force(queries, gallery, 4)
    _check(knn.topk(on_mesh(queries), on_mesh(gallery), 4, query_block=5, gallery_block=30), want)
    _check(
        knn.sharded_topk(
            on_mesh(queries), on_mesh(gallery), 4, mesh=mesh, axis="data", query_block=5
        ),
        want,
    )


# Blocks of >= 2 k groups of 16 columns take the group pre-filter (knn._block_candidates).
@pytest.mark.parametrize("k, gallery_block", [(1, 32), (5, 512), (10, 320)])
def test_topk_group_prefilter_matches_brute_force(k, gallery_block):
    rng = np.random.default_rng(1)
    queries, gallery = _normalised(rng, 37), _normalised(rng, 2000)  # 2000 % block != 0
    got = knn.topk(queries, gallery, k, query_block=16, gallery_block=gallery_block)
    _check(got, _brute_force(queries, gallery, k))


def test_topk_group_prefilter_exclude_self():
    bank = _normalised(np.random.default_rng(2), 700)
    got = knn.topk(bank, bank, 5, query_block=64, gallery_block=256, exclude_self=True)
    _check(got, _brute_force(bank, bank, 5, exclude_self=True))


@pytest.fixture(scope="module")
def tied():
    """Small-integer vectors: every dot product is exact and most are tied."""
    rng = np.random.default_rng(3)
    queries, gallery = (rng.integers(0, 3, size=(n, 4)).astype(np.float32) for n in (20, 1500))
    return queries, gallery


@pytest.mark.parametrize("gallery_block", [320, 512, 1500])
def test_topk_group_prefilter_ties_prefer_lower_index(tied, gallery_block):
    queries, gallery = tied
    got = knn.topk(queries, gallery, 10, query_block=8, gallery_block=gallery_block)
    _check(got, _brute_force(queries, gallery, 10))


def test_topk_group_prefilter_tie_across_groups():
    """The tie for 2nd place is between column 3 (group 0) and column 21 (group 1, whose max
    is larger); column 3 must win, so candidates are kept in column order, not by group max."""
    values = np.zeros(96, np.float32)
    values[[3, 20, 21, 70]] = [0.5, 0.9, 0.5, 0.5]
    gallery = np.stack([values, np.zeros_like(values)], axis=1)
    scores, idx = knn.topk(np.array([[1.0, 0.0]], np.float32), gallery, 3, gallery_block=96)
    np.testing.assert_array_equal(np.asarray(idx), [[20, 3, 21]])
    np.testing.assert_array_equal(np.asarray(scores), np.float32([[0.9, 0.5, 0.5]]))


def test_sharded_group_prefilter_ties(tied):
    queries, gallery = tied
    mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
    got = knn.sharded_topk(queries, gallery, 10, mesh=mesh, axis="data", gallery_block=320)
    _check(got, _brute_force(queries, gallery, 10))


def test_topk_memory_is_blocked():
    """XLA's temporaries hold a few blocks: neither the Q × N scores nor a gallery copy."""
    q, n, d = 100, 20000, 64
    args = (jax.ShapeDtypeStruct((q, d), np.float32), jax.ShapeDtypeStruct((n, d), np.float32))
    search = jax.jit(lambda a, b: knn.topk(a, b, 10, query_block=64, gallery_block=1024))
    stats = search.lower(*args).compile().memory_analysis()
    if stats is None:
        pytest.skip("no memory analysis on this backend")
    blocks = 4 * 50 * 1024 + 4 * 1024 * d  # a score block (2 x 50 queries) and a gallery block
    assert stats.temp_size_in_bytes <= 3 * blocks < 4 * min(q * n, n * d)


def test_topk_with_mesh_is_sharded_topk(data):
    """The one entry: `topk(mesh=...)` runs the sharded search, bit-identical to `sharded_topk`,
    and defaults to all mesh axes."""
    queries, gallery = data
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    blocks = {"query_block": 16, "gallery_block": 10}
    want = knn.sharded_topk(queries, gallery, 6, mesh=mesh, axis=("data", "model"), **blocks)
    got = knn.topk(queries, gallery, 6, mesh=mesh, **blocks)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert got[0].sharding.is_fully_replicated
    _check(got, _brute_force(queries, gallery, 6))
    with pytest.raises(ValueError, match="without a mesh"):
        knn.topk(queries, gallery, 6, axis="data")


@pytest.mark.parametrize(
    "n, max_block, multiple, want",
    [(1129, 1024, 1, 565), (81313, 32768, 8, 27112), (81313, 131072, 8, 81320), (7, 100, 1, 7)],
)
def test_even_block(n, max_block, multiple, want):
    """Hand-worked: 1,129 = 2 blocks of 565 (564.5 up); 81,313 = 3 blocks of 27,104.33 -> 27,105
    -> 27,112 (a multiple of 8); one block of 81,313 -> 81,320."""
    assert knn._even_block(n, max_block, multiple) == want
