"""Tests for bcl_jax.methods: variants, and the NDPP/ODPP refresh between steps."""

from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest

from bcl_jax import methods, perturbation, prototypes
from bcl_jax import step as step_lib
from bcl_jax.data.synthetic import SyntheticBenchmark, SyntheticSpec
from bcl_jax.methods import HookContext
from bcl_jax.stage import Reference, Trained
from tests import stages


def test_a_variant_is_its_method_with_other_settings():
    cfg = stages.config()
    cfg.variants = dict(odpp_neg='odpp perturb.perturb_negatives=True perturb.odpp.passes=30')
    method = methods.build('odpp_neg', cfg)
    assert isinstance(method, methods.REGISTRY['odpp']) and method.name == 'odpp_neg'
    assert method.config.perturb.perturb_negatives is True
    assert method.config.perturb.odpp.passes == 30
    assert cfg.perturb.perturb_negatives is False  # the run's config is untouched


@pytest.mark.parametrize(
    'spec, message',
    [
        ('odp perturb.perturb_negatives=True', "'odp' is not a method"),
        ('odpp perturb.no_such_field=1', 'cannot set perturb.no_such_field'),
        ('odpp perturb.perturb_negatives', 'is not field=value'),
        ('odpp perturb.odpp.passes=3.5', 'cannot set perturb.odpp.passes'),
    ],
)
def test_bad_variants_are_refused(spec, message):
    cfg = stages.config()
    cfg.variants = dict(v=spec)
    with pytest.raises(ValueError, match=message):
        methods.build('v', cfg)


def test_unknown_method_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown method 'btc'.*'bct'"):
        methods.build('btc', stages.config())


def _refresh_case(mode: str, beta: float | None = None, crowd: bool = False) -> SimpleNamespace:
    """An NDPP stage due to refresh at step 5 on a tiny benchmark (K = 3), with random unit
    old prototypes (`crowd`: all near one direction, as a trained old bank is) and a random
    new-prototype EMA."""
    spec = SyntheticSpec(
        image_size=stages.SIZE,
        train_families=2,
        siblings_per_family=3,
        train_images_per_class=3,
        test_images_per_class=4,
        queries_per_class=1,
    )
    source = SyntheticBenchmark(spec).split('train')
    model_cfg = stages.model_cfg()
    graphdef, params, stats = step_lib.init_model(model_cfg, source.num_classes, seed=2)
    model = Trained(graphdef, params, stats, model_cfg, source.num_classes, step=0)
    rng = np.random.default_rng(4)
    old = rng.normal(size=(source.num_classes, model_cfg.embedding_dim)).astype(np.float32)
    if crowd:
        old = old[:1] + 0.05 * old
    old /= np.linalg.norm(old, axis=1, keepdims=True)
    ema = rng.normal(size=old.shape).astype(np.float32)
    banks = dict(positive=jnp.asarray(old), new=jnp.asarray(ema))
    state = dict(params=params, batch_stats=stats, method=dict(banks=banks))
    run_cfg = stages.config(new_prototypes=mode)
    run_cfg.perturb.ndpp.k = 3
    if beta is not None:
        run_cfg.perturb.ndpp.beta = beta
    run_cfg.perturb.start_epochs, run_cfg.perturb.refresh_every_epochs = 0.0, 1.0
    cfg = run_cfg.perturb
    stage = stages.stage('ndpp', source=source, cfg=run_cfg, model=model_cfg)
    mesh = stages.mesh_of(8)
    reference = Reference(model, old, np.zeros(source.num_classes, np.int32))
    hooks = HookContext(stage, reference, graphdef, mesh, False, '/nonexistent', 5.0)
    return SimpleNamespace(**locals())


@pytest.mark.parametrize('mode', ['exact', 'ema'])
def test_refresh_bank_recomputes_the_perturbed_positives(mode):
    """A refresh feeds the current new prototypes (an exact pass over the data, or the
    normalised EMA) to NDPP and stores its output as the positive bank; ODPP's Δ stays put."""

    case = _refresh_case(mode)
    source, model, mesh, old, ema = case.source, case.model, case.mesh, case.old, case.ema
    cfg, stage, state, hooks = case.cfg, case.stage, case.state, case.hooks
    new_state, logged = stage.method.before_step(state, 5, hooks)
    assert logged['event'] == 'refresh'
    new_state = dict(bank=new_state['method']['banks'])
    assert stage.method.before_step(state, 6, hooks) == (state, None)  # due every 5 steps
    if mode == 'exact':
        q = prototypes.compute(
            model,
            source,
            num_classes=source.num_classes,
            mesh=mesh,
            batch_size=cfg.exact_batch_size,
        )
        np.testing.assert_allclose(new_state['bank']['new'], q, rtol=1e-5, atol=1e-6)
    else:
        q = ema / np.linalg.norm(ema, axis=1, keepdims=True)
        np.testing.assert_array_equal(new_state['bank']['new'], ema)  # the EMA keeps running
    want = perturbation.ndpp(old, q, k=3, alpha=cfg.ndpp.alpha, beta=cfg.ndpp.beta)
    np.testing.assert_allclose(new_state['bank']['positive'], want, rtol=1e-5, atol=1e-6)
    assert set(new_state['bank']) == {'positive', 'new'}
    shift = np.linalg.norm(np.asarray(want) - old, axis=1).mean()
    assert logged['mean_shift'] == pytest.approx(shift, rel=1e-4)
    # The strength reading: the shift in nearest-neighbour distances of the old bank.
    sims = old.astype(np.float64) @ old.T.astype(np.float64)
    np.fill_diagonal(sims, -np.inf)
    nn = np.linalg.norm(old - old[np.argmax(sims, axis=1)], axis=1).mean()
    assert logged['rho'] == pytest.approx(shift / nn, rel=1e-4)
    assert 0 <= logged['own_nearest'] <= 1 and 0 <= logged['common_mode'] <= 1


def test_a_refresh_beyond_the_strength_cap_warns_once(caplog):
    """A refresh that moves the prototypes more than calibrate.RHO_MAX nearest-neighbour
    distances (here a β far above the reference's, on a crowded old bank, against an unrelated
    new bank) warns, once per stage; the reference's β does not."""
    quiet = _refresh_case('ema')
    with caplog.at_level('WARNING'):
        _, logged = quiet.stage.method.before_step(quiet.state, 5, quiet.hooks)
    assert logged['rho'] < 1 and 'nearest-neighbour distances' not in caplog.text
    loud = _refresh_case('ema', beta=3.0, crowd=True)
    with caplog.at_level('WARNING'):
        _, logged = loud.stage.method.before_step(loud.state, 5, loud.hooks)
        loud.stage.method.before_step(loud.state, 10, loud.hooks)
    assert logged['rho'] > 1
    assert caplog.text.count('nearest-neighbour distances on average, beyond 1') == 1
    assert f"moved {logged['rho']:.2f} nearest-neighbour distances" in caplog.text


@pytest.mark.parametrize('perturb_negatives', [False, True])
def test_prototype_norm_mean_scales_the_negatives_by_the_class_mean_norms(perturb_negatives):
    """method.md §11's norm reading: negatives m_c·p_c (or m_c·p̃_c), the positive p̃ unit."""
    cfg = stages.config()
    cfg.perturb.prototype_norm = 'mean'
    cfg.perturb.perturb_negatives = perturb_negatives
    method = methods.build('ndpp', cfg)
    assert method.needs_class_stats and not methods.build('ndpp', stages.config()).needs_class_stats
    rng = np.random.default_rng(0)
    bank, perturbed = rng.standard_normal((2, 6, 4)).astype(np.float32)
    norms = rng.uniform(0.5, 0.9, 6).astype(np.float32)
    reference = Reference(None, bank, np.arange(6), {'mean_norms': norms})
    state = {'banks': {'positive': perturbed}}
    want = (perturbed if perturb_negatives else bank) * norms[:, None]
    np.testing.assert_allclose(method.negatives(reference, state), want, rtol=1e-6)
    assert method.positives(state) is perturbed
