"""Retrieval evaluation of old and new models: old/old, new/new and new/old (method.md §7).

Each model embeds the query and the gallery set once; every test is then a pair of embedding
sets. new/old ("cross-test") searches the old gallery with new queries: the deployment without
backfilling that bcl_jax exists for. The update gain puts new/old on the scale from old/old (0)
to an independently trained new model's new/new (1).
"""

from __future__ import annotations

import json
import os
import platform

import jax
import numpy as np

from bcl_jax import checkpoint, lifecycle, plots, stats
from bcl_jax.embed import embed_tests
from bcl_jax.lifecycle import update_gain
from bcl_jax.old_embeddings import GivenEmbeddings


def _flat_metrics(tests, embeddings_per_test, eval_cfg) -> dict:
    """Every test's metrics in one flat dict, keys prefixed '<test>/' when there are several."""
    out = {}
    for test, (queries, gallery) in zip(tests, embeddings_per_test):
        prefix = f'{test.name}/' if len(tests) > 1 else ''
        metrics_ = test.score(queries, queries if gallery is None else gallery, eval_cfg)
        # None for an undefined metric (e.g. a GLDv2 usage without queries): strict JSON.
        out.update({prefix + k: float(v) if np.isfinite(v) else None for k, v in metrics_.items()})
    return out


def cross(new, old):
    """New queries against the old gallery (or the old embeddings of a self-searching set)."""
    return [(nq, og if og is not None else oq) for (nq, _), (oq, og) in zip(new, old)]


def evaluate(
    old, new_models: dict, data, *, mesh, eval_cfg, predecessors=None, orders=None
) -> dict:
    """Each model embeds the test sets once; then `score`."""
    models = {'old': old, **new_models}
    embeddings = {
        name: embed_tests(m, data.tests, mesh=mesh, batch_size=eval_cfg.batch_size, name=name)
        for name, m in models.items()
    }
    kw = dict(eval_cfg=eval_cfg, predecessors=predecessors, orders=orders, models=models)
    return score(embeddings, new_models, data, **kw)


def score(
    embeddings: dict,
    new_models: dict,
    data,
    *,
    eval_cfg,
    old_name: str = 'old',
    predecessors=None,
    orders=None,
    models=None,
) -> dict:
    """Metrics of old/old and, per new model, new/new and new/old, plus update gains; with
    `eval_cfg.matrix`, the compatibility matrix of every pair of models, and with
    `eval_cfg.backfill`, the backfill curve of every compatible new model against its
    predecessor (`predecessors`: name -> the model it was trained against; default: the old
    model; `orders`: see `backfill_curves`).

    `embeddings`: name -> `embed_tests` output, the old model (`old_name`) first. The primary
    metric, which decides `compatible` and the update gain, is the first column of the first
    test (e.g. mAP on the built-in benchmark, Medium mAP on ROxford for GLDv2).
    """
    tests = data.tests
    old_old = _flat_metrics(tests, embeddings[old_name], eval_cfg)
    columns = []
    for t in tests:  # a test's own columns, else all its metrics but the counts
        prefix = f'{t.name}/' if len(tests) > 1 else ''
        mine = [k for k in old_old if k.startswith(prefix) and '/num_' not in '/' + k]
        columns += [prefix + c for c in t.columns] if t.columns else mine
    primary = columns[0]
    results = dict(
        primary_metric=primary,
        columns=columns,
        tests={t.name: t.protocol for t in tests},
        old_old=old_old,
        methods={},
    )
    for name, model in new_models.items():
        results['methods'][name] = dict(
            new_new=_flat_metrics(tests, embeddings[name], eval_cfg),
            new_old=_flat_metrics(tests, cross(embeddings[name], embeddings[old_name]), eval_cfg),
            train_seconds=model.seconds,
            **model.notes,
        )
    reference = results['methods'].get('independent')
    for r in results['methods'].values():
        new_old, before = r['new_old'][primary], old_old[primary]
        defined = None not in (new_old, before)
        r['compatible'] = new_old > before if defined else None
        r['update_gain'] = (
            update_gain(new_old, before, reference['new_new'][primary])
            if defined and reference and reference['new_new'][primary] is not None
            else None
        )
    if len(embeddings) > 1 and eval_cfg.matrix:
        results['matrix'] = lifecycle.compatibility_matrix(tests, embeddings, eval_cfg)
    if new_models and eval_cfg.backfill:
        predecessors = {n: (predecessors or {}).get(n, old_name) for n in new_models}
        results['backfill'] = backfill_curves(
            embeddings, tests, eval_cfg, predecessors, orders or {}, models or {}
        )
    return results


def backfill_curves(embeddings, tests, eval_cfg, predecessors, orders, models) -> dict:
    """The backfill curve (bcl_jax.lifecycle) on the first test of each new model whose
    queries search its predecessor's gallery better than the predecessor's own (it is
    compatible: a deployment would backfill from it), in a random order
    (`eval_cfg.backfill_seed`), and in the order its method gives (`orders`: name ->
    `(old model, old gallery embeddings) -> order`, e.g. Hot-refresh's most uncertain first;
    `models`: name -> model, for those orders)."""
    test, curves = tests[0], {}
    for name, before in predecessors.items():
        (new_q, new_g), (old_q, old_g) = embeddings[name][0], embeddings[before][0]
        gallery = old_q if old_g is None else old_g
        self_test = test.score(old_q, gallery, eval_cfg)
        metric = lifecycle.primary_metric(test, self_test)
        if not test.score(new_q, gallery, eval_cfg)[metric] > self_test[metric]:
            continue
        kw = dict(fractions=tuple(eval_cfg.backfill_fractions), seed=eval_cfg.backfill_seed)
        label = f'{name} vs {before}'
        curves[label] = lifecycle.backfill_curve(test, new_q, gallery, new_g, eval_cfg, **kw)
        order = orders.get(name)
        given = None if order is None else order(models[before], gallery)
        if given is not None:
            curves[f'{label}, {order.__name__}'] = lifecycle.backfill_curve(
                test, new_q, gallery, new_g, eval_cfg, order=given, **kw
            )
    return dict(test=test.name, curves=curves)


def aggregate(per_seed: list[dict]) -> dict:
    """Mean and standard deviation (ddof=1) over seeds of every number in the results, the
    paired comparisons of the methods (bcl_jax.stats), the seeds, the benchmark and the
    machine."""

    def combine(values, reducer):
        first = values[0]
        if isinstance(first, dict):
            return {k: combine([v[k] for v in values], reducer) for k in first}
        if isinstance(first, bool) or first is None or isinstance(first, str):
            return first if all(v == first for v in values) else None
        if any(v is None for v in values):  # undefined in some seed: undefined over seeds
            return None
        return float(reducer(np.asarray(values, np.float64)))

    keys = ('old_old', 'methods')
    std = lambda x: x.std(ddof=1) if len(x) > 1 else 0.0
    return dict(
        **{k: per_seed[0][k] for k in ('primary_metric', 'columns', 'tests')},
        **{k: combine([r[k] for r in per_seed], np.mean) for k in keys},
        std={k: combine([r[k] for r in per_seed], std) for k in keys},
        paired=stats.paired_analysis(per_seed, per_seed[0]['primary_metric']),
        benchmark=per_seed[0]['benchmark'],
        **{k: per_seed[0][k] for k in ('note',) if k in per_seed[0]},
        seeds=[r['config']['seed'] for r in per_seed],
        machine=per_seed[0]['machine'],
    )


def lifecycle_markdown(results: dict) -> str:
    """The compatibility matrix on the headline metric and the backfill curves' areas."""
    out, matrix = '', results.get('matrix')
    if matrix:
        test, metric = matrix['primary']['test'], matrix['primary']['metric']
        values, names = matrix['tests'][test]['metrics'][metric], matrix['models']
        cell = lambda v: '' if v is None else f'{100 * v:.2f}'
        out += f'\nCompatibility matrix, {test} {metric} (row: query model, column: gallery):\n\n'
        out += '| query \\ gallery | ' + ' | '.join(names) + ' |\n'
        out += '|' + '---|' * (len(names) + 1) + '\n'
        out += ''.join(
            f'| {n} | ' + ' | '.join(map(cell, row)) + ' |\n' for n, row in zip(names, values)
        )
    curves = (results.get('backfill') or {}).get('curves')
    if curves:
        out += f'\nBackfill curves ({results["backfill"]["test"]}): area under the curve, and the '
        out += 'largest dip below the chord from new/old to new/new (points):\n\n'
        out += '| model | area | dip |\n|---|---|---|\n'
        pct = lambda v: '' if v is None else f'{100 * v:.2f}'
        for label, c in curves.items():
            out += f'| {label} | {pct(c["area"])} | {pct(c["max_dip_below_chord"])} |\n'
    return out


def markdown(results: dict) -> str:
    """The results table: the tests' columns as percentages (± std over seeds)."""
    std = results.get('std')
    keys = results['columns']

    def cell(value, spread, scale=100.0, digits=2):
        if value is None:
            return ''
        return f'{scale * value:.{digits}f}' + (f' ± {scale * spread:.{digits}f}' if std else '')

    def row(name, test, m, s, gain='', seconds=''):
        return (
            '| '
            + ' | '.join([name, test] + [cell(m[k], s and s[k]) for k in keys] + [gain, seconds])
            + ' |'
        )

    lines = [
        '| model | test | ' + ' | '.join(keys) + ' | update gain | train s |',
        '|' + '---|' * (len(keys) + 4),
        row('old', 'old/old', results['old_old'], std and std['old_old']),
    ]
    for name, r in results['methods'].items():
        rs = std and std['methods'][name]
        lines.append(
            row(
                name,
                'new/new',
                r['new_new'],
                rs and rs['new_new'],
                seconds=cell(r['train_seconds'], rs and rs['train_seconds'], 1, 0),
            )
        )
        lines.append(
            row(
                name,
                'new/old',
                r['new_old'],
                rs and rs['new_old'],
                gain=cell(r['update_gain'], rs and rs['update_gain'], 1, 3),
            )
        )
    return '\n'.join(lines) + '\n'


def describe_data(data) -> str:
    """One line for the log: the dataset, its splits and its tests."""
    tests = ', '.join(
        f'{t.name} ({len(t.query)} queries'
        + ('' if t.gallery is None else f', {len(t.gallery)} gallery images')
        + ')'
        for t in data.tests
    )
    return (
        f'{data.description}: {data.num_classes} classes, {len(data.train)} training images '
        f'(old model: {data.old_train.num_classes} classes, {len(data.old_train)} images); '
        f'tests: {tests}'
    )


def describe_model(model, checkpoint_dir: str = '') -> dict:
    """What results.json records of a model: its weights' digest, the step it was taken at and,
    for a given checkpoint, where it came from."""
    out = dict(identity=model.identity(), step=model.step, total_steps=model.total_steps)
    if isinstance(model, GivenEmbeddings):
        out.update(model.describe())
    if checkpoint_dir:
        out['checkpoint'] = checkpoint_dir
    return out


def machine() -> str:
    return (
        f'{platform.machine()} {os.cpu_count()} cores, '
        f'{jax.device_count()} {jax.devices()[0].platform} device(s)'
    )


def write_figures(results: dict, workdir: str):
    """compatibility_<test>.png (each test's headline metric), backfill.png and, with upgrades,
    upgrades.png (the update gain of each upgrade, the cross-test over earlier galleries)."""
    matrix = results.get('matrix')
    if matrix:
        for test, cell in matrix['tests'].items():
            metric = next(iter(cell['metrics']))
            if test == matrix['primary']['test']:
                metric = matrix['primary']['metric']
            plots.matrix_heatmap(
                cell['metrics'][metric],
                os.path.join(workdir, f'compatibility_{test}.png'),
                models=matrix['models'],
                metric=metric,
                title=f'{test}: query model (row) against gallery model (column)',
            )
        chain = ['old', *results.get('upgrades', [])]
        if len(chain) > 2:
            sub = lifecycle.submatrix(matrix, chain)
            summary = lifecycle.upgrade_summary(sub, **matrix['primary'])
            results['upgrade_summary'] = summary
            plots.upgrade_summary_figure(
                {'chain': summary}, os.path.join(workdir, 'upgrades.png'), title=' → '.join(chain)
            )
    selection = results.get('selection')
    if selection:
        fraction = results['paired']['fraction']
        plots.dose_response_figure(
            selection, os.path.join(workdir, 'dose_response.png'), fraction=fraction
        )
    curves = (results.get('backfill') or {}).get('curves')
    if curves:
        plots.backfill_figure(
            curves, os.path.join(workdir, 'backfill.png'), title=results['backfill']['test']
        )


def write_results(results: dict, workdir: str):
    """results.json, results.md and the figures in `workdir` (process 0, atomically); prints
    the tables."""
    if jax.process_index() == 0:
        write_figures(results, workdir)
    table = markdown(results) + lifecycle_markdown(results)
    if results.get('note'):
        table = f'**{results["note"]}**\n\n{table}'
    if results.get('paired'):
        table += '\nPaired by seed (method − reference, 95% CI):\n\n' + stats.paired_markdown(
            results['paired']
        )
        fraction = results['paired']['fraction']
        if results.get('selection'):
            table += '\n' + stats.selection_markdown(results['selection'], fraction)
        if results.get('confirmation'):
            table += '\n' + stats.confirmatory_markdown(results['confirmation'], fraction)
    if jax.process_index() == 0:
        checkpoint.write_atomic(
            os.path.join(workdir, 'results.json'), json.dumps(results, indent=1, allow_nan=False)
        )
        checkpoint.write_atomic(os.path.join(workdir, 'results.md'), table)
    print(table, flush=True)
