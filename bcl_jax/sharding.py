"""Where the train state lives: replicated, or with the class axis split over the devices.

The mesh (`make_mesh`) is 1-D with axis 'data'; the batch is split by rows over it. With
`config.mesh.shard_classes`, the arrays whose size grows with the number of classes C are split
by class over the same axis, and everything else stays replicated. The rule (`class_axis`) reads
a leaf's place in the train state or in the `stage.Reference`:

- a classifier's `kernel` (D, C) and `bias` (C,): any leaf under a 'classifier' key, so the new
  model's weights, the optimizer's momentum (which mirrors them) and the frozen old model's
  classifier in the reference alike: P(None, 'data') and P('data');
- arrays indexed by class on their first axis: the reference's `prototypes` (C, D) and
  `class_stats`, and a method's state under 'banks' (bcl_jax.methods): P('data', ...).

JAX 0.10.2 refuses a NamedSharding whose dimension the device count does not divide (for
`device_put` and jit arguments), so a sharded class axis is padded with zero classes up to a
multiple of the device count (`pad_classes`). The padding stays zero (masked logits give it zero
gradients; no label points at it), every loss, softmax, top-k and ODPP pair draw ignores it
through a `num_classes` argument, and `unpad` drops it on the host. Checkpoints hold the padding
of the mesh that wrote them; a restore pads or truncates to the current one.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = 'data'  # the batch's axis, and the class axis's when classes are sharded
_BY_CLASS = ('prototypes', 'class_stats', 'banks')  # fields and keys of arrays indexed by class


def _keys(path) -> list:
    return [getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', None))) for k in path]


def class_axis(path, leaf) -> int | None:
    """The class axis of a leaf of the train state or reference, by its path; None if none."""
    keys, ndim = _keys(path), np.ndim(leaf)
    if 'classifier' in keys and keys[-1] in ('kernel', 'bias'):
        return ndim - 1
    if ndim >= 1 and any(k in _BY_CLASS for k in keys):
        return 0
    return None


def make_mesh(mesh_cfg, devices=None):
    """The 1-D mesh, axis 'data', over all devices (or over `devices`, e.g. for tests)."""
    devices = jax.devices() if devices is None else list(devices)
    n = len(devices) if mesh_cfg.data == -1 else mesh_cfg.data
    if n != len(devices):
        raise ValueError(
            f'config.mesh.data={mesh_cfg.data} does not match the '
            f'{len(devices)} devices; use -1 for all devices'
        )
    return jax.make_mesh((n,), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def _spec(path, leaf, shard_classes: bool) -> P:
    axis = class_axis(path, leaf) if shard_classes else None
    if axis is None:
        return P()
    return P(*[AXIS if d == axis else None for d in range(np.ndim(leaf))])


def shardings(tree, mesh, *, shard_classes: bool):
    """The NamedSharding of every leaf of `tree` (a state or a reference) under the rule above."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, _spec(path, x, shard_classes)), tree
    )


def class_multiple(mesh, shard_classes: bool) -> int:
    """What a class axis is padded to a multiple of: the device count when sharded, else 1."""
    return mesh.shape[AXIS] if shard_classes else 1


def ceil_div(a: int, b: int) -> int:
    """ceil(a / b) for positive ints, exactly (no float rounding)."""
    return -(-a // b)


def padded(n: int, multiple: int) -> int:
    """`n` rounded up to a multiple of `multiple` (the padded size of a class or block axis)."""
    return ceil_div(n, multiple) * multiple


def pad_rows(x, size: int, axis: int = 0):
    """`x` with zeros appended along `axis` up to `size` (NumPy stays NumPy)."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, extra if d == axis else 0) for d in range(x.ndim)]
    return np.pad(x, widths) if isinstance(x, np.ndarray) else jnp.pad(x, widths)


def pad_classes(tree, multiple: int):
    """Every class axis of `tree` padded with zero classes to a multiple of `multiple`."""

    def pad(path, x):
        axis = class_axis(path, x)
        if axis is None or multiple == 1:
            return x
        return pad_rows(x, padded(x.shape[axis], multiple), axis)

    return jax.tree_util.tree_map_with_path(pad, tree)


def place(tree, mesh, *, shard_classes: bool):
    """`tree` padded and laid out on `mesh` under the rule; returns (placed tree, shardings)."""
    tree = pad_classes(tree, class_multiple(mesh, shard_classes))
    placement = shardings(tree, mesh, shard_classes=shard_classes)
    return jax.device_put(tree, placement), placement


def to_host(x) -> np.ndarray:
    """A NumPy copy of a global array, also when other hosts hold some of its shards."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


def unpad(tree, num_classes: int):
    """Host copies of `tree`'s leaves with the class padding dropped (C classes kept)."""

    def cut(path, x):
        x, axis = to_host(x), class_axis(path, x)
        return x if axis is None else np.take(x, np.arange(num_classes), axis=axis)

    return jax.tree_util.tree_map_with_path(cut, tree)


def describe(mesh) -> str:
    """Processes, devices and the mesh, for the log."""
    return (
        f'{jax.process_count()} process(es), {jax.device_count()} device(s) '
        f'({jax.devices()[0].platform}), mesh {dict(mesh.shape)}'
    )


def initialize_distributed():
    """Joins the hosts of a multi-host run, or says what is missing."""
    env = {k: os.environ.get(f'JAX_{k.upper()}') for k in ('num_processes', 'process_id')}
    try:
        jax.distributed.initialize(**{k: int(v) for k, v in env.items() if v is not None})
    except ValueError as e:  # jax found no cluster and no coordinator address
        raise SystemExit(
            f'--distributed: no multi-host coordinator found ({e}). Launch on a Cloud TPU slice '
            'or under SLURM (see launch/), or set JAX_COORDINATOR_ADDRESS=host:port, '
            'JAX_NUM_PROCESSES and JAX_PROCESS_ID on every host; drop --distributed on one host.'
        ) from e
