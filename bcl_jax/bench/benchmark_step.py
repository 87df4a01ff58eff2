"""benchmark_step: the built-in benchmark's new model's training step on the CPU, JAX and PyTorch.

configs/synthetic.py's new model (`synthetic_spec`: a 16-wide CIFAR ResNet-8, a 64-d embedding,
CosFace over 1,000 classes) at 16 px and batch 128, with BCT's loss (classification + L_comp) and
SGD: bcl_jax's step as training builds it (`train_step.jax_train_step`), and the same step in
PyTorch (`torch_step.torch_bct_module` on bcl_jax's own PyTorch ResNet, from bcl_jax's weights),
eager and, with `torch_compile`, torch.compile'd. Both run on one CPU device with the same
number of threads: XLA's default (its intra-op pool: one thread per CPU this process may run on,
or $PJRT_NPROC / $NPROC), and torch.set_num_threads to match. PyTorch runs in a child process
(`torch_step.serve_main`) that times a block of `benchmark_steps` steps when asked; the blocks
alternate with JAX's for `benchmark_rounds` rounds, so that load from other jobs falls on both
alike. Images/s of each from its median step; `jax_to_torch`: JAX's over PyTorch's.

That the two are one model is checked, not assumed (`same_model`): bcl_jax's weights load into
the PyTorch module strictly (every name and shape), the numbers of parameters and of BatchNorm
statistics are equal, and the first step's loss on the same batch agrees.
"""

from __future__ import annotations

import json
import os
import time

import jax
import ml_collections
import numpy as np

from bcl_jax.bench import torch_step, train_step
from bcl_jax.bench.harness import alternating_blocks, random_unit_np
from bcl_jax.bench.registry import Size, measurement, sizes
from bcl_jax.data import pipeline
from bcl_jax.models.resnet import backbone_spec

SIZES = sizes(
    'benchmark_step',
    {
        'benchmark_image_size': Size(16, 16, 'image side (configs/synthetic.py: 16)'),
        'benchmark_batch': Size(128, 32, 'batch (configs/synthetic.py: 128)'),
        'benchmark_classes': Size(1000, 1000, 'classes (configs/synthetic.py: 1,000)'),
        'benchmark_rounds': Size(20, 2, 'rounds of blocks, JAX and PyTorch in turn'),
        'benchmark_steps': Size(10, 2, 'timed steps in each block'),
        'benchmark_warmup': Size(3, 1, 'untimed steps first, in each framework and variant'),
    },
)
METHOD = 'bct'
LOSS_RTOL = 1e-4  # float32 sums in another order: the first losses agree to ~1e-6


def synthetic_spec() -> ml_collections.ConfigDict:
    """What configs/synthetic.py (on configs/common.py) sets for its new models, their optimizer,
    loss and prototype EMA; tests/test_bench.py checks it against the config. The optimizer, L_comp
    and prototype settings are common.py's, as are `gldv2_spec`'s."""
    spec = train_step.gldv2_spec()
    spec.new_model.update(arch='cifar_resnet', width=16, depth=8, embedding_dim=64)
    spec.train.lr_drop_epochs = (14.0, 18.0)
    return ml_collections.ConfigDict(
        {k: spec[k] for k in ('new_model', 'train', 'compat', 'perturb')}
    )


def torch_backbone_spec(model_cfg) -> dict:
    """`torch_step.torch_backbone`'s description of the model's ResNet (`resnet.backbone_spec`)."""
    spec = backbone_spec(model_cfg.arch, model_cfg.depth)
    return dict(spec, width=model_cfg.width, pool=model_cfg.pool)


def xla_cpu_threads() -> tuple[int, str]:
    """(threads of XLA:CPU's intra-op pool, how known): counted by name where /proc lists this
    process's threads (the pool exists once a computation ran), else XLA's rule for its size:
    $PJRT_NPROC or $NPROC, else the CPUs this process may run on, and at least one per CPU
    device (--xla_force_host_platform_device_count)."""
    counted = sum(name.endswith('XLAEigen') for name in _thread_names())
    if counted:
        return counted, 'counted (threads named XLAEigen)'
    devices = jax.device_count('cpu')
    for name in ('PJRT_NPROC', 'NPROC'):
        if os.environ.get(name, '').isdigit():
            return max(int(os.environ[name]), devices), f'${name}'
    return max(_cpus(), devices), 'the CPUs this process may run on'


def _cpus() -> int:
    """The CPUs this process may run on (all of them where the OS does not say)."""
    if hasattr(os, 'sched_getaffinity'):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _thread_names() -> list[str]:
    """The names of this process's threads, where /proc lists them (Linux), else []."""
    names, tasks = [], '/proc/self/task'
    for task in os.listdir(tasks) if os.path.isdir(tasks) else []:
        try:
            with open(f'{tasks}/{task}/comm') as f:
                names.append(f.read().strip())
        except OSError:  # a thread that ended meanwhile
            pass
    return names


def _jax_step(spec, cfg):
    """(a step call, bcl_jax's weights as a torch state dict, the numbers of parameters and of
    BatchNorm statistics) of the new model's BCT step on one CPU device."""
    classes, model_cfg = cfg['benchmark_classes'], spec.new_model
    devices = jax.devices('cpu')[:1]
    mesh = jax.make_mesh((1,), ('data',), (jax.sharding.AxisType.Auto,), devices=devices)
    # torch_bct_module's default bank: both steps see the same prototypes.
    bank = random_unit_np(1, classes, model_cfg.embedding_dim)
    built = train_step.jax_train_step(
        model_cfg, METHOD, spec, classes=classes, mesh=mesh, prototypes=bank
    )
    # A copy on the host before the first step, which donates the state's buffers.
    params, stats = jax.device_get(built.weights(built.state))
    arch, backbone = model_cfg.arch, torch_backbone_spec(model_cfg)
    weights = torch_step.torch_state(params, stats, arch=arch, backbone=backbone)
    counts = {
        'parameters': sum(np.size(x) for x in jax.tree.leaves(params)),
        'batch_stats': sum(np.size(x) for x in jax.tree.leaves(stats)),
    }
    batch = train_step.random_batch(cfg['benchmark_batch'], cfg['benchmark_image_size'], classes)
    return train_step.step_call(built, pipeline.to_global(batch, mesh)), weights, counts


def _warm_up(call, steps: int) -> dict:
    """Runs `steps` (at least one, which compiles) untimed steps; their time and first loss."""
    start = time.perf_counter()
    first = float(call())
    for _ in range(steps - 1):
        jax.block_until_ready(call())
    return {
        'warmup_seconds': time.perf_counter() - start,
        'warmup_steps': steps,
        'first_loss': first,
    }


def _block(call, steps: int):
    """A block of `steps` steps, each timed: fn() -> [seconds]."""

    def run():
        seconds = []
        for _ in range(steps):
            start = time.perf_counter()
            jax.block_until_ready(call())
            seconds.append(time.perf_counter() - start)
        return seconds

    return run


def _summary(seconds: list[float], batch: int) -> dict:
    median = float(np.median(seconds))
    return {
        'images_per_sec': batch / median,
        'median_seconds': median,
        'min_seconds': min(seconds),
        'runs': len(seconds),
        'all_seconds': seconds,
    }


def _same_model(jax_counts: dict, jax_loss: float, torch_steps: dict) -> dict:
    """The equivalence checks of the module docstring (the strict load happened in the child)."""
    eager = torch_steps['eager']
    losses = {'jax': jax_loss}
    losses.update(
        {f'torch_{n}': r['first_loss'] for n, r in torch_steps.items() if 'first_loss' in r}
    )
    rel = max(abs(v - jax_loss) / abs(jax_loss) for v in losses.values())
    same_counts = all(jax_counts[k] == eager[k] for k in jax_counts)
    return {
        'parameters': {'jax': jax_counts['parameters'], 'torch': eager['parameters']},
        'batch_stats': {'jax': jax_counts['batch_stats'], 'torch': eager['batch_stats']},
        'first_loss': losses,
        'first_loss_max_rel_diff': rel,
        'ok': same_counts and rel <= LOSS_RTOL,
    }


def _torch_spec(spec, cfg, threads: int) -> dict:
    return torch_step.child_spec(
        spec,
        image_size=cfg['benchmark_image_size'],
        batch=cfg['benchmark_batch'],
        classes=cfg['benchmark_classes'],
        warmup=cfg['benchmark_warmup'],
        steps=cfg['benchmark_steps'],
        compile=cfg['torch_compile'],
        backbone=torch_backbone_spec(spec.new_model),
        device='cpu',
        threads=threads,
    )


def _time_in_turn(spec, cfg, call, weights, threads: int) -> tuple[dict, dict]:
    """(the PyTorch child's set-up record, {jax, torch_eager, torch_compiled: step seconds}):
    blocks of JAX's steps and of each PyTorch variant's, taken in turn (`alternating_blocks`)."""
    with torch_step.torch_server(_torch_spec(spec, cfg, threads), weights) as (record, ask):
        if not record['available'] or 'error' in record['steps']['eager']:
            raise RuntimeError(f'PyTorch set-up failed: {json.dumps(record)[:4000]}')
        blocks = {'jax': _block(call, cfg['benchmark_steps'])}
        for name, r in record['steps'].items():
            if 'error' not in r:  # torch.compile that failed: reported, not timed
                blocks[f'torch_{name}'] = lambda name=name: ask(name)
        return record, alternating_blocks(blocks, cfg['benchmark_rounds'])


def _steps(jax_warmup: dict, torch_steps: dict, seconds: dict, batch: int) -> dict:
    """Each framework's (and variant's) warm-up record and timing summary."""
    out = {'jax': dict(jax_warmup, **_summary(seconds['jax'], batch))}
    for name, r in torch_steps.items():
        timed = _summary(seconds[f'torch_{name}'], batch) if 'error' not in r else {}
        out[f'torch_{name}'] = dict({k: v for k, v in r.items() if k != 'all_seconds'}, **timed)
    return out


@measurement('benchmark_step')
def bench_benchmark_step(cfg, results):
    """JAX's and PyTorch's step of the built-in benchmark's new model (the module docstring)."""
    del results
    missing = torch_step.torch_missing()
    if missing:
        return missing
    spec, batch = synthetic_spec(), cfg['benchmark_batch']
    call, weights, counts = _jax_step(spec, cfg)
    jax_warmup = _warm_up(call, max(cfg['benchmark_warmup'], 1))
    threads, threads_from = xla_cpu_threads()  # after the warm-up: the pool exists
    try:
        record, seconds = _time_in_turn(spec, cfg, call, weights, threads)
    except RuntimeError as e:
        return {'available': True, 'error': str(e)}
    steps = _steps(jax_warmup, record['steps'], seconds, batch)
    torch_rates = {
        n.removeprefix('torch_'): r['images_per_sec']
        for n, r in steps.items()
        if n != 'jax' and 'images_per_sec' in r
    }
    return {
        'available': True,
        'model': spec.new_model.to_dict(),
        'method': METHOD,
        'image_size': cfg['benchmark_image_size'],
        'batch': batch,
        'classes': cfg['benchmark_classes'],
        'rounds': cfg['benchmark_rounds'],
        'steps_per_block': cfg['benchmark_steps'],
        'threads': {
            'jax': threads,
            'jax_from': threads_from,
            'torch': record['threads'],
            'cpus': _cpus(),
        },
        'same_model': _same_model(counts, jax_warmup['first_loss'], record['steps']),
        'steps': steps,
        'jax_to_torch': {n: steps['jax']['images_per_sec'] / r for n, r in torch_rates.items()},
        'torch': {k: record[k] for k in ('torch', 'torchvision', 'device', 'device_name')},
        'jax_device': jax.devices('cpu')[0].device_kind,
    }
