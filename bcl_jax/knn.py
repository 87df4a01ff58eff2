"""Exact top-k neighbours by dot-product similarity, blocked and optionally sharded.

Used for NDPP's prototype neighbours (method.md §4) and for retrieval. The full Q×N similarity
matrix is never built: queries are processed in equal blocks of at most `query_block` rows and
the gallery is scanned `gallery_block` rows at a time, in place (never copied whole), keeping a
running top-k, so peak memory is a few query_block × gallery_block score blocks and
gallery_block × D gallery blocks (XLA's temporaries for the GLDv2 search, 1,129 × 761,757 at
D = 512 with blocks of 1,024 × 32,768: 220 MB, against 3.4 GB for Q×N; see docs/benchmarks.md).

On CPU, XLA's TopK runs on one thread, so wide score blocks are cut down by an exact group-max
pre-filter before it (`_block_candidates`); other platforms select from whole blocks.

One entry, `topk`, searches on one device or, given a mesh, with the gallery sharded by rows
(`sharded_topk` is the same call with a mesh required). Ties are broken towards the lower
gallery index, with or without a mesh.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from bcl_jax.sharding import ceil_div, pad_rows, padded

__all__ = ["axis_size", "sharded_topk", "topk"]


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


def _even_block(n: int, max_block: int, multiple: int = 1) -> int:
    """The block that splits n rows into as few equal blocks of about <= max_block as possible,
    rounded up to `multiple`: 1,129 queries with max_block 1,024 give 2 blocks of 565, not
    1,024 + 105 padded to 2 × 1,024 (which would nearly double the work); 81,313 rows with
    max_block 32,768 and multiple 8 give 3 blocks of 27,112 rather than padding to 98,304."""
    return padded(ceil_div(n, ceil_div(n, max_block)), multiple)


# Columns per group in the top-k pre-filter. 16 (one AVX-512 register of float32) measured
# fastest end to end at the GLDv2 shapes: 8 was ~10% slower (XLA:CPU's max over a minor axis of
# 8 is ~4x slower than over 16), 32 ~4% slower.
_GROUP = 16


def _block_candidates(scores, first_col, threshold, k):
    """A few columns of each row of a score block that surely hold its top-k, as (scores, cols).

    Used on CPU only (unmeasured elsewhere). XLA:CPU's TopK is one thread and costs ~1-2 ns per element, so a wide block is first cut
    to the columns of the k groups of `_GROUP` adjacent columns with the largest maxima (a
    vectorised, multi-threaded max), kept in column order. Exact, ties included: an item of a
    group left out is beaten by the maxima of k chosen groups, each larger, or equal and then
    to its left. Groups whose maximum is <= `threshold` (the running k-th best, (rows, 1)) are
    set to -inf first: their items cannot enter, as the running top-k holds k items >= the
    threshold at lower indices; few groups then pass, and the top-k over the group maxima does
    little heap work. Narrow blocks (< 2 k groups) are returned whole.
    """
    rows, width = scores.shape
    if width % _GROUP or width < 2 * k * _GROUP:
        cols = first_col + jnp.arange(width, dtype=jnp.int32)
        return scores, jnp.broadcast_to(cols, scores.shape)
    grouped = scores.reshape(rows, width // _GROUP, _GROUP)
    maxima = jnp.max(grouped, axis=2)
    maxima = jnp.where(maxima > threshold, maxima, -jnp.inf)
    _, groups = lax.top_k(maxima, k)
    groups = jnp.sort(groups, axis=1)
    cand = jnp.take_along_axis(grouped, groups[:, :, None], axis=1).reshape(rows, k * _GROUP)
    in_group = jnp.arange(_GROUP, dtype=jnp.int32)
    cand_cols = first_col + groups[:, :, None] * _GROUP + in_group
    return cand, cand_cols.reshape(rows, k * _GROUP)


def _blocked_topk(
    queries, gallery, k, *, query_block, gallery_block, col_offset, num_valid, exclude_self, vary
):
    """Top-k of `queries` against a (local piece of a) gallery, by blocks.

    queries (Qp, D) are padded to a multiple of `query_block`. The gallery (Ng, D), Ng >=
    `gallery_block`, is not padded (a copy would double its memory): blocks are sliced in
    place, and when `gallery_block` does not divide Ng the last block is the window ending at
    row Ng, its rows already seen masked. Gallery row r has global index `col_offset + r`;
    global indices >= `num_valid` (None: no padding) are padding and are masked, as is the pair
    (i, i) when `exclude_self` (query row i is global query i). Blocks that need no mask get
    none (a mask costs ~15% at D = 512). `vary` types the initial carry as the loop's output
    (shard_map's varying axes). Rows of the result may hold -inf candidates with
    meaningless indices when the local gallery has fewer than k eligible items; the caller's
    validation guarantees they never survive a global merge.

    A running top-k is kept per query row; each block's pre-filtered candidates
    (`_block_candidates`) are appended after it, so one top-k both selects and merges, and
    ties go to the lower gallery index.
    """
    dtype = jnp.result_type(queries.dtype, gallery.dtype)  # dot_general wants one dtype
    queries, gallery = queries.astype(dtype), gallery.astype(dtype)
    qp, d = queries.shape
    n_local = gallery.shape[0]
    n_qblocks, n_gblocks = qp // query_block, ceil_div(n_local, gallery_block)
    q_blocks = queries.reshape(n_qblocks, query_block, d)
    q_starts = jnp.arange(n_qblocks, dtype=jnp.int32) * query_block
    in_block = jnp.arange(gallery_block, dtype=jnp.int32)

    def one_query_block(args):
        q_block, q_start = args
        rows = q_start + jnp.arange(query_block, dtype=jnp.int32)

        def step(j, carry, masked):
            first = j * gallery_block  # first row not seen yet
            start = jnp.minimum(first, n_local - gallery_block)
            scores = lax.dot_general(
                q_block,
                lax.dynamic_slice_in_dim(gallery, start, gallery_block),
                (((1,), (1,)), ((), ())),
                precision=lax.Precision.HIGHEST,
                preferred_element_type=jnp.float32,
            )
            cols = col_offset + start + in_block
            if masked:
                invalid = (start + in_block < first)[None, :]
                if num_valid is not None:
                    invalid = invalid | (cols >= num_valid)[None, :]
                if exclude_self:
                    invalid = invalid | (rows[:, None] == cols[None, :])
                scores = jnp.where(invalid, -jnp.inf, scores)
            return lax.platform_dependent(
                scores,
                carry,
                cpu=functools.partial(merge, first_col=cols[0], prefilter=True),
                default=functools.partial(merge, first_col=cols[0], prefilter=False),
            )

        def merge(scores, carry, first_col, prefilter):
            if prefilter:
                cand, cand_cols = _block_candidates(scores, first_col, carry[0][:, -1:], k)
            else:
                cand = scores
                cand_cols = jnp.broadcast_to(first_col + in_block, scores.shape)
            cand = jnp.concatenate([carry[0], cand], axis=1)
            cand_cols = jnp.concatenate([carry[1], cand_cols], axis=1)
            top, pos = lax.top_k(cand, k)
            return top, jnp.take_along_axis(cand_cols, pos, axis=1)

        init = (
            vary(jnp.full((query_block, k), -jnp.inf, jnp.float32)),
            vary(jnp.full((query_block, k), -1, jnp.int32)),
        )
        n_full = n_local // gallery_block
        mask_all = exclude_self or num_valid is not None
        carry = lax.fori_loop(0, n_full, functools.partial(step, masked=mask_all), init)
        if n_full < n_gblocks:  # the last window, overlapping the block before it
            carry = step(n_full, carry, masked=True)
        return carry

    top, idx = lax.map(one_query_block, (q_blocks, q_starts))
    return top.reshape(qp, k), idx.reshape(qp, k)


def _unsharded(x):
    """Replicates an Explicit-sharded array (traced): JAX refuses top-k and uneven padding along
    sharded axes. No-op for unsharded arrays and Auto meshes, where the compiler decides."""
    sharding = jax.typeof(x).sharding
    if any(entry is not None for entry in sharding.spec):
        return jax.reshard(x, NamedSharding(sharding.mesh, P()))
    return x


@functools.partial(jax.jit, static_argnames=("k", "query_block", "gallery_block", "exclude_self"))
def _topk_jit(queries, gallery, *, k, query_block, gallery_block, exclude_self):
    q = queries.shape[0]
    queries, gallery = _unsharded(queries), _unsharded(gallery)
    top, idx = _blocked_topk(
        pad_rows(queries, padded(q, query_block)),
        gallery,
        k,
        query_block=query_block,
        gallery_block=gallery_block,
        col_offset=0,
        num_valid=None,
        exclude_self=exclude_self,
        vary=lambda x: x,
    )
    return top[:q], idx[:q]


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


def axis_size(mesh, axis) -> int:
    """The number of devices along mesh axis `axis` (a name or a sequence of names)."""
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
    n_shards = axis_size(mesh, axis)
    queries = pad_rows(_unsharded(queries), padded(q, query_block))
    queries = _constrain(queries, NamedSharding(mesh, P()))
    gallery = _constrain(pad_rows(gallery, shard_rows * n_shards), NamedSharding(mesh, P(axis)))

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
            vary=lambda x: lax.pcast(x, axis, to="varying"),
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


def topk(
    queries,
    gallery,
    k: int,
    *,
    query_block: int = 1024,
    gallery_block: int = 4096,
    exclude_self: bool = False,
    mesh: jax.sharding.Mesh | None = None,
    axis: str | Sequence[str] | None = None,
):
    """Exact top-k gallery rows for each query by dot product.

    Without `mesh`, one blocked search; sharded inputs are gathered onto every device. With
    `mesh`, the gallery is sharded by rows over mesh axis `axis` (default: all mesh axes):
    each device takes a local top-k over its gallery shard (with global indices), the
    (Q, n_shards × k) candidates are gathered, and one more top-k merges them; same result.
    Queries are replicated, so this suits a large gallery (or prototype bank) and a moderate
    Q. N need not divide the number of shards: the gallery is padded and the padding masked.
    Works with Explicit (the `jax.make_mesh` default) and Auto mesh axes.

    Args:
      queries: (Q, D) float array.
      gallery: (N, D) float array.
      k: neighbours per query, 1 <= k <= N (N - 1 with `exclude_self`).
      query_block, gallery_block: tile sizes; peak memory ~ a few query_block × gallery_block
        scores. Q is split into equal blocks of at most query_block rows (1,129 queries with
        1,024 give 2 blocks of 565). gallery_block is clamped to N (with `mesh`: to the rows
        per shard) so tiny inputs work. On CPU, a gallery_block of >= 2 k × 16 (k neighbours)
        enables the top-k pre-filter, and ~32,768 was fastest for the GLDv2 search (docs/benchmarks.md).
      exclude_self: queries and gallery are the same set; pair (i, i) is never returned.
      mesh, axis: shard the search over the gallery's rows, as above.

    Returns:
      scores (Q, k) float32, descending, and indices (Q, k) int32 into the gallery
      (replicated on `mesh` when given).
    """
    q, n = _check_args(queries, gallery, k, exclude_self, query_block, gallery_block)
    query_block = _even_block(q, query_block)
    if mesh is None:
        if axis is not None:
            raise ValueError(f"axis={axis!r} given without a mesh to shard over.")
        return _topk_jit(
            queries,
            gallery,
            k=k,
            query_block=query_block,
            gallery_block=min(gallery_block, n),
            exclude_self=exclude_self,
        )
    axis = tuple(mesh.axis_names) if axis is None else axis
    axis = axis if isinstance(axis, str) else tuple(axis)
    shard_rows = ceil_div(n, axis_size(mesh, axis))
    gallery_block = min(gallery_block, shard_rows)
    return _sharded_topk_jit(
        queries,
        gallery,
        k=k,
        mesh=mesh,
        axis=axis,
        exclude_self=exclude_self,
        query_block=query_block,
        gallery_block=gallery_block,
        shard_rows=padded(shard_rows, gallery_block),
    )


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
    """`topk(..., mesh=mesh, axis=axis)`: the gallery sharded by rows over mesh axis `axis`."""
    return topk(
        queries,
        gallery,
        k,
        query_block=query_block,
        gallery_block=gallery_block,
        exclude_self=exclude_self,
        mesh=mesh,
        axis=axis,
    )
