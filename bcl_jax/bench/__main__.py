"""Benchmarks of bcl_jax at GLDv2 scale (defaults), written as JSON.

    python -m bcl_jax.bench [--measure=floor,ndpp,odpp] [--quick] [--out=FILE] [--SIZE=N ...]

Measurements: floor, ndpp, ndpp_parts, odpp (prototype refreshes); eval_topk (knn.topk vs
faiss); train_step (the GLDv2 models' step); torch_step (that step in PyTorch); benchmark_step
(the built-in benchmark's model's CPU step, JAX and PyTorch in turn). --quick: small sizes,
seconds. Results: --out, by default runs/bench/bench-<time>.json in the checkout.
What each computes and measured numbers: docs/benchmarks.md. Help on each size: --helpfull.
"""

import os

from absl import app, flags

from bcl_jax.bench import registry

# The sizes, one flag each, are defined by registry (shown by --helpfull), so that --help, the
# flags of this module, stays one screen; the usage text below lists them with their defaults.
registry.define_flags()
__doc__ += registry.sizes_usage()

FLAGS = flags.FLAGS
flags.DEFINE_list('measure', ['floor', 'ndpp', 'odpp'], 'measurements to run, in order')
flags.DEFINE_string('out', '', 'results file (default: runs/bench/bench-<time>.json)')
flags.DEFINE_bool('quick', False, 'small sizes (seconds), for tests; given sizes still apply')
_JAX_MEMORY = ('XLA_PYTHON_CLIENT_PREALLOCATE', 'XLA_PYTHON_CLIENT_MEM_FRACTION')


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments {argv[1:]}')
    given = {name: FLAGS[name].value for name in registry.SIZES if FLAGS[name].present}
    cfg = registry.config(quick=FLAGS.quick, **given)
    if 'torch_step' in FLAGS.measure and not any(v in os.environ for v in _JAX_MEMORY):
        # PyTorch runs in a child process on the same GPU: without this JAX would take 75% of
        # its memory at its first use and keep it. Set before JAX starts its backend.
        os.environ['XLA_PYTHON_CLIENT_PREALLOCATE'] = 'false'
    out = FLAGS.out or registry.default_out_path()
    report = registry.run(cfg, list(FLAGS.measure))
    print(f'results: {registry.write_json(report, out)}', flush=True)


if __name__ == '__main__':
    app.run(main)
