"""Prototype perturbation (method.md §4 NDPP and §5 ODPP), as pure functions of prototype banks.

Both take the old bank p (C, D) and the current new bank q (C, D), L2-normalised rows, one per
class, and give perturbed old prototypes p̃ that the compatibility loss uses in place of p.

- `ndpp` (here): pushes each p_c away from its K nearest old prototypes and its K nearest new
  prototypes, weighted by (by default clamped) normalised similarity. The neighbour searches
  run through `knn.topk` (blocked, optionally sharded), so C × C is never held, and the
  weighted neighbour sums are taken a block of classes at a time, so (C, K, D) is never held.
  `ndpp_authors_mode()` gives the options that reproduce the reference code's `add_disturb_v0`.
- `odpp` (bcl_jax.odpp, re-exported here with `odpp_loss`, `OdppOptions`,
  `odpp_initial_state`, `passes_to_steps`): a learnable offset Δ minimising the hinge
  objective J on the unnormalised p + Δ (as in the reference code) by Adam, one jitted
  `lax.scan` per refresh, from Δ = 0 and a fresh Adam state unless `warm_start`.
- `perturbation_stats`: what a refresh logs about p̃.

Choices where method.md leaves room (each documented at its function):
- K is clamped to C − 1 (the number of other classes) with a warning, for both NDPP searches.
- The old-space neighbours exclude j = c in every mode (method.md §4; the reference code's
  old-space search is not in its public release).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from bcl_jax import banks
from bcl_jax.models.heads import l2_normalize
from bcl_jax.odpp import (
    PAIR_MODES,
    STATE_KEYS,
    OdppOptions,
    odpp,
    odpp_initial_state,
    odpp_loss,
    passes_to_steps,
)
from bcl_jax.sharding import pad_rows, padded

__all__ = [
    'PAIR_MODES',
    'STATE_KEYS',
    'OdppOptions',
    'ndpp',
    'ndpp_authors_mode',
    'odpp',
    'odpp_initial_state',
    'odpp_loss',
    'passes_to_steps',
    'perturbation_stats',
]

_WEIGHT_EPS = 1e-8  # added to the sum of neighbour weights (method.md §4)


# ----------------------------------------------------------------------------------------------
# NDPP
# ----------------------------------------------------------------------------------------------


def _weights(scores, clamp):
    """Similarities (clamped at 0 when `clamp`), normalised over the K neighbours (+1e-8)."""
    w = jnp.maximum(scores, 0.0) if clamp else scores
    return w / (jnp.sum(w, axis=1, keepdims=True) + _WEIGHT_EPS)


def _weighted_rows(weights, idx, bank, row_block):
    """Σ_j weights[c, j] · bank[idx[c, j]] for every class c, `row_block` classes at a time.

    The gathered neighbours of one block, (row_block, K, D), are the only large temporary.
    """
    c, k = idx.shape
    rows = padded(c, row_block)
    w_blocks = pad_rows(weights, rows).reshape(-1, row_block, k)
    i_blocks = pad_rows(idx, rows).reshape(-1, row_block, k)

    def one(args):
        w, i = args
        return jnp.einsum('bk,bkd->bd', w, bank[i], precision=lax.Precision.HIGHEST)

    return lax.map(one, (w_blocks, i_blocks)).reshape(rows, -1)[:c]


def _offset(old, s, s_idx, t, t_idx, new, alpha, beta, row_block, clamp):
    """d_c = α Σ w (p_c − p_j) + β Σ v (p_c − q_j), from the neighbours."""
    w, v = _weights(s, clamp), _weights(t, clamp)
    w_sum, v_sum = jnp.sum(w, axis=1, keepdims=True), jnp.sum(v, axis=1, keepdims=True)
    return alpha * (w_sum * old - _weighted_rows(w, s_idx, old, row_block)) + beta * (
        v_sum * old - _weighted_rows(v, t_idx, new, row_block)
    )


@functools.partial(
    jax.jit,
    static_argnames=(
        'k',
        'exclude_self',
        'clamp_weights',
        'query_block',
        'gallery_block',
        'mesh',
        'axis',
        'offset_only',
        'new_push',
    ),
)
def _ndpp_jit(
    old,
    new,
    alpha,
    beta,
    *,
    k,
    exclude_self,
    clamp_weights,
    query_block,
    gallery_block,
    mesh,
    axis,
    offset_only=False,
    new_push=False,
):
    old, new = old.astype(jnp.float32), new.astype(jnp.float32)
    blocks = {'query_block': query_block, 'gallery_block': gallery_block}
    search = functools.partial(banks.search, k=k, mesh=mesh, axis=axis, **blocks)
    s, s_idx = search(old, old, exclude_self=True)
    t, t_idx = search(old, new, exclude_self=exclude_self)
    d = _offset(old, s, s_idx, t, t_idx, new, alpha, beta, query_block, clamp_weights)
    if offset_only:
        return d
    perturbed = l2_normalize(old + d)
    if new_push:  # away from p̃_c's own top-K new prototypes, scaled like the old-space push
        t, t_idx = search(perturbed, new, exclude_self=exclude_self)
        v = _weights(t, clamp_weights)
        push = jnp.sum(v, axis=1, keepdims=True) * perturbed - _weighted_rows(
            v, t_idx, new, query_block
        )
        perturbed = l2_normalize(perturbed + alpha * push)
    return perturbed


def ndpp(
    old,
    new,
    *,
    k: int = 100,
    alpha: float = 0.16,
    beta: float = 0.004,
    clamp_weights: bool = True,
    exclude_self: bool = True,
    mesh: jax.sharding.Mesh | None = None,
    axis=None,
    query_block: int = banks.QUERY_BLOCK,
    gallery_block: int = banks.GALLERY_BLOCK,
    num_classes: int | None = None,
    offset_only: bool = False,
    new_push: bool = False,
):
    """Neighbour-driven prototype perturbation (method.md §4): the perturbed old bank p̃.

    For each class c, with s_cj = p_c·p_j over the K most similar *other* old prototypes and
    t_cj = p_c·q_j over the K most similar new prototypes (j ≠ c unless `exclude_self=False`):

        w_cj = max(s_cj, 0) / (Σ_j max(s_cj, 0) + 1e-8),   v_cj likewise from t_cj
        d_c  = α Σ_j w_cj (p_c − p_j) + β Σ_j v_cj (p_c − q_j),   p̃_c = normalize(p_c + d_c)

    The authors' mode, `ndpp(old, new, **ndpp_authors_mode())`, reproduces the reference
    code's `add_disturb_v0` (see there).

    Args:
      old, new: (C, D) old and new prototype banks (L2-normalised rows), C >= 2.
      k: neighbours per class in each space. Clamped to C − 1 (the other classes; method.md's
        "fewer when there are fewer classes") with an absl warning, for both searches, also
        when `exclude_self=False`.
      alpha, beta: weights of the old-space and new-space pushes, each applied once.
      clamp_weights: clamp similarities at 0 before normalising them (default, method.md §4);
        False uses them as they are, as the reference code does (a far neighbour with a
        negative similarity then pulls p_c towards it).
      exclude_self: drop j = c from the new-space neighbours (default). False keeps it, as the
        reference code does. j = c is always excluded in the old space (s_cc = 1).
      mesh, axis: when given, both banks are searched sharded by rows over mesh axis `axis`
        (default: all mesh axes) with `knn.topk(mesh=...)`; the result is replicated on
        `mesh`. It equals the unsharded result up to float rounding, except that a near-tie at
        the K-th neighbour may resolve differently (seen: max |difference| 3e-4 at C = 40,000).
      query_block: classes per block, in the searches and the weighted neighbour sums.
      gallery_block: the most gallery rows per block in the searches; the size actually used
        splits C (or the per-device shard) into equal blocks. Peak memory is about
        query_block × gallery_block scores plus query_block × K × D gathered neighbours.
        Wide gallery blocks matter on CPU, where each top-k call has a large fixed cost.
      num_classes: the real classes when the banks carry padding rows after them (zero rows
        added to shard the class axis evenly, bcl_jax.sharding); they are dropped. The banks
        may be sharded by class: they are gathered whole (on `mesh` when given) for the search.

      offset_only: return the offset d instead of p̃ = normalize(p + d) (for calibration:
        with β = 0, d is linear in α, so one search serves every α; bcl_jax.calibrate).
      new_push: then push p̃ once more, away from its own top-K new prototypes:
        p̃ <- normalize(p̃ + α Σ_j v'_cj (p̃_c − q_j)), v' from t'_cj = p̃_c·q_j as above (the
        reference code's second new-space push, its `add_disturb_n20` path; method.md §11).

    Returns:
      (C, D) float32 perturbed old prototypes, L2-normalised (C = num_classes when given).
    """
    banks.check(old, new, num_classes=num_classes)
    old, new = banks.valid_rows(old, num_classes, mesh), banks.valid_rows(new, num_classes, mesh)
    c = old.shape[0]
    k = banks.clamp_k(k, c, 'ndpp')
    if query_block < 1 or gallery_block < 1:
        raise ValueError(f'Block sizes must be >= 1; got {query_block}, {gallery_block}.')
    return _ndpp_jit(
        old,
        new,
        jnp.float32(alpha),
        jnp.float32(beta),
        k=k,
        exclude_self=bool(exclude_self),
        clamp_weights=bool(clamp_weights),
        query_block=min(query_block, c),
        gallery_block=gallery_block,
        mesh=mesh,
        axis=None if mesh is None else banks.mesh_axis(mesh, axis),
        offset_only=bool(offset_only),
        new_push=bool(new_push),
    )


def ndpp_authors_mode(scale: float = 0.4, new_scale: float = 0.01) -> dict:
    """`ndpp` options that reproduce the reference code's NDPP (PrunNet
    `src/solver/adv_loss.py`, `CompatibleElasticPrototypeLoss.add_disturb_v0` with its default
    `NORM_PROTOTYPE=True`): `ndpp(old, new, k=100, **ndpp_authors_mode())`.

    The reference computes  d = scale · [Σ s (p − p_j) / (Σ s + 1e-8)]
    + new_scale · [Σ t (p − q_j) / (Σ t + 1e-8)]  and then  p̃ = normalize(p + scale · d):
    its scale is applied twice, so α = scale² and β = scale · new_scale (0.16 and 0.004 from
    its defaults 0.4 and 0.01, method.md §4). Its similarities are not clamped, and its
    new-space top-K (`analyze_new_prototype`) keeps j = c. Its K is `TOPK_FOR_SUPPORT` = 100.
    """
    return {
        'alpha': scale * scale,
        'beta': scale * new_scale,
        'clamp_weights': False,
        'exclude_self': False,
    }


# ----------------------------------------------------------------------------------------------
# Logging
# ----------------------------------------------------------------------------------------------


def perturbation_stats(
    old, perturbed, *, num_classes: int | None = None, mesh=None, axis=None
) -> dict[str, float]:
    """For logging: mean ||p̃ − p||, and the mean top-1 neighbour similarity among the old and
    among the perturbed prototypes (perturbation should lower the latter).

    Rows from `num_classes` on are padding and are left out; with `mesh`, the neighbour search
    is sharded over its axis `axis` (default: all mesh axes)."""
    if old.shape != perturbed.shape:
        raise ValueError(f'Shapes differ: old {old.shape}, perturbed {perturbed.shape}.')
    old, perturbed = (
        banks.valid_rows(old, num_classes, mesh),
        banks.valid_rows(perturbed, num_classes, mesh),
    )
    axis = None if mesh is None else banks.mesh_axis(mesh, axis)
    search = functools.partial(banks.search, k=1, exclude_self=True, mesh=mesh, axis=axis)
    top1 = lambda x: float(jnp.mean(search(x, x)[0]))
    shift = jnp.mean(jnp.linalg.norm(jnp.asarray(perturbed) - jnp.asarray(old), axis=1))
    return {'mean_shift': float(shift), 'top1_old': top1(old), 'top1_perturbed': top1(perturbed)}
