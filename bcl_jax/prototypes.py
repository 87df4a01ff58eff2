"""Class-mean prototype banks (METHOD.md §2): computed by segment sums, stored, reused.

A prototype is the L2-normalised mean of a class's L2-normalised embeddings. The old bank is
computed once with the frozen old model over the new training set and stored in the work
directory as `.npy` beside a JSON file naming the old model's weights and the data; a rerun
reuses it, and a different old model, other data or a damaged file recomputes it.
"""

from __future__ import annotations

import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bcl_jax import checkpoint, sharding
from bcl_jax.evaluate import embed_batches


@jax.jit(static_argnames=('num_classes', 'mesh'))
def class_sums(emb, labels, valid, *, num_classes: int, mesh=None):
    """Per-class sums of embeddings and counts; rows with valid=False are ignored.

    With `mesh`, the sums and counts are sharded by class over its 'data' axis (`num_classes`
    then a multiple of its size): each device adds the batch into its own classes.
    """
    w = valid.astype(emb.dtype)
    sums = jax.ops.segment_sum(emb * w[:, None], labels, num_segments=num_classes)
    counts = jax.ops.segment_sum(w, labels, num_segments=num_classes)
    if mesh is not None:
        sums = jax.lax.with_sharding_constraint(sums, NamedSharding(mesh, P(sharding.AXIS, None)))
        counts = jax.lax.with_sharding_constraint(counts, NamedSharding(mesh, P(sharding.AXIS)))
    return sums, counts


def ema_class_means(bank, emb, labels, *, decay: float):
    """One EMA update of per-class means: bank_c <- decay·bank_c + (1 − decay)·mean of the batch's
    class-c embeddings, for the classes in the batch; absent classes keep their value.

    On a bank sharded by class, the segment sums are a scatter-add of the (gathered, (B, D))
    batch into each device's own classes; nothing (C, D)-sized moves between devices."""
    num_classes = bank.shape[0]
    sums = jax.ops.segment_sum(emb, labels, num_segments=num_classes)
    counts = jax.ops.segment_sum(jnp.ones_like(labels, emb.dtype), labels, num_segments=num_classes)
    means = sums / jnp.maximum(counts, 1)[:, None]
    return jnp.where(counts[:, None] > 0, decay * bank + (1 - decay) * means, bank)


def class_means(sums, counts, *, what: str = 'prototype bank'):
    """Normalised class means; a class without a single image is an error that names it."""
    counts = np.asarray(counts)
    if (counts == 0).any():
        empty = np.flatnonzero(counts == 0)[:10].tolist()
        raise ValueError(f'{what}: classes {empty} have no images, so they have no prototype')
    means = np.asarray(sums) / counts[:, None]
    return (means / np.linalg.norm(means, axis=1, keepdims=True)).astype(np.float32)


def compute(
    model, source, *, num_classes: int, mesh, batch_size: int, shard_classes: bool = False
) -> np.ndarray:
    """The (C, D) prototype bank of `model` over `source`, one pass, sums kept on device (sharded
    by class over `mesh` with `shard_classes`, the class axis padded as bcl_jax.sharding says)."""
    rows = sharding.padded(num_classes, sharding.class_multiple(mesh, shard_classes))
    sums = counts = 0
    for emb, labels, valid in embed_batches(model, source, mesh=mesh, batch_size=batch_size):
        s, c = class_sums(
            emb, labels, valid, num_classes=rows, mesh=mesh if shard_classes else None
        )
        sums, counts = sums + s, counts + c
    return class_means(sharding.to_host(sums)[:num_classes], sharding.to_host(counts)[:num_classes])


def _load_bank(path: str, identity: dict) -> np.ndarray | None:
    """The stored bank if its sidecar names `identity` and the file is whole, else None (a
    damaged file is reported, then recomputed)."""
    try:
        with open(path + '.json') as f:
            saved = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        logging.warning('old prototypes: %s.json is damaged (%s); recomputing', path, e)
        return None
    if saved != identity:
        logging.info('old prototypes: %s was made by another old model or data; recomputing', path)
        return None
    try:
        bank = np.load(path)
    except (OSError, ValueError, EOFError) as e:
        logging.warning('old prototypes: %s is damaged (%s); recomputing', path, e)
        return None
    if bank.shape != (identity['num_classes'], bank.shape[-1]) or not np.isfinite(bank).all():
        logging.warning('old prototypes: %s has shape %s or non-finite values; recomputing', path, bank.shape)
        return None
    logging.info('old prototypes: reusing %s', path)
    return bank


def old_bank(
    old, source, *, num_classes: int, workdir: str, mesh, batch_size: int, data_identity: str
):
    """The old prototypes over the new training set, from the work directory when current.

    The bank is stored with the old model's weight digest and `data_identity` (what the
    training data is): another old model or other data recomputes it, and so does a damaged file.
    """
    path = os.path.join(workdir, 'prototypes', 'old.npy')
    identity = dict(
        old_model=old.identity(),
        data=data_identity,
        num_classes=num_classes,
        num_images=len(source),
    )
    bank = _load_bank(path, identity)
    if bank is not None:
        return bank
    bank = compute(old, source, num_classes=num_classes, mesh=mesh, batch_size=batch_size)
    if jax.process_index() == 0:
        buf = io.BytesIO()
        np.save(buf, bank)
        checkpoint.write_atomic(path, buf.getvalue())
        checkpoint.write_atomic(path + '.json', json.dumps(identity, indent=1))
    logging.info('old prototypes: %d classes x %d dims -> %s', *bank.shape, path)
    return bank
