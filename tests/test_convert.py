"""bcl_jax.models.convert and torch_file: torchvision/timm ResNet weights <-> bcl_jax.

The reference is PyTorch itself: torchvision's and timm's eval-mode forward up to the global
average pool, on the same images, after loading the same file. Needs torch, torchvision, timm
and safetensors (requirements-test.txt); these tests are not skipped without them.
"""

import functools
import re

import jax
import ml_collections
import numpy as np
import pytest
import safetensors.torch
import timm
import torch
import torchvision
from flax import nnx

from bcl_jax.models import convert, torch_file
from bcl_jax.models.heads import build_model

SIZE, BATCH = 64, 2


def randomize_batchnorm(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random BatchNorm scale, shift and running statistics (fresh ones are 1, 0, 0, 1, which
    would hide a swapped or transposed field), in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0.0, 0.1, generator=g)
                m.running_mean.normal_(0.0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
    return net.eval()


def torchvision_resnet(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomize_batchnorm(getattr(torchvision.models, arch)(weights=None), seed)


def fresh_model(arch: str, width: int = 64, pool: str = 'avg'):
    """A bcl_jax model's graph and pure-dict params/batch stats, without computing weights
    (shapes only: only the backbone is filled from the file)."""
    cfg = ml_collections.ConfigDict(
        {'arch': arch, 'width': width, 'depth': None, 'embedding_dim': 8, 'head': 'cosface'}
    )
    cfg.pool = pool
    model = nnx.eval_shape(lambda: build_model(cfg, 5, rngs=nnx.Rngs(0)))
    backbone_graph = nnx.split(model.backbone, nnx.Param, nnx.BatchStat)[0]
    _, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    return backbone_graph, nnx.to_pure_dict(params), nnx.to_pure_dict(stats)


@functools.cache
def backbone_features(arch: str):
    """Eval-mode pooled features of a bcl_jax backbone, jitted once per architecture."""
    backbone_graph = fresh_model(arch)[0]
    return jax.jit(lambda p, s, x: nnx.merge(backbone_graph, p, s)(x, train=False))


def images_nhwc(seed: int = 0) -> np.ndarray:
    """Already-normalised float images, the backbones' input."""
    return np.random.default_rng(seed).normal(size=(BATCH, SIZE, SIZE, 3)).astype(np.float32)


def torch_features(net, x_nhwc: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2)).numpy()


def assert_features_match(ours, reference):
    """Equal to 1e-4 of the features' scale (random weights give features of O(10-100))."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    assert ours.shape == reference.shape
    scale = np.abs(reference).max()
    assert scale > 0.1
    assert np.abs(ours - reference).max() <= 1e-4 * scale, np.abs(ours - reference).max() / scale


@pytest.mark.parametrize('arch', ['resnet18', 'resnet50'])
def test_torchvision_weights_give_pytorchs_features(arch, tmp_path):
    net = torchvision_resnet(arch)
    path = tmp_path / f'{arch}.pth'
    torch.save(net.state_dict(), path)
    _, params, stats = fresh_model(arch)
    new_params, new_stats = convert.load_pretrained(str(path), params, stats, arch=arch)

    x = images_nhwc()
    net.fc = torch.nn.Identity()  # torchvision's output after avgpool and flatten
    got = backbone_features(arch)(new_params['backbone'], new_stats['backbone'], x)
    assert_features_match(got, torch_features(net, x))
    # The head and classifier are the fresh model's; the caller's dicts are not modified.
    assert new_params['head'] is params['head'] and new_params['classifier'] is params['classifier']
    assert isinstance(params['backbone']['stem_conv']['kernel'], jax.ShapeDtypeStruct)


def test_timm_safetensors_give_timms_features(tmp_path):
    net = randomize_batchnorm(timm.create_model('resnet50', pretrained=False), seed=1)
    state = net.state_dict()
    # timm's resnet50 names its layers as torchvision does (checked here, as the map assumes).
    assert {'conv1.weight', 'bn1.running_var', 'layer1.0.downsample.0.weight', 'fc.weight'} <= set(
        state
    )
    path = tmp_path / 'resnet50.safetensors'
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    _, params, stats = fresh_model('resnet50')
    new_params, new_stats = convert.load_pretrained(str(path), params, stats, arch='resnet50')

    x = images_nhwc(1)
    with torch.no_grad():
        chw = torch.from_numpy(x).permute(0, 3, 1, 2)
        reference = net.forward_head(net.forward_features(chw), pre_logits=True).numpy()
    got = backbone_features('resnet50')(new_params['backbone'], new_stats['backbone'], x)
    assert_features_match(got, reference)


def random_weights(arch: str, seed: int):
    """A bcl_jax model's pure dicts filled with random numbers (no two leaves alike)."""
    _, params, stats = fresh_model(arch)
    rng = np.random.default_rng(seed)

    def draw(leaf):
        return rng.uniform(0.5, 1.5, leaf.shape).astype(leaf.dtype)

    return jax.tree.map(draw, params), jax.tree.map(draw, stats)


@pytest.mark.parametrize('arch', ['resnet18', 'resnet50'])
def test_round_trip_bcl_jax_torch_bcl_jax_is_exact(arch, tmp_path):
    params, stats = random_weights(arch, seed=2)
    state = convert.backbone_to_torch(params, stats, arch=arch)
    net = getattr(torchvision.models, arch)(weights=None)
    net.fc = torch.nn.Identity()
    net.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    path = tmp_path / 'exported.pt'
    torch.save(net.state_dict(), path)
    _, fresh_params, fresh_stats = fresh_model(arch)
    back_params, back_stats = convert.load_pretrained(
        str(path), fresh_params, fresh_stats, arch=arch
    )
    for before, after in ((params, back_params), (stats, back_stats)):
        leaves = jax.tree_util.tree_leaves_with_path(before['backbone'])
        assert len(leaves) == len(jax.tree.leaves(after['backbone'])) > 20
        for key_path, leaf in leaves:
            got = after['backbone']
            for k in key_path:
                got = got[k.key]
            np.testing.assert_array_equal(got, np.asarray(leaf), err_msg=str(key_path))


def test_gem_p_and_head_stay_fresh(tmp_path):
    path = tmp_path / 'resnet18.pth'
    torch.save(torchvision_resnet('resnet18').state_dict(), path)
    _, params, stats = fresh_model('resnet18', pool='gem')
    new_params, _ = convert.load_pretrained(str(path), params, stats, arch='resnet18')
    assert new_params['backbone']['pool'] is params['backbone']['pool']


def test_reader_without_torch_equals_torch_load(tmp_path):
    """bcl_jax's zip reader gives torch.load's tensors: strided views, offsets into a shared
    storage, bfloat16/float16/int64/bool, 0-d and empty tensors, nested dicts."""
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {
        'transposed': base.t(),
        'offset_view': base[1:, 2:5],
        'shared': base,
        'bf16': torch.linspace(-2, 2, 5, dtype=torch.bfloat16),
        'half': torch.tensor([1.5, -0.25], dtype=torch.float16),
        'count': torch.tensor(7),
        'mask': torch.tensor([True, False]),
        'empty': torch.zeros(0, 3),
        'nested': {'w': torch.nn.Parameter(torch.ones(2, 2))},
    }
    path = tmp_path / 'mixed.pth'
    torch.save(state, path)
    ours = torch_file.load(path.read_bytes())
    theirs = torch.load(path, weights_only=True)

    def check(a, b, name):
        if isinstance(b, dict):
            assert set(a) == set(b), name
            for k in b:
                check(a[k], b[k], f'{name}.{k}')
            return
        b = b.detach()
        expected = b.float().numpy() if b.dtype == torch.bfloat16 else b.numpy()
        assert a.shape == expected.shape, name
        np.testing.assert_array_equal(np.asarray(a, expected.dtype), expected, err_msg=name)
        assert str(a.dtype) == str(b.dtype).replace('torch.', ''), name

    check(ours, theirs, 'state')


def test_legacy_torch_format_is_read_with_torch(tmp_path):
    state = torchvision_resnet('resnet18').state_dict()
    path = tmp_path / 'legacy.pth'
    torch.save(state, path, _use_new_zipfile_serialization=False)
    assert not path.read_bytes().startswith(torch_file.ZIP_MAGIC)
    got = convert.read_weights(str(path))
    np.testing.assert_array_equal(got['layer2.0.conv1.weight'], state['layer2.0.conv1.weight'])


@pytest.fixture(scope='module')
def resnet18_state():
    return torchvision_resnet('resnet18').state_dict()


def write(path, data):
    path.write_bytes(data)
    return str(path)


def test_bad_files_fail_with_the_reason(tmp_path, resnet18_state):
    _, params, stats = fresh_model('resnet18')
    torch.save(resnet18_state, tmp_path / 'good.pth')
    good = (tmp_path / 'good.pth').read_bytes()
    safe = safetensors.torch.save({k: v.contiguous() for k, v in resnet18_state.items()})
    cases = [
        (write(tmp_path / 'w.bin', good), 'must end in .pth, .pt .* or .safetensors'),
        (write(tmp_path / 's.pth', safe), 'suffix .pth says a torch file, but the content is safe'),
        (
            write(tmp_path / 't.safetensors', good),
            'says a safetensors file, but the content is tor',
        ),
        (write(tmp_path / 'junk.pt', b'hello world, not weights'), 'neither a torch.save zip nor'),
        (write(tmp_path / 'cut.pth', good[: len(good) // 2]), 'not a readable state dict'),
    ]
    for path, message in cases:
        with pytest.raises(ValueError, match=message):
            convert.load_pretrained(path, params, stats, arch='resnet18')
    with pytest.raises(FileNotFoundError, match='not found'):
        convert.load_pretrained(str(tmp_path / 'none.pth'), params, stats, arch='resnet18')


def test_a_pickled_module_is_refused_without_running_it(tmp_path):
    path = tmp_path / 'model.pth'
    torch.save(torchvision.models.resnet18(weights=None), path)  # the module, not a state dict
    _, params, stats = fresh_model('resnet18')
    with pytest.raises(ValueError, match='holds a torchvision.models.resnet.ResNet.*state_dict'):
        convert.load_pretrained(str(path), params, stats, arch='resnet18')


def test_mismatched_weights_list_the_keys(tmp_path, resnet18_state):
    path = tmp_path / 'resnet18.pth'
    torch.save(resnet18_state, path)
    _, params50, stats50 = fresh_model('resnet50')
    with pytest.raises(ValueError) as err:
        convert.load_pretrained(str(path), params50, stats50, arch='resnet50')
    message = str(err.value)
    assert str(path) in message and 'arch=resnet50' in message
    assert re.search(r'\d+ missing keys: layer1\.0\.conv3\.weight', message), message
    assert 'unexpected keys' not in message  # ResNet-18's layer names all exist in ResNet-50
    assert (
        'shape mismatches: layer1.0.conv1.weight (64, 64, 3, 3) (model (64, 64, 1, 1))' in message
    )
    assert message.endswith('The file looks like resnet18.')

    _, narrow, narrow_stats = fresh_model('resnet18', width=32)
    with pytest.raises(ValueError, match=r'shape mismatches: conv1\.weight \(64, 3, 7, 7\) '):
        convert.load_pretrained(str(path), narrow, narrow_stats, arch='resnet18')

    _, params, stats = fresh_model('resnet18')
    extra = dict(resnet18_state, **{'layer1.0.se.fc.weight': torch.ones(4, 4)})
    del extra['layer4.1.bn2.running_var']
    torch.save(extra, path)
    with pytest.raises(ValueError) as err:
        convert.load_pretrained(str(path), params, stats, arch='resnet18')
    assert '1 missing keys: layer4.1.bn2.running_var;' in str(err.value)
    assert '1 unexpected keys: layer1.0.se.fc.weight.' in str(err.value)

    nan = dict(resnet18_state)
    nan['layer3.0.bn1.weight'] = torch.full_like(nan['layer3.0.bn1.weight'], float('nan'))
    torch.save(nan, path)
    with pytest.raises(ValueError, match=r"non-finite values in \['layer3.0.bn1.weight'\]"):
        convert.load_pretrained(str(path), params, stats, arch='resnet18')


def test_arch_must_be_a_named_resnet_of_the_model(tmp_path, resnet18_state):
    path = tmp_path / 'resnet18.pth'
    torch.save(resnet18_state, path)
    _, params, stats = fresh_model('resnet18')
    with pytest.raises(ValueError, match='exist for .*resnet18.*not arch=.cifar_resnet'):
        convert.load_pretrained(str(path), params, stats, arch='cifar_resnet')
    with pytest.raises(ValueError, match='the model has 8 residual blocks, resnet50 has 16'):
        convert.load_pretrained(str(path), params, stats, arch='resnet50')
