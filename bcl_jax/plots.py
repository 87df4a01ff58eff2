"""Figures that show what prototype perturbation did to the old prototype bank.

`perturbation_figure` draws, once per training run, how NDPP/ODPP moved the old prototypes p to
p̃ (METHOD.md §4–§5) next to the new model's prototypes q:

1. the most crowded old classes and their nearest old neighbours, projected to 2-D by a PCA fitted
   on their old, perturbed and new prototypes, with an arrow p_c → p̃_c per class;
2. histograms of every class's top-1 cosine similarity to another prototype of the same bank
   (old, perturbed, new), on shared bins, with the means in the legend.

Matplotlib is used through `matplotlib.figure.Figure` and the Agg canvas directly: no pyplot, no
backend switch, no global state that a caller would notice. Top-1 similarities are computed in
row blocks with NumPy, so a bank of ~100k classes never needs a C×C matrix.
"""

from __future__ import annotations

import io

import numpy as np

# Row blocks for the top-1 search: at most this many rows, and at most this many similarity
# entries per block (2**25 float32 = 128 MiB), so that 100k classes take blocks of ~335 rows.
BLOCK_ROWS = 2048
BLOCK_ELEMENTS = 2**25


def _as_bank(name: str, x) -> np.ndarray:
    a = np.asarray(x, dtype=np.float32)
    if a.ndim != 2:
        raise ValueError(f'{name} must be a (C, D) array, got shape {a.shape}')
    if not np.all(np.isfinite(a)):
        raise ValueError(f'{name} contains NaN or infinite values')
    return a


def _normalize(a: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(a, axis=1, keepdims=True)
    return a / np.maximum(norm, 1e-12)


def top1_similarity(bank: np.ndarray, *, block_rows: int = BLOCK_ROWS) -> np.ndarray:
    """Each row's largest cosine similarity to another row of `bank` (C, D), self excluded.

    Computed in row blocks of at most `block_rows` rows (fewer when C is large, so that a block
    holds at most BLOCK_ELEMENTS similarities); never holds the C×C matrix.
    """
    bank = _normalize(np.asarray(bank, dtype=np.float32))
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
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    from bcl_jax.checkpoint import write_atomic

    old = _as_bank('old', old)
    perturbed = _as_bank('perturbed', perturbed)
    new = _as_bank('new', new)
    if not old.shape == perturbed.shape == new.shape:
        raise ValueError(
            'old, perturbed and new must have the same shape, got '
            f'{old.shape}, {perturbed.shape}, {new.shape}'
        )
    num_classes = old.shape[0]
    if num_classes < 2:
        raise ValueError(f'need at least 2 classes to compare prototypes, got {num_classes}')
    if num_classes_shown < 1:
        raise ValueError(f'num_classes_shown must be >= 1, got {num_classes_shown}')
    if neighbours < 0:
        raise ValueError(f'neighbours must be >= 0, got {neighbours}')
    old, perturbed, new = _normalize(old), _normalize(perturbed), _normalize(new)

    top1 = {
        'old': top1_similarity(old),
        'perturbed': top1_similarity(perturbed),
        'new': top1_similarity(new),
    }

    # Most crowded classes first; ties by the lower id (stable sort of the negated similarity).
    order = np.argsort(-top1['old'], kind='stable')
    chosen = order[: min(num_classes_shown, num_classes)]
    k = min(neighbours, num_classes - 1)
    groups = [np.concatenate([[c], _nearest(old, c, k)]) for c in chosen]

    # Each class drawn once, in the colour of the first (most crowded) group that holds it.
    shown, colour_of = [], {}
    for g, members in enumerate(groups):
        for m in members:
            if int(m) not in colour_of:
                colour_of[int(m)] = g
                shown.append(int(m))
    shown = np.asarray(shown)
    n = len(shown)
    coords, frac = _pca2(np.concatenate([old[shown], perturbed[shown], new[shown]]))
    xy_old, xy_pert, xy_new = coords[:n], coords[n : 2 * n], coords[2 * n :]
    colours = _colours(len(groups))
    chosen_set = {int(c) for c in chosen}

    fig = Figure(figsize=(13, 6), layout='constrained')
    FigureCanvasAgg(fig)
    ax_pca, ax_hist = fig.subplots(1, 2, gridspec_kw=dict(width_ratios=[1.15, 1]))

    # ---------------------------------------------------------------- panel 1: PCA
    for i, cls in enumerate(shown):
        col = colours[colour_of[int(cls)]]
        centre = int(cls) in chosen_set
        ax_pca.annotate(
            '',
            xy=xy_pert[i],
            xytext=xy_old[i],
            arrowprops=dict(
                arrowstyle='->',
                color=col,
                lw=1.6 if centre else 0.8,
                alpha=1.0 if centre else 0.6,
                shrinkA=3,
                shrinkB=3,
            ),
        )
        ax_pca.scatter(
            *xy_old[i],
            marker='o',
            s=70 if centre else 36,
            color=col,
            edgecolors='black' if centre else 'none',
            linewidths=0.8,
            zorder=3,
        )
        ax_pca.scatter(
            *xy_pert[i],
            marker='^',
            s=60 if centre else 36,
            color=col,
            edgecolors='black' if centre else 'none',
            linewidths=0.8,
            zorder=3,
        )
        ax_pca.scatter(*xy_new[i], marker='x', s=45, color=col, linewidths=1.5, zorder=3)
        if centre:
            ax_pca.annotate(
                str(int(cls)),
                xy_old[i],
                xytext=(4, 4),
                textcoords='offset points',
                fontsize=8,
                color='black',
                zorder=4,
            )
    ax_pca.set_title(
        f'Crowded classes in 2-D (PCA): {len(chosen)} most crowded, '
        f'{k} nearest old neighbours each',
        fontsize=10,
    )
    ax_pca.set_xlabel(f'PC 1 ({100 * frac[0]:.0f}% of variance)')
    ax_pca.set_ylabel(f'PC 2 ({100 * frac[1]:.0f}% of variance)')
    ax_pca.grid(True, alpha=0.3)
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
    ax_pca.legend(
        handles=handles,
        loc='upper center',
        bbox_to_anchor=(0.5, -0.11),
        ncol=2,
        fontsize=8,
        frameon=False,
    )

    # ---------------------------------------------------------------- panel 2: histograms
    allv = np.concatenate(list(top1.values()))
    lo, hi = float(allv.min()), float(allv.max())
    if hi - lo < 1e-6:
        lo, hi = lo - 0.01, hi + 0.01
    bins = np.linspace(lo, hi, int(np.clip(num_classes // 4, 10, 60)) + 1)
    means = {name: float(np.mean(v, dtype=np.float64)) for name, v in top1.items()}
    styles = {
        'old': ('tab:blue', 'old p'),
        'perturbed': ('tab:orange', 'perturbed p̃'),
        'new': ('tab:green', 'new q'),
    }
    for name, v in top1.items():
        col, label = styles[name]
        ax_hist.hist(v, bins=bins, color=col, alpha=0.35)
        ax_hist.hist(
            v,
            bins=bins,
            color=col,
            histtype='step',
            lw=1.5,
            label=f'{label} (mean {means[name]:.3f})',
        )
        ax_hist.axvline(means[name], color=col, ls='--', lw=1)
    ax_hist.set_title(f'Nearest-neighbour similarity ({num_classes} classes)', fontsize=10)
    ax_hist.set_xlabel('top-1 cosine similarity to another prototype of the same bank')
    ax_hist.set_ylabel('number of classes')
    ax_hist.grid(True, alpha=0.3)
    ax_hist.legend(
        loc='upper center', bbox_to_anchor=(0.5, -0.11), ncol=3, fontsize=8, frameon=False
    )
    if title:
        fig.suptitle(title)

    buf = io.BytesIO()
    fig.savefig(buf, format='png', dpi=110)
    write_atomic(path, buf.getvalue())

    return dict(
        chosen=[int(c) for c in chosen],
        groups=[[int(m) for m in g] for g in groups],
        mean_top1_old=means['old'],
        mean_top1_perturbed=means['perturbed'],
        mean_top1_new=means['new'],
        num_classes=int(num_classes),
    )
