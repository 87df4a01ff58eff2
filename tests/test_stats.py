"""bcl_jax.stats against hand-worked cases, t-table quantiles and a direct quadratic solve."""

import json
import math

import numpy as np
import pytest

from bcl_jax import stats

# Student's t, two-sided 95% (t_{0.975, df}), from a t table.
T_TABLE = {1: 12.706205, 2: 4.302653, 3: 3.182446, 4: 2.776445}


def test_t_quantiles_match_the_table():
    for df, want in T_TABLE.items():
        assert stats.t_quantile(df) == pytest.approx(want, rel=1e-6)


def test_paired_difference_three_seeds_by_hand():
    """d = (.02, .01, .05): mean 2/75; Σ(d − mean)² = .003 − 3 (2/75)² = 13/15000, so
    sd = √(13/30000) and sd/√3 = √13/300; half-width t_{.975,2} · √13/300."""
    got = stats.paired_difference([0.60, 0.62, 0.65], [0.58, 0.61, 0.60])
    half = 4.302653 * math.sqrt(13) / 300
    assert got['n'] == 3
    assert got['mean'] == pytest.approx(2 / 75, rel=1e-9)
    assert got['sd'] == pytest.approx(math.sqrt(13 / 30000), rel=1e-9)
    assert got['ci_low'] == pytest.approx(2 / 75 - half, rel=1e-6)
    assert got['ci_high'] == pytest.approx(2 / 75 + half, rel=1e-6)
    assert got['differences'] == pytest.approx([0.02, 0.01, 0.05])


def test_paired_difference_five_seeds_by_hand():
    """d = 1..5: mean 3, sd = √2.5, sd/√5 = √0.5; 95% CI 3 ± 2.776445 · √0.5 = 3 ± 1.963243."""
    got = stats.paired_difference([10, 12, 14, 16, 18], [9, 10, 11, 12, 13])
    assert (got['n'], got['mean']) == (5, 3.0)
    assert got['sd'] == pytest.approx(math.sqrt(2.5), rel=1e-12)
    assert got['ci_low'] == pytest.approx(3 - 1.963243, abs=2e-6)
    assert got['ci_high'] == pytest.approx(3 + 1.963243, abs=2e-6)


def test_one_seed_gives_no_interval():
    got = stats.paired_difference([0.5], [0.4])
    assert got['n'] == 1 and got['mean'] == pytest.approx(0.1)
    assert got['sd'] is None and got['ci_low'] is None and got['ci_high'] is None
    ratio = stats.fieller_ratio([0.2], [0.4])
    assert ratio['estimate'] == pytest.approx(0.5) and ratio['ci_low'] is None
    assert not ratio['bounded'] and 'one seed' in ratio['note']
    json.dumps([got, ratio], allow_nan=False)


def _fieller_by_quadratic(x, y, t):
    """The ρ where the paired t statistic of z_s = x_s − ρ y_s equals t, solved directly:
    n z̄² = t² s_z², with z̄ = x̄ − ρȳ and s_z² = Σ(z − z̄)²/(n − 1), as a quadratic in ρ."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    n, dx, dy = len(x), x - x.mean(), y - y.mean()
    sxx, syy, sxy = (np.sum(u * v) / (n - 1) for u, v in ((dx, dx), (dy, dy), (dx, dy)))
    # n (x̄ − ρȳ)² − t² (sxx − 2ρ sxy + ρ² syy) = 0
    coefficients = [
        n * y.mean() ** 2 - t**2 * syy,
        -2 * n * x.mean() * y.mean() + 2 * t**2 * sxy,
        n * x.mean() ** 2 - t**2 * sxx,
    ]
    return sorted(np.roots(coefficients).real)


def _t_statistic(x, y, rho):
    z = np.asarray(x, float) - rho * np.asarray(y, float)
    return abs(z.mean()) / (z.std(ddof=1) / math.sqrt(len(z)))


def test_fieller_bounds_solve_the_quadratic():
    x = [0.5, 1.5, 1.0, 2.0, 1.0]  # method − bct, new/new, per seed
    y = [3.0, 4.0, 3.5, 5.0, 4.5]  # independent − bct (the tax), per seed
    got = stats.fieller_ratio(x, y)
    assert got['estimate'] == pytest.approx(6.0 / 20.0)
    assert got['bounded'] and got['note'] is None and got['n'] == 5
    low, high = _fieller_by_quadratic(x, y, T_TABLE[4])
    assert got['ci_low'] == pytest.approx(low, rel=1e-5)
    assert got['ci_high'] == pytest.approx(high, rel=1e-5)
    # At each bound the paired t test of x − ρ y is exactly at its 95% critical value, and
    # the estimate lies inside.
    for rho in (got['ci_low'], got['ci_high']):
        assert _t_statistic(x, y, rho) == pytest.approx(T_TABLE[4], rel=1e-5)
    assert got['ci_low'] < got['estimate'] < got['ci_high']


def test_fieller_with_correlated_numerator_is_narrower():
    """x and y share BCT's noise: positively correlated, the ratio is better determined than
    with the same spreads uncorrelated (the covariance term matters)."""
    y = np.array([3.0, 4.0, 3.5, 5.0, 4.5])
    correlated = 0.3 * y + np.array([0.05, -0.05, 0.0, 0.05, -0.05])
    shuffled = correlated[[3, 0, 4, 1, 2]]
    a, b = stats.fieller_ratio(correlated, y), stats.fieller_ratio(shuffled, y)
    assert a['ci_high'] - a['ci_low'] < 0.5 * (b['ci_high'] - b['ci_low'])
    for got, x in ((a, correlated), (b, shuffled)):
        low, high = _fieller_by_quadratic(x, y, T_TABLE[4])
        assert (got['ci_low'], got['ci_high']) == pytest.approx((low, high), rel=1e-5)


def test_fieller_unbounded_when_the_tax_is_not_significant():
    """mean(y) = 0.1 with spread ~1.7: |t| = 0.13 < 2.776, so no finite interval."""
    got = stats.fieller_ratio([0.1, 0.2, 0.0, 0.3, 0.1], [1.0, -1.0, 2.0, -2.0, 0.5])
    assert got['estimate'] == pytest.approx(0.14 / 0.1)
    assert not got['bounded'] and got['ci_low'] is None and got['ci_high'] is None
    assert 'unbounded' in got['note'] and 'not significantly different from 0' in got['note']


def test_fieller_zero_denominator_mean():
    got = stats.fieller_ratio([0.1, 0.2], [1.0, -1.0])
    assert got['estimate'] is None and not got['bounded']


@pytest.mark.parametrize(
    'args, match',
    [
        (([], []), 'non-empty'),
        (([1, 2], [1]), 'one value per seed'),
        (([1, np.nan], [1, 2]), 'non-finite'),
        (([[1, 2]], [[1, 2]]), '1-D'),
    ],
)
def test_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        stats.paired_difference(*args)


# ----------------------------------------------------------------------------------------------
# Over per-seed results files
# ----------------------------------------------------------------------------------------------

BCT = [0.58, 0.61, 0.60]
NDPP = [0.60, 0.62, 0.65]  # − BCT: (.02, .01, .05), the 3-seed case above
TAX = [0.04, 0.03, 0.06]  # independent − BCT: mean 13/300


def _results(seed, methods):
    """One seed's `evaluate.evaluate`-shaped results: {name: (new/new mAP, new/old mAP)}."""
    return {
        'seed': seed,
        'primary_metric': 'mAP',
        'old_old': {'mAP': 0.3},
        'methods': {
            name: {
                'new_new': {'mAP': nn, 'recall@1': 0.5},
                'new_old': {'mAP': no, 'recall@1': 0.4},
                'train_seconds': 10.0,
                'compatible': True,
                'update_gain': 0.2,
            }
            for name, (nn, no) in methods.items()
        },
    }


def _seeds(with_independent=True, ndpp_seeds=(0, 1, 2)):
    out = []
    for s in range(3):
        methods = {'bct': (BCT[s], 0.35 + 0.01 * s)}
        if with_independent:
            methods['independent'] = (BCT[s] + TAX[s], 0.02)
        if s in ndpp_seeds:
            methods['ndpp'] = (NDPP[s], 0.36 + 0.02 * s)
        out.append(_results(s, methods))
    return out


def test_paired_analysis_by_hand():
    analysis = stats.paired_analysis(_seeds(), 'mAP')
    json.dumps(analysis, allow_nan=False)  # strict JSON
    assert analysis['seeds'] == [0, 1, 2] and analysis['fraction'] and analysis['missing'] == []
    ndpp = analysis['methods']['ndpp']
    nn = ndpp['vs']['bct']['new_new']
    half = 4.302653 * math.sqrt(13) / 300
    assert nn['mean'] == pytest.approx(2 / 75) and nn['ci_high'] == pytest.approx(
        2 / 75 + half, rel=1e-6
    )
    # new/old − bct: (.36 − .35) + (.02 − .01) s = .01, .02, .03: mean .02, sd .01.
    no = ndpp['vs']['bct']['new_old']
    assert no['mean'] == pytest.approx(0.02) and no['sd'] == pytest.approx(0.01)
    assert no['ci_low'] == pytest.approx(0.02 - 4.302653 * 0.01 / math.sqrt(3), rel=1e-6)
    # Against the independent model: NDPP − independent = (.02 − .04, .01 − .03, .05 − .06).
    assert ndpp['vs']['independent']['new_new']['differences'] == pytest.approx(
        [-0.02] * 2 + [-0.01]
    )
    # The tax and R = (2/75) / (13/300) = 8/13, Fieller's bounds as solved directly.
    assert analysis['tax']['mean'] == pytest.approx(13 / 300)
    r = ndpp['recovered']
    assert r['estimate'] == pytest.approx(8 / 13)
    d = np.subtract(NDPP, BCT)
    if r['bounded']:
        bounds = _fieller_by_quadratic(d, TAX, T_TABLE[2])
        assert (r['ci_low'], r['ci_high']) == pytest.approx(bounds, rel=1e-5)
    else:  # |t| of the tax = (13/300) / (√7/300) = 4.91 > 4.30: it must be bounded
        pytest.fail('R should be bounded here')
    # References compare with each other, never with themselves; no R for them.
    assert list(analysis['methods']['bct']['vs']) == ['independent']
    assert list(analysis['methods']['independent']['vs']) == ['bct']
    assert analysis['methods']['bct']['recovered'] is None

    table = stats.paired_markdown(analysis)
    assert 'mAP, differences in percentage points' in table
    assert 'Tax T = independent − bct (new/new): +4.33 [' in table
    row = next(line for line in table.splitlines() if line.startswith('| ndpp |'))
    assert f'+2.67 [{100 * (2 / 75 - half):+.2f}, {100 * (2 / 75 + half):+.2f}]' in row
    assert f'| {8 / 13:.2f} [' in row
    header = next(line for line in table.splitlines() if line.startswith('| method |'))
    assert header == (
        '| method | new/new − bct | new/old − bct | new/new − independent '
        '| new/old − independent | R |'
    )


def test_paired_analysis_missing_reference_and_seeds():
    analysis = stats.paired_analysis(_seeds(with_independent=False, ndpp_seeds=(0, 2)), 'mAP')
    assert analysis['missing'] == ['independent'] and analysis['tax'] is None
    ndpp = analysis['methods']['ndpp']
    assert list(ndpp['vs']) == ['bct'] and ndpp['recovered'] is None
    assert ndpp['vs']['bct']['new_new']['n'] == 2  # the seeds that have both
    assert ndpp['vs']['bct']['new_new']['differences'] == pytest.approx([0.02, 0.05])
    table = stats.paired_markdown(analysis)
    assert 'Tax T = independent − bct (new/new): not available' in table
    assert 'Missing reference methods: independent.' in table
    assert '(n = 2)' in table
    json.dumps(analysis, allow_nan=False)


def test_paired_analysis_single_seed_and_undefined_values():
    one = _seeds()[:1]
    one[0]['methods']['bct']['new_old']['mAP'] = None  # an undefined metric
    analysis = stats.paired_analysis(one, 'mAP')
    ndpp = analysis['methods']['ndpp']
    assert ndpp['vs']['bct']['new_new']['ci_low'] is None
    assert ndpp['vs']['bct']['new_old'] is None  # no seed has both values
    assert ndpp['recovered']['estimate'] == pytest.approx(0.02 / 0.04)
    table = stats.paired_markdown(analysis)
    assert '| ndpp | +2.00 |  |' in table
    json.dumps(analysis, allow_nan=False)


def test_paired_analysis_non_fraction_metric_in_its_units():
    seeds = _seeds()
    for r in seeds:
        for m in r['methods'].values():
            m['new_new']['rank'] = 100 * m['new_new']['mAP']
    analysis = stats.paired_analysis(seeds, 'rank')
    assert not analysis['fraction']
    assert 'differences in metric units' in stats.paired_markdown(analysis)
    assert analysis['methods']['ndpp']['vs']['bct']['new_new']['mean'] == pytest.approx(8 / 3)


def test_paired_analysis_errors():
    with pytest.raises(ValueError, match='at least one seed'):
        stats.paired_analysis([], 'mAP')
    with pytest.raises(ValueError, match=r"metric 'map@100' has no value.*'mAP', 'recall@1'"):
        stats.paired_analysis(_seeds(), 'map@100')


def test_paired_markdown_one_line_for_a_shared_unbounded_r():
    # A tax of mean 0.01 with sd 0.05 over 3 seeds is not significant: every method's R is
    # unbounded for the same reason, said once for all of them.
    tax = [0.06, -0.04, 0.01]
    seeds = []
    for s in range(3):
        methods = {'bct': (BCT[s], 0.35), 'independent': (BCT[s] + tax[s], 0.02)}
        methods['ndpp'] = (NDPP[s], 0.36)
        methods['odpp'] = (NDPP[s] - 0.01, 0.34)
        seeds.append(_results(s, methods))
    table = stats.paired_markdown(stats.paired_analysis(seeds, 'mAP'))
    notes = [line for line in table.splitlines() if 'unbounded:' in line]
    assert len(notes) == 1 and notes[0].startswith('ndpp, odpp: R unbounded:'), table


# ----------------------------------------------------------------------------------------------
# Strength selection (method.md §11)
# ----------------------------------------------------------------------------------------------


def _strength_seeds(arms, incompatible=()):
    """3 seeds: bct, and arms {name: (Δnew/new per seed, Δnew/old per seed)} against it."""
    out = []
    for s in range(3):
        methods = {'bct': (BCT[s], 0.35)}
        methods.update({n: (BCT[s] + nn[s], 0.35 + no[s]) for n, (nn, no) in arms.items()})
        r = _results(s, methods)
        for name in incompatible:
            r['methods'][name]['compatible'] = s != 1
        out.append(r)
    return out


def _select(arms, incompatible=()):
    per_seed = _strength_seeds(arms, incompatible)
    return stats.select_strength(per_seed, stats.paired_analysis(per_seed, 'mAP'))


FLAT = (0.0, 0.0, 0.0)


def test_select_strength_takes_the_largest_gain():
    s = _select(
        {
            'ndpp_rho25': ((0.01, 0.01, 0.01), FLAT),
            'ndpp_rho50': ((0.02, 0.03, 0.04), FLAT),  # mean +3 points: the largest
            'ndpp_rho100': ((0.01, 0.02, 0.0), FLAT),
            'odpp_rho50': ((-0.01, 0.0, -0.02), FLAT),
        }
    )
    assert s['methods']['ndpp']['chosen'] == 0.5
    assert [r['rho'] for r in s['methods']['ndpp']['arms']] == [0.25, 0.5, 1.0]
    assert s['methods']['ndpp']['arms'][1]['new_new']['mean'] == pytest.approx(0.03)
    # No ODPP strength gains: the fallback ρ = 0.5.
    assert s['methods']['odpp']['chosen'] == 0.5 and 'fallback' in s['methods']['odpp']['reason']
    text = stats.selection_markdown(s)
    assert '| ndpp | 0.5 | +3.00 [' in text and text.count('**chosen**') == 2
    json.dumps(s, allow_nan=False)


def test_select_strength_ties_go_to_the_smaller_strength():
    s = _select(
        {
            'ndpp_rho25': ((0.020, 0.020, 0.020), FLAT),  # 2.0 points, within 0.2 of 2.15
            'ndpp_rho75': ((0.0215, 0.0215, 0.0215), FLAT),
            'ndpp_rho100': ((0.01, 0.01, 0.01), FLAT),
        }
    )
    assert s['methods']['ndpp']['chosen'] == 0.25
    s = _select({'ndpp_rho25': ((0.017, 0.017, 0.017), FLAT), 'ndpp_rho75': ((0.02,) * 3, FLAT)})
    assert s['methods']['ndpp']['chosen'] == 0.75  # 0.3 points apart: no tie


def test_select_strength_needs_new_old_and_compatibility():
    s = _select(
        {
            'ndpp_rho100': ((0.05, 0.05, 0.05), (-0.01, -0.01, -0.01)),  # −1 point on new/old
            'ndpp_rho75': ((0.04, 0.04, 0.04), FLAT),  # not compatible in seed 1
            'ndpp_rho25': ((0.01, 0.01, 0.01), (-0.004, -0.004, -0.004)),  # −0.4: allowed
        },
        incompatible=('ndpp_rho75',),
    )
    rows = {r['rho']: r for r in s['methods']['ndpp']['arms']}
    assert not rows[1.0]['eligible'] and not rows[0.75]['eligible'] and rows[0.25]['eligible']
    assert not rows[0.75]['compatible_every_seed']
    assert s['methods']['ndpp']['chosen'] == 0.25


def test_strength_arm_names():
    arms = stats.strength_arms(['bct', 'ndpp_rho50', 'ndpp_rho25', 'odpp_neg_rho100', 'ndpp'])
    assert arms == {
        'ndpp': {0.25: 'ndpp_rho25', 0.5: 'ndpp_rho50'},
        'odpp_neg': {1.0: 'odpp_neg_rho100'},
    }


def test_holm_by_hand():
    assert stats.holm({'a': 0.01, 'b': 0.04}) == pytest.approx({'a': 0.02, 'b': 0.04})
    assert stats.holm({'a': 0.03, 'b': 0.02}) == pytest.approx({'a': 0.04, 'b': 0.04})
    assert stats.holm({'a': 0.6, 'b': 0.01, 'c': None}) == {'a': 0.6, 'b': 0.02, 'c': None}


def test_paired_t_pvalue_matches_scipy():
    from scipy import stats as scipy_stats

    d = [0.02, 0.01, 0.05, -0.01, 0.03]
    assert stats.paired_t_pvalue(d) == pytest.approx(scipy_stats.ttest_1samp(d, 0.0).pvalue)
    assert stats.paired_t_pvalue([0.01]) is None


def test_confirmatory_by_hand():
    per_seed = _seeds()
    for r, d in zip(per_seed, (0.0, -0.01, 0.01)):  # a second arm: mean 0 against BCT
        r['methods']['odpp'] = dict(r['methods']['bct'])
        r['methods']['odpp']['new_new'] = {'mAP': r['methods']['bct']['new_new']['mAP'] + d}
    analysis = stats.paired_analysis(per_seed, 'mAP')
    result = stats.confirmatory(analysis, ('ndpp', 'odpp'))
    ndpp, odpp = result['arms']['ndpp'], result['arms']['odpp']
    assert ndpp['recovered']['estimate'] == pytest.approx(8 / 13)
    # NDPP − BCT = (.02, .01, .05): standard error √13/300 (as above), t = (2/75) / (√13/300)
    t = (2 / 75) / (math.sqrt(13) / 300)
    from scipy import stats as scipy_stats

    p = 2 * scipy_stats.t.sf(t, 2)
    assert ndpp['p'] == pytest.approx(p) and odpp['p'] == pytest.approx(1.0)
    assert ndpp['p_holm'] == pytest.approx(min(1, 2 * p)) and odpp['p_holm'] == pytest.approx(1.0)
    assert result['tax_excludes_zero']  # T = (.04, .03, .06): t = 4.9 > 4.30
    assert '| ndpp |' in stats.confirmatory_markdown(result)
    with pytest.raises(ValueError, match="'lce'"):
        stats.confirmatory(analysis, ('lce',))
