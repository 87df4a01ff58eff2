"""ODPP: optimisation-driven prototype perturbation (method.md §5), as pure functions.

A learnable offset Δ (C, D) on the old prototypes p minimises the hinge objective J
(`odpp_loss`) on the unnormalised p + Δ, as the reference code does (PrunNet
`src/engine/perturbation.py`, `odpp_new`), by Adam: one jitted `lax.scan` over inner steps per
refresh. The compatibility loss then uses p̃ = normalize(p + Δ). Each refresh starts from
Δ = 0 and a fresh Adam state unless `OdppOptions.warm_start`; the state (Δ and Adam's moments)
is a dict of arrays that a train state can hold, shard by class and checkpoint. Not copied
from the reference: its last-batch-only new-prototype term and its loss accumulated across
batches (method.md §5), and its self pairs (i == j), which are masked out here.

Choices where method.md leaves room (each documented at its function): 'neighbours' pairs come
from the unperturbed old bank p; J before and after a solve is measured on one fixed set of
pairs (see `odpp`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bcl_jax import banks, knn
from bcl_jax.models.heads import l2_normalize
from bcl_jax.sharding import ceil_div, pad_rows

__all__ = ['OdppOptions', 'odpp', 'odpp_initial_state', 'odpp_loss', 'passes_to_steps']

PAIR_MODES = ('random', 'neighbours')
STATE_KEYS = ('delta', 'adam_mu', 'adam_nu', 'adam_count')  # an ODPP state dict's keys
_EVAL_SEED = 0  # the fixed pairs on which `odpp` measures J before and after a solve


def _hinge_sums(delta, old, new, i, j, weight, *, margin_old, margin_new, normalize):
    """Σ weight · max(0, p̃_i·p̃_j − m_o) and Σ weight · max(0, p̃_i·q_j − m_n), p̃ = p + Δ."""
    pi, pj = old[i] + delta[i], old[j] + delta[j]
    if normalize:
        pi, pj = l2_normalize(pi), l2_normalize(pj)
    hinge_old = jax.nn.relu(jnp.sum(pi * pj, axis=-1) - margin_old)
    hinge_new = jax.nn.relu(jnp.sum(pi * new[j], axis=-1) - margin_new)
    return jnp.sum(weight * hinge_old), jnp.sum(weight * hinge_new)


def _penalty(delta, gamma, num_classes):
    """γ · mean_c ||Δ_c||² over the real classes (padding rows of Δ are zero)."""
    c = delta.shape[0] if num_classes is None else num_classes
    return gamma * jnp.sum(jnp.square(delta)) / c


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
    normalize_in_objective=False,
    num_classes=None,
):
    """J(Δ) of method.md §5 on the index pairs (i, j):

        λ_o · mean max(0, p̃_i·p̃_j − m_o) + λ_n · mean max(0, p̃_i·q_j − m_n) + γ · mean_c ||Δ_c||²

    with p̃ = p + Δ, not normalised (as in the reference code, PrunNet
    `src/engine/perturbation.py` `odpp_new`: its `Perturbation` module returns p + Δ and the
    hinges take dot products of that). The hinges can then also be lowered by shrinking p + Δ;
    the compatibility loss uses normalize(p + Δ). `normalize_in_objective=True` normalises
    p + Δ inside J instead, which removes that shrinking direction. The means run over pairs
    with i ≠ j (pairs with i == j are masked out; a batch of only such pairs gives 0 for both
    hinge terms).

    Args:
      delta, old, new: (C, D) offset, old bank, new bank.
      i, j: (B,) int class indices.
      gamma: weight of the mean squared norm of Δ (over all C classes). A Python 0 skips the
        term entirely (its gradient would otherwise touch every row).
      num_classes: C when Δ carries zero padding rows after its C classes (bcl_jax.sharding).

    Returns:
      scalar float32 J.
    """
    weight = (i != j).astype(jnp.float32)
    hinge_old, hinge_new = _hinge_sums(
        delta,
        old,
        new,
        i,
        j,
        weight,
        margin_old=margin_old,
        margin_new=margin_new,
        normalize=normalize_in_objective,
    )
    loss = (lambda_old * hinge_old + lambda_new * hinge_new) / jnp.maximum(jnp.sum(weight), 1.0)
    if not (isinstance(gamma, (int, float)) and gamma == 0):
        loss = loss + _penalty(delta, gamma, num_classes)
    return loss


@dataclasses.dataclass(frozen=True)
class OdppOptions:
    """ODPP's hyperparameters (method.md §5); the defaults are the reference code's.

    passes: sweeps over the C classes per refresh (`passes_to_steps`). pairs_per_step: pairs
    per inner Adam step. pairs: 'random' (j uniform over the classes, the reference code) or
    'neighbours' (j uniform over i's top-`k` old-space neighbours). margin_*, lambda_*, gamma,
    normalize_in_objective: J's terms (`odpp_loss`). warm_start: keep Δ and its Adam state
    from the last refresh instead of starting from Δ = 0 and a fresh Adam state.
    """

    passes: float = 100
    pairs_per_step: int = 1024
    learning_rate: float = 1e-3
    pairs: str = 'random'
    k: int = 100
    margin_old: float = 0.9
    margin_new: float = 0.9
    lambda_old: float = 1.0
    lambda_new: float = 1.0
    gamma: float = 0.0
    normalize_in_objective: bool = False
    warm_start: bool = False

    def __post_init__(self):
        if self.pairs not in PAIR_MODES:
            raise ValueError(f'pairs must be one of {PAIR_MODES}; got {self.pairs!r}.')
        for name in ('margin_old', 'margin_new'):
            if not -1.0 <= getattr(self, name) <= 1.0:
                raise ValueError(
                    f'{name}={getattr(self, name)} is outside [-1, 1], the range of a cosine '
                    'similarity.'
                )
        per_step = self.pairs_per_step
        if (
            not isinstance(per_step, (int, np.integer))
            or isinstance(per_step, bool)
            or per_step < 1
        ):
            raise ValueError(f'pairs_per_step must be a positive int; got {per_step!r}.')
        for name in ('lambda_old', 'lambda_new', 'gamma'):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f'{name} must be finite and >= 0; got {getattr(self, name)}.')
        if not self.learning_rate > 0:
            raise ValueError(f'learning_rate must be > 0; got {self.learning_rate}.')
        if not 0 <= self.passes < math.inf:
            raise ValueError(f'passes must be finite and >= 0; got {self.passes}.')


def passes_to_steps(num_classes: int, passes: float, pairs_per_step: int) -> int:
    """Inner steps for `passes` sweeps over the classes: one pass = ceil(C / pairs_per_step)."""
    if num_classes < 1 or pairs_per_step < 1 or passes < 0:
        raise ValueError(
            f'Need num_classes >= 1, pairs_per_step >= 1, passes >= 0; got '
            f'{num_classes}, {pairs_per_step}, {passes}.'
        )
    return math.ceil(passes * ceil_div(num_classes, pairs_per_step))


# ----------------------------------------------------------------------------------------------
# ODPP: the solve
# ----------------------------------------------------------------------------------------------


def _partners(key, i, num_classes, neighbours, pairs):
    """j for each i: uniform over the classes ('random') or over i's neighbours."""
    if pairs == 'random':
        return jax.random.randint(key, i.shape, 0, num_classes, dtype=jnp.int32)
    slot = jax.random.randint(key, i.shape, 0, neighbours.shape[1], dtype=jnp.int32)
    return neighbours[i, slot]


def _draw_pairs(key_perm, key_pair, s, perm, neighbours, *, pairs_per_step, pairs, first=0):
    """Step s's pairs (i, j) and the pass's permutation (carried, redrawn when a pass starts
    and at the call's first step `first`, so that a solve may start mid-pass)."""
    c = perm.shape[0]
    steps_per_pass = ceil_div(c, pairs_per_step)
    within = s % steps_per_pass
    # A fresh random permutation of the classes for every pass; the pass's steps take
    # consecutive slices of it (the last slice wraps around to its start).
    perm = lax.cond(
        (within == 0) | (s == first),
        lambda: jax.random.permutation(jax.random.fold_in(key_perm, s // steps_per_pass), c).astype(
            jnp.int32
        ),
        lambda: perm,
    )
    i = perm[(within * pairs_per_step + jnp.arange(pairs_per_step, dtype=jnp.int32)) % c]
    return i, _partners(jax.random.fold_in(key_pair, s), i, c, neighbours, pairs), perm


@functools.partial(
    jax.jit, static_argnames=('pairs_per_step', 'pairs', 'use_gamma', 'num_classes', 'normalize')
)
def _measure(
    delta, old, new, neighbours, hyper, *, pairs_per_step, pairs, use_gamma, num_classes, normalize
):
    """(J, mean_c ||Δ_c||) with J on one fixed pass of pairs: every class i once, its partner
    j drawn as in the solve from the fixed key `_EVAL_SEED`; chunks of `pairs_per_step` pairs,
    so a class-sharded Δ moves only (pairs, D) arrays between devices, as in the solve."""
    _, margin_old, margin_new, lambda_old, lambda_new, gamma = hyper
    key = jax.random.key(_EVAL_SEED)
    chunk = jnp.arange(pairs_per_step, dtype=jnp.int32)

    def sums(s):
        i = s * pairs_per_step + chunk
        valid = i < num_classes
        i = jnp.where(valid, i, 0)
        j = _partners(jax.random.fold_in(key, s), i, num_classes, neighbours, pairs)
        weight = (valid & (i != j)).astype(jnp.float32)
        margins = {'margin_old': margin_old, 'margin_new': margin_new, 'normalize': normalize}
        return _hinge_sums(delta, old, new, i, j, weight, **margins) + (jnp.sum(weight),)

    steps = jnp.arange(ceil_div(num_classes, pairs_per_step), dtype=jnp.int32)
    hinge_old, hinge_new, count = (jnp.sum(x) for x in lax.map(sums, steps))
    objective = (lambda_old * hinge_old + lambda_new * hinge_new) / jnp.maximum(count, 1.0)
    if use_gamma:
        objective = objective + _penalty(delta, gamma, num_classes)
    real = jnp.arange(delta.shape[0]) < num_classes
    norm = jnp.sum(jnp.where(real, jnp.linalg.norm(delta, axis=1), 0.0)) / num_classes
    return objective, norm


@functools.partial(
    jax.jit,
    static_argnames=(
        'steps',
        'pairs_per_step',
        'pairs',
        'use_gamma',
        'num_classes',
        'sharding',
        'normalize',
    ),
)
def _odpp_jit(
    old,
    new,
    delta0,
    key,
    neighbours,
    hyper,
    adam=None,
    *,
    steps,
    pairs_per_step,
    pairs,
    use_gamma,
    num_classes,
    sharding,
    normalize=False,
):
    """`steps` Adam steps on J from Δ = `delta0` and Adam state `adam` ((count, mu, nu); None:
    fresh). Returns (Δ, (count, mu, nu), losses). Step s of the solve (s counts on from the
    Adam state's count) draws pairs from `key` and s alone, so two warm-started solves of
    n and m steps with one key make the same Δ as one solve of n + m steps."""
    learning_rate, margin_old, margin_new, lambda_old, lambda_new, gamma = hyper
    loss_kwargs = {
        'margin_old': margin_old,
        'margin_new': margin_new,
        'lambda_old': lambda_old,
        'lambda_new': lambda_new,
        'gamma': gamma if use_gamma else 0.0,
        'normalize_in_objective': normalize,
        'num_classes': num_classes,
    }
    optimizer = optax.adam(learning_rate)
    key_perm, key_pair = jax.random.split(key)
    fresh = optimizer.init(delta0)
    if adam is None:
        opt_state = fresh
    else:  # optax.adam's state: (ScaleByAdamState(count, mu, nu), EmptyState())
        opt_state = (optax.ScaleByAdamState(*adam), optax.EmptyState())
        if jax.tree.structure(opt_state) != jax.tree.structure(fresh):
            raise TypeError(f'optax.adam state is {jax.tree.structure(fresh)}, not (count, mu, nu)')
    first = opt_state[0].count

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
            key_perm,
            key_pair,
            s,
            perm,
            neighbours,
            pairs_per_step=pairs_per_step,
            pairs=pairs,
            first=first,
        )
        loss, grad = jax.value_and_grad(odpp_loss)(delta, old, new, i, j, **loss_kwargs)
        updates, opt_state = optimizer.update(grad, opt_state, delta)
        return keep_layout((optax.apply_updates(delta, updates), opt_state)) + (perm,), loss

    init = keep_layout((delta0, opt_state)) + (jnp.zeros((num_classes,), jnp.int32),)
    xs = first + jnp.arange(steps, dtype=jnp.int32)
    (delta, opt_state, _), losses = lax.scan(step, init, xs)
    adam_state = opt_state[0]
    return delta, (adam_state.count, adam_state.mu, adam_state.nu), losses


def odpp_initial_state(rows: int, dim: int, sharding=None) -> dict:
    """An ODPP state at Δ = 0 with a fresh Adam state: a dict of arrays (`STATE_KEYS`), Δ and
    Adam's moments (rows, dim) float32 laid out with `sharding` (e.g. sharded by class, like
    the banks), the step count a replicated int32 scalar."""
    zeros = jnp.zeros((rows, dim), jnp.float32)
    if sharding is not None:
        zeros = jax.device_put(zeros, sharding)
    return {
        'delta': zeros,
        'adam_mu': zeros,
        'adam_nu': zeros,
        'adam_count': jnp.zeros((), jnp.int32),
    }


def _start(state, options, old, layout, num_classes):
    """(Δ0, Adam state or None) where the solve starts: the given state when warm-starting
    from one, else Δ = 0 (laid out like the old bank) and a fresh Adam state."""
    if not options.warm_start or state is None:
        return jnp.zeros_like(old), None
    if not isinstance(state, dict) or set(state) != set(STATE_KEYS):
        raise ValueError(
            f'odpp(warm_start=True) needs the state dict a previous odpp call returned (keys '
            f'{STATE_KEYS}); got {type(state).__name__} '
            f'{sorted(state) if isinstance(state, dict) else ""}.'
        )
    moments = {n: state[n] for n in ('delta', 'adam_mu', 'adam_nu')}
    banks.check(old, old, extra=moments, zero_ok=tuple(moments), num_classes=num_classes)
    place = lambda x: (
        jnp.asarray(x, jnp.float32)
        if layout is None
        else jax.device_put(jnp.asarray(x, jnp.float32), layout)
    )
    count = jnp.asarray(state['adam_count'], jnp.int32)
    return place(state['delta']), (count, place(state['adam_mu']), place(state['adam_nu']))


def _layout(old, new, mesh, axis):
    """(sharding or None, old, new): the banks as float32, row-sharded over `axis` with `mesh`."""
    rows = old.shape[0]
    if mesh is None:
        return None, *(jnp.asarray(banks.replicated(x), jnp.float32) for x in (old, new))
    axis = banks.mesh_axis(mesh, axis)
    if rows % knn.axis_size(mesh, axis):
        raise ValueError(
            f'odpp over mesh axis {axis!r} of size {knn.axis_size(mesh, axis)}: the banks have '
            f'{rows} rows, not a multiple of it; pad them with zero rows and pass num_classes.'
        )
    layout = NamedSharding(banks.auto_axes(mesh), P(axis, None))
    return layout, *(jax.device_put(jnp.asarray(x, jnp.float32), layout) for x in (old, new))


def _neighbour_table(old, options, num_classes, mesh, axis, layout):
    """(rows, K) int32: each class's top-K old-space neighbours for 'neighbours' pairs (one
    unused column for 'random'), laid out like the banks."""
    rows = old.shape[0]
    if options.pairs == 'random':
        return jnp.zeros((rows, 1), jnp.int32)
    valid = banks.valid_rows(old, num_classes, mesh)
    k = banks.clamp_k(options.k, num_classes, 'odpp')
    axis = None if mesh is None else banks.mesh_axis(mesh, axis)
    _, neighbours = banks.search(valid, valid, k, exclude_self=True, mesh=mesh, axis=axis)
    neighbours = pad_rows(neighbours, rows)
    return neighbours if layout is None else jax.device_put(neighbours, layout)


def odpp(
    old,
    new,
    state,
    key,
    *,
    options: OdppOptions = OdppOptions(),
    steps: int | None = None,
    num_classes: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    axis=None,
    **overrides,
):
    """Optimisation-driven prototype perturbation (method.md §5): Adam steps on J(Δ).

    One jitted `lax.scan`; each step takes `jax.grad(odpp_loss)` with respect to Δ on
    `pairs_per_step` pairs (i, j). The i sweep a fresh random permutation of the classes every
    pass (the pass's last step wraps around to the permutation's start); j is uniform over the
    classes (`pairs='random'`, the reference code) or over i's top-`k` neighbours in the
    unperturbed p (`pairs='neighbours'`, k clamped to C − 1). Pairs with i == j are masked out.
    p̃ = normalize(old + state['delta']) is what the compatibility loss then uses.

    Start: Δ = 0 and a fresh Adam state (default), so p̃ is a function of (p, q) alone; with
    `options.warm_start` (and a `state`), Δ and Adam's state continue from `state`. `state` is
    ignored otherwise, so a caller may pass whatever it holds.

    J before and after: measured on one fixed pass of pairs (every class i once, its partner j
    drawn as in the solve, from a fixed key: the same pairs at every refresh), not from the
    scan's per-step losses, which are each on other pairs, and whose first and last passes
    average over a Δ that moves during the pass. So J_after − J_before is the solve's effect,
    and J_before of a refresh against J_after of the last shows how much q moved.

    Args:
      old, new: (rows, D) old and new prototype banks.
      state: the ODPP state a previous call returned (`STATE_KEYS`), or None.
      key: PRNG key for the pairs.
      options: `OdppOptions`; keyword `overrides` replace its fields (e.g. `pairs_per_step=64`).
      steps: inner steps; default `passes_to_steps(C, options.passes, options.pairs_per_step)`.
      num_classes: the real classes when the banks carry zero padding rows after them
        (bcl_jax.sharding); pairs are drawn among them only and padding rows of Δ stay 0.
      mesh, axis: keep p, q, Δ and Adam's moments sharded by class over mesh axis `axis`
        (default: all mesh axes; the banks' rows must be a multiple of its size: pad them).
        Each step's row lookups become masked local gathers and (pairs, D) sums over devices,
        and the gradient local scatter-adds: nothing (C, D)-sized moves between devices.

    Returns:
      state: dict(delta=(rows, D), adam_mu, adam_nu (rows, D), adam_count ()), sharded like
        the banks with `mesh`; keep it for the next refresh when warm-starting.
      log: dict(loss=(steps,) J on each step's pairs before its update; objective_before,
        objective_after: J on the fixed pairs; delta_norm_before, delta_norm_after: mean_c
        ||Δ_c||): JAX scalars.
    """
    options = dataclasses.replace(options, **overrides)
    banks.check(old, new, num_classes=num_classes)
    c = old.shape[0] if num_classes is None else num_classes
    if steps is None:
        steps = passes_to_steps(c, options.passes, options.pairs_per_step)
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f'steps must be an int >= 0; got {steps!r}.')
    layout, old, new = _layout(old, new, mesh, axis)
    delta0, adam = _start(state, options, old, layout, c)
    neighbours = _neighbour_table(old, options, c, mesh, axis, layout)
    names = ('learning_rate', 'margin_old', 'margin_new', 'lambda_old', 'lambda_new', 'gamma')
    hyper = tuple(jnp.float32(getattr(options, n)) for n in names)
    static = {
        'pairs_per_step': int(options.pairs_per_step),
        'pairs': options.pairs,
        'use_gamma': options.gamma != 0,
        'num_classes': int(c),
        'normalize': bool(options.normalize_in_objective),
    }
    before = _measure(delta0, old, new, neighbours, hyper, **static)
    delta, (count, mu, nu), losses = _odpp_jit(
        old, new, delta0, key, neighbours, hyper, adam, steps=int(steps), sharding=layout, **static
    )
    after = _measure(delta, old, new, neighbours, hyper, **static)
    log = {
        'loss': losses,
        'objective_before': before[0],
        'objective_after': after[0],
        'delta_norm_before': before[1],
        'delta_norm_after': after[1],
    }
    return {'delta': delta, 'adam_mu': mu, 'adam_nu': nu, 'adam_count': count}, log
