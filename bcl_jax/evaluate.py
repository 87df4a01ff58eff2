"""Retrieval evaluation of old and new models: old/old, new/new and new/old (METHOD.md §7).

Each model embeds the query and the gallery set once; every test is then a pair of embedding
sets. new/old ("cross-test") searches the old gallery with new queries: the deployment without
backfilling that bcl_jax exists for. The update gain puts new/old on the scale from old/old (0)
to an independently trained new model's new/new (1).
"""

from __future__ import annotations

import numpy as np
from jax.experimental import multihost_utils

from bcl_jax import metrics
from bcl_jax.data import pipeline

PRIMARY_METRIC = 'mAP'


def embed_batches(model, source, *, mesh, batch_size: int):
    """Yields (embeddings, labels, valid) global arrays, batch by batch, sharded over the mesh."""
    embed_fn = model.embed_fn(mesh)
    for batch, valid in pipeline.eval_batches(source, global_batch=batch_size):
        batch = pipeline.to_global(dict(batch, valid=valid), mesh)
        yield (
            embed_fn(model.params, model.batch_stats, batch['image']),
            batch['label'],
            batch['valid'],
        )


def embed(model, source, *, mesh, batch_size: int) -> np.ndarray:
    """(N, D) float32 embeddings of the whole source, in order, on every host."""
    chunks = []
    for emb, _, valid in embed_batches(model, source, mesh=mesh, batch_size=batch_size):
        emb, valid = multihost_utils.process_allgather((emb, valid), tiled=True)
        chunks.append(np.asarray(emb)[np.asarray(valid)])
    return np.concatenate(chunks)


def update_gain(new_old: float, old_old: float, reference_new_new: float) -> float | None:
    """(new/old − old/old) / (new*/new* − old/old); None when the reference does not beat old/old."""
    denominator = reference_new_new - old_old
    return float((new_old - old_old) / denominator) if denominator > 0 else None


def evaluate(old, new_models: dict, data, *, mesh, eval_cfg) -> dict:
    """Metrics of old/old and, per method, new/new and new/old, plus update gains."""

    def embeddings(model):
        return tuple(
            embed(model, s, mesh=mesh, batch_size=eval_cfg.batch_size)
            for s in (data.query, data.gallery)
        )

    def test(queries, gallery):
        m = metrics.retrieval_metrics(
            queries,
            np.asarray(data.query.labels),
            gallery,
            np.asarray(data.gallery.labels),
            ks=tuple(eval_cfg.ks),
            query_block=eval_cfg.query_block,
        )
        return {k: float(v) for k, v in m.items()}

    old_q, old_g = embeddings(old)
    results = dict(primary_metric=PRIMARY_METRIC, old_old=test(old_q, old_g), methods={})
    for name, model in new_models.items():
        new_q, new_g = embeddings(model)
        results['methods'][name] = dict(
            new_new=test(new_q, new_g), new_old=test(new_q, old_g), train_seconds=model.seconds
        )
    reference = results['methods'].get('independent')
    for r in results['methods'].values():
        r['compatible'] = r['new_old'][PRIMARY_METRIC] > results['old_old'][PRIMARY_METRIC]
        r['update_gain'] = (
            None
            if reference is None
            else update_gain(
                r['new_old'][PRIMARY_METRIC],
                results['old_old'][PRIMARY_METRIC],
                reference['new_new'][PRIMARY_METRIC],
            )
        )
    return results


def aggregate(per_seed: list[dict]) -> dict:
    """Mean and standard deviation (ddof=1) over seeds of every number in the results."""

    def combine(values, reducer):
        first = values[0]
        if isinstance(first, dict):
            return {k: combine([v[k] for v in values], reducer) for k in first}
        if isinstance(first, bool) or first is None or isinstance(first, str):
            return first if all(v == first for v in values) else None
        return float(reducer(np.asarray(values, np.float64)))

    keys = ('old_old', 'methods')
    std = lambda x: x.std(ddof=1) if len(x) > 1 else 0.0
    return dict(
        primary_metric=per_seed[0]['primary_metric'],
        **{k: combine([r[k] for r in per_seed], np.mean) for k in keys},
        std={k: combine([r[k] for r in per_seed], std) for k in keys},
    )


def markdown(results: dict) -> str:
    """The results table: the primary metric and Recall@K as percentages (± std over seeds)."""
    std = results.get('std')
    keys = [PRIMARY_METRIC] + sorted(
        (k for k in results['old_old'] if k.startswith('recall@')),
        key=lambda k: int(k.split('@')[1]),
    )

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
