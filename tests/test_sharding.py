"""Class-sharded heads and banks (bcl_jax.sharding), and 8 devices = 1 device.

Tiny models (CIFAR ResNet-8, width 4, 8×8 images) and 13 classes, which 8 devices do not
divide: the class axis is padded to 16 when sharded. Every comparison is against the same
computation on a 1-device mesh. Run with `-s` to see the 1M-class memory numbers.
"""

import re

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bcl_jax import (
    checkpoint,
    methods,
    metrics,
    odpp,
    perturbation,
    prototypes,
    sharding,
    train,
)
from bcl_jax import embed as embed_lib
from bcl_jax import step as step_lib
from bcl_jax.data.synthetic import SyntheticBenchmark, SyntheticSpec
from bcl_jax.methods import HookContext
from bcl_jax.stage import Reference, Stage, Trained, describe
from configs import common
from tests import stages

C, OLD_C, D, B, SIZE = 13, 5, 8, 16, 8
RTOL = 1e-5  # float32: max |a − b| / max |b|, per array

# Each method with another head, so that softmax (with its bias), CosFace and ArcFace all run.
HEADS = dict(
    independent='softmax', bct='arcface', bct_influence='cosface', l2='softmax', ndpp='cosface'
)
HEADS.update(odpp='arcface', lce='softmax', unibct='cosface', hot_refresh='arcface')
HEADS['advbct'] = 'softmax'


mesh_of = stages.mesh_of


def model_cfg(head='cosface', dim=D):
    return common.model(arch='cifar_resnet', width=4, depth=8, embedding_dim=dim, head=head)


def unit_rows(rng, n, d=D):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def max_rel(a, b):
    """The largest max |a − b| / max |b| over the leaves of two trees, and where."""
    worst, where = 0.0, ''
    la, tree_a = jax.tree_util.tree_flatten_with_path(a)
    lb, tree_b = jax.tree_util.tree_flatten_with_path(b)
    assert tree_a == tree_b
    for (path, x), (_, y) in zip(la, lb):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        assert x.shape == y.shape, jax.tree_util.keystr(path)
        err = np.abs(x - y).max(initial=0) / max(np.abs(y).max(initial=0), 1e-30)
        if "['fc1']['bias']" in jax.tree_util.keystr(path):
            # AdvBCT's discriminator: a BatchNorm follows fc1, so its bias's gradient is 0 in
            # exact arithmetic and float noise here; compared absolutely.
            err = np.abs(x - y).max(initial=0) * 1e-2
        if err > worst:
            worst, where = err, jax.tree_util.keystr(path)
    return worst, where


# --------------------------------------------------------------------------- the rule


def test_rule_shards_the_class_axes_and_pads_them():
    _, params, stats = step_lib.init_model(model_cfg('softmax'), C, 0)
    tx, _ = step_lib.make_optimizer(common.train(), 10.0)
    bank = np.zeros((C, D), np.float32)
    banks = dict(positive=bank, new=bank, delta=bank)
    state = step_lib.initial_state(params, stats, tx, dict(banks=banks))
    old = Trained(None, params, stats, model_cfg('softmax'), C, 0)
    reference = Reference(old, bank, np.zeros(C, np.int32))
    mesh = mesh_of(8)
    placed = dict(
        state=sharding.place(state, mesh, shard_classes=True)[0],
        reference=sharding.place(reference, mesh, shard_classes=True)[0],
    )
    specs = {
        jax.tree_util.keystr(p): (x.sharding.spec, x.shape)
        for p, x in jax.tree_util.tree_leaves_with_path(placed)
    }
    sharded = {k: v for k, v in specs.items() if v[0] != P()}
    assert sharded == {
        "['state']['params']['classifier']['kernel']": (P(None, 'data'), (D, 16)),
        "['state']['params']['classifier']['bias']": (P('data'), (16,)),
        "['state']['opt_state'][1][0].trace['classifier']['kernel']": (P(None, 'data'), (D, 16)),
        "['state']['opt_state'][1][0].trace['classifier']['bias']": (P('data'), (16,)),
        "['state']['method']['banks']['positive']": (P('data', None), (16, D)),
        "['state']['method']['banks']['new']": (P('data', None), (16, D)),
        "['state']['method']['banks']['delta']": (P('data', None), (16, D)),
        "['reference'].prototypes": (P('data', None), (16, D)),
        "['reference'].old_params['classifier']['kernel']": (P(None, 'data'), (D, 16)),
        "['reference'].old_params['classifier']['bias']": (P('data'), (16,)),
    }
    kernel = placed['state']['params']['classifier']['kernel']
    assert [s.data.shape for s in kernel.addressable_shards] == [(D, 2)] * 8
    np.testing.assert_array_equal(np.asarray(kernel)[:, C:], 0)  # the padding is zero
    np.testing.assert_array_equal(
        sharding.unpad(placed['state']['params'], C)['classifier']['kernel'],
        params['classifier']['kernel'],
    )
    # Unsharded: nothing padded, everything replicated.
    flat = sharding.place(state, mesh, shard_classes=False)[0]
    assert {x.sharding.spec for x in jax.tree.leaves(flat)} == {P()}
    assert flat['params']['classifier']['kernel'].shape == (D, C)


# --------------------------------------------------------------------------- train steps


def old_model():
    cfg = model_cfg('softmax')
    graphdef, params, stats = step_lib.init_model(cfg, OLD_C, seed=7)
    return Trained(graphdef, params, stats, cfg, OLD_C, step=0)


def make_stage(method, num_classes=C):
    """A stage of `method` on 13 classes (8 px images); ODPP with `perturb_negatives`, so that
    the other branch of L_comp runs too."""
    cfg = common.base_config()
    cfg.perturb.perturb_negatives = method == 'odpp'
    source = stages.RandomSource(n=2 * B, num_classes=num_classes, size=SIZE)
    train_cfg = common.train(batch_size=B, learning_rate=0.05, lr_drop_epochs=())
    return stages.stage(
        method, source=source, model=model_cfg(HEADS[method]), train=train_cfg, cfg=cfg
    )


def make_reference():
    """Random prototypes, and per-class statistics as LCE and AdvBCT read them (the old classes
    with >= 2 radii kept, the rest without statistics)."""
    rng = np.random.default_rng(3)
    old_label = np.array([i if i < OLD_C else -1 for i in range(C)], np.int32)
    stats = dict(
        centre_norms=rng.uniform(0.5, 0.9, C).astype(np.float32),
        max_angle=rng.uniform(0.2, 1.0, C).astype(np.float32),
        max_distance=rng.uniform(0.2, 1.0, C).astype(np.float32),
        kept=np.where(old_label >= 0, 3, 0).astype(np.int32),
    )
    return Reference(old_model(), unit_rows(rng, C), old_label, stats)


def method_state(method):
    """Banks as after a refresh (a perturbed positive bank unlike p, a running EMA)."""
    if method not in ('ndpp', 'odpp'):
        return {}
    rng = np.random.default_rng(4)
    banks = dict(positive=unit_rows(rng, C), new=rng.normal(size=(C, D)).astype(np.float32))
    if method == 'odpp':
        banks['odpp'] = jax.tree.map(np.asarray, odpp.odpp_initial_state(C, D))
    return dict(banks=banks)


def make_batches(n=2):
    rng = np.random.default_rng(0)
    return [
        dict(
            image=rng.integers(0, 256, (B, SIZE, SIZE, 3), dtype=np.uint8),
            label=rng.integers(0, C, B).astype(np.int32),
        )
        for _ in range(n)
    ]


_RUNS = {}


def two_steps(method, devices, shard_classes):
    """Two train steps of `step.build`'s set-up, as train.train runs them; cached (each costs a
    compilation)."""
    key = method, devices, shard_classes
    if key not in _RUNS:
        stage, mesh = make_stage(method), mesh_of(devices)
        reference = make_reference() if method != 'independent' else None
        setup = step_lib.build(stage, reference, mesh=mesh, shard_classes=shard_classes)
        state = stages.host(setup.state)
        if method in ('ndpp', 'odpp'):
            state['method'] = method_state(method)
        state, state_sharding = sharding.place(
            sharding.unpad(state, C), mesh, shard_classes=shard_classes
        )
        history = []
        for batch in make_batches():
            batch = jax.device_put(batch, NamedSharding(mesh, P('data')))
            state, m = setup.step_fn(state, batch, setup.reference)
            history.append(jax.tree.map(np.asarray, m))
        _RUNS[key] = dict(state=state, metrics=history, sharding=state_sharding)
        _RUNS[key].update(cfg=stage.model_cfg, graphdef=setup.graphdef, mesh=mesh)
    return _RUNS[key]


TERMS = dict(
    independent=(), bct=('comp',), bct_influence=('influence',), l2=('l2',), ndpp=('comp',)
)
TERMS.update(odpp=('comp',), lce=('align', 'boundary'), unibct=('uni',), hot_refresh=('ract',))
TERMS['advbct'] = ('boundary', 'adv')


# Every method, sharded and replicated, runs with `-m slow`; by default only the ones whose terms
# differ in kind (a prototype, a perturbed bank, Δ, a discriminator), to keep the default run short.
_DEFAULT_CASES = {('bct', True), ('ndpp', True), ('odpp', True), ('advbct', True), ('odpp', False)}
_CASES = [
    pytest.param(
        method,
        shard,
        id=f'{method}-{"sharded" if shard else "replicated"}',
        marks=[] if (method, shard) in _DEFAULT_CASES else [pytest.mark.slow],
    )
    for method in TERMS
    for shard in (True, False)
]


@pytest.mark.slow  # ~80 s in all; one step on 8 devices runs by default (test_step.py)
@pytest.mark.parametrize('method, shard_classes', _CASES)
def test_two_steps_on_8_devices_equal_1_device(method, shard_classes):
    r8, r1 = two_steps(method, 8, shard_classes), two_steps(method, 1, False)
    state8 = sharding.unpad(r8['state'], C)
    state1 = sharding.unpad(r1['state'], C)
    err_metrics = max_rel(r8['metrics'], r1['metrics'])
    err_state = max_rel(state8, state1)
    print(
        f'\n{method} {"sharded" if shard_classes else "replicated"}: max rel. error metrics '
        f'{err_metrics[0]:.2e}, state {err_state[0]:.2e} ({err_state[1]})'
    )
    assert err_metrics[0] < RTOL, err_metrics
    assert err_state[0] < RTOL, err_state
    assert set(r8['metrics'][0]) == {'cls', 'loss', *TERMS[method]}
    assert int(state8['step']) == 2 and int(state8['first_nonfinite_step']) == -1
    kernel = r8['state']['params']['classifier']['kernel']
    if shard_classes:
        assert kernel.sharding.spec == P(None, 'data') and kernel.shape == (D, 16)
        np.testing.assert_array_equal(np.asarray(kernel)[:, C:], 0)  # padding stays zero
        momentum = r8['state']['opt_state'][1][0].trace['classifier']['kernel']
        np.testing.assert_array_equal(np.asarray(momentum)[:, C:], 0)
        if 'banks' in r8['state']['method']:
            for x in jax.tree.leaves(r8['state']['method']['banks']):
                if x.ndim == 0:
                    continue
                assert x.sharding.spec == P('data', None)
                np.testing.assert_array_equal(np.asarray(x)[C:], 0)
    else:
        assert kernel.sharding.spec == P() and kernel.shape == (D, C)


def test_masked_padding_is_the_unpadded_loss():
    """The padding is invisible: the step on padded, sharded weights took the same values as
    the unpadded 1-device step (above); here directly, the losses with and without padding."""
    from bcl_jax import losses

    rng = np.random.default_rng(0)
    logits = rng.uniform(-1, 1, (B, C)).astype(np.float32)
    labels = rng.integers(0, C, B)
    padded = np.pad(logits, ((0, 0), (0, 3)))
    for kind in ('softmax', 'cosface', 'arcface'):
        want = losses.classification_loss(logits, labels, kind=kind)
        got = losses.classification_loss(padded, labels, kind=kind, num_classes=C)
        np.testing.assert_allclose(got, want, rtol=1e-6)
    emb, bank = unit_rows(rng, B), unit_rows(rng, C)
    pad = lambda x: np.pad(x, ((0, 3), (0, 0)))
    want = losses.compatibility_loss(emb, labels, bank, positive_prototypes=bank[::-1])
    got = losses.compatibility_loss(
        emb, labels, pad(bank), positive_prototypes=pad(bank[::-1]), num_classes=C
    )
    np.testing.assert_allclose(got, want, rtol=1e-6)


# --------------------------------------------------------------------------- 1M classes


_COLLECTIVE = re.compile(
    r'= (\([^)]*\)|\S+) (all-gather|all-to-all|collective-permute|all-reduce|reduce-scatter)'
    r'(?:-start)?\('
)


def collectives(hlo: str):
    """(kind, shape) of every collective of a compiled module (tuples as one shape string)."""
    found = [m for m in map(_COLLECTIVE.search, hlo.splitlines()) if m]
    return [(m.group(2), re.sub(r'\{[^}]*\}', '', m.group(1))) for m in found]  # no layouts


def dims(shape: str):
    return [int(d) for group in re.findall(r'\[([\d,]*)\]', shape) for d in group.split(',') if d]


def big_collectives(hlo: str, threshold: int):
    """Collectives that move an array with a dimension of at least `threshold`."""
    return [(k, s) for k, s in collectives(hlo) if any(d >= threshold for d in dims(s))]


def test_the_hlo_scanner_sees_an_all_gather_of_the_weights():
    """The check below is not vacuous: gathering a class-sharded kernel shows up."""
    mesh = mesh_of(8)
    kernel = NamedSharding(mesh, P(None, 'data'))
    gather = jax.jit(lambda w: w * 2, in_shardings=kernel, out_shardings=NamedSharding(mesh, P()))
    hlo = gather.lower(jax.ShapeDtypeStruct((D, 4000), np.float32)).compile().as_text()
    assert big_collectives(hlo, 4000) == [('all-gather', 'f32[8,4000]')]


def _abstract(tree, shardings):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=s),
        tree,
        shardings,
    )


class AllTerms(methods.REGISTRY['ndpp']):
    """Every loss term at once: NDPP's L_comp with the EMA, BCT influence and L2."""

    @property
    def weights(self):
        return {'comp': 1.0, 'influence': 1.0, 'l2': 1.0}

    def terms(self, inputs, reference, state):
        terms, state = super().terms(inputs, reference, state)
        for name in ('bct_influence', 'l2'):
            terms.update(methods.REGISTRY[name](self.config).terms(inputs, reference, state)[0])
        return terms, state


@pytest.mark.slow
def test_one_million_classes_take_an_eighth_of_the_memory_per_device():
    """A step with every loss term at once (L_cls, NDPP/ODPP's L_comp with the EMA, BCT
    influence, L2) at C = 1,000,000 on 8 devices, so every class-sized array a step can hold:
    the classifier and its momentum (D, C), the reference's bank and three state banks (C, D), the old
    classifier (D, 300,000). Compiled replicated and sharded, per-device memory compared; the
    sharded one runs a step, and its program moves nothing class-sized between devices."""
    num_classes, old_classes, dim = 1_000_000, 300_000, 16
    cfg = model_cfg('cosface', dim)
    old_cfg = model_cfg('softmax', dim)
    old_graphdef, old_params, old_stats = step_lib.init_model(old_cfg, old_classes, 1)
    old = Trained(old_graphdef, old_params, old_stats, old_cfg, old_classes, 0)
    graphdef, params, stats = step_lib.init_model(cfg, num_classes, seed=0)
    tx, _ = step_lib.make_optimizer(common.train(batch_size=B, lr_drop_epochs=()), 10.0)
    rng = np.random.default_rng(0)
    bank = unit_rows(rng, num_classes, dim)
    banks = dict(positive=bank, new=bank.copy())
    state = step_lib.initial_state(params, stats, tx, dict(banks=banks))
    old_label = np.where(np.arange(num_classes) < old_classes, np.arange(num_classes), -1)
    reference = Reference(old, bank.copy(), old_label.astype(np.int32))
    mesh = mesh_of(8)
    batch = make_batches(1)[0]
    batch['label'] = rng.integers(0, num_classes, B).astype(np.int32)
    rows = NamedSharding(mesh, P('data'))
    stats_of, programs = {}, {}
    for shard in (False, True):
        state_sharding = sharding.shardings(state, mesh, shard_classes=shard)
        reference_sharding = sharding.shardings(reference, mesh, shard_classes=shard)
        method = AllTerms(common.base_config())
        step = step_lib.jit_train_step(
            mesh,
            step_lib.make_train_step(
                graphdef, tx, method=method, model_cfg=cfg, num_classes=num_classes
            ),
            state_sharding,
            reference_sharding,
        )
        compiled = step.lower(
            _abstract(state, state_sharding),
            _abstract(batch, jax.tree.map(lambda _: rows, batch)),
            _abstract(reference, reference_sharding),
        ).compile()
        stats_of[shard], programs[shard] = compiled.memory_analysis(), (step, compiled)
    mib = lambda b: b / 2**20
    fields = ('argument_size_in_bytes', 'output_size_in_bytes', 'temp_size_in_bytes')
    print(f'\nper-device memory at C = {num_classes:,}, D = {dim}, batch {B}, 8 CPU devices:')
    for f in fields:
        rep, shd = getattr(stats_of[False], f), getattr(stats_of[True], f)
        print(
            f'  {f:24s} replicated {mib(rep):8.2f} MiB  sharded {mib(shd):8.2f} MiB  '
            f'ratio {shd / rep:.3f}'
        )
        # Arguments and outputs are 1/8 plus the replicated rest; temporaries hold some
        # batch-sized work per device besides their share, so their ratio sits a little higher.
        assert shd / rep < (0.25 if f == 'temp_size_in_bytes' else 0.2), f
    total = lambda s: sum(getattr(s, f) for f in fields) - s.alias_size_in_bytes
    ratio = total(stats_of[True]) / total(stats_of[False])
    print(
        f'  arguments + outputs + temporaries - aliased: {mib(total(stats_of[False])):.2f} '
        f'vs {mib(total(stats_of[True])):.2f} MiB, ratio {ratio:.3f}'
    )
    assert 0.1 < ratio < 0.2

    # The sharded program: no collective moves anything with a class-sized dimension.
    step, compiled = programs[True]
    hlo = compiled.as_text()
    print(f'  collectives of the sharded step: {sorted(set(collectives(hlo)))}')
    assert big_collectives(hlo, old_classes // 8) == []
    # ... while it does all-gather the (B, D) embeddings for the logits.
    assert ('all-gather', f'f32[{B},{dim}]') in collectives(hlo)

    # It runs; the placed state holds 1/8 of each class-sized array per device.
    placed, _ = sharding.place(state, mesh, shard_classes=True)
    placed_reference, _ = sharding.place(reference, mesh, shard_classes=True)
    on_device0 = sum(
        s.data.nbytes
        for x in jax.tree.leaves(placed)
        for s in x.addressable_shards
        if s.device == jax.devices()[0]
    )
    whole = sum(np.asarray(x).nbytes for x in jax.tree.leaves(state))
    print(
        f'  placed state: {mib(on_device0):.2f} MiB on device 0 of {mib(whole):.2f} MiB '
        f'({on_device0 / whole:.3f})'
    )
    assert on_device0 / whole < 0.2
    new_state, m = step(placed, jax.device_put(batch, rows), placed_reference)
    m = jax.tree.map(float, m)
    print(f'  one sharded step: {m}')
    assert all(np.isfinite(v) for v in m.values())
    kernel = new_state['params']['classifier']['kernel']
    assert kernel.sharding.spec == P(None, 'data')
    assert not np.array_equal(np.asarray(kernel), params['classifier']['kernel'])


# --------------------------------------------------------------------------- NDPP / ODPP


def bank_state(mesh, shard_classes):
    rng = np.random.default_rng(5)
    banks = dict(positive=unit_rows(rng, C), new=rng.normal(size=(C, D)).astype(np.float32))
    banks['odpp'] = dict(
        jax.tree.map(np.asarray, odpp.odpp_initial_state(C, D)),
        delta=(0.05 * rng.normal(size=(C, D))).astype(np.float32),
    )
    state, _ = sharding.place(dict(method=dict(banks=banks)), mesh, shard_classes=shard_classes)
    reference = Reference(old_model(), unit_rows(rng, C), np.zeros(C, np.int32))
    reference, _ = sharding.place(reference, mesh, shard_classes=shard_classes)
    return state, reference


@pytest.mark.parametrize('method', ['ndpp', 'odpp'])
def test_refresh_on_sharded_banks_equals_1_device(method):
    """The refresh as train.train calls it: NDPP's sharded search, ODPP on a sharded Δ."""
    run_cfg = common.base_config()
    cfg = run_cfg.perturb
    cfg.ndpp.k, cfg.odpp.k, cfg.odpp.passes, cfg.odpp.pairs_per_step = 4, 4, 20, 8
    cfg.odpp.margin_old = cfg.odpp.margin_new = 0.0  # so that the hinges are active
    cfg.start_epochs = 0.0
    out = {}
    for devices, shard in ((8, True), (1, False)):
        mesh = mesh_of(devices)
        state, reference = bank_state(mesh, shard)
        stage = Stage('new', None, None, None, C, 0, methods.build(method, run_cfg), {})
        hooks = HookContext(stage, reference, None, mesh, shard, '', 1.0)
        new_state, stats = stage.method.before_step(state, 3, hooks)
        out[devices] = new_state['method'], stats
    (s8, stats8), (s1, stats1) = out[8], out[1]
    for x in jax.tree.leaves(s8['banks']):
        if x.ndim:
            assert x.sharding.spec == P('data', None) and x.shape == (16, D)
    err = max_rel(sharding.unpad(s8, C), sharding.unpad(s1, C))
    print(f'\n{method} refresh, 8 devices sharded vs 1: max rel. error {err[0]:.2e} ({err[1]})')
    assert err[0] < RTOL, err
    numbers = lambda d: {k: v for k, v in d.items() if k != 'event'}
    assert stats8['event'] == stats1['event'] == 'refresh'
    assert max_rel(numbers(stats8), numbers(stats1))[0] < RTOL
    moved = np.asarray(s1['banks']['positive']) - np.asarray(
        bank_state(mesh_of(1), False)[1].prototypes
    )
    assert np.abs(moved).max() > 1e-3  # the perturbation did something


def test_odpp_neighbour_pairs_and_penalty_on_a_sharded_delta():
    rng = np.random.default_rng(6)
    old, new = unit_rows(rng, C), unit_rows(rng, C)
    delta0 = (0.05 * rng.normal(size=(C, D))).astype(np.float32)
    options = dict(
        steps=12,
        pairs_per_step=8,
        pairs='neighbours',
        k=3,
        gamma=0.1,
        margin_old=0.0,
        margin_new=0.0,
        learning_rate=1e-2,
    )
    key = jax.random.key(2)
    start = lambda rows: dict(  # a warm start from Δ = delta0 with a fresh Adam state
        perturbation.odpp_initial_state(rows, D), delta=np.pad(delta0, ((0, rows - C), (0, 0)))
    )
    want, want_log = perturbation.odpp(old, new, start(C), key, warm_start=True, **options)
    want, want_curve = want['delta'], want_log['loss']
    pad = lambda x: np.pad(x, ((0, 3), (0, 0)))
    mesh = jax.make_mesh((8,), ('data',))  # Explicit axes, as jax.make_mesh makes by default
    got, log = perturbation.odpp(
        pad(old), pad(new), start(16), key, warm_start=True, num_classes=C, mesh=mesh, **options
    )
    got, curve = got['delta'], log['loss']
    assert got.sharding.spec == P('data', None) and got.shape == (16, D)
    np.testing.assert_array_equal(np.asarray(got)[C:], 0)
    assert max_rel(np.asarray(got)[:C], want)[0] < RTOL
    assert max_rel(curve, want_curve)[0] < RTOL
    assert np.abs(np.asarray(want) - delta0).max() > 1e-3


def test_odpp_on_a_sharded_delta_moves_only_pair_sized_arrays():
    """Each inner step's row lookups p[i], Δ[i], p[j], Δ[j], q[j] on the class-sharded banks
    become masked local gathers and one all-reduce of five (pairs, D) arrays; the gradient's
    scatter-adds stay local. Nothing (C, D)-sized moves, and each device holds 1/8 of the banks."""
    c, pairs = 4096, 64
    mesh = mesh_of(8)
    rows = NamedSharding(mesh, P('data', None))
    bank = jax.ShapeDtypeStruct((c, D), np.float32, sharding=rows)
    compiled = odpp._odpp_jit.lower(
        bank,
        bank,
        bank,
        jax.random.key(0),
        jax.ShapeDtypeStruct((c, 1), np.int32, sharding=NamedSharding(mesh, P())),
        (
            np.float32(1e-3),
            np.float32(0.9),
            np.float32(0.9),
            np.float32(1),
            np.float32(1),
            np.float32(0),
        ),
        steps=2,
        pairs_per_step=pairs,
        pairs='random',
        use_gamma=False,
        num_classes=c,
        sharding=rows,
    ).compile()
    found = collectives(compiled.as_text())
    print(f'\nODPP step collectives on a class-sharded Δ (C = {c}, {pairs} pairs): {found}')
    assert big_collectives(compiled.as_text(), c // 8) == []
    assert found == [('all-reduce', '(' + ', '.join([f'f32[{pairs},{D}]'] * 5) + ')')]
    assert compiled.memory_analysis().argument_size_in_bytes < 3 * c * D * 4 / 8 + 4096


# --------------------------------------------------------------------------- means and evaluation


def tiny_benchmark():
    spec = SyntheticSpec(
        image_size=SIZE,
        train_families=C,
        siblings_per_family=1,
        test_siblings_per_family=1,
        train_images_per_class=2,
        test_images_per_class=3,
        queries_per_class=1,
    )
    return SyntheticBenchmark(spec)


def trained(devices, shard_classes):
    r = two_steps('independent', devices, shard_classes)
    state = r['state']
    return Trained(r['graphdef'], state['params'], state['batch_stats'], r['cfg'], C, step=2)


def test_prototypes_and_evaluation_with_a_class_sharded_model():
    bench = tiny_benchmark()
    m8, m1 = trained(8, True), trained(1, False)
    assert m8.params['classifier']['kernel'].sharding.spec == P(None, 'data')
    # The padding and the layout are not part of a model's identity.
    unpadded = sharding.unpad((m8.params, m8.batch_stats), C)
    assert m8.identity() == Trained(m8.graphdef, *unpadded, m8.model_cfg, C, 2).identity()

    kw = dict(num_classes=C, batch_size=B)
    source = bench.split('train')
    bank8 = prototypes.compute(m8, source, mesh=mesh_of(8), shard_classes=True, **kw)
    bank1 = prototypes.compute(m1, source, mesh=mesh_of(1), **kw)
    assert bank8.shape == bank1.shape == (C, D)
    err = max_rel(bank8, bank1)
    print(f'\nprototypes.compute, 8 devices sharded vs 1: max rel. error {err[0]:.2e}')
    assert err[0] < RTOL

    emb = {}
    for name, model, mesh in (('8', m8, mesh_of(8)), ('1', m1, mesh_of(1))):
        emb[name] = [
            embed_lib.embed(model, bench.split(s), mesh=mesh, batch_size=B)
            for s in ('query', 'gallery')
        ]
    err = max_rel(emb['8'], emb['1'])
    print(f'evaluate.embed, 8 devices sharded vs 1: max rel. error {err[0]:.2e}')
    assert err[0] < RTOL
    labels = [bench.split(s).labels for s in ('query', 'gallery')]
    scores = {
        name: metrics.retrieval_metrics(q, labels[0], g, labels[1], ks=(1, 5))
        for name, (q, g) in emb.items()
    }
    print(f'retrieval metrics: 8 devices {scores["8"]}, 1 device {scores["1"]}')
    assert scores['8'] == pytest.approx(scores['1'], rel=RTOL)


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize(
    'devices, shard_classes', [(1, False), (4, True), (8, False)], ids=['1dev', '4dev', '8dev-rep']
)
def test_checkpoint_of_8_sharded_devices_restores_on_another_mesh(tmp_path, devices, shard_classes):
    """Saved as train.train saves (class axis padded to 16, split over 8 devices); restored as
    train.train resumes: onto a template laid out for the current mesh."""
    r = two_steps('ndpp', 8, True)
    ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=None)
    meta = dict(stage='new_ndpp', model=describe(r['cfg']), num_classes=C)
    ckpt.save(2, r['state'], {'position': 2}, meta)
    ckpt.close()

    mesh = mesh_of(devices)
    initial = step_lib.build(make_stage('ndpp'), make_reference(), mesh=mesh, shard_classes=False)
    initial = sharding.unpad(initial.state, C)
    template, want_sharding = sharding.place(initial, mesh, shard_classes=shard_classes)
    ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=None, read_only=True)
    state, data_state, _ = ckpt.restore(2, template, meta, strict=False)
    ckpt.close()
    assert data_state == {'position': 2}
    rows = 16 if shard_classes else C
    assert state['method']['banks']['new'].shape == (rows, D)
    got_sharding = jax.tree.map(lambda x: x.sharding, state)
    assert got_sharding == want_sharding
    assert {x.sharding.mesh for x in jax.tree.leaves(state)} == {mesh}
    saved = jax.tree.map(np.asarray, sharding.unpad(r['state'], C))
    restored = jax.tree.map(np.asarray, sharding.unpad(state, C))
    jax.tree.map(np.testing.assert_array_equal, restored, saved)
    if shard_classes:
        np.testing.assert_array_equal(np.asarray(state['method']['banks']['new'])[C:], 0)

    # train.load (a given old model) lays the weights out the same way.
    model = train.load(str(tmp_path), r['cfg'], C, mesh, shard_classes=shard_classes)
    assert jax.tree.map(lambda x: x.sharding, model.params) == want_sharding['params']
    jax.tree.map(
        np.testing.assert_array_equal,
        sharding.unpad(model.params, C),
        sharding.unpad(r['state']['params'], C),
    )
