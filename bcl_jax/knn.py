"""Exact top-k neighbours by dot-product similarity, blocked and optionally sharded.

Used for NDPP's prototype neighbours (METHOD.md §4) and for retrieval. The full Q×N similarity
matrix is never built: queries are processed `query_block` rows at a time and the gallery is
scanned `gallery_block` rows at a time, keeping a running top-k, so peak memory is about
query_block × gallery_block scores.

Ties are broken towards the lower gallery index, in both `topk` and `sharded_topk`.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ["topk", "sharded_topk"]


def _check_args(queries, gallery, k, exclude_self, query_block, gallery_block):
    """Validates shapes and k; returns (Q, N). Errors here beat silent garbage under jit."""
    if queries.ndim != 2 or gallery.ndim != 2:
        raise ValueError(
            f"queries and gallery must be 2-D (rows, dim); got shapes {queries.shape} and "
            f"{gallery.shape}."
        )
    (q, d_q), (n, d_g) = queries.shape, gallery.shape
    if d_q != d_g:
        raise ValueError(f"Embedding dims differ: queries have {d_q}, gallery has {d_g}.")
    if q == 0 or n == 0:
        raise ValueError(f"Empty input: {q} queries, {n} gallery rows.")
    if exclude_self and q != n:
        raise ValueError(
            f"exclude_self=True needs queries and gallery to be the same set (Q == N); got "
            f"Q={q}, N={n}."
        )
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int; got {k!r}.")
    eligible = n - 1 if exclude_self else n
    if k > eligible:
        raise ValueError(
            f"k={k} exceeds the {eligible} eligible gallery items (N={n}"
            f"{', minus self' if exclude_self else ''}); lower k."
        )
    if query_block < 1 or gallery_block < 1:
        raise ValueError(f"Block sizes must be >= 1; got {query_block}, {gallery_block}.")
    return q, n


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _merge(scores_a, idx_a, scores_b, idx_b, k):
    """Top-k of the union of two candidate lists; `a` wins ties, so pass lower indices first."""
    scores = jnp.concatenate([scores_a, scores_b], axis=1)
    idx = jnp.concatenate([idx_a, idx_b], axis=1)
    top, pos = lax.top_k(scores, k)
    return top, jnp.take_along_axis(idx, pos, axis=1)


def _blocked_topk(
    queries, gallery, k, *, query_block, gallery_block, col_offset, num_valid, exclude_self
):
    """Top-k of `queries` against a (local piece of a) gallery, by blocks.

    queries (Qp, D) and gallery (Np, D) are already padded to block multiples. Gallery row r has
    global index `col_offset + r`; global indices >= `num_valid` are padding and are masked, as
    is the pair (i, i) when `exclude_self` (query row i is global query i). Rows of the result
    may hold -inf candidates with meaningless indices when the local gallery has fewer than k
    eligible items; the caller's validation guarantees they never survive a global merge.
    """
    dtype = jnp.result_type(queries.dtype, gallery.dtype)  # dot_general wants one dtype
    queries, gallery = queries.astype(dtype), gallery.astype(dtype)
    qp, d = queries.shape
    n_qblocks, n_gblocks = qp // query_block, gallery.shape[0] // gallery_block
    q_blocks = queries.reshape(n_qblocks, query_block, d)
    g_blocks = gallery.reshape(n_gblocks, gallery_block, d)
    q_starts = jnp.arange(n_qblocks, dtype=jnp.int32) * query_block
    g_starts = col_offset + jnp.arange(n_gblocks, dtype=jnp.int32) * gallery_block
    block_k = min(k, gallery_block)

    def one_query_block(args):
        q_block, q_start = args
        rows = q_start + jnp.arange(query_block, dtype=jnp.int32)

        def block_topk(g_block, g_start):
            scores = lax.dot_general(
                q_block,
                g_block,
                (((1,), (1,)), ((), ())),
                precision=lax.Precision.HIGHEST,
                preferred_element_type=jnp.float32,
            )
            cols = g_start + jnp.arange(gallery_block, dtype=jnp.int32)
            invalid = (cols >= num_valid)[None, :]
            if exclude_self:
                invalid = invalid | (rows[:, None] == cols[None, :])
            top, pos = lax.top_k(jnp.where(invalid, -jnp.inf, scores), block_k)
            return top, cols[pos]

        def step(carry, g_args):
            return _merge(*carry, *block_topk(*g_args), k), None

        # The first block seeds the running top-k (padded to width k with -inf). Deriving the
        # carry from the data, rather than from constants, keeps its shard_map varying-axes
        # type equal to the scan output's.
        top, idx = block_topk(g_blocks[0], g_starts[0])
        pad = ((0, 0), (0, k - block_k))
        init = (jnp.pad(top, pad, constant_values=-jnp.inf), jnp.pad(idx, pad, constant_values=-1))
        (top, idx), _ = lax.scan(step, init, (g_blocks[1:], g_starts[1:]))
        return top, idx

    top, idx = lax.map(one_query_block, (q_blocks, q_starts))
    return top.reshape(qp, k), idx.reshape(qp, k)


def _unsharded(x):
    """Replicates an Explicit-sharded array (traced): JAX refuses top-k and uneven padding along
    sharded axes. No-op for unsharded arrays and Auto meshes, where the compiler decides."""
    sharding = jax.typeof(x).sharding
    if any(entry is not None for entry in sharding.spec):
        return jax.reshard(x, NamedSharding(sharding.mesh, P()))
    return x


def _pad_rows(x, rows):
    return jnp.pad(x, ((0, rows - x.shape[0]), (0, 0)))


@functools.partial(jax.jit, static_argnames=("k", "query_block", "gallery_block", "exclude_self"))
def _topk_jit(queries, gallery, *, k, query_block, gallery_block, exclude_self):
    q, n = queries.shape[0], gallery.shape[0]
    queries, gallery = _unsharded(queries), _unsharded(gallery)
    top, idx = _blocked_topk(
        _pad_rows(queries, _round_up(q, query_block)),
        _pad_rows(gallery, _round_up(n, gallery_block)),
        k,
        query_block=query_block,
        gallery_block=gallery_block,
        col_offset=0,
        num_valid=n,
        exclude_self=exclude_self,
    )
    return top[:q], idx[:q]


def topk(
    queries,
    gallery,
    k: int,
    *,
    query_block: int = 1024,
    gallery_block: int = 4096,
    exclude_self: bool = False,
):
    """Exact top-k gallery rows for each query by dot product.

    Args:
      queries: (Q, D) float array.
      gallery: (N, D) float array.
      k: neighbours per query, 1 <= k <= N (N - 1 with `exclude_self`).
      query_block, gallery_block: tile sizes; peak memory ~ query_block × gallery_block scores.
        Clamped to Q and N so tiny inputs work.
      exclude_self: queries and gallery are the same set; pair (i, i) is never returned.

    Sharded inputs are gathered onto every device; for a gallery too large for that, use
    `sharded_topk`.

    Returns:
      scores (Q, k) float32, descending, and indices (Q, k) int32 into the gallery.
    """
    q, n = _check_args(queries, gallery, k, exclude_self, query_block, gallery_block)
    return _topk_jit(
        queries,
        gallery,
        k=k,
        query_block=min(query_block, q),
        gallery_block=min(gallery_block, n),
        exclude_self=exclude_self,
    )


def _constrain(x, sharding):
    """Lays `x` out as `sharding`: `jax.reshard` for Explicit mesh axes, a constraint for Auto.

    JAX refuses the other pairings, and `jax.make_mesh` meshes are Explicit by default.
    """
    mesh = sharding.mesh
    named = [
        a
        for entry in sharding.spec
        if entry is not None
        for a in ((entry,) if isinstance(entry, str) else entry)
    ]
    type_of = dict(zip(mesh.axis_names, mesh.axis_types))
    types = [type_of[a] for a in named] if named else mesh.axis_types
    if any(t == AxisType.Explicit for t in types):
        return jax.reshard(x, sharding)
    return lax.with_sharding_constraint(x, sharding)


def _axis_size(mesh, axis) -> int:
    axes = (axis,) if isinstance(axis, str) else tuple(axis)
    missing = [a for a in axes if a not in mesh.shape]
    if missing:
        raise ValueError(f"Mesh axes {missing} not in mesh {dict(mesh.shape)}.")
    return math.prod(mesh.shape[a] for a in axes)


@functools.partial(
    jax.jit,
    static_argnames=(
        "k",
        "mesh",
        "axis",
        "exclude_self",
        "query_block",
        "gallery_block",
        "shard_rows",
    ),
)
def _sharded_topk_jit(
    queries, gallery, *, k, mesh, axis, exclude_self, query_block, gallery_block, shard_rows
):
    q, n = queries.shape[0], gallery.shape[0]
    n_shards = _axis_size(mesh, axis)
    queries = _pad_rows(_unsharded(queries), _round_up(q, query_block))
    queries = _constrain(queries, NamedSharding(mesh, P()))
    gallery = _constrain(_pad_rows(gallery, shard_rows * n_shards), NamedSharding(mesh, P(axis)))

    def local(q_rep, g_shard):
        offset = lax.axis_index(axis).astype(jnp.int32) * shard_rows
        return _blocked_topk(
            q_rep,
            g_shard,
            k,
            query_block=query_block,
            gallery_block=gallery_block,
            col_offset=offset,
            num_valid=n,
            exclude_self=exclude_self,
        )

    # Each shard's (Qp, k) candidates are concatenated along columns in shard order, so lower
    # global indices come first and the final top_k breaks ties as `topk` does.
    cand_scores, cand_idx = jax.shard_map(
        local, mesh=mesh, in_specs=(P(), P(axis)), out_specs=(P(None, axis), P(None, axis))
    )(queries, gallery)
    replicated = NamedSharding(mesh, P())
    cand_scores = _constrain(cand_scores, replicated)
    cand_idx = _constrain(cand_idx, replicated)
    top, pos = lax.top_k(cand_scores, k)
    return top[:q], jnp.take_along_axis(cand_idx, pos, axis=1)[:q]


def sharded_topk(
    queries,
    gallery,
    k: int,
    *,
    mesh: jax.sharding.Mesh,
    axis: str | Sequence[str],
    exclude_self: bool = False,
    query_block: int = 1024,
    gallery_block: int = 4096,
):
    """`topk` with the gallery sharded by rows over mesh axis `axis`; same result.

    Each device takes a local top-k over its gallery shard (with global indices), the
    (Q, n_shards × k) candidates are gathered, and one more top-k merges them. Queries are
    replicated, so this suits a large gallery (or prototype bank) and a moderate Q. N need not
    divide the number of shards: the gallery is padded and the padding masked. Works with
    Explicit (the `jax.make_mesh` default) and Auto mesh axes.

    Returns replicated scores (Q, k) float32 and indices (Q, k) int32.
    """
    q, n = _check_args(queries, gallery, k, exclude_self, query_block, gallery_block)
    if not isinstance(axis, str):
        axis = tuple(axis)
    n_shards = _axis_size(mesh, axis)
    shard_rows = -(-n // n_shards)
    gallery_block = min(gallery_block, shard_rows)
    return _sharded_topk_jit(
        queries,
        gallery,
        k=k,
        mesh=mesh,
        axis=axis,
        exclude_self=exclude_self,
        query_block=min(query_block, q),
        gallery_block=gallery_block,
        shard_rows=_round_up(shard_rows, gallery_block),
    )
