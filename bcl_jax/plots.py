"""Figures: what prototype perturbation did to the old bank, and the upgrade lifecycle.

`perturbation_figure` draws, once per training run, how NDPP/ODPP moved the old prototypes p to
p̃ (method.md §4–§5) next to the new model's prototypes q:

1. the most crowded old classes and their nearest old neighbours, projected to 2-D by a PCA fitted
   on their old, perturbed and new prototypes, with an arrow p_c → p̃_c per class;
2. histograms of every class's top-1 cosine similarity to another prototype of the same bank
   (old, perturbed, new), on shared bins, with the means in the legend.

The lifecycle figures (method.md §10) draw what `bcl_jax.lifecycle` computes:
`matrix_heatmap` one compatibility matrix, `backfill_figure` backfill curves of several methods,
`upgrade_summary_figure` the update gains and the mean cross-test over earlier galleries.

Matplotlib is used through `matplotlib.figure.Figure` and the Agg canvas directly: no pyplot, no
backend switch, no global state that a caller would notice. Top-1 similarities are computed in
row blocks with NumPy, so a bank of ~100k classes never needs a C×C matrix. Every PNG is written
atomically (temporary file, then rename) at DPI dots per inch, so its pixel size is the figure
size in inches × DPI.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np

from bcl_jax.data.storage import write_atomic

# Row blocks for the top-1 search: at most this many rows, and at most this many similarity
# entries per block (2**25 float32 = 128 MiB), so that 100k classes take blocks of ~335 rows.
BLOCK_ROWS = 2048
BLOCK_ELEMENTS = 2**25
DPI = 110


def _as_bank(name: str, x) -> np.ndarray:
    a = np.asarray(x, dtype=np.float32)
    if a.ndim != 2:
        raise ValueError(f'{name} must be a (C, D) array, got shape {a.shape}')
    if not np.all(np.isfinite(a)):
        raise ValueError(f'{name} contains NaN or infinite values')
    return a


def _unit_rows(a: np.ndarray) -> np.ndarray:
    """(C, D) NumPy rows over their L2 norm, zero rows left zero: `heads.l2_normalize`'s
    formula, x / max(||x||, 1e-12), in NumPy (a figure needs no flax)."""
    a = np.asarray(a, np.float32)
    return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), np.float32(1e-12))


def top1_similarity(bank: np.ndarray, *, block_rows: int = BLOCK_ROWS) -> np.ndarray:
    """Each row's largest cosine similarity to another row of `bank` (C, D), self excluded.

    Computed in row blocks of at most `block_rows` rows (fewer when C is large, so that a block
    holds at most BLOCK_ELEMENTS similarities); never holds the C×C matrix.
    """
    bank = _unit_rows(np.asarray(bank, dtype=np.float32))
    c = bank.shape[0]
    if c < 2:
        raise ValueError(f'top-1 similarity needs at least 2 rows, got {c}')
    rows = max(1, min(block_rows, BLOCK_ELEMENTS // c))
    out = np.empty(c, dtype=np.float32)
    for start in range(0, c, rows):
        stop = min(start + rows, c)
        sims = bank[start:stop] @ bank.T
        idx = np.arange(stop - start)
        sims[idx, start + idx] = -np.inf
        out[start:stop] = sims.max(axis=1)
    return out


def _nearest(bank: np.ndarray, c: int, k: int) -> np.ndarray:
    """The k rows of `bank` nearest to row c (self excluded), most similar first, ties by id."""
    sims = bank @ bank[c]
    sims[c] = -np.inf
    return np.argsort(-sims, kind='stable')[:k]


def _pca2(points: np.ndarray):
    """2-D PCA of `points` (N, D): centred, via SVD. Returns (N, 2) coords, variance fractions."""
    centred = points.astype(np.float64) - points.mean(axis=0, dtype=np.float64)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    comps = vt[:2]
    # A fixed sign per component (largest loading positive), so reruns draw the same picture.
    signs = np.sign(comps[np.arange(len(comps)), np.argmax(np.abs(comps), axis=1)])
    comps = comps * np.where(signs == 0, 1.0, signs)[:, None]
    coords = centred @ comps.T
    var = s**2
    frac = var[:2] / var.sum() if var.sum() > 0 else np.zeros(len(comps))
    if coords.shape[1] < 2:  # D == 1: a flat second axis
        coords = np.concatenate([coords, np.zeros((len(coords), 2 - coords.shape[1]))], axis=1)
        frac = np.concatenate([frac, np.zeros(2 - len(frac))])
    return coords, frac


def _colours(n: int):
    from matplotlib import colormaps

    if n <= 10:
        cmap = colormaps['tab10']
        return [cmap(i) for i in range(n)]
    cmap = colormaps['turbo']
    return [cmap(x) for x in np.linspace(0.05, 0.95, n)]


def _figure(figsize):
    """A Figure on its own Agg canvas (no pyplot), constrained layout."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout='constrained')
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig, path: str):
    """Renders `fig` at DPI and writes it to `path` atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format='png', dpi=DPI)
    write_atomic(path, buf.getvalue())


# ------------------------------------------------------------------------ perturbation figure


@dataclasses.dataclass
class _PerturbationNumbers:
    """What the perturbation figure shows, computed before anything is drawn."""

    old: np.ndarray  # the three banks, rows L2-normalised
    perturbed: np.ndarray
    new: np.ndarray
    top1: dict  # bank name -> (C,) top-1 cosine similarity to another row of the same bank
    means: dict  # bank name -> mean of top1
    chosen: np.ndarray  # the most crowded old classes, most crowded first
    groups: list  # per chosen class: its id, then its nearest old neighbours
    neighbours: int  # neighbours drawn per chosen class (clipped to C - 1)


def _checked_banks(old, perturbed, new, num_classes_shown: int, neighbours: int):
    old, perturbed, new = (_as_bank(n, b) for n, b in zip(_BANKS, (old, perturbed, new)))
    if not old.shape == perturbed.shape == new.shape:
        raise ValueError(
            'old, perturbed and new must have the same shape, got '
            f'{old.shape}, {perturbed.shape}, {new.shape}'
        )
    if old.shape[0] < 2:
        raise ValueError(f'need at least 2 classes to compare prototypes, got {old.shape[0]}')
    if num_classes_shown < 1:
        raise ValueError(f'num_classes_shown must be >= 1, got {num_classes_shown}')
    if neighbours < 0:
        raise ValueError(f'neighbours must be >= 0, got {neighbours}')
    return _unit_rows(old), _unit_rows(perturbed), _unit_rows(new)


_BANKS = ('old', 'perturbed', 'new')


def perturbation_numbers(
    old, perturbed, new, *, num_classes_shown: int = 6, neighbours: int = 4
) -> _PerturbationNumbers:
    """The numbers of `perturbation_figure` (its Args and Raises), without drawing."""
    banks = _checked_banks(old, perturbed, new, num_classes_shown, neighbours)
    top1 = {name: top1_similarity(bank) for name, bank in zip(_BANKS, banks)}
    num_classes = len(banks[0])
    # Most crowded classes first; ties by the lower id (stable sort of the negated similarity).
    chosen = np.argsort(-top1['old'], kind='stable')[: min(num_classes_shown, num_classes)]
    k = min(neighbours, num_classes - 1)
    return _PerturbationNumbers(
        *banks,
        top1=top1,
        means={name: float(np.mean(v, dtype=np.float64)) for name, v in top1.items()},
        chosen=chosen,
        groups=[np.concatenate([[c], _nearest(banks[0], c, k)]) for c in chosen],
        neighbours=k,
    )


def _shown_classes(groups):
    """Each class once, in the order met, with the index of the first (most crowded) group
    that holds it: that group's colour is the class's colour."""
    shown, colour_of = [], {}
    for g, members in enumerate(groups):
        for m in members:
            if int(m) not in colour_of:
                colour_of[int(m)] = g
                shown.append(int(m))
    return np.asarray(shown), colour_of


def _pca_legend(ax):
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], marker='o', ls='none', color='grey', label='old prototype p'),
        Line2D([], [], marker='^', ls='none', color='grey', label='perturbed p̃ (arrow p → p̃)'),
        Line2D([], [], marker='x', ls='none', color='grey', mew=1.5, label='new prototype q'),
        Line2D(
            [],
            [],
            marker='o',
            ls='none',
            color='white',
            mec='black',
            label='chosen class (id shown)',
        ),
    ]
    ax.legend(
        handles=handles,
        loc='upper center',
        bbox_to_anchor=(0.5, -0.11),
        ncol=2,
        fontsize=8,
        frameon=False,
    )


def _pca_panel(ax, nums: _PerturbationNumbers):
    """Chosen classes and their neighbours in 2-D: p (circle) → p̃ (triangle), q (cross)."""
    shown, colour_of = _shown_classes(nums.groups)
    n = len(shown)
    coords, frac = _pca2(np.concatenate([nums.old[shown], nums.perturbed[shown], nums.new[shown]]))
    xy_old, xy_pert, xy_new = coords[:n], coords[n : 2 * n], coords[2 * n :]
    colours = _colours(len(nums.groups))
    chosen_set = {int(c) for c in nums.chosen}
    for i, cls in enumerate(shown):
        col = colours[colour_of[int(cls)]]
        centre = int(cls) in chosen_set
        arrow = {'arrowstyle': '->', 'color': col, 'shrinkA': 3, 'shrinkB': 3}
        arrow.update({'lw': 1.6, 'alpha': 1.0} if centre else {'lw': 0.8, 'alpha': 0.6})
        ax.annotate('', xy=xy_pert[i], xytext=xy_old[i], arrowprops=arrow)
        edge = {'color': col, 'edgecolors': 'black' if centre else 'none', 'linewidths': 0.8}
        ax.scatter(*xy_old[i], marker='o', s=70 if centre else 36, zorder=3, **edge)
        ax.scatter(*xy_pert[i], marker='^', s=60 if centre else 36, zorder=3, **edge)
        ax.scatter(*xy_new[i], marker='x', s=45, color=col, linewidths=1.5, zorder=3)
        if centre:
            ax.annotate(
                str(int(cls)),
                xy_old[i],
                xytext=(4, 4),
                textcoords='offset points',
                fontsize=8,
                color='black',
                zorder=4,
            )
    ax.set_title(
        f'Crowded classes in 2-D (PCA): {len(nums.chosen)} most crowded, '
        f'{nums.neighbours} nearest old neighbours each',
        fontsize=10,
    )
    ax.set_xlabel(f'PC 1 ({100 * frac[0]:.0f}% of variance)')
    ax.set_ylabel(f'PC 2 ({100 * frac[1]:.0f}% of variance)')
    ax.grid(True, alpha=0.3)
    _pca_legend(ax)


def _histogram_panel(ax, nums: _PerturbationNumbers):
    """Histograms of the three banks' top-1 similarities on shared bins, means dashed."""
    num_classes = len(nums.old)
    allv = np.concatenate(list(nums.top1.values()))
    lo, hi = float(allv.min()), float(allv.max())
    if hi - lo < 1e-6:
        lo, hi = lo - 0.01, hi + 0.01
    bins = np.linspace(lo, hi, int(np.clip(num_classes // 4, 10, 60)) + 1)
    styles = {
        'old': ('tab:blue', 'old p'),
        'perturbed': ('tab:orange', 'perturbed p̃'),
        'new': ('tab:green', 'new q'),
    }
    for name, v in nums.top1.items():
        col, label = styles[name]
        mean = nums.means[name]
        ax.hist(v, bins=bins, color=col, alpha=0.35)
        ax.hist(
            v, bins=bins, color=col, histtype='step', lw=1.5, label=f'{label} (mean {mean:.3f})'
        )
        ax.axvline(mean, color=col, ls='--', lw=1)
    ax.set_title(f'Nearest-neighbour similarity ({num_classes} classes)', fontsize=10)
    ax.set_xlabel('top-1 cosine similarity to another prototype of the same bank')
    ax.set_ylabel('number of classes')
    ax.grid(True, alpha=0.3)
    ax.legend(loc='upper center', bbox_to_anchor=(0.5, -0.11), ncol=3, fontsize=8, frameon=False)


def perturbation_figure(
    old,
    perturbed,
    new,
    path: str,
    *,
    num_classes_shown: int = 6,
    neighbours: int = 4,
    title: str = '',
) -> dict:
    """Writes a PNG showing what prototype perturbation did; returns the numbers it shows.

    Args:
      old, perturbed, new: (C, D) prototype banks — old prototypes p, perturbed old prototypes
        p̃, new-model prototypes q — L2-normalised (rows are normalised again here, so cosine
        similarities are exact either way; an all-zero row stays zero).
      path: where the PNG goes; written atomically (temp file + rename).
      num_classes_shown: how many of the most crowded classes (largest top-1 cosine similarity to
        another old prototype; ties broken by the lower class id) to draw in the PCA panel.
      neighbours: how many nearest old neighbours to draw with each chosen class.
      title: the figure's title.

    Returns:
      dict with `chosen` (class ids, most crowded first), `groups` (per chosen class: its id then
      its neighbours' ids), `mean_top1_old`, `mean_top1_perturbed`, `mean_top1_new` (the mean over
      classes of the top-1 cosine similarity to another prototype of the same bank) and
      `num_classes`. Plain Python ints/floats, ready for a JSON log.

    Raises:
      ValueError: banks not 2-D, of different shapes, with NaN/inf, or with fewer than 2 classes;
        num_classes_shown < 1 or neighbours < 0.
    """
    nums = perturbation_numbers(
        old, perturbed, new, num_classes_shown=num_classes_shown, neighbours=neighbours
    )
    fig = _figure((13, 6))
    ax_pca, ax_hist = fig.subplots(1, 2, gridspec_kw={'width_ratios': [1.15, 1]})
    _pca_panel(ax_pca, nums)
    _histogram_panel(ax_hist, nums)
    if title:
        fig.suptitle(title)
    _save_png(fig, path)
    return dict(
        chosen=[int(c) for c in nums.chosen],
        groups=[[int(m) for m in g] for g in nums.groups],
        **{f'mean_top1_{name}': nums.means[name] for name in _BANKS},
        num_classes=len(nums.old),
    )


# ---------------------------------------------------------------------- lifecycle figures

HEATMAP_INCHES_PER_MODEL = 0.9  # the heatmap is (2.6 + 0.9 N + 1.3) × (2.6 + 0.9 N) inches
BACKFILL_INCHES = (7.5, 5.0)
UPGRADE_SUMMARY_INCHES = (11.0, 4.6)


def _phi(k: int) -> str:
    """φ_k, typeset (mathtext) as a subscript."""
    return f'$\\varphi_{{{k}}}$'


def _defined(values, what: str) -> np.ndarray:
    """float64 array of `values`, NaN where a value is None (undefined)."""
    try:
        return np.array([np.nan if v is None else float(v) for v in values], np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f'{what} must hold numbers or None ({e}).') from e


def _square(matrix) -> np.ndarray:
    rows = list(matrix)
    lengths = [len(r) for r in rows]
    if not rows or any(n != len(rows) for n in lengths):
        raise ValueError(
            f'matrix must be square (N×N, row = query model, column = gallery model); got '
            f'{len(rows)} rows of lengths {lengths}.'
        )
    return np.stack([_defined(r, 'matrix') for r in rows])


def _annotate_cells(ax, im, values: np.ndarray, digits: int):
    """Each cell's value (— where undefined), white on dark colours and black on light."""
    for (i, j), v in np.ndenumerate(values):
        dark = np.isfinite(v) and im.norm(v) < 0.55  # viridis is dark at its low end
        text = f'{v:.{digits}f}' if np.isfinite(v) else '—'
        ax.text(j, i, text, ha='center', va='center', fontsize=10, color='white' if dark else 'k')


def matrix_heatmap(
    matrix, path: str, *, models=None, metric: str = '', title: str = '', percent: bool = True
):
    """Writes the N×N compatibility matrix of one test and metric as an annotated heatmap.

    Row a, column b is M(φ_a queries, φ_b gallery) (`lifecycle.compatibility_matrix`); the
    diagonal (each model's self-test) is boxed, cells below it are upgrades searching earlier
    galleries. `models`: the N names (default φ_1 … φ_N); `percent`: values shown ×100; None
    cells are grey with '—'.
    """
    from matplotlib import colormaps
    from matplotlib.patches import Rectangle

    values = _square(matrix) * (100.0 if percent else 1.0)
    n = len(values)
    rotate = models is not None and max(map(len, map(str, models)), default=0) > 6  # slant long
    models = [_phi(i + 1) for i in range(n)] if models is None else [str(m) for m in models]
    if len(models) != n:
        raise ValueError(f'{len(models)} model names for a {n}×{n} matrix.')
    finite = values[np.isfinite(values)]
    lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    side = 2.6 + HEATMAP_INCHES_PER_MODEL * n
    fig = _figure((side + 1.3, side))
    ax = fig.subplots()
    cmap = colormaps['viridis'].with_extremes(bad='lightgrey')
    im = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=lo, vmax=hi)
    _annotate_cells(ax, im, values, digits=1 if percent else 3)
    for i in range(n):
        ax.add_patch(Rectangle((i - 0.5, i - 0.5), 1, 1, fill=False, ec='black', lw=2))
    ax.set_xticks(
        range(n), models, rotation=30 if rotate else 0, ha='right' if rotate else 'center'
    )
    ax.set_yticks(range(n), models)
    ax.set_xlabel('gallery embedded by')
    ax.set_ylabel('queries embedded by')
    unit = ' (%)' if percent else ''
    fig.colorbar(im, ax=ax, shrink=0.8, label=f'{metric}{unit}')
    ax.set_title(title or f'Compatibility matrix: {metric}\n(boxed: self-tests)', fontsize=10)
    _save_png(fig, path)


def _curve_values(label: str, curve: dict, metric: str):
    x = np.asarray(curve['fractions'], np.float64)
    y = _defined(curve['metrics'][metric], f'curve {label!r}')
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(
            f'curve {label!r}: {len(x)} fractions but {len(y)} values of {metric}; give one '
            'value per fraction (at least two).'
        )
    return x, y


def _one(curves: dict, key: str) -> str:
    found = {c[key] for c in curves.values()}
    if len(found) != 1:
        raise ValueError(f'the curves differ in {key} ({sorted(found)}); draw one per figure.')
    return found.pop()


def backfill_figure(curves: dict, path: str, *, title: str = ''):
    """Writes backfill curves (`lifecycle.backfill_curve` results), one line per method.

    `curves`: method label -> curve, all of one test and primary metric. x = percentage of the
    gallery re-embedded by the new model, y = the metric (%); each curve's chord from new/old
    to new/new is dashed in its colour (a compatible model stays above it, method.md §10).
    """
    from matplotlib.lines import Line2D

    if not curves:
        raise ValueError('backfill_figure needs at least one curve.')
    test, metric = _one(curves, 'test'), _one(curves, 'primary_metric')
    fig = _figure(BACKFILL_INCHES)
    ax = fig.subplots()
    for (label, curve), colour in zip(curves.items(), _colours(len(curves))):
        x, y = _curve_values(label, curve, metric)
        area = curve.get('area')
        name = label if area is None else f'{label} (area {100 * area:.1f})'
        ax.plot(100 * x, 100 * y, marker='o', ms=4, color=colour, label=name)
        ax.plot(100 * x[[0, -1]], 100 * y[[0, -1]], ls='--', lw=1, color=colour, alpha=0.8)
    handles, _ = ax.get_legend_handles_labels()
    chord = Line2D([], [], ls='--', lw=1, color='grey', label='chord new/old → new/new')
    ax.legend(handles=[*handles, chord], fontsize=8, loc='lower right')
    ax.set_xlim(0, 100)
    ax.set_xlabel('gallery re-embedded by the new model (%)')
    ax.set_ylabel(f'{metric} (%), new queries')
    ax.grid(True, alpha=0.3)
    ax.set_title(title or f'Backfill curves on {test}', fontsize=10)
    _save_png(fig, path)


def _summary_series(summaries: dict):
    """(upgrades, models, gains, means): per method, update gains per upgrade (k → k+1) and the
    mean cross-test over earlier galleries per model φ_2 … φ_N, NaN where undefined."""
    lengths = {label: len(s['upgrades']) for label, s in summaries.items()}
    for label, s in summaries.items():
        if len(s['mean_cross_earlier']) != lengths[label] + 1:
            raise ValueError(
                f'summary {label!r}: {lengths[label]} upgrades but '
                f'{len(s["mean_cross_earlier"])} models; N models make N - 1 upgrades.'
            )
    if len(set(lengths.values())) != 1 or 0 in lengths.values():
        raise ValueError(f'the summaries need the same, nonzero number of upgrades; got {lengths}.')
    n = lengths.popitem()[1] + 1
    upgrades = [f'{_phi(k)} → {_phi(k + 1)}' for k in range(1, n)]
    gains = {
        label: _defined([u['update_gain'] for u in s['upgrades']], f'summary {label!r}')
        for label, s in summaries.items()
    }
    means = {
        label: _defined(list(s['mean_cross_earlier'].values())[1:], f'summary {label!r}')
        for label, s in summaries.items()
    }
    return upgrades, [_phi(k) for k in range(2, n + 1)], gains, means


def _grouped_bars(ax, groups: list, series: dict, digits: int):
    """One group of bars per x position, one bar per series, values written on the bars."""
    width = 0.8 / len(series)
    for i, ((label, values), colour) in enumerate(zip(series.items(), _colours(len(series)))):
        x = np.arange(len(groups)) + (i - (len(series) - 1) / 2) * width
        bars = ax.bar(x, np.nan_to_num(values), width, color=colour, label=label)
        texts = [f'{v:.{digits}f}' if np.isfinite(v) else 'n/a' for v in values]
        ax.bar_label(bars, labels=texts, fontsize=8, padding=2)
    ax.set_xticks(range(len(groups)), groups)
    ax.grid(True, axis='y', alpha=0.3)


def upgrade_summary_figure(summaries: dict, path: str, *, title: str = ''):
    """Writes the update gain of each upgrade and each model's mean cross-test over the earlier
    galleries (`lifecycle.upgrade_summary`), one bar colour per method.

    `summaries`: method label -> summary, all with the same number of upgrades and the same
    test and metric; models are named by position (φ_1 first), since each method's names differ.
    """
    if not summaries:
        raise ValueError('upgrade_summary_figure needs at least one summary.')
    test, metric = _one(summaries, 'test'), _one(summaries, 'metric')
    upgrades, models, gains, means = _summary_series(summaries)
    kinds = {u['update_gain_reference'] for s in summaries.values() for u in s['upgrades']}
    reference = {'self': "the upgrade's own self-test", 'independent': 'independent models'}
    fig = _figure(UPGRADE_SUMMARY_INCHES)
    ax_gain, ax_cross = fig.subplots(1, 2)
    _grouped_bars(ax_gain, upgrades, gains, digits=2)
    for level in (0.0, 1.0):
        ax_gain.axhline(level, color='k', lw=0.8, ls='-' if level == 0 else ':')
    ax_gain.set_ylabel('update gain')
    ax_gain.set_title(
        'Update gain (new/old − old/old) / (reference − old/old)\nreference: '
        + (reference[kinds.pop()] if len(kinds) == 1 else 'mixed (see the summaries)'),
        fontsize=10,
    )
    _grouped_bars(ax_cross, models, {k: 100 * v for k, v in means.items()}, digits=1)
    ax_cross.set_ylabel(f'{metric} (%)')
    ax_cross.set_title('Mean cross-test over the earlier galleries', fontsize=10)
    ax_gain.legend(fontsize=8, loc='upper left')
    for ax in (ax_gain, ax_cross):
        ax.margins(y=0.15)
    fig.suptitle(title or f'Upgrades on {test}: {metric}', fontsize=11)
    _save_png(fig, path)


# ------------------------------------------------------------------------ dose-response figure


def dose_response_figure(selection: dict, path: str, *, fraction: bool = True, title: str = ''):
    """Writes the dose–response figure of a strength selection (`stats.select_strength`): per
    method, the mean paired Δnew/new and Δnew/old against BCT with their CIs as a function of
    the strength ρ (nearest-neighbour distances); the chosen ρ circled."""
    methods = selection['methods']
    if not methods:
        raise ValueError('dose_response_figure needs at least one method with strength arms.')
    scale = 100.0 if fraction else 1.0
    fig = _figure((10, 4))
    axes = fig.subplots(1, 2, sharex=True)
    for ax, test, label in zip(axes, ('new_new', 'new_old'), ('new/new', 'new/old')):
        for (method, s), colour in zip(methods.items(), _colours(len(methods))):
            rho = np.array([r['rho'] for r in s['arms']])
            diffs = [r[test] for r in s['arms']]
            mean = scale * np.array([d['mean'] for d in diffs])
            low = [d['ci_low'] if d['ci_low'] is not None else d['mean'] for d in diffs]
            high = [d['ci_high'] if d['ci_high'] is not None else d['mean'] for d in diffs]
            err = scale * np.abs(np.array([low, high]) - np.array([d['mean'] for d in diffs]))
            ax.errorbar(
                rho, mean, yerr=err, marker='o', ms=4, capsize=3, color=colour, label=method
            )
            chosen = [i for i, r in enumerate(s['arms']) if r['rho'] == s['chosen']]
            ax.plot(rho[chosen], mean[chosen], 'o', ms=11, mfc='none', color=colour)
        ax.axhline(0.0, color='grey', lw=1, ls='--')
        ax.set_xlabel('strength ρ (nearest-neighbour distances)')
        ax.set_ylabel(f'Δ{label} vs BCT ({"points" if fraction else "metric"}), 95% CI')
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title or f'Dose–response: {selection["metric"]} against BCT', fontsize=10)
    _save_png(fig, path)
