"""Checks and layouts of (C, D) prototype banks, and the neighbour search that NDPP, ODPP and
their logging share (bcl_jax.perturbation, bcl_jax.odpp).

Banks may carry zero padding rows after their C classes (bcl_jax.sharding) and may be sharded
by class over a mesh; these helpers check the real rows, gather or lay out the banks, and run
`knn.topk` with one block rule.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from bcl_jax import knn
from bcl_jax.sharding import ceil_div

# Neighbour searches: queries by 256, the gallery (per device) in equal blocks of at most
# 131,072 rows, rounded up to 8 (one block up to that size: fastest on CPU, docs/benchmarks.md).
QUERY_BLOCK, GALLERY_BLOCK, BLOCK_MULTIPLE = 256, 131072, 8

# The gallery block rule of the neighbour searches.
even_block = functools.partial(knn._even_block, multiple=BLOCK_MULTIPLE)


@jax.jit
def _row_flags(x):
    """Per row: has a NaN/Inf; is the zero vector. Small (C,) outputs, so sharded banks work."""
    x = x.astype(jnp.float32)
    return jnp.any(~jnp.isfinite(x), axis=1), jnp.all(x == 0, axis=1)


def _first(flags, n=10):
    return np.flatnonzero(np.asarray(flags))[:n].tolist()


def check(old, new, *, extra=(), zero_ok=(), num_classes=None):
    """Shapes (C, D) equal for all banks; no NaN/Inf; no zero rows (except banks in zero_ok).

    Rows from `num_classes` on are padding (bcl_jax.sharding) and are not checked."""
    banks = {'old': old, 'new': new, **dict(extra)}
    for name, x in banks.items():
        if getattr(x, 'ndim', None) != 2:
            raise ValueError(
                f'{name} bank must be a 2-D (classes, dim) array; got shape '
                f'{getattr(x, "shape", None)}.'
            )
        if x.shape != old.shape:
            raise ValueError(
                f'{name} bank has shape {x.shape} but the old bank has {old.shape}; '
                'all banks must be (classes, dim) with the same classes and dim.'
            )
    c = old.shape[0] if num_classes is None else num_classes
    if not 2 <= c <= old.shape[0]:
        raise ValueError(
            f'Prototype perturbation needs at least 2 classes (and at most the {old.shape[0]} '
            f'rows of the banks); got {c}.'
        )
    for name, x in banks.items():
        nonfinite, zero = (np.asarray(f)[:c] for f in _row_flags(x))
        if np.any(nonfinite):
            raise ValueError(
                f'{name} bank has NaN/Inf in classes {_first(nonfinite)} '
                f'({int(np.sum(nonfinite))} classes in all).'
            )
        if name not in zero_ok and np.any(zero):
            raise ValueError(
                f'{name} bank has zero vectors for classes {_first(zero)} '
                f'({int(np.sum(zero))} classes in all): every class needs a '
                'prototype (did a class get no images?).'
            )


def clamp_k(k, num_classes, what):
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ValueError(f'{what}: k must be a positive int; got {k!r}.')
    if k > num_classes - 1:
        logging.warning(
            '%s: k=%d exceeds the %d other classes; using k=%d.',
            what,
            k,
            num_classes - 1,
            num_classes - 1,
        )
        return num_classes - 1
    return int(k)


def mesh_axis(mesh, axis):
    """`axis` as a hashable name or tuple of names (None: all axes of `mesh`); checks them."""
    axis = tuple(mesh.axis_names) if axis is None else axis
    axis = axis if isinstance(axis, str) else tuple(axis)
    knn.axis_size(mesh, axis)  # raises for an axis the mesh lacks
    return axis[0] if isinstance(axis, tuple) and len(axis) == 1 else axis


def replicated(x, mesh=None):
    """x laid out whole on every device of `mesh` (outside jit), or, without a mesh, of the mesh
    it is sharded over: gathers and row lookups on row-sharded (Explicit) banks would fail."""
    if mesh is None:
        sharding = getattr(x, 'sharding', None)
        if not (
            isinstance(sharding, NamedSharding)
            and any(entry is not None for entry in sharding.spec)
        ):
            return x
        mesh = sharding.mesh
    return jax.device_put(x, NamedSharding(mesh, P()))


def valid_rows(x, num_classes, mesh=None):
    """x replicated (see `replicated`) without its padding rows (from `num_classes` on)."""
    x = replicated(x, mesh)
    return x if num_classes is None or num_classes == x.shape[0] else x[:num_classes]


def auto_axes(mesh):
    """`mesh` with Auto axes: the compiler then partitions row lookups into a row-sharded bank
    (a masked local gather and a sum over devices), which Explicit axes refuse."""
    return jax.sharding.Mesh(
        mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names)
    )


def search(
    queries,
    gallery,
    k,
    *,
    exclude_self,
    mesh=None,
    axis=None,
    query_block=QUERY_BLOCK,
    gallery_block=GALLERY_BLOCK,
):
    """`knn.topk` as NDPP, ODPP and their logging run it: the gallery (or each device's shard,
    with `mesh`, over mesh axis `axis`) in equal blocks of at most about `gallery_block` rows."""
    rows = gallery.shape[0]
    if mesh is not None:
        rows = ceil_div(rows, knn.axis_size(mesh, axis))
    return knn.topk(
        queries,
        gallery,
        k,
        exclude_self=exclude_self,
        mesh=mesh,
        axis=axis,
        query_block=min(query_block, queries.shape[0]),
        gallery_block=even_block(rows, gallery_block),
    )
