"""Input pipeline (grain): deterministic shuffling, augmentation, per-host sharding, batches.

A training stream is a pure function of (source, seed, position): the iterator's state is just
the position, so a checkpoint that stores it resumes on exactly the next batch. Each host reads
its own slice of every global batch; `to_global` assembles the host-local arrays into one array
sharded over the mesh.
"""

from __future__ import annotations

import grain
import jax
import numpy as np


def check_source(source, what: str):
    """Stops early, with the name of the dataset, on a source that cannot be trained on."""
    if len(source) == 0:
        raise ValueError(f'{what}: the dataset is empty')
    counts = np.bincount(np.asarray(source.labels), minlength=source.num_classes)
    if (counts == 0).any():
        empty = np.flatnonzero(counts == 0)[:10].tolist()
        raise ValueError(
            f'{what}: classes {empty} have no images; every class needs at least one '
            '(remove the class or add images)'
        )


def _augment(record: dict, rng: np.random.Generator, *, crop_padding: int, flip: bool) -> dict:
    image = record['image']
    if crop_padding:
        h, w = image.shape[:2]
        padded = np.pad(image, ((crop_padding,) * 2, (crop_padding,) * 2, (0, 0)), mode='reflect')
        y, x = rng.integers(0, 2 * crop_padding + 1, size=2)
        image = padded[y : y + h, x : x + w]
    if flip and rng.random() < 0.5:
        image = image[:, ::-1]
    return {'image': np.ascontiguousarray(image), 'label': record['label']}


def local_batch_size(global_batch: int) -> int:
    hosts = jax.process_count()
    if global_batch % jax.device_count():
        raise ValueError(
            f'batch size {global_batch} is not divisible by the {jax.device_count()} '
            'devices; choose a multiple of the device count'
        )
    return global_batch // hosts


def train_stream(
    source,
    *,
    global_batch: int,
    seed: int,
    crop_padding: int = 0,
    flip: bool = False,
    num_threads: int = 2,
):
    """An endless, reshuffled-every-epoch, augmented stream of host-local batches.

    Returns a grain iterator with get_state()/set_state() for checkpoints.
    """
    ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat(None)
    if crop_padding or flip:  # keyed by the global position: the same on any number of hosts
        ds = ds.random_map(lambda r, rng: _augment(r, rng, crop_padding=crop_padding, flip=flip))
    # Host h reads the h-th slice of every global batch, so that the global batch is the same
    # run of examples, in the same order, on 1 host or many.
    ds = ds.batch(local_batch_size(global_batch), drop_remainder=True)
    ds = ds[jax.process_index() :: jax.process_count()]
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=4)
    return iter(ds.to_iter_dataset(options))


def eval_batches(source, *, global_batch: int, num_threads: int = 2):
    """One ordered pass in host-local batches, the last one padded; yields (batch, valid_mask)."""
    local = local_batch_size(global_batch)
    n = len(source)
    num_batches = -(-n // global_batch)
    offset = jax.process_index() * local

    def load(b):
        rows = [b * global_batch + offset + i for i in range(local)]
        records = [source[min(r, n - 1)] for r in rows]
        batch = {k: np.stack([rec[k] for rec in records]) for k in ('image', 'label')}
        return batch, np.array([r < n for r in rows])

    ds = grain.MapDataset.range(num_batches).map(load)
    yield from ds.to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=4)
    )


_DATA_AXIS = jax.sharding.PartitionSpec('data')


def to_global(tree, mesh, spec=_DATA_AXIS):
    """Host-local numpy arrays -> global jax arrays sharded over the mesh's data axis."""
    sharding = jax.sharding.NamedSharding(mesh, spec)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), tree)
