"""bcl_jax.bench's eval_topk measurement (knn.topk against faiss) at --quick sizes.

Only the plumbing and the agreement check are tested; no timing is compared."""

import json
import subprocess
import sys

import numpy as np
import pytest

from bcl_jax import bench

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
    subprocess.run(
        [sys.executable, '-m', 'bcl_jax.bench', '--quick', '--measure=eval_topk', f'--out={out}'],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return json.loads(out.read_text())


def test_eval_topk_quick_keys(quick_report):
    assert list(quick_report['results']) == ['eval_topk']
    result = quick_report['results']['eval_topk']
    assert KEYS <= set(result)
    sizes = (result['queries'], result['index'], result['dim'], result['k'])
    assert sizes == (50, 3000, 32, 10)  # bench.QUICK
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
    result = bench.MEASUREMENTS['eval_topk'](dict(bench.QUICK), {})
    assert KEYS <= set(result)
    assert result['faiss']['available'] is False and 'faiss' in result['faiss']['error']
    assert 'ratio_to_faiss' not in result and 'agreement' not in result


def test_topk_agreement_tolerates_ties_only():
    scores = np.array([[0.9, 0.5, 0.3], [0.8, 0.7, 0.6]], np.float32)
    idx = np.array([[4, 1, 7], [0, 2, 5]])
    # Row 0: items 7 and 8 tie at the cut-off (a swap); row 1: item 9 is no tie for 2.
    other_scores = np.array([[0.9, 0.5, 0.3 + 1e-7], [0.8, 0.6, 0.6]], np.float32)
    other_idx = np.array([[4, 1, 8], [0, 5, 9]])
    got = bench.topk_agreement(scores, idx, other_scores, other_idx)
    assert got['queries_same_set'] == 0 and got['queries_same_order'] == 0
    assert got['queries_set_differs_beyond_ties'] == 1
    assert got['ranks_score_within_tol'] == pytest.approx(5 / 6)
    assert bench.topk_agreement(scores, idx, scores, idx)['fraction_same_set'] == 1.0


@pytest.mark.slow
def test_train_step_measurement_quick(tmp_path):
    """The train_step measurement builds and runs every model's step (no timing is judged)."""
    out = tmp_path / 'bench.json'
    subprocess.run(
        [sys.executable, '-m', 'bcl_jax.bench', '--quick', '--measure=train_step', f'--out={out}'],
        check=True,
        capture_output=True,
        timeout=600,
    )
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
    result = bench.MEASUREMENTS['torch_step'](dict(bench.QUICK), {})
    assert result == {'available': False, 'error': "No module named 'torch'"}
    assert 'torch_step' not in bench.flags.FLAGS['measure'].default  # optional, not by default


def test_torch_step_measurement_quick():
    """At --quick sizes, eager only (bench.QUICK), with a stand-in train_step result."""
    pytest.importorskip('torch')
    pytest.importorskip('torchvision')
    jax_step = {'devices': 2, 'steps': {'new_resnet50_bct': {'images_per_sec': 4.0}}}
    r = bench.MEASUREMENTS['torch_step'](dict(bench.QUICK), {'train_step': jax_step})
    assert TORCH_KEYS <= set(r), r.get('error')
    assert (r['image_size'], r['batch'], r['classes']) == (32, 8, 100)  # bench.QUICK
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
    pytest.importorskip('torch')
    pytest.importorskip('torchvision')
    r = bench.MEASUREMENTS['torch_step'](dict(bench.QUICK, torch_compile=True), {})
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


def test_torch_step_matches_bcl_jax_step():
    """The PyTorch step that torch_step times is bcl_jax's BCT step: from the same weights
    (bcl_jax's ResNet-50, converted) and batch, the loss and both terms agree at the first step;
    the first SGD update (momentum, weight decay) agrees in the head and the last stage, and the
    loss at the second step agrees. Earlier stages' gradients are left out: through the stack of
    small-batch BatchNorms they are ill-conditioned, and PyTorch's float32 CPU BatchNorm backward
    strays ~1e-3-3e-2 from a float64 reference there where bcl_jax's stays ~1e-5."""
    torch = pytest.importorskip('torch')
    pytest.importorskip('torchvision')
    import jax
    import jax.numpy as jnp

    from bcl_jax import train
    from configs import gldv2

    config = gldv2.get_config()
    model_cfg, classes, batch, size = config.new.model, 10, 8, 64
    graphdef, params, stats = train.init_model(model_cfg, classes, seed=0)
    params = _nonzero_residual_scales(params, np.random.default_rng(1))
    bank = bench.random_unit_np(2, classes, model_cfg.embedding_dim)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, classes, batch)

    tx, _ = train.make_optimizer(config.new.train, steps_per_epoch=1000.0)
    state = {
        'step': jnp.int32(0),
        'params': params,
        'batch_stats': stats,
        'opt_state': tx.init(params),
        'first_nonfinite_step': jnp.int32(-1),
    }
    step = jax.jit(
        train.make_train_step(
            graphdef,
            tx,
            weights={'comp': config.compat.weight},
            model_cfg=model_cfg,
            compat_cfg=config.compat,
            old=None,
            perturb_cfg=config.perturb,
            num_classes=classes,
        )
    )
    jax_losses, jax_weights = [], []
    for _ in range(2):
        state, metrics = step(
            state, {'image': images, 'label': labels.astype(np.int32)}, {'prototypes': bank}
        )
        jax_losses.append([float(metrics[k]) for k in ('loss', 'cls', 'comp')])
        jax_weights.append(bench.torch_state_from_bcl_jax(state['params'], state['batch_stats']))

    module = bench.torch_bct_module(
        classes,
        dim=model_cfg.embedding_dim,
        scale=model_cfg.scale,
        margin=model_cfg.margin,
        temperature=config.compat.temperature,
        weight=config.compat.weight,
        prototypes=bank,
    )
    bench.load_bcl_jax_weights(module, params, stats)
    module = module.to(memory_format=torch.channels_last).train()
    train_cfg = config.new.train
    optimizer, _ = bench.torch_sgd(
        module,
        lr=train_cfg.learning_rate,
        momentum=train_cfg.momentum,
        weight_decay=train_cfg.weight_decay,
    )
    torch_losses, torch_weights = [], []
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        out = module(torch.from_numpy(images), torch.from_numpy(labels))
        out[0].backward()
        optimizer.step()
        torch_losses.append([float(x.detach()) for x in out])
        torch_weights.append({k: v.detach().numpy().copy() for k, v in module.named_parameters()})

    jax_losses, torch_losses = np.array(jax_losses), np.array(torch_losses)
    assert np.all(jax_losses > 0.1)  # not a trivial loss
    np.testing.assert_allclose(torch_losses[0], jax_losses[0], rtol=1e-4)
    start = bench.torch_state_from_bcl_jax(params, stats)
    diffs = {}
    for name, after in torch_weights[0].items():
        update = start[name] - after
        diffs[name] = (
            np.abs(start[name] - jax_weights[0][name] - update).max() / np.abs(update).max()
        )
    print('first step, bcl_jax', jax_losses[0], 'torch', torch_losses[0])
    print('update differences, median', np.median(list(diffs.values())), 'max', max(diffs.values()))
    head = {k: v for k, v in diffs.items() if k.startswith(('backbone.layer4.', 'proj.', 'kernel'))}
    assert len(head) == 1 + 2 + 3 * 9 + 3  # kernel, proj, layer4's blocks and shortcut
    print('head and last stage max', max(head.values()))
    print('second step, bcl_jax', jax_losses[1], 'torch', torch_losses[1])
    assert max(head.values()) < 1e-3, sorted(head.items(), key=lambda kv: -kv[1])[:3]
    np.testing.assert_allclose(torch_losses[1], jax_losses[1], rtol=3e-4)
    assert not np.allclose(jax_losses[1], jax_losses[0], rtol=1e-3)  # the update mattered
