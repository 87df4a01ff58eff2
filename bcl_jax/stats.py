"""Paired statistics over seeds (method.md §9), as pure NumPy float64 functions.

Every method of a seed shares its initialisation and data order, so methods are compared seed
by seed: the per-seed differences d_s = a_s − b_s carry the comparison, and seed-to-seed noise
common to both methods cancels. Intervals are two-sided at `level` (default 95%):

- `paired_difference`: mean of d_s ± t_{(1+level)/2, n−1} · sd / √n (the paired t interval).
- `fieller_ratio`: a ratio of two paired means, mean(x) / mean(y), with Fieller's interval
  (Fieller 1954, J. R. Stat. Soc. B 16:175): the set of ρ for which the paired t test of
  x_s − ρ y_s does not reject. It accounts for the noise of the denominator and for the
  correlation of x and y (both are differences to the same BCT run), and is exact for normal
  data; the delta method's symmetric interval is not, and a bootstrap over 5 seeds is not
  reliable. When mean(y) is not significantly different from 0 the set is unbounded.
- `paired_analysis`: from per-seed results (`evaluate.evaluate`'s dicts), each method's paired
  differences to the reference methods on new/new and new/old, the tax T = independent − BCT
  on new/new, and the recovered fraction R = mean(new/new − BCT new/new) / mean(T).
- `paired_markdown`: that analysis as one table.
- `select_strength`, `selection_markdown`: method.md §11's rule choosing each method's
  perturbation strength ρ from the paired comparisons with BCT of its arms `<method>_rho<100ρ>`.
- `confirmatory`, `confirmatory_markdown`: method.md §11's primary endpoint, R per primary arm
  with its Fieller interval, and the paired t test of Δnew/new against BCT Holm-corrected over
  the primary arms (`holm`).

Undefined quantities are None (strict JSON, no NaN).
"""

from __future__ import annotations

import math
import re

import numpy as np

__all__ = [
    'confirmatory',
    'confirmatory_markdown',
    'fieller_ratio',
    'holm',
    'paired_analysis',
    'paired_difference',
    'paired_markdown',
    'select_strength',
    'selection_markdown',
]

TESTS = ('new_new', 'new_old')  # the retrieval tests of a new model (evaluate.evaluate)
_LABELS = {'new_new': 'new/new', 'new_old': 'new/old'}


def _t():
    """Student's t distribution. scipy.stats is imported on first use: it takes about a second
    to import and a single run, which compares no seeds, never needs it."""
    from scipy import stats

    return stats.t


def t_quantile(df: int, level: float = 0.95) -> float:
    """The two-sided `level` quantile of Student's t with `df` degrees of freedom."""
    return float(_t().ppf(0.5 + level / 2, df))


def _values(x, name: str) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f'{name} must be a non-empty 1-D sequence of per-seed values; got {x!r}.')
    if not np.all(np.isfinite(x)):
        raise ValueError(f'{name} has non-finite values: {x.tolist()}.')
    return x


def _paired(a, b, names=('a', 'b')):
    a, b = _values(a, names[0]), _values(b, names[1])
    if a.shape != b.shape:
        raise ValueError(
            f'{names[0]} and {names[1]} must hold one value per seed each; got '
            f'{a.size} and {b.size} values.'
        )
    return a, b


def _level(level: float) -> float:
    if not 0 < level < 1:
        raise ValueError(f'level must be in (0, 1); got {level}.')
    return float(level)


def paired_difference(a, b, *, level: float = 0.95) -> dict:
    """The per-seed differences d_s = a_s − b_s and the paired t interval of their mean.

    Returns dict(n, mean, sd (ddof=1), ci_low, ci_high, differences): sd and the interval are
    None for n = 1 (one seed gives no estimate of spread).
    """
    a, b = _paired(a, b)
    d, n = a - b, a.size
    out = {'n': n, 'mean': float(d.mean()), 'sd': None, 'ci_low': None, 'ci_high': None}
    if n > 1:
        sd = float(d.std(ddof=1))
        half = t_quantile(n - 1, _level(level)) * sd / math.sqrt(n)
        out.update(sd=sd, ci_low=out['mean'] - half, ci_high=out['mean'] + half)
    return dict(out, differences=d.tolist())


def fieller_ratio(numerator, denominator, *, level: float = 0.95) -> dict:
    """mean(x) / mean(y) for paired per-seed x_s, y_s, with Fieller's interval.

    With means x̄, ȳ, the sample (co)variances of the means v_xx, v_yy, v_xy (ddof=1, / n) and
    t = t_{(1+level)/2, n−1}, the interval is {ρ : (x̄ − ρȳ)² <= t² (v_xx − 2ρ v_xy + ρ² v_yy)},
    i.e. a ρ² − 2 b ρ + c <= 0 with a = ȳ² − t² v_yy, b = x̄ȳ − t² v_xy, c = x̄² − t² v_xx:
    the roots (b ± √(b² − a c)) / a when a > 0. a <= 0 means ȳ is not significantly different
    from 0 at `level`: the set is then unbounded and the bounds are None.

    Returns dict(n, estimate (None when ȳ = 0), ci_low, ci_high, bounded, note).
    """
    x, y = _paired(numerator, denominator, ('numerator', 'denominator'))
    n, mx, my = x.size, float(x.mean()), float(y.mean())
    out = {'n': n, 'estimate': mx / my if my != 0 else None, 'ci_low': None, 'ci_high': None}
    if n == 1:
        return dict(out, bounded=False, note='one seed: no interval')
    cov = np.cov(np.stack([x, y]), ddof=1) / n
    t2 = t_quantile(n - 1, _level(level)) ** 2
    a = my * my - t2 * cov[1, 1]
    b = mx * my - t2 * cov[0, 1]
    c = mx * mx - t2 * cov[0, 0]
    if a <= 0:
        note = (
            f'unbounded: the denominator mean {my:.4g} is not significantly different from 0 '
            f'at {level:.0%}, so the Fieller set has no finite bounds'
        )
        return dict(out, bounded=False, note=note)
    root = math.sqrt(max(b * b - a * c, 0.0))  # >= 0 when a > 0, up to rounding
    return dict(out, ci_low=(b - root) / a, ci_high=(b + root) / a, bounded=True, note=None)


# ----------------------------------------------------------------------------------------------
# Over the per-seed results files
# ----------------------------------------------------------------------------------------------


def _metric(result: dict, method: str, test: str, metric: str):
    """results['methods'][method][test][metric] as a float, or None (missing or not finite)."""
    value = result.get('methods', {}).get(method, {}).get(test, {}).get(metric)
    return float(value) if value is not None and np.isfinite(value) else None


def _series(results, metric, *pairs):
    """Per-seed values of each (method, test) in `pairs`, over the seeds that have them all."""
    rows = [[_metric(r, m, t, metric) for m, t in pairs] for r in results]
    rows = [row for row in rows if None not in row]
    return [np.array(col) for col in zip(*rows)] if rows else None


def _difference(results, metric, a, b, level):
    series = _series(results, metric, a, b)
    return None if series is None else paired_difference(*series, level=level)


def paired_analysis(
    per_seed_results: list[dict],
    metric: str,
    against: tuple[str, ...] = ('bct', 'independent'),
    *,
    level: float = 0.95,
) -> dict:
    """Paired comparisons of the methods of `per_seed_results` (one `evaluate.evaluate` dict
    per seed, in any order; each seed pairs the methods it holds) on `metric`.

    For each method and each reference method in `against` (other than itself): the paired
    differences method − reference on new/new and on new/old (`paired_difference`). The tax
    T = independent − bct on new/new, and for each other method the recovered fraction
    R = mean_s(method − bct, new/new) / mean_s(T) (`fieller_ratio`; method.md §9). A
    comparison uses the seeds that have all its values; it is None when none has.

    Returns a strict-JSON dict: metric, level, seeds, fraction (True when every value of the
    metric lies in [0, 1], so differences read as percentage points ×100), against (the
    references some seed holds) and missing (those no seed holds), tax, and methods: {name:
    dict(vs={reference: {new_new, new_old}}, recovered)}.
    """
    if not per_seed_results:
        raise ValueError('paired_analysis needs the results of at least one seed.')
    methods = list(dict.fromkeys(m for r in per_seed_results for m in r.get('methods', {})))
    values = [
        v
        for r in per_seed_results
        for m in methods
        for t in TESTS
        if (v := _metric(r, m, t, metric)) is not None
    ]
    if not values:
        known = {
            k
            for r in per_seed_results
            for x in r.get('methods', {}).values()
            for k in x.get('new_new', {})
        }
        raise ValueError(
            f'metric {metric!r} has no value in the results; their new/new metrics are '
            f'{sorted(known)}.'
        )
    tax_series = _series(per_seed_results, metric, ('independent', 'new_new'), ('bct', 'new_new'))
    out = {
        'metric': metric,
        'level': _level(level),
        'seeds': [r.get('seed') for r in per_seed_results],
        'fraction': bool(all(0 <= v <= 1 for v in values)),
        'against': [ref for ref in against if ref in methods],
        'missing': [ref for ref in against if ref not in methods],
        'tax': None if tax_series is None else paired_difference(*tax_series, level=level),
        'methods': {},
    }
    for m in methods:
        vs = {
            ref: {t: _difference(per_seed_results, metric, (m, t), (ref, t), level) for t in TESTS}
            for ref in against
            if ref != m and ref in methods
        }
        recovered = None
        if m not in ('bct', 'independent'):
            trio = (m, 'new_new'), ('bct', 'new_new'), ('independent', 'new_new')
            series = _series(per_seed_results, metric, *trio)
            if series is not None:
                method, bct, independent = series
                recovered = fieller_ratio(method - bct, independent - bct, level=level)
        out['methods'][m] = {'vs': vs, 'recovered': recovered}
    return out


def _cell(diff: dict | None, scale: float, n_all: int) -> str:
    if diff is None:
        return ''
    text = f'{scale * diff["mean"]:+.2f}'
    if diff['ci_low'] is not None:
        text += f' [{scale * diff["ci_low"]:+.2f}, {scale * diff["ci_high"]:+.2f}]'
    return text + (f' (n = {diff["n"]})' if diff['n'] != n_all else '')


def _ratio_cell(ratio: dict | None, n_all: int) -> str:
    if ratio is None or ratio['estimate'] is None:
        return '' if ratio is None else 'undefined (mean T = 0)'
    text = f'{ratio["estimate"]:.2f}'
    if ratio['bounded']:
        text += f' [{ratio["ci_low"]:.2f}, {ratio["ci_high"]:.2f}]'
    elif ratio['n'] > 1:
        text += ' [unbounded]'
    return text + (f' (n = {ratio["n"]})' if ratio['n'] != n_all else '')


def paired_markdown(analysis: dict) -> str:
    """`paired_analysis` as a table: per method, its mean paired differences to each reference
    with their intervals, and R; above it, the tax T. In percentage points when the metric is a
    fraction."""
    scale, unit = (100.0, 'percentage points') if analysis['fraction'] else (1.0, 'metric units')
    n_all = len(analysis['seeds'])
    refs = analysis['against']
    level = f'{analysis["level"]:.0%}'
    lines = [
        (
            f'Paired by seed ({n_all} seeds): {analysis["metric"]}, differences in {unit}, mean '
            f'[{level} CI, paired t]; R = (new/new − bct new/new) / T [{level} CI, Fieller].'
        ),
        '',
        'Tax T = independent − bct (new/new): '
        + (_cell(analysis['tax'], scale, n_all) or 'not available'),
    ]
    if analysis['missing']:
        lines.append(f'Missing reference methods: {", ".join(analysis["missing"])}.')
    header = ['method'] + [f'{_LABELS[t]} − {r}' for r in refs for t in TESTS] + ['R']
    lines += ['', '| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for name, m in analysis['methods'].items():
        cells = [_cell(m['vs'].get(r, {}).get(t), scale, n_all) for r in refs for t in TESTS]
        lines.append('| ' + ' | '.join([name, *cells, _ratio_cell(m['recovered'], n_all)]) + ' |')
    by_note = {}  # the methods that share one note (the same T) share one line
    for name, m in analysis['methods'].items():
        if m['recovered'] and m['recovered']['note'] and m['recovered']['n'] > 1:
            by_note.setdefault(m['recovered']['note'], []).append(name)
    notes = [f'{", ".join(names)}: R {note}' for note, names in by_note.items()]
    return '\n'.join(lines + ([''] + notes if notes else [])) + '\n'


# ------------------------------------------------------------------------- strength selection

STRENGTH_ARM = re.compile(r'^(?P<method>.+)_rho(?P<percent>\d+)$')  # e.g. 'ndpp_rho50'


def strength_arms(names) -> dict:
    """method -> {ρ: arm name} for the names of the form `<method>_rho<100ρ>`."""
    groups = {}
    for name in names:
        if match := STRENGTH_ARM.match(name):
            groups.setdefault(match['method'], {})[int(match['percent']) / 100] = name
    return {m: dict(sorted(arms.items())) for m, arms in groups.items()}


def select_strength(
    per_seed_results: list[dict],
    analysis: dict,
    *,
    min_new_old: float = -0.5,
    tie: float = 0.2,
    fallback: float = 0.5,
) -> dict:
    """method.md §11's selection rule, per method with strength arms (`strength_arms`): the ρ
    with the largest mean paired Δnew/new against BCT, among the arms with mean Δnew/old ≥
    `min_new_old` and new/old > old/old (BCT's compatibility criterion) in every seed; the
    smallest ρ within `tie` of that largest gain; `fallback` if no eligible arm gains.
    `min_new_old` and `tie` are in percentage points when the metric is a fraction.

    `analysis`: `paired_analysis` of the same results, with 'bct' among its references.
    Returns dict(metric, rule, methods={method: dict(arms=[per-ρ rows], chosen, reason)}).
    """
    if 'bct' not in analysis['against']:
        raise ValueError('select_strength needs BCT in the results: every arm is paired with it.')
    scale = 100.0 if analysis['fraction'] else 1.0
    out = {
        'metric': analysis['metric'],
        'rule': (
            f'largest mean Δnew/new vs BCT with mean Δnew/old ≥ {min_new_old} and new/old > '
            f'old/old in every seed; ties within {tie} to the smaller ρ; no gain: ρ = {fallback}'
        ),
        'methods': {},
    }
    for method, arms in strength_arms(analysis['methods']).items():
        rows = []
        for rho, name in arms.items():
            vs = analysis['methods'][name]['vs']['bct']
            compatible = [r['methods'][name]['compatible'] for r in per_seed_results]
            every_seed = all(c is True for c in compatible)
            eligible = vs['new_old']['mean'] * scale >= min_new_old and every_seed
            rows.append(
                dict(
                    rho=rho,
                    arm=name,
                    new_new=vs['new_new'],
                    new_old=vs['new_old'],
                    compatible_every_seed=every_seed,
                    eligible=eligible,
                )
            )
        gains = [r for r in rows if r['eligible'] and r['new_new']['mean'] > 0]
        if gains:
            best = max(r['new_new']['mean'] for r in gains)
            chosen = min(r['rho'] for r in gains if (best - r['new_new']['mean']) * scale <= tie)
            reason = f'largest gain {scale * best:+.2f}; smallest ρ within {tie}'
        else:
            chosen, reason = fallback, 'no eligible ρ gains over BCT: the fallback'
        out['methods'][method] = {'arms': rows, 'chosen': chosen, 'reason': reason}
    return out


def selection_markdown(selection: dict, fraction: bool = True) -> str:
    """`select_strength` as a table: per method and ρ, the paired differences with BCT."""
    scale = 100.0 if fraction else 1.0
    lines = [
        f'Strength selection ({selection["metric"]}, paired with BCT; rule: {selection["rule"]}).',
        '',
        '| method | ρ | Δnew/new vs bct | Δnew/old vs bct | compatible every seed | chosen |',
        '|---|---|---|---|---|---|',
    ]
    for method, s in selection['methods'].items():
        for r in s['arms']:
            cells = [_cell(r[t], scale, r[t]['n']) for t in TESTS]
            mark = '**chosen**' if r['rho'] == s['chosen'] else ''
            ok = 'yes' if r['compatible_every_seed'] else 'no'
            lines.append(f'| {method} | {r["rho"]:g} | {" | ".join(cells)} | {ok} | {mark} |')
        if s['chosen'] not in [r['rho'] for r in s['arms']]:
            lines.append(f'| {method} | {s["chosen"]:g} | | | | **chosen** ({s["reason"]}) |')
    return '\n'.join(lines) + '\n'


# ---------------------------------------------------------------------------- confirmation


def paired_t_pvalue(differences) -> float | None:
    """Two-sided p of the paired t test that the mean of `differences` is 0 (None for n < 2
    or no spread)."""
    d = _values(differences, 'differences')
    if d.size < 2 or d.std(ddof=1) == 0:
        return None
    t = d.mean() / (d.std(ddof=1) / math.sqrt(d.size))
    return float(2 * _t().sf(abs(t), d.size - 1))


def holm(pvalues: dict) -> dict:
    """Holm's step-down adjusted p-values (family-wise error over the given hypotheses):
    sorted ascending p_(1) <= … <= p_(m), adjusted p_(i) = max_{j<=i} min(1, (m − j + 1) p_(j)).
    None stays None and does not count in m."""
    given = sorted((p, name) for name, p in pvalues.items() if p is not None)
    m, out, running = len(given), {name: None for name in pvalues}, 0.0
    for i, (p, name) in enumerate(given):
        running = max(running, min(1.0, (m - i) * p))
        out[name] = running
    return out


def confirmatory(analysis: dict, primary, *, alpha: float = 0.05) -> dict:
    """method.md §11's confirmatory test: per primary arm, R = (arm − BCT) / T on new/new with
    its Fieller interval (from `paired_analysis`), the paired t test of arm − BCT on new/new
    and its Holm-adjusted p over the primary arms; `significant` at `alpha` after Holm. R counts
    only where T's interval excludes 0 (`tax_excludes_zero`)."""
    tax = analysis['tax']
    tax_ok = bool(tax and tax['ci_low'] is not None and (tax['ci_low'] > 0 or tax['ci_high'] < 0))
    arms, raw = {}, {}
    for name in primary:
        m = analysis['methods'].get(name)
        if m is None or 'bct' not in m['vs']:
            raise ValueError(f'primary arm {name!r} has no paired comparison with BCT in results')
        diff = m['vs']['bct']['new_new']
        raw[name] = paired_t_pvalue(diff['differences'])
        arms[name] = {'recovered': m['recovered'], 'new_new_vs_bct': diff, 'p': raw[name]}
    for name, p in holm(raw).items():
        arms[name].update(p_holm=p, significant=p is not None and p < alpha)
    return {'alpha': alpha, 'tax': tax, 'tax_excludes_zero': tax_ok, 'arms': arms}


def confirmatory_markdown(result: dict, fraction: bool = True) -> str:
    scale = 100.0 if fraction else 1.0
    n = result['tax']['n'] if result['tax'] else 0
    lines = [
        f'Confirmatory test (primary endpoint R; Δnew/new vs BCT, paired t, Holm over '
        f'{len(result["arms"])} arms at {result["alpha"]}). T = {_cell(result["tax"], scale, n)}'
        + ('' if result['tax_excludes_zero'] else ' — its CI includes 0: R does not count.'),
        '',
        '| arm | R [Fieller CI] | Δnew/new vs bct | p | p (Holm) | significant |',
        '|---|---|---|---|---|---|',
    ]
    fmt = lambda p: '' if p is None else f'{p:.3g}'
    for name, a in result['arms'].items():
        cells = [
            _ratio_cell(a['recovered'], n),
            _cell(a['new_new_vs_bct'], scale, n),
            fmt(a['p']),
            fmt(a['p_holm']),
            'yes' if a['significant'] else 'no',
        ]
        lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'
