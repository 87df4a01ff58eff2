"""Perturbation strength against the data's geometry (method.md §11).

The strength of a perturbation p -> p̃ of an old bank is measured in nearest-neighbour distances:

    ρ = mean_c ||p̃_c − p_c|| / mean_c ||p_c − p_nn(c)||

so that ρ = 1 moves a prototype as far as its nearest other class sits, whatever the bank's
geometry. A config may give ρ instead of NDPP's α or ODPP's margin; the parameter that gives it
is found by bisection on the run's own old bank with q = p (the state before the first refresh),
with the new-model term off (β = 0, λ_new = 0): ρ is the old-space push's strength. Both searches
are deterministic and run on arrays that may be sharded by class (`mesh`, `axis`).

- `nn_distance`, `readings`: the bank's scale, and what every refresh logs about p̃ (realised ρ,
  the fraction of perturbed positives still nearest their own old prototype, and the
  common-mode fraction ||mean_c d_c|| / mean_c ||d_c||: a rigid shift of every class is not a
  spread).
- `ndpp_alpha`: with β = 0 the offset is d = α·u (u from one neighbour search), so the shift
  ||normalize(p + α u) − p|| is increasing in α and every bisection step is elementwise.
- `odpp_margin`: the margin_old whose solve gives ρ, and its quantile among the bank's top-K
  neighbour similarities (the fraction below it). Each bisection step is one ODPP solve
  (`pairs='neighbours'`, `normalize_in_objective=True`, from Δ = 0 with one fixed key), whose
  shift falls as the margin rises. The margin is searched over [−1, the largest neighbour
  similarity], not over the quantiles alone: on a crowded bank even the lowest quantile (every
  neighbour pair active at the start) reaches only ρ ≈ 0.6 in the solve's step budget, and a
  margin below every neighbour similarity keeps pairs pushed apart for longer.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from bcl_jax import banks, odpp, perturbation
from bcl_jax.models.heads import l2_normalize

__all__ = [
    'RHO_MAX',
    'bisect',
    'ndpp_alpha',
    'neighbour_similarities',
    'nn_distance',
    'odpp_margin',
    'overshoot',
    'readings',
]

RHO_MAX = 1.0  # beyond it perturbed positives start to sit nearer another class (method.md §11)
_REL_TOL = 1e-3  # bisection stops when the shift is this close to its target, relatively
_ITERATIONS = 60


class CalibrationError(ValueError):
    """The requested strength cannot be reached with the method's other settings."""


def _search(mesh, axis):
    axis = None if mesh is None else banks.mesh_axis(mesh, axis)
    return functools.partial(banks.search, mesh=mesh, axis=axis)


def nn_distance(old, *, num_classes=None, mesh=None, axis=None) -> float:
    """mean_c ||p_c − p_nn(c)||, the nearest other old prototype by cosine similarity."""
    old = jnp.asarray(banks.valid_rows(old, num_classes, mesh), jnp.float32)
    _, idx = _search(mesh, axis)(old, old, 1, exclude_self=True)
    return float(jnp.mean(jnp.linalg.norm(old - old[idx[:, 0]], axis=1)))


def neighbour_similarities(p, q, k: int, *, num_classes=None, mesh=None, axis=None):
    """All top-`k` similarities p_c·q_j (j ≠ c, k clamped to C − 1), flattened: the values
    whose quantiles set ODPP's margins (margin_old on q = p, margin_new on the new bank)."""
    p = jnp.asarray(banks.valid_rows(p, num_classes, mesh), jnp.float32)
    q = jnp.asarray(banks.valid_rows(q, num_classes, mesh), jnp.float32)
    k = banks.clamp_k(k, p.shape[0], 'odpp margins')
    sims, _ = _search(mesh, axis)(p, q, k, exclude_self=True)
    return sims.reshape(-1)


def readings(old, perturbed, scale: float, *, num_classes=None, mesh=None, axis=None) -> dict:
    """What a refresh logs about p̃ against p: `rho` (mean shift / `scale`, the bank's
    `nn_distance`), `own_nearest` (the fraction of classes whose p̃_c is nearest p_c among the
    old prototypes) and `common_mode` (||mean_c d_c|| / mean_c ||d_c||, d = p̃ − p)."""
    old = jnp.asarray(banks.valid_rows(old, num_classes, mesh), jnp.float32)
    perturbed = jnp.asarray(banks.valid_rows(perturbed, num_classes, mesh), jnp.float32)
    d = perturbed - old
    shift = jnp.mean(jnp.linalg.norm(d, axis=1))
    _, idx = _search(mesh, axis)(perturbed, old, 1, exclude_self=False)
    own = jnp.mean(idx[:, 0] == jnp.arange(old.shape[0]))
    common = jnp.linalg.norm(jnp.mean(d, axis=0)) / jnp.maximum(shift, 1e-12)
    return {'rho': float(shift) / scale, 'own_nearest': float(own), 'common_mode': float(common)}


def overshoot(reading: dict) -> str | None:
    """What to tell the user when a refresh's `readings` go beyond `RHO_MAX`, else None.

    A strength is calibrated with q = p; a term that reads the new bank (β, the second new-space
    push) grows as q moves away from p. In the calibrated study such arms reached ρ ≈ 3, a shift
    mostly shared by all classes, and training broke (docs/calibrated_study.md)."""
    if reading['rho'] <= RHO_MAX:
        return None
    return (
        f"the perturbed prototypes moved {reading['rho']:.2f} nearest-neighbour distances on "
        f'average, beyond {RHO_MAX:g}: {1 - reading["own_nearest"]:.0%} of them now sit nearer '
        f'another class\'s old prototype, and {reading["common_mode"]:.0%} of the shift is common '
        'to all classes. A strength set with q = p (rho_beta, new_push) grows as the new '
        'prototypes move away from the old ones; lower it (docs/calibrated_study.md).'
    )


def bisect(shift, target: float, lo: float, hi: float, *, increasing: bool = True):
    """x in [lo, hi] with shift(x) within `_REL_TOL` of `target` (shift monotone in x, in the
    direction `increasing`), by bisection; (x, shift(x)). The bracket must hold the target."""
    f_lo, f_hi = shift(lo), shift(hi)
    low, high = (f_lo, f_hi) if increasing else (f_hi, f_lo)
    if not low <= target <= high:
        raise CalibrationError(
            f'target shift {target:.4g} is outside [{low:.4g}, {high:.4g}], what the parameter '
            f'gives over [{lo:.4g}, {hi:.4g}]'
        )
    best = (lo, f_lo) if abs(f_lo - target) < abs(f_hi - target) else (hi, f_hi)
    for _ in range(_ITERATIONS):
        if abs(best[1] - target) <= _REL_TOL * target:
            break
        mid = 0.5 * (lo + hi)
        f_mid = shift(mid)
        if abs(f_mid - target) < abs(best[1] - target):
            best = (mid, f_mid)
        if (f_mid < target) == increasing:
            lo = mid
        else:
            hi = mid
    return best


def _check_rho(rho):
    if not 0 < rho <= RHO_MAX:
        raise CalibrationError(f'rho={rho} is outside (0, {RHO_MAX}]')


@jax.jit
def _ndpp_shift(old, u, alpha):
    return jnp.mean(jnp.linalg.norm(l2_normalize(old + alpha * u) - old, axis=1))


def ndpp_alpha(
    old,
    rho: float,
    *,
    k: int,
    clamp_weights: bool = True,
    term: str = 'alpha',
    num_classes=None,
    mesh=None,
    axis=None,
) -> dict:
    """NDPP's α that moves the old prototypes `rho` nearest-neighbour distances on average
    (q = p, β = 0); with term='beta', the β that does so on its own (α = 0: the new-space
    push at q = p, method.md §11's ρ_β). Returns dict(alpha or beta, rho or rho_beta (the
    realised strength), nn_distance)."""
    if term not in ('alpha', 'beta'):
        raise ValueError(f"term must be 'alpha' or 'beta'; got {term!r}")
    _check_rho(rho)
    old = jnp.asarray(banks.valid_rows(old, num_classes, mesh), jnp.float32)
    u = perturbation.ndpp(
        old,
        old,
        k=k,
        alpha=float(term == 'alpha'),
        beta=float(term == 'beta'),
        clamp_weights=clamp_weights,
        mesh=mesh,
        axis=axis,
        offset_only=True,
    )
    scale = nn_distance(old, mesh=mesh, axis=axis)
    shift = lambda a: float(_ndpp_shift(old, u, jnp.float32(a)))
    hi = 1.0
    while shift(hi) < rho * scale and hi < 2.0**20:
        hi *= 2.0
    try:
        value, reached = bisect(shift, rho * scale, 0.0, hi)
    except CalibrationError as e:
        raise CalibrationError(f'NDPP rho={rho}: {e} ({term} up to {hi:g})') from None
    strength = 'rho' if term == 'alpha' else 'rho_beta'
    return {term: value, strength: reached / scale, 'nn_distance': scale}


def odpp_margin(
    old,
    rho: float,
    options: odpp.OdppOptions,
    key,
    *,
    num_classes=None,
    mesh=None,
    axis=None,
) -> dict:
    """ODPP's margin_old, as a quantile of the bank's top-K neighbour similarities, that moves
    the old prototypes `rho` nearest-neighbour distances on average after one solve from Δ = 0
    (q = p, λ_new = 0). `options` must have pairs='neighbours' and normalize_in_objective=True
    (method.md §11: the unnormalised J is solved by shrinking p + Δ, not by rotating it).
    The solve runs on the replicated bank (its neighbour search is sharded with `mesh`).
    Returns dict(quantile, margin_old, rho (realised), nn_distance)."""
    _check_rho(rho)
    if options.pairs != 'neighbours' or not options.normalize_in_objective:
        raise CalibrationError(
            "ODPP with rho needs pairs='neighbours' and normalize_in_objective=True "
            f'(got pairs={options.pairs!r}, normalize_in_objective='
            f'{options.normalize_in_objective})'
        )
    old = jnp.asarray(banks.valid_rows(old, num_classes, mesh), jnp.float32)
    sims = neighbour_similarities(old, old, options.k, mesh=mesh, axis=axis)
    scale = nn_distance(old, mesh=mesh, axis=axis)
    solve = dataclasses.replace(options, lambda_new=0.0, warm_start=False)

    def shift(margin):
        state, _ = odpp.odpp(
            old, old, None, key, options=dataclasses.replace(solve, margin_old=float(margin))
        )
        return float(jnp.mean(jnp.linalg.norm(l2_normalize(old + state['delta']) - old, axis=1)))

    try:
        margin, reached = bisect(shift, rho * scale, -1.0, float(jnp.max(sims)), increasing=False)
    except CalibrationError as e:
        raise CalibrationError(
            f'ODPP rho={rho}: {e}; raise perturb.odpp.passes or learning_rate for more reach'
        ) from None
    u = float(jnp.mean(sims < margin))
    return {'quantile': u, 'margin_old': margin, 'rho': reached / scale, 'nn_distance': scale}
