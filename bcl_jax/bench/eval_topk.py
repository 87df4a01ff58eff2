"""eval_topk: the GLDv2 retrieval search, `knn.topk` against faiss.

1,129 queries against 761,757 index embeddings, D = 512, top-100 by inner product of unit
vectors: `knn.topk` and, when `import faiss` works (requirements-test.txt), faiss-cpu
`IndexFlatIP` (exact; all cores), timed in turn. faiss's search time is the one compared (its
add, a copy of the index, is reported apart); ratio bcl_jax / faiss (target <= 1). Also: whether
both found the same neighbours (`topk_agreement`) and knn's peak extra memory (XLA's temp
buffers) against the Q × N score matrix. Without faiss, `faiss.available` is false.
~45 s and 5 GB of memory at full size. Measured numbers: docs/benchmarks.md.
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np

from bcl_jax import knn
from bcl_jax.bench.harness import random_unit_np, ratios, timed_together
from bcl_jax.bench.registry import Size, measurement, sizes

SIZES = sizes(
    'eval_topk',
    {
        'eval_queries': Size(1129, 50, 'queries (GLDv2 retrieval test: 1,129)'),
        'eval_index': Size(761757, 3000, 'index embeddings (GLDv2: 761,757)'),
        'eval_dim': Size(512, 32, 'embedding dimension'),
        'eval_k': Size(100, 10, 'neighbours per query (mAP@100)'),
        'eval_query_block': Size(1024, 32, 'knn.topk query_block'),
        'eval_gallery_block': Size(32768, 1024, 'knn.topk gallery_block'),
        'eval_repeats': Size(3, 1, 'timed runs of each tool, taken in turn'),
    },
)


def topk_agreement(scores_a, idx_a, scores_b, idx_b, tol: float = 1e-5) -> dict:
    """How far two top-k results (rows sorted by descending score) agree. Float32 scores from
    differently ordered sums differ in the last bits, so near-ties may swap: a differing index
    is `explained` when its score is within `tol` of the row's k-th score (an item at the
    cut-off), and ranks where the two differ must still agree in score within `tol`."""
    scores_a, scores_b = np.asarray(scores_a, np.float64), np.asarray(scores_b, np.float64)
    idx_a, idx_b = np.asarray(idx_a), np.asarray(idx_b)
    score_diff = np.abs(scores_a - scores_b)
    same_set, unexplained = 0, 0
    for sa, ia, sb, ib in zip(scores_a, idx_a, scores_b, idx_b, strict=True):
        only_a, only_b = np.setdiff1d(ia, ib), np.setdiff1d(ib, ia)
        if not len(only_a):
            same_set += 1
            continue
        kth = min(sa[-1], sb[-1])
        edge = np.concatenate([sa[np.isin(ia, only_a)], sb[np.isin(ib, only_b)]])
        unexplained += int(np.any(edge > kth + tol))
    q = len(idx_a)
    return {
        'queries_same_order': int(np.sum(np.all(idx_a == idx_b, axis=1))),
        'queries_same_set': same_set,
        'queries_set_differs_beyond_ties': unexplained,
        'fraction_same_set': same_set / q,
        'ranks_score_within_tol': float(np.mean(score_diff <= tol)),
        'max_score_diff': float(score_diff.max()),
        'tol': tol,
    }


def _faiss_search(index_np: np.ndarray, k: int):
    """(faiss's search function or None, what to report about faiss)."""
    try:
        import faiss
    except ImportError as e:
        return None, {'available': False, 'error': str(e)}
    faiss.omp_set_num_threads(os.cpu_count())
    start = time.perf_counter()
    flat = faiss.IndexFlatIP(index_np.shape[1])
    flat.add(index_np)
    info = {
        'available': True,
        'version': faiss.__version__,
        'threads': faiss.omp_get_max_threads(),
        'add_seconds': time.perf_counter() - start,
    }
    return (lambda x: flat.search(x, k)), info


@measurement('eval_topk')
def bench_eval_topk(cfg, results):
    """knn.topk against faiss IndexFlatIP on random unit vectors, timed in turn; agreement and
    knn's temp memory (see the module docstring)."""
    del results
    q, n, d, k = cfg['eval_queries'], cfg['eval_index'], cfg['eval_dim'], cfg['eval_k']
    queries_np, index_np = random_unit_np(0, q, d), random_unit_np(1, n, d)
    queries, index = jax.device_put(queries_np), jax.device_put(index_np)
    blocks = {'query_block': cfg['eval_query_block'], 'gallery_block': cfg['eval_gallery_block']}

    def search(qs, gs):
        return knn.topk(qs, gs, k, **blocks)

    calls = {'bcl_jax': (search, (queries, index))}
    faiss_search, faiss_out = _faiss_search(index_np, k)
    if faiss_search is not None:
        calls['faiss'] = (faiss_search, (queries_np,))
    timing = timed_together(calls, repeats=cfg['eval_repeats'])

    stats = jax.jit(search).lower(queries, index).compile().memory_analysis()
    temp = None if stats is None else int(stats.temp_size_in_bytes)
    full = 4 * q * n
    qb = knn._even_block(q, blocks['query_block'])  # knn splits Q into equal blocks
    out = dict(
        timing['bcl_jax'],
        queries=q,
        index=n,
        dim=d,
        k=k,
        **blocks,
        faiss=faiss_out,
        memory={
            'temp_bytes': temp,
            'score_block_bytes': 4 * qb * min(blocks['gallery_block'], n),
            'full_matrix_bytes': full,
            'temp_fraction_of_full': None if temp is None else temp / full,
            'index_bytes': 4 * n * d,
        },
        target_ratio=1.0,
    )
    if faiss_search is not None:
        faiss_out.update(timing['faiss'])
        ratio = ratios(timing, 'bcl_jax', 'faiss')
        scores, idx = search(queries, index)
        f_scores, f_idx = faiss_search(queries_np)
        out.update(
            ratio_to_faiss=ratio['ratio'],
            paired_ratios_to_faiss=ratio['paired_ratios'],
            agreement=topk_agreement(scores, idx, f_scores, f_idx),
        )
    return out
