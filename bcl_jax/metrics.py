"""Label-based retrieval metrics: mAP and Recall@K of queries against a labelled gallery.

Used for In-shop / SOP / CUB / Cars style evaluation (method.md §7): a gallery item is relevant
to a query when it has the same label. Similarities are dot products (embeddings are assumed
L2-normalised by the caller); each query's gallery ranking is a stable descending sort, so tied
scores rank the lower gallery index first and results are deterministic.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["average_precision", "recall_at_k", "retrieval_metrics"]


def average_precision(relevance_sorted):
    """AP of each row of a (..., N) relevance array in rank order.

    AP = mean, over the relevant items, of the precision at that item's rank. Rows without a
    relevant item get 0 (callers exclude them; see `retrieval_metrics`).
    """
    rel = jnp.asarray(relevance_sorted).astype(jnp.int32)
    hits = jnp.cumsum(rel, axis=-1)  # int32: exact counts however long the ranking
    ranks = jnp.arange(1, rel.shape[-1] + 1, dtype=jnp.float32)
    precision_sum = jnp.sum(jnp.where(rel > 0, hits / ranks, 0.0), axis=-1)
    return precision_sum / jnp.maximum(hits[..., -1], 1)


def recall_at_k(relevance_sorted, ks: Sequence[int]):
    """(..., len(ks)) float: 1 where a relevant item is among the top K (deep-metric Recall@K)."""
    rel = jnp.asarray(relevance_sorted).astype(bool)
    return jnp.stack([jnp.any(rel[..., :k], axis=-1) for k in ks], axis=-1).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("ks", "exclude_self"))
def _block_metrics(
    queries, query_labels, query_start, gallery, gallery_labels, *, ks, exclude_self
):
    """Per-query (AP, hits@ks, has_positive) for one block of queries against the gallery."""
    dtype = jnp.result_type(queries.dtype, gallery.dtype)  # dot_general wants one dtype
    queries, gallery = queries.astype(dtype), gallery.astype(dtype)
    scores = lax.dot_general(
        queries,
        gallery,
        (((1,), (1,)), ((), ())),
        precision=lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
    )
    rows = query_start + jnp.arange(queries.shape[0], dtype=jnp.int32)
    if exclude_self:
        # The query itself sinks to the end of its ranking and is never relevant, which ranks
        # the others exactly as if it had been removed.
        cols = jnp.arange(gallery.shape[0], dtype=jnp.int32)
        scores = jnp.where(rows[:, None] == cols[None, :], -jnp.inf, scores)
    order = jnp.argsort(-scores, axis=1, stable=True)
    relevant = gallery_labels[order] == query_labels[:, None]
    if exclude_self:
        relevant = relevant & (order != rows[:, None])
    return average_precision(relevant), recall_at_k(relevant, ks), jnp.any(relevant, axis=1)


def _check_embeddings(name, emb):
    if emb.ndim != 2:
        raise ValueError(f"{name} must be 2-D (items, dim); got shape {emb.shape}.")
    if emb.shape[0] == 0:
        raise ValueError(f"{name} is empty.")
    if not np.isfinite(emb).all():
        raise ValueError(f"{name} contains NaN or inf; check the model that embedded this set.")


def _label_codes(query_labels, gallery_labels):
    """Maps any labels (ints, strings) to shared int32 codes >= 0."""
    q, g = np.asarray(query_labels), np.asarray(gallery_labels)
    for name, labels in (("query_labels", q), ("gallery_labels", g)):
        if labels.ndim != 1:
            raise ValueError(f"{name} must be 1-D; got shape {labels.shape}.")
    _, codes = np.unique(np.concatenate([q, g]), return_inverse=True)
    codes = codes.reshape(-1).astype(np.int32)
    return codes[: len(q)], codes[len(q) :]


def retrieval_metrics(
    query_emb,
    query_labels,
    gallery_emb,
    gallery_labels,
    *,
    ks: Sequence[int] = (1, 5, 10),
    query_block: int = 256,
    exclude_self: bool = False,
) -> dict:
    """mAP and Recall@K of queries against a labelled gallery, over the full ranking.

    Args:
      query_emb, gallery_emb: (Q, D) and (N, D) L2-normalised embeddings.
      query_labels, gallery_labels: (Q,) and (N,) labels; relevance = equal label.
      ks: the K of Recall@K (fraction of queries with a relevant item in the top K).
      query_block: queries scored and sorted per jitted call; memory ~ query_block × N.
      exclude_self: query set == gallery set; query i is removed from its own ranking.

    Returns:
      {"mAP": float, "recall@K": float for each K, "num_queries": int (queries with at least one
      relevant gallery item, the ones averaged), "num_queries_without_positives": int}.
    """
    # Host copies: query blocks are sliced and padded freely, and the gallery goes to one
    # device whole, whatever sharding the caller's arrays had (JAX refuses sorts and uneven
    # slices along sharded axes).
    query_emb, gallery_emb = np.asarray(query_emb), np.asarray(gallery_emb)
    _check_embeddings("query_emb", query_emb)
    _check_embeddings("gallery_emb", gallery_emb)
    (num_q, dim), (num_g, gallery_dim) = query_emb.shape, gallery_emb.shape
    if dim != gallery_dim:
        raise ValueError(f"Embedding dims differ: queries have {dim}, gallery has {gallery_dim}.")
    q_codes, g_codes = _label_codes(query_labels, gallery_labels)
    if len(q_codes) != num_q or len(g_codes) != num_g:
        raise ValueError(
            f"Label counts must match embeddings: {len(q_codes)} query labels for {num_q} "
            f"queries, {len(g_codes)} gallery labels for {num_g} gallery items."
        )
    if exclude_self and (num_q != num_g or not np.array_equal(q_codes, g_codes)):
        raise ValueError(
            "exclude_self=True needs the query set to be the gallery set (same length and labels)."
        )
    ks = tuple(int(k) for k in ks)
    eligible = num_g - 1 if exclude_self else num_g
    if not ks or min(ks) < 1 or max(ks) > eligible:
        raise ValueError(
            f"Each K must be in [1, {eligible}] (the gallery size"
            f"{' minus self' if exclude_self else ''}); got ks={ks}."
        )
    if query_block < 1:
        raise ValueError(f"query_block must be >= 1; got {query_block}.")

    block = min(query_block, num_q)
    padded = -(-num_q // block) * block
    # Padded queries get label -1, which matches nothing, so they count as without positives
    # and are dropped below.
    queries = np.pad(query_emb, ((0, padded - num_q), (0, 0)))
    labels = np.pad(q_codes, (0, padded - num_q), constant_values=-1)
    gallery, gallery_codes = jnp.asarray(gallery_emb), jnp.asarray(g_codes)
    ap, hits, has_pos = [], [], []
    for start in range(0, padded, block):
        out = _block_metrics(
            queries[start : start + block],
            labels[start : start + block],
            np.int32(start),
            gallery,
            gallery_codes,
            ks=ks,
            exclude_self=exclude_self,
        )
        for acc, value in zip((ap, hits, has_pos), out):
            acc.append(np.asarray(value))
    keep = np.concatenate(has_pos)[:num_q]
    if not keep.any():
        raise ValueError("No query has a relevant gallery item (same label); check the split.")
    ap = np.concatenate(ap)[:num_q][keep].astype(np.float64)
    hits = np.concatenate(hits)[:num_q][keep].astype(np.float64)
    result = {"mAP": float(ap.mean())}
    result.update({f"recall@{k}": float(hits[:, i].mean()) for i, k in enumerate(ks)})
    result["num_queries"] = int(keep.sum())
    result["num_queries_without_positives"] = int(num_q - keep.sum())
    return result


# --------------------------------------------------------------------------------------------
# Standard ranking-based benchmark metrics (method.md §7): revisitop's compute_ap / compute_map
# for Revisited Oxford / Paris, and the GLDv2 retrieval challenge's mAP@100. These take rankings
# (database indices in ranked order) rather than embeddings, are computed on the host in float64
# with NumPy, and mirror the reference definitions so they can be swapped in for them.
# --------------------------------------------------------------------------------------------

__all__ += ["compute_ap", "compute_map", "map_at_k"]


def compute_ap(ranks, nres):
    """AP of one query from the 0-based ranks of its retrieved positives (revisitop semantics).

    Args:
      ranks: the positions (0-based, ascending, junk already removed) at which the query's
        positives appear in its ranking; positives not retrieved are simply absent.
      nres: the number of positives of the query (retrieved or not), > 0.

    Returns:
      float AP by trapezoidal interpolation of the precision-recall curve: the i-th retrieved
      positive (0-based) at position r adds (P0 + P1) / (2 * nres), with P0 = i / r (1 when
      r == 0) the precision just before it and P1 = (i + 1) / (r + 1) the precision at it.
    """
    ranks = np.asarray(ranks, dtype=np.float64).reshape(-1)
    if nres <= 0:
        raise ValueError(f"nres must be > 0; got {nres}.")
    if ranks.size == 0:
        return 0.0
    i = np.arange(ranks.size, dtype=np.float64)
    precision_0 = np.divide(i, ranks, out=np.ones_like(ranks), where=ranks > 0)
    precision_1 = (i + 1.0) / (ranks + 1.0)
    return float(np.sum((precision_0 + precision_1) / 2.0) / nres)


def compute_map(ranks, gnd, kappas=(1, 5, 10)):
    """mAP and mP@k over queries, exactly as revisitop's `compute_map` (Revisited Oxford / Paris).

    Args:
      ranks: (database_size, num_queries) int array; column q lists 0-based database indices in
        query q's ranked order (e.g. `np.argsort(-scores, axis=0)` with scores (db, queries)). It
        may be truncated to fewer rows than the database: positives below the cut count as not
        retrieved.
      gnd: sequence (one per query) of dicts with 'ok' (positives, a protocol's easy/hard sets)
        and optionally 'junk' (ignored images, removed from the ranking; missing = none) index
        lists. 'ok' is expected without duplicates; like revisitop, nres = len(ok).
      kappas: the k of mP@k.

    Returns:
      (map, aps, pr, prs) as revisitop: map, the mean AP over queries with at least one positive;
      aps (num_queries,) with NaN for queries without positives; pr (len(kappas),) the mean of
      prs over those queries; prs (num_queries, len(kappas)) with NaN rows for queries without
      positives. Per query the junk images are dropped from the ranking (each retrieved
      positive moves up by the number of junk images ranked before it), AP is `compute_ap` of
      the adjusted positions, and P@k is revisitop's `(pos < kq).sum() / kq` with
      `kq = min(max(pos) + 1, k)` over the adjusted positions pos (0 when no positive is
      retrieved; revisitop itself fails there). With no query having positives, map and pr are
      NaN.
    """
    ranks = np.asarray(ranks)
    if ranks.ndim != 2:
        raise ValueError(f"ranks must be 2-D (database_size, num_queries); got {ranks.shape}.")
    if ranks.size and not np.issubdtype(ranks.dtype, np.integer):
        raise ValueError(f"ranks must hold integer database indices; got dtype {ranks.dtype}.")
    num_q = len(gnd)
    if ranks.shape[1] != num_q:
        raise ValueError(
            f"ranks has {ranks.shape[1]} columns (queries) but gnd has {num_q} entries; ranks "
            "is (database_size, num_queries), one column per query."
        )
    kappas = tuple(int(k) for k in kappas)
    if any(k < 1 for k in kappas):
        raise ValueError(f"Each kappa must be >= 1; got {kappas}.")

    aps = np.full(num_q, np.nan, dtype=np.float64)
    prs = np.full((num_q, len(kappas)), np.nan, dtype=np.float64)
    for q in range(num_q):
        ok = np.asarray(gnd[q]["ok"]).reshape(-1)
        if ok.size == 0:
            continue
        junk = np.asarray(gnd[q].get("junk", ())).reshape(-1)
        column = ranks[:, q]
        pos = np.flatnonzero(np.isin(column, ok))
        junk_pos = np.flatnonzero(np.isin(column, junk))  # ascending
        # Junk strictly ahead of each positive (an image both ok and junk keeps its own slot).
        pos = pos - np.searchsorted(junk_pos, pos, side="left")
        aps[q] = compute_ap(pos, ok.size)
        for j, kappa in enumerate(kappas):
            if pos.size == 0:
                prs[q, j] = 0.0
            else:
                kq = min(int(pos.max()) + 1, kappa)
                prs[q, j] = np.count_nonzero(pos < kq) / kq
    valid = ~np.isnan(aps)
    if not valid.any():
        return float("nan"), aps, np.full(len(kappas), np.nan), prs
    return float(aps[valid].mean()), aps, prs[valid].mean(axis=0), prs


def map_at_k(ranks, positives, k=100):
    """GLDv2 retrieval challenge mAP@k (k = 100 there) over the queries that have ground truth.

    Args:
      ranks: (num_queries, R) array, ROW q listing the index ids retrieved for query q in
        ranked order (note: transposed relative to `compute_map`'s (database, queries) layout).
        Only the first k are scored; R < k means fewer predictions were made. An id repeated in
        a row counts once, at its first position (later copies still occupy their slots).
      positives: sequence (one per query) of the relevant index ids (set, list or array).
      k: the cut-off.

    Returns:
      (mean, aps): aps (num_queries,) float64 with AP@k = sum_{i<=k} P(i) rel(i) / min(#relevant,
      k) and NaN for queries without relevant ids; mean over the other queries (NaN if none).
    """
    ranks = np.asarray(ranks)
    if ranks.ndim != 2:
        raise ValueError(f"ranks must be 2-D (num_queries, retrieved); got shape {ranks.shape}.")
    num_q = len(positives)
    if ranks.shape[0] != num_q:
        raise ValueError(
            f"ranks has {ranks.shape[0]} rows (queries) but positives has {num_q} entries; ranks "
            "is (num_queries, retrieved), one row per query."
        )
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}.")
    aps = np.full(num_q, np.nan, dtype=np.float64)
    for q in range(num_q):
        rel = np.unique(np.asarray(list(positives[q])).reshape(-1))
        if rel.size == 0:
            continue
        top = ranks[q, :k]
        first = np.zeros(top.size, dtype=bool)
        first[np.unique(top, return_index=True)[1]] = True
        hit = np.isin(top, rel) & first
        where = np.flatnonzero(hit)
        precision = np.arange(1, where.size + 1, dtype=np.float64) / (where + 1.0)
        aps[q] = precision.sum() / min(rel.size, k)
    valid = ~np.isnan(aps)
    mean = float(aps[valid].mean()) if valid.any() else float("nan")
    return mean, aps
