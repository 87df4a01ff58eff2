"""torch_step: the new model's BCT step of `train_step` in PyTorch, for the GPU comparison.

Same model, loss, optimizer, batch and sizes as bcl_jax's (`torch_bct_module`; the weights
can be copied from bcl_jax with `load_bcl_jax_weights`, and tests/test_bench.py checks that the
losses agree), on CUDA when torch sees it, else the CPU; eager and torch.compile'd
(`torch_compile`), timed in turn, one synchronised step per timing after `torch_warmup` steps;
channels_last, cudnn.benchmark, and TF32 exactly when JAX's default matmul precision uses it
(the default does, on Ampere and newer GPUs). It runs in a child process, so that PyTorch and JAX
share no CUDA libraries, memory pools or CPU threads. After `train_step` in the same run,
`jax_to_torch` is JAX's BCT images/s per device over PyTorch's on one (target >= 1 on a GPU at
224 px and batch 256). Needs torch and torchvision (requirements-test.txt), else `available`
is false.

benchmark_step uses the same module on another ResNet (`torch_backbone`) in a child process that
times blocks of steps on request (`serve_main`, `torch_server`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import jax
import numpy as np

from bcl_jax.bench.harness import random_unit_np
from bcl_jax.bench.registry import Size, measurement, sizes
from bcl_jax.bench.train_step import gldv2_spec, random_batch
from bcl_jax.models import convert
from bcl_jax.models.heads import IMAGENET_MEAN, IMAGENET_STD

SIZES = sizes(
    'torch_step',
    {
        'torch_compile': Size(True, False, 'also time torch.compile (also benchmark_step)'),
        'torch_warmup': Size(3, 1, 'untimed steps first (cudnn autotuning)'),
    },
)
ARCH = 'resnet50'


def tf32_for(jax_precision) -> bool:
    """Whether JAX computes float32 matmuls and convolutions in TF32 on an Ampere or newer GPU
    at this `jax_default_matmul_precision`: unset (DEFAULT) does, as do the reduced levels; only
    the full-float32 names do not."""
    name = 'default' if jax_precision is None else str(jax_precision).lower()
    return name not in ('highest', 'float32', 'f32_f32_f32')


def torch_backbone(backbone: dict | None):
    """(module, features per image): torchvision's ResNet-50 without `fc` for None (the GLDv2
    model), else bcl_jax's own PyTorch ResNet (`serving_torch.ResNet`, what `export
    --format=torch` writes; its outputs equal bcl_jax's, tests/test_serving.py) of `backbone`
    (`resnet.backbone_spec` plus width and pool): torchvision has no CIFAR ResNet."""
    import torch
    import torchvision

    if backbone is None:
        module = torchvision.models.resnet50(weights=None, zero_init_residual=True)
        module.fc = torch.nn.Identity()
        return module, module.inplanes
    from bcl_jax.serving_torch import ResNet

    module = ResNet(**{k: backbone[k] for k in ('stage_sizes', 'block', 'width', 'stem', 'pool')})
    return module, module.out_features


def torch_bct_module(
    classes: int,
    *,
    dim: int = 256,
    scale: float = 30.0,
    margin: float = 0.3,
    temperature: float = 0.07,
    weight: float = 1.0,
    prototypes=None,
    backbone: dict | None = None,
):
    """The GLDv2 configs' new model and BCT loss in PyTorch (needs torch and torchvision):
    uint8 NHWC images -> ImageNet standardisation -> torchvision ResNet-50 (no fc; another
    ResNet with `backbone`, see `torch_backbone`) -> Linear(features, dim) -> L2 normalisation;
    CosFace cosines against the normalised columns of `kernel` (dim, C), clipped to [-1, 1];
    loss = CE(s·(cos − m on the target)) + weight · CE(emb·prototypesᵀ / temperature), as
    bcl_jax.losses. `prototypes` (C, dim): a fixed bank (default: random unit vectors).
    `forward(images, labels)` returns (loss, l_cls, l_comp)."""
    import torch
    from torch.nn import functional as F

    def unit(x, axis=-1):  # bcl_jax.models.heads.l2_normalize
        return x * torch.rsqrt(x.square().sum(axis, keepdim=True).clamp_min(1e-24))

    if prototypes is None:
        prototypes = random_unit_np(1, classes, dim)

    class BCTStep(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone, features = torch_backbone(backbone)
            self.proj = torch.nn.Linear(features, dim)
            self.kernel = torch.nn.Parameter(torch.randn(dim, classes) / dim**0.5)
            for name, value in (
                ('prototypes', prototypes),
                ('mean', np.reshape(IMAGENET_MEAN, (1, 3, 1, 1))),
                ('std', np.reshape(IMAGENET_STD, (1, 3, 1, 1))),
            ):
                tensor = torch.as_tensor(np.asarray(value, np.float32))
                self.register_buffer(name, tensor, persistent=False)

        def embed(self, images):
            """Unit embeddings (B, dim) and cosines (B, C) of uint8 (B, H, W, 3) images."""
            # A view, not a copy: NCHW indexing of NHWC memory is PyTorch's channels_last.
            x = images.permute(0, 3, 1, 2).float() / 255.0
            emb = unit(self.proj(self.backbone((x - self.mean) / self.std)))
            cos = (unit(emb) @ unit(self.kernel, 0)).clamp(-1.0, 1.0)
            return emb, cos

        def forward(self, images, labels):
            emb, cos = self.embed(images)
            target = labels[:, None]
            z = scale * cos.scatter(1, target, cos.gather(1, target) - margin)
            l_cls = F.cross_entropy(z, labels)
            l_comp = F.cross_entropy(emb @ self.prototypes.T / temperature, labels)
            return l_cls + weight * l_comp, l_cls, l_comp

    return BCTStep()


def torch_state(
    params, batch_stats, *, arch: str = ARCH, backbone: dict | None = None
) -> dict[str, np.ndarray]:
    """A `torch_bct_module` state dict (NumPy arrays) from bcl_jax's EmbeddingModel pure dicts
    (`arch`, ResNet-50 by default; another one needs its `backbone` as in `torch_backbone`):
    the backbone by `bcl_jax.models.convert`, the Dense kernel transposed, the CosFace kernel
    (dim, C) as it is."""
    backbone_state = convert.backbone_to_torch(params, batch_stats, arch=arch, spec=backbone)
    state = {f'backbone.{k}': v for k, v in backbone_state.items()}
    state['proj.weight'] = np.array(params['head']['proj']['kernel']).T.copy()
    state['proj.bias'] = np.array(params['head']['proj']['bias'])
    state['kernel'] = np.array(params['classifier']['kernel'])
    return state


def load_state(module, state: dict[str, np.ndarray]) -> None:
    """Copies a `torch_state` into a `torch_bct_module`: every parameter and statistic (strict:
    any name or shape that differs fails; BatchNorm's step counters, which bcl_jax has not, 0)."""
    import torch

    module.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)


def load_bcl_jax_weights(module, params, batch_stats) -> None:
    """`load_state` of bcl_jax's ResNet-50 weights (pure dicts)."""
    load_state(module, torch_state(params, batch_stats))


def torch_sgd(module, *, lr: float, momentum: float, weight_decay: float):
    """torch SGD over every parameter, as bcl_jax's optimizer (decay on all weights); the fused
    kernel where this build has it. Returns (optimizer, 'fused' | 'default')."""
    import torch

    kw = {'lr': lr, 'momentum': momentum, 'weight_decay': weight_decay}
    try:
        return torch.optim.SGD(module.parameters(), fused=True, **kw), 'fused'
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.SGD(module.parameters(), **kw), 'default'


def child_main(spec_path: str, out_path: str) -> None:
    """Runs in the child process (see `bench_torch_step`): times the step, writes JSON."""
    with open(spec_path) as f:
        spec = json.load(f)
    with open(out_path, 'w') as f:
        json.dump(_timings(spec), f)


def serve_main(spec_path: str) -> None:
    """The child process of `benchmark_step`: sets up as `child_main` does, answers with what it
    set up (one JSON line), then, for each line it reads, the name of a variant, times
    `spec['steps']` steps of it and answers with their seconds (a JSON line), until its input
    closes. The parent times its JAX steps in between, so both see the same load."""
    answers = os.fdopen(os.dup(1), 'w')
    os.dup2(2, 1)  # the answers keep stdout to themselves: other output (warnings) goes to stderr
    with open(spec_path) as f:
        spec = json.load(f)
    record, variants, sync = _setup(spec)
    _answer(answers, record)
    for line in sys.stdin:
        step = variants[line.strip()]
        _answer(answers, [_timed_step(step, sync) for _ in range(spec['steps'])])


def _answer(stream, value) -> None:
    stream.write(json.dumps(value) + '\n')
    stream.flush()


def _timed_step(step, sync) -> float:
    sync()
    start = time.perf_counter()
    step()
    sync()
    return time.perf_counter() - start


def _counts(module) -> dict:
    """Numbers of trained parameters and of BatchNorm statistics (running means and variances)."""
    stats = [b for n, b in module.named_buffers() if n.endswith(('running_mean', 'running_var'))]
    return {
        'parameters': sum(p.numel() for p in module.parameters()),
        'batch_stats': sum(b.numel() for b in stats),
    }


def _build_variants(spec, images, labels, device, sync) -> tuple[dict, dict]:
    """({eager, compiled: step}, {name: its set-up record or error}), each warmed up; the weights
    are seeded, or loaded from `spec['weights']` (a `torch_state` in an .npz file) when set."""
    import torch

    head = {k: spec[k] for k in ('dim', 'scale', 'margin', 'temperature', 'weight')}
    opt = {k: spec[k] for k in ('lr', 'momentum', 'weight_decay')}
    variants, out = {}, {}
    for name in ('eager', 'compiled') if spec['compile'] else ('eager',):
        torch.manual_seed(0)
        module = torch_bct_module(spec['classes'], backbone=spec.get('backbone'), **head)
        if spec.get('weights'):
            with np.load(spec['weights']) as weights:
                load_state(module, {k: weights[k] for k in weights.files})
        module = module.to(device, memory_format=torch.channels_last).train()
        optimizer, impl = torch_sgd(module, **opt)
        forward = torch.compile(module) if name == 'compiled' else module

        def step(forward=forward, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            loss = forward(images, labels)[0]
            loss.backward()
            optimizer.step()
            return loss

        start, first = time.perf_counter(), None
        try:
            for _ in range(max(spec['warmup'], 1)):
                loss = step()
                sync()
                first = float(loss) if first is None else first
        except Exception as e:  # noqa: BLE001 (torch.compile fails in many ways; report it)
            out[name] = {'error': f'{type(e).__name__}: {e}'[:2000]}
            continue
        out[name] = {
            'warmup_seconds': time.perf_counter() - start,
            'warmup_steps': max(spec['warmup'], 1),
            'first_loss': first,
            'optimizer': impl,
            **_counts(module),
            'all_seconds': [],
        }
        variants[name] = step
    return variants, out


def _timings(spec: dict) -> dict:
    """`_setup`, then `repeats` synchronised steps of each variant taken in turn."""
    record, variants, sync = _setup(spec)
    for _ in range(spec['repeats']):  # in turn, as harness.timed_together
        for name, step in variants.items():
            record['steps'][name]['all_seconds'].append(_timed_step(step, sync))
    for name in variants:
        r = record['steps'][name]
        r.update(seconds=min(r['all_seconds']), runs=len(r['all_seconds']))
        r['images_per_sec'] = spec['batch'] / r['seconds']
    return record


def _setup(spec: dict) -> tuple[dict, dict, Callable | None]:
    """Imports torch, picks the device (`spec['device']`, else CUDA when torch sees it) and its
    settings, and the thread count (`spec['threads']`, else torch's default), builds and warms
    up the variants on train_step's batch: (the record for the JSON, {name: step}, sync)."""
    try:
        import torch
        import torchvision
    except (ImportError, OSError, RuntimeError) as e:  # also a torchvision unfit for the torch
        return {'available': False, 'error': f'{type(e).__name__}: {e}'}, {}, None
    device = torch.device(spec.get('device') or ('cuda' if torch.cuda.is_available() else 'cpu'))
    cuda = device.type == 'cuda'
    if spec.get('threads'):
        torch.set_num_threads(spec['threads'])
    tf32 = tf32_for(spec['jax_default_matmul_precision'])
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32

    def sync():
        if cuda:
            torch.cuda.synchronize()

    batch = random_batch(spec['batch'], spec['image_size'], spec['classes'])  # train_step's
    images = torch.from_numpy(batch['image']).to(device)
    labels = torch.from_numpy(batch['label'].astype(np.int64)).to(device)
    variants, steps = _build_variants(spec, images, labels, device, sync)
    backends = torch.backends
    record = {
        'available': True,
        'torch': torch.__version__,
        'torchvision': torchvision.__version__,
        'device': str(device),
        'device_name': torch.cuda.get_device_name() if cuda else platform.processor() or 'cpu',
        'threads': torch.get_num_threads(),
        'settings': {
            'channels_last': True,
            'cudnn_benchmark': backends.cudnn.benchmark,
            'matmul_allow_tf32': backends.cuda.matmul.allow_tf32,
            'cudnn_allow_tf32': backends.cudnn.allow_tf32,
            'float32_matmul_precision': torch.get_float32_matmul_precision(),
            'jax_default_matmul_precision': spec['jax_default_matmul_precision'],
            'jax_uses_tf32_on_ampere_or_newer': tf32,
        },
        'peak_memory_bytes': torch.cuda.max_memory_allocated() if cuda else None,
        'steps': steps,
    }
    return record, variants, sync


def child_spec(spec, **sizes) -> dict:
    """What the child needs of `spec` (as `gldv2_spec`: the new model's head, the loss and the
    optimizer), with `sizes` (image_size, batch, classes, warmup, compile, ...)."""
    model, train = spec.new_model, spec.train
    return {
        'dim': model.embedding_dim,
        'scale': model.scale,
        'margin': model.margin,
        'temperature': spec.compat.temperature,
        'weight': spec.compat.weight,
        'lr': train.learning_rate,
        'momentum': train.momentum,
        'weight_decay': train.weight_decay,
        'jax_default_matmul_precision': jax.config.jax_default_matmul_precision,
        **sizes,
    }


def _step_spec(cfg) -> dict:
    """The child's spec: the GLDv2 new model's head, loss and optimizer at train_step's sizes."""
    return child_spec(
        gldv2_spec(),
        image_size=cfg['step_image_size'],
        batch=cfg['step_batch'],
        classes=cfg['step_classes'],
        repeats=cfg['step_repeats'],
        warmup=cfg['torch_warmup'],
        compile=cfg['torch_compile'],
    )


def _child(function: str, *args: str) -> tuple[list[str], dict]:
    """(argv, environment) of a Python child that runs `torch_step.<function>(*args)` with this
    checkout's bcl_jax first on its path."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.pathsep.join(filter(None, [root, os.environ.get('PYTHONPATH')]))
    code = f'import sys; from bcl_jax.bench import torch_step; torch_step.{function}(*sys.argv[1:])'
    return [sys.executable, '-c', code, *args], dict(os.environ, PYTHONPATH=path)


def _run_child(spec: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = os.path.join(tmp, 'spec.json'), os.path.join(tmp, 'out.json')
        with open(spec_path, 'w') as f:
            json.dump(spec, f)
        argv, env = _child('child_main', spec_path, out_path)
        child = subprocess.run(argv, check=False, env=env, capture_output=True, text=True)
        if child.returncode or not os.path.exists(out_path):
            return {'available': True, 'error': f'exit {child.returncode}: {child.stderr[-4000:]}'}
        with open(out_path) as f:
            return json.load(f)


@contextlib.contextmanager
def torch_server(spec: dict, weights: dict[str, np.ndarray]):
    """The child process of `serve_main`, set up for `spec` from `weights` (a `torch_state`):
    yields (what it set up, `ask`); `ask(variant)` times a block of that variant's steps in the
    child and returns their seconds. Raises RuntimeError, with the child's stderr, when it
    ends early; it ends when the block is left (its input closed)."""
    with tempfile.TemporaryDirectory() as tmp, open(os.path.join(tmp, 'stderr'), 'w+') as err:
        spec = dict(spec, weights=os.path.join(tmp, 'weights.npz'))
        np.savez(spec['weights'], **weights)
        with open(os.path.join(tmp, 'spec.json'), 'w') as f:
            json.dump(spec, f)
        argv, env = _child('serve_main', f.name)
        child = subprocess.Popen(
            argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True
        )

        def read():
            line = child.stdout.readline()
            if not line:
                err.seek(0)
                raise RuntimeError(f'exit {child.wait()}: {err.read()[-4000:]}')
            return json.loads(line)

        def ask(variant: str) -> list[float]:
            with contextlib.suppress(BrokenPipeError):  # a child gone: read() says why
                child.stdin.write(variant + '\n')
                child.stdin.flush()
            return read()

        try:
            yield read(), ask
        finally:
            child.stdin.close()
            child.wait()


def torch_missing() -> dict | None:
    """The result of a measurement that needs torch and torchvision where one is missing."""
    missing = next((m for m in ('torch', 'torchvision') if importlib.util.find_spec(m) is None), '')
    return {'available': False, 'error': f'No module named {missing!r}'} if missing else None


def _compare_with_jax(out: dict, results: dict) -> None:
    """Adds JAX's BCT images/s per device over PyTorch's, when train_step ran before."""
    jax_step = results.get('train_step', {}).get('steps', {}).get('new_resnet50_bct')
    if not out['available'] or 'steps' not in out or jax_step is None:
        return
    # Per chip: train_step splits its batch over all of JAX's devices, PyTorch uses one.
    devices = results['train_step'].get('devices', 1)
    per_chip = jax_step['images_per_sec'] / devices
    out['jax_bct_images_per_sec_per_device'] = per_chip
    out['jax_devices'] = devices
    out['jax_device'] = jax.devices()[0].device_kind
    out['jax_to_torch'] = {
        name: per_chip / r['images_per_sec']
        for name, r in out['steps'].items()
        if 'images_per_sec' in r
    }
    torch_backend = 'gpu' if out['device'].startswith('cuda') else 'cpu'
    if jax.default_backend() != torch_backend:  # e.g. a torch build the driver cannot run
        out['warning'] = (
            f'JAX ran on {jax.default_backend()}, PyTorch on {out["device"]}: not comparable'
        )


@measurement('torch_step')
def bench_torch_step(cfg, results):
    """PyTorch's BCT step, timed in a child process (see the module docstring)."""
    missing = torch_missing()
    if missing:
        return missing
    spec = _step_spec(cfg)
    out = dict(
        _run_child(spec),
        image_size=spec['image_size'],
        batch=spec['batch'],
        classes=spec['classes'],
        jax_gpu_preallocate=os.environ.get('XLA_PYTHON_CLIENT_PREALLOCATE'),
        target_ratio=1.0,
    )
    _compare_with_jax(out, results)
    return out
