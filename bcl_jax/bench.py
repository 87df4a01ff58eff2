"""Timings of the prototype-perturbation code at GLDv2 scale, as JSON.

    python -m bcl_jax.bench [--classes=81313] [--dim=256] [--k=100] [--odpp_classes=24393]
                            [--odpp_passes=100] [--out=bench.json] [--quick]
                            [--measure=floor,ndpp,odpp]

Measurements (each a named entry of `MEASUREMENTS`; add one by decorating a function with
`@measurement('name')` — it gets the parsed flags and the results so far, returns a dict):

- floor: the bare similarity matmuls NDPP cannot avoid, old·oldᵀ and old·newᵀ at C × C × D,
  in query blocks reduced by a row max (plain, or after the self mask; the faster counts) so
  C × C is never held.
- ndpp: one NDPP refresh at C classes, and its ratio to the floor (target <= 2). The floor is
  timed again here, in turn with NDPP, so that the ratio is not skewed by changing load.
- ndpp_parts (not run by default): the two neighbour searches alone, to see what dominates.
- odpp: one ODPP refresh (`odpp_passes` passes of 1,024 pairs per step) at `odpp_classes`
  classes, one NDPP refresh at that C (timed in turn), and their ratio (target <= 10).

Every timing is of a jitted computation after a warm-up call (which compiles), waited for with
`block_until_ready`; the warm-up time (compile + first run) is reported beside it. Banks are
random unit vectors: the work does not depend on the data. `--quick` shrinks every size so the
whole run takes seconds (for tests).

What was found on a 2-core x86 CPU (XLA:CPU, JAX 0.10.2), shared with other jobs, so timings
vary by up to 2x from minute to minute; compare only numbers from one run:

- Profile of one NDPP refresh (jax.profiler, C = 40,000): matmuls ~50%, `lax.top_k` ~40%,
  the self mask ~4%, weighted neighbour sums (gather + einsum) ~6%. The matmul runs on both
  cores; XLA:CPU's TopK is one thread, so NDPP / floor ~ 1 + t(top-k) / t(matmul) and rises
  when the machine is quiet (the matmul speeds up, the top-k does not).
- Wide gallery blocks (the whole bank, up to 131,072 rows, in one block; default in `ndpp`):
  expected a large gain, since each top-k call costs ~7 us per row plus a merge per block.
  Measured at C = 40,000: 3 blocks of 13,440 -> 1 block: NDPP / floor 1.67 -> 1.20 (same run).
  At 4,096-wide blocks (knn's default) an estimate from per-call costs gives ~4.4.
- Group-max pre-filter before the top-k (exact: top-k of the K best 16-wide groups), tried in
  knn's block top-k: expected -40% top-k time (microbenchmark on an 81k-wide row: 128 -> 70
  us/row). Measured in place, C = 40,000: -4 to -8% end to end (the masked 16-wide group max
  costs 0.6 ns/element and eats most of it; padding to a multiple of 16 made it slower).
  Not adopted.
- Both searches fused in one loop over query blocks, hoping XLA overlaps one search's
  one-thread top-k with the other's matmul: expected up to -25%; measured 0. Not adopted.
- ndpp(mesh=...) over 2 host devices on the same 2 cores: slower (2.4x vs 1.75x).
- Floor: a bare row max after the dot is fused by XLA:CPU into the YNNPACK matmul kernel and
  runs 2-3x slower (88 s vs 26 s at full size), hence the probe between two variants.
- ODPP at 24,393 classes is bound by the dense Adam update of the (C, D) offset (~8 ms/step,
  memory traffic of Δ, m, v and the gradient), ~2.7x one NDPP refresh at that C.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import time
from collections.abc import Callable

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

QUICK = dict(classes=600, dim=32, k=10, odpp_classes=300, odpp_passes=2, odpp_pairs_per_step=64)

MEASUREMENTS: dict[str, Callable[[dict, dict], dict]] = {}


def measurement(name: str):
    def register(fn):
        MEASUREMENTS[name] = fn
        return fn

    return register


def timed(fn, *args, repeats: int = 1) -> dict:
    """Warm-up call (compile + run), then `repeats` timed calls; seconds."""
    return timed_together({'it': (fn, args)}, repeats=repeats)['it']


def timed_together(calls: dict, repeats: int = 1) -> dict:
    """Like `timed` for several calls {name: (fn, args)}, the timed runs taken in turn (a, b,
    a, b, ...) so that a ratio of two of them is not skewed by load that changes with time."""
    out = {}
    for name, (fn, args) in calls.items():
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        out[name] = dict(warmup_seconds=time.perf_counter() - start, all_seconds=[])
    for _ in range(repeats):
        for name, (fn, args) in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            out[name]['all_seconds'].append(time.perf_counter() - start)
    for r in out.values():
        r.update(seconds=min(r['all_seconds']), runs=len(r['all_seconds']))
    return out


def _ratios(results: dict, a: str, b: str) -> dict:
    """min(a) / min(b), and a / b run by run (each pair ran back to back)."""
    ta, tb = results[a]['all_seconds'], results[b]['all_seconds']
    return dict(ratio=min(ta) / min(tb), paired_ratios=[x / y for x, y in zip(ta, tb)])


def random_bank(seed: int, classes: int, dim: int):
    x = jax.random.normal(jax.random.key(seed), (classes, dim), jnp.float32)
    return x / jnp.linalg.norm(x, axis=1, keepdims=True)


def _banks(cfg, classes):
    return random_bank(0, classes, cfg['dim']), random_bank(1, classes, cfg['dim'])


@jax.jit(static_argnames=('block', 'masked', 'rows'))
def similarity_floor(old, new, *, block: int = 256, masked: bool = False, rows: int | None = None):
    """Row maxima of old·oldᵀ and old·newᵀ, `block` query rows at a time: the matmuls of NDPP's
    two searches with nothing else (the max is a trivial reduction so C × C is never held).
    `masked` first sets the self-similarities to -inf, as the searches do. `rows` limits the
    queries to the first rows of `old` (for a quick probe)."""
    c, d = old.shape
    q = c if rows is None else min(rows, c)
    padded = -(-q // block) * block
    queries = jnp.pad(old[:q], ((0, padded - q), (0, 0))).reshape(-1, block, d)
    starts = jnp.arange(padded // block, dtype=jnp.int32) * block
    cols = jnp.arange(c, dtype=jnp.int32)

    def one(args):
        queries, start = args

        def row_max(gallery):
            s = lax.dot_general(
                queries,
                gallery,
                (((1,), (1,)), ((), ())),
                precision=lax.Precision.HIGHEST,
                preferred_element_type=jnp.float32,
            )
            if masked:
                ids = start + jnp.arange(block, dtype=jnp.int32)
                s = jnp.where(ids[:, None] == cols[None, :], -jnp.inf, s)
            return jnp.max(s, axis=1)

        return row_max(old), row_max(new)

    maxima = lax.map(one, (queries, starts))
    return tuple(m.reshape(padded)[:q] for m in maxima)


FLOOR_VARIANTS = {'row_max': False, 'masked_row_max': True}


@measurement('floor')
def bench_floor(cfg, results):
    """The floor is the faster of two trivial reductions, chosen on a probe of 2,048 query rows
    and then timed in full: how XLA fuses the matmul with what follows matters (XLA:CPU in JAX
    0.10 fuses a bare row max into its YNNPACK matmul kernel, which then runs ~2-3x slower;
    with the self mask in between it does not)."""
    old, new = _banks(cfg, cfg['classes'])
    probe_rows = min(2048, cfg['classes'])
    probes = {
        name: timed(functools.partial(similarity_floor, masked=masked, rows=probe_rows), old, new)[
            'seconds'
        ]
        for name, masked in FLOOR_VARIANTS.items()
    }
    best = min(probes, key=probes.get)
    out = timed(
        functools.partial(similarity_floor, masked=FLOOR_VARIANTS[best]),
        old,
        new,
        repeats=cfg['repeats'],
    )
    flops = 2 * 2 * cfg['classes'] ** 2 * cfg['dim']
    return dict(
        out,
        variant=best,
        probe_rows=probe_rows,
        probe_seconds=probes,
        classes=cfg['classes'],
        dim=cfg['dim'],
        gflops=flops / out['seconds'] / 1e9,
    )


def _ndpp_call(cfg, classes):
    old, new = _banks(cfg, classes)
    return (lambda o, n: perturbation.ndpp(o, n, k=cfg['k'])), (old, new)


@measurement('ndpp')
def bench_ndpp(cfg, results):
    """NDPP at C, timed in turn with the floor (re-timed here, the variant that `floor` chose),
    so that their ratio compares runs made under the same machine load."""
    variant = results.get('floor', {}).get('variant', 'masked_row_max')
    floor = functools.partial(similarity_floor, masked=FLOOR_VARIANTS[variant])
    calls = {'ndpp': _ndpp_call(cfg, cfg['classes']), 'floor': (floor, _banks(cfg, cfg['classes']))}
    timing = timed_together(calls, repeats=cfg['repeats'])
    ratios = _ratios(timing, 'ndpp', 'floor')
    return dict(
        timing['ndpp'],
        classes=cfg['classes'],
        dim=cfg['dim'],
        k=cfg['k'],
        floor_seconds=timing['floor']['seconds'],
        floor_all_seconds=timing['floor']['all_seconds'],
        floor_variant=variant,
        ratio_to_floor=ratios['ratio'],
        paired_ratios_to_floor=ratios['paired_ratios'],
        target_ratio=2.0,
    )


@measurement('ndpp_parts')
def bench_ndpp_parts(cfg, results):
    """The two neighbour searches alone, with the block sizes ndpp uses."""
    c, k = cfg['classes'], min(cfg['k'], cfg['classes'] - 1)
    old, new = _banks(cfg, c)
    blocks = dict(query_block=256, gallery_block=perturbation._even_block(c, 131072))
    search_old = timed(
        lambda o: knn.topk(o, o, k, exclude_self=True, **blocks), old, repeats=cfg['repeats']
    )
    search_new = timed(
        lambda o, n: knn.topk(o, n, k, exclude_self=True, **blocks),
        old,
        new,
        repeats=cfg['repeats'],
    )
    out = dict(search_old=search_old, search_new=search_new)
    if 'ndpp' in results:
        out['rest_seconds'] = (
            results['ndpp']['seconds'] - search_old['seconds'] - search_new['seconds']
        )
    return out


@measurement('odpp')
def bench_odpp(cfg, results):
    """One ODPP refresh and one NDPP refresh at `odpp_classes`, timed in turn."""
    c, per_step = cfg['odpp_classes'], cfg['odpp_pairs_per_step']
    steps = perturbation.passes_to_steps(c, cfg['odpp_passes'], per_step)
    old, new = _banks(cfg, c)

    def odpp(o, n, d):
        return perturbation.odpp(o, n, d, jax.random.key(0), steps=steps, pairs_per_step=per_step)

    calls = {'odpp': (odpp, (old, new, jnp.zeros_like(old))), 'ndpp': _ndpp_call(cfg, c)}
    timing = timed_together(calls, repeats=cfg['repeats'])
    ratios = _ratios(timing, 'odpp', 'ndpp')
    return dict(
        timing['odpp'],
        classes=c,
        passes=cfg['odpp_passes'],
        steps=steps,
        pairs_per_step=per_step,
        ms_per_step=1e3 * timing['odpp']['seconds'] / max(steps, 1),
        ndpp_seconds=timing['ndpp']['seconds'],
        ndpp_all_seconds=timing['ndpp']['all_seconds'],
        ndpp_warmup_seconds=timing['ndpp']['warmup_seconds'],
        ratio_to_ndpp=ratios['ratio'],
        paired_ratios_to_ndpp=ratios['paired_ratios'],
        target_ratio=10.0,
    )


def environment() -> dict:
    return dict(
        jax=jax.__version__,
        backend=jax.default_backend(),
        devices=[str(d) for d in jax.devices()],
        cpu_count=os.cpu_count(),
        machine=platform.machine(),
        python=platform.python_version(),
    )


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
    cfg = dict(
        classes=FLAGS.classes,
        dim=FLAGS.dim,
        k=FLAGS.k,
        odpp_classes=FLAGS.odpp_classes,
        odpp_passes=FLAGS.odpp_passes,
        odpp_pairs_per_step=FLAGS.odpp_pairs_per_step,
        repeats=FLAGS.repeats,
        measure=list(FLAGS.measure),
        quick=FLAGS.quick,
    )
    if FLAGS.quick:
        cfg.update(QUICK)
    report = run(cfg)
    with open(FLAGS.out, 'w') as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))


if __name__ == '__main__':
    app.run(main)
