"""The upgrade lifecycle (method.md §10): the compatibility matrix of models φ_1 … φ_N and the
backfill curve of one upgrade, both computed from embeddings only (no model is run here).

Every number comes from a test's own `score(query_emb, gallery_emb, eval_cfg)` (the protocol of
`bcl_jax.data.RetrievalTest`), so a cell of the matrix or a point of a curve is scored exactly as
`evaluate.evaluate` scores old/old, new/new and new/old. Results are strict-JSON dicts: plain
ints and floats, None for an undefined value (e.g. a metric without eligible queries).
"""

from __future__ import annotations

import hashlib
import itertools
import math

import numpy as np

DEFAULT_FRACTIONS = tuple(i / 10 for i in range(11))  # 0, 0.1, …, 1


def update_gain(new_old: float, old_old: float, reference_new_new: float) -> float | None:
    """(new/old − old/old) / (new*/new* − old/old); None when the reference does not beat old/old."""
    denominator = reference_new_new - old_old
    return float((new_old - old_old) / denominator) if denominator > 0 else None


def _json_number(value):
    """An int stays an int, a finite float becomes a float, anything else (NaN, inf) None."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    value = float(value)
    return value if math.isfinite(value) else None


def primary_metric(test, metrics: dict) -> str:
    """A test's headline metric: its first column, else its first metric that is not a count.

    The rule of `evaluate.evaluate` (which takes the first test's headline as the run's primary
    metric); a count is a key with a path segment starting with 'num_'.
    """
    if test.columns:
        return test.columns[0]
    for key in metrics:
        if '/num_' not in '/' + key:
            return key
    raise ValueError(f'test {test.name!r} reports only counts ({sorted(metrics)}); no metric.')


# ------------------------------------------------------------------------ compatibility matrix


def _check_embeddings(tests, embeddings: dict):
    if not embeddings:
        raise ValueError('embeddings is empty: give at least one model (name -> per-test pairs).')
    for name, pairs in embeddings.items():
        if len(pairs) != len(tests):
            raise ValueError(
                f'model {name!r} has {len(pairs)} (query, gallery) pairs for {len(tests)} tests; '
                'give one pair per test, in the order of the tests.'
            )
        for test, (_, gallery) in zip(tests, pairs):
            if (gallery is None) != (test.gallery is None):
                raise ValueError(
                    f'model {name!r}, test {test.name!r}: the test '
                    + (
                        'searches its query set (gallery None), but a gallery was given.'
                        if test.gallery is None
                        else 'has a gallery, but its gallery embeddings are None.'
                    )
                )


def _test_matrices(test, index: int, embeddings: dict, eval_cfg) -> dict:
    """{metric: N×N list} of one test: row a = a's queries, column b = b's gallery."""
    names = list(embeddings)
    cells = {}
    for a in names:
        queries = embeddings[a][index][0]
        for b in names:
            query_b, gallery_b = embeddings[b][index]
            # A self-searching test: b's "gallery" is b's embeddings of the query set, and the
            # test's score excludes each query from its own ranking (by index) as for old/old.
            cells[a, b] = test.score(queries, query_b if gallery_b is None else gallery_b, eval_cfg)
    keys = list(cells[names[0], names[0]])
    for (a, b), metrics in cells.items():
        if list(metrics) != keys:
            raise ValueError(
                f'test {test.name!r}: queries of {a!r} against the gallery of {b!r} gave metrics '
                f'{list(metrics)}, other cells {keys}.'
            )
    return {k: [[_json_number(cells[a, b][k]) for b in names] for a in names] for k in keys}


def upgrade_summary(matrix: dict, *, test: str, metric: str, references: dict | None = None):
    """The standard one-number summaries of a compatibility matrix, on one test and metric.

    Per upgrade φ_k → φ_{k+1} (consecutive models in `matrix['models']`), with M = the matrix:
      old_old = M[k][k], new_old = M[k+1][k] (new queries, the previous gallery), new_new =
      M[k+1][k+1]; compatible = new_old > old_old (BCT's criterion, method.md §7); update_gain =
      (new_old − old_old) / (R − old_old) (BCT, Shen et al. CVPR 2020; `update_gain`),
      with R = references[φ_{k+1}] (the self-test of an independently trained model of that
      step, as method.md §7 defines it) when given, else R = new_new, the upgrade's own
      self-test: then the gain is the share of the full-backfill improvement that the upgrade
      delivers with no backfill at all (the start of its backfill curve on the scale from
      old/old to new/new). `update_gain_reference` says which ('independent' or 'self').
    Per model φ_k: mean_cross_earlier = mean over j < k of M[k][j], its queries against every
      earlier gallery (None for φ_1). UniBCT's and AdvBCT's multi-model tables (Zhang et al.
      2022; Pan et al. CVPR 2023) list these lower-triangle cells one by one; the mean is
      bcl_jax's one-number summary of a row.
    Any undefined (None) input makes the derived value None.
    """
    names = matrix['models']
    values = matrix['tests'][test]['metrics'][metric]
    references = references or {}
    unknown = set(references) - set(names)
    if unknown:
        raise ValueError(f'references name models {sorted(unknown)} not in the matrix {names}.')
    upgrades = []
    for k in range(len(names) - 1):
        old_old, new_old, new_new = values[k][k], values[k + 1][k], values[k + 1][k + 1]
        kind = 'independent' if names[k + 1] in references else 'self'
        reference = references.get(names[k + 1], new_new)
        defined = None not in (old_old, new_old)
        upgrades.append(
            {
                'from': names[k],
                'to': names[k + 1],
                'old_old': old_old,
                'new_old': new_old,
                'new_new': new_new,
                'compatible': new_old > old_old if defined else None,
                'update_gain': (
                    update_gain(new_old, old_old, reference)
                    if defined and reference is not None
                    else None
                ),
                'update_gain_reference': kind,
            }
        )
    mean_cross = {}
    for k, name in enumerate(names):
        row = values[k][:k]
        mean_cross[name] = float(np.mean(row)) if row and None not in row else None
    return {
        'test': test,
        'metric': metric,
        'upgrades': upgrades,
        'mean_cross_earlier': mean_cross,
    }


def compatibility_matrix(tests, embeddings: dict, eval_cfg, *, references=None) -> dict:
    """M[a][b] = test.score(φ_a's queries, φ_b's gallery) for every model pair, test and metric.

    Args:
      tests: the `RetrievalTest`s (`data.build(...).tests`).
      embeddings: model name -> one (query_emb, gallery_emb or None) pair per test, as
        `evaluate.evaluate` builds them; the dict's order is the upgrade order φ_1 … φ_N.
      eval_cfg: passed to every test's score (e.g. ks, query_block).
      references: optional model name -> independently trained self-test of that step on the
        primary metric, for the update gain (see `upgrade_summary`).

    Returns:
      {'models': names in order, 'primary': {'test', 'metric'}, 'tests': {name: {'protocol',
      'self_search', 'metrics': {metric: N×N nested list, row = query model, column = gallery
      model, None where undefined}}}, 'summary': `upgrade_summary` on the primary metric (the
      first test's headline, as in `evaluate.evaluate`)}.
    """
    tests = list(tests)
    if not tests:
        raise ValueError('compatibility_matrix needs at least one test.')
    _check_embeddings(tests, embeddings)
    out = {'models': list(embeddings), 'tests': {}}
    for index, test in enumerate(tests):
        out['tests'][test.name] = {
            'protocol': test.protocol,
            'self_search': test.gallery is None,
            'metrics': _test_matrices(test, index, embeddings, eval_cfg),
        }
    first = tests[0].name
    metric = primary_metric(tests[0], out['tests'][first]['metrics'])
    out['primary'] = {'test': first, 'metric': metric}
    out['summary'] = upgrade_summary(out, test=first, metric=metric, references=references)
    return out


# ------------------------------------------------------------------------------ backfill curve


def _check_fractions(fractions) -> list[float]:
    fractions = [float(x) for x in fractions]
    if len(fractions) < 2 or fractions[0] != 0.0 or fractions[-1] != 1.0:
        raise ValueError(
            f'fractions must start at 0 and end at 1 (the curve runs from new/old to new/new); '
            f'got {fractions}.'
        )
    if any(b <= a for a, b in itertools.pairwise(fractions)):
        raise ValueError(f'fractions must be strictly increasing; got {fractions}.')
    return fractions


def _backfill_order(order, size: int, seed: int):
    """(row order, its record): a given permutation of range(size), else a seeded random one."""
    if order is None:
        return np.random.default_rng(seed).permutation(size), {'kind': 'random', 'seed': seed}
    order = np.asarray(order)
    if (
        order.ndim != 1
        or not np.issubdtype(order.dtype, np.integer)
        or not np.array_equal(np.sort(order), np.arange(size))
    ):
        raise ValueError(
            f'order must be a permutation of the {size} gallery rows (0 … {size - 1}); got '
            f'shape {order.shape}, dtype {order.dtype}.'
        )
    digest = hashlib.sha256(order.astype('<i8').tobytes()).hexdigest()
    return order, {'kind': 'given', 'sha256': digest}


def _check_backfill_arrays(test, new_query, old_gallery, new_gallery):
    if old_gallery.ndim != 2 or old_gallery.shape != new_gallery.shape:
        raise ValueError(
            f'old_gallery and new_gallery must be (N, D) arrays of one shape (the same gallery '
            f'rows); got {old_gallery.shape} and {new_gallery.shape}.'
        )
    if new_query.ndim != 2 or new_query.shape[1] != old_gallery.shape[1]:
        raise ValueError(
            f'new_query must be (Q, {old_gallery.shape[1]}) like the galleries; got '
            f'{new_query.shape}. The old and new models must share the embedding space.'
        )
    if test.gallery is None and len(new_query) != len(old_gallery):
        raise ValueError(
            f'test {test.name!r} searches its query set, so the gallery is the query set: '
            f'{len(new_query)} queries but {len(old_gallery)} gallery rows.'
        )


def _chord_dip(fractions, values):
    """(largest dip of the curve below the chord M(0) → M(1), the fraction where it is).

    Only interior points count (the ends lie on the chord); (0.0, None) when the curve never
    goes below it, (None, None) when a value is undefined.
    """
    if None in values:
        return None, None
    start, end = values[0], values[-1]
    dips = [start + x * (end - start) - m for x, m in zip(fractions[1:-1], values[1:-1])]
    if not dips or max(dips) <= 0:
        return 0.0, None
    i = int(np.argmax(dips))
    return float(dips[i]), fractions[i + 1]


def backfill_curve(
    test,
    new_query,
    old_gallery,
    new_gallery,
    eval_cfg,
    *,
    fractions=DEFAULT_FRACTIONS,
    order=None,
    seed: int = 0,
) -> dict:
    """The metric of new queries against a gallery re-embedded by the new model in part.

    The gallery starts as the old model's embeddings; at fraction x the first round(x·N) rows of
    `order` (half up) carry the new model's embeddings instead, and the new queries search this
    mixed gallery (hot-refresh, Zhang et al. ICLR 2022; method.md §10). Nothing is re-embedded:
    the rows come from `old_gallery` and `new_gallery`. x = 0 is new/old, x = 1 is new/new.

    Args:
      test: a `RetrievalTest`; when it searches its query set (gallery None), the galleries are
        the old and new models' embeddings of the query set and each query is excluded from its
        own ranking by the test's score, as in the compatibility matrix.
      new_query: (Q, D) new-model query embeddings.
      old_gallery, new_gallery: (N, D) the same gallery rows embedded by the old and new model;
        new_gallery may be None for a self-searching test (then it is new_query).
      eval_cfg: passed to the test's score.
      fractions: strictly increasing, from 0 to 1.
      order: a permutation of range(N), the order of re-embedding (e.g. most uncertain first);
        default a random permutation from `np.random.default_rng(seed)`.
      seed: the random order's seed (recorded).

    Returns:
      {'test', 'primary_metric', 'gallery_size', 'fractions', 'num_backfilled' (rows per
      fraction), 'metrics' ({metric: value per fraction}), 'area' (trapezoid of the primary
      metric on [0, 1]), 'order' ({'kind': 'random', 'seed'} or {'kind': 'given', 'sha256' of
      the int64 order}), 'max_dip_below_chord', 'max_dip_at'}; None where undefined.
    """
    fractions = _check_fractions(fractions)
    new_query, old_gallery = np.asarray(new_query), np.asarray(old_gallery)
    if new_gallery is None:
        if test.gallery is not None:
            raise ValueError(f'test {test.name!r} has a gallery: new_gallery is required.')
        new_gallery = new_query
    new_gallery = np.asarray(new_gallery)
    _check_backfill_arrays(test, new_query, old_gallery, new_gallery)
    size = len(old_gallery)
    order, order_record = _backfill_order(order, size, seed)

    mixed = old_gallery.astype(np.result_type(old_gallery, new_gallery), copy=True)
    counts, results, done = [], [], 0
    for x in fractions:  # increasing, so each step only swaps in the next rows of `order`
        count = math.floor(x * size + 0.5)
        rows = order[done:count]
        mixed[rows] = new_gallery[rows]
        done = count
        counts.append(count)
        results.append(test.score(new_query, mixed, eval_cfg))
    metrics = {k: [_json_number(r[k]) for r in results] for k in results[0]}
    primary = primary_metric(test, metrics)
    values = metrics[primary]
    area = None if None in values else float(np.trapezoid(values, fractions))
    dip, dip_at = _chord_dip(fractions, values)
    return {
        'test': test.name,
        'primary_metric': primary,
        'gallery_size': size,
        'fractions': fractions,
        'num_backfilled': counts,
        'metrics': metrics,
        'area': area,
        'order': order_record,
        'max_dip_below_chord': dip,
        'max_dip_at': dip_at,
    }


def submatrix(matrix: dict, names: list) -> dict:
    """The compatibility matrix of the models `names` (in that order) only."""
    index = [matrix['models'].index(n) for n in names]
    tests = {
        test: dict(
            cell,
            metrics={
                m: [[rows[i][j] for j in index] for i in index]
                for m, rows in cell['metrics'].items()
            },
        )
        for test, cell in matrix['tests'].items()
    }
    return dict(matrix, models=list(names), tests=tests)
