"""ResNet weights between PyTorch (torchvision, timm) and bcl_jax, in both directions.

bcl_jax's `ResNet` (resnet.py) has torchvision's layout, so the map is one-to-one:

    torchvision / timm             bcl_jax backbone (params | batch_stats)
    conv1.weight (O, I, kh, kw)    stem_conv.kernel (kh, kw, I, O)
    bn1.weight, bn1.bias           stem_bn.scale, stem_bn.bias
    bn1.running_mean/_var          stem_bn.mean, stem_bn.var            (batch_stats)
    layer{s}.{j}.conv{k}, .bn{k}   blocks[i].conv{k}, .bn{k}            i counts blocks in order
    layer{s}.{j}.downsample.0/.1   blocks[i].shortcut.conv/.bn
    fc.*                           - (the embedding head and classifier start fresh)

timm's `resnet18`/`resnet50` use the same names (timm `models/resnet.py`); its variants
with another stem or shortcut (resnet50d, ...) do not fit and are refused by name. Both use
BatchNorm eps 1e-5 and the stride on the 3x3 conv, as bcl_jax. `num_batches_tracked` is ignored
on load (bcl_jax keeps no count) and written as 0 on export (read by PyTorch only when a
BatchNorm has momentum=None).

    params, batch_stats = load_pretrained('gs://bucket/resnet50.pth', params, batch_stats,
                                          arch='resnet50')
"""

from __future__ import annotations

import io
import pickle
import re
import zipfile

import numpy as np
from etils import epath

from bcl_jax.models import torch_file
from bcl_jax.models.resnet import NAMED_RESNETS

TORCH_SUFFIXES = ('.pth', '.pt')
SAFETENSORS_SUFFIX = '.safetensors'
_BN_FIELDS = {  # PyTorch buffer/parameter -> (bcl_jax collection, leaf)
    'weight': ('params', 'scale'),
    'bias': ('params', 'bias'),
    'running_mean': ('batch_stats', 'mean'),
    'running_var': ('batch_stats', 'var'),
}
_IGNORED = re.compile(r'(^fc\.(weight|bias)$)|(\.num_batches_tracked$)')
_SHOW = 5  # names listed per kind of mismatch


def layer_names(
    arch: str, backbone: dict, spec: dict | None = None
) -> list[tuple[str, tuple, str]]:
    """(PyTorch module name, path in bcl_jax's backbone tree, 'conv' or 'bn') for every layer
    of `arch`, the blocks' shortcuts read from `backbone` (the model's backbone params).
    `spec` (`resnet.backbone_spec`) names the layers of another ResNet, e.g. cifar_resnet's,
    in the same torchvision scheme (bcl_jax.serving exports them)."""
    if spec is None and arch not in NAMED_RESNETS:
        raise ValueError(
            f'pretrained ResNet weights exist for {sorted(NAMED_RESNETS)}, not arch={arch!r}'
        )
    spec = spec or NAMED_RESNETS[arch]
    stage_sizes = spec['stage_sizes']
    convs = 2 if spec['block'] == 'basic' else 3
    blocks = backbone.get('blocks', {})
    if len(blocks) != sum(stage_sizes) or 'stem_conv' not in backbone:
        raise ValueError(
            f'the model has {len(blocks)} residual blocks, {arch} has {sum(stage_sizes)}: '
            'is model.arch the architecture of these weights?'
        )
    names = [('conv1', ('stem_conv',), 'conv'), ('bn1', ('stem_bn',), 'bn')]
    i = 0
    for stage, n in enumerate(stage_sizes):
        for j in range(n):
            name = f'layer{stage + 1}.{j}'
            for k in range(1, convs + 1):
                names.append((f'{name}.conv{k}', ('blocks', i, f'conv{k}'), 'conv'))
                names.append((f'{name}.bn{k}', ('blocks', i, f'bn{k}'), 'bn'))
            if 'shortcut' in blocks[i]:
                names.append((f'{name}.downsample.0', ('blocks', i, 'shortcut', 'conv'), 'conv'))
                names.append((f'{name}.downsample.1', ('blocks', i, 'shortcut', 'bn'), 'bn'))
            i += 1
    return names


def _entries(arch: str, backbone: dict, spec: dict | None = None):
    """(PyTorch key, collection, path to the bcl_jax leaf, 'conv' | 'bn') per tensor."""
    for name, path, kind in layer_names(arch, backbone, spec):
        if kind == 'conv':
            yield f'{name}.weight', 'params', (*path, 'kernel'), kind
        else:
            for field, (collection, leaf) in _BN_FIELDS.items():
                yield f'{name}.{field}', collection, (*path, leaf), kind


def _get(tree: dict, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


def _copy_with(tree: dict, path: tuple, value) -> None:
    """Set tree[path] = value, copying the dicts along the path (the caller's stay intact)."""
    for key in path[:-1]:
        tree[key] = dict(tree[key])
        tree = tree[key]
    tree[path[-1]] = value


def _to_torch_layout(array: np.ndarray, kind: str) -> np.ndarray:
    return np.transpose(array, (3, 2, 0, 1)) if kind == 'conv' else array  # HWIO -> OIHW


def _from_torch_layout(array: np.ndarray, kind: str) -> np.ndarray:
    return np.transpose(array, (2, 3, 1, 0)) if kind == 'conv' else array  # OIHW -> HWIO


def _torch_shape(leaf, kind: str) -> tuple:
    shape = tuple(np.shape(leaf))
    return (shape[3], shape[2], shape[0], shape[1]) if kind == 'conv' else shape


def backbone_to_torch(
    params: dict, batch_stats: dict, *, arch: str, spec: dict | None = None
) -> dict[str, np.ndarray]:
    """A torchvision ResNet state dict (NumPy arrays, without `fc`) of the model's backbone;
    `params`/`batch_stats` are the model's pure dicts (keys 'backbone', 'head', ...); `spec` as
    in `layer_names`."""
    trees = {'params': params['backbone'], 'batch_stats': batch_stats['backbone']}
    state = {}
    for key, collection, path, kind in _entries(arch, params['backbone'], spec):
        leaf = np.asarray(_get(trees[collection], path))
        state[key] = np.array(_to_torch_layout(leaf, kind), order='C')  # a writable copy
        if key.endswith('.running_var'):
            state[key.replace('.running_var', '.num_batches_tracked')] = np.array(0, np.int64)
    return state


def _fit_report(state: dict, expected: dict, arch: str, source: str) -> str | None:
    """What keeps `state` from filling `expected` {key: shape in PyTorch's layout}; None if
    nothing does."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected and not _IGNORED.search(k)]
    shapes = [
        f'{k} {tuple(np.shape(state[k]))} (model {expected[k]})'
        for k in expected
        if k in state and tuple(np.shape(state[k])) != expected[k]
    ]
    if not (missing or unexpected or shapes):
        return None
    parts = [
        f'{len(items)} {what}: {", ".join(items[:_SHOW])}{", ..." if len(items) > _SHOW else ""}'
        for what, items in (
            ('missing keys', missing),
            ('unexpected keys', unexpected),
            ('shape mismatches', shapes),
        )
        if items
    ]
    guess = guess_arch(state)
    hint = f' The file looks like {guess}.' if guess and guess != arch else ''
    return f'{source}: the weights do not fit the model (arch={arch}): {"; ".join(parts)}.{hint}'


def guess_arch(state: dict) -> str | None:
    """'resnet18' / 'resnet50' when `state`'s layer names and block counts are one of them."""
    for arch, spec in NAMED_RESNETS.items():
        last_conv = 'conv2' if spec['block'] == 'basic' else 'conv3'  # bottleneck: conv3
        counts = [
            len({k.split('.')[1] for k in state if k.startswith(f'layer{s + 1}.')})
            for s in range(len(spec['stage_sizes']))
        ]
        has_conv3 = any(k.endswith('.conv3.weight') for k in state)
        if tuple(counts) == tuple(spec['stage_sizes']) and has_conv3 == (last_conv == 'conv3'):
            return arch
    return None


def backbone_from_torch(
    state: dict, params: dict, batch_stats: dict, *, arch: str, source: str = 'weights'
) -> tuple[dict, dict]:
    """`params`, `batch_stats` (the model's pure dicts) with the backbone taken from `state`, a
    torchvision/timm ResNet state dict of NumPy arrays (the backbone's leaves become NumPy arrays
    of the model's dtypes); everything else (head, classifier, GeM's p) is unchanged. Raises
    ValueError listing missing, unexpected and misshapen keys."""
    entries = list(_entries(arch, params['backbone']))
    trees = {'params': params['backbone'], 'batch_stats': batch_stats['backbone']}
    expected = {key: _torch_shape(_get(trees[c], path), kind) for key, c, path, kind in entries}
    report = _fit_report(state, expected, arch, source)
    if report:
        raise ValueError(report)
    bad = [k for k in expected if not np.all(np.isfinite(np.asarray(state[k], np.float32)))]
    if bad:
        raise ValueError(f'{source}: non-finite values in {bad[:_SHOW]}')
    out = {'params': dict(params), 'batch_stats': dict(batch_stats)}
    for key, collection, path, kind in entries:
        dtype = np.dtype(_get(trees[collection], path).dtype)
        value = _from_torch_layout(np.asarray(state[key]), kind).astype(dtype)
        _copy_with(out[collection], ('backbone', *path), np.ascontiguousarray(value))
    return out['params'], out['batch_stats']


def read_weights(path: str) -> dict[str, np.ndarray]:
    """A state dict of NumPy arrays from a torchvision `.pth`/`.pt` file (`torch.save` of a
    `state_dict`) or a timm `.safetensors` file, told by the suffix and checked against the
    content; `path` may be non-local (gs://...)."""
    path = epath.Path(path)
    suffix = path.suffix.lower()
    if suffix not in (*TORCH_SUFFIXES, SAFETENSORS_SUFFIX):
        raise ValueError(
            f'{path}: pretrained weights must end in {", ".join(TORCH_SUFFIXES)} (a torch.save '
            f'state_dict) or {SAFETENSORS_SUFFIX} (timm); got {suffix or "no suffix"!r}'
        )
    if not path.exists():
        raise FileNotFoundError(f'pretrained weights not found: {path}')
    with path.open('rb') as f:
        data = f.read()
    found = _content_format(data)
    wanted = 'safetensors' if suffix == SAFETENSORS_SUFFIX else 'torch'
    if found != wanted:
        raise ValueError(
            f'{path}: the suffix {suffix} says a {wanted} file, but the content is '
            f'{found or "neither a torch.save zip nor safetensors"}'
        )
    try:
        state = _read_safetensors(data) if found == 'safetensors' else _read_torch(data, path)
    except (pickle.UnpicklingError, zipfile.BadZipFile) as e:
        raise ValueError(f'{path}: not a readable state dict: {e}') from e
    if not isinstance(state, dict) or not all(isinstance(v, np.ndarray) for v in state.values()):
        kinds = {k: type(v).__name__ for k, v in list(dict(state).items())[:_SHOW]}
        raise ValueError(
            f'{path}: expected a state dict (names -> tensors); found {type(state).__name__} '
            f'with {kinds}: save `model.state_dict()`'
        )
    return dict(state)


# torch.save's pre-1.6 format begins with its magic number pickled (protocol 2, LONG1).
_LEGACY_TORCH_MAGIC = b'\x80\x02\x8a\x0a' + (0x1950A86A20F9469CFC6C).to_bytes(10, 'little')


def _content_format(data: bytes) -> str | None:
    """'torch' (zip or legacy torch.save), 'safetensors' (an 8-byte header length, then a JSON
    header), or None."""
    if len(data) >= 10:
        n = int.from_bytes(data[:8], 'little')
        if 2 <= n <= len(data) - 8 and data[8:9] == b'{':
            return 'safetensors'
    if data.startswith((torch_file.ZIP_MAGIC, _LEGACY_TORCH_MAGIC)):
        return 'torch'
    return None


def _read_safetensors(data: bytes) -> dict:
    from safetensors.numpy import load  # a small wheel without torch; requirements.txt

    return load(data)


def _read_torch(data: bytes, path) -> dict:
    """The zip format with bcl_jax's reader (no torch import); the pre-1.6 format with torch."""
    if data.startswith(torch_file.ZIP_MAGIC):
        return torch_file.load(data)
    try:
        import torch
    except ImportError as e:
        raise ValueError(
            f'{path} is in the pre-1.6 torch.save format, which needs torch to read ({e}); '
            're-save it with torch.save(torch.load(path), path)'
        ) from e
    state = torch.load(io.BytesIO(data), map_location='cpu', weights_only=True)
    if not isinstance(state, dict):
        return state

    def array(v):  # bfloat16 has no NumPy type: float32 holds it exactly
        return v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()

    return {k: array(v) if torch.is_tensor(v) else v for k, v in state.items()}


def load_pretrained(path: str, params: dict, batch_stats: dict, *, arch: str) -> tuple[dict, dict]:
    """The fresh model's pure-dict `params`, `batch_stats` (`nnx.to_pure_dict` of
    `nnx.split(model, nnx.Param, nnx.BatchStat)[1:]`) with the backbone read from `path`, a
    torchvision `.pth`/`.pt` state dict or a timm `.safetensors` file of `arch`
    ('resnet18' | 'resnet50'); the embedding head, classifier and GeM's p stay as they are."""
    return backbone_from_torch(read_weights(path), params, batch_stats, arch=arch, source=str(path))
