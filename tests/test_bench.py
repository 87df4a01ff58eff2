"""bcl_jax.bench: the measurements at --quick sizes, the command line, the results file, and that
the PyTorch step that torch_step times is bcl_jax's step (same loss from the same weights).

Only the plumbing and the agreements are tested; no timing is judged. torch and torchvision are
required (requirements-test.txt): the torch tests are not skipped.
"""

import ast
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from bcl_jax import bench
from bcl_jax.bench import benchmark_step, eval_topk, registry, torch_step, train_step
from bcl_jax.bench.harness import alternating_blocks, random_unit_np
from bcl_jax.models.heads import build_model

REPO = pathlib.Path(__file__).resolve().parents[1]
QUICK = bench.config(quick=True)


def run_bench(*args, cwd=REPO, timeout=300):
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')])
    )
    return subprocess.run(
        [sys.executable, '-m', 'bcl_jax.bench', *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=env,
    )


# ----------------------------------------------------------------------------------------------
# Command line and results file
# ----------------------------------------------------------------------------------------------


def test_quick_refresh_run_writes_under_runs_and_nothing_in_the_cwd(tmp_path):
    """The default run (floor, ndpp, odpp) at --quick sizes, without --out, from another folder:
    the results land in the checkout's runs/bench/, the current directory stays empty."""
    done = run_bench('--quick', cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert list(tmp_path.iterdir()) == []
    path = pathlib.Path(done.stdout.strip().splitlines()[-1].removeprefix('results: '))
    try:
        assert path.parent == REPO / 'runs' / 'bench' and path.name.startswith('bench-')
        report = json.loads(path.read_text())
    finally:
        path.unlink(missing_ok=True)
    assert set(report) == {'config', 'environment', 'results'}
    assert report['config']['quick'] and report['config']['classes'] == 600
    results = report['results']
    assert list(results) == ['floor', 'ndpp', 'odpp']
    assert results['floor']['seconds'] > 0 and results['floor']['gflops'] > 0
    assert results['ndpp']['ratio_to_floor'] > 0 and results['ndpp']['target_ratio'] == 2.0
    odpp = results['odpp']
    # passes_to_steps: ceil(passes * C / pairs_per_step) = ceil(2 * 300 / 64) = 10
    assert (odpp['classes'], odpp['passes'], odpp['pairs_per_step'], odpp['steps']) == (
        300,
        2.0,
        64,
        10,
    )
    assert odpp['ratio_to_ndpp'] > 0 and odpp['target_ratio'] == 10.0


def test_help_fits_one_screen_and_names_every_size():
    done = run_bench('--help')
    assert done.returncode == 1  # absl's --help exits with 1
    lines = done.stdout.splitlines()
    assert 10 < len(lines) <= 40, done.stdout
    assert max(len(line) for line in lines) <= 100
    for name, size in bench.SIZES.items():
        default = str(size.default).lower() if isinstance(size.default, bool) else size.default
        assert f'--{name}={default}' in done.stdout
    for flag in ('--measure', '--out', '--[no]quick'):
        assert flag in done.stdout


def test_quick_sizes_and_given_sizes():
    assert QUICK['step_batch'] == 8 and QUICK['quick'] is True
    cfg = bench.config(quick=True, step_batch=4)
    assert cfg['step_batch'] == 4 and cfg['step_image_size'] == 32
    assert bench.config()['classes'] == 81313
    with pytest.raises(ValueError, match="unknown sizes \\['step_bach'\\]"):
        bench.config(step_bach=4)
    with pytest.raises(ValueError, match='unknown measurements'):
        bench.run(QUICK, ['flor'])


def test_write_json_replaces_atomically(tmp_path):
    path = tmp_path / 'deeper' / 'out.json'
    assert registry.write_json({'a': 1}, path) == path
    registry.write_json({'a': 2}, path)
    assert json.loads(path.read_text()) == {'a': 2}
    with pytest.raises(TypeError):
        registry.write_json({'a': object()}, path)  # fails half-way through the dump
    assert json.loads(path.read_text()) == {'a': 2}  # the old results, whole
    assert [p.name for p in path.parent.iterdir()] == ['out.json']  # no temporary left


def test_default_out_path_is_new_and_in_runs_bench():
    path = registry.default_out_path()
    assert path.parent == REPO / 'runs' / 'bench' and not path.exists()
    assert path.name.startswith('bench-') and path.suffix == '.json'


def _imports(path: pathlib.Path):
    """(function name or '<module>', imported module name) for every import in a file."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom):
                    found += [(node.name, f'{inner.module}.{a.name}') for a in inner.names]
        elif isinstance(node, ast.ImportFrom) and node in tree.body:
            found += [('<module>', f'{node.module}.{a.name}') for a in node.names]
        elif isinstance(node, ast.Import) and node in tree.body:
            found += [('<module>', a.name) for a in node.names]
    return found


def test_bench_builds_its_step_in_one_function_and_imports_no_configs():
    """The benchmark times the step training builds (bcl_jax.step.build), set up in one place."""
    users = set()
    for path in (REPO / 'bcl_jax' / 'bench').glob('*.py'):
        for where, module in _imports(path):
            assert not module.startswith('configs'), (path.name, where)
            if module.startswith(('bcl_jax.step', 'bcl_jax.train')):
                users.add((path.name, where, module))
    assert users == {('train_step.py', '<module>', 'bcl_jax.step')}
    tree = ast.parse((REPO / 'bcl_jax' / 'bench' / 'train_step.py').read_text())
    builders = {
        f.name
        for f in ast.walk(tree)
        if isinstance(f, ast.FunctionDef)
        for n in ast.walk(f)
        if isinstance(n, ast.Attribute)
        and n.attr == 'build'
        and getattr(n.value, 'id', '') == 'step'
    }
    assert builders == {'jax_train_step'}


def test_gldv2_spec_is_what_the_gldv2_configs_set():
    from configs import gldv2

    config, spec = gldv2.get_config(), train_step.gldv2_spec()
    for ours, theirs in (
        (spec.old_model, config.old.model),
        (spec.new_model, config.new.model),
        (spec.train, config.new.train),
        (spec.compat, config.compat),
        (spec.perturb, config.perturb),
    ):
        for key, value in ours.items():
            assert theirs[key] == value, key
    assert set(spec.new_model) == set(config.new.model)
    assert set(spec.perturb) == set(config.perturb)


def test_synthetic_spec_and_sizes_are_what_the_synthetic_config_sets():
    from configs import synthetic

    config, spec = synthetic.get_config(), benchmark_step.synthetic_spec()
    for ours, theirs in (
        (spec.new_model, config.new.model),
        (spec.train, config.new.train),
        (spec.compat, config.compat),
        (spec.perturb, config.perturb),
    ):
        assert set(ours) <= set(theirs)
        for key, value in ours.items():
            assert theirs[key] == value, key
    assert set(spec.new_model) == set(config.new.model)
    data, sizes = config.data, bench.config()
    assert sizes['benchmark_image_size'] == data.image_size
    assert sizes['benchmark_batch'] == config.new.train.batch_size
    classes = data.synthetic.train_families * data.synthetic.siblings_per_family
    assert sizes['benchmark_classes'] == classes and data.validation_fraction == 0


def test_alternating_blocks_reverse_every_other_round():
    order = []
    blocks = {name: (lambda name=name: order.append(name) or [len(order)]) for name in 'ab'}
    assert alternating_blocks(blocks, rounds=3) == {'a': [1, 4, 5], 'b': [2, 3, 6]}
    assert ''.join(order) == 'abbaab'


# ----------------------------------------------------------------------------------------------
# eval_topk
# ----------------------------------------------------------------------------------------------

KEYS = {
    'seconds',
    'all_seconds',
    'warmup_seconds',
    'runs',
    'queries',
    'index',
    'dim',
    'k',
    'query_block',
    'gallery_block',
    'faiss',
    'memory',
    'target_ratio',
}


@pytest.fixture(scope='module')
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp('bench') / 'bench.json'
    done = run_bench('--quick', '--measure=eval_topk', f'--out={out}')
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_eval_topk_quick_keys(quick_report):
    assert list(quick_report['results']) == ['eval_topk']
    result = quick_report['results']['eval_topk']
    assert KEYS <= set(result)
    sizes = (result['queries'], result['index'], result['dim'], result['k'])
    assert sizes == (50, 3000, 32, 10)  # the quick sizes
    assert len(result['all_seconds']) == result['runs'] == 1
    memory = result['memory']
    assert memory['full_matrix_bytes'] == 4 * 50 * 3000
    assert memory['score_block_bytes'] == 4 * 25 * 1024  # 50 queries split into 2 blocks of 25
    assert memory['temp_bytes'] is None or memory['temp_bytes'] > 0
    faiss = result['faiss']
    if faiss['available']:
        assert {'ratio_to_faiss', 'paired_ratios_to_faiss', 'agreement'} <= set(result)
    else:
        assert 'error' in faiss and 'ratio_to_faiss' not in result


def test_eval_topk_quick_agrees_with_faiss(quick_report):
    pytest.importorskip('faiss')
    result = quick_report['results']['eval_topk']
    faiss = result['faiss']
    assert faiss['available'] and faiss['threads'] >= 1
    assert {'add_seconds', 'seconds', 'all_seconds', 'version'} <= set(faiss)
    agreement = result['agreement']
    assert agreement['queries_set_differs_beyond_ties'] == 0
    assert agreement['ranks_score_within_tol'] == 1.0
    assert agreement['queries_same_set'] >= 0.9 * result['queries']


def test_eval_topk_without_faiss(monkeypatch):
    monkeypatch.setitem(sys.modules, 'faiss', None)  # `import faiss` raises ImportError
    result = bench.MEASUREMENTS['eval_topk'](dict(QUICK), {})
    assert KEYS <= set(result)
    assert result['faiss']['available'] is False and 'faiss' in result['faiss']['error']
    assert 'ratio_to_faiss' not in result and 'agreement' not in result


def test_topk_agreement_tolerates_ties_only():
    scores = np.array([[0.9, 0.5, 0.3], [0.8, 0.7, 0.6]], np.float32)
    idx = np.array([[4, 1, 7], [0, 2, 5]])
    # Row 0: items 7 and 8 tie at the cut-off (a swap); row 1: item 9 is no tie for 2.
    other_scores = np.array([[0.9, 0.5, 0.3 + 1e-7], [0.8, 0.6, 0.6]], np.float32)
    other_idx = np.array([[4, 1, 8], [0, 5, 9]])
    got = eval_topk.topk_agreement(scores, idx, other_scores, other_idx)
    assert got['queries_same_set'] == 0 and got['queries_same_order'] == 0
    assert got['queries_set_differs_beyond_ties'] == 1
    assert got['ranks_score_within_tol'] == pytest.approx(5 / 6)
    assert eval_topk.topk_agreement(scores, idx, scores, idx)['fraction_same_set'] == 1.0


# ----------------------------------------------------------------------------------------------
# train_step and torch_step
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_step_measurement_quick(tmp_path):
    """The train_step measurement builds and runs every model's step (no timing is judged)."""
    out = tmp_path / 'bench.json'
    done = run_bench('--quick', '--measure=train_step', f'--out={out}', timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(out.read_text())['results']['train_step']
    assert set(r['steps']) == {
        'old_resnet18',
        'new_resnet50_independent',
        'new_resnet50_bct',
        'new_resnet50_ndpp',
        'new_resnet50_odpp',
    }
    for timing in r['steps'].values():
        assert timing['images_per_sec'] == pytest.approx(r['batch'] / timing['seconds'])
    assert set(r['ratio_to_bct']) == {'ndpp', 'odpp'}


TORCH_KEYS = {
    'available',
    'torch',
    'torchvision',
    'device',
    'device_name',
    'threads',
    'settings',
    'steps',
    'image_size',
    'batch',
    'classes',
    'target_ratio',
}


def test_torch_step_without_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, 'torch', None)  # find_spec (and import) see no torch
    result = bench.MEASUREMENTS['torch_step'](dict(QUICK), {})
    assert result == {'available': False, 'error': "No module named 'torch'"}


@pytest.mark.slow  # ~25 s: a PyTorch child process (the default run stays under 10 min)
def test_torch_step_measurement_quick():
    """At --quick sizes, eager only, with a stand-in train_step result."""
    jax_step = {'devices': 2, 'steps': {'new_resnet50_bct': {'images_per_sec': 4.0}}}
    r = bench.MEASUREMENTS['torch_step'](dict(QUICK), {'train_step': jax_step})
    assert TORCH_KEYS <= set(r), r.get('error')
    assert (r['image_size'], r['batch'], r['classes']) == (32, 8, 100)  # the quick sizes
    assert set(r['steps']) == {'eager'}
    eager = r['steps']['eager']
    assert eager['runs'] == len(eager['all_seconds']) == 1
    assert eager['images_per_sec'] == pytest.approx(8 / eager['seconds'])
    assert np.isfinite(eager['first_loss'])
    settings = r['settings']
    assert settings['channels_last'] and settings['cudnn_benchmark']
    assert settings['jax_default_matmul_precision'] is None  # JAX's default: TF32 on the GPU
    assert settings['matmul_allow_tf32'] and settings['cudnn_allow_tf32']
    assert r['jax_to_torch'] == {'eager': pytest.approx(2.0 / eager['images_per_sec'])}


@pytest.mark.slow
def test_torch_step_compiled_quick():
    """torch.compile (inductor; a minute or more on 2 CPU cores) runs and is timed beside eager."""
    r = bench.MEASUREMENTS['torch_step'](dict(QUICK, torch_compile=True), {})
    assert set(r['steps']) == {'eager', 'compiled'}, r.get('error')
    compiled = r['steps']['compiled']
    assert 'error' not in compiled, compiled.get('error')
    assert compiled['runs'] == 1 and np.isfinite(compiled['first_loss'])
    # Same weights (seed 0) and batch: eager and compiled start from the same loss.
    assert compiled['first_loss'] == pytest.approx(r['steps']['eager']['first_loss'], rel=1e-4)


def _nonzero_residual_scales(tree, rng):
    """bcl_jax zero-initialises each residual branch's last BatchNorm scale (bn3), which would
    leave the blocks' convolutions out of the loss: draw those from U(0.1, 0.3) instead."""
    if 'scale' in tree and 'bias' in tree:
        scale = np.asarray(tree['scale'])
        drawn = rng.uniform(0.1, 0.3, scale.shape)
        return dict(tree, scale=np.where(scale == 0, drawn, scale).astype(np.float32))
    return {
        k: _nonzero_residual_scales(v, rng) if isinstance(v, dict) else v for k, v in tree.items()
    }


def _bcl_jax_steps(spec, params, stats, bank, batch, classes, **state_kw):
    """Losses (loss, cls, comp) and weights, as torch state dicts (`torch_state(..., **state_kw)`),
    after each of two steps."""
    mesh = jax.make_mesh(
        (1,), ('data',), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1]
    )
    built = train_step.jax_train_step(
        spec.new_model,
        'bct',
        spec,
        classes=classes,
        mesh=mesh,
        prototypes=bank,
        weights=(params, stats),
    )
    state, losses, weights = built.state, [], []
    for _ in range(2):
        state, metrics = built.step(state, batch)
        losses.append([float(metrics[k]) for k in ('loss', 'cls', 'comp')])
        weights.append(torch_step.torch_state(*jax.device_get(built.weights(state)), **state_kw))
    return np.array(losses), weights


def _torch_steps(spec, params, stats, bank, batch, classes, **state_kw):
    """The same for torch_step's module and optimizer, from the same weights."""
    model_cfg = spec.new_model
    module = torch_step.torch_bct_module(
        classes,
        dim=model_cfg.embedding_dim,
        scale=model_cfg.scale,
        margin=model_cfg.margin,
        temperature=spec.compat.temperature,
        weight=spec.compat.weight,
        prototypes=bank,
        backbone=state_kw.get('backbone'),
    )
    torch_step.load_state(module, torch_step.torch_state(params, stats, **state_kw))
    module = module.to(memory_format=torch.channels_last).train()
    optimizer, _ = torch_step.torch_sgd(
        module,
        lr=spec.train.learning_rate,
        momentum=spec.train.momentum,
        weight_decay=spec.train.weight_decay,
    )
    images, labels = torch.from_numpy(batch['image']), torch.from_numpy(batch['label']).long()
    losses, weights = [], []
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        out = module(images, labels)
        out[0].backward()
        optimizer.step()
        losses.append([float(x.detach()) for x in out])
        weights.append({k: v.detach().numpy().copy() for k, v in module.named_parameters()})
    return np.array(losses), weights


@pytest.mark.slow
def test_torch_step_matches_bcl_jax_step():
    """The PyTorch step that torch_step times is bcl_jax's BCT step: from the same weights
    (bcl_jax's ResNet-50, converted) and batch, the loss and both terms agree at the first step;
    the first SGD update (momentum, weight decay) agrees in the head and the last stage, and the
    loss at the second step agrees. Earlier stages' gradients are left out: through the stack of
    small-batch BatchNorms they are ill-conditioned, and PyTorch's float32 CPU BatchNorm backward
    strays ~1e-3-3e-2 from a float64 reference there where bcl_jax's stays ~1e-5."""
    spec, classes = train_step.gldv2_spec(), 10
    params, stats, bank = _starting_point(spec, classes)
    batch = train_step.random_batch(8, 64, classes)
    jax_losses, jax_weights = _bcl_jax_steps(spec, params, stats, bank, batch, classes)
    torch_losses, torch_weights = _torch_steps(spec, params, stats, bank, batch, classes)

    assert np.all(jax_losses > 0.1)  # not a trivial loss
    print('first step, bcl_jax', jax_losses[0], 'torch', torch_losses[0])
    np.testing.assert_allclose(torch_losses[0], jax_losses[0], rtol=1e-6)
    start = torch_step.torch_state(params, stats)
    diffs = _first_update_differences(start, jax_weights[0], torch_weights[0])
    head = {k: v for k, v in diffs.items() if k.startswith(('backbone.layer4.', 'proj.', 'kernel'))}
    assert len(head) == 1 + 2 + 3 * 9 + 3  # kernel, proj, layer4's blocks and shortcut
    print('update differences, median', np.median(list(diffs.values())), 'max', max(diffs.values()))
    print('second step, bcl_jax', jax_losses[1], 'torch', torch_losses[1])
    assert max(head.values()) < 1e-3, sorted(head.items(), key=lambda kv: -kv[1])[:3]
    np.testing.assert_allclose(torch_losses[1], jax_losses[1], rtol=3e-4)
    assert not np.allclose(jax_losses[1], jax_losses[0], rtol=1e-3)  # the update mattered


def _starting_point(spec, classes: int):
    """(params, stats, bank): the new model's seeded weights as NumPy copies (the bcl_jax step
    donates the device buffers it starts from), residual scales made nonzero so that every
    convolution counts, and a random prototype bank."""
    model = build_model(spec.new_model, classes, rngs=nnx.Rngs(0))
    _, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    params = jax.device_get(nnx.to_pure_dict(params))
    params = _nonzero_residual_scales(params, np.random.default_rng(1))
    stats = jax.device_get(nnx.to_pure_dict(stats))
    return params, stats, random_unit_np(2, classes, spec.new_model.embedding_dim)


def _first_update_differences(start, jax_after, torch_after):
    """Per weight: |bcl_jax's first update - PyTorch's| / max |PyTorch's update|."""
    diffs = {}
    for name, after in torch_after.items():
        update = start[name] - after
        diffs[name] = np.abs(start[name] - jax_after[name] - update).max() / np.abs(update).max()
    return diffs


@pytest.mark.slow
def test_benchmark_torch_step_matches_bcl_jax_step():
    """benchmark_step's PyTorch step is bcl_jax's for the built-in benchmark's CIFAR ResNet-8
    (bcl_jax's own PyTorch ResNet): from the same weights (residual scales made nonzero, so that
    every convolution counts) and batch, the losses of two steps agree, and so does the first
    update of every weight (this net is shallow enough for its BatchNorm gradients to agree)."""
    spec, classes = benchmark_step.synthetic_spec(), 10
    kw = {'arch': 'cifar_resnet', 'backbone': benchmark_step.torch_backbone_spec(spec.new_model)}
    params, stats, bank = _starting_point(spec, classes)
    batch = train_step.random_batch(16, 16, classes)
    jax_losses, jax_weights = _bcl_jax_steps(spec, params, stats, bank, batch, classes, **kw)
    torch_losses, torch_weights = _torch_steps(spec, params, stats, bank, batch, classes, **kw)

    assert np.all(jax_losses > 0.1)
    np.testing.assert_allclose(torch_losses[0], jax_losses[0], rtol=1e-6)
    start = torch_step.torch_state(params, stats, **kw)
    diffs = _first_update_differences(start, jax_weights[0], torch_weights[0])
    assert len(diffs) == 3 + 3 * 6 + 2 * 3 + 2 + 1  # stem, blocks, shortcuts, proj, kernel
    print('update differences, max', max(diffs.values()))
    print('second step, bcl_jax', jax_losses[1], 'torch', torch_losses[1])
    assert max(diffs.values()) < 1e-3, sorted(diffs.items(), key=lambda kv: -kv[1])[:3]
    np.testing.assert_allclose(torch_losses[1], jax_losses[1], rtol=1e-5)
    assert not np.allclose(jax_losses[1], jax_losses[0], rtol=1e-3)


# ----------------------------------------------------------------------------------------------
# benchmark_step
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def one_cpu_device(monkeypatch):
    """The fake devices of conftest.py left out: XLA's pool would have a thread per device."""
    monkeypatch.setenv('XLA_FLAGS', '')


@pytest.mark.slow  # ~30 s: JAX compiles the step, a PyTorch child process starts
def test_benchmark_step_quick(tmp_path, one_cpu_device):
    """The built-in benchmark's model's step in JAX and PyTorch (eager), in turn, at --quick
    sizes (~30 s): both timed, the ratio from them, the same model and thread count in both."""
    out = tmp_path / 'bench.json'
    done = run_bench('--quick', '--measure=benchmark_step', f'--out={out}')
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(out.read_text())['results']['benchmark_step']
    assert r['available'] and 'error' not in r, r.get('error')
    assert (r['image_size'], r['batch'], r['classes']) == (16, 32, 1000)  # the quick sizes
    assert r['model'] == benchmark_step.synthetic_spec().new_model.to_dict()
    assert set(r['steps']) == {'jax', 'torch_eager'}  # --quick leaves torch.compile out
    for timing in r['steps'].values():
        assert timing['runs'] == len(timing['all_seconds']) == 2 * 2  # rounds x steps
        assert timing['median_seconds'] == pytest.approx(np.median(timing['all_seconds']))
        assert timing['images_per_sec'] == pytest.approx(32 / timing['median_seconds'])
    jax_rate, torch_rate = (r['steps'][k]['images_per_sec'] for k in ('jax', 'torch_eager'))
    assert r['jax_to_torch'] == {'eager': pytest.approx(jax_rate / torch_rate)}
    threads = r['threads']
    assert threads['jax'] == threads['torch'] >= 1 and threads['jax_from'].startswith('counted')
    same = r['same_model']
    assert same['parameters']['jax'] == same['parameters']['torch'] > 0
    assert same['batch_stats']['jax'] == same['batch_stats']['torch'] > 0
    assert same['first_loss_max_rel_diff'] < benchmark_step.LOSS_RTOL and same['ok']
    assert r['steps']['torch_eager']['first_loss'] == same['first_loss']['torch_eager']
