"""bcl_jax.calibrate: strength ρ in nearest-neighbour distances (method.md §11), against NumPy
float64 re-computations of ρ on the perturbed banks."""

import dataclasses

import jax
import numpy as np
import pytest

from bcl_jax import calibrate, odpp
from bcl_jax import perturbation as pt


def _clustered(seed=0, families=40, siblings=10, d=32, spread=0.1):
    """Crowded unit prototypes: families of siblings (top-1 cosine ~0.99), as an old bank is."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((families, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[:, None] + spread / np.sqrt(d) * rng.standard_normal((families, siblings, d))
    x = x.reshape(-1, d)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _rho_reference(old, perturbed):
    """mean ||p̃ − p|| / mean ||p − p_nn||, nearest by cosine, in float64."""
    p, pp = np.asarray(old, np.float64), np.asarray(perturbed, np.float64)
    sims = p @ p.T
    np.fill_diagonal(sims, -np.inf)
    nn = np.linalg.norm(p - p[np.argmax(sims, axis=1)], axis=1).mean()
    return np.linalg.norm(pp - p, axis=1).mean() / nn


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope='module')
def bank():
    return _clustered()


ODPP_RHO = odpp.OdppOptions(pairs='neighbours', k=4, normalize_in_objective=True)


def test_nn_distance_matches_numpy(bank):
    p = bank.astype(np.float64)
    sims = p @ p.T
    np.fill_diagonal(sims, -np.inf)
    want = np.linalg.norm(p - p[np.argmax(sims, axis=1)], axis=1).mean()
    assert calibrate.nn_distance(bank) == pytest.approx(want, rel=1e-5)


def test_readings_by_hand():
    # Three unit prototypes in the plane; only class 0 moves, by 90° onto class 1's side.
    old = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], np.float32)
    perturbed = np.array([[0.0, 1.0], [0.0, 1.0], [-1.0, 0.0]], np.float32)
    # nn distances: 0 -> 1 (√2), 1 -> 0 or 2 (√2), 2 -> 1 (√2): scale √2; shifts √2, 0, 0.
    r = calibrate.readings(old, perturbed, calibrate.nn_distance(old))
    assert r['rho'] == pytest.approx(1 / 3, rel=1e-6)
    # p̃_0 = p_1 is nearest old prototype 1: two of three classes still nearest their own.
    assert r['own_nearest'] == pytest.approx(2 / 3)
    # d = (−1, 1), 0, 0: ||mean d|| = √2/3, mean ||d|| = √2/3: a single moved class is all
    # common mode.
    assert r['common_mode'] == pytest.approx(1.0, rel=1e-6)


def test_common_mode_of_a_rigid_shift_and_of_a_spread():
    old = _clustered(families=4, siblings=4, d=8)
    shift = np.zeros_like(old)
    shift[:, 0] = 0.05
    rigid = calibrate.readings(old, old + shift, 1.0)
    assert rigid['common_mode'] == pytest.approx(1.0, abs=1e-5)
    spread = calibrate.readings(old, old + 0.05 * old, 1.0)  # every class pushed its own way
    assert spread['common_mode'] < 0.5


def test_bisect_finds_a_monotone_functions_level():
    x, fx = calibrate.bisect(lambda a: a**3, 0.3, 0.0, 2.0)
    assert fx == pytest.approx(0.3, rel=2e-3) and x == pytest.approx(0.3 ** (1 / 3), rel=1e-3)
    x, fx = calibrate.bisect(lambda a: 1 - a, 0.25, 0.0, 1.0, increasing=False)
    assert x == pytest.approx(0.75, rel=1e-3)
    with pytest.raises(calibrate.CalibrationError, match='outside'):
        calibrate.bisect(lambda a: a, 5.0, 0.0, 1.0)


@pytest.mark.parametrize('rho', [0.25, 0.5, 1.0])
def test_ndpp_alpha_reaches_the_target_strength(bank, rho):
    got = calibrate.ndpp_alpha(bank, rho, k=4)
    perturbed = pt.ndpp(bank, bank, k=4, alpha=got['alpha'], beta=0.0)
    realised = _rho_reference(bank, perturbed)
    assert realised == pytest.approx(rho, rel=0.02)
    assert got['rho'] == pytest.approx(realised, rel=1e-3)


def test_ndpp_alpha_grows_linearly_at_small_strength(bank):
    # d = α u is linear in α; the angle it gives is nearly so while it is small.
    a1, a2 = (calibrate.ndpp_alpha(bank, r, k=4)['alpha'] for r in (0.1, 0.2))
    assert a2 / a1 == pytest.approx(2.0, rel=0.05)


@pytest.mark.parametrize('rho', [0.25, 0.5, 1.0])
def test_odpp_margin_reaches_the_target_strength(bank, rho):
    key = jax.random.key(3)
    got = calibrate.odpp_margin(bank, rho, ODPP_RHO, key)
    options = dataclasses.replace(ODPP_RHO, margin_old=got['margin_old'], lambda_new=0.0)
    state, _ = odpp.odpp(bank, bank, None, key, options=options)
    realised = _rho_reference(bank, _unit(bank + np.asarray(state['delta'])))
    assert realised == pytest.approx(rho, rel=0.02)
    assert 0.0 <= got['quantile'] <= 1.0


def _neighbour_pairs_above(bank, perturbed, k, margin):
    """The fraction of each class's top-k old neighbour pairs whose perturbed cosine > margin."""
    p = bank.astype(np.float64)
    sims = p @ p.T
    np.fill_diagonal(sims, -np.inf)
    idx = np.argsort(-sims, axis=1)[:, :k]
    pp = _unit(perturbed)
    return float(np.mean(np.einsum('cd,ckd->ck', pp, pp[idx]) > margin))


def test_unnormalised_odpp_shrinks_norms_instead_of_rotating(bank):
    """The failure mode method.md §11 names: at margin 0.9 the unnormalised J is solved by
    shrinking ||p + Δ||, so after the normalisation L_comp applies the neighbours are still as
    crowded; with `normalize_in_objective` the solve rotates them apart instead."""
    key = jax.random.key(0)
    base = dataclasses.replace(ODPP_RHO, margin_old=0.9, lambda_new=0.0)
    assert _neighbour_pairs_above(bank, bank, 4, 0.9) == 1.0  # crowded to begin with
    raw, _ = odpp.odpp(bank, bank, None, key, options=base, normalize_in_objective=False)
    rotated, _ = odpp.odpp(bank, bank, None, key, options=base)
    raw_p, rot_p = (bank + np.asarray(s['delta'], np.float64) for s in (raw, rotated))
    assert np.linalg.norm(raw_p, axis=1).mean() < 0.95  # shrunk
    assert abs(np.linalg.norm(rot_p, axis=1).mean() - 1.0) < 0.05  # not shrunk
    assert _neighbour_pairs_above(bank, raw_p, 4, 0.9) > 0.9  # J met, neighbours still crowded
    assert _neighbour_pairs_above(bank, rot_p, 4, 0.9) < 0.1  # pushed apart
    # So the calibration refuses the unnormalised objective rather than miss the target.
    with pytest.raises(calibrate.CalibrationError, match='normalize_in_objective=True'):
        calibrate.odpp_margin(
            bank, 0.5, dataclasses.replace(ODPP_RHO, normalize_in_objective=False), key
        )


@pytest.mark.parametrize('rho', [0.0, -0.1, 1.5])
def test_strength_outside_the_range_is_refused(bank, rho):
    with pytest.raises(calibrate.CalibrationError, match='outside'):
        calibrate.ndpp_alpha(bank, rho, k=4)


def test_unreachable_odpp_strength_says_what_to_raise(bank):
    weak = dataclasses.replace(ODPP_RHO, passes=1, learning_rate=1e-5)
    with pytest.raises(calibrate.CalibrationError, match='raise perturb.odpp.passes'):
        calibrate.odpp_margin(bank, 1.0, weak, jax.random.key(0))


def test_calibration_is_deterministic(bank):
    a = calibrate.odpp_margin(bank, 0.5, ODPP_RHO, jax.random.key(1))
    b = calibrate.odpp_margin(bank, 0.5, ODPP_RHO, jax.random.key(1))
    assert a == b


def test_ndpp_beta_alone_reaches_its_strength(bank):
    got = calibrate.ndpp_alpha(bank, 0.5, k=4, term='beta')
    perturbed = pt.ndpp(bank, bank, k=4, alpha=0.0, beta=got['beta'])
    assert _rho_reference(bank, perturbed) == pytest.approx(0.5, rel=0.02)
    assert set(got) == {'beta', 'rho_beta', 'nn_distance'}


def test_ndpp_new_push_matches_numpy(bank):
    """The second new-space push: p̃ <- normalize(p̃ + α Σ v' (p̃ − q_j)) over p̃'s own top-K
    new prototypes (j ≠ c), weights clamped and normalised, in float64."""
    rng = np.random.default_rng(5)
    new = _unit(bank + 0.05 * rng.standard_normal(bank.shape)).astype(np.float32)
    alpha, k = 0.8, 4
    first = np.asarray(pt.ndpp(bank, new, k=k, alpha=alpha, beta=0.01), np.float64)
    sims = first @ new.astype(np.float64).T
    np.fill_diagonal(sims, -np.inf)
    idx = np.argsort(-sims, axis=1)[:, :k]
    w = np.maximum(np.take_along_axis(sims, idx, axis=1), 0.0)
    w /= w.sum(axis=1, keepdims=True) + 1e-8
    push = np.einsum('ck,ckd->cd', w, first[:, None, :] - new.astype(np.float64)[idx])
    want = _unit(first + alpha * push)
    got = np.asarray(pt.ndpp(bank, new, k=k, alpha=alpha, beta=0.01, new_push=True))
    assert np.abs(got - want).max() < 1e-5
    assert np.abs(want - first).max() > 1e-3  # the second push does move p̃


def test_beta_calibrated_at_q_equal_p_overshoots_once_q_moves_away(bank):
    """The calibrated study's failure in miniature: β set for ρ_β = 0.5 with q = p; once the new
    bank sits in other directions (p_c·q_c ≈ 0.5, as early in training), the same β moves the
    prototypes several nearest-neighbour distances, mostly all the same way, and the refresh
    warns. At q = p it does not."""
    beta = calibrate.ndpp_alpha(bank, 0.5, k=4, term='beta')['beta']
    rng = np.random.default_rng(3)
    drift = _unit(rng.standard_normal((1, bank.shape[1])))  # a direction the new model favours
    new = _unit(bank + 1.0 * drift + 0.3 * rng.standard_normal(bank.shape)).astype(np.float32)
    assert 0.3 < np.mean(np.sum(bank * new, axis=1)) < 0.7
    scale = calibrate.nn_distance(bank)
    at_start = calibrate.readings(bank, pt.ndpp(bank, bank, k=4, alpha=0.0, beta=beta), scale)
    assert at_start['rho'] == pytest.approx(0.5, rel=0.02)
    assert calibrate.overshoot(at_start) is None
    moved = pt.ndpp(bank, new, k=4, alpha=0.0, beta=beta)
    later = calibrate.readings(bank, moved, scale)
    assert later['rho'] == pytest.approx(_rho_reference(bank, moved), rel=1e-4)
    assert later['rho'] > 2 and later['common_mode'] > 0.5
    warning = calibrate.overshoot(later)
    assert f"{later['rho']:.2f} nearest-neighbour distances" in warning
