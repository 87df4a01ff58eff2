"""Timings of the prototype-perturbation code at GLDv2 scale, as JSON.

    python -m bcl_jax.bench [--classes=81313] [--dim=256] [--k=100] [--odpp_classes=24393]
                            [--odpp_passes=100] [--out=bench.json] [--quick]
                            [--measure=floor,ndpp,odpp]
    python -m bcl_jax.bench --measure=train_step [--step_image_size=112] [--step_batch=32]
                            [--step_classes=81313] [--step_repeats=3] [--quick]
    python -m bcl_jax.bench --measure=train_step,torch_step [--step_image_size=224]
                            [--step_batch=256] [--torch_compile=false] [--torch_warmup=3]
    python -m bcl_jax.bench --measure=eval_topk [--eval_queries=1129] [--eval_index=761757]
                            [--eval_dim=512] [--eval_k=100] [--eval_query_block=1024]
                            [--eval_gallery_block=32768] [--eval_repeats=3] [--quick]

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
- eval_topk (not run by default; ~45 s at full size, 5 GB of memory): the GLDv2 retrieval
  search, 1,129 queries against 761,757 index embeddings, D = 512, top-100 by inner product:
  `knn.topk` and, when `import faiss` works (requirements-bench.txt), faiss-cpu `IndexFlatIP`
  (exact; all cores), timed in turn. faiss's search time is the one compared (its add, a copy
  of the index, is reported apart); ratio bcl_jax / faiss (target <= 1). Also: whether both
  found the same neighbours (scores per rank within 1e-5; top-k sets equal, or differing only
  by items at the cut-off within 1e-5, i.e. float32 near-ties), and knn's peak extra memory
  (XLA's temp buffers) against the Q × N matrix. Without faiss, `faiss.available` is false.

- train_step (not run by default): one jitted train step of the GLDv2 configs' old ResNet-18
  and new ResNet-50 at `step_image_size` px, batch `step_batch`, `step_classes` classes:
  images/s of each, and the new model's step with BCT, NDPP and ODPP and their ratios to BCT.
- torch_step (not run by default; needs torch and torchvision, requirements-bench.txt, else
  `available` is false): the new model's BCT step of train_step in PyTorch, same model, loss,
  optimizer, batch and sizes (`torch_bct_module`; tests/test_bench.py checks that its losses
  equal bcl_jax's on the same weights), on CUDA when there is one, else the CPU; eager and
  torch.compile'd (`--torch_compile`), channels_last, cudnn.benchmark, and TF32 in matmuls and
  convolutions exactly when JAX's default matmul precision uses it (the default does, on Ampere
  and newer GPUs). It runs in a child process (no shared CUDA libraries, memory pools or CPU
  threads with JAX); with it, JAX's GPU memory preallocation is off unless XLA_PYTHON_CLIENT_*
  says otherwise, so that JAX does not hold 75% of the GPU. After train_step in the same run,
  `jax_to_torch` is JAX's BCT images/s per device over PyTorch's on one (target >= 1 on a GPU at
  224 px and the configs' batch 256: `--step_image_size=224 --step_batch=256`). `--quick`
  leaves torch.compile out.

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
- GLDv2 search (eval_topk), knn as it was: expected about faiss's time (both are a 0.9 TFLOP
  matmul on 2 cores plus a selection). Measured, one quiet run: faiss search 3.68 s; knn with
  gldv2.retrieval's blocks (1,024 × 4,096) 13.1 s (3.6x): the 1,129 queries were padded to
  2 × 1,024 rows (1.8x the work), each 4,096 columns cost a TopK and a merge (~7 us per row
  each), and XLA's temporaries held a padded and a sliced copy of the gallery (3.1 GB, 0.9x
  the 3.4 GB Q × N matrix that blocking avoids). With 1,129 × 32,768 blocks: 4.24 s (1.15x).
- knn changes, one at a time, each kept (results bit-identical to the old code at equal
  blocks): (1) Q split into equal blocks (1,129 -> 2 × 565): expected -45% at 1,024-row blocks,
  measured -22% at 4,096-wide blocks (N = 262,144, old code: 3.94 -> 3.08 s). (2) The gallery
  sliced in place, the last partial block being the window that ends at N (rows already seen
  masked), and one top-k per block over [running top-k, block] instead of a top-k and a merge:
  expected the same speed, one merge call less; measured 1.36 vs 1.34 s (N = 262,144, 1,129 ×
  65,536), temp memory 3.1 GB -> 31 MB at 1,024 × 4,096 blocks. (3) The group-max pre-filter
  tried for NDPP above, now with the running k-th best as threshold (knn._block_candidates):
  expected -30 to -40% of the top-k time (1,136 × 65,536 scores: TopK 125 ms; group max,
  TopK of 4,096 maxima, gather, TopK of 1,600: 70 ms), more once the threshold leaves few
  groups (here 24 blocks; NDPP's search is one block). Measured, full size, same run: 3.67 ->
  2.56 s (-30%). A mask (padding, self pairs) on a score block costs ~15% (1.11 vs 0.91 s at
  N = 262,144), so blocks that need none get none. NDPP's searches are unchanged (C = 40,000:
  7.33 vs 7.28 s; 81,313: 19.45 vs 19.54 s).
- Group size: 16 columns; 8 +10%, 32 +4% (same run). XLA:CPU's max over a minor axis of 8
  runs ~4x slower than over 16.
- Block shape, N = 262,144, same run: 1,024 × 4,096 1.25 s, × 16,384 1.01, × 32,768 0.94,
  × 65,536 0.92; 256 × 65,536 1.07; 128 × 131,072 1.24. Default here 1,024 × 32,768 (a 74 MB
  score block; XLA temp 220 MB at full size, 6.4% of Q × N).
- `lax.approx_max_k(recall_target=1.0)`: on CPU it lowers to the same TopK call as
  `lax.top_k`: identical results and time. Not used.
- Result, `--measure=eval_topk`, two runs on a quiet machine: knn 2.53 / 2.52 s, faiss search
  3.62 / 4.05 s (add 0.7 s), ratio 0.70 / 0.62 (paired 0.61-0.72); with gldv2.retrieval's
  1,024 × 4,096 blocks knn 3.40 s against faiss's 3.68 (0.92). knn is within ~1.2x of its matmul (a masked row max on the same blocks: 0.78 vs
  0.92 s at N = 262,144). Same neighbours: 1,128 of 1,129 top-100 sets equal, the other one
  swaps two items at the cut-off whose scores agree to 3e-7. faiss (its wheel loads the AVX2
  build here) slows far more under load from other jobs: 9-18 s in busy minutes where knn
  took 2.5-4.5 s.
- train_step against torch_step (PyTorch 2.15 on the CPU, oneDNN), one run, 112 px, batch 32,
  81,313 classes, not timed in turn, so only indicative: JAX's BCT step 13.3 images/s, PyTorch
  eager 32.3, torch.compile'd 38.9 (48 s to compile): JAX / PyTorch 0.41 and 0.34. The issue's
  target (>= 1) is for a GPU at 224 px and batch 256; not yet measured there.
- Microbenchmark pitfall: a `lax.top_k` whose outputs are only partly used (say `t[:, -1]`)
  becomes a full sort in XLA:CPU (~50x slower); consume whole outputs when timing it.
"""

from __future__ import annotations

import functools
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
import jax.numpy as jnp
import numpy as np
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
flags.DEFINE_integer('eval_queries', 1129, 'eval_topk: queries (GLDv2 retrieval test: 1,129).')
flags.DEFINE_integer('eval_index', 761757, 'eval_topk: index embeddings (GLDv2: 761,757).')
flags.DEFINE_integer('eval_dim', 512, 'eval_topk: embedding dimension.')
flags.DEFINE_integer('eval_k', 100, 'eval_topk: neighbours per query (mAP@100).')
flags.DEFINE_integer('eval_query_block', 1024, 'eval_topk: knn.topk query_block.')
flags.DEFINE_integer('eval_gallery_block', 32768, 'eval_topk: knn.topk gallery_block.')
flags.DEFINE_integer('eval_repeats', 3, 'eval_topk: timed runs of each tool, taken in turn.')
flags.DEFINE_integer('step_image_size', 112, 'train_step: image side (GLDv2 configs: 224).')
flags.DEFINE_integer('step_batch', 32, 'train_step: global batch (GLDv2 configs: 256).')
flags.DEFINE_integer('step_classes', 81313, 'train_step: classes of the new model.')
flags.DEFINE_integer('step_repeats', 3, 'train_step: timed steps of each model, taken in turn.')
flags.DEFINE_bool('torch_compile', True, 'torch_step: also time the step under torch.compile.')
flags.DEFINE_integer('torch_warmup', 3, 'torch_step: untimed steps first (cudnn autotuning).')
flags.DEFINE_list('measure', ['floor', 'ndpp', 'odpp'], 'Measurements to run, in order.')
flags.DEFINE_string('out', 'bench.json', 'Where to write the JSON results.')
flags.DEFINE_bool('quick', False, 'Small sizes (seconds), for tests.')

QUICK = {
    'classes': 600,
    'dim': 32,
    'k': 10,
    'odpp_classes': 300,
    'odpp_passes': 2,
    'odpp_pairs_per_step': 64,
    'eval_queries': 50,
    'eval_index': 3000,
    'eval_dim': 32,
    'eval_k': 10,
    'eval_query_block': 32,
    'eval_gallery_block': 1024,
    'eval_repeats': 1,
    'step_image_size': 32,
    'step_batch': 8,
    'step_classes': 100,
    'step_repeats': 1,
    'torch_compile': False,
    'torch_warmup': 1,
}

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


def random_unit_np(seed: int, rows: int, dim: int, chunk: int = 65536):
    """(rows, dim) float32 random unit vectors, drawn `chunk` rows at a time (no float64 or
    second full-size temporary)."""
    rng = np.random.default_rng(seed)
    out = np.empty((rows, dim), np.float32)
    for start in range(0, rows, chunk):
        x = rng.standard_normal((min(chunk, rows - start), dim), dtype=np.float32)
        out[start : start + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def topk_agreement(scores_a, idx_a, scores_b, idx_b, tol: float = 1e-5) -> dict:
    """How far two top-k results (rows sorted by descending score) agree. Float32 scores from
    differently ordered sums differ in the last bits, so near-ties may swap: a differing index
    is `explained` when its score is within `tol` of the row's k-th score (an item at the
    cut-off), and ranks where the two differ must still agree in score within `tol`."""
    scores_a, scores_b = np.asarray(scores_a, np.float64), np.asarray(scores_b, np.float64)
    idx_a, idx_b = np.asarray(idx_a), np.asarray(idx_b)
    score_diff = np.abs(scores_a - scores_b)
    same_set, unexplained = 0, 0
    for sa, ia, sb, ib in zip(scores_a, idx_a, scores_b, idx_b):
        only_a, only_b = np.setdiff1d(ia, ib), np.setdiff1d(ib, ia)
        if not len(only_a):
            same_set += 1
            continue
        kth = min(sa[-1], sb[-1])
        edge = np.concatenate([sa[np.isin(ia, only_a)], sb[np.isin(ib, only_b)]])
        unexplained += int(np.any(edge > kth + tol))
    q = len(idx_a)
    return {
        'queries_same_order': int(np.sum(np.all(idx_a == idx_b, axis=1))),
        'queries_same_set': same_set,
        'queries_set_differs_beyond_ties': unexplained,
        'fraction_same_set': same_set / q,
        'ranks_score_within_tol': float(np.mean(score_diff <= tol)),
        'max_score_diff': float(score_diff.max()),
        'tol': tol,
    }


@measurement('eval_topk')
def bench_eval_topk(cfg, results):
    """The GLDv2 retrieval search (top-k by inner product of unit vectors): `knn.topk` against
    faiss-cpu `IndexFlatIP` (exact), timed in turn; faiss's search time is the one to compare
    (its add, a copy of the index, is reported apart). Also checks that both find the same
    neighbours and reports knn's peak extra memory (XLA's temp buffers) against Q × N scores."""
    q, n, d, k = cfg['eval_queries'], cfg['eval_index'], cfg['eval_dim'], cfg['eval_k']
    queries_np, index_np = random_unit_np(0, q, d), random_unit_np(1, n, d)
    queries, index = jax.device_put(queries_np), jax.device_put(index_np)
    blocks = {'query_block': cfg['eval_query_block'], 'gallery_block': cfg['eval_gallery_block']}

    def search(qs, gs):
        return knn.topk(qs, gs, k, **blocks)

    calls = {'bcl_jax': (search, (queries, index))}
    try:
        import faiss
    except ImportError as e:
        faiss_out = {'available': False, 'error': str(e)}
    else:
        faiss.omp_set_num_threads(os.cpu_count())
        start = time.perf_counter()
        flat = faiss.IndexFlatIP(d)
        flat.add(index_np)
        faiss_out = {
            'available': True,
            'version': faiss.__version__,
            'threads': faiss.omp_get_max_threads(),
            'add_seconds': time.perf_counter() - start,
        }
        calls['faiss'] = (lambda x: flat.search(x, k), (queries_np,))
    timing = timed_together(calls, repeats=cfg['eval_repeats'])

    compiled = jax.jit(search).lower(queries, index).compile()
    stats = compiled.memory_analysis()
    temp = None if stats is None else int(stats.temp_size_in_bytes)
    full = 4 * q * n
    qb = knn._even_block(q, blocks['query_block'])  # knn splits Q into equal blocks
    out = dict(
        timing['bcl_jax'],
        queries=q,
        index=n,
        dim=d,
        k=k,
        **blocks,
        faiss=faiss_out,
        memory={
            'temp_bytes': temp,
            'score_block_bytes': 4 * qb * min(blocks['gallery_block'], n),
            'full_matrix_bytes': full,
            'temp_fraction_of_full': None if temp is None else temp / full,
            'index_bytes': 4 * n * d,
        },
        target_ratio=1.0,
    )
    if faiss_out['available']:
        faiss_out.update(timing['faiss'])
        ratios = _ratios(timing, 'bcl_jax', 'faiss')
        scores, idx = search(queries, index)
        f_scores, f_idx = calls['faiss'][0](queries_np)
        out.update(
            ratio_to_faiss=ratios['ratio'],
            paired_ratios_to_faiss=ratios['paired_ratios'],
            agreement=topk_agreement(scores, idx, f_scores, f_idx),
        )
    return out


def _train_step_call(model_cfg, method: str, cfg, config, mesh):
    """A no-argument call running one jitted train step of `method` (state carried over)."""
    from bcl_jax import sharding, train
    from bcl_jax.data import pipeline

    classes, batch, size = cfg['step_classes'], cfg['step_batch'], cfg['step_image_size']
    graphdef, params, stats = train.init_model(model_cfg, classes, seed=0)
    tx, _ = train.make_optimizer(config.new.train, steps_per_epoch=1000.0)
    weights = {t: config.compat.weight for t in train.METHOD_TERMS[method]}
    aux = {'prototypes': random_bank(1, classes, model_cfg.embedding_dim)} if weights else {}
    bank = aux['prototypes'] if method in train.PERTURBATIONS else None
    state = train.initial_state(params, stats, tx, bank)
    state, state_sharding = sharding.place(state, mesh, shard_classes=False)
    aux, aux_sharding = sharding.place(aux, mesh, shard_classes=False)
    step = train.jit_train_step(
        mesh,
        train.make_train_step(
            graphdef,
            tx,
            weights=weights,
            model_cfg=model_cfg,
            compat_cfg=config.compat,
            old=None,
            perturb_cfg=config.perturb,
            num_classes=classes,
        ),
        state_sharding,
        aux_sharding,
    )
    rng = np.random.default_rng(0)
    images = pipeline.to_global(
        dict(
            image=rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
            label=rng.integers(0, classes, batch).astype(np.int32),
        ),
        mesh,
    )
    carried = [state]

    def call():
        carried[0], metrics = step(carried[0], images, aux)
        return metrics['loss']

    return call


@measurement('train_step')
def bench_train_step(cfg, results):
    """The train step of the GLDv2 configs' models (configs/gldv2.py) at a reduced image size:
    the old ResNet-18 and the new ResNet-50 alone (independent), and the new one with BCT, NDPP
    and ODPP, timed in turn; images/s per step and the ratios to BCT. NDPP's and ODPP's steps
    differ from BCT's by the EMA update of the new prototypes; their refreshes (measured by
    `ndpp` and `odpp`) come once per epoch, ~6,200 steps of GLDv2 at batch 256."""
    from bcl_jax import train
    from configs import gldv2

    config = gldv2.get_config()
    mesh = train.make_mesh(config.mesh)
    calls = {
        'old_resnet18': (_train_step_call(config.old.model, 'independent', cfg, config, mesh), ())
    }
    for method in ('independent', 'bct', 'ndpp', 'odpp'):
        calls[f'new_resnet50_{method}'] = (
            _train_step_call(config.new.model, method, cfg, config, mesh),
            (),
        )
    timings = timed_together(calls, repeats=cfg['step_repeats'])
    for t in timings.values():
        t['images_per_sec'] = cfg['step_batch'] / t['seconds']
    bct = timings['new_resnet50_bct']['seconds']
    return dict(
        image_size=cfg['step_image_size'],
        batch=cfg['step_batch'],
        classes=cfg['step_classes'],
        devices=jax.device_count(),
        steps=timings,
        ratio_to_bct={m: timings[f'new_resnet50_{m}']['seconds'] / bct for m in ('ndpp', 'odpp')},
    )


def _tf32_for(jax_precision) -> bool:
    """Whether JAX computes float32 matmuls and convolutions in TF32 on an Ampere or newer GPU
    at this `jax_default_matmul_precision`: unset (DEFAULT) does, as do the reduced levels; only
    the full-float32 names do not."""
    name = 'default' if jax_precision is None else str(jax_precision).lower()
    return name not in ('highest', 'float32', 'f32_f32_f32')


def torch_bct_module(
    classes: int,
    *,
    dim: int = 256,
    scale: float = 30.0,
    margin: float = 0.3,
    temperature: float = 0.07,
    weight: float = 1.0,
    prototypes=None,
):
    """The GLDv2 configs' new model and BCT loss in PyTorch (needs torch and torchvision):
    uint8 NHWC images -> ImageNet standardisation -> torchvision ResNet-50 (no fc) ->
    Linear(2048, dim) -> L2 normalisation; CosFace cosines against the normalised columns of
    `kernel` (dim, C), clipped to [-1, 1]; loss = CE(s·(cos − m on the target)) + weight ·
    CE(emb·prototypesᵀ / temperature), as bcl_jax.losses. `prototypes` (C, dim): a fixed bank
    (default: random unit vectors). `forward(images, labels)` returns (loss, l_cls, l_comp)."""
    import torch
    import torchvision
    from torch.nn import functional as F

    from bcl_jax.models.heads import IMAGENET_MEAN, IMAGENET_STD

    def unit(x, axis=-1):  # bcl_jax.models.heads.l2_normalize
        return x * torch.rsqrt(x.square().sum(axis, keepdim=True).clamp_min(1e-24))

    if prototypes is None:
        prototypes = random_unit_np(1, classes, dim)

    class BCTStep(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = torchvision.models.resnet50(weights=None, zero_init_residual=True)
            self.backbone.fc = torch.nn.Identity()
            self.proj = torch.nn.Linear(self.backbone.inplanes, dim)
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


def torch_state_from_bcl_jax(params, batch_stats, stage_sizes=(3, 4, 6, 3)) -> dict:
    """A `torch_bct_module` state dict (numpy arrays) from bcl_jax's ResNet-50 EmbeddingModel
    weights (`train.init_model`'s pure dicts): conv kernels HWIO -> OIHW, BatchNorm scale/bias
    and mean/var -> weight/bias and running_mean/running_var, the Dense kernel transposed; the
    CosFace kernel (dim, C) as it is."""
    out = {}

    def conv(name, p):
        out[f'{name}.weight'] = np.transpose(np.asarray(p['kernel']), (3, 2, 0, 1))

    def bn(name, p, s):
        out[f'{name}.weight'], out[f'{name}.bias'] = np.asarray(p['scale']), np.asarray(p['bias'])
        out[f'{name}.running_mean'], out[f'{name}.running_var'] = map(
            np.asarray, (s['mean'], s['var'])
        )

    bb, bs = params['backbone'], batch_stats['backbone']
    conv('backbone.conv1', bb['stem_conv'])
    bn('backbone.bn1', bb['stem_bn'], bs['stem_bn'])
    i = 0
    for stage, blocks in enumerate(stage_sizes):
        for j in range(blocks):
            p, s, name = bb['blocks'][i], bs['blocks'][i], f'backbone.layer{stage + 1}.{j}'
            for k in (1, 2, 3):
                conv(f'{name}.conv{k}', p[f'conv{k}'])
                bn(f'{name}.bn{k}', p[f'bn{k}'], s[f'bn{k}'])
            if p.get('shortcut') is not None:
                conv(f'{name}.downsample.0', p['shortcut']['conv'])
                bn(f'{name}.downsample.1', p['shortcut']['bn'], s['shortcut']['bn'])
            i += 1
    if i != len(bb['blocks']):
        raise ValueError(f'{len(bb["blocks"])} blocks, expected {i} (ResNet-50)')
    out['proj.weight'] = np.asarray(params['head']['proj']['kernel']).T
    out['proj.bias'] = np.asarray(params['head']['proj']['bias'])
    out['kernel'] = np.asarray(params['classifier']['kernel'])
    return out


def load_bcl_jax_weights(module, params, batch_stats) -> None:
    """Copy bcl_jax's weights into a `torch_bct_module`; every parameter and statistic is set
    (only BatchNorm's step counters, which bcl_jax has not, are left)."""
    import torch

    state = {k: torch.tensor(v) for k, v in torch_state_from_bcl_jax(params, batch_stats).items()}
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith('num_batches_tracked')]
    if missing or unexpected:
        raise ValueError(f'weights not matched: missing {missing}, unexpected {unexpected}')


def torch_sgd(module, *, lr: float, momentum: float, weight_decay: float):
    """torch SGD over every parameter, as bcl_jax.train.make_optimizer (decay on all weights);
    the fused kernel where this build has it."""
    import torch

    kw = {'lr': lr, 'momentum': momentum, 'weight_decay': weight_decay}
    try:
        return torch.optim.SGD(module.parameters(), fused=True, **kw), 'fused'
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.SGD(module.parameters(), **kw), 'default'


def _torch_step_child(spec_path: str, out_path: str) -> None:
    """Runs in a child process (see `bench_torch_step`): times the PyTorch step, writes JSON."""
    with open(spec_path) as f:
        spec = json.load(f)
    with open(out_path, 'w') as f:
        json.dump(_torch_step_timings(spec), f)


def _torch_step_timings(spec: dict) -> dict:
    try:
        import torch
        import torchvision
    except (ImportError, OSError, RuntimeError) as e:  # also a torchvision unfit for the torch
        return {'available': False, 'error': f'{type(e).__name__}: {e}'}
    cuda = torch.cuda.is_available()
    device = torch.device('cuda' if cuda else 'cpu')
    tf32 = _tf32_for(spec['jax_default_matmul_precision'])
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32

    def sync():
        if cuda:
            torch.cuda.synchronize()

    classes, batch, size = spec['classes'], spec['batch'], spec['image_size']
    rng = np.random.default_rng(0)  # the batch of bench._train_step_call
    images = torch.from_numpy(rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8))
    labels = torch.from_numpy(rng.integers(0, classes, batch).astype(np.int64))
    images, labels = images.to(device), labels.to(device)
    head = {k: spec[k] for k in ('dim', 'scale', 'margin', 'temperature', 'weight')}
    opt = {k: spec[k] for k in ('lr', 'momentum', 'weight_decay')}

    variants, out = {}, {}
    for name in ('eager', 'compiled') if spec['compile'] else ('eager',):
        torch.manual_seed(0)
        module = torch_bct_module(classes, **head).to(device, memory_format=torch.channels_last)
        module.train()
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
            'all_seconds': [],
        }
        variants[name] = step
    for _ in range(spec['repeats']):  # in turn, as timed_together
        for name, step in variants.items():
            sync()
            start = time.perf_counter()
            step()
            sync()
            out[name]['all_seconds'].append(time.perf_counter() - start)
    for name in variants:
        r = out[name]
        r.update(seconds=min(r['all_seconds']), runs=len(r['all_seconds']))
        r['images_per_sec'] = batch / r['seconds']
    backends = torch.backends
    return {
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
        'steps': out,
    }


@measurement('torch_step')
def bench_torch_step(cfg, results):
    """The new ResNet-50's BCT step of `train_step` in PyTorch (torch_bct_module): same model,
    loss, optimizer (configs/gldv2.py), batch and sizes; eager and, with `torch_compile`,
    torch.compile'd, timed in turn, one synchronised step per timing after `torch_warmup` steps.
    CUDA when torch sees it, else the CPU; channels_last, cudnn.benchmark, and TF32 exactly when
    JAX's default matmul precision uses it. Runs in a child process, so that PyTorch and JAX do
    not share CUDA libraries, memory pools or CPU threads. With `train_step` earlier in the same
    run: images/s per device of JAX's BCT step over PyTorch's on one (target >= 1)."""
    from configs import gldv2

    missing = next((m for m in ('torch', 'torchvision') if importlib.util.find_spec(m) is None), '')
    if missing:
        return {'available': False, 'error': f'No module named {missing!r}'}
    config = gldv2.get_config()
    model, train_cfg = config.new.model, config.new.train
    if (model.arch, model.width, model.head) != ('resnet50', 64, 'cosface'):
        raise ValueError(f'torch_step mirrors a ResNet-50 CosFace model, not {model}')
    spec = {
        'image_size': cfg['step_image_size'],
        'batch': cfg['step_batch'],
        'classes': cfg['step_classes'],
        'dim': model.embedding_dim,
        'scale': model.scale,
        'margin': model.margin,
        'temperature': config.compat.temperature,
        'weight': config.compat.weight,
        'lr': train_cfg.learning_rate,
        'momentum': train_cfg.momentum,
        'weight_decay': train_cfg.weight_decay,
        'repeats': cfg['step_repeats'],
        'warmup': cfg['torch_warmup'],
        'compile': cfg['torch_compile'],
        'jax_default_matmul_precision': jax.config.jax_default_matmul_precision,
    }
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get('PYTHONPATH')]))
    )
    code = 'import sys; from bcl_jax import bench; bench._torch_step_child(*sys.argv[1:])'
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = os.path.join(tmp, 'spec.json'), os.path.join(tmp, 'out.json')
        with open(spec_path, 'w') as f:
            json.dump(spec, f)
        child = subprocess.run(
            [sys.executable, '-c', code, spec_path, out_path],
            check=False,
            env=env,
            capture_output=True,
            text=True,
        )
        if child.returncode or not os.path.exists(out_path):
            return {'available': True, 'error': f'exit {child.returncode}: {child.stderr[-4000:]}'}
        with open(out_path) as f:
            out = json.load(f)
    out = dict(
        out,
        image_size=spec['image_size'],
        batch=spec['batch'],
        classes=spec['classes'],
        jax_gpu_preallocate=os.environ.get('XLA_PYTHON_CLIENT_PREALLOCATE'),
        target_ratio=1.0,
    )
    jax_step = results.get('train_step', {}).get('steps', {}).get('new_resnet50_bct')
    if out['available'] and jax_step is not None:
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
    return out


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
        eval_queries=FLAGS.eval_queries,
        eval_index=FLAGS.eval_index,
        eval_dim=FLAGS.eval_dim,
        eval_k=FLAGS.eval_k,
        eval_query_block=FLAGS.eval_query_block,
        eval_gallery_block=FLAGS.eval_gallery_block,
        eval_repeats=FLAGS.eval_repeats,
        step_image_size=FLAGS.step_image_size,
        step_batch=FLAGS.step_batch,
        step_classes=FLAGS.step_classes,
        step_repeats=FLAGS.step_repeats,
        torch_compile=FLAGS.torch_compile,
        torch_warmup=FLAGS.torch_warmup,
        measure=list(FLAGS.measure),
        quick=FLAGS.quick,
    )
    if FLAGS.quick:
        cfg.update(QUICK)
    jax_memory = ('XLA_PYTHON_CLIENT_PREALLOCATE', 'XLA_PYTHON_CLIENT_MEM_FRACTION')
    if 'torch_step' in cfg['measure'] and not any(v in os.environ for v in jax_memory):
        # PyTorch runs in a child process on the same GPU: without this JAX would take 75% of
        # its memory at its first use and keep it. Set before JAX starts its backend.
        os.environ['XLA_PYTHON_CLIENT_PREALLOCATE'] = 'false'
    report = run(cfg)
    with open(FLAGS.out, 'w') as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))


if __name__ == '__main__':
    app.run(main)
