"""Prototype perturbation (METHOD.md §4 NDPP and §5 ODPP), as pure functions of prototype banks.

Both take the old bank p (C, D) and the current new bank q (C, D), L2-normalised rows, one per
class, and produce perturbed old prototypes p̃ that the compatibility loss uses in place of p.

- `ndpp`: pushes each p_c away from its K nearest old prototypes and its K nearest new
  prototypes, weighted by (clamped, normalised) similarity. One call per refresh; the neighbour
  searches run through `knn` (blocked, optionally sharded), so C × C is never held, and the
  weighted neighbour sums are taken a block of classes at a time, so (C, K, D) is never held.
- `odpp`: a learnable offset Δ minimising the hinge objective `odpp_loss` by Adam, one jitted
  `lax.scan` over inner steps, warm-started from the previous Δ.

Choices where METHOD.md leaves room (each documented at its function):
- K is clamped to C − 1 (the number of other classes) with a warning, for both NDPP searches.
- `odpp_loss` normalises p + Δ inside J; `odpp`'s 'neighbours' pairs come from the unperturbed
  old bank p.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax import lax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from bcl_jax import knn

__all__ = ['ndpp', 'odpp', 'odpp_loss', 'passes_to_steps', 'perturbation_stats']

PAIR_MODES = ('random', 'neighbours')
_WEIGHT_EPS = 1e-8  # added to the sum of neighbour weights (METHOD.md §4)


def _normalize(x, eps=1e-12):
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


# ----------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------


@jax.jit
def _row_flags(x):
    """Per row: has a NaN/Inf; is the zero vector. Small (C,) outputs, so sharded banks work."""
    x = x.astype(jnp.float32)
    return jnp.any(~jnp.isfinite(x), axis=1), jnp.all(x == 0, axis=1)


def _first(flags, n=10):
    return np.flatnonzero(np.asarray(flags))[:n].tolist()


def _check_banks(old, new, *, extra=(), zero_ok=(), num_classes=None):
    """Shapes (C, D) equal for all banks; no NaN/Inf; no zero rows (except banks in zero_ok).

    Rows from `num_classes` on are padding (bcl_jax.sharding) and are not checked."""
    banks = {'old': old, 'new': new, **dict(extra)}
    for name, x in banks.items():
        if getattr(x, 'ndim', None) != 2:
            raise ValueError(
                f'{name} bank must be a 2-D (classes, dim) array; got shape '
                f'{getattr(x, "shape", None)}.'
            )
        if x.shape != old.shape:
            raise ValueError(
                f'{name} bank has shape {x.shape} but the old bank has {old.shape}; '
                'all banks must be (classes, dim) with the same classes and dim.'
            )
    c = old.shape[0] if num_classes is None else num_classes
    if not 2 <= c <= old.shape[0]:
        raise ValueError(
            f'Prototype perturbation needs at least 2 classes (and at most the {old.shape[0]} '
            f'rows of the banks); got {c}.'
        )
    for name, x in banks.items():
        nonfinite, zero = (np.asarray(f)[:c] for f in _row_flags(x))
        if np.any(nonfinite):
            raise ValueError(
                f'{name} bank has NaN/Inf in classes {_first(nonfinite)} '
                f'({int(np.sum(nonfinite))} classes in all).'
            )
        if name not in zero_ok and np.any(zero):
            raise ValueError(
                f'{name} bank has zero vectors for classes {_first(zero)} '
                f'({int(np.sum(zero))} classes in all): every class needs a '
                'prototype (did a class get no images?).'
            )


def _clamp_k(k, num_classes, what):
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ValueError(f'{what}: k must be a positive int; got {k!r}.')
    if k > num_classes - 1:
        logging.warning(
            '%s: k=%d exceeds the %d other classes; using k=%d.',
            what,
            k,
            num_classes - 1,
            num_classes - 1,
        )
        return num_classes - 1
    return int(k)


def _replicated(x, mesh=None):
    """x laid out whole on every device of `mesh` (outside jit), or, without a mesh, of the mesh
    it is sharded over: gathers and row lookups on row-sharded (Explicit) banks would fail."""
    if mesh is None:
        sharding = getattr(x, 'sharding', None)
        if not (
            isinstance(sharding, NamedSharding)
            and any(entry is not None for entry in sharding.spec)
        ):
            return x
        mesh = sharding.mesh
    return jax.device_put(x, NamedSharding(mesh, P()))


def _valid_rows(x, num_classes, mesh=None):
    """x replicated (see `_replicated`) without its padding rows (from `num_classes` on)."""
    x = _replicated(x, mesh)
    return x if num_classes is None or num_classes == x.shape[0] else x[:num_classes]


def _auto(mesh):
    """`mesh` with Auto axes: the compiler then partitions row lookups into a row-sharded bank
    (a masked local gather and a sum over devices), which Explicit axes refuse."""
    return jax.sharding.Mesh(
        mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names)
    )


def _even_block(n: int, max_block: int, multiple: int = 8) -> int:
    """The block size, at most about `max_block`, that splits n rows into equal blocks (rounded
    up to `multiple`), so padding to a block multiple wastes little: 81,313 rows with
    max_block 32,768 give 3 blocks of 27,112 rather than padding to 98,304. knn clamps it to n."""
    blocks = -(-n // max_block)
    size = -(-n // blocks)
    return -(-size // multiple) * multiple


# ----------------------------------------------------------------------------------------------
# NDPP
# ----------------------------------------------------------------------------------------------


def _weights(scores):
    """Similarities clamped at 0, normalised over the K neighbours (+1e-8)."""
    w = jnp.maximum(scores, 0.0)
    return w / (jnp.sum(w, axis=1, keepdims=True) + _WEIGHT_EPS)


def _weighted_rows(weights, idx, bank, row_block):
    """Σ_j weights[c, j] · bank[idx[c, j]] for every class c, `row_block` classes at a time.

    The gathered neighbours of one block, (row_block, K, D), are the only large temporary.
    """
    c, k = idx.shape
    padded = -(-c // row_block) * row_block
    pad = ((0, padded - c), (0, 0))
    w_blocks = jnp.pad(weights, pad).reshape(-1, row_block, k)
    i_blocks = jnp.pad(idx, pad).reshape(-1, row_block, k)

    def one(args):
        w, i = args
        return jnp.einsum('bk,bkd->bd', w, bank[i], precision=lax.Precision.HIGHEST)

    return lax.map(one, (w_blocks, i_blocks)).reshape(padded, -1)[:c]


def _perturb(old, s, s_idx, t, t_idx, new, alpha, beta, row_block):
    """p̃ = normalize(p + d), d_c = α Σ w (p_c − p_j) + β Σ v (p_c − q_j), from the neighbours."""
    w, v = _weights(s), _weights(t)
    w_sum, v_sum = jnp.sum(w, axis=1, keepdims=True), jnp.sum(v, axis=1, keepdims=True)
    d = alpha * (w_sum * old - _weighted_rows(w, s_idx, old, row_block)) + beta * (
        v_sum * old - _weighted_rows(v, t_idx, new, row_block)
    )
    return _normalize(old + d)


@functools.partial(jax.jit, static_argnames=('k', 'exclude_self', 'query_block', 'gallery_block'))
def _ndpp_jit(old, new, alpha, beta, *, k, exclude_self, query_block, gallery_block):
    old, new = old.astype(jnp.float32), new.astype(jnp.float32)
    blocks = dict(query_block=query_block, gallery_block=gallery_block)
    s, s_idx = knn.topk(old, old, k, exclude_self=True, **blocks)
    t, t_idx = knn.topk(old, new, k, exclude_self=exclude_self, **blocks)
    return _perturb(old, s, s_idx, t, t_idx, new, alpha, beta, query_block)


@functools.partial(
    jax.jit, static_argnames=('k', 'exclude_self', 'query_block', 'gallery_block', 'mesh', 'axis')
)
def _ndpp_sharded_jit(
    old, new, alpha, beta, *, k, exclude_self, query_block, gallery_block, mesh, axis
):
    old, new = old.astype(jnp.float32), new.astype(jnp.float32)
    blocks = dict(query_block=query_block, gallery_block=gallery_block, mesh=mesh, axis=axis)
    s, s_idx = knn.sharded_topk(old, old, k, exclude_self=True, **blocks)
    t, t_idx = knn.sharded_topk(old, new, k, exclude_self=exclude_self, **blocks)
    return _perturb(old, s, s_idx, t, t_idx, new, alpha, beta, query_block)


def ndpp(
    old,
    new,
    *,
    k: int = 100,
    alpha: float = 0.16,
    beta: float = 0.004,
    exclude_self: bool = True,
    mesh: jax.sharding.Mesh | None = None,
    axis=None,
    query_block: int = 256,
    gallery_block: int = 131072,
    num_classes: int | None = None,
):
    """Neighbour-driven prototype perturbation (METHOD.md §4): the perturbed old bank p̃.

    For each class c, with s_cj = p_c·p_j over the K most similar *other* old prototypes and
    t_cj = p_c·q_j over the K most similar new prototypes (j ≠ c unless `exclude_self=False`):

        w_cj = max(s_cj, 0) / (Σ_j max(s_cj, 0) + 1e-8),   v_cj likewise from t_cj
        d_c  = α Σ_j w_cj (p_c − p_j) + β Σ_j v_cj (p_c − q_j),   p̃_c = normalize(p_c + d_c)

    Args:
      old, new: (C, D) old and new prototype banks (L2-normalised rows), C >= 2.
      k: neighbours per class in each space. Clamped to C − 1 (the other classes; METHOD.md's
        "fewer when there are fewer classes") with an absl warning, for both searches, also
        when `exclude_self=False`.
      alpha, beta: weights of the old-space and new-space pushes, each applied once.
      exclude_self: drop j = c from the new-space neighbours (default). False keeps it, as the
        reference code does. j = c is always excluded in the old space (s_cc = 1).
      mesh, axis: when given, both banks are searched sharded by rows over mesh axis `axis`
        (default: all mesh axes) with `knn.sharded_topk`; the result is replicated on `mesh`.
        It equals the unsharded result up to float rounding, except that a near-tie at the
        K-th neighbour may resolve differently (seen: max |difference| 3e-4 at C = 40,000).
      query_block: classes per block, in the searches and the weighted neighbour sums.
      gallery_block: the most gallery rows per block in the searches; the size actually used
        splits C (or the per-device shard) into equal blocks. Peak memory is about
        query_block × gallery_block scores plus query_block × K × D gathered neighbours.
        Wide gallery blocks matter on CPU, where each top-k call has a large fixed cost.
      num_classes: the real classes when the banks carry padding rows after them (zero rows
        added to shard the class axis evenly, bcl_jax.sharding); they are dropped. The banks
        may be sharded by class: they are gathered whole (on `mesh` when given) for the search.

    Returns:
      (C, D) float32 perturbed old prototypes, L2-normalised (C = num_classes when given).
    """
    _check_banks(old, new, num_classes=num_classes)
    old, new = _valid_rows(old, num_classes, mesh), _valid_rows(new, num_classes, mesh)
    c = old.shape[0]
    k = _clamp_k(k, c, 'ndpp')
    if query_block < 1 or gallery_block < 1:
        raise ValueError(f'Block sizes must be >= 1; got {query_block}, {gallery_block}.')
    query_block = min(query_block, c)
    hyper = (jnp.float32(alpha), jnp.float32(beta))
    if mesh is None:
        return _ndpp_jit(
            old,
            new,
            *hyper,
            k=k,
            exclude_self=bool(exclude_self),
            query_block=query_block,
            gallery_block=_even_block(c, gallery_block),
        )
    axis = tuple(mesh.axis_names) if axis is None else axis
    axis = axis if isinstance(axis, str) else tuple(axis)
    shard_rows = -(-c // knn._axis_size(mesh, axis))  # also checks that the axes exist
    return _ndpp_sharded_jit(
        old,
        new,
        *hyper,
        k=k,
        exclude_self=bool(exclude_self),
        query_block=query_block,
        gallery_block=_even_block(shard_rows, gallery_block),
        mesh=mesh,
        axis=axis,
    )


# ----------------------------------------------------------------------------------------------
# ODPP
# ----------------------------------------------------------------------------------------------


def odpp_loss(
    delta,
    old,
    new,
    i,
    j,
    *,
    margin_old=0.9,
    margin_new=0.9,
    lambda_old=1.0,
    lambda_new=1.0,
    gamma=0.0,
    num_classes=None,
):
    """J(Δ) of METHOD.md §5 on the index pairs (i, j):

        λ_o · mean max(0, p̃_i·p̃_j − m_o) + λ_n · mean max(0, p̃_i·q_j − m_n) + γ · mean_c ||Δ_c||²

    with p̃ = normalize(p + Δ). The means run over pairs with i ≠ j (pairs with i == j are
    masked out; a batch of only such pairs gives 0 for both hinge terms).

    p + Δ is normalised inside J, as it is when L_comp uses p̃: on the unnormalised p + Δ the
    hinges could be satisfied trivially by shrinking rows towards 0, which says nothing about
    the directions the compatibility loss sees.

    Args:
      delta, old, new: (C, D) offset, old bank, new bank.
      i, j: (B,) int class indices.
      gamma: weight of the mean squared norm of Δ (over all C classes). A Python 0 skips the
        term entirely (its gradient would otherwise touch every row).
      num_classes: C when Δ carries zero padding rows after its C classes (bcl_jax.sharding).

    Returns:
      scalar float32 J.
    """
    pi = _normalize(old[i] + delta[i])
    pj = _normalize(old[j] + delta[j])
    qj = new[j]
    mask = (i != j).astype(jnp.float32)
    count = jnp.maximum(jnp.sum(mask), 1.0)
    hinge_old = jax.nn.relu(jnp.sum(pi * pj, axis=-1) - margin_old)
    hinge_new = jax.nn.relu(jnp.sum(pi * qj, axis=-1) - margin_new)
    loss = (lambda_old * jnp.sum(mask * hinge_old) + lambda_new * jnp.sum(mask * hinge_new)) / count
    if not (isinstance(gamma, (int, float)) and gamma == 0):
        c = delta.shape[0] if num_classes is None else num_classes
        loss = loss + gamma * jnp.sum(jnp.square(delta)) / c
    return loss


def passes_to_steps(num_classes: int, passes: float, pairs_per_step: int) -> int:
    """Inner steps for `passes` sweeps over the classes: one pass = ceil(C / pairs_per_step)."""
    if num_classes < 1 or pairs_per_step < 1 or passes < 0:
        raise ValueError(
            f'Need num_classes >= 1, pairs_per_step >= 1, passes >= 0; got '
            f'{num_classes}, {pairs_per_step}, {passes}.'
        )
    return math.ceil(passes * math.ceil(num_classes / pairs_per_step))


def _draw_pairs(key_perm, key_pair, s, perm, neighbours, *, pairs_per_step, pairs):
    """Step s's pairs (i, j) and the pass's permutation (carried, redrawn when a pass starts)."""
    c = perm.shape[0]
    steps_per_pass = -(-c // pairs_per_step)
    within = s % steps_per_pass
    # A fresh random permutation of the classes at the start of every pass; the pass's steps
    # take consecutive slices of it (the last slice wraps around to its start).
    perm = lax.cond(
        within == 0,
        lambda: jax.random.permutation(jax.random.fold_in(key_perm, s // steps_per_pass), c).astype(
            jnp.int32
        ),
        lambda: perm,
    )
    i = perm[(within * pairs_per_step + jnp.arange(pairs_per_step, dtype=jnp.int32)) % c]
    key_s = jax.random.fold_in(key_pair, s)
    if pairs == 'random':
        j = jax.random.randint(key_s, (pairs_per_step,), 0, c, dtype=jnp.int32)
    else:
        slot = jax.random.randint(key_s, (pairs_per_step,), 0, neighbours.shape[1], dtype=jnp.int32)
        j = neighbours[i, slot]
    return i, j, perm


@functools.partial(
    jax.jit,
    static_argnames=('steps', 'pairs_per_step', 'pairs', 'use_gamma', 'num_classes', 'sharding'),
)
def _odpp_jit(
    old,
    new,
    delta0,
    key,
    neighbours,
    hyper,
    *,
    steps,
    pairs_per_step,
    pairs,
    use_gamma,
    num_classes,
    sharding,
):
    learning_rate, margin_old, margin_new, lambda_old, lambda_new, gamma = hyper
    loss_kwargs = dict(
        margin_old=margin_old,
        margin_new=margin_new,
        lambda_old=lambda_old,
        lambda_new=lambda_new,
        gamma=gamma if use_gamma else 0.0,
        num_classes=num_classes,
    )
    optimizer = optax.adam(learning_rate)
    key_perm, key_pair = jax.random.split(key)

    def keep_layout(tree):
        # Δ and Adam's moments stay sharded by class through the scan (when they are).
        if sharding is None:
            return tree
        return jax.tree.map(
            lambda x: lax.with_sharding_constraint(x, sharding) if x.ndim == 2 else x, tree
        )

    def step(carry, s):
        delta, opt_state, perm = carry
        i, j, perm = _draw_pairs(
            key_perm, key_pair, s, perm, neighbours, pairs_per_step=pairs_per_step, pairs=pairs
        )
        loss, grad = jax.value_and_grad(odpp_loss)(delta, old, new, i, j, **loss_kwargs)
        updates, opt_state = optimizer.update(grad, opt_state, delta)
        return keep_layout((optax.apply_updates(delta, updates), opt_state)) + (perm,), loss

    init = keep_layout((delta0, optimizer.init(delta0))) + (jnp.zeros((num_classes,), jnp.int32),)
    (delta, _, _), losses = lax.scan(step, init, jnp.arange(steps, dtype=jnp.int32))
    return delta, losses


def odpp(
    old,
    new,
    delta0,
    key,
    *,
    steps: int,
    pairs_per_step: int = 1024,
    learning_rate: float = 1e-3,
    pairs: str = 'random',
    k: int = 100,
    margin_old: float = 0.9,
    margin_new: float = 0.9,
    lambda_old: float = 1.0,
    lambda_new: float = 1.0,
    gamma: float = 0.0,
    num_classes: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    axis: str = 'data',
):
    """Optimisation-driven prototype perturbation (METHOD.md §5): `steps` Adam steps on J(Δ).

    One jitted `lax.scan`; each step takes `jax.grad(odpp_loss)` with respect to Δ on
    `pairs_per_step` pairs (i, j). The i sweep a fresh random permutation of the classes every
    pass (one pass = `passes_to_steps(C, 1, pairs_per_step)` steps; the pass's last step wraps
    around to the permutation's start). j is uniform over the classes (`pairs='random'`, the
    reference code) or uniform over i's top-`k` old-space neighbours (`pairs='neighbours'`;
    neighbours of the unperturbed p, searched once per call with `knn.topk`, k clamped to
    C − 1). Pairs with i == j are masked out of the means.

    Adam's state is fresh on every call; Δ starts from `delta0` (warm start across refreshes).
    p̃ = normalize(old + Δ) is what the compatibility loss should then use.

    `num_classes`: the real classes when the banks carry zero padding rows after them
    (bcl_jax.sharding); pairs are drawn among them only and the padding rows of Δ stay as given.
    `mesh`, `axis`: when given, p, q, Δ and Adam's moments are kept sharded by class over mesh
    axis `axis` (their rows must be a multiple of its size: pad them). The compiler turns each
    step's row lookups into masked local gathers and (pairs, D) sums over devices, and the
    gradient into local scatter-adds, so nothing (C, D)-sized moves between devices.

    Returns:
      delta: (rows, D) float32, the new Δ (sharded like the banks when `mesh` is given).
      losses: (steps,) float32, J on each step's pairs before that step's update.
    """
    if pairs not in PAIR_MODES:
        raise ValueError(f'pairs must be one of {PAIR_MODES}; got {pairs!r}.')
    _check_banks(old, new, extra={'delta0': delta0}, zero_ok=('delta0',), num_classes=num_classes)
    for name, m in (('margin_old', margin_old), ('margin_new', margin_new)):
        if not -1.0 <= m <= 1.0:
            raise ValueError(f'{name}={m} is outside [-1, 1], the range of a cosine similarity.')
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f'steps must be an int >= 0; got {steps!r}.')
    if not isinstance(pairs_per_step, (int, np.integer)) or pairs_per_step < 1:
        raise ValueError(f'pairs_per_step must be a positive int; got {pairs_per_step!r}.')
    for name, value in (('lambda_old', lambda_old), ('lambda_new', lambda_new), ('gamma', gamma)):
        if not 0 <= value < math.inf:
            raise ValueError(f'{name} must be finite and >= 0; got {value}.')
    if not learning_rate > 0:
        raise ValueError(f'learning_rate must be > 0; got {learning_rate}.')
    rows = old.shape[0]
    c = rows if num_classes is None else num_classes
    if mesh is None:
        sharding = None
        old, new, delta0 = (jnp.asarray(_replicated(x), jnp.float32) for x in (old, new, delta0))
    else:
        mesh = _auto(mesh)
        if rows % mesh.shape[axis]:
            raise ValueError(
                f'odpp over mesh axis {axis!r} of size {mesh.shape[axis]}: the banks have {rows} '
                'rows, not a multiple of it; pad them with zero rows and pass num_classes.'
            )
        sharding = NamedSharding(mesh, P(axis, None))
        old, new, delta0 = (
            jax.device_put(jnp.asarray(x, jnp.float32), sharding) for x in (old, new, delta0)
        )
    if pairs == 'neighbours':
        valid = _valid_rows(old, c, mesh)
        search = dict(exclude_self=True, query_block=256)
        if mesh is None:
            search.update(gallery_block=_even_block(c, 131072))
            _, neighbours = knn.topk(valid, valid, _clamp_k(k, c, 'odpp'), **search)
        else:
            search.update(gallery_block=_even_block(-(-c // mesh.shape[axis]), 131072))
            _, neighbours = knn.sharded_topk(
                valid, valid, _clamp_k(k, c, 'odpp'), mesh=mesh, axis=axis, **search
            )
        neighbours = jnp.pad(neighbours, ((0, rows - c), (0, 0)))
        if mesh is not None:
            neighbours = jax.device_put(neighbours, sharding)
    else:
        neighbours = jnp.zeros((rows, 1), jnp.int32)  # unused
    hyper = tuple(
        jnp.float32(x)
        for x in (learning_rate, margin_old, margin_new, lambda_old, lambda_new, gamma)
    )
    return _odpp_jit(
        old,
        new,
        delta0,
        key,
        neighbours,
        hyper,
        steps=int(steps),
        pairs_per_step=int(pairs_per_step),
        pairs=pairs,
        use_gamma=gamma != 0,
        num_classes=int(c),
        sharding=sharding,
    )


# ----------------------------------------------------------------------------------------------
# Logging
# ----------------------------------------------------------------------------------------------


def perturbation_stats(
    old, perturbed, *, num_classes: int | None = None, mesh=None, axis: str = 'data'
) -> dict[str, float]:
    """For logging: mean ||p̃ − p||, and the mean top-1 neighbour similarity among the old and
    among the perturbed prototypes (perturbation should lower the latter).

    Rows from `num_classes` on are padding and are left out; with `mesh`, the neighbour search
    is sharded over its axis `axis` (`knn.sharded_topk`)."""
    if old.shape != perturbed.shape:
        raise ValueError(f'Shapes differ: old {old.shape}, perturbed {perturbed.shape}.')
    old, perturbed = _valid_rows(old, num_classes, mesh), _valid_rows(perturbed, num_classes, mesh)
    c = old.shape[0]
    if mesh is None:
        blocks = dict(query_block=256, gallery_block=_even_block(c, 131072))
        search = functools.partial(knn.topk, **blocks)
    else:
        blocks = dict(query_block=256, gallery_block=_even_block(-(-c // mesh.shape[axis]), 131072))
        search = functools.partial(knn.sharded_topk, mesh=mesh, axis=axis, **blocks)
    top1 = lambda x: float(jnp.mean(search(x, x, 1, exclude_self=True)[0]))
    shift = jnp.mean(jnp.linalg.norm(jnp.asarray(perturbed) - jnp.asarray(old), axis=1))
    return dict(mean_shift=float(shift), top1_old=top1(old), top1_perturbed=top1(perturbed))
