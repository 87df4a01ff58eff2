"""lifecycle: the compatibility matrix against direct recomputation, backfill curves by hand."""

import itertools
import json
import types

import numpy as np
import pytest

from bcl_jax import lifecycle, metrics
from bcl_jax.data import label_test

EVAL_CFG = types.SimpleNamespace(ks=(1, 2), query_block=5)


def _unit(rng, n, d=6):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _labelled(labels):
    return types.SimpleNamespace(labels=np.asarray(labels))


def _numpy_map(q, q_labels, g, g_labels, exclude_self=False):
    """float64 mAP from the formula: mean over relevant items of the precision at their rank."""
    sims = q.astype(np.float64) @ g.astype(np.float64).T
    aps = []
    for i in range(len(q)):
        keep = np.arange(len(g)) != i if exclude_self else np.ones(len(g), bool)
        rel = (g_labels[keep] == q_labels[i])[np.argsort(-sims[i][keep], kind='stable')]
        pos = np.flatnonzero(rel) + 1
        if len(pos):
            aps.append(np.mean(np.arange(1, len(pos) + 1) / pos))
    return float(np.mean(aps))


def _three_models(seed=0):
    """Two tests (query/gallery and a self-searching one) and three models' embeddings."""
    rng = np.random.default_rng(seed)
    q_labels, g_labels, s_labels = (rng.integers(0, 4, n) for n in (9, 15, 12))
    tests = [
        label_test('pair', _labelled(q_labels), _labelled(g_labels)),
        label_test('self', _labelled(s_labels)),
    ]
    centres = _unit(rng, 4)

    def embed(labels, noise):  # a shared class centre plus the model's noise: later is better
        x = centres[labels] + noise * rng.standard_normal((len(labels), centres.shape[1]))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    embeddings = {
        name: [(embed(q_labels, noise), embed(g_labels, noise)), (embed(s_labels, noise), None)]
        for name, noise in (('phi1', 1.2), ('phi2', 0.8), ('phi3', 0.4))
    }
    return tests, embeddings, (q_labels, g_labels, s_labels)


def test_matrix_cells_match_direct_recomputation():
    tests, emb, (q_labels, g_labels, s_labels) = _three_models()
    out = lifecycle.compatibility_matrix(tests, emb, EVAL_CFG)
    json.dumps(out, allow_nan=False)  # strict JSON
    names = ['phi1', 'phi2', 'phi3']
    assert out['models'] == names
    assert out['primary'] == {'test': 'pair', 'metric': 'mAP'}
    assert out['tests']['self']['self_search'] and not out['tests']['pair']['self_search']

    pair, self_ = out['tests']['pair']['metrics'], out['tests']['self']['metrics']
    for m in pair.values():
        assert np.shape(m) == (3, 3)
    for i, a in enumerate(names):  # the diagonal: each model's self-test
        want = metrics.retrieval_metrics(emb[a][0][0], q_labels, emb[a][0][1], g_labels, ks=(1, 2))
        assert {k: pair[k][i][i] for k in want} == want
        want = metrics.retrieval_metrics(
            emb[a][1][0], s_labels, emb[a][1][0], s_labels, ks=(1, 2), exclude_self=True
        )
        assert {k: self_[k][i][i] for k in want} == want
    # Off-diagonal: φ_3's queries against φ_1's gallery (row 2, column 0), and φ_1's queries
    # against φ_2's embeddings of the self-searching set (row 0, column 1).
    want = metrics.retrieval_metrics(
        emb['phi3'][0][0], q_labels, emb['phi1'][0][1], g_labels, ks=(1, 2)
    )
    assert {k: pair[k][2][0] for k in want} == want
    assert pair['mAP'][2][0] == pytest.approx(
        _numpy_map(emb['phi3'][0][0], q_labels, emb['phi1'][0][1], g_labels), abs=1e-6
    )
    assert self_['mAP'][0][1] == pytest.approx(
        _numpy_map(emb['phi1'][1][0], s_labels, emb['phi2'][1][0], s_labels, exclude_self=True),
        abs=1e-6,
    )
    assert pair['mAP'][2][0] != pair['mAP'][0][2]  # rows are queries, columns galleries


def test_summary_definitions():
    tests, emb, _ = _three_models(seed=1)
    out = lifecycle.compatibility_matrix(tests, emb, EVAL_CFG, references={'phi3': 0.9})
    m = out['tests']['pair']['metrics']['mAP']
    s = out['summary']
    assert (s['test'], s['metric']) == ('pair', 'mAP')
    first, second = s['upgrades']
    assert (first['from'], first['to'], second['from'], second['to']) == (
        'phi1',
        'phi2',
        'phi2',
        'phi3',
    )
    assert (first['old_old'], first['new_old'], first['new_new']) == (m[0][0], m[1][0], m[1][1])
    assert first['compatible'] == (m[1][0] > m[0][0])
    # φ_2 has no independent reference: its own self-test is the denominator.
    assert first['update_gain_reference'] == 'self'
    assert m[1][1] > m[0][0]  # the defined case of the gain
    assert first['update_gain'] == pytest.approx((m[1][0] - m[0][0]) / (m[1][1] - m[0][0]))
    assert second['update_gain_reference'] == 'independent'
    assert 0.9 > m[1][1]
    assert second['update_gain'] == pytest.approx((m[2][1] - m[1][1]) / (0.9 - m[1][1]))
    # A reference that does not beat old/old leaves the gain undefined (evaluate's rule).
    low = lifecycle.upgrade_summary(out, test='pair', metric='mAP', references={'phi2': 0.0})
    assert low['upgrades'][0]['update_gain'] is None
    assert s['mean_cross_earlier'] == {
        'phi1': None,
        'phi2': pytest.approx(m[1][0]),
        'phi3': pytest.approx((m[2][0] + m[2][1]) / 2),
    }
    # Any test and metric on demand.
    r1 = lifecycle.upgrade_summary(out, test='self', metric='recall@1')
    r = out['tests']['self']['metrics']['recall@1']
    assert r1['mean_cross_earlier']['phi3'] == pytest.approx((r[2][0] + r[2][1]) / 2)


def test_matrix_bad_input():
    tests, emb, _ = _three_models()
    with pytest.raises(ValueError, match='one pair per test'):
        lifecycle.compatibility_matrix(tests, {'a': emb['phi1'][:1]}, EVAL_CFG)
    swapped = {'a': [emb['phi1'][0], (emb['phi1'][1][0], emb['phi1'][0][1])]}
    with pytest.raises(ValueError, match="'self'.*gallery was given"):
        lifecycle.compatibility_matrix(tests, swapped, EVAL_CFG)
    with pytest.raises(ValueError, match='empty'):
        lifecycle.compatibility_matrix(tests, {}, EVAL_CFG)
    out = lifecycle.compatibility_matrix(tests, emb, EVAL_CFG)
    with pytest.raises(ValueError, match='not in the matrix'):
        lifecycle.upgrade_summary(out, test='pair', metric='mAP', references={'phi9': 0.5})


# ------------------------------------------------------------------------------ backfill


def _hand_case():
    """One query [1, 0] (label 0) and four gallery rows, labels 0, 1, 0, 1.

    Scores against the query: old rows (0, 1, .6, .8), new rows (1, 0, .8, .6).
    """
    test = label_test('hand', _labelled([0]), _labelled([0, 1, 0, 1]), ks=(1,))
    query = np.array([[1.0, 0.0]], np.float32)
    old = np.array([[0, 1], [1, 0], [0.6, 0.8], [0.8, 0.6]], np.float32)
    new = np.array([[1, 0], [0, 1], [0.8, 0.6], [0.6, 0.8]], np.float32)
    return test, query, old, new


def test_backfill_hand_worked():
    test, query, old, new = _hand_case()
    curve = lifecycle.backfill_curve(
        test, query, old, new, EVAL_CFG, fractions=(0, 0.5, 1), order=[0, 1, 2, 3]
    )
    # x = 0, old rows: ranking 1, 3, 2, 0 -> relevance 0 0 1 1 -> AP (1/3 + 2/4) / 2 = 5/12.
    # x = .5, rows 0, 1 new: scores (1, 0, .6, .8) -> ranking 0, 3, 2, 1 -> 1 0 1 0 -> 5/6.
    # x = 1, new rows: ranking 0, 2, 3, 1 -> 1 1 0 0 -> AP 1.
    assert curve['metrics']['mAP'] == pytest.approx([5 / 12, 5 / 6, 1.0])
    assert curve['metrics']['recall@1'] == [0.0, 1.0, 1.0]
    assert curve['num_backfilled'] == [0, 2, 4]
    assert curve['order']['kind'] == 'given'
    # Trapezoid: .5 (5/12 + 5/6) / 2 + .5 (5/6 + 1) / 2 = 37/48. Above the chord: no dip.
    assert curve['area'] == pytest.approx(37 / 48)
    assert (curve['max_dip_below_chord'], curve['max_dip_at']) == (0.0, None)


def test_backfill_follows_the_given_order():
    test, query, old, new = _hand_case()
    curve = lifecycle.backfill_curve(
        test, query, old, new, EVAL_CFG, fractions=(0, 0.5, 1), order=[2, 3, 0, 1]
    )
    # x = .5, rows 2, 3 new: scores (0, 1, .8, .6) -> ranking 1, 2, 3, 0 -> 0 1 0 1 -> AP 1/2.
    assert curve['metrics']['mAP'] == pytest.approx([5 / 12, 1 / 2, 1.0])
    # The chord at .5 is (5/12 + 1) / 2 = 17/24; the curve is 5/24 below it there.
    assert curve['max_dip_below_chord'] == pytest.approx(5 / 24)
    assert curve['max_dip_at'] == 0.5
    assert curve['area'] == pytest.approx(0.25 * (5 / 12 + 1 / 2) + 0.25 * (1 / 2 + 1))
    other = lifecycle.backfill_curve(
        test, query, old, new, EVAL_CFG, fractions=(0, 0.5, 1), order=[0, 1, 2, 3]
    )
    assert other['order']['sha256'] != curve['order']['sha256']


def test_backfill_ends_are_new_old_and_new_new_exactly():
    rng = np.random.default_rng(3)
    q_labels, g_labels = rng.integers(0, 5, 11), rng.integers(0, 5, 23)
    test = label_test('pair', _labelled(q_labels), _labelled(g_labels))
    query, old, new = _unit(rng, 11), _unit(rng, 23), _unit(rng, 23)
    curve = lifecycle.backfill_curve(test, query, old, new, EVAL_CFG, seed=5)
    json.dumps(curve, allow_nan=False)
    assert curve['fractions'] == pytest.approx([i / 10 for i in range(11)])
    assert curve['num_backfilled'] == [0, 2, 5, 7, 9, 12, 14, 16, 18, 21, 23]  # round half up
    new_old = test.score(query, old, EVAL_CFG)
    new_new = test.score(query, new, EVAL_CFG)
    assert {k: v[0] for k, v in curve['metrics'].items()} == new_old
    assert {k: v[-1] for k, v in curve['metrics'].items()} == new_new
    assert curve['order'] == {'kind': 'random', 'seed': 5}
    # The default order is numpy's seeded permutation: giving it explicitly changes nothing.
    given = lifecycle.backfill_curve(
        test, query, old, new, EVAL_CFG, order=np.random.default_rng(5).permutation(23)
    )
    assert given['metrics'] == curve['metrics']
    values = curve['metrics']['mAP']
    assert curve['area'] == pytest.approx(
        sum((a + b) / 2 * 0.1 for a, b in itertools.pairwise(values))
    )


def test_backfill_self_searching_test():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 3, 14)
    test = label_test('self', _labelled(labels))
    old, new = _unit(rng, 14), _unit(rng, 14)
    curve = lifecycle.backfill_curve(test, new, old, None, EVAL_CFG, fractions=(0, 0.5, 1))
    assert curve['metrics']['mAP'][0] == pytest.approx(
        _numpy_map(new, labels, old, labels, exclude_self=True), abs=1e-6
    )
    assert curve['metrics']['mAP'][-1] == pytest.approx(
        _numpy_map(new, labels, new, labels, exclude_self=True), abs=1e-6
    )
    mixed = old.copy()
    first = np.random.default_rng(0).permutation(14)[:7]
    mixed[first] = new[first]
    assert curve['metrics']['mAP'][1] == pytest.approx(
        _numpy_map(new, labels, mixed, labels, exclude_self=True), abs=1e-6
    )


def test_backfill_bad_input():
    test, query, old, new = _hand_case()
    run = lambda **kw: lifecycle.backfill_curve(
        test,
        kw.pop('query', query),
        kw.pop('old', old),
        kw.pop('new', new),
        EVAL_CFG,
        **kw,
    )
    with pytest.raises(ValueError, match='start at 0 and end at 1'):
        run(fractions=(0.1, 1))
    with pytest.raises(ValueError, match='strictly increasing'):
        run(fractions=(0, 0.5, 0.5, 1))
    with pytest.raises(ValueError, match='permutation of the 4 gallery rows'):
        run(order=[0, 1, 1, 3])
    with pytest.raises(ValueError, match='one shape'):
        run(new=new[:3])
    with pytest.raises(ValueError, match='share the embedding space'):
        run(query=np.ones((1, 3), np.float32))
    with pytest.raises(ValueError, match='new_gallery is required'):
        run(new=None)
