"""The cost of one prototype-perturbation refresh at GLDv2 scale: floor, ndpp, ndpp_parts, odpp.

- floor: the bare similarity matmuls NDPP cannot avoid, old·oldᵀ and old·newᵀ at C × C × D, in
  query blocks reduced by a row max (plain, or after the self mask; the faster counts), so that
  C × C is never held.
- ndpp: one NDPP refresh at C classes, timed in turn with the floor; their ratio (target <= 2).
- ndpp_parts (not run by default): the two neighbour searches alone, to see what dominates.
- odpp: one ODPP refresh (`odpp_passes` passes of `odpp_pairs_per_step` pairs per step) at
  `odpp_classes` classes and one NDPP refresh at that C, timed in turn; ratio (target <= 10).

Banks are random unit vectors. Measured numbers and what was tried: docs/benchmarks.md.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from bcl_jax import banks, knn, perturbation
from bcl_jax.bench.harness import random_bank, ratios, timed, timed_together
from bcl_jax.bench.registry import Size, measurement, sizes

SIZES = sizes(
    'floor, ndpp, ndpp_parts, odpp',
    {
        'classes': Size(81313, 600, 'C for the floor and NDPP (GLDv2-clean: 81,313)'),
        'dim': Size(256, 32, 'embedding dimension D of the banks'),
        'k': Size(100, 10, 'NDPP neighbours K'),
        'odpp_classes': Size(24393, 300, 'C for ODPP (GLDv2 old classes: 24,393)'),
        'odpp_passes': Size(100.0, 2.0, 'ODPP passes over the classes per refresh'),
        'odpp_pairs_per_step': Size(1024, 64, 'ODPP pairs per inner step'),
        'repeats': Size(1, 1, 'timed runs after the warm-up (the minimum is reported)'),
    },
)


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
    del results
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
    ratio = ratios(timing, 'ndpp', 'floor')
    return dict(
        timing['ndpp'],
        classes=cfg['classes'],
        dim=cfg['dim'],
        k=cfg['k'],
        floor_seconds=timing['floor']['seconds'],
        floor_all_seconds=timing['floor']['all_seconds'],
        floor_variant=variant,
        ratio_to_floor=ratio['ratio'],
        paired_ratios_to_floor=ratio['paired_ratios'],
        target_ratio=2.0,
    )


@measurement('ndpp_parts')
def bench_ndpp_parts(cfg, results):
    """The two neighbour searches alone, with the block sizes ndpp uses; with `ndpp` earlier in
    the run, the rest of NDPP's time."""
    c, k = cfg['classes'], min(cfg['k'], cfg['classes'] - 1)
    old, new = _banks(cfg, c)
    blocks = {'query_block': 256, 'gallery_block': banks.even_block(c, 131072)}
    search_old = timed(
        lambda o: knn.topk(o, o, k, exclude_self=True, **blocks), old, repeats=cfg['repeats']
    )
    search_new = timed(
        lambda o, n: knn.topk(o, n, k, exclude_self=True, **blocks),
        old,
        new,
        repeats=cfg['repeats'],
    )
    out = {'search_old': search_old, 'search_new': search_new}
    if 'ndpp' in results:
        out['rest_seconds'] = (
            results['ndpp']['seconds'] - search_old['seconds'] - search_new['seconds']
        )
    return out


@measurement('odpp')
def bench_odpp(cfg, results):
    """One ODPP refresh and one NDPP refresh at `odpp_classes`, timed in turn."""
    del results
    c, per_step = cfg['odpp_classes'], cfg['odpp_pairs_per_step']
    steps = perturbation.passes_to_steps(c, cfg['odpp_passes'], per_step)
    old, new = _banks(cfg, c)

    def odpp(o, n, d):
        return perturbation.odpp(o, n, d, jax.random.key(0), steps=steps, pairs_per_step=per_step)

    calls = {'odpp': (odpp, (old, new, jnp.zeros_like(old))), 'ndpp': _ndpp_call(cfg, c)}
    timing = timed_together(calls, repeats=cfg['repeats'])
    ratio = ratios(timing, 'odpp', 'ndpp')
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
        ratio_to_ndpp=ratio['ratio'],
        paired_ratios_to_ndpp=ratio['paired_ratios'],
        target_ratio=10.0,
    )
