"""Tests of the figures: valid PNGs of the documented size, the numbers they show, bad input."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from bcl_jax import plots


def _normalize(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _banks(num_groups=8, per_group=5, dim=16, seed=0):
    """Old prototypes in tight groups (each group a different spread), perturbed ones spread."""
    rng = np.random.default_rng(seed)
    centres = _normalize(rng.normal(size=(num_groups, dim)))
    spread = np.linspace(0.02, 0.2, num_groups)  # group 0 the most crowded
    labels = np.repeat(np.arange(num_groups), per_group)
    old = _normalize(centres[labels] + spread[labels, None] * rng.normal(size=(len(labels), dim)))
    perturbed = _normalize(old + 3.0 * (old - centres[labels]))
    new = _normalize(centres[labels] + 0.3 * rng.normal(size=(len(labels), dim)))
    return old, perturbed, new


def _brute_top1(bank):
    bank = bank.astype(np.float64)
    sims = bank @ bank.T
    np.fill_diagonal(sims, -np.inf)
    return sims.max(axis=1)


def test_figure_png_and_numbers(tmp_path):
    old, perturbed, new = _banks()
    path = str(tmp_path / 'sub' / 'perturbation.png')
    info = plots.perturbation_figure(old, perturbed, new, path, title='test: ndpp')

    assert os.path.exists(path)
    assert not [f for f in os.listdir(tmp_path / 'sub') if f.startswith('.tmp-')]
    with Image.open(path) as im:
        assert im.format == 'PNG'
        im.verify()
    with Image.open(path) as im:
        assert im.size[0] > 800 and im.size[1] > 400

    banks = {'old': old, 'perturbed': perturbed, 'new': new}
    want = {name: _brute_top1(b) for name, b in banks.items()}
    for name, top1 in want.items():
        assert info[f'mean_top1_{name}'] == pytest.approx(top1.mean(), abs=1e-5)
    # The perturbation spread the crowded bank.
    assert info['mean_top1_perturbed'] < info['mean_top1_old']

    # The chosen classes are the 6 most crowded ones (up to float32 rounding at the boundary),
    # most crowded first.
    chosen = np.asarray(info['chosen'])
    assert len(chosen) == 6 and len(set(chosen.tolist())) == 6
    rest = np.setdiff1d(np.arange(len(old)), chosen)
    assert want['old'][chosen].min() >= want['old'][rest].max() - 1e-6
    assert np.all(np.diff(want['old'][chosen]) <= 1e-6)
    assert set(chosen.tolist()) == set(np.argsort(-want['old'])[:6].tolist())

    # Each group: the chosen class, then its 4 nearest old neighbours by brute force.
    sims = old.astype(np.float64) @ old.T.astype(np.float64)
    for c, group in zip(chosen, info['groups']):
        assert group[0] == c and len(group) == 5
        s = sims[c].copy()
        s[c] = -np.inf
        assert set(group[1:]) == set(np.argsort(-s)[:4].tolist())
    assert info['num_classes'] == len(old)


def test_top1_blocked_matches_brute_force():
    old, _, _ = _banks(num_groups=10, per_group=7, dim=8, seed=1)
    np.testing.assert_allclose(
        plots.top1_similarity(old, block_rows=3), _brute_top1(old), atol=1e-5
    )


def test_small_bank_and_options(tmp_path):
    # Fewer classes than asked for: everything is clipped, nothing fails.
    rng = np.random.default_rng(2)
    old = _normalize(rng.normal(size=(3, 2)))
    info = plots.perturbation_figure(
        old, old, old, str(tmp_path / 'a.png'), num_classes_shown=10, neighbours=10
    )
    assert sorted(info['chosen']) == [0, 1, 2]
    assert all(len(g) == 3 for g in info['groups'])
    assert info['mean_top1_old'] == pytest.approx(info['mean_top1_perturbed'])
    # Rewriting the same path replaces the file.
    plots.perturbation_figure(old, old, old, str(tmp_path / 'a.png'), neighbours=0)
    with Image.open(tmp_path / 'a.png') as im:
        im.verify()


def test_errors(tmp_path):
    old, perturbed, new = _banks()
    path = str(tmp_path / 'x.png')
    with pytest.raises(ValueError, match='same shape'):
        plots.perturbation_figure(old, perturbed[:-1], new, path)
    with pytest.raises(ValueError, match='same shape'):
        plots.perturbation_figure(old, perturbed, new[:, :-1], path)
    with pytest.raises(ValueError, match='at least 2 classes'):
        plots.perturbation_figure(old[:1], perturbed[:1], new[:1], path)
    bad = perturbed.copy()
    bad[3, 5] = np.nan
    with pytest.raises(ValueError, match='NaN'):
        plots.perturbation_figure(old, bad, new, path)
    with pytest.raises(ValueError, match=r'\(C, D\)'):
        plots.perturbation_figure(old[0], perturbed[0], new[0], path)
    with pytest.raises(ValueError, match='num_classes_shown'):
        plots.perturbation_figure(old, perturbed, new, path, num_classes_shown=0)
    assert not os.path.exists(path)


def test_no_pyplot_import(tmp_path):
    """Making a figure leaves the caller's matplotlib alone: pyplot is never imported."""
    code = (
        'import sys, numpy as np\n'
        'from bcl_jax import plots\n'
        'x = np.eye(4, 3)\n'
        f'plots.perturbation_figure(x, x, x, {str(tmp_path / "p.png")!r})\n'
        f'plots.matrix_heatmap(np.eye(2), {str(tmp_path / "m.png")!r})\n'
        'assert "matplotlib.pyplot" not in sys.modules\n'
    )
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    subprocess.run(
        [sys.executable, '-c', code],
        check=True,
        env=env,
        timeout=60,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )


# ---------------------------------------------------------------------- lifecycle figures


def _png_size(path):
    with Image.open(path) as im:
        assert im.format == 'PNG'
        im.verify()
    with Image.open(path) as im:
        return im.size


def _curve(values, test='synthetic', metric='mAP'):
    fractions = np.linspace(0, 1, len(values)).tolist()
    return {
        'test': test,
        'primary_metric': metric,
        'fractions': fractions,
        'metrics': {metric: list(values)},
        'area': None if None in values else float(np.trapezoid(values, fractions)),
    }


def _summary(gains=(0.4, 0.7), means=(None, 0.3, 0.5), metric='mAP'):
    names = [f'm{i}' for i in range(len(means))]
    return {
        'test': 'synthetic',
        'metric': metric,
        'upgrades': [
            {'from': a, 'to': b, 'update_gain': g, 'update_gain_reference': 'self'}
            for a, b, g in zip(names, names[1:], gains)
        ],
        'mean_cross_earlier': dict(zip(names, means)),
    }


def test_matrix_heatmap_png(tmp_path):
    path = str(tmp_path / 'fig' / 'matrix.png')
    plots.matrix_heatmap(
        [[0.5, None, 0.2], [0.55, 0.6, 0.1], [0.58, 0.62, 0.7]], path, metric='mAP'
    )
    # (2.6 + 0.9 N + 1.3) × (2.6 + 0.9 N) inches at 110 dpi, N = 3.
    assert _png_size(path) == (726, 583)
    assert os.listdir(tmp_path / 'fig') == ['matrix.png']  # no temporary file left
    plots.matrix_heatmap([[0.5]], path, models=['only_one_model'], percent=False)
    assert _png_size(path) == (528, 385)


def test_matrix_heatmap_bad_input(tmp_path):
    path = str(tmp_path / 'm.png')
    with pytest.raises(ValueError, match=r'square.*2 rows of lengths \[3, 3\]'):
        plots.matrix_heatmap([[1, 2, 3], [4, 5, 6]], path)
    with pytest.raises(ValueError, match=r'square.*lengths \[2, 1\]'):
        plots.matrix_heatmap([[1, 2], [3]], path)
    with pytest.raises(ValueError, match='3 model names for a 2×2 matrix'):
        plots.matrix_heatmap([[1, 2], [3, 4]], path, models=['a', 'b', 'c'])
    with pytest.raises(ValueError, match='numbers or None'):
        plots.matrix_heatmap([[1, 'x'], [3, 4]], path)
    assert not os.path.exists(path)


def test_backfill_figure_png(tmp_path):
    path = str(tmp_path / 'backfill.png')
    curves = {
        'BCT': _curve([0.41, 0.45, 0.5, 0.56, 0.61, 0.77]),
        'independent': _curve([0.06, 0.2, None, 0.5, 0.63, 0.79]),  # an undefined point: a gap
    }
    plots.backfill_figure(curves, path)
    assert _png_size(path) == (825, 550)  # 7.5 × 5 inches at 110 dpi


def test_backfill_figure_bad_input(tmp_path):
    path = str(tmp_path / 'b.png')
    short = _curve([0.1, 0.2, 0.3])
    short['metrics']['mAP'].pop()
    with pytest.raises(ValueError, match="curve 'A': 3 fractions but 2 values of mAP"):
        plots.backfill_figure({'A': short}, path)
    with pytest.raises(ValueError, match=r'differ in test'):
        plots.backfill_figure({'A': _curve([0, 1]), 'B': _curve([0, 1], test='inshop')}, path)
    with pytest.raises(ValueError, match=r'differ in primary_metric'):
        plots.backfill_figure({'A': _curve([0, 1]), 'B': _curve([0, 1], metric='R@1')}, path)
    with pytest.raises(ValueError, match='at least one curve'):
        plots.backfill_figure({}, path)
    assert not os.path.exists(path)


def test_upgrade_summary_figure_png(tmp_path):
    path = str(tmp_path / 'summary.png')
    plots.upgrade_summary_figure(
        {'BCT': _summary(), 'NDPP': _summary(gains=(0.5, None))}, path, title='lifecycle'
    )
    assert _png_size(path) == (1210, 506)  # 11 × 4.6 inches at 110 dpi


def test_upgrade_summary_figure_bad_input(tmp_path):
    path = str(tmp_path / 's.png')
    with pytest.raises(ValueError, match="'A': 1 upgrades but 3 models"):
        plots.upgrade_summary_figure({'A': _summary(gains=(0.4,))}, path)
    with pytest.raises(ValueError, match='same, nonzero number of upgrades'):
        plots.upgrade_summary_figure(
            {'A': _summary(), 'B': _summary(gains=(0.4,), means=(None, 0.3))}, path
        )
    with pytest.raises(ValueError, match='differ in metric'):
        plots.upgrade_summary_figure({'A': _summary(), 'B': _summary(metric='R@1')}, path)
    assert not os.path.exists(path)


def test_normaliser_is_the_models_own():
    """Rows come back as NumPy unit vectors; a zero row stays zero (no NaN)."""
    bank = np.array([[3.0, 4.0], [0.0, 0.0], [1e-3, 0.0]], np.float32)
    got = plots._unit_rows(bank)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    np.testing.assert_allclose(got, [[0.6, 0.8], [0, 0], [1, 0]], atol=1e-7)
