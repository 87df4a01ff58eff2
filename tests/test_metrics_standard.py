"""Ranking-based benchmark metrics: revisitop compute_ap/compute_map and GLDv2 map_at_k.

The references below are deliberately naive pure-Python loops (one image at a time, Python
floats), independent of the library's NumPy implementation, written from the definitions.
"""

import math
import random

import numpy as np
import pytest

from bcl_jax import metrics

# ---------------------------------------------------------------------------------------------
# Independent references
# ---------------------------------------------------------------------------------------------


def _ref_revisitop_query(column, ok, junk, kappas):
    """(AP, [P@k]) of one query by walking its ranking once, skipping junk images.

    Every image of `column` (ranked order) is visited; a positive is recorded at its position
    among the non-junk images seen so far; a junk image only shifts the images after it.
    """
    ok_set, junk_set = {int(x) for x in ok}, {int(x) for x in junk}
    adjusted = []  # 0-based positions of retrieved positives in the junk-free ranking
    junk_seen = 0
    for position, image in enumerate(column):
        image = int(image)
        if image in ok_set:
            adjusted.append(position - junk_seen)
        if image in junk_set:
            junk_seen += 1
    nres = len(ok)
    ap = 0.0
    for i, r in enumerate(adjusted):
        precision_before = 1.0 if r == 0 else i / r
        precision_at = (i + 1) / (r + 1)
        ap += (precision_before + precision_at) * (1.0 / nres) / 2.0
    precisions = []
    for kappa in kappas:
        if not adjusted:
            precisions.append(0.0)
            continue
        kq = min(max(adjusted) + 1, kappa)
        count = 0
        for r in adjusted:
            if r <= kq - 1:
                count += 1
        precisions.append(count / kq)
    return ap, precisions


def _ref_compute_map(ranks, gnd, kappas):
    num_db, num_q = len(ranks), len(gnd)
    aps, prs, kept = [], [], 0
    sum_ap, sum_pr = 0.0, [0.0] * len(kappas)
    for q in range(num_q):
        ok = list(gnd[q]["ok"])
        if not ok:
            aps.append(math.nan)
            prs.append([math.nan] * len(kappas))
            continue
        junk = list(gnd[q]["junk"]) if "junk" in gnd[q] else []
        column = [ranks[row][q] for row in range(num_db)]
        ap, pr = _ref_revisitop_query(column, ok, junk, kappas)
        aps.append(ap)
        prs.append(pr)
        kept += 1
        sum_ap += ap
        for j in range(len(kappas)):
            sum_pr[j] += pr[j]
    if kept == 0:
        return math.nan, aps, [math.nan] * len(kappas), prs
    return sum_ap / kept, aps, [s / kept for s in sum_pr], prs


def _ref_map_at_k(ranks, positives, k):
    aps, total, kept = [], 0.0, 0
    for row, rel in zip(ranks, positives):
        rel = {int(x) for x in rel}
        if not rel:
            aps.append(math.nan)
            continue
        seen, hits, ap = set(), 0, 0.0
        for i, image in enumerate(list(row)[:k]):
            image = int(image)
            if image in rel and image not in seen:
                hits += 1
                ap += hits / (i + 1)
            seen.add(image)
        ap /= min(len(rel), k)
        aps.append(ap)
        total += ap
        kept += 1
    return (total / kept if kept else math.nan), aps


def _random_revisitop_case(rng, num_db, num_q, depth):
    """ranks (depth, num_q), each column a random order of `depth` distinct images of num_db."""
    ranks = np.stack([rng.permutation(num_db)[:depth] for _ in range(num_q)], axis=1)
    gnd = []
    for q in range(num_q):
        images = rng.permutation(num_db)
        n_ok = int(rng.integers(0, 9)) if q % 4 else 0  # every 4th query has no positives
        n_junk = int(rng.integers(0, 7))
        entry = {"ok": images[:n_ok].tolist()}
        if q % 5 != 1:  # some entries have no 'junk' key at all
            entry["junk"] = images[n_ok : n_ok + n_junk].tolist()
        gnd.append(entry)
    return ranks, gnd


# ---------------------------------------------------------------------------------------------
# compute_ap / compute_map
# ---------------------------------------------------------------------------------------------


def test_compute_ap_hand_case():
    # Positives at adjusted positions 0 and 2, two positives:
    #   i=0, r=0: P0 = 1 (r == 0), P1 = 1/1 = 1   -> (1 + 1)/2 = 1
    #   i=1, r=2: P0 = 1/2,        P1 = 2/3       -> (1/2 + 2/3)/2 = 7/12
    #   AP = (1 + 7/12) / 2 = 19/24
    assert metrics.compute_ap(np.array([0, 2]), 2) == pytest.approx(19 / 24, abs=1e-15)
    # Same positions, but 4 positives in all (two never retrieved): AP halves.
    assert metrics.compute_ap(np.array([0, 2]), 4) == pytest.approx(19 / 48, abs=1e-15)
    assert metrics.compute_ap(np.array([], dtype=int), 3) == 0.0
    # Perfect ranking of 3 positives: every term is (1 + 1)/2 -> AP = 1.
    assert metrics.compute_ap(np.arange(3), 3) == pytest.approx(1.0, abs=1e-15)


def test_compute_map_hand_case_junk_removed():
    # Ranking [p, j, n, p]: images 0 (positive), 1 (junk), 2 (negative), 3 (positive).
    # Junk removed: [p, n, p] -> adjusted positions 0 and 2 -> AP = 19/24 (see above).
    # mP@k (revisitop): kq = min(max(pos) + 1, k) = min(3, k):
    #   k=1: kq=1, positives in first 1 = 1 -> 1;   k=2: kq=2 -> 1/2;
    #   k=3: kq=3 -> 2/3;                           k=5: kq=3 (capped) -> 2/3.
    ranks = np.array([[0], [1], [2], [3]])
    gnd = [{"ok": [0, 3], "junk": [1]}]
    m, aps, pr, prs = metrics.compute_map(ranks, gnd, kappas=(1, 2, 3, 5))
    assert m == pytest.approx(19 / 24, abs=1e-15)
    np.testing.assert_allclose(aps, [19 / 24], atol=1e-15)
    np.testing.assert_allclose(prs, [[1, 1 / 2, 2 / 3, 2 / 3]], atol=1e-15)
    np.testing.assert_allclose(pr, [1, 1 / 2, 2 / 3, 2 / 3], atol=1e-15)

    # Without junk removal the second positive would sit at position 3:
    # AP = (1 + (1/3 + 2/4)/2)/2 = (1 + 5/12)/2 = 17/24.
    m_no_junk, *_ = metrics.compute_map(ranks, [{"ok": [0, 3]}])
    assert m_no_junk == pytest.approx(17 / 24, abs=1e-15)


def test_compute_map_junk_after_positives_changes_nothing():
    # [p, n, p, j]: the junk is ranked after both positives -> positions 0 and 2, AP = 19/24.
    ranks = np.array([[0], [2], [3], [1]])
    m, *_ = metrics.compute_map(ranks, [{"ok": [0, 3], "junk": [1]}], kappas=())
    assert m == pytest.approx(19 / 24, abs=1e-15)
    # Two junk images before the first positive: [j, j, p, n, p] -> positions 0, 2 again.
    ranks = np.array([[5], [6], [0], [2], [3]])
    m, _, _, prs = metrics.compute_map(ranks, [{"ok": [0, 3], "junk": [5, 6]}], kappas=(1,))
    assert m == pytest.approx(19 / 24, abs=1e-15)
    np.testing.assert_allclose(prs, [[1.0]])


def test_compute_map_truncated_and_empty_queries():
    # Database of 8 images, rankings truncated to 3 rows; 3 queries:
    #  q0: ok {0, 6, 7}, ranking [0, 1, 2]: only image 0 retrieved (position 0):
    #      AP = (1 + 1)/2 * (1/3) = 1/3; P@1 = 1, P@5: kq = min(1, 5) = 1 -> 1.
    #  q1: ok {} -> NaN, excluded.
    #  q2: ok {5}, ranking [1, 2, 3]: nothing retrieved -> AP 0, P@k 0.
    ranks = np.array([[0, 0, 1], [1, 1, 2], [2, 2, 3]])
    gnd = [{"ok": [0, 6, 7], "junk": []}, {"ok": [], "junk": [1]}, {"ok": [5]}]
    m, aps, pr, prs = metrics.compute_map(ranks, gnd, kappas=(1, 5))
    np.testing.assert_allclose(aps[[0, 2]], [1 / 3, 0.0], atol=1e-15)
    assert np.isnan(aps[1]) and np.isnan(prs[1]).all()
    np.testing.assert_allclose(prs[[0, 2]], [[1, 1], [0, 0]])
    assert m == pytest.approx((1 / 3 + 0) / 2, abs=1e-15)
    np.testing.assert_allclose(pr, [0.5, 0.5])
    assert aps.shape == (3,) and prs.shape == (3, 2) and pr.shape == (2,)

    m, aps, pr, prs = metrics.compute_map(ranks[:, :1], [{"ok": []}], kappas=(1, 5))
    assert math.isnan(m) and np.isnan(aps).all() and np.isnan(pr).all()


@pytest.mark.parametrize("seed,num_db,depth", [(0, 40, 40), (1, 60, 25), (2, 30, 30), (3, 50, 8)])
def test_compute_map_matches_loop_reference(seed, num_db, depth):
    rng = np.random.default_rng(seed)
    ranks, gnd = _random_revisitop_case(rng, num_db, num_q=24, depth=depth)
    kappas = (1, 5, 10)
    m, aps, pr, prs = metrics.compute_map(ranks, gnd, kappas=kappas)
    rm, raps, rpr, rprs = _ref_compute_map(ranks.tolist(), gnd, kappas)
    assert aps.dtype == np.float64 and prs.dtype == np.float64
    np.testing.assert_allclose(aps, raps, rtol=0, atol=1e-12)  # NaNs must match too
    np.testing.assert_allclose(prs, rprs, rtol=0, atol=1e-12)
    np.testing.assert_allclose(pr, rpr, rtol=0, atol=1e-12)
    assert m == pytest.approx(rm, abs=1e-12)
    # The case exercises what it should: empty queries, junk, unretrieved positives.
    assert np.isnan(aps).any()
    assert any(g.get("junk") for g in gnd)
    if depth < num_db:
        assert any(not set(g["ok"]) <= set(ranks[:, q].tolist()) for q, g in enumerate(gnd))


def test_compute_map_from_scores_layout():
    # Typical use: scores (db, queries) -> ranks = argsort(-scores, axis=0), column per query.
    rng = np.random.default_rng(7)
    scores = rng.standard_normal((30, 5))
    ranks = np.argsort(-scores, axis=0)
    gnd = [{"ok": [int(np.argmax(scores[:, q]))], "junk": []} for q in range(5)]
    m, aps, pr, _ = metrics.compute_map(ranks, gnd)
    assert m == 1.0 and (aps == 1.0).all() and (pr == 1.0).all()


def test_compute_map_rejects_bad_layout():
    with pytest.raises(ValueError, match="columns"):
        metrics.compute_map(np.zeros((2, 10), dtype=int), [{"ok": [0]}] * 2)
    with pytest.raises(ValueError, match="2-D"):
        metrics.compute_map(np.zeros(10, dtype=int), [{"ok": [0]}])
    with pytest.raises(ValueError, match="kappa"):
        metrics.compute_map(np.zeros((3, 1), dtype=int), [{"ok": [0]}], kappas=(0,))


# ---------------------------------------------------------------------------------------------
# map_at_k (GLDv2)
# ---------------------------------------------------------------------------------------------


def test_map_at_k_hand_cases():
    a, b, x = 10, 11, 12
    # Relevant {a, b}, ranking [a, x, b]: P(1) = 1, P(3) = 2/3 -> AP@100 = (1 + 2/3)/2 = 5/6.
    m, aps = metrics.map_at_k(np.array([[a, x, b]]), [{a, b}], k=100)
    assert m == pytest.approx(5 / 6, abs=1e-15)
    np.testing.assert_allclose(aps, [5 / 6], atol=1e-15)

    # 5 relevant, k = 3, ranking [r1, r2, x, r3]: only the top 3 count, hits at 1 and 2:
    # AP@3 = (1/1 + 2/2) / min(5, 3) = 2/3 (not / 5).
    ranks = np.array([[1, 2, 99, 3]])
    m, _ = metrics.map_at_k(ranks, [[1, 2, 3, 4, 5]], k=3)
    assert m == pytest.approx(2 / 3, abs=1e-15)
    # Perfect top 3 with 5 relevant: AP@3 = 3/3 = 1.
    m, _ = metrics.map_at_k(np.array([[1, 2, 3, 99]]), [np.array([1, 2, 3, 4, 5])], k=3)
    assert m == pytest.approx(1.0, abs=1e-15)

    # A query with no relevant ids is excluded; a repeated id counts once (at its first slot):
    # q0: [a, a, b] with {a, b} -> (1/1 + 2/3)/2 = 5/6; q1: excluded; q2: [x, a, b] with {b}
    # -> (1/3)/1 = 1/3. Mean over q0, q2 = (5/6 + 1/3)/2 = 7/12.
    ranks = np.array([[a, a, b], [a, b, x], [x, a, b]])
    m, aps = metrics.map_at_k(ranks, [{a, b}, set(), {b}], k=100)
    assert np.isnan(aps[1])
    np.testing.assert_allclose(aps[[0, 2]], [5 / 6, 1 / 3], atol=1e-15)
    assert m == pytest.approx(7 / 12, abs=1e-15)

    m, aps = metrics.map_at_k(np.array([[1, 2]]), [[]], k=5)
    assert math.isnan(m) and np.isnan(aps).all()


@pytest.mark.parametrize("seed,k,width", [(0, 10, 30), (1, 100, 120), (2, 100, 60)])
def test_map_at_k_matches_loop_reference(seed, k, width):
    rng = np.random.default_rng(seed)
    py_rng = random.Random(seed)
    num_q, num_index = 20, 300
    ranks = np.stack([rng.permutation(num_index)[:width] for _ in range(num_q)])
    positives = []
    for q in range(num_q):
        n_rel = 0 if q % 6 == 0 else py_rng.randint(1, 40)
        # Half of each query's relevant ids are planted in its ranking so APs are not tiny.
        planted = ranks[q, rng.permutation(width)[: n_rel // 2]].tolist()
        positives.append(set(planted) | set(py_rng.sample(range(num_index), n_rel - n_rel // 2)))
    m, aps = metrics.map_at_k(ranks, positives, k=k)
    rm, raps = _ref_map_at_k(ranks.tolist(), positives, k)
    np.testing.assert_allclose(aps, raps, rtol=0, atol=1e-12)
    assert m == pytest.approx(rm, abs=1e-12)
    assert np.nanmax(aps) > 0.1 and np.isnan(aps).any()
    if k == 10:  # some query has more relevant ids than k: the min(#relevant, k) denominator
        assert any(len(p) > k for p in positives)


def test_map_at_k_rejects_bad_layout():
    with pytest.raises(ValueError, match="rows"):
        metrics.map_at_k(np.zeros((3, 100), dtype=int), [{1}, {2}])
    with pytest.raises(ValueError, match="k must"):
        metrics.map_at_k(np.zeros((1, 5), dtype=int), [{1}], k=0)
