"""What every measurement shares: timing of jitted calls, alone or taken in turn, and the random
unit vectors they run on (the work of these computations does not depend on the data)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np


def timed(fn, *args, repeats: int = 1) -> dict:
    """A warm-up call (compile + run), then `repeats` timed calls; seconds."""
    return timed_together({'it': (fn, args)}, repeats=repeats)['it']


def timed_together(calls: dict, repeats: int = 1) -> dict:
    """`timed` for several calls {name: (fn, args)}, the timed runs taken in turn (a, b, a, b,
    ...) so that a ratio of two of them is not skewed by load that changes with time.

    Each result: warmup_seconds, all_seconds (one per repeat), seconds (their minimum), runs.
    Every call is waited for with `jax.block_until_ready`."""
    out = {}
    for name, (fn, args) in calls.items():
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        out[name] = {'warmup_seconds': time.perf_counter() - start, 'all_seconds': []}
    for _ in range(repeats):
        for name, (fn, args) in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            out[name]['all_seconds'].append(time.perf_counter() - start)
    for r in out.values():
        r.update(seconds=min(r['all_seconds']), runs=len(r['all_seconds']))
    return out


def alternating_blocks(blocks: dict, rounds: int) -> dict:
    """{name: seconds of every step} of `blocks` {name: fn() -> [seconds of each step it ran]},
    run in turn for `rounds` rounds, every other round in reverse order (a b, b a, a b, ...): load
    that changes with time, a steady drift included, falls on every block alike."""
    out = {name: [] for name in blocks}
    for r in range(rounds):
        for name in list(blocks) if r % 2 == 0 else reversed(list(blocks)):
            out[name] += blocks[name]()
    return out


def ratios(results: dict, a: str, b: str) -> dict:
    """min(a) / min(b), and a / b run by run (each pair ran back to back)."""
    ta, tb = results[a]['all_seconds'], results[b]['all_seconds']
    return {
        'ratio': min(ta) / min(tb),
        'paired_ratios': [x / y for x, y in zip(ta, tb, strict=True)],
    }


def random_bank(seed: int, classes: int, dim: int) -> jax.Array:
    """(classes, dim) random unit vectors on the default device."""
    x = jax.random.normal(jax.random.key(seed), (classes, dim), jnp.float32)
    return x / jnp.linalg.norm(x, axis=1, keepdims=True)


def random_unit_np(seed: int, rows: int, dim: int, chunk: int = 65536) -> np.ndarray:
    """(rows, dim) float32 random unit vectors in host memory, drawn `chunk` rows at a time (no
    float64 or second full-size temporary)."""
    rng = np.random.default_rng(seed)
    out = np.empty((rows, dim), np.float32)
    for start in range(0, rows, chunk):
        x = rng.standard_normal((min(chunk, rows - start), dim), dtype=np.float32)
        out[start : start + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out
