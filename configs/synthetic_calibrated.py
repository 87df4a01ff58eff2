"""The calibrated-strength study of prototype perturbation (method.md §11), in two phases.

Phase 1, selection, on the validation split (one held-out training sibling per family: 100 of
the 1,000 training classes, one fixed draw; old and new models train on the other 900; the test
siblings are never touched), 3 seeds:

    python -m bcl_jax.main --config=configs/synthetic_calibrated.py:selection \
        --workdir=runs/calibrated_selection --config.seeds='(0,1,2)'

  results.json's `selection` holds, per method, the paired comparison of every strength ρ with
  BCT and the ρ that the rule below chose; results.md the table, dose_response.png the figure. Each seed may run as its own command (`--config.seeds='(1,)'`, same workdir); the
  command with all seeds then only evaluates and aggregates.

Phase 2, confirmation, on all training classes and the test classes, 8 fresh seeds, with the
strengths that phase 1 chose (read from its results.json):

    python -m bcl_jax.main \
        --config=configs/synthetic_calibrated.py:confirmation=docs/studies/calibrated_selection \
        --workdir=runs/calibrated_confirmation --config.seeds='(100,101,102,103,104,105,106,107)'

The regime is method.md §9's pre-registered alternative: τ = 0.01, λ = 1
(configs/synthetic_regime.py with compat.temperature=0.01, compat.weight=1: the same models, data
and test classes). ODPP with a strength uses `pairs='neighbours'` and
`normalize_in_objective=True` (method.md §11). Selection rule, fixed before any run
(method.md §11, `bcl_jax.stats.select_strength`): per method, the ρ with the largest mean paired
Δnew/new against BCT, subject to mean Δnew/old ≥ −0.5 points and new/old > old/old in every
seed; ties within 0.2 points go to the smaller ρ; if no ρ gains, ρ = 0.5. Measured on a 2-core
CPU: about 2.2 min per new model, 14 per seed in phase 1.
"""

import json
import os

from configs import synthetic_regime

STRENGTHS = (0.25, 0.5, 0.75, 1.0)  # positive-only perturbation, per method
STRENGTHS_ALL = (0.25, 0.5)  # perturb_negatives=True (perturb-all)
ODPP_RHO = 'perturb.odpp.pairs=neighbours perturb.odpp.normalize_in_objective=True'


def strength_name(method: str, rho: float) -> str:
    """The variant name of `method` at strength ρ: 'ndpp_rho50' (bcl_jax.stats reads it back)."""
    return f'{method}_rho{round(100 * rho)}'


def _variant(method: str, rho: float) -> str:
    base, _, negatives = method.partition('_')
    settings = f'{base} perturb.{base}.rho={rho}'
    if base == 'odpp':
        settings += ' ' + ODPP_RHO
    if negatives:
        settings += ' perturb.perturb_negatives=True'
    return settings


def selection_arms() -> dict:
    """variant name -> settings, for every (method, ρ) of the selection grid."""
    grid = {m: STRENGTHS for m in ('ndpp', 'odpp')}
    grid.update({f'{m}_neg': STRENGTHS_ALL for m in ('ndpp', 'odpp')})
    return {strength_name(m, r): _variant(m, r) for m, rhos in grid.items() for r in rhos}


def chosen_strengths(selection_dir: str) -> dict:
    """method -> ρ chosen in phase 1, from its aggregated results.json."""
    path = os.path.join(selection_dir, 'results.json')
    if not os.path.exists(path):
        raise FileNotFoundError(
            f'{path} not found: run phase 1 (selection) with all its seeds first, '
            'see configs/synthetic_calibrated.py'
        )
    with open(path) as f:
        selection = json.load(f).get('selection')
    if not selection:
        raise ValueError(f'{path} has no selection: it is not a phase-1 (selection) result')
    return {method: s['chosen'] for method, s in selection['methods'].items()}


def get_config(arg=None):
    phase, _, selection_dir = (arg or 'selection').partition('=')
    smoke = phase in ('smoke', 'selection,smoke', 'confirmation,smoke')
    phase = {'smoke': 'selection'}.get(phase, phase.removesuffix(',smoke'))
    if phase not in ('selection', 'confirmation') or (phase == 'confirmation') != bool(
        selection_dir
    ):
        raise ValueError(
            f"unknown config argument {arg!r}; use 'selection' (the default) or "
            "'confirmation=<phase-1 workdir>', with ',smoke' after the phase to shrink it"
        )
    c = synthetic_regime.get_config('smoke' if smoke else None)
    c.compat.weight, c.compat.temperature = 1.0, 0.01
    if phase == 'selection':
        c.data.validation_fraction = 1 / c.data.synthetic.siblings_per_family
        arms = selection_arms()
        c.methods = ('independent', 'bct', *arms)
    else:
        chosen = chosen_strengths(selection_dir)
        arms = {f'{m}_star': _variant(m, rho) for m, rho in chosen.items()}
        # Exploratory: the new-distribution readings at the chosen strengths (method.md §11).
        ndpp, odpp = arms['ndpp_star'], arms['odpp_star']
        arms['ndpp_star_beta'] = f"{ndpp} perturb.ndpp.rho_beta={chosen['ndpp']}"
        arms['ndpp_star_new_push'] = f'{ndpp} perturb.ndpp.new_push=True'
        arms['odpp_star_new_margin'] = f'{odpp} perturb.odpp.margin_new_quantile=True'
        arms['ndpp_star_mean'] = f'{ndpp} perturb.prototype_norm=mean'  # the norm reading
        c.methods = ('independent', 'bct', *arms)
        c.primary = ('ndpp_star', 'odpp_star')  # R, Holm-corrected over these two
        c.selected_by = os.path.join(selection_dir, 'results.json')  # copied into results
    c.variants = arms
    return c
