"""Benchmarks of bcl_jax at GLDv2 scale, written as JSON: `python -m bcl_jax.bench --help`.

One module per group of measurements, each a function registered by name (`registry.py`):

- refresh.py: floor, ndpp, ndpp_parts, odpp: one NDPP / ODPP prototype refresh against the bare
  similarity matmuls (the floor) and against each other.
- eval_topk.py: eval_topk: the GLDv2 retrieval search, `knn.topk` against faiss.
- train_step.py: train_step: one training step of the GLDv2 models, images per second.
- torch_step.py: torch_step: the same BCT step in PyTorch (the weights convert both ways).
- benchmark_step.py: benchmark_step: the built-in benchmark's new model's step on the CPU, JAX
  and PyTorch timed in turn.

Shared timing helpers: harness.py. Measured numbers, profiles and what was tried:
docs/benchmarks.md.
"""

# Importing a group registers its measurements and sizes, in this order (that of --help).
from bcl_jax.bench import refresh  # noqa: I001
from bcl_jax.bench import eval_topk
from bcl_jax.bench import train_step
from bcl_jax.bench import torch_step
from bcl_jax.bench import benchmark_step
from bcl_jax.bench.registry import MEASUREMENTS, SIZES, config, run

__all__ = [
    'MEASUREMENTS',
    'SIZES',
    'benchmark_step',
    'config',
    'eval_topk',
    'refresh',
    'run',
    'torch_step',
    'train_step',
]
