"""Label-based retrieval metrics: mAP and Recall@K of queries against a labelled gallery.

Used for In-shop / SOP / CUB / Cars style evaluation (METHOD.md §7): a gallery item is relevant
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
