"""Export for serving (bcl_jax.serving): StableHLO reloaded with jax.export, ONNX run by
onnxruntime, and the PyTorch module of the torch export, each against bcl_jax's own embeddings
of the same images. The tolerances (docs/lifecycle.md, "Export for serving") are on the largest
absolute difference of float32 unit-embedding components.

torch, safetensors, onnx and onnxruntime come from requirements-test.txt; jax2onnx from
requirements-onnx.txt, installed with --no-deps (see bcl_jax.serving.to_onnx), as the README's
test command does.
"""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from ml_collections import config_dict

from bcl_jax import data as data_lib
from bcl_jax import embedding_files, export, serving, sharding, train
from bcl_jax import plan as plan_lib
from bcl_jax import step as step_lib
from bcl_jax.stage import Trained
from configs import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Largest |difference| of embedding components allowed (float32; the embeddings are unit rows).
STABLEHLO_TOLERANCE = 1e-6  # the same XLA computation: equal up to fusion order
ONNX_TOLERANCE = 1e-5
TORCH_TOLERANCE = 1e-5


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
    """The built-in benchmark's smoke old model (a CIFAR ResNet-8), trained in a tmp dir, and
    its embedding files written by today's default export: (config, checkpoint, embeddings
    folder, query images)."""
    cfg = synthetic.get_config('smoke')
    workdir = str(tmp_path_factory.mktemp('run'))
    mesh = sharding.make_mesh(cfg.mesh)
    data = data_lib.build(cfg.data)
    plan_lib.old_model(plan_lib.plan(cfg, data), mesh=mesh, workdir=workdir)
    ckpt = os.path.join(workdir, 'old', 'ckpt')
    emb = str(tmp_path_factory.mktemp('embeddings'))
    export.export(cfg, ckpt, emb)
    source = data.tests[0].query
    images = np.stack([source[i]['image'] for i in range(len(source))])
    return cfg, ckpt, emb, images


def reference(smoke):
    """bcl_jax's evaluation embeddings of the query images, from today's export's files."""
    _, _, emb, _ = smoke
    return embedding_files.read_embeddings(emb, 'synthetic.query').emb


def random_model(arch, *, width, depth=None, pool='avg', head='softmax', num_classes=5, seed=0):
    """An untrained model whose BatchNorm statistics and affine terms are made non-trivial."""
    cfg = config_dict.ConfigDict(
        dict(arch=arch, width=width, depth=depth, embedding_dim=8, head=head, pool=pool)
    )
    cfg.update(dtype='float32', scale=30.0, margin=0.3, pretrained='')
    graphdef, params, stats = step_lib.init_model(cfg, num_classes, seed, pretrained=False)
    rng = np.random.default_rng(seed)

    def jitter(path, x):
        name = jax.tree_util.keystr(path)
        x = np.asarray(x)
        if name.endswith("['var']"):
            return rng.uniform(0.5, 2.0, x.shape).astype(x.dtype)
        if name.endswith(("['mean']", "['bias']", "['scale']")):
            return (x + rng.normal(0, 0.2, x.shape)).astype(x.dtype)
        if name.endswith("['p']"):
            return np.full_like(x, 2.5)
        return x

    params = jax.tree_util.tree_map_with_path(jitter, params)
    stats = jax.tree_util.tree_map_with_path(jitter, stats)
    return Trained(graphdef, params, stats, cfg, num_classes, step=0)


def outputs(trained, images):
    """bcl_jax's (embeddings, logits) of `images`, in one compiled call (eager NNX runs op by op,
    slowly)."""
    emb, logits = jax.jit(lambda x: trained.model()(x, train=False))(images)
    return np.asarray(emb), np.asarray(logits)


def pixels(n, size, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def data_cfg(size):
    return config_dict.ConfigDict(dict(image_size=size, eval_preprocess='center_crop'))


def identity():
    return dict(framework='bcl_jax', checkpoint='none')


def import_torch_module(folder):
    """bcl_jax_torch.py as written into an export folder, imported from there."""
    path = os.path.join(folder, serving.TORCH_MODULE)
    spec = importlib.util.spec_from_file_location(f'bcl_jax_torch_{abs(hash(folder))}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def torch_embed(folder, images):
    import torch

    model = import_torch_module(folder).load(folder)
    with torch.no_grad():
        return model(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()


# --- StableHLO --------------------------------------------------------------------------------


def test_stablehlo_from_the_command_reproduces_the_evaluation(smoke, tmp_path):
    cfg, ckpt, _, images = smoke
    out = str(tmp_path / 'stablehlo')
    subprocess.run(
        [
            sys.executable,
            '-m',
            'bcl_jax.export',
            '--config=configs/synthetic.py:smoke',
            f'--checkpoint={ckpt}',
            f'--out={out}',
            '--format=stablehlo',
        ],
        cwd=REPO,
        check=True,
        timeout=600,
        env=dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu'),
    )
    assert sorted(os.listdir(out)) == ['manifest.json', 'model.stablehlo']
    with open(os.path.join(out, 'manifest.json')) as f:
        manifest = json.load(f)
    assert manifest['kind'] == 'stablehlo' and manifest['input']['shape'] == ['batch', 16, 16, 3]
    assert manifest['input']['dtype'] == 'uint8' and manifest['input']['channel_order'] == 'RGB'
    assert manifest['preprocessing']['mean'] == [0.485, 0.456, 0.406]
    assert manifest['preprocessing']['std'] == [0.229, 0.224, 0.225]
    assert manifest['preprocessing']['image_size'] == 16
    assert (
        manifest['model']['step'] == train.load_checkpoint(ckpt, sharding.make_mesh(cfg.mesh)).step
    )

    embed = serving.load_stablehlo(out)  # jax.export.deserialize
    expected = reference(smoke)
    for n in (len(images), 3, 1):  # the batch dimension is symbolic
        got = np.asarray(embed(images[:n]))
        assert got.shape == (n, 16) and got.dtype == np.float32
        diff = np.abs(got - expected[:n]).max()
        print(f'StableHLO max |difference|, batch {n}: {diff:.2e}')
        assert diff <= STABLEHLO_TOLERANCE, diff
    np.testing.assert_allclose(np.linalg.norm(np.asarray(embed(images)), axis=1), 1.0, atol=1e-5)


def test_default_export_is_unchanged(smoke):
    _, _, emb, _ = smoke
    expected = {
        f'synthetic.{s}{ext}'
        for s in ('query', 'gallery')
        for ext in ('.npy', '.ids.txt', '.labels.npy', '.json')
    }
    assert expected <= set(os.listdir(emb))


# --- ONNX -------------------------------------------------------------------------------------


def _onnx_run(blob, images):
    import onnxruntime as ort

    session = ort.InferenceSession(blob, providers=['CPUExecutionProvider'])
    (inp,) = session.get_inputs()
    assert inp.name == 'images' and inp.shape[0] == 'batch' and inp.type == 'tensor(uint8)'
    return session.run(['embeddings'], {'images': images})[0]


def _need_jax2onnx():
    """The ONNX tests fail, saying what to install, where jax2onnx is missing (never skip)."""
    if importlib.util.find_spec('jax2onnx') is None:
        pytest.fail('jax2onnx is missing: pip install --no-deps -r requirements-onnx.txt')


def test_onnx_matches_the_evaluation_on_real_and_random_images(smoke, tmp_path):
    _need_jax2onnx()
    cfg, ckpt, _, images = smoke
    out = str(tmp_path / 'onnx')
    manifest = serving.export(cfg, ckpt, out, 'onnx')
    assert manifest['artefact'] == 'model.onnx'
    with open(os.path.join(out, 'model.onnx'), 'rb') as f:
        blob = f.read()
    real = np.abs(_onnx_run(blob, images) - reference(smoke)).max()
    trained = train.load_checkpoint(ckpt, sharding.make_mesh(cfg.mesh))
    noise = pixels(5, 16, seed=1)
    expected = np.asarray(jax.jit(serving.embed_function(trained))(noise))
    random = np.abs(_onnx_run(blob, noise) - expected).max()
    print(f'ONNX max |difference|: real images {real:.2e}, random pixels {random:.2e}')
    assert real <= ONNX_TOLERANCE and random <= ONNX_TOLERANCE, (real, random)


@pytest.mark.slow  # ~20 s: an ImageNet ResNet converted; the smoke model's ONNX runs by default
def test_onnx_of_an_imagenet_resnet_with_gem(tmp_path):
    _need_jax2onnx()
    trained = random_model('resnet18', width=8, pool='gem')
    noise = pixels(3, 32)
    expected, _ = outputs(trained, noise)
    diff = np.abs(_onnx_run(serving.to_onnx(trained, 32), noise) - expected).max()
    print(f'ONNX max |difference|, resnet18 with GeM: {diff:.2e}')
    assert diff <= ONNX_TOLERANCE, diff


# --- PyTorch ----------------------------------------------------------------------------------


def test_torch_module_reproduces_the_smoke_models_embeddings(smoke, tmp_path):
    cfg, ckpt, _, images = smoke
    out = str(tmp_path / 'torch')
    manifest = serving.export(cfg, ckpt, out, 'torch')
    assert sorted(os.listdir(out)) == ['bcl_jax_torch.py', 'manifest.json', 'model.safetensors']
    assert manifest['input']['layout'] == 'NCHW'
    assert manifest['architecture']['stage_sizes'] == [1, 1, 1]
    diff = np.abs(torch_embed(out, images) - reference(smoke)).max()
    print(f'PyTorch max |difference| on the smoke queries: {diff:.2e}')
    assert diff <= TORCH_TOLERANCE, diff


@pytest.mark.slow  # ~20-30 s each; the smoke model's PyTorch module runs by default
@pytest.mark.parametrize(
    'arch, pool, head',
    [('resnet18', 'gem', 'softmax'), ('resnet50', 'avg', 'arcface')],
)
def test_torch_module_for_imagenet_resnets(arch, pool, head, tmp_path):
    import torch
    import torchvision

    trained = random_model(arch, width=4, pool=pool, head=head)
    out = str(tmp_path / arch)
    serving.write('torch', trained, data_cfg(32), out, identity())
    noise = pixels(3, 32)
    emb, expected = outputs(trained, noise)
    diff = np.abs(torch_embed(out, noise) - emb).max()
    print(f'PyTorch max |difference|, {arch}: {diff:.2e}')
    assert diff <= TORCH_TOLERANCE, diff
    # The classifier comes along: the same logits.
    model = import_torch_module(out).load(out)
    with torch.no_grad():
        logits = model.logits(torch.from_numpy(noise).permute(0, 3, 1, 2)).numpy()
    assert np.abs(logits - expected).max() <= 1e-4
    # The backbone's names are torchvision's under `backbone.` (at width 64 its shapes too:
    # tests/test_convert.py round-trips torchvision's weights through the same map).
    names = {k.removeprefix('backbone.') for k in model.state_dict() if k.startswith('backbone.')}
    expected_names = set(getattr(torchvision.models, arch)().state_dict()) - {
        'fc.weight',
        'fc.bias',
    }
    assert names - {'pool.p'} == expected_names
    assert ('pool.p' in names) == (pool == 'gem')


# --- Manifests and folders --------------------------------------------------------------------


def test_one_format_a_folder_and_unknown_formats(tmp_path):
    trained = random_model('cifar_resnet', width=4, depth=8)
    out = str(tmp_path / 'x')
    serving.write('stablehlo', trained, data_cfg(16), out, identity())
    serving.write('stablehlo', trained, data_cfg(16), out, identity())  # again: replaced
    with pytest.raises(ValueError, match='its own --out folder'):
        serving.write('torch', trained, data_cfg(16), out, identity())
    with pytest.raises(ValueError, match='choose embeddings or one of'):
        serving.write('tflite', trained, data_cfg(16), out, identity())
    assert sorted(os.listdir(out)) == ['manifest.json', 'model.stablehlo']
