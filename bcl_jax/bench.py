"""Timings of the prototype-perturbation code at GLDv2 scale, as JSON.

    python -m bcl_jax.bench [--classes=81313] [--dim=256] [--k=100] [--odpp_classes=24393]
                            [--odpp_passes=100] [--out=bench.json] [--quick]
                            [--measure=floor,ndpp,odpp]

Measurements (each a named entry of `MEASUREMENTS`; add one by decorating a function with
`@measurement('name')` — it gets the parsed flags and the results so far, returns a dict):

- floor: the bare similarity matmuls NDPP cannot avoid, old·oldᵀ and old·newᵀ at C × C × D,
  in query blocks reduced by a row max (plain, or after the self mask; the faster counts) so
  C × C is never held.
- ndpp: one NDPP refresh at C classes, and its ratio to the floor (target <= 2).
- ndpp_parts (not run by default): the two neighbour searches alone, to see what dominates.
- odpp: one ODPP refresh (`odpp_passes` passes of 1,024 pairs per step) at `odpp_classes`
  classes, one NDPP refresh at that C, and their ratio (target <= 10).

Every timing is of a jitted computation after a warm-up call (which compiles), waited for with
`block_until_ready`; the warm-up time (compile + first run) is reported beside it. Banks are
random unit vectors: the work does not depend on the data. `--quick` shrinks every size so the
whole run takes seconds (for tests).
"""
from __future__ import annotations

import functools
import json
import os
import platform
import time
from typing import Callable

import jax
import jax.numpy as jnp
from absl import app, flags
from jax import lax

from bcl_jax import knn, perturbation

FLAGS = flags.FLAGS
flags.DEFINE_integer('classes', 81313, 'C for the floor and NDPP (GLDv2-clean: 81,313).')
flags.DEFINE_integer('dim', 256, 'Embedding dimension D.')
flags.DEFINE_integer('k', 100, 'Neighbours K for NDPP.')
flags.DEFINE_integer('odpp_classes', 24393, 'C for ODPP (GLDv2 old classes: 24,393).')
flags.DEFINE_float('odpp_passes', 100, 'ODPP passes over the classes per refresh.')
flags.DEFINE_integer('odpp_pairs_per_step', 1024, 'ODPP pairs per inner step.')
flags.DEFINE_integer('repeats', 1, 'Timed runs after the warm-up; the minimum is reported.')
flags.DEFINE_list('measure', ['floor', 'ndpp', 'odpp'], 'Measurements to run, in order.')
flags.DEFINE_string('out', 'bench.json', 'Where to write the JSON results.')
flags.DEFINE_bool('quick', False, 'Small sizes (seconds), for tests.')

QUICK = dict(classes=600, dim=32, k=10, odpp_classes=300, odpp_passes=2,
             odpp_pairs_per_step=64)

MEASUREMENTS: dict[str, Callable[[dict, dict], dict]] = {}


def measurement(name: str):
    def register(fn):
        MEASUREMENTS[name] = fn
        return fn
    return register


def timed(fn, *args, repeats: int = 1) -> dict:
    """Warm-up call (compile + run), then `repeats` timed calls; seconds."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    warmup = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return dict(seconds=min(times), warmup_seconds=warmup, runs=len(times))


def random_bank(seed: int, classes: int, dim: int):
    x = jax.random.normal(jax.random.key(seed), (classes, dim), jnp.float32)
    return x / jnp.linalg.norm(x, axis=1, keepdims=True)


def _banks(cfg, classes):
    return random_bank(0, classes, cfg['dim']), random_bank(1, classes, cfg['dim'])


@jax.jit(static_argnames=('block', 'masked'))
def similarity_floor(old, new, *, block: int = 256, masked: bool = False):
    """Row maxima of old·oldᵀ and old·newᵀ, `block` query rows at a time: the matmuls of NDPP's
    two searches with nothing else (the max is a trivial reduction so C × C is never held).
    `masked` first sets the self-similarities to -inf, as the searches do."""
    c, d = old.shape
    padded = -(-c // block) * block
    queries = jnp.pad(old, ((0, padded - c), (0, 0))).reshape(-1, block, d)
    starts = jnp.arange(padded // block, dtype=jnp.int32) * block
    cols = jnp.arange(c, dtype=jnp.int32)

    def one(args):
        q, start = args

        def row_max(g):
            s = lax.dot_general(q, g, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST,
                                preferred_element_type=jnp.float32)
            if masked:
                rows = start + jnp.arange(block, dtype=jnp.int32)
                s = jnp.where(rows[:, None] == cols[None, :], -jnp.inf, s)
            return jnp.max(s, axis=1)

        return row_max(old), row_max(new)

    maxima = lax.map(one, (queries, starts))
    return tuple(m.reshape(padded)[:c] for m in maxima)


@measurement('floor')
def bench_floor(cfg, results):
    """The fastest of two trivial reductions: how XLA fuses the dot with what follows matters
    (on XLA:CPU 0.10 a bare row max is fused into the matmul kernel and runs ~2x slower)."""
    old, new = _banks(cfg, cfg['classes'])
    variants = {name: timed(functools.partial(similarity_floor, masked=masked), old, new,
                            repeats=cfg['repeats'])
                for name, masked in (('row_max', False), ('masked_row_max', True))}
    best = min(variants, key=lambda name: variants[name]['seconds'])
    flops = 2 * 2 * cfg['classes'] ** 2 * cfg['dim']
    return dict(variants[best], variant=best, variants=variants, classes=cfg['classes'],
                dim=cfg['dim'], gflops=flops / variants[best]['seconds'] / 1e9)


def _ndpp(cfg, classes):
    old, new = _banks(cfg, classes)
    return timed(lambda o, n: perturbation.ndpp(o, n, k=cfg['k']), old, new,
                 repeats=cfg['repeats'])


@measurement('ndpp')
def bench_ndpp(cfg, results):
    out = dict(_ndpp(cfg, cfg['classes']), classes=cfg['classes'], dim=cfg['dim'], k=cfg['k'])
    if 'floor' in results:
        out['ratio_to_floor'] = out['seconds'] / results['floor']['seconds']
        out['target_ratio'] = 2.0
    return out


@measurement('ndpp_parts')
def bench_ndpp_parts(cfg, results):
    """The two neighbour searches alone, with the block sizes ndpp uses."""
    c, k = cfg['classes'], min(cfg['k'], cfg['classes'] - 1)
    old, new = _banks(cfg, c)
    blocks = dict(query_block=256, gallery_block=perturbation._even_block(c, 131072))
    search_old = timed(lambda o: knn.topk(o, o, k, exclude_self=True, **blocks), old,
                       repeats=cfg['repeats'])
    search_new = timed(lambda o, n: knn.topk(o, n, k, exclude_self=True, **blocks), old, new,
                       repeats=cfg['repeats'])
    out = dict(search_old=search_old, search_new=search_new)
    if 'ndpp' in results:
        out['rest_seconds'] = (results['ndpp']['seconds'] - search_old['seconds']
                               - search_new['seconds'])
    return out


@measurement('odpp')
def bench_odpp(cfg, results):
    c, per_step = cfg['odpp_classes'], cfg['odpp_pairs_per_step']
    steps = perturbation.passes_to_steps(c, cfg['odpp_passes'], per_step)
    old, new = _banks(cfg, c)
    delta0 = jnp.zeros_like(old)
    odpp = timed(lambda o, n, d: perturbation.odpp(o, n, d, jax.random.key(0), steps=steps,
                                                   pairs_per_step=per_step)[0],
                 old, new, delta0, repeats=cfg['repeats'])
    ndpp = _ndpp(cfg, c)
    return dict(odpp, classes=c, passes=cfg['odpp_passes'], steps=steps,
                pairs_per_step=per_step, ms_per_step=1e3 * odpp['seconds'] / max(steps, 1),
                ndpp_seconds=ndpp['seconds'], ndpp_warmup_seconds=ndpp['warmup_seconds'],
                ratio_to_ndpp=odpp['seconds'] / ndpp['seconds'], target_ratio=10.0)


def environment() -> dict:
    return dict(jax=jax.__version__, backend=jax.default_backend(),
                devices=[str(d) for d in jax.devices()], cpu_count=os.cpu_count(),
                machine=platform.machine(), python=platform.python_version())


def run(cfg: dict) -> dict:
    unknown = [m for m in cfg['measure'] if m not in MEASUREMENTS]
    if unknown:
        raise ValueError(f'Unknown measurements {unknown}; known: {sorted(MEASUREMENTS)}.')
    results = {}
    for name in cfg['measure']:
        results[name] = MEASUREMENTS[name](cfg, results)
        print(f'{name}: {json.dumps(results[name])}', flush=True)
    return dict(config=cfg, environment=environment(), results=results)


def main(argv):
    del argv
    cfg = dict(classes=FLAGS.classes, dim=FLAGS.dim, k=FLAGS.k, odpp_classes=FLAGS.odpp_classes,
               odpp_passes=FLAGS.odpp_passes, odpp_pairs_per_step=FLAGS.odpp_pairs_per_step,
               repeats=FLAGS.repeats, measure=list(FLAGS.measure), quick=FLAGS.quick)
    if FLAGS.quick:
        cfg.update(QUICK)
    report = run(cfg)
    with open(FLAGS.out, 'w') as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))


if __name__ == '__main__':
    app.run(main)
