"""metrics: hand-worked cases and an independent NumPy float64 reimplementation."""

import numpy as np
import pytest

from bcl_jax import metrics


def _normalised(rng, n, d=8):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _reference(query_emb, query_labels, gallery_emb, gallery_labels, ks, exclude_self=False):
    """Loop-per-query float64 version: remove self, rank, AP from the positions of positives."""
    sims = query_emb.astype(np.float64) @ gallery_emb.astype(np.float64).T
    aps, recalls = [], {k: [] for k in ks}
    for i in range(len(query_emb)):
        keep = np.arange(len(gallery_emb)) != i if exclude_self else np.ones(len(sims[i]), bool)
        order = np.argsort(-sims[i][keep], kind="stable")
        rel = (gallery_labels[keep] == query_labels[i])[order]
        positions = np.flatnonzero(rel) + 1  # 1-based ranks of relevant items
        if len(positions) == 0:
            continue
        aps.append(np.mean(np.arange(1, len(positions) + 1) / positions))
        for k in ks:
            recalls[k].append(float(positions[0] <= k))
    out = {
        "mAP": np.mean(aps),
        "num_queries": len(aps),
        "num_queries_without_positives": len(query_emb) - len(aps),
    }
    out.update({f"recall@{k}": np.mean(v) for k, v in recalls.items()})
    return out


def _assert_close(got, want):
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-6), key


def test_average_precision_hand_worked():
    ap = metrics.average_precision(np.array([[1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]]))
    np.testing.assert_allclose(np.asarray(ap), [(1 / 1 + 2 / 3) / 2, 1 / 2, 0.0], rtol=1e-6)


def test_recall_at_k_hand_worked():
    hits = metrics.recall_at_k(np.array([[0, 0, 1, 0], [1, 0, 0, 0]]), (1, 2, 3))
    np.testing.assert_array_equal(np.asarray(hits), [[0, 0, 1], [1, 1, 1]])


def test_one_query_hand_worked():
    # Gallery on a circle: scores against query [1, 0] decrease with the index, so the
    # ranking is 0, 1, 2, 3 and relevance [1, 0, 1, 0] (labels 7, 3, 7, 3).
    angles = np.array([0.1, 0.5, 0.9, 1.3])
    gallery = np.stack([np.cos(angles), np.sin(angles)], 1).astype(np.float32)
    query = np.array([[1.0, 0.0]], np.float32)
    got = metrics.retrieval_metrics(query, [7], gallery, [7, 3, 7, 3], ks=(1, 2, 4))
    assert got == pytest.approx(
        {
            "mAP": (1 / 1 + 2 / 3) / 2,
            "recall@1": 1.0,
            "recall@2": 1.0,
            "recall@4": 1.0,
            "num_queries": 1,
            "num_queries_without_positives": 0,
        }
    )
    # Label 3: relevant at ranks 2 and 4, AP = (1/2 + 2/4) / 2, nothing at rank 1.
    got = metrics.retrieval_metrics(query, [3], gallery, [7, 3, 7, 3], ks=(1, 2))
    assert got["mAP"] == pytest.approx(0.5) and got["recall@1"] == 0 and got["recall@2"] == 1


def test_ties_rank_lower_gallery_index_first():
    gallery = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
    got = metrics.retrieval_metrics(gallery[:1], [1], gallery, [0, 1, 1], ks=(1,))
    # Ranking 0 (irrelevant), 1 (relevant, tied with 0), 2 (relevant): AP = (1/2 + 2/3) / 2.
    assert got["mAP"] == pytest.approx((1 / 2 + 2 / 3) / 2) and got["recall@1"] == 0


def test_queries_without_positives_are_excluded():
    rng = np.random.default_rng(1)
    gallery, queries = _normalised(rng, 20), _normalised(rng, 5)
    gallery_labels = np.repeat([0, 1], 10)
    query_labels = np.array([0, 1, 5, 0, 9])  # 5 and 9 are not in the gallery
    got = metrics.retrieval_metrics(queries, query_labels, gallery, gallery_labels, ks=(1, 3))
    assert got["num_queries"] == 3 and got["num_queries_without_positives"] == 2
    kept = metrics.retrieval_metrics(
        queries[[0, 1, 3]], query_labels[[0, 1, 3]], gallery, gallery_labels, ks=(1, 3)
    )
    _assert_close(got, {**kept, "num_queries_without_positives": 2})


@pytest.mark.parametrize("query_block", [7, 256])
def test_matches_numpy_reference(query_block):
    rng = np.random.default_rng(2)
    queries, gallery = _normalised(rng, 45), _normalised(rng, 130)
    query_labels, gallery_labels = rng.integers(0, 6, 45), rng.integers(0, 5, 130)  # 5: none
    ks = (1, 5, 10)
    got = metrics.retrieval_metrics(
        queries, query_labels, gallery, gallery_labels, ks=ks, query_block=query_block
    )
    want = _reference(queries, query_labels, gallery, gallery_labels, ks)
    assert want["num_queries_without_positives"] > 0
    _assert_close(got, want)


def test_exclude_self_matches_reference():
    rng = np.random.default_rng(3)
    emb = _normalised(rng, 60)
    labels = rng.integers(0, 8, 60).astype(str)  # non-integer labels work too
    labels[0] = "singleton"  # its only positive is itself: excluded
    ks = (1, 2, 4, 8)
    got = metrics.retrieval_metrics(
        emb, labels, emb, labels, ks=ks, query_block=16, exclude_self=True
    )
    _assert_close(got, _reference(emb, labels, emb, labels, ks, exclude_self=True))
    assert got["num_queries_without_positives"] >= 1
    # Without exclusion every query finds itself first.
    assert metrics.retrieval_metrics(emb, labels, emb, labels, ks=(1,))["recall@1"] == 1.0


@pytest.mark.parametrize(
    "case, match",
    [
        ("nan_query", "query_emb contains NaN"),
        ("nan_gallery", "gallery_emb contains NaN"),
        ("dims", "dims differ"),
        ("label_count", "Label counts"),
        ("empty", "query_emb is empty"),
        ("k_too_big", "Each K"),
        ("self_mismatch", "exclude_self"),
        ("no_positives", "No query has a relevant"),
    ],
)
def test_errors(case, match):
    rng = np.random.default_rng(4)
    q, g = _normalised(rng, 4), _normalised(rng, 6)
    ql, gl = np.array([0, 1, 0, 1]), np.array([0, 1, 0, 1, 0, 1])
    kwargs = dict(ks=(1,))
    if case == "nan_query":
        q[1, 2] = np.nan
    elif case == "nan_gallery":
        g[3, 0] = np.nan
    elif case == "dims":
        q = q[:, :4]
    elif case == "label_count":
        gl = gl[:5]
    elif case == "empty":
        q, ql = q[:0], ql[:0]
    elif case == "k_too_big":
        kwargs = dict(ks=(1, 7))
    elif case == "self_mismatch":
        kwargs["exclude_self"] = True
    elif case == "no_positives":
        ql = ql + 10
    with pytest.raises(ValueError, match=match):
        metrics.retrieval_metrics(q, ql, g, gl, **kwargs)


def test_sharded_and_bfloat16_inputs():
    """Embeddings as the evaluation produces them: rows sharded on a make_mesh mesh, bf16."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(5)
    queries, gallery = _normalised(rng, 24), _normalised(rng, 40)
    query_labels, gallery_labels = rng.integers(0, 4, 24), rng.integers(0, 4, 40)
    mesh = jax.make_mesh((8,), ("data",))
    on_mesh = lambda x: jax.device_put(x, jax.NamedSharding(mesh, jax.P("data")))  # noqa: E731
    got = metrics.retrieval_metrics(
        on_mesh(queries), query_labels, on_mesh(gallery), gallery_labels, query_block=10
    )
    _assert_close(got, _reference(queries, query_labels, gallery, gallery_labels, (1, 5, 10)))
    as_bf16 = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))  # noqa: E731
    got = metrics.retrieval_metrics(
        jnp.asarray(queries, jnp.bfloat16),
        query_labels,
        jnp.asarray(gallery, jnp.bfloat16),
        gallery_labels,
    )
    want = _reference(as_bf16(queries), query_labels, as_bf16(gallery), gallery_labels, (1, 5, 10))
    _assert_close(got, want)
